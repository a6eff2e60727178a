//! Runs every scenario at a tiny scale against an in-process hub, with the TLS echo floor as a
//! child process of this package's own binary: proves the load generator speaks the hub's
//! protocols (SAS CONNECT, method round trips, durable twin acks, desired pushes, telemetry
//! in over MQTT and back out over AMQP, cloud-to-device messages in over AMQP and out over
//! MQTT, routed telemetry to stream endpoints and to a webhook) and that the report and table
//! carry the figures.

use std::path::PathBuf;

use twinhub_bench::hub::Launch;
use twinhub_bench::progress::Progress;
use twinhub_bench::run::{Peer, Settings};

fn tiny(work: PathBuf) -> Settings {
    let mut s = Settings::quick(Launch::InProcess);
    s.methods_devices = 2;
    s.concurrency = vec![1, 4];
    s.caller_conns = 2;
    s.warmup_secs = 0.1;
    s.duration_secs = 0.5;
    s.twin_devices = 3;
    s.twin_duration_secs = 0.5;
    s.connections = 20;
    s.connect_concurrency = 8;
    s.source_addrs = 2;
    s.fanout_devices = 10;
    s.fanout_concurrency = 4;
    s.telemetry_devices = 3;
    s.telemetry_inflight = 2;
    s.telemetry_duration_secs = 0.5;
    s.telemetry_rate = 60.0;
    s.telemetry_latency_secs = 0.5;
    s.backlog_events = 500;
    s.backlog_devices = 3;
    s.backlog_inflight = 4;
    s.c2d_devices = 5;
    s.c2d_inflight = 4;
    s.c2d_duration_secs = 0.5;
    s.c2d_rate = 60.0;
    s.c2d_latency_secs = 0.5;
    s.routing_devices = 4;
    s.routing_inflight = 2;
    s.routing_duration_secs = 0.5;
    s.routing_rounds = 1;
    s.webhook_backlog = 200;
    s.webhook_rate = 40.0;
    s.webhook_latency_secs = 0.5;
    s.query_twins = 400;
    s.query_repetitions = 2;
    s.mosquitto = Peer::Off;
    // Other builds on a shared machine must not stall or fail the test.
    s.quiet_wait_secs = 0.0;
    s.echo_exe = Some(PathBuf::from(env!("CARGO_BIN_EXE_twinhub-bench")));
    s.work_dir = Some(work);
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_runs_against_an_in_process_hub() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let work = dir.path().join("work");
    let report = twinhub_bench::run(tiny(work.clone()), Progress::silent())
        .await
        .expect("the run completes");
    // The one note: the query scenario ran on fewer twins than its aims name, as set above.
    assert_eq!(report.notes.len(), 1, "{:?}", report.notes);
    assert!(
        report.notes[0].starts_with("query: 400 twins"),
        "{:?}",
        report.notes
    );
    assert!(!work.exists(), "the work dir is removed after the run");

    assert_eq!(report.methods.len(), 2);
    for row in &report.methods {
        let hub = row.twinhub.as_ref().expect("twinhub figures");
        assert!(hub.completed > 0, "C={}: {hub:?}", row.concurrency);
        assert_eq!(
            hub.errors, 0,
            "C={}: {:?}",
            row.concurrency, hub.first_error
        );
        assert!(hub.latency.p50_us > 0 && hub.latency.p50_us <= hub.latency.max_us);
        let floor = row.floor.as_ref().expect("floor figures");
        assert!(floor.completed > 0 && floor.errors == 0, "{floor:?}");
        assert!(row.mosquitto.is_none());
    }

    let twin = report
        .twin
        .as_ref()
        .and_then(|p| p.twinhub.as_ref())
        .expect("twin figures");
    assert!(twin.completed > 0, "{twin:?}");
    assert_eq!(twin.errors, 0, "{:?}", twin.first_error);

    let conn = report
        .connect
        .as_ref()
        .and_then(|p| p.twinhub.as_ref())
        .expect("connect figures");
    assert_eq!(conn.connected, 20, "{:?}", conn.first_error);
    assert_eq!(conn.errors, 0);
    assert_eq!(conn.source_addrs, 2);
    // In-process, the hub's memory cannot be told from the bench's.
    assert!(conn.server_rss_per_connection.is_none());

    let fan = report
        .desired_fanout
        .as_ref()
        .and_then(|p| p.twinhub.as_ref())
        .expect("fan-out figures");
    assert_eq!(fan.received, 10, "{fan:?}");
    assert_eq!(fan.errors, 0, "{:?}", fan.first_error);
    assert!(fan.seconds_to_all.is_some_and(|s| s > 0.0));

    let registration = report.registration.as_ref().expect("registration figures");
    assert_eq!(registration.devices, 20);

    let telemetry = report.telemetry.as_ref().expect("telemetry figures");
    let ingest = telemetry.ingest.twinhub.as_ref().expect("ingest figures");
    assert!(ingest.acks.completed > 0, "{ingest:?}");
    assert_eq!(ingest.acks.errors, 0, "{:?}", ingest.acks.first_error);
    assert!(telemetry.ingest.mosquitto.is_none());
    let e2e = telemetry
        .end_to_end
        .twinhub
        .as_ref()
        .expect("end-to-end figures");
    assert!(e2e.sent > 0, "{e2e:?}");
    assert_eq!(e2e.received, e2e.sent, "{e2e:?}");
    assert_eq!(e2e.errors, 0, "{:?}", e2e.first_error);
    assert!(e2e.latency.p50_us > 0 && e2e.ack_latency.count == e2e.sent);
    let floor = telemetry.disk_floor.as_ref().expect("disk floor figures");
    assert!(floor.received > 0 && floor.errors == 0, "{floor:?}");
    let catch_up = telemetry.catch_up.as_ref().expect("catch-up figures");
    assert_eq!(catch_up.backlog, 500, "{catch_up:?}");
    assert_eq!(catch_up.read, 500, "{catch_up:?}");
    assert!(catch_up.in_order, "{catch_up:?}");
    assert_eq!(catch_up.partitions, 4);
    assert_eq!(catch_up.per_partition.values().sum::<u64>(), 500);
    assert!(catch_up.seconds_to_last.is_some_and(|s| s > 0.0));

    let c2d = report
        .c2d
        .as_ref()
        .and_then(|p| p.twinhub.as_ref())
        .expect("c2d figures");
    assert_eq!(c2d.device_errors, 0, "{:?}", c2d.first_device_error);
    let tp = c2d.throughput.as_ref().expect("c2d throughput figures");
    assert!(tp.sends.completed > 0 && tp.delivered > 0, "{tp:?}");
    assert_eq!(tp.sends.errors, 0, "{:?}", tp.sends.first_error);
    assert_eq!(tp.delivered_total, tp.accepted_total, "{tp:?}");
    assert!(
        tp.drain_seconds.is_some() && tp.delivery_latency.p50_us > 0,
        "{tp:?}"
    );
    let lat = c2d.latency.as_ref().expect("c2d latency figures");
    assert!(lat.sent > 0, "{lat:?}");
    assert_eq!(lat.received, lat.sent, "{lat:?}");
    assert_eq!(lat.errors, 0, "{:?}", lat.first_error);
    assert_eq!(lat.ack_latency.count, lat.sent, "{lat:?}");

    let routing = report.routing.as_ref().expect("routing figures");
    assert_eq!((routing.routes, routing.enrichments), (10, 3));
    let (unrouted, routed) = (
        routing.unrouted.as_ref().expect("unrouted figures"),
        routing.routed.as_ref().expect("routed figures"),
    );
    for f in [unrouted, routed] {
        assert!(f.completed > 0, "{f:?}");
        assert_eq!(f.errors, 0, "{:?}", f.first_error);
        assert_eq!(f.rounds.len(), 1);
    }
    assert!(routing.ratios.messages_per_second.is_some());
    // The hub's own count of copies matches the configuration's decision for these devices.
    let counted = routed
        .copies_per_message
        .expect("copies counted by the hub");
    let expected = twinhub_bench::scenario::routing::expected_copies(
        &twinhub_bench::scenario::routing::routed_config(),
        4,
        1024,
    )
    .expect("decided")
    .per_message;
    assert!(
        (counted - expected).abs() < 0.3,
        "{counted} vs {expected}: {:?}",
        routed.counted
    );
    let webhook = routing.webhook.as_ref().expect("webhook figures");
    let backlog = webhook.backlog.as_ref().expect("webhook backlog figures");
    assert!(backlog.complete && backlog.delivered >= 200, "{backlog:?}");
    assert!(backlog.per_second_overall.is_some(), "{backlog:?}");
    let lag = webhook.lag.as_ref().expect("webhook lag figures");
    assert!(lag.sent > 0 && lag.received == lag.sent, "{lag:?}");
    assert_eq!(lag.enqueued_to_received.count, lag.sent, "{lag:?}");
    assert_eq!(webhook.untimed, 0);

    // Without Mosquitto the ratio targets cannot be judged; the others can.
    let query = report.query.as_ref().expect("query figures");
    assert_eq!(query.twins, 400);
    assert_eq!(query.read_your_writes_misses, 0);

    assert_eq!(report.targets.len(), 11);
    // The query scenario's read-your-writes target is judged, and met.
    assert_eq!(
        report.targets[10].met,
        Some(true),
        "{:?}",
        report.targets[10]
    );
    assert_eq!(report.targets[0].met, None);
    assert!(report.targets[2].met.is_some());
    assert_eq!(report.targets[4].met, None, "{:?}", report.targets[4]);
    assert!(report.targets[5].met.is_some(), "{:?}", report.targets[5]);
    assert!(report.targets[6].met.is_some(), "{:?}", report.targets[6]);

    let table = report.table();
    for needle in [
        "methods:",
        "C=4",
        "twin:",
        "connect:",
        "desired-fanout:",
        "TLS floor",
        "telemetry ingest:",
        "telemetry end to end:",
        "telemetry catch-up",
        "disk floor",
        "c2d throughput:",
        "c2d latency:",
        "routing cost:",
        "webhook delivery:",
    ] {
        assert!(table.contains(needle), "{needle} missing from\n{table}");
    }
    let json: serde_json::Value = serde_json::from_str(&report.to_json()).expect("valid JSON");
    assert!(
        json["machine"]["cores"].as_u64().is_some_and(|c| c >= 1),
        "{json}"
    );
    assert_eq!(json["methods"][1]["concurrency"], 4);
    assert_eq!(json["settings"]["mode"], "quick");
}

