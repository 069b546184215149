//! Other real registry clients, from Debian: containerd's `ctr` (with a containerd the test
//! starts itself: own root, state and socket, native snapshotter) and podman (`vfs` storage,
//! private storage and run roots). Each command runs with a deadline, so a client that
//! hangs fails the test instead of hanging it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::Stack;

/// What a client command did within its deadline.
#[derive(Debug)]
pub struct Run {
    /// `None`: killed at the deadline (it hung).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    pub fn hung(&self) -> bool {
        self.code.is_none()
    }

    /// stdout and stderr together.
    pub fn output(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs `cmd` with output to files, killing it at `deadline`.
pub fn run_with_deadline(cmd: &mut Command, dir: &Path, name: &str, deadline: Duration) -> Run {
    let (out_path, err_path) = (dir.join(format!("{name}.out")), dir.join(format!("{name}.err")));
    let out = fs::File::create(&out_path).expect("stdout file");
    let err = fs::File::create(&err_path).expect("stderr file");
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let code = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status.code().unwrap_or(-1)),
            Ok(None) if started.elapsed() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let run = Run {
        code,
        stdout: fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: fs::read_to_string(&err_path).unwrap_or_default(),
        elapsed: started.elapsed(),
    };
    eprintln!(
        "$ {cmd:?}\n  -> {} after {:.2} s\n{}{}",
        match run.code {
            Some(c) => format!("exit {c}"),
            None => "KILLED at the deadline (hung)".to_owned(),
        },
        run.elapsed.as_secs_f64(),
        crate::indent(&run.stdout),
        crate::indent(&run.stderr)
    );
    run
}

/// Whether `bin` is on `PATH`; if not, says so loudly (the test then skips).
pub fn available(bin: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        eprintln!("\n!!!!!!!! SKIPPED: `{bin}` is not installed (Debian package; `make deps` installs it). !!!!!!!!\n");
    }
    found
}

/// A containerd of the test's own (root, state, sockets under a temporary directory).
pub struct Containerd {
    dir: PathBuf,
    socket: PathBuf,
    child: Child,
}

impl Containerd {
    /// Starts containerd in `dir`; `None` (with a loud message) when it is not installed.
    pub fn start(dir: &Path) -> Option<Containerd> {
        if !available("containerd") || !available("ctr") {
            return None;
        }
        fs::create_dir_all(dir).expect("containerd dir");
        let socket = dir.join("containerd.sock");
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.overlayfs"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
"#,
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            sock = socket.display()
        );
        let config_path = dir.join("config.toml");
        fs::write(&config_path, config).expect("containerd config");
        let log = fs::File::create(dir.join("containerd.log")).expect("containerd log");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start containerd");
        let c = Containerd { dir: dir.to_owned(), socket, child };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !c.ctr("version", &["version"], Duration::from_secs(5)).success() {
            assert!(Instant::now() < deadline, "containerd did not come up: {}", c.log());
            std::thread::sleep(Duration::from_millis(200));
        }
        Some(c)
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// `ctr --address SOCK ARGS` with a deadline.
    pub fn ctr(&self, name: &str, args: &[&str], deadline: Duration) -> Run {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address").arg(&self.socket).args(["--namespace", "e2e"]).args(args);
        run_with_deadline(&mut cmd, &self.dir, name, deadline)
    }

    /// Imports a freshly generated image (`rgctl demo-image`, as an OCI archive) as `reference`.
    pub fn import_demo_image(&self, stack: &Stack, reference: &str, salt: &str) {
        let safe = reference.replace(['/', ':'], "_");
        let layout = self.dir.join(format!("layout-{safe}"));
        stack.rgctl(&["demo-image", "--out", &layout.display().to_string(), "--tag", "import", "--salt", salt]);
        let archive = self.dir.join(format!("{safe}.tar"));
        let tar =
            Command::new("tar").arg("-cf").arg(&archive).arg("-C").arg(&layout).arg(".").status().expect("run tar");
        assert!(tar.success(), "tar of the OCI layout failed");
        let archive = archive.display().to_string();
        let run = self.ctr(
            &format!("import-{safe}"),
            &["images", "import", "--no-unpack", "--snapshotter", "native", "--index-name", reference, &archive],
            Duration::from_secs(60),
        );
        assert!(run.success(), "ctr images import failed: {}", run.output());
    }

    /// `ctr images push --plain-http --user USER:SECRET REFERENCE` with a deadline.
    pub fn push(&self, reference: &str, user: &str, secret: &str, deadline: Duration) -> Run {
        let creds = format!("{user}:{secret}");
        let name = format!("push-{}", reference.replace(['/', ':'], "_"));
        self.ctr(&name, &["images", "push", "--plain-http", "--user", &creds, reference], deadline)
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!("----- containerd log (tail) -----\n{}", lines[lines.len().saturating_sub(40)..].join("\n"));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// podman with private storage (`vfs`), run root and auth file under `dir`.
pub struct Podman {
    dir: PathBuf,
}

impl Podman {
    /// `None` (with a loud message) when podman is not installed.
    pub fn new(dir: &Path) -> Option<Podman> {
        if !available("podman") {
            return None;
        }
        fs::create_dir_all(dir).expect("podman dir");
        // podman insists that an explicit REGISTRY_AUTH_FILE exists.
        fs::write(dir.join("auth.json"), "{}").expect("podman auth file");
        Some(Podman { dir: dir.to_owned() })
    }

    pub fn run(&self, name: &str, args: &[&str], deadline: Duration) -> Run {
        let mut cmd = Command::new("podman");
        cmd.env("HOME", &self.dir)
            .env("REGISTRY_AUTH_FILE", self.dir.join("auth.json"))
            .env("XDG_RUNTIME_DIR", self.dir.join("xdg"))
            .args(["--storage-driver", "vfs", "--root"])
            .arg(self.dir.join("storage"))
            .arg("--runroot")
            .arg(self.dir.join("run"))
            .args(["--cgroup-manager", "cgroupfs", "--events-backend", "none"])
            .args(args);
        run_with_deadline(&mut cmd, &self.dir, name, deadline)
    }

    /// Loads an OCI layout (`oci:DIR:TAG`, from `rgctl demo-image`) into podman's storage;
    /// returns the image id.
    pub fn load(&self, source: &str) -> String {
        // podman names the image after the layout's path, which must then be lowercase:
        // pull through a lowercase symlink.
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let rest = source.strip_prefix("oci:").expect("an oci: source");
        let (dir, tag) = rest.rsplit_once(':').expect("oci:DIR:TAG");
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let link = std::env::temp_dir().join(format!("rg-podman-layout-{}-{n}", std::process::id()));
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(dir, &link).expect("symlink the layout");
        let source = format!("oci:{}:{tag}", link.display());
        let run = self.run("pull-layout", &["pull", "-q", &source], Duration::from_secs(120));
        let _ = fs::remove_file(&link);
        assert!(run.success(), "podman pull {source} failed: {}", run.output());
        run.stdout.trim().lines().last().unwrap_or_default().to_owned()
    }

    /// Pushes local image `image` to `docker://DEST` as `user:secret`.
    pub fn push(&self, image: &str, dest: &str, user: &str, secret: &str, deadline: Duration) -> Run {
        let creds = format!("{user}:{secret}");
        let name = format!("push-{}", dest.replace(['/', ':'], "_"));
        self.run(
            &name,
            &["push", "--tls-verify=false", "--creds", &creds, image, &format!("docker://{dest}")],
            deadline,
        )
    }
}
