//! Tests only: a throwaway PostgreSQL server. The binaries are Debian's `postgresql` package's
//! (`/usr/lib/postgresql/<version>/bin`; `make test` installs the package); the cluster is made
//! by `initdb` in a temporary directory, listens on a free loopback port with `trust`
//! authentication for the superuser `postgres`, runs without fsync (test data), and is stopped
//! (fast shutdown) and deleted when the [`Server`] drops.
//!
//! PostgreSQL refuses to run as root: when `id -u` is 0, `initdb` and `postgres` run as the
//! `postgres` system user that the package creates (through `setpriv`), in a directory owned
//! by that user.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

/// Where Debian installs the server binaries, one directory per major version.
pub const DEBIAN_ROOT: &str = "/usr/lib/postgresql";

/// What a test prints when it skips for want of the binaries.
pub const SKIP_MESSAGE: &str = "skipped: no PostgreSQL server binaries (/usr/lib/postgresql/*/bin/postgres); \
                                `make test` installs Debian's postgresql package";

/// How long the server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The newest `/usr/lib/postgresql/<version>/bin` holding `initdb`, `postgres` and `psql`.
pub fn binaries() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = fs::read_dir(DEBIAN_ROOT)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.split('.').next()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            ["initdb", "postgres", "psql", "pg_isready"].iter().all(|b| bin.join(b).is_file()).then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

/// A running PostgreSQL server; stopped and deleted on drop.
#[derive(Debug)]
pub struct Server {
    bin: PathBuf,
    port: u16,
    child: Option<Child>,
    /// Deleted after the server has stopped (fields drop after `Drop::drop`).
    #[allow(dead_code)]
    dir: tempfile::TempDir,
}

/// The server that the tests of this process currently share: started by the first caller,
/// stopped when the last [`Arc`] drops (the next caller then starts another). `Ok(None)` when
/// no PostgreSQL binaries are installed ([`SKIP_MESSAGE`]).
pub fn shared() -> Result<Option<Arc<Server>>, String> {
    static SHARED: Mutex<Weak<Server>> = Mutex::new(Weak::new());
    let mut shared = SHARED.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(server) = shared.upgrade() {
        return Ok(Some(server));
    }
    let Some(server) = Server::start_if_installed()? else { return Ok(None) };
    let server = Arc::new(server);
    *shared = Arc::downgrade(&server);
    Ok(Some(server))
}

