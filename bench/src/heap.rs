//! `rg-bench-heap activate FILE [REPS]`: `rg-bench activate` with a counting global allocator,
//! adding the heap's peak bytes during activation and live bytes after it. A separate binary so
//! that the allocator wrapper never touches the timing loops of `rg-bench`.

use registry_guard_bench::CountingAlloc;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let target = if cfg!(target_arch = "wasm32") { "wasm32-wasip1" } else { "native" };
    let result = match (args.first().map(String::as_str), args.get(1)) {
        (Some("activate"), Some(file)) => {
            let reps = args.get(2).and_then(|r| r.parse().ok()).unwrap_or(3usize).max(1);
            registry_guard_bench::activate(file, reps, target).map(|v| println!("{v}"))
        }
        _ => Err("usage: rg-bench-heap activate FILE [REPS]".into()),
    };
    if result.is_ok() {
        // Completion marker (see bench/wasm/run.mjs).
        println!("{}", serde_json::json!({"bench": "done"}));
    }
    if let Err(e) = result {
        eprintln!("rg-bench-heap: {e}");
        std::process::exit(1);
    }
}
