//! The shared conformance suite against a JetStream log on this test process's private
//! nats-server, each case on a stream of its own: once as configured, once with the tail
//! cache off so that every read fetches its messages from the server.

mod cached {
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
}

mod uncached {
    use std::sync::Arc;

    use twinhub_eventlog::LogOptions;
    use twinhub_eventlog_jetstream::JetStreamLog;

    twinhub_eventlog::eventlog_conformance_tests!(|options| async move {
        let server = twinhub_testsvc::nats::shared();
        let name = server.unique_name("uncached");
        let options = LogOptions {
            tail_cache_bytes: 0,
            ..options
        };
        let log = JetStreamLog::connect(&server.url(), &name, options)
            .await
            .expect("open a JetStream log");
        (Arc::new(log), ())
    });
}
