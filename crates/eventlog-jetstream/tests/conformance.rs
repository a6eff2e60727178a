//! The shared conformance suite against a JetStream log on this test process's private
//! nats-server, each case on a stream of its own.

use std::sync::Arc;

use twinhub_eventlog_jetstream::JetStreamLog;

twinhub_eventlog::eventlog_conformance_tests!(|options| async move {
    let server = twinhub_testsvc::nats::shared();
    let name = server.unique_name("conformance");
    let log = JetStreamLog::connect(&server.url(), &name, options)
        .await
        .expect("open a JetStream log");
    (Arc::new(log), ())
});
