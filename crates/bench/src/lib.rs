//! twinhub-bench: the load generator behind `twinhub-bench run`. It starts twinhub (as a child
//! process or in-process), Mosquitto as the peer broker and a raw TLS echo server as the floor,
//! drives the same scenarios against each with one client stack (tokio, rustls with ring, the
//! `twinhub-mqtt` codec), and reports the figures side by side as a table and as JSON.
//!
//! The binary in `main.rs` only parses the command line; everything else lives here so the
//! integration tests can run each scenario at a tiny scale against an in-process hub.

pub mod child;
pub mod echo;
pub mod error;
pub mod hook;
pub mod hub;
pub mod machine;
pub mod mosquitto;
pub mod mqtt;
pub mod progress;
pub mod report;
pub mod run;
pub mod scenario;
pub mod stats;
pub mod tls;

pub use error::{Error, Result};
pub use run::{Mode, Settings, run};
