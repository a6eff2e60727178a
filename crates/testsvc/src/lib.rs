//! Real services for tests: a private PostgreSQL cluster and a private nats-server (with
//! JetStream), each started from Debian's binaries on loopback in a temporary directory and
//! stopped when dropped. Used by the store, event-log and cluster tests; nothing here mocks.

pub mod nats;
pub mod postgres;
