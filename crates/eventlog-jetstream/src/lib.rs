//! The [`twinhub_eventlog::EventLog`] trait on NATS JetStream (being built).
