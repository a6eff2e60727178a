//! Who gets in: a cap on open connections (both ports together), a cap on peers that have not
//! authenticated yet (in the TLS handshake, before their first HTTP request or before their MQTT
//! CONNECT is accepted), TCP keepalive on accepted sockets, and the process's open-file limit.
//! A refusal closes the socket at once, is counted in `twinhub_connections_refused_total` and
//! logged at most a few times per interval.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use twinhub_core::logsafe::RateLimit;

/// Descriptors kept back from the connection cap for the store, logs and TLS files.
const RESERVED_FDS: u64 = 128;
/// Idle time before the first TCP keepalive probe, then the interval and count of probes:
/// a dead peer behind a NAT is noticed in about two minutes.
const TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
const TCP_KEEPALIVE_RETRIES: u32 = 4;

static REFUSALS: RateLimit = RateLimit::new(Duration::from_secs(10), 5);

/// The two caps, shared by both listeners.
pub struct Admission {
    connections: Arc<Semaphore>,
    unauthenticated: Arc<Semaphore>,
    max_connections: usize,
    max_unauthenticated: usize,
}

/// An accepted connection's place under the caps. The unauthenticated permit is handed on to
/// whatever authenticates the peer, which drops it once the peer is known.
pub struct Admitted {
    _connection: OwnedSemaphorePermit,
    pub unauthenticated: Option<OwnedSemaphorePermit>,
}

impl Admission {
    pub fn new(max_connections: usize, max_unauthenticated: usize) -> Self {
        Admission {
            connections: Arc::new(Semaphore::new(max_connections)),
            unauthenticated: Arc::new(Semaphore::new(max_unauthenticated)),
            max_connections,
            max_unauthenticated,
        }
    }

    /// Takes a place for a newly accepted socket, or says why there is none.
    pub fn admit(&self, peer: SocketAddr) -> Option<Admitted> {
        let Ok(connection) = self.connections.clone().try_acquire_owned() else {
            refused(peer, "max_connections", self.max_connections);
            return None;
        };
        let Ok(unauthenticated) = self.unauthenticated.clone().try_acquire_owned() else {
            refused(peer, "max_unauthenticated", self.max_unauthenticated);
            return None;
        };
        Some(Admitted {
            _connection: connection,
            unauthenticated: Some(unauthenticated),
        })
    }

    /// Places for an HTTPS connection upgraded to MQTT over WebSockets: among open
    /// connections for the session's life (hyper lets go of the upgraded connection, and with
    /// it the accept loop's place), and among unauthenticated peers until its CONNECT is
    /// accepted.
    pub fn upgraded(&self) -> Option<Admitted> {
        let Ok(connection) = self.connections.clone().try_acquire_owned() else {
            metrics::counter!("twinhub_connections_refused_total", "reason" => "max_connections")
                .increment(1);
            return None;
        };
        let Ok(unauthenticated) = self.unauthenticated.clone().try_acquire_owned() else {
            metrics::counter!("twinhub_connections_refused_total", "reason" => "max_unauthenticated")
                .increment(1);
            return None;
        };
        Some(Admitted {
            _connection: connection,
            unauthenticated: Some(unauthenticated),
        })
    }

    /// Open connections now.
    pub fn open_connections(&self) -> usize {
        self.max_connections - self.connections.available_permits()
    }

    /// Connections not yet authenticated now.
    pub fn unauthenticated(&self) -> usize {
        self.max_unauthenticated - self.unauthenticated.available_permits()
    }
}

fn refused(peer: SocketAddr, cap: &'static str, limit: usize) {
    metrics::counter!("twinhub_connections_refused_total", "reason" => cap).increment(1);
    if let Some(suppressed) = REFUSALS.allow() {
        tracing::warn!(
            %peer,
            suppressed,
            "refusing a connection: {cap} ({limit}) reached; raise it with --{} if this is load you expect",
            cap.replace('_', "-")
        );
    }
}

/// Settings for an accepted socket: no Nagle delay, and TCP keepalive so half-open
/// connections (a NAT that forgot the flow, a device that lost power) are noticed even when
/// the protocol above is silent.
pub fn tune_socket(tcp: &TcpStream) {
    let _ = tcp.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(TCP_KEEPALIVE_IDLE)
        .with_interval(TCP_KEEPALIVE_INTERVAL);
    #[cfg(any(target_os = "linux", target_os = "macos", target_os = "freebsd"))]
    let keepalive = keepalive.with_retries(TCP_KEEPALIVE_RETRIES);
    if let Err(e) = socket2::SockRef::from(tcp).set_tcp_keepalive(&keepalive) {
        tracing::debug!("setting TCP keepalive failed: {e}");
    }
}

/// Raises the soft open-file limit to the hard one and returns the soft limit now in force
/// (`None` where the platform has none).
pub fn raise_open_file_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        match rlimit::increase_nofile_limit(u64::MAX) {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::warn!("could not raise the open-file limit: {e}");
                rlimit::getrlimit(rlimit::Resource::NOFILE)
                    .ok()
                    .map(|(soft, _)| soft)
            }
        }
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// The connection cap when none is configured: what the open-file limit allows, less a
/// reserve.
pub fn default_max_connections(open_files: Option<u64>) -> usize {
    let fds = open_files.unwrap_or(65_536);
    usize::try_from(fds.saturating_sub(RESERVED_FDS).max(64)).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_refuse_then_release() {
        let a = Admission::new(2, 1);
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mut first = a.admit(peer).expect("first");
        // One unauthenticated at a time.
        assert!(a.admit(peer).is_none());
        assert_eq!(a.open_connections(), 1);
        // Authenticating frees the place for the next peer.
        drop(first.unauthenticated.take());
        let second = a.admit(peer).expect("second");
        // Two open connections in all.
        drop(second);
        let _third = a.admit(peer).expect("third");
        assert!(a.admit(peer).is_none());
        drop(first);
        assert_eq!(a.open_connections(), 1);
    }

    #[test]
    fn default_cap_leaves_a_reserve() {
        assert_eq!(default_max_connections(Some(1024)), 896);
        assert_eq!(default_max_connections(Some(10)), 64);
    }
}
