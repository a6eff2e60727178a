//! A private PostgreSQL cluster for tests, from the packaged server binaries (Debian's
//! `postgresql`, installed by `scripts/debian-services.sh`), on 127.0.0.1 only.
//!
//! [`shared`] starts one cluster per test process, on first use; every test case then takes its
//! own [`PgDatabase`] from [`PgServer::fresh_database`] (dropped again with the guard), so cases
//! run in parallel without seeing each other's rows. Tests that stop and restart the server, or
//! need TLS, start a cluster of their own with [`PgServer::start`] / [`PgServer::start_with`].
//!
//! The cluster lives in a temporary directory: data directory, unix socket, server log. `fsync`
//! and `synchronous_commit` stay on, because the stores tested here promise durability. As root
//! (here and in CI) `initdb` and `pg_ctl` refuse to run, so they run as the `postgres` system
//! user (through `setpriv`) in a directory handed to it; otherwise they run as the caller.
//!
//! No server may outlive the test process, and statics are never dropped: each cluster has a
//! small supervisor (`sh`) that blocks reading a pipe only this process writes to. However the
//! process ends (normal exit, panic, a signal), the kernel closes that pipe; the supervisor then
//! stops the server (`pg_ctl stop -m immediate`) and removes the directory. Administration
//! (creating and dropping databases, test SQL) goes through `psql` over the unix socket, which
//! keeps this crate free of a PostgreSQL client library and of an async runtime.

use std::fs;
use std::io::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// The superuser every cluster is created with (`initdb -U`), whoever runs the tests.
pub const SUPERUSER: &str = "postgres";
/// The only address the servers listen on.
pub const HOST: &str = "127.0.0.1";

/// How long `pg_ctl` may take to start or stop a server before the test fails.
const PG_CTL_WAIT_SECS: &str = "60";
/// How long a started server may take to accept TCP connections after `pg_ctl` said it is up.
const READY_WITHIN: Duration = Duration::from_secs(30);
/// Attempts at finding a free port when another process takes ours between probe and bind.
const PORT_ATTEMPTS: usize = 5;

/// Stops the server and removes the directory once this process's end of stdin closes.
/// `$1` directory, `$2` data directory, `$3` pg_ctl, `$4` "root" when pg_ctl must run as the
/// postgres user. Signals aimed at the test's process group (Ctrl-C, a test runner's timeout)
/// must not kill the supervisor before it has cleaned up: it ignores them, and the pipe closing
/// with the test process is its cue.
const SUPERVISOR: &str = r#"
trap '' INT TERM HUP QUIT
cat >/dev/null
if [ -f "$2/postmaster.pid" ]; then
  # A frozen server (PgServer::freeze) must run again to hear the stop.
  pid=$(head -n 1 "$2/postmaster.pid")
  for child in $(pgrep -P "$pid"); do kill -CONT "$child" 2>/dev/null; done
  kill -CONT "$pid" 2>/dev/null
  if [ "$4" = root ]; then
    setpriv --reuid=postgres --regid=postgres --init-groups "$3" -D "$2" -m immediate -w -t 30 stop >/dev/null 2>&1
  else
    "$3" -D "$2" -m immediate -w -t 30 stop >/dev/null 2>&1
  fi
fi
rm -rf "$1"
"#;

/// The process-wide cluster, started on first use and stopped when the test process exits.
pub fn shared() -> &'static PgServer {
    static SHARED: OnceLock<PgServer> = OnceLock::new();
    SHARED.get_or_init(PgServer::start)
}

/// How to start a private cluster.
#[derive(Debug, Clone, Default)]
pub struct PgServerOptions {
    /// Serve TLS with this certificate; TCP clients must then use TLS (`hostssl` only).
    pub tls: Option<PgTls>,
}

/// A server certificate for [`PgServerOptions::tls`].
#[derive(Debug, Clone)]
pub struct PgTls {
    /// The server's certificate chain, PEM.
    pub cert_pem: String,
    /// The server's private key, PEM.
    pub key_pem: String,
}

/// A private PostgreSQL cluster on 127.0.0.1. Dropping it stops the server and removes its
/// directory (the supervisor does both, and waits for them).
pub struct PgServer {
    inner: Arc<Inner>,
    // The supervisor, whose stdin this process holds open while the cluster must live.
    supervisor: Mutex<Option<Child>>,
}

