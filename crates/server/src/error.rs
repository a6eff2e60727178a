//! Why the hub process could not start or run. Each variant's text is the one line an operator
//! sees before the process exits non-zero.

use std::net::SocketAddr;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("configuration error: {0}")]
    Config(String),
    #[error("data directory {path}: {reason}")]
    DataDir { path: String, reason: String },
    #[error(
        "cannot listen on {addr}: address already in use (another process holds the port; choose another with --{flag})"
    )]
    AddrInUse {
        addr: SocketAddr,
        flag: &'static str,
    },
    #[error(
        "cannot listen on {addr}: permission denied; ports below 1024 need root or the capability: choose another port with --{flag} (e.g. --{flag} {alt}), or run `sudo setcap cap_net_bind_service=+ep <path to twinhub>`"
    )]
    PrivilegedPort {
        addr: SocketAddr,
        flag: &'static str,
        alt: u16,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("event log: {0}")]
    Events(String),
    #[error("store: {0}")]
    Store(#[from] twinhub_store::Error),
    #[error("hub: {0}")]
    Hub(#[from] twinhub_core::Error),
}
