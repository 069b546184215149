//! Two replicas of the reference consumer on one PostgreSQL (a real server from Debian's
//! package, started by the test): a redelivered event is counted once.
//!
//! Real pushes through Envoy: the registry's notification envelopes, attributed by the filter
//! on the events listener, are captured where the stack's consumer listens, then delivered to
//! two consumer binaries sharing one database: the same envelope to both replicas (and twice
//! to one, and to both at once) counts once; different events on different replicas add up;
//! both replicas serve the same `/counts` and `/events`.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use registry_guard_e2e::{free_port, root, Stack, CONSUMER_READ_TOKEN};
use serde_json::{json, Value};

const PUSH_TAG_USER: &str = "i_container_registry_push_tag_user";
const PUSH_TAG_DT: &str = "i_container_registry_push_tag_deploy_token";
const CREATE_USER: &str = "i_container_registry_create_repository_user";
const EVENTS_V1: &str = "application/vnd.docker.distribution.events.v1+json";

/// The example bundle without protection rules: dev, mia and the deploy token may push.
fn open_bundle(revision: u64) -> Value {
    let text = std::fs::read_to_string(root().join("policies/example/bundle.json")).unwrap();
    let mut b: Value = serde_json::from_str(&text).unwrap();
    b["revision"] = revision.into();
    b["protection_rules"] = json!([]);
    b
}

/// Envelope bodies POSTed to the stack's consumer port, answered 200 (HTTP/1.1, keep-alive,
/// `content-length` or chunked bodies).
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<Value>>>);

