//! The hub under test: `twinhub serve` as a child process on loopback with ports the system
//! picks. Its banner (printed once both listeners are up and the store is open) names the
//! ports and the owner connection string; the hub counts as ready when a REST call with that
//! connection string succeeds. The process can be killed with SIGKILL (no shutdown at all) or
//! stopped with SIGTERM (graceful), and its resident memory read from /proc.

use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tokio::sync::mpsc;
use twinhub_sdk::ServiceClient;

/// How long a start (spawn to the first successful REST call) may take.
const START_LIMIT: Duration = Duration::from_secs(60);
/// The banner's last line.
const BANNER_END: &str = "Next:";

/// Which binary to run and how loud its log is.
#[derive(Debug, Clone)]
pub struct HubCommand {
    pub bin: PathBuf,
    /// RUST_LOG for the hub.
    pub log_filter: String,
}

impl HubCommand {
    /// `explicit` if given, else the `twinhub` next to this program (the same cargo profile),
    /// else `target/debug/twinhub` or `target/release/twinhub` under the current directory
    /// (the newer when both exist).
    pub fn locate(explicit: Option<PathBuf>, log_filter: &str) -> Result<HubCommand> {
        let bin = match explicit {
            Some(bin) => {
                if !bin.is_file() {
                    bail!("--twinhub {}: no such file", bin.display());
                }
                bin
            }
            None => default_bin().ok_or_else(|| {
                anyhow!(
                    "no twinhub binary found next to this program or in target/debug or \
                     target/release: build it with `cargo build -p twinhub` or pass --twinhub"
                )
            })?,
        };
        Ok(HubCommand {
            bin,
            log_filter: log_filter.to_string(),
        })
    }
}

fn default_bin() -> Option<PathBuf> {
    let name = format!("twinhub{}", std::env::consts::EXE_SUFFIX);
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(&name)))
        .filter(|p| p.is_file());
    if beside.is_some() {
        return beside;
    }
    ["target/debug", "target/release"]
        .iter()
        .map(|dir| Path::new(dir).join(&name))
        .filter(|p| p.is_file())
        .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
}

/// A running `twinhub serve` child, killed (SIGKILL) when dropped.
pub struct HubProcess {
    child: Child,
    pub https_port: u16,
    pub mqtt_port: u16,
    /// The `iothubowner` connection string (`HostName=localhost:{https_port};...`).
    pub connection_string: String,
    /// The dev CA that signed the hub's certificate (PEM).
    pub ca_pem: Vec<u8>,
    /// From spawn until the banner was complete.
    pub banner_after: Duration,
    /// From spawn until the first successful REST call.
    pub ready_after: Duration,
    pub log_path: PathBuf,
}