/// `uid` and `gid` of the `postgres` system user, when running as root; `None` otherwise.
fn run_as() -> Result<Option<(String, String)>, String> {
    let id = |args: &[&str]| -> Result<String, String> {
        let out = Command::new("id").args(args).output().map_err(|e| format!("cannot run `id`: {e}"))?;
        if !out.status.success() {
            return Err(format!("`id {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    if id(&["-u"])? != "0" {
        return Ok(None);
    }
    let uid =
        id(&["-u", "postgres"]).map_err(|e| format!("running as root, PostgreSQL needs the postgres user: {e}"))?;
    Ok(Some((uid, id(&["-g", "postgres"])?)))
}

/// `program args…`, as the postgres user when running as root.
fn command(user: &Option<(String, String)>, program: &Path) -> Command {
    match user {
        Some((uid, gid)) => {
            let mut c = Command::new("setpriv");
            c.arg(format!("--reuid={uid}")).arg(format!("--regid={gid}")).arg("--clear-groups").arg("--").arg(program);
            c
        }
        None => Command::new(program),
    }
}

fn run(what: &str, cmd: &mut Command) -> Result<Output, String> {
    let out = cmd.stdin(Stdio::null()).output().map_err(|e| format!("cannot run {what}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(out)
}

/// A loopback port nobody listens on now.
fn free_port() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("cannot bind a free port: {e}"))?;
    listener.local_addr().map(|a| a.port()).map_err(|e| format!("cannot read the free port: {e}"))
}

impl Server {
    /// Starts a server, or `Ok(None)` when no PostgreSQL binaries are installed.
    pub fn start_if_installed() -> Result<Option<Server>, String> {
        match binaries() {
            Some(bin) => Server::start_with(bin).map(Some),
            None => Ok(None),
        }
    }

    /// Starts a server from the binaries in `bin`.
    pub fn start_with(bin: PathBuf) -> Result<Server, String> {
        let user = run_as()?;
        let dir = tempfile::Builder::new()
            .prefix("rg-postgres-")
            .tempdir()
            .map_err(|e| format!("cannot create a temporary directory: {e}"))?;
        if let Some((uid, gid)) = &user {
            let (uid, gid) = (uid.parse::<u32>().ok(), gid.parse::<u32>().ok());
            std::os::unix::fs::chown(dir.path(), uid, gid)
                .map_err(|e| format!("cannot hand {} to the postgres user: {e}", dir.path().display()))?;
        }
        let data = dir.path().join("data");
        run(
            "initdb",
            command(&user, &bin.join("initdb")).current_dir(dir.path()).arg("-D").arg(&data).args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--no-instructions",
            ]),
        )?;
        // The port is free when chosen but could be taken before the server binds it: retry.
        let mut last = String::new();
        for _ in 0..3 {
            let port = free_port()?;
            let log_path = dir.path().join(format!("postgres-{port}.log"));
            let log = fs::File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
            let err = log.try_clone().map_err(|e| format!("{}: {e}", log_path.display()))?;
            let child = command(&user, &bin.join("postgres"))
                .current_dir(dir.path())
                .arg("-D")
                .arg(&data)
                .arg("-p")
                .arg(port.to_string())
                .arg("-k")
                .arg(dir.path())
                .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off"])
                .args(["-c", "full_page_writes=off", "-c", "max_connections=200", "-c", "shared_buffers=16MB"])
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(err)
                .spawn()
                .map_err(|e| format!("cannot start postgres: {e}"))?;
            let mut child = Some(child);
            match wait_ready(&bin, port, &mut child) {
                Ok(()) => return Ok(Server { bin, port, child, dir }),
                Err(e) => {
                    last = format!("{e}\n{}", fs::read_to_string(&log_path).unwrap_or_default());
                    stop(&mut child);
                }
            }
        }
        Err(format!("PostgreSQL did not start: {last}"))
    }

    /// The loopback port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The connection URL of `database` for the superuser (no password: `trust`).
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Runs `sql` in `database` with psql; returns its unaligned, tuples-only output.
    pub fn psql(&self, database: &str, sql: &str) -> Result<String, String> {
        let out = run(
            "psql",
            Command::new(self.bin.join("psql"))
                .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-U", "postgres"])
                .args(["-p", &self.port.to_string(), "-d", database, "-c", sql]),
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Creates the database `name` (letters, digits, `_`) and returns its URL.
    pub fn create_database(&self, name: &str) -> Result<String, String> {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("database name `{name}`: only letters, digits and `_`"));
        }
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""))?;
        Ok(self.url(name))
    }
}

/// Waits until the server on `port` accepts connections (or has exited).
fn wait_ready(bin: &Path, port: u16, child: &mut Option<Child>) -> Result<(), String> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(c) = child.as_mut() {
            if let Ok(Some(status)) = c.try_wait() {
                *child = None;
                return Err(format!("postgres exited: {status}"));
            }
        }
        let ready = Command::new(bin.join("pg_isready"))
            .args(["-q", "-h", "127.0.0.1", "-U", "postgres", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .status()
            .map_err(|e| format!("cannot run pg_isready: {e}"))?;
        if ready.success() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("postgres not ready after {START_TIMEOUT:?}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Fast shutdown (SIGINT), then SIGKILL if it has not stopped within ten seconds.
fn stop(child: &mut Option<Child>) {
    let Some(mut child) = child.take() else { return };
    let _ = Command::new("kill").args(["-INT", &child.id().to_string()]).stdin(Stdio::null()).status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for Server {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}