/// The cluster scenario at a tiny scale with in-process hubs: a private PostgreSQL and
/// nats-server (Debian's binaries, as the store and cluster tests use), a node on each store,
/// then two nodes with calls across them. In-process hubs have no CPU of their own to read;
/// PostgreSQL's and nats-server's are read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_scenario_runs_against_in_process_nodes() {
    use twinhub_bench::run::Scenario;
    let dir = tempfile::tempdir().expect("a temp dir");
    let work = dir.path().join("work");
    let mut s = tiny(work.clone());
    s.scenarios = vec![Scenario::Cluster];
    s.floor = false;
    s.cluster_concurrency = vec![2];
    s.cluster_latency_concurrency = vec![1];
    s.duration_secs = 0.3;
    s.twin_duration_secs = 0.3;
    let report = twinhub_bench::run(s, Progress::silent())
        .await
        .expect("the run completes");
    assert!(report.notes.is_empty(), "{:?}", report.notes);
    assert!(!work.exists(), "the work dir is removed after the run");
    let c = report.cluster.as_ref().expect("cluster figures");
    assert!(c.postgresql.is_some() && c.nats_server.is_some(), "{c:?}");
    let mut phases = Vec::new();
    for row in c
        .single_methods
        .iter()
        .chain(&c.single_twin)
        .chain(&c.nodes)
    {
        phases.extend([row.first.as_ref(), row.second.as_ref()]);
    }
    assert_eq!(phases.len(), 6);
    for t in phases {
        let t = t.expect("both sides measured");
        assert!(t.completed > 0 && t.errors == 0, "{t:?}");
        assert!(t.process("postgresql").is_some(), "{t:?}");
    }
    let cross = c.nodes[0].first.as_ref().expect("cross-node figures");
    assert!(cross.process("nats-server").is_some(), "{cross:?}");
    assert!(c.nodes[0].ratios.p50.is_some());
    assert!(report.table().contains("cross node"));
}
