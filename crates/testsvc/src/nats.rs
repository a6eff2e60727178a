//! A private nats-server with JetStream on loopback, for tests: Debian's binary
//! (`scripts/debian-services.sh` installs it) run from a temporary directory holding its config,
//! its JetStream store and its log.
//!
//! [`shared()`] is one server per test process, started on first use; cases share it and keep
//! apart by naming their streams with [`NatsServer::unique_name`]. [`NatsServer::start`] is a
//! server of the caller's own, which it may [`stop`](NatsServer::stop) and
//! [`restart`](NatsServer::restart) on the same port and store (recovery tests).
//!
//! No server may outlive the test process, and statics are never dropped. So the server is
//! run by a small `sh` supervisor that takes commands (`start`, `stop`) on its stdin, a pipe
//! only this process holds: when the process ends, however it ends, the pipe reaches EOF and
//! the supervisor stops the server and removes the directory.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// Where Debian puts the binary (`/usr/sbin` is not on every user's `PATH`).
const DEBIAN_BINARY: &str = "/usr/sbin/nats-server";
/// How long a server may take to accept clients with JetStream enabled.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopping server may take before the supervisor kills it.
const STOP_GRACE_SECONDS: u32 = 10;
/// The largest message the server accepts: the JetStream event log stores a batch of events
/// as one message, so it needs room above NATS's 1 MB default for events of up to 1 MiB.
const MAX_PAYLOAD: &str = "8MB";

/// The supervisor: `$1` is the directory (config, store, log), `$2` the binary, `$3` the grace
/// period. `start` runs the server in the background (an asynchronous command in a
/// non-interactive shell reads /dev/null, so the server never holds the command pipe) under
/// coreutils' `timeout`, which passes a SIGTERM on and follows it with SIGKILL after the grace
/// period (and would end a forgotten server after a week); `stop` ends it. Each answers on
/// stdout once done. EOF stops the server and removes the directory.
const SUPERVISOR: &str = r#"
dir="$1"; bin="$2"; grace="$3"; pid=""
stop() {
  if [ -n "$pid" ]; then
    kill "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    pid=""
  fi
}
while IFS= read -r cmd; do
  case "$cmd" in
    start) stop; timeout -k "$grace" 7d "$bin" -c "$dir/nats.conf" >>"$dir/server.log" 2>&1 & pid=$!; echo started ;;
    stop) stop; echo stopped ;;
  esac
done
stop
rm -rf "$dir"
"#;

/// A nats-server with JetStream on 127.0.0.1, private to this test process.
#[derive(Debug)]
pub struct NatsServer {
    port: u16,
    dir: PathBuf,
    supervisor: Mutex<Supervisor>,
}

#[derive(Debug)]
struct Supervisor {
    child: Child,
    /// Dropping it is the supervisor's EOF.
    commands: Option<ChildStdin>,
    /// The supervisor's answers, line by line (read by a thread, so waits can be bounded).
    answers: Receiver<String>,
    running: bool,
}

/// The server shared by every case of this test process, started on first use.
///
/// # Panics
/// If the server cannot be started (see [`NatsServer::start`]).
pub fn shared() -> &'static NatsServer {
    static SHARED: OnceLock<NatsServer> = OnceLock::new();
    SHARED.get_or_init(NatsServer::start)
}

