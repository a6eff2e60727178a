//! Runs the shared conformance suite against both in-crate backends: the in-memory log and the
//! disk log, each case on a fresh log (the disk log in a fresh temporary directory).

mod memory {
    use std::sync::Arc;

    use twinhub_eventlog::MemoryLog;

    twinhub_eventlog::eventlog_conformance_tests!(|options| async move {
        let log = MemoryLog::new(options).expect("create a memory log");
        (Arc::new(log), ())
    });
}

mod disk {
    use std::sync::Arc;

    use twinhub_eventlog::DiskLog;

    twinhub_eventlog::eventlog_conformance_tests!(|options| async move {
        let dir = tempfile::tempdir().expect("create a temporary directory");
        let log = DiskLog::open(dir.path().join("events"), options).expect("open a disk log");
        (Arc::new(log), dir)
    });
}