impl std::fmt::Debug for PgServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgServer")
            .field("dir", &self.inner.dir)
            .field("port", &self.inner.port())
            .finish_non_exhaustive()
    }
}

/// What the server handle and its databases share.
struct Inner {
    dir: PathBuf,
    data: PathBuf,
    bin: PathBuf,
    as_root: bool,
    port: Mutex<u16>,
    // Held across stop and start, so concurrent calls do not interleave.
    lifecycle: Mutex<()>,
    databases: AtomicU64,
}

impl PgServer {
    /// Starts a private cluster with default options (no TLS).
    pub fn start() -> PgServer {
        PgServer::start_with(PgServerOptions::default())
    }

    /// Starts a private cluster: `initdb` into a new temporary directory, configuration, then
    /// the server on a free port of 127.0.0.1. Panics (with the server log's tail) on failure,
    /// and when the PostgreSQL binaries are missing.
    pub fn start_with(options: PgServerOptions) -> PgServer {
        let bin = find_bin_dir();
        let as_root = running_as_root();
        // As root, the postgres user must reach the directory: /tmp rather than a TMPDIR that
        // may sit under /root.
        let base = if as_root {
            PathBuf::from("/tmp")
        } else {
            std::env::temp_dir()
        };
        let dir = tempfile::Builder::new()
            .prefix("twinhub-pg-")
            .tempdir_in(&base)
            .unwrap_or_else(|e| panic!("creating a temporary directory in {}: {e}", base.display()))
            .keep();
        let data = dir.join("data");
        let inner = Arc::new(Inner {
            dir: dir.clone(),
            data: data.clone(),
            bin: bin.clone(),
            as_root,
            port: Mutex::new(0),
            lifecycle: Mutex::new(()),
            databases: AtomicU64::new(0),
        });
        // The supervisor first: from here on, whatever happens, the directory is cleaned up.
        let supervisor = spawn_supervisor(&inner);
        let server = PgServer {
            inner,
            supervisor: Mutex::new(Some(supervisor)),
        };
        if as_root {
            let (uid, gid) = postgres_ids();
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                .unwrap_or_else(|e| panic!("handing {} to the postgres user: {e}", dir.display()));
        }

        let mut initdb = server.inner.pg_command("initdb");
        initdb.args([
            "-D",
            path_str(&data),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            // The fresh, empty cluster is not worth an fsync of every file; the server itself
            // runs with fsync on.
            "--no-sync",
        ]);
        let out = run(&mut initdb, "initdb");
        if !out.status.success() {
            panic!(
                "initdb failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        server.inner.configure(&options);

        let mut last_failure = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port();
            server.inner.set_port(port);
            match server.inner.pg_ctl_start() {
                Ok(()) => {
                    server.inner.wait_ready();
                    return server;
                }
                // Someone took the port between our probe and the server's bind: try another.
                Err(log) if log.contains("could not bind") || log.contains("in use") => {
                    last_failure = log;
                }
                Err(log) => panic!("PostgreSQL did not start; server log tail:\n{log}"),
            }
        }
        panic!(
            "PostgreSQL found no free port in {PORT_ATTEMPTS} attempts; log tail:\n{last_failure}"
        )
    }

    /// The TCP port the server listens on (127.0.0.1 only).
    pub fn port(&self) -> u16 {
        self.inner.port()
    }

    /// A `postgres://` URL for the superuser on `database` over TCP.
    pub fn url(&self, database: &str) -> String {
        self.inner.url(database)
    }

    /// A new, empty database with a unique name, dropped again when the guard is dropped.
    pub fn fresh_database(&self) -> PgDatabase {
        let n = self.inner.databases.fetch_add(1, Ordering::Relaxed);
        let name = format!("test_{n}");
        self.inner
            .psql("postgres", &format!("CREATE DATABASE \"{name}\""));
        PgDatabase {
            inner: Arc::clone(&self.inner),
            name,
        }
    }

    /// Runs `sql` as the superuser in `database` and returns psql's unaligned, tuples-only
    /// output (one row a line, columns separated by `|`). Panics when the SQL fails.
    pub fn execute(&self, database: &str, sql: &str) -> String {
        self.inner.psql(database, sql)
    }

    /// Stops the server (fast shutdown: open sessions are ended, nothing committed is lost)
    /// and waits until it is gone. The directory and port stay for [`PgServer::restart`].
    pub fn stop(&self) {
        let _lifecycle = self.inner.lock_lifecycle();
        let mut cmd = self.inner.pg_command("pg_ctl");
        cmd.args(["-D", path_str(&self.inner.data), "-m", "fast", "-w", "-t"])
            .arg(PG_CTL_WAIT_SECS)
            .arg("stop");
        let out = run(&mut cmd, "pg_ctl stop");
        if !out.status.success() {
            panic!(
                "pg_ctl stop failed ({}): {}{}\nserver log tail:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.inner.log_tail()
            );
        }
    }

    /// Starts the server again after [`PgServer::stop`], on the same port, and waits until it
    /// accepts connections.
    pub fn restart(&self) {
        let _lifecycle = self.inner.lock_lifecycle();
        if let Err(log) = self.inner.pg_ctl_start() {
            panic!("PostgreSQL did not start again; server log tail:\n{log}");
        }
        self.inner.wait_ready();
    }

    /// Freezes the server, as a hung host would be: SIGSTOP to the postmaster and every
    /// backend, so connections stay open (the kernel still accepts and acknowledges) but
    /// nothing answers. [`PgServer::thaw`] resumes it; so do dropping the handle and the test
    /// process's end.
    pub fn freeze(&self) {
        let _lifecycle = self.inner.lock_lifecycle();
        let postmaster = self.inner.postmaster_pid();
        // The postmaster first, so it forks no backend we would miss.
        signal(&["-STOP", &postmaster]);
        let children = children_of(&postmaster);
        if !children.is_empty() {
            let mut args = vec!["-STOP"];
            args.extend(children.iter().map(String::as_str));
            signal(&args);
        }
    }

    /// Resumes a server frozen by [`PgServer::freeze`].
    pub fn thaw(&self) {
        let _lifecycle = self.inner.lock_lifecycle();
        let postmaster = self.inner.postmaster_pid();
        let children = children_of(&postmaster);
        if !children.is_empty() {
            let mut args = vec!["-CONT"];
            args.extend(children.iter().map(String::as_str));
            signal(&args);
        }
        signal(&["-CONT", &postmaster]);
    }

    /// The last lines of the server log, for failure messages.
    pub fn log_tail(&self) -> String {
        self.inner.log_tail()
    }
}

/// The process ids whose parent is `pid`.
fn children_of(pid: &str) -> Vec<String> {
    let out = run(Command::new("pgrep").args(["-P", pid]), "pgrep -P");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// `kill` with these arguments (a signal, then process ids); panics when it fails.
fn signal(args: &[&str]) {
    let out = run(Command::new("kill").args(args), "kill");
    if !out.status.success() {
        panic!(
            "kill {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let child = self
            .supervisor
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(mut child) = child {
            // Closing the pipe is the supervisor's cue; waiting makes the stop synchronous.
            drop(child.stdin.take());
            let _ = child.wait();
        }
    }
}

/// A database of its own for one test case, dropped (best effort, even with sessions still
/// connected) when the guard is dropped.
pub struct PgDatabase {
    inner: Arc<Inner>,
    name: String,
}

impl std::fmt::Debug for PgDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgDatabase")
            .field("name", &self.name)
            .field("port", &self.inner.port())
            .finish()
    }
}

impl PgDatabase {
    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A `postgres://` URL for the superuser on this database over TCP, usable by tokio-postgres
    /// (append `?sslmode=...` and the like as needed).
    pub fn url(&self) -> String {
        self.inner.url(&self.name)
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        // Best effort: the server may be stopped, or gone with its `PgServer`.
        let sql = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
        let _ = self.inner.try_psql("postgres", &sql);
    }
}

impl Inner {
    fn port(&self) -> u16 {
        *self.port.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_port(&self, port: u16) {
        *self.port.lock().unwrap_or_else(|e| e.into_inner()) = port;
        // Later lines of postgresql.conf win, so a retry appends the new port.
        self.append_conf(&format!("port = {port}\n"));
    }

    fn lock_lifecycle(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lifecycle.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn url(&self, database: &str) -> String {
        format!("postgres://{SUPERUSER}@{HOST}:{}/{database}", self.port())
    }

    /// The running postmaster's process id, from its pid file.
    fn postmaster_pid(&self) -> String {
        let path = self.data.join("postmaster.pid");
        let text = fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {} (is the server running?): {e}", path.display()));
        let pid = text.lines().next().unwrap_or_default().trim().to_owned();
        assert!(
            !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()),
            "{} holds no process id",
            path.display()
        );
        pid
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// A command for one of the server binaries, as the postgres user when we are root.
    fn pg_command(&self, program: &str) -> Command {
        let program = self.bin.join(program);
        let mut cmd = if self.as_root {
            let mut cmd = Command::new("setpriv");
            cmd.args([
                "--reuid=postgres",
                "--regid=postgres",
                "--init-groups",
                path_str(&program),
            ]);
            cmd
        } else {
            Command::new(program)
        };
        // The postgres user cannot enter the caller's working directory (under /root).
        cmd.current_dir(&self.dir).stdin(Stdio::null());
        clean_env(&mut cmd);
        cmd
    }

    /// Writes the configuration the tests rely on, and the TLS files when asked for.
    fn configure(&self, options: &PgServerOptions) {
        let socket_dir = path_str(&self.dir).replace('\'', "''");
        let mut conf = format!(
            "\n# twinhub-testsvc\n\
             listen_addresses = '{HOST}'\n\
             unix_socket_directories = '{socket_dir}'\n\
             fsync = on\n\
             synchronous_commit = on\n\
             max_connections = 300\n\
             shared_buffers = 32MB\n"
        );
        let tcp = match &options.tls {
            Some(tls) => {
                self.write_private("server.crt", &tls.cert_pem, 0o644);
                self.write_private("server.key", &tls.key_pem, 0o600);
                conf.push_str(
                    "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n",
                );
                "hostssl"
            }
            None => "host",
        };
        self.append_conf(&conf);
        let hba = format!("local all all trust\n{tcp} all all {HOST}/32 trust\n");
        self.write_private("pg_hba.conf", &hba, 0o600);
    }

    fn append_conf(&self, text: &str) {
        let path = self.data.join("postgresql.conf");
        let mut file = fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
        file.write_all(text.as_bytes())
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }

    /// Writes a file into the data directory, owned by the server's user with `mode`.
    fn write_private(&self, name: &str, text: &str, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        let path = self.data.join(name);
        fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("setting the mode of {}: {e}", path.display()));
        if self.as_root {
            let (uid, gid) = postgres_ids();
            std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                .unwrap_or_else(|e| panic!("handing {} to postgres: {e}", path.display()));
        }
    }

    /// `pg_ctl start`, waiting until the server is up. On failure, the log's tail.
    fn pg_ctl_start(&self) -> Result<(), String> {
        let mut cmd = self.pg_command("pg_ctl");
        cmd.args(["-D", path_str(&self.data), "-l", path_str(&self.log_path())])
            .args(["-w", "-t", PG_CTL_WAIT_SECS, "start"]);
        // pg_ctl points the server's stdio at the log and /dev/null, so its own output
        // pipes close when it exits.
        let out = run(&mut cmd, "pg_ctl start");
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "pg_ctl: {}{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.log_tail()
            ))
        }
    }

    /// Waits, bounded, until the server accepts TCP connections on its port.
    fn wait_ready(&self) {
        let started = Instant::now();
        loop {
            let mut cmd = Command::new(self.bin.join("pg_isready"));
            cmd.args(["-q", "-h", HOST, "-t", "2", "-p"])
                .arg(self.port().to_string())
                .current_dir(&self.dir)
                .stdin(Stdio::null());
            clean_env(&mut cmd);
            if run(&mut cmd, "pg_isready").status.success() {
                return;
            }
            if started.elapsed() > READY_WITHIN {
                panic!(
                    "PostgreSQL on {HOST}:{} did not accept connections within {READY_WITHIN:?}; \
                     server log tail:\n{}",
                    self.port(),
                    self.log_tail()
                );
            }
            sleep(Duration::from_millis(100));
        }
    }

    fn psql_command(&self, database: &str, sql: &str) -> Command {
        // psql runs as the caller (root included), over the unix socket.
        let mut cmd = Command::new(self.bin.join("psql"));
        cmd.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.dir)
            .arg("-p")
            .arg(self.port().to_string())
            .args(["-U", SUPERUSER, "-d", database, "-c", sql])
            .current_dir(&self.dir)
            .stdin(Stdio::null());
        clean_env(&mut cmd);
        cmd
    }

    fn try_psql(&self, database: &str, sql: &str) -> Result<String, String> {
        let out = self
            .psql_command(database, sql)
            .output()
            .map_err(|e| format!("running psql: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "psql failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    fn psql(&self, database: &str, sql: &str) -> String {
        self.try_psql(database, sql)
            .unwrap_or_else(|e| panic!("{e}\nSQL: {sql}\nserver log tail:\n{}", self.log_tail()))
    }

    fn log_tail(&self) -> String {
        match fs::read_to_string(self.log_path()) {
            Ok(log) => {
                let lines: Vec<&str> = log.lines().collect();
                lines[lines.len().saturating_sub(30)..].join("\n")
            }
            Err(e) => format!("(no server log at {}: {e})", self.log_path().display()),
        }
    }
}

fn spawn_supervisor(inner: &Inner) -> Child {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(SUPERVISOR)
        .arg("twinhub-pg-supervisor")
        .arg(&inner.dir)
        .arg(&inner.data)
        .arg(inner.bin.join("pg_ctl"))
        .arg(if inner.as_root { "root" } else { "user" })
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // The write end stays in the returned handle (`Child::stdin`). std creates it
    // close-on-exec, so no other child of this process inherits it and keeps the supervisor
    // waiting after we are gone.
    cmd.spawn()
        .unwrap_or_else(|e| panic!("starting the PostgreSQL supervisor (sh): {e}"))
}

/// The newest `/usr/lib/postgresql/<version>/bin` holding the server tools (or
/// `TWINHUB_PG_BINDIR`). Panics with the fix when there is none: tests must not skip silently.
fn find_bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TWINHUB_PG_BINDIR") {
        let dir = PathBuf::from(dir);
        if dir.join("pg_ctl").is_file() {
            return dir;
        }
        panic!(
            "TWINHUB_PG_BINDIR={} holds no pg_ctl; unset it or point it at PostgreSQL's bin directory",
            dir.display()
        );
    }
    let root = Path::new("/usr/lib/postgresql");
    let mut found: Vec<(Vec<u32>, PathBuf)> = fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let bin = entry.path().join("bin");
            let needed = ["initdb", "pg_ctl", "postgres", "psql", "pg_isready"];
            if !needed.iter().all(|tool| bin.join(tool).is_file()) {
                return None;
            }
            let version = entry
                .file_name()
                .to_string_lossy()
                .split('.')
                .map(|part| part.parse().unwrap_or(0))
                .collect();
            Some((version, bin))
        })
        .collect();
    found.sort();
    match found.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "the PostgreSQL server binaries (initdb, pg_ctl, postgres, psql, pg_isready) were not \
             found under /usr/lib/postgresql/*/bin: run scripts/debian-services.sh (it installs \
             Debian's postgresql package), or set TWINHUB_PG_BINDIR"
        ),
    }
}