impl NatsServer {
    /// Starts a server of the caller's own on a free loopback port, in a new temporary
    /// directory, and returns once it accepts clients with JetStream enabled.
    ///
    /// # Panics
    /// If nats-server is not installed (run `scripts/debian-services.sh`), or if it does not
    /// become ready in time (the message holds the end of its log).
    pub fn start() -> NatsServer {
        let binary = binary();
        let dir = tempfile::Builder::new()
            .prefix("twinhub-nats-")
            .tempdir()
            .expect("create a temporary directory for nats-server")
            // The supervisor removes it, after the server has stopped.
            .keep();
        let port = free_port();
        let config = format!(
            "# Written by twinhub-testsvc for one test process.\n\
             listen: \"127.0.0.1:{port}\"\n\
             max_payload: {MAX_PAYLOAD}\n\
             jetstream {{\n  store_dir: \"{store}\"\n}}\n",
            store = dir.join("jetstream").display(),
        );
        std::fs::write(dir.join("nats.conf"), config).expect("write nats.conf");

        let mut child = Command::new("sh")
            .arg("-c")
            .arg(SUPERVISOR)
            .arg("twinhub-nats-supervisor")
            .arg(&dir)
            .arg(&binary)
            .arg(STOP_GRACE_SECONDS.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn sh for the nats-server supervisor");
        let commands = child.stdin.take();
        let answers = child.stdout.take().map(forward_lines).unwrap_or_else(|| {
            let (_, receiver) = mpsc::channel();
            receiver
        });
        let server = NatsServer {
            port,
            dir,
            supervisor: Mutex::new(Supervisor {
                child,
                commands,
                answers,
                running: false,
            }),
        };
        server.restart();
        server
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory holding the config, the JetStream store (`jetstream/`) and the log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A name no other caller in this process gets: `prefix` (characters other than ASCII
    /// letters, digits, `-` and `_` become `_`), the process id and a counter. Valid as a
    /// stream name and as a subject token.
    pub fn unique_name(&self, prefix: &str) -> String {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let prefix: String = prefix
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        format!(
            "{prefix}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Stops the server (SIGTERM, then SIGKILL after a grace period) and returns once it has
    /// exited; its port and store are kept for [`restart`](NatsServer::restart).
    pub fn stop(&self) {
        let mut supervisor = self.lock();
        supervisor.command("stop", "stopped");
        supervisor.running = false;
    }

    /// Starts the server again (stopping it first if it runs) on the same port and store, and
    /// returns once it accepts clients with JetStream enabled.
    ///
    /// # Panics
    /// If it does not become ready in time.
    pub fn restart(&self) {
        let mut supervisor = self.lock();
        supervisor.command("start", "started");
        supervisor.running = true;
        drop(supervisor);
        self.wait_ready();
    }

    pub fn is_running(&self) -> bool {
        self.lock().running
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Supervisor> {
        // A panic while holding it (a failed readiness check) leaves nothing half-done.
        self.supervisor
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Bounded: connects until the server's INFO line says JetStream is on.
    fn wait_ready(&self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last_error = String::from("not tried");
        while Instant::now() < deadline {
            match probe(self.port) {
                Ok(()) => return,
                Err(e) => last_error = e,
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "nats-server on 127.0.0.1:{} did not become ready with JetStream within {:?} \
             (last attempt: {last_error}); the end of its log ({}):\n{}",
            self.port,
            READY_TIMEOUT,
            self.dir.join("server.log").display(),
            log_tail(&self.dir.join("server.log")),
        );
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let supervisor = self
            .supervisor
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        // EOF: the supervisor stops the server, removes the directory and exits.
        supervisor.commands = None;
        let _ = supervisor.child.wait();
    }
}

impl Supervisor {
    fn command(&mut self, command: &str, answer: &str) {
        let Some(commands) = self.commands.as_mut() else {
            panic!("the nats-server supervisor is gone");
        };
        if let Err(e) = writeln!(commands, "{command}").and_then(|()| commands.flush()) {
            panic!("the nats-server supervisor does not take commands: {e}");
        }
        // The stop grace period, plus slack.
        let bound = Duration::from_secs(u64::from(STOP_GRACE_SECONDS) + 20);
        match self.answers.recv_timeout(bound) {
            Ok(line) if line == answer => {}
            Ok(line) => panic!("the nats-server supervisor answered {line:?} to {command}"),
            Err(e) => panic!("the nats-server supervisor did not answer {command}: {e}"),
        }
    }
}

fn binary() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("nats-server"))
            .find(|candidate| candidate.is_file())
    });
    match on_path {
        Some(path) => path,
        None if Path::new(DEBIAN_BINARY).is_file() => PathBuf::from(DEBIAN_BINARY),
        None => panic!(
            "nats-server is not installed (neither on PATH nor at {DEBIAN_BINARY}): run \
             scripts/debian-services.sh to install the test services"
        ),
    }
}

/// A port free right now on 127.0.0.1 (the listener is closed before the server binds it;
/// the kernel does not hand the same ephemeral port out again at once).
fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a loopback port");
    listener
        .local_addr()
        .expect("the loopback listener's address")
        .port()
}

/// Reads a server's INFO line: ready once it accepts clients and announces JetStream.
fn probe(port: u16) -> Result<(), String> {
    let stream = TcpStream::connect_timeout(
        &(Ipv4Addr::LOCALHOST, port).into(),
        Duration::from_millis(500),
    )
    .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(stream.take(64 * 1024))
        .read_line(&mut line)
        .map_err(|e| format!("read INFO: {e}"))?;
    if !line.starts_with("INFO ") {
        return Err(format!("unexpected greeting {line:?}"));
    }
    if line.contains("\"jetstream\":true") {
        Ok(())
    } else {
        Err("the server does not announce JetStream yet".into())
    }
}

fn forward_lines(stdout: std::process::ChildStdout) -> Receiver<String> {
    let (sender, receiver) = mpsc::channel();
    std::thread::Builder::new()
        .name("nats-supervisor-out".into())
        .spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        })
        .expect("spawn the supervisor's reader thread");
    receiver
}

fn log_tail(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(log) => {
            let lines: Vec<&str> = log.lines().collect();
            lines[lines.len().saturating_sub(30)..].join("\n")
        }
        Err(e) => format!("(cannot read it: {e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_valid() {
        let server = shared();
        let a = server.unique_name("a.b c");
        let b = server.unique_name("a.b c");
        assert_ne!(a, b);
        assert!(a.starts_with("a_b_c-"));
        assert!(
            a.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
    }

    #[test]
    fn own_server_stops_and_restarts_on_its_port() {
        let server = NatsServer::start();
        assert!(server.url().starts_with("nats://127.0.0.1:"));
        assert!(probe(server.port()).is_ok());
        server.stop();
        assert!(!server.is_running());
        assert!(probe(server.port()).is_err(), "still accepting after stop");
        server.restart();
        assert!(probe(server.port()).is_ok());
        let dir = server.dir().to_path_buf();
        drop(server);
        assert!(!dir.exists(), "the directory outlived the server");
    }
}