impl Capture {
    fn listen(port: u16) -> Capture {
        let capture = Capture::default();
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind the consumer port");
        let seen = capture.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let seen = seen.clone();
                std::thread::spawn(move || seen.serve(stream));
            }
        });
        capture
    }

    fn serve(&self, stream: TcpStream) {
        let mut writer = stream.try_clone().expect("clone stream");
        let mut reader = BufReader::new(stream);
        loop {
            let mut head = Vec::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
                if line == "\r\n" {
                    break;
                }
                head.push(line.trim_end().to_ascii_lowercase());
            }
            let header = |name: &str| head.iter().find_map(|h| h.strip_prefix(&format!("{name}:")).map(str::trim));
            let mut body = Vec::new();
            if let Some(length) = header("content-length").and_then(|l| l.parse::<usize>().ok()) {
                body.resize(length, 0);
                reader.read_exact(&mut body).expect("body");
            } else if header("transfer-encoding") == Some("chunked") {
                loop {
                    let mut size = String::new();
                    reader.read_line(&mut size).expect("chunk size");
                    let size = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16).unwrap_or(0);
                    let mut chunk = vec![0; size + 2];
                    reader.read_exact(&mut chunk).expect("chunk");
                    if size == 0 {
                        break;
                    }
                    body.extend_from_slice(&chunk[..size]);
                }
            }
            if let Ok(envelope) = serde_json::from_slice::<Value>(&body) {
                self.0.lock().unwrap().push(envelope);
            }
            let ok = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
            if writer.write_all(ok.as_bytes()).is_err() {
                return;
            }
        }
    }

    /// Waits for (and takes) the envelope holding the manifest push of `tag`; every other
    /// envelope captured meanwhile is dropped.
    fn take_push_of(&self, tag: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            {
                let mut seen = self.0.lock().unwrap();
                if let Some(i) = seen.iter().position(|e| {
                    e["events"].as_array().is_some_and(|events| {
                        events.iter().any(|ev| ev["action"] == "push" && ev["target"]["tag"] == tag)
                    })
                }) {
                    let envelope = seen.remove(i);
                    seen.clear();
                    return envelope;
                }
            }
            assert!(Instant::now() < deadline, "no envelope with the push of {tag} reached the consumer port");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A consumer binary on the shared database; killed on drop (its log printed if the test
/// is failing).
struct Replica {
    name: &'static str,
    port: u16,
    child: Child,
    log: PathBuf,
}

impl Replica {
    fn start(stack: &Stack, name: &'static str, database: &str) -> Replica {
        let port = free_port();
        let log = stack.path(&format!("replica-{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(root().join("target/release/registry-guard-consumer"))
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--database")
            .arg(database)
            .arg("--jwks")
            .arg(stack.config_dir.join("keys/jwks.json"))
            .arg("--secret-file")
            .arg(stack.path("events-secret"))
            .arg("--read-token-file")
            .arg(stack.path("consumer-read-token"))
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("start the consumer (make build)");
        let replica = Replica { name, port, child, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        while ureq::get(&format!("http://127.0.0.1:{port}/healthz")).call().is_err() {
            assert!(Instant::now() < deadline, "replica {name} did not start:\n{}", replica.log_text());
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("replica {name}: {}", replica.log_text().lines().next().unwrap_or_default());
        replica
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `POST /events` as the registry (through Envoy) does it; returns the report.
    fn deliver(&self, stack: &Stack, envelope: &Value, what: &str) -> Value {
        let secret = std::fs::read_to_string(stack.path("events-secret")).unwrap();
        let text = ureq::post(&format!("http://127.0.0.1:{}/events", self.port))
            .set("Content-Type", EVENTS_V1)
            .set("Authorization", &format!("Bearer {}", secret.trim()))
            .send_string(&envelope.to_string())
            .unwrap_or_else(|e| panic!("replica {}: POST /events: {e}", self.name))
            .into_string()
            .unwrap();
        let report: Value = serde_json::from_str(&text).unwrap();
        eprintln!(
            "replica {}: {what}: {} event(s), {} counted, {} duplicate(s), {} ignored",
            self.name, report["events"], report["counted"], report["duplicates"], report["ignored"]
        );
        report
    }

    fn get(&self, path_and_query: &str) -> Value {
        let text = ureq::get(&format!("http://127.0.0.1:{}{path_and_query}", self.port))
            .set("Authorization", &format!("Bearer {CONSUMER_READ_TOKEN}"))
            .call()
            .unwrap_or_else(|e| panic!("replica {}: GET {path_and_query}: {e}", self.name))
            .into_string()
            .unwrap();
        serde_json::from_str(&text).unwrap()
    }

    /// `/counts` with every recorded event (paged) under `events`.
    fn snapshot(&self) -> Value {
        let mut counts = self.get("/counts");
        let (mut events, mut after) = (Vec::new(), 0);
        loop {
            let page = self.get(&format!("/events?after={after}&limit=2"));
            events.extend(page["events"].as_array().unwrap().iter().cloned());
            match page["next_after"].as_i64() {
                Some(next) => after = next,
                None => break,
            }
        }
        counts["events"] = Value::Array(events);
        counts
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("----- replica {} log -----\n{}", self.name, self.log_text());
        }
    }
}

#[test]
fn two_consumer_replicas_on_one_postgres_count_a_redelivered_event_once() {
    let Some(server) = registry_guard_postgres_testing::shared().unwrap() else {
        eprintln!("{}", registry_guard_postgres_testing::SKIP_MESSAGE);
        return;
    };
    let database = server.create_database("e2e_replicas").unwrap();
    let mut stack = Stack::start();
    let b = stack.sign_bundle("open", &open_bundle(30));
    assert!(stack.push_bundle(&b, &[]).status.success());
    // The stack's own consumer makes way for the capture: Envoy's events listener forwards
    // the filter-attributed envelopes to this port.
    stack.stop_consumer();
    let capture = Capture::listen(stack.consumer_port);
    let push = |user: &str, secret: &str, repo: &str, tag: &str| {
        let out = stack.push(user, secret, repo, tag);
        assert!(out.status.success(), "{user} pushing {tag}: {}", registry_guard_e2e::stderr(&out));
        capture.take_push_of(tag)
    };
    let dev_v1 = push("dev", "dev-pass", "acme/web/app", "v1");
    let manifest = dev_v1["events"].as_array().unwrap().iter().find(|e| e["target"]["tag"] == "v1").unwrap();
    assert!(manifest["actor"]["user"].is_string(), "attributed by the filter: {manifest:#}");
    let n = dev_v1["events"].as_array().unwrap().len() as u64;

    let a = Replica::start(&stack, "A", &database);
    let b = Replica::start(&stack, "B", &database);
    let first = a.deliver(&stack, &dev_v1, "dev's push of v1, first delivery");
    assert_eq!((first["counted"].as_u64(), first["duplicates"].as_u64()), (Some(1), Some(0)), "{first}");
    // Redelivered: to the same replica, to the other one, then to both at once.
    for (replica, what) in [(&a, "the same envelope again"), (&b, "the same envelope, other replica")] {
        let again = replica.deliver(&stack, &dev_v1, what);
        assert_eq!((again["counted"].as_u64(), again["duplicates"].as_u64()), (Some(0), Some(n)), "{again}");
    }
    std::thread::scope(|s| {
        let ta = s.spawn(|| a.deliver(&stack, &dev_v1, "the same envelope to both at once"));
        let tb = s.spawn(|| b.deliver(&stack, &dev_v1, "the same envelope to both at once"));
        for report in [ta.join().unwrap(), tb.join().unwrap()] {
            assert_eq!((report["counted"].as_u64(), report["duplicates"].as_u64()), (Some(0), Some(n)), "{report}");
        }
    });

    // Different events on different replicas add up.
    let mia_m1 = push("mia", "mia-pass", "acme/web/app", "m1");
    let ci_1 = push("acme-ci", "gldt-acme-ci-rw", "acme/web/app", "ci-1");
    assert_eq!(b.deliver(&stack, &mia_m1, "mia's push of m1")["counted"], 1);
    assert_eq!(a.deliver(&stack, &ci_1, "acme-ci's push of ci-1")["counted"], 1);

    let (sa, sb) = (a.snapshot(), b.snapshot());
    eprintln!("GET /counts on replica A and on replica B (the same):\n{:#}", a.get("/counts"));
    assert_eq!(sa, sb, "both replicas serve the same counts and events");
    assert_eq!(sa["counters"][PUSH_TAG_USER], 2, "dev's v1 once, mia's m1: {sa:#}");
    assert_eq!(sa["counters"][PUSH_TAG_DT], 1, "{sa:#}");
    assert_eq!(sa["counters"][CREATE_USER], 1, "acme/web/app created once: {sa:#}");
    assert_eq!(sa["unique"][PUSH_TAG_USER], 2, "dev and mia: {sa:#}");
    assert_eq!(sa["duplicates"].as_u64(), Some(4 * n), "four redeliveries of {n} event(s)");
    assert_eq!(sa["rejected"], 0);
    let ids: Vec<&str> = sa["events"].as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap()).collect();
    let mut unique_ids = ids.clone();
    unique_ids.sort_unstable();
    unique_ids.dedup();
    assert_eq!(ids.len(), unique_ids.len(), "every event recorded once: {ids:?}");
}