fn running_as_root() -> bool {
    let out = Command::new("id")
        .arg("-u")
        .output()
        .unwrap_or_else(|e| panic!("running id -u: {e}"));
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

/// The postgres system user's uid and gid (the package creates it).
fn postgres_ids() -> (u32, u32) {
    static IDS: OnceLock<(u32, u32)> = OnceLock::new();
    *IDS.get_or_init(|| {
        let id = |flag: &str| -> u32 {
            let out = Command::new("id")
                .args([flag, "postgres"])
                .output()
                .unwrap_or_else(|e| panic!("running id {flag} postgres: {e}"));
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .unwrap_or_else(|_| {
                    panic!(
                        "running as root needs the postgres system user (from Debian's \
                         postgresql package): run scripts/debian-services.sh"
                    )
                })
        };
        (id("-u"), id("-g"))
    })
}

/// A port that was free on 127.0.0.1 a moment ago.
fn free_port() -> u16 {
    let listener = TcpListener::bind((HOST, 0))
        .unwrap_or_else(|e| panic!("binding {HOST}:0 to find a free port: {e}"));
    listener
        .local_addr()
        .unwrap_or_else(|e| panic!("reading the probe listener's address: {e}"))
        .port()
}

/// libpq reads these from the environment; a developer's settings must not leak into tests.
fn clean_env(cmd: &mut Command) {
    for var in [
        "PGHOST",
        "PGHOSTADDR",
        "PGPORT",
        "PGDATABASE",
        "PGUSER",
        "PGPASSWORD",
        "PGOPTIONS",
        "PGSSLMODE",
        "PGSERVICE",
        "PGDATA",
    ] {
        cmd.env_remove(var);
    }
}

fn run(cmd: &mut Command, what: &str) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {what}: {e}"))
}

fn path_str(path: &Path) -> &str {
    path.to_str()
        .unwrap_or_else(|| panic!("{} is not UTF-8", path.display()))
}
