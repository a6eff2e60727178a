//! Append throughput on the loopback nats-server, for the record rather than as a check
//! (ignored by default: timings on a shared debug build say little). Run with
//! `cargo test -p twinhub-eventlog-jetstream --test throughput -- --ignored --nocapture`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use twinhub_eventlog::{EventLog, LogOptions, NewEvent};
use twinhub_eventlog_jetstream::JetStreamLog;

/// `appenders` tasks each append one 200-byte event at a time for `for_how_long`, to
/// `partitions` partitions (task i to partition i % partitions); returns events per second.
async fn run(appenders: usize, partitions: u32, for_how_long: Duration) -> f64 {
    let server = twinhub_testsvc::nats::shared();
    let name = server.unique_name("throughput");
    let log = JetStreamLog::connect(&server.url(), &name, LogOptions::default())
        .await
        .expect("open");
    let log = Arc::new(log);
    let started = Instant::now();
    let tasks: Vec<_> = (0..appenders)
        .map(|task| {
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                let mut count = 0u64;
                while started.elapsed() < for_how_long {
                    log.append(
                        task as u32 % partitions,
                        vec![NewEvent::new(vec![b'x'; 200])],
                    )
                    .await
                    .expect("append");
                    count += 1;
                }
                count
            })
        })
        .collect();
    let mut total = 0;
    for task in tasks {
        total += task.await.expect("appender");
    }
    let rate = total as f64 / started.elapsed().as_secs_f64();
    println!(
        "{appenders} appenders over {partitions} partition(s): {total} events, {rate:.0} events/s, {:?}",
        log.stats()
    );
    log.close().await;
    rate
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn append_throughput() {
    let seconds = Duration::from_secs(3);
    run(1, 1, seconds).await;
    run(64, 1, seconds).await;
    run(64, 4, seconds).await;
}

/// A node that did not write them reads 2,000 messages of 10 events each, in pages of 1,000
/// events, from the server (its tail cache off).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn cold_read_throughput() {
    let server = twinhub_testsvc::nats::shared();
    let name = server.unique_name("read-throughput");
    let writer = JetStreamLog::connect(&server.url(), &name, LogOptions::default())
        .await
        .expect("open");
    for _ in 0..2_000 {
        let batch = (0..10).map(|_| NewEvent::new(vec![b'x'; 200])).collect();
        writer.append(0, batch).await.expect("append");
    }
    let options = LogOptions {
        tail_cache_bytes: 0,
        ..LogOptions::default()
    };
    let started = Instant::now();
    let reader = JetStreamLog::connect(&server.url(), &name, options)
        .await
        .expect("open");
    let opened = started.elapsed();
    let started = Instant::now();
    let mut next = 0;
    loop {
        let page = reader.read(0, next, 1_000, usize::MAX).await.expect("read");
        let Some(last) = page.last() else { break };
        next = last.sequence + 1;
    }
    let elapsed = started.elapsed();
    assert_eq!(next, 20_000);
    println!(
        "open (replaying 2,000 messages' headers): {opened:?}; cold read of 20,000 events: \
         {elapsed:?}, {:.0} events/s",
        20_000.0 / elapsed.as_secs_f64()
    );
}
