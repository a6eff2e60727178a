//! The peer broker: Debian's Mosquitto, started by the bench on a loopback port with TLS
//! (a certificate signed by the hub's dev CA, the same key type as the hub's), no persistence,
//! anonymous clients and TCP_NODELAY, so it is measured on the same terms as the hub.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use std::process::Command;

use crate::child::ChildProcess;
use crate::error::{Error, Result};
use crate::mqtt::{Conn, Login};
use crate::tls::{self, ServerCert};

/// Where Debian installs the broker (not on a normal user's PATH).
const DEBIAN_PATH: &str = "/usr/sbin/mosquitto";

/// Finds the broker: `explicit` if given, else PATH, else Debian's location.
pub fn find(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return p.is_file().then(|| p.to_path_buf());
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("mosquitto"))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| {
        let p = PathBuf::from(DEBIAN_PATH);
        p.is_file().then_some(p)
    })
}

/// The broker's version line, e.g. `mosquitto version 2.0.11`.
pub fn version(bin: &Path) -> Option<String> {
    // `-h` prints the version first and exits non-zero; only the text matters.
    let out = Command::new(bin).arg("-h").output().ok()?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    text.lines()
        .find(|l| l.contains("version"))
        .map(|l| l.trim().to_string())
}

/// The configuration the bench runs Mosquitto with.
pub fn config_text(port: u16, dir: &Path) -> String {
    let path = |name: &str| dir.join(name).display().to_string();
    format!(
        "# Written by twinhub-bench for one run.\n\
         per_listener_settings false\n\
         allow_anonymous true\n\
         persistence false\n\
         # Started as root by the bench: keep the user so the key stays readable.\n\
         user root\n\
         set_tcp_nodelay true\n\
         max_keepalive 65535\n\
         log_dest stderr\n\
         log_type error\n\
         log_type warning\n\
         listener {port} 127.0.0.1\n\
         cafile {}\n\
         certfile {}\n\
         keyfile {}\n",
        path("ca.pem"),
        path("server.pem"),
        path("server-key.pem"),
    )
}

/// A running Mosquitto.
pub struct Mosquitto {
    pub addr: SocketAddr,
    pub version: String,
    child: ChildProcess,
}

/// A free loopback port (the broker binds it right after; a race is harmless on loopback).
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| Error::io("finding a free port", e))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| Error::io("finding a free port", e))
}

impl Mosquitto {
    /// Writes the certificate and config into `dir` and starts the broker; returns once it
    /// accepts an MQTT connection over TLS.
    pub async fn start(
        bin: &Path,
        dir: &Path,
        cert: &ServerCert,
        ca_pem: &str,
        client: &tls::Client,
    ) -> Result<Mosquitto> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let port = free_port()?;
        for (name, text) in [
            ("ca.pem", ca_pem.to_string()),
            ("server.pem", cert.chain_pem.clone()),
            ("server-key.pem", cert.key_pem.clone()),
            ("mosquitto.conf", config_text(port, dir)),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, text)
                .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        }
        let log_path = dir.join("mosquitto.log");
        let log = std::fs::File::create(&log_path)
            .map_err(|e| Error::io(format!("creating {}", log_path.display()), e))?;
        let mut child = ChildProcess::spawn(
            Command::new(bin)
                .arg("-c")
                .arg(dir.join("mosquitto.conf"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(log)),
            "mosquitto",
        )?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let started = Instant::now();
        let limit = Duration::from_secs(15);
        loop {
            if let Some(status) = child.exited() {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                return Err(Error::Setup(format!(
                    "mosquitto exited ({status}): {}",
                    log.trim()
                )));
            }
            let probe = Login::anonymous("bench-probe", 60);
            if let Ok(conn) = Conn::open(client, addr, None, &probe, Duration::from_secs(2)).await {
                conn.close().await;
                break;
            }
            if started.elapsed() > limit {
                return Err(Error::timeout("starting mosquitto", limit));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(Mosquitto {
            addr,
            version: version(bin).unwrap_or_else(|| "mosquitto (version unknown)".into()),
            child,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub async fn stop(self) {
        self.child.terminate(Duration::from_secs(10)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_listens_on_loopback_with_tls_and_no_persistence() {
        let text = config_text(18883, Path::new("/tmp/x"));
        assert!(text.contains("listener 18883 127.0.0.1\n"), "{text}");
        assert!(text.contains("certfile /tmp/x/server.pem\n"), "{text}");
        assert!(text.contains("keyfile /tmp/x/server-key.pem\n"), "{text}");
        assert!(text.contains("persistence false\n"), "{text}");
        assert!(text.contains("set_tcp_nodelay true\n"), "{text}");
        // Global options must come before the listener when per_listener_settings is off.
        let listener = text.find("listener ").unwrap_or(0);
        assert!(text.find("allow_anonymous").unwrap_or(usize::MAX) < listener);
    }
}
