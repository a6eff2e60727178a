//! A private nats-server with JetStream on loopback (filled in by the JetStream work).