impl HubProcess {
    /// Spawns `twinhub serve` on `data_dir` (created or reused), its log (stderr) going to
    /// `log_path`, and waits until it answers REST calls.
    pub async fn start(cmd: &HubCommand, data_dir: &Path, log_path: &Path) -> Result<HubProcess> {
        let log = std::fs::File::create(log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let mut command = Command::new(&cmd.bin);
        command
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--hostname", "localhost", "--bind", "127.0.0.1"])
            .args(["--https-port", "0", "--mqtt-port", "0", "--amqp-port", "0"])
            .env("RUST_LOG", &cmd.log_filter)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        // Settings from the environment would override nothing we pass, but could add some.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("TWINHUB_") {
                command.env_remove(key);
            }
        }
        let spawned = Instant::now();
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {}", cmd.bin.display()))?;
        let lines = read_lines(&mut child, log_path)?;
        let mut hub = HubProcess {
            child,
            https_port: 0,
            mqtt_port: 0,
            connection_string: String::new(),
            ca_pem: Vec::new(),
            banner_after: Duration::ZERO,
            ready_after: Duration::ZERO,
            log_path: log_path.to_path_buf(),
        };
        let banner = hub.wait_for_banner(lines, spawned).await?;
        hub.banner_after = spawned.elapsed();
        let parsed = Banner::parse(&banner)
            .with_context(|| format!("reading the hub's banner:\n{}", banner.join("\n")))?;
        hub.https_port = parsed.https_port;
        hub.mqtt_port = parsed.mqtt_port;
        hub.connection_string = match parsed.connection_string {
            Some(cs) => cs,
            None => owner_connection_string(&cmd.bin, data_dir)?,
        };
        let ca = data_dir.join("tls").join("ca.pem");
        hub.ca_pem = std::fs::read(&ca).with_context(|| format!("reading {}", ca.display()))?;
        hub.wait_until_ready(spawned).await?;
        hub.ready_after = spawned.elapsed();
        Ok(hub)
    }

    async fn wait_for_banner(
        &mut self,
        mut lines: mpsc::UnboundedReceiver<String>,
        spawned: Instant,
    ) -> Result<Vec<String>> {
        let mut banner = Vec::new();
        loop {
            let left = START_LIMIT.saturating_sub(spawned.elapsed());
            match tokio::time::timeout(left, lines.recv()).await {
                Ok(Some(line)) => {
                    let done = line.starts_with(BANNER_END);
                    banner.push(line);
                    if done {
                        return Ok(banner);
                    }
                }
                Ok(None) => {
                    // stdout closed: the hub is exiting.
                    let status = self.child.wait().ok();
                    bail!(
                        "the hub exited before its banner was complete ({}); log: {}",
                        status.map_or_else(|| "status unknown".into(), |s| s.to_string()),
                        self.log_tail(10)
                    );
                }
                Err(_) => bail!(
                    "no banner from the hub within {} s; log: {}",
                    START_LIMIT.as_secs(),
                    self.log_tail(10)
                ),
            }
        }
    }

    async fn wait_until_ready(&mut self, spawned: Instant) -> Result<()> {
        let service = self.service(Duration::from_secs(5))?;
        loop {
            let last = match service.registry_statistics().await {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            if let Some(status) = self.exited() {
                bail!(
                    "the hub exited ({status}) after its banner; log: {}",
                    self.log_tail(10)
                );
            }
            if spawned.elapsed() > START_LIMIT {
                bail!(
                    "the hub printed its banner but answered no REST call within {} s: {last}",
                    START_LIMIT.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A service client trusting the hub's CA, each request bounded by `timeout`.
    pub fn service(&self, timeout: Duration) -> Result<ServiceClient> {
        Ok(ServiceClient::builder(&self.connection_string)
            .extra_ca_pem(self.ca_pem.clone())
            .timeout(timeout)
            .build()?)
    }

    /// The exit status, if the hub has ended.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGKILL: no signal handler runs, nothing is flushed. Returns once the process is gone.
    pub fn kill9(&mut self) -> Result<ExitStatus> {
        self.child.kill().context("sending SIGKILL to the hub")?;
        self.child.wait().context("waiting for the killed hub")
    }

    /// SIGTERM and a wait of up to `grace` for the graceful shutdown. `None` when the hub was
    /// still running after `grace` (it is then killed).
    pub async fn terminate(mut self, grace: Duration) -> Result<Option<ExitStatus>> {
        if let Some(status) = self.exited() {
            return Ok(Some(status));
        }
        // kill(2) needs `unsafe` or a libc binding; the coreutils command does the same.
        let pid = self.child.id().to_string();
        let sent = tokio::task::spawn_blocking(move || {
            Command::new("kill").args(["-TERM", &pid]).status()
        })
        .await?
        .context("running kill -TERM")?;
        if !sent.success() {
            bail!("kill -TERM {} failed: {sent}", self.child.id());
        }
        let started = Instant::now();
        while started.elapsed() < grace {
            if let Some(status) = self.exited() {
                return Ok(Some(status));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(None)
    }

    /// The hub's resident set size in KiB (`VmRSS` in /proc/<pid>/status).
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        vm_rss_kib(&status)
    }

    /// The last `n` lines of the hub's log, joined with ` | `.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let mut tail: Vec<&str> = text.lines().rev().take(n).collect();
        tail.reverse();
        if tail.is_empty() {
            "(empty)".into()
        } else {
            tail.join(" | ")
        }
    }
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Forwards the child's stdout line by line; once the reader is gone the rest is appended to
/// the log, so the hub never writes into a closed pipe.
fn read_lines(child: &mut Child, log_path: &Path) -> Result<mpsc::UnboundedReceiver<String>> {
    let stdout = child
        .stdout
        .take()
        .context("the hub's stdout is not piped")?;
    let log_path = log_path.to_path_buf();
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        let mut log = None;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Err(mpsc::error::SendError(line)) = tx.send(line) {
                let file = log.get_or_insert_with(|| {
                    std::fs::OpenOptions::new()
                        .append(true)
                        .open(&log_path)
                        .ok()
                });
                if let Some(file) = file {
                    let _ = writeln!(file, "stdout: {line}");
                }
            }
        }
    });
    Ok(rx)
}

/// What the banner tells a client.
#[derive(Debug, PartialEq, Eq)]
struct Banner {
    https_port: u16,
    mqtt_port: u16,
    /// Printed only when the hub's stdout is a terminal; else read with `connection-string`.
    connection_string: Option<String>,
}

impl Banner {
    fn parse(lines: &[String]) -> Result<Banner> {
        let port_after = |scheme: &str| {
            lines.iter().find_map(|l| {
                let (_, addr) = l.split_once(scheme)?;
                addr.trim().rsplit_once(':')?.1.parse::<u16>().ok()
            })
        };
        let https_port = port_after("https://").context("no https:// address")?;
        let mqtt_port = port_after("mqtts://").context("no mqtts:// address")?;
        let connection_string = lines
            .iter()
            .map(|l| l.trim())
            .find(|l| l.starts_with("HostName=") && l.contains("SharedAccessKeyName=iothubowner"))
            .map(str::to_string);
        Ok(Banner {
            https_port,
            mqtt_port,
            connection_string,
        })
    }
}

/// The `iothubowner` connection string as `twinhub connection-string` prints it (the banner
/// leaves it out when stdout is not a terminal).
fn owner_connection_string(bin: &Path, data_dir: &Path) -> Result<String> {
    let out = Command::new(bin)
        .arg("connection-string")
        .arg("--data-dir")
        .arg(data_dir)
        .env_remove("TWINHUB_DATA_DIR")
        .output()
        .with_context(|| format!("running {} connection-string", bin.display()))?;
    if !out.status.success() {
        bail!(
            "`twinhub connection-string` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn vm_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_banner_gives_ports_and_the_connection_string() {
        let text = "twinhub 0.1.0 is serving hub 'localhost'
  HTTPS (REST API, MQTT over WebSockets): https://127.0.0.1:40001
  MQTT over TLS:                          mqtts://127.0.0.1:40002
  data dir:                               /tmp/x

Service connection string (policy iothubowner):
  HostName=localhost:40001;SharedAccessKeyName=iothubowner;SharedAccessKey=abc=

Next: twinhub device create my-device && twinhub device connection-string my-device";
        let lines: Vec<String> = text.lines().map(String::from).collect();
        assert_eq!(
            Banner::parse(&lines).unwrap(),
            Banner {
                https_port: 40001,
                mqtt_port: 40002,
                connection_string: Some(
                    "HostName=localhost:40001;SharedAccessKeyName=iothubowner;SharedAccessKey=abc="
                        .into()
                ),
            }
        );
        // Not at a terminal: the banner says how to get it instead.
        let piped: Vec<String> = lines
            .iter()
            .filter(|l| !l.contains("SharedAccessKey="))
            .cloned()
            .collect();
        assert_eq!(Banner::parse(&piped).unwrap().connection_string, None);
        assert!(Banner::parse(&lines[..2]).is_err());
    }

    #[test]
    fn rss_is_read_in_kib() {
        assert_eq!(
            vm_rss_kib("Name:\ttwinhub\nVmRSS:\t   123456 kB\n"),
            Some(123_456)
        );
        assert_eq!(vm_rss_kib("Name:\ttwinhub\n"), None);
    }
}
