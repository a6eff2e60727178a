//! Fleet operations against a real in-process hub, through the SDK's ServiceClient: twin
//! queries (read-your-writes, paging, TOP, projections, aggregates, `devices.jobs`) and
//! scheduled jobs (a method job over 1,000 devices with offline, slow and failing ones, twin
//! jobs, cancel, maximum execution time, restart, start time, refused requests). Devices are
//! simulated with raw MQTT connections answering `$iothub/methods/POST/#`.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use support::{RawMqtt, TestHub, client_tls};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use twinhub_mqtt::{Packet, QoS};
use twinhub_proto::error::ErrorCode;
use twinhub_proto::model::{
    AuthenticationMechanism, AuthenticationType, CloudToDeviceMethod, DeviceJobStatistics,
    ExportImportDevice, ImportMode, JobRequest, JobResponse, SymmetricKey, Twin, TwinProperties,
};
use twinhub_sdk::service::{METHOD_JOB, TWIN_JOB};
use twinhub_sdk::{Error, ServiceClient};

// ---------------------------------------------------------------------------------------------
// Simulated devices
// ---------------------------------------------------------------------------------------------

/// The key every simulated device is registered with.
fn fleet_key() -> String {
    base64::engine::general_purpose::STANDARD.encode([7u8; 32])
}

/// Registers `ids` (100 per bulk call) with [`fleet_key`], the given tags and reported
/// properties.
async fn register(svc: &ServiceClient, ids: &[String], tags: impl Fn(usize) -> Value) {
    register_with(svc, ids, tags, |_| json!({})).await;
}

async fn register_with(
    svc: &ServiceClient,
    ids: &[String],
    tags: impl Fn(usize) -> Value,
    reported: impl Fn(usize) -> Value,
) {
    let key = fleet_key();
    for (chunk_no, chunk) in ids.chunks(100).enumerate() {
        let ops: Vec<ExportImportDevice> = chunk
            .iter()
            .enumerate()
            .map(|(j, id)| {
                let i = chunk_no * 100 + j;
                let reported = reported(i).as_object().cloned().unwrap_or_default();
                ExportImportDevice {
                    id: id.clone(),
                    import_mode: ImportMode::Create,
                    authentication: Some(AuthenticationMechanism {
                        symmetric_key: Some(SymmetricKey {
                            primary_key: Some(key.clone()),
                            secondary_key: Some(key.clone()),
                        }),
                        x509_thumbprint: None,
                        auth_type: AuthenticationType::Sas,
                    }),
                    tags: tags(i).as_object().cloned(),
                    properties: (!reported.is_empty()).then(|| TwinProperties {
                        desired: Default::default(),
                        reported,
                    }),
                    ..Default::default()
                }
            })
            .collect();
        let result = svc.bulk(&ops).await.unwrap();
        assert!(result.is_successful, "{:?}", result.errors);
    }
}

/// How a simulated device answers a direct method: this status, after this delay.
#[derive(Clone, Copy, Debug)]
struct Answer {
    status: u16,
    delay: Duration,
}

impl Answer {
    const OK: Answer = Answer::after(200, 0);

    const fn after(status: u16, millis: u64) -> Answer {
        Answer {
            status,
            delay: Duration::from_millis(millis),
        }
    }
}

/// Device id → the payloads of the method calls it received, in order.
type Calls = Arc<Mutex<HashMap<String, Vec<Value>>>>;

/// Simulated devices, each a task owning one raw MQTT connection; aborted on drop.
struct Fleet {
    mqtt: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    calls: Calls,
    tasks: Vec<JoinHandle<()>>,
    /// Bounds concurrent TLS handshakes so a large fleet connects without CONNECT timeouts.
    dialing: Arc<Semaphore>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Fleet {
    fn new(hub: &TestHub) -> Fleet {
        Fleet {
            mqtt: hub.mqtt,
            tls: client_tls(&hub.ca_pem()).expect("the hub's CA is readable"),
            calls: Arc::default(),
            tasks: Vec::new(),
            dialing: Arc::new(Semaphore::new(32)),
        }
    }

    /// Connects `ids`, subscribed to methods, and returns once every one is listening. With
    /// `reconnect`, a device whose connection drops (a hub restart) dials again until it is
    /// back, as real devices do.
    async fn connect(&mut self, ids: &[String], answer: Answer, reconnect: bool) {
        let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
        for id in ids {
            let device = SimDevice {
                id: id.clone(),
                key: fleet_key(),
                mqtt: self.mqtt,
                tls: self.tls.clone(),
                answer,
                calls: self.calls.clone(),
                dialing: self.dialing.clone(),
            };
            let ready = ready_tx.clone();
            self.tasks.push(tokio::spawn(device.run(ready, reconnect)));
        }
        drop(ready_tx);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        let mut listening = 0;
        while listening < ids.len() {
            match tokio::time::timeout_at(deadline, ready_rx.recv()).await {
                Ok(Some(())) => listening += 1,
                Ok(None) => panic!("only {listening} of {} devices connected", ids.len()),
                Err(_) => panic!(
                    "only {listening} of {} devices connected within 120 s",
                    ids.len()
                ),
            }
        }
    }

    fn calls_of(&self, id: &str) -> Vec<Value> {
        self.calls
            .lock()
            .unwrap()
            .get(id)
            .cloned()
            .unwrap_or_default()
    }

    fn total_calls(&self) -> usize {
        self.calls.lock().unwrap().values().map(Vec::len).sum()
    }
}

struct SimDevice {
    id: String,
    key: String,
    mqtt: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    answer: Answer,
    calls: Calls,
    dialing: Arc<Semaphore>,
}

impl SimDevice {
    async fn run(self, ready: mpsc::UnboundedSender<()>, reconnect: bool) {
        let mut ready = Some(ready);
        loop {
            let session = {
                let _turn = self.dialing.acquire().await;
                match RawMqtt::try_device(self.mqtt, self.tls.clone(), &self.id, &self.key).await {
                    Some(mut m) => m
                        .try_subscribe(&["$iothub/methods/POST/#"])
                        .await
                        .then_some(m),
                    None => None,
                }
            };
            let Some(mut m) = session else {
                // The hub is restarting or busy: dial again shortly.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            if let Some(tx) = ready.take() {
                let _ = tx.send(());
            }
            self.serve(&mut m).await;
            if !reconnect {
                return;
            }
        }
    }

    /// Answers method calls until the hub closes the connection.
    async fn serve(&self, m: &mut RawMqtt) {
        loop {
            let publish = match m.recv_within(Duration::from_secs(3600)).await {
                Ok(Some(Packet::Publish(p))) => p,
                Ok(Some(_)) => continue,
                Ok(None) | Err(()) => return,
            };
            let topic = publish.topic.as_str().to_string();
            let Some(rest) = topic.strip_prefix("$iothub/methods/POST/") else {
                continue;
            };
            let Some((_, rid)) = rest.rsplit_once("$rid=") else {
                continue;
            };
            let payload: Value = serde_json::from_slice(&publish.payload).unwrap_or(Value::Null);
            self.calls
                .lock()
                .unwrap()
                .entry(self.id.clone())
                .or_default()
                .push(payload);
            if !self.answer.delay.is_zero() {
                tokio::time::sleep(self.answer.delay).await;
            }
            let reply = Packet::Publish(twinhub_mqtt::Publish {
                dup: false,
                qos: QoS::AtMostOnce,
                retain: false,
                topic: twinhub_mqtt::Topic::new(format!(
                    "$iothub/methods/res/{}/?$rid={rid}",
                    self.answer.status
                ))
                .unwrap(),
                pkid: 0,
                payload: bytes::Bytes::from(json!({ "device": self.id }).to_string()),
            });
            if !m.try_send(&reply).await {
                return;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:04}")).collect()
}

fn method(
    name: &str,
    payload: Value,
    response_timeout: i64,
    connect_timeout: i64,
) -> CloudToDeviceMethod {
    CloudToDeviceMethod {
        method_name: name.into(),
        payload: Some(payload),
        response_timeout_in_seconds: Some(response_timeout),
        connect_timeout_in_seconds: Some(connect_timeout),
    }
}

fn stats(job: &JobResponse) -> DeviceJobStatistics {
    job.device_job_statistics.unwrap_or_default()
}

fn is_finished(job: &JobResponse) -> bool {
    matches!(job.status.as_str(), "completed" | "failed" | "cancelled")
}

/// Polls the job until `done` holds, checking on every poll that the statistics add up.
async fn wait_job(
    svc: &ServiceClient,
    job_id: &str,
    within: Duration,
    done: impl Fn(&JobResponse) -> bool,
) -> JobResponse {
    let deadline = Instant::now() + within;
    loop {
        let job = svc.get_job(job_id).await.unwrap();
        let s = stats(&job);
        assert_eq!(
            s.device_count,
            s.succeeded_count + s.failed_count + s.running_count + s.pending_count,
            "statistics must add up at every moment: {s:?}"
        );
        if done(&job) {
            return job;
        }
        assert!(
            Instant::now() < deadline,
            "job {job_id} not there within {within:?}: {job:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every per-device record of a job, keyed by device id (read through the query API).
async fn device_jobs(svc: &ServiceClient, job_id: &str) -> BTreeMap<String, Value> {
    let mut pages = svc
        .query(format!(
            "SELECT * FROM devices.jobs WHERE devices.jobs.jobId = '{job_id}'"
        ))
        .page_size(1000);
    let mut out = BTreeMap::new();
    while let Some(page) = pages.next_page().await.unwrap() {
        assert_eq!(page.item_type.as_deref(), Some("deviceJob"));
        for record in page.items {
            let id = record["deviceId"].as_str().unwrap().to_string();
            assert_eq!(record["jobId"], job_id);
            assert!(
                out.insert(id.clone(), record).is_none(),
                "{id} has two records"
            );
        }
    }
    out
}

fn error_code(record: &Value) -> &str {
    record["error"]["code"].as_str().unwrap_or("")
}

fn timestamp(text: &Value) -> jiff::Timestamp {
    text.as_str()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("{text} is not an RFC 3339 time"))
}

fn refused(e: &Error) -> (Option<u16>, Option<ErrorCode>) {
    (e.status(), e.code())
}

// ---------------------------------------------------------------------------------------------
// Queries
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_query_sees_a_reported_patch_acknowledged_just_before() {
    let hub = TestHub::start().await;
    let svc = hub.owner();
    let key = hub.device("ryw-1").await;
    hub.device("ryw-2").await;
    let (mut m, _) = RawMqtt::device(&hub, "ryw-1", &key, true).await;
    m.subscribe(&["$iothub/twin/res/#"]).await;

    for i in 0..25 {
        let boot = format!("2024-05-01T10:00:{i:02}Z");
        m.publish(
            &format!("$iothub/twin/PATCH/properties/reported/?$rid=r{i}"),
            json!({ "lastBoot": boot, "seq": i }).to_string().as_bytes(),
            QoS::AtMostOnce,
            0,
            false,
        )
        .await;
        let ack = m.next_publish().await;
        assert!(
            ack.topic
                .as_str()
                .starts_with(&format!("$iothub/twin/res/204/?$rid=r{i}&")),
            "{}",
            ack.topic.as_str()
        );
        // Issued right after the 204: the new value is found, the old one no longer is.
        let rows = svc
            .query_all(format!(
                "SELECT deviceId, properties.reported.lastBoot AS lastBoot FROM devices \
                 WHERE properties.reported.lastBoot = '{boot}'"
            ))
            .await
            .unwrap();
        assert_eq!(rows, vec![json!({ "deviceId": "ryw-1", "lastBoot": boot })]);
        if i > 0 {
            let stale = svc
                .query_all(format!(
                    "SELECT COUNT() AS n FROM devices WHERE properties.reported.seq = {}",
                    i - 1
                ))
                .await
                .unwrap();
            assert_eq!(stale, vec![json!({ "n": 0 })]);
        }
    }

    // A service-side write is visible to the very next query too.
    svc.update_twin("ryw-2", &json!({ "tags": { "rack": 7 } }), None)
        .await
        .unwrap();
    let rows = svc
        .query_all("SELECT deviceId FROM devices WHERE tags.rack = 7")
        .await
        .unwrap();
    assert_eq!(rows, vec![json!({ "deviceId": "ryw-2" })]);
}

/// 25 devices `p-0000`..`p-0024`: tags `site` (north for even, south for odd) and `rank`,
/// and a firmware-update status reported as current / downloading / error by `i % 3`.
async fn query_fixture(svc: &ServiceClient) -> Vec<String> {
    let all = ids("p", 25);
    let fw = ["current", "downloading", "error"];
    register_with(
        svc,
        &all,
        |i| json!({ "site": if i % 2 == 0 { "north" } else { "south" }, "rank": i }),
        |i| json!({ "iothubDM": { "firmwareUpdate": { "status": fw[i % 3] } } }),
    )
    .await;
    all
}

#[tokio::test(flavor = "multi_thread")]
async fn queries_page_and_project_and_aggregate() {
    let hub = TestHub::start().await;
    let svc = hub.owner();
    let all = query_fixture(&svc).await;

    // Paging: 10 + 10 + 5, a token after each full page, none after the last.
    let mut pages = svc.query("SELECT * FROM devices").page_size(10);
    let mut sizes = Vec::new();
    let mut seen = Vec::new();
    while let Some(page) = pages.next_page().await.unwrap() {
        assert_eq!(page.item_type.as_deref(), Some("twin"));
        sizes.push(page.items.len());
        seen.extend(
            page.items
                .iter()
                .map(|t| t["deviceId"].as_str().unwrap().to_string()),
        );
        assert_eq!(
            pages.continuation_token().is_some(),
            sizes.len() < 3,
            "token after page {}",
            sizes.len()
        );
        // Twins come whole: the reported section carries the bulk-imported status.
        assert!(page.items[0]["properties"]["reported"]["iothubDM"].is_object());
    }
    assert_eq!(sizes, [10, 10, 5]);
    assert_eq!(seen, all, "every twin once, in id order");
    assert!(pages.next_page().await.unwrap().is_none());

    // A page size that divides the result: the fifth page is the last, with no empty sixth.
    let mut pages = svc.query("SELECT deviceId FROM devices").page_size(5);
    let mut count = 0;
    while let Some(page) = pages.next_page().await.unwrap() {
        assert_eq!(page.items.len(), 5);
        count += 1;
    }
    assert_eq!(count, 5);

    // A filter across pages.
    let north = svc
        .query("SELECT * FROM devices WHERE tags.site = 'north'")
        .page_size(4);
    let mut rows = Vec::new();
    let mut pages = north;
    while let Some(page) = pages.next_page().await.unwrap() {
        assert!(page.items.len() <= 4);
        rows.extend(page.items);
    }
    assert_eq!(rows.len(), 13);
    assert!(rows.iter().all(|t| t["tags"]["site"] == "north"));

    // A token resumes in a fresh pager (another process could hold it).
    let mut first = svc.query("SELECT deviceId FROM devices").page_size(20);
    first.next_page().await.unwrap();
    let token = first.continuation_token().unwrap().to_string();
    let mut resumed = svc
        .query("SELECT deviceId FROM devices")
        .page_size(20)
        .resume_from(token);
    let rest = resumed.next_page().await.unwrap().unwrap();
    assert_eq!(
        rest.items,
        all[20..]
            .iter()
            .map(|id| json!({ "deviceId": id }))
            .collect::<Vec<_>>()
    );

    // TOP caps the rows across pages.
    let mut pages = svc.query("SELECT TOP 7 * FROM devices").page_size(3);
    let mut sizes = Vec::new();
    while let Some(page) = pages.next_page().await.unwrap() {
        sizes.push(page.items.len());
    }
    assert_eq!(sizes, [3, 3, 1]);
    assert_eq!(
        svc.query_all("SELECT TOP 30 deviceId FROM devices")
            .await
            .unwrap()
            .len(),
        25
    );

    // Projections with aliases, and a property only some twins have.
    let rows = svc
        .query_all(
            "SELECT deviceId, tags.rank AS r, \
             properties.reported.iothubDM.firmwareUpdate.status AS fwStatus \
             FROM devices WHERE tags.rank < 3",
        )
        .await
        .unwrap();
    assert_eq!(
        rows,
        vec![
            json!({ "deviceId": "p-0000", "r": 0, "fwStatus": "current" }),
            json!({ "deviceId": "p-0001", "r": 1, "fwStatus": "downloading" }),
            json!({ "deviceId": "p-0002", "r": 2, "fwStatus": "error" }),
        ]
    );

    // COUNT() and GROUP BY: one page whatever the page size.
    let count = svc
        .query("SELECT COUNT() AS n FROM devices WHERE tags.site = 'south'")
        .page_size(1)
        .next_page()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(count.items, vec![json!({ "n": 12 })]);
    let mut grouped = svc
        .query(
            "SELECT properties.reported.iothubDM.firmwareUpdate.status AS fwStatus, \
             COUNT() AS n FROM devices \
             GROUP BY properties.reported.iothubDM.firmwareUpdate.status",
        )
        .page_size(1);
    let page = grouped.next_page().await.unwrap().unwrap();
    assert!(grouped.continuation_token().is_none());
    let by_status: BTreeMap<String, i64> = page
        .items
        .iter()
        .map(|r| {
            (
                r["fwStatus"].as_str().unwrap().to_string(),
                r["n"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        by_status,
        BTreeMap::from([
            ("current".to_string(), 9),
            ("downloading".to_string(), 8),
            ("error".to_string(), 8),
        ])
    );

    // Module identities are not served: an empty result, not an error.
    assert!(
        svc.query_all("SELECT * FROM devices.modules")
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_queries_are_refused_with_400() {
    let hub = TestHub::start().await;
    let svc = hub.owner();
    query_fixture(&svc).await;

    let long = format!(
        "SELECT * FROM devices WHERE tags.site = '{}'",
        "x".repeat(8200)
    );
    for text in [
        "SELECT * FROM devices WHERE",
        "SELECT * FROM nowhere",
        "SELEC * FROM devices",
        "SELECT * FROM devices WHERE tags.x = 'unterminated",
        long.as_str(),
    ] {
        let e = svc.query_all(text).await.unwrap_err();
        assert_eq!(
            refused(&e),
            (Some(400), Some(ErrorCode::ArgumentInvalid)),
            "{text:.60}: {e}"
        );
    }
    // The parse error says where and what was expected.
    let e = svc
        .query_all("SELECT * FROM devices WHERE tags.a = ")
        .await
        .unwrap_err();
    let message = e.to_string();
    assert!(message.contains("expected"), "{message}");

    for size in [0, 1001] {
        let e = svc
            .query("SELECT * FROM devices")
            .page_size(size)
            .next_page()
            .await
            .unwrap_err();
        assert_eq!(e.status(), Some(400), "page size {size}");
    }
    let e = svc
        .query("SELECT * FROM devices")
        .resume_from("not-a-token!")
        .next_page()
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(400));
    // The maximum page size is allowed.
    let page = svc
        .query("SELECT * FROM devices")
        .page_size(1000)
        .next_page()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(page.items.len(), 25);
}

// ---------------------------------------------------------------------------------------------
// Jobs
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_twin_job_updates_matching_twins_and_leaves_device_job_records() {
    let hub = TestHub::start().await;
    let svc = hub.owner();
    let all = ids("t", 5);
    register(
        &svc,
        &all,
        |i| json!({ "site": if i < 4 { "x" } else { "y" } }),
    )
    .await;
    // A connected device hears the job's desired patch like any other.
    let mut fleet_dev = RawMqtt::try_device(
        hub.mqtt,
        client_tls(&hub.ca_pem()).unwrap(),
        "t-0000",
        &fleet_key(),
    )
    .await
    .unwrap();
    assert!(
        fleet_dev
            .try_subscribe(&["$iothub/twin/PATCH/properties/desired/#"])
            .await
    );

    let patch = json!({
        "tags": { "fw": "2.0" },
        "properties": { "desired": { "interval": 10 } },
    });
    let created = svc
        .schedule_twin_job("twin-job", "tags.site = 'x'", &patch, None, Some(60))
        .await
        .unwrap();
    assert_eq!(created.job_type, TWIN_JOB);
    assert_eq!(created.query_condition.as_deref(), Some("tags.site = 'x'"));
    assert!(
        matches!(created.status.as_str(), "queued" | "running" | "completed"),
        "{}",
        created.status
    );
    let done = wait_job(&svc, "twin-job", Duration::from_secs(30), is_finished).await;
    assert_eq!(done.status, "completed", "{done:?}");
    assert_eq!(
        stats(&done),
        DeviceJobStatistics {
            device_count: 4,
            succeeded_count: 4,
            ..Default::default()
        }
    );
    assert!(done.end_time.is_some());

    let notified = fleet_dev.next_publish().await;
    let body: Value = serde_json::from_slice(&notified.payload).unwrap();
    assert_eq!(body["interval"], 10);

    for (i, id) in all.iter().enumerate() {
        let twin: Twin = svc.get_twin(id).await.unwrap();
        let tags = twin.tags.unwrap_or_default();
        let desired = twin.properties.unwrap_or_default().desired;
        if i < 4 {
            assert_eq!(tags.get("fw"), Some(&json!("2.0")), "{id}");
            assert_eq!(desired.get("interval"), Some(&json!(10)), "{id}");
        } else {
            assert!(tags.get("fw").is_none() && desired.get("interval").is_none());
        }
    }

    // `FROM devices.jobs`: one record per targeted device.
    let records = device_jobs(&svc, "twin-job").await;
    assert_eq!(
        records.keys().cloned().collect::<Vec<_>>(),
        all[..4].to_vec()
    );
    for record in records.values() {
        assert_eq!(record["jobType"], TWIN_JOB);
        assert_eq!(record["status"], "completed");
        assert_eq!(record["outcome"], json!({ "deviceMethodResponse": null }));
        assert!(timestamp(&record["startTimeUtc"]) <= timestamp(&record["endTimeUtc"]));
        timestamp(&record["createdDateTimeUtc"]);
        timestamp(&record["lastUpdatedDateTimeUtc"]);
    }
    let one = svc
        .query_all("SELECT * FROM devices.jobs WHERE devices.jobs.deviceId = 't-0001'")
        .await
        .unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(one[0]["jobId"], "twin-job");
    let counted = svc
        .query_all(
            "SELECT COUNT() AS n FROM devices.jobs \
             WHERE devices.jobs.jobId = 'twin-job' AND devices.jobs.status = 'completed'",
        )
        .await
        .unwrap();
    assert_eq!(counted, vec![json!({ "n": 4 })]);

    // The jobs list filters by type and status.
    let listed = svc
        .list_jobs(Some(TWIN_JOB), Some("completed"))
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].job_id, "twin-job");
    assert!(
        svc.list_jobs(Some(METHOD_JOB), None)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        svc.list_jobs(None, Some("running"))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(svc.list_jobs(None, None).await.unwrap().len(), 1);
}

/// The device categories of the 1,000-device job, by index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Offline,
    Fast,
    /// Answers within the response timeout, but slowly.
    Slow,
    /// Answers at once with status 500 (the app failed; the call did not).
    AppError,
    /// Answers after the response timeout.
    TooSlow,
}

fn kind(i: usize) -> Kind {
    match i % 20 {
        0..=7 => Kind::Offline,
        8..=14 => Kind::Fast,
        15 | 16 => Kind::Slow,
        17 | 18 => Kind::AppError,
        _ => Kind::TooSlow,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_method_job_over_1000_devices_accounts_for_every_device() {
    let hub = TestHub::start().await;
    let svc = hub.owner();
    let all = ids("big", 1000);
    register(&svc, &all, |_| json!({ "fleet": "big" })).await;
    let by_kind = |k: Kind| -> Vec<String> {
        all.iter()
            .enumerate()
            .filter(|(i, _)| kind(*i) == k)
            .map(|(_, id)| id.clone())
            .collect()
    };
    let mut fleet = Fleet::new(&hub);
    fleet.connect(&by_kind(Kind::Fast), Answer::OK, false).await;
    fleet
        .connect(&by_kind(Kind::Slow), Answer::after(200, 1500), false)
        .await;
    fleet
        .connect(&by_kind(Kind::AppError), Answer::after(500, 0), false)
        .await;
    fleet
        .connect(&by_kind(Kind::TooSlow), Answer::after(200, 7000), false)
        .await;

    let payload = json!({ "firmware": "3.1", "reboot": true });
    let started = Instant::now();
    svc.schedule_method_job(
        "big",
        "tags.fleet = 'big'",
        &method("update", payload.clone(), 5, 0),
        None,
        Some(600),
    )
    .await
    .unwrap();
    let done = wait_job(&svc, "big", Duration::from_secs(180), is_finished).await;
    eprintln!("1,000-device job finished in {:?}", started.elapsed());
    assert_eq!(done.status, "completed", "{done:?}");

    let count = |k: Kind| by_kind(k).len() as u64;
    let s = stats(&done);
    assert_eq!(s.device_count, 1000);
    assert_eq!(s.device_count, s.succeeded_count + s.failed_count);
    assert_eq!(
        s.succeeded_count,
        count(Kind::Fast) + count(Kind::Slow) + count(Kind::AppError)
    );
    assert_eq!(s.failed_count, count(Kind::Offline) + count(Kind::TooSlow));
    assert_eq!((s.running_count, s.pending_count), (0, 0));

    let records = device_jobs(&svc, "big").await;
    assert_eq!(records.len(), 1000, "every device has a record");
    for (i, id) in all.iter().enumerate() {
        let r = &records[id];
        let response = &r["outcome"]["deviceMethodResponse"];
        let k = kind(i);
        match k {
            Kind::Fast | Kind::Slow | Kind::AppError => {
                assert_eq!(r["status"], "completed", "{id} ({k:?}): {r}");
                let status = if k == Kind::AppError { 500 } else { 200 };
                assert_eq!(response["status"], status, "{id}: {r}");
                assert_eq!(response["payload"], json!({ "device": id }), "{id}");
                assert!(r.get("error").is_none_or(Value::is_null), "{id}: {r}");
            }
            Kind::Offline => {
                assert_eq!(r["status"], "failed", "{id}: {r}");
                assert_eq!(error_code(r), "DeviceNotOnline", "{id}: {r}");
            }
            Kind::TooSlow => {
                assert_eq!(r["status"], "failed", "{id}: {r}");
                assert_eq!(error_code(r), "GatewayTimeout", "{id}: {r}");
            }
        }
        assert!(r["endTimeUtc"].is_string(), "{id}: {r}");
        // Each connected device was called exactly once, with the job's payload.
        let calls = fleet.calls_of(id);
        if k == Kind::Offline {
            assert!(calls.is_empty());
        } else {
            assert_eq!(calls, vec![payload.clone()], "{id}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelling_a_running_job_cancels_the_devices_it_has_not_reached() {
    let hub = TestHub::start().await;
    let svc = hub.owner();
    let group = ids("c", 200);
    register(&svc, &group, |_| json!({ "group": "c" })).await;
    register(&svc, &["vip".to_string()], |_| json!({})).await;
    let mut fleet = Fleet::new(&hub);
    fleet.connect(&group, Answer::after(200, 1000), false).await;
    fleet.connect(&["vip".to_string()], Answer::OK, false).await;

    svc.schedule_method_job(
        "cancel-me",
        "tags.group = 'c'",
        &method("slowOp", json!(null), 10, 0),
        None,
        None,
    )
    .await
    .unwrap();
    // Let the first round of devices finish.
    wait_job(&svc, "cancel-me", Duration::from_secs(30), |j| {
        stats(j).succeeded_count >= 64
    })
    .await;

    // Interactive calls do not queue behind the job's device operations.
    let t = Instant::now();
    let r = svc
        .invoke_method("vip", &method("ping", json!(1), 5, 0))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());

    let cancelled = svc.cancel_job("cancel-me").await.unwrap();
    assert_eq!(cancelled.status, "cancelled", "{cancelled:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let calls_at_cancel = fleet.total_calls();

    let job = svc.get_job("cancel-me").await.unwrap();
    assert_eq!(job.status, "cancelled");
    assert!(job.end_time.is_some());
    let s = stats(&job);
    assert_eq!(s.device_count, 200);
    assert_eq!((s.running_count, s.pending_count), (0, 0));
    assert_eq!(s.succeeded_count + s.failed_count, 200);
    assert!(
        (64..200).contains(&s.succeeded_count),
        "cancelled mid-way: {s:?}"
    );

    let records = device_jobs(&svc, "cancel-me").await;
    assert_eq!(records.len(), 200);
    let completed = records
        .values()
        .filter(|r| r["status"] == "completed")
        .count() as u64;
    let cancelled_devices = records
        .values()
        .filter(|r| r["status"] == "cancelled")
        .count() as u64;
    assert_eq!(completed, s.succeeded_count);
    assert_eq!(
        completed + cancelled_devices,
        200,
        "no other status remains"
    );

    // Nothing more goes out once the job is cancelled.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(fleet.total_calls(), calls_at_cancel);
    assert!(calls_at_cancel < 200 + 1, "{calls_at_cancel}");
    assert_eq!(svc.get_job("cancel-me").await.unwrap().status, "cancelled");
    assert_eq!(
        device_jobs(&svc, "cancel-me").await,
        records,
        "records are final"
    );

    // Cancelling again, or cancelling a finished job, changes nothing.
    assert_eq!(
        svc.cancel_job("cancel-me").await.unwrap().status,
        "cancelled"
    );
    svc.schedule_method_job(
        "quick",
        "deviceId = 'vip'",
        &method("ping", json!(2), 5, 0),
        None,
        None,
    )
    .await
    .unwrap();
    wait_job(&svc, "quick", Duration::from_secs(20), is_finished).await;
    let after = svc.cancel_job("quick").await.unwrap();
    assert_eq!(after.status, "completed");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_stops_at_its_maximum_execution_time() {
    let hub = TestHub::start().await;
    let svc = hub.owner();
    // In id order the fast devices come first; the offline ones make the hub wait for them.
    let fast = ids("m-a", 10);
    let offline = ids("m-b", 100);
    register(&svc, &fast, |_| json!({})).await;
    register(&svc, &offline, |_| json!({})).await;
    let mut fleet = Fleet::new(&hub);
    fleet.connect(&fast, Answer::OK, false).await;

    svc.schedule_method_job(
        "deadline",
        "STARTSWITH(deviceId, 'm-')",
        &method("op", json!({}), 5, 60),
        None,
        Some(3),
    )
    .await
    .unwrap();
    let done = wait_job(&svc, "deadline", Duration::from_secs(30), is_finished).await;
    assert_eq!(done.status, "failed", "{done:?}");
    let reason = done.failure_reason.clone().unwrap_or_default();
    assert!(reason.contains("maxExecutionTimeInSeconds"), "{reason}");
    let ran = timestamp(&json!(done.end_time)).duration_since(timestamp(&json!(done.start_time)));
    let ran = Duration::try_from(ran).unwrap();
    assert!(
        (Duration::from_millis(2500)..Duration::from_secs(10)).contains(&ran),
        "{ran:?}"
    );
    assert_eq!(
        stats(&done),
        DeviceJobStatistics {
            device_count: 110,
            succeeded_count: 10,
            failed_count: 100,
            ..Default::default()
        }
    );
    let records = device_jobs(&svc, "deadline").await;
    assert_eq!(records.len(), 110);
    for id in &fast {
        assert_eq!(records[id]["status"], "completed", "{id}");
    }
    for id in &offline {
        let r = &records[id];
        assert_eq!(r["status"], "failed", "{id}: {r}");
        assert_eq!(error_code(r), "JobExceededMaxExecutionTime", "{id}: {r}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_running_job_resumes_after_a_restart_without_redoing_finished_devices() {
    let mut hub = TestHub::start().await;
    let svc = hub.owner();
    let all = ids("r", 150);
    register(&svc, &all, |_| json!({})).await;
    let mut fleet = Fleet::new(&hub);
    fleet.connect(&all, Answer::after(200, 1000), true).await;

    // The connect timeout lets the resumed job wait for devices still reconnecting.
    svc.schedule_method_job(
        "survivor",
        "*",
        &method("op", json!(null), 10, 30),
        None,
        None,
    )
    .await
    .unwrap();
    wait_job(&svc, "survivor", Duration::from_secs(30), |j| {
        stats(j).succeeded_count >= 64
    })
    .await;
    let before: BTreeMap<String, Value> = device_jobs(&svc, "survivor")
        .await
        .into_iter()
        .filter(|(_, r)| r["status"] == "completed")
        .collect();
    assert!(before.len() >= 64 && before.len() < 150, "{}", before.len());

    let stopped_at = jiff::Timestamp::now();
    hub.restart().await;
    let svc = hub.owner();
    let done = wait_job(&svc, "survivor", Duration::from_secs(90), is_finished).await;
    assert_eq!(done.status, "completed", "{done:?}");
    assert_eq!(
        stats(&done),
        DeviceJobStatistics {
            device_count: 150,
            succeeded_count: 150,
            ..Default::default()
        }
    );
    let after = device_jobs(&svc, "survivor").await;
    assert_eq!(after.len(), 150);
    for (id, record) in &after {
        assert_eq!(record["status"], "completed", "{id}: {record}");
        assert!(!fleet.calls_of(id).is_empty(), "{id} was never called");
    }
    // Devices finished before the restart keep their record and were not called again.
    for (id, record) in &before {
        assert_eq!(&after[id], record, "{id}'s record changed");
        assert_eq!(fleet.calls_of(id).len(), 1, "{id} was called twice");
    }
    for (id, record) in &after {
        if timestamp(&record["endTimeUtc"]) < stopped_at {
            assert_eq!(fleet.calls_of(id).len(), 1, "{id} finished before the stop");
        }
    }
    // Only calls in flight at the stop can have been repeated.
    assert!(fleet.total_calls() <= 150 + 64, "{}", fleet.total_calls());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_waits_for_its_start_time() {
    let hub = TestHub::start().await;
    let svc = hub.owner();
    register(&svc, &["f-1".to_string()], |_| json!({ "role": "later" })).await;
    let mut fleet = Fleet::new(&hub);
    fleet.connect(&["f-1".to_string()], Answer::OK, false).await;

    // Whole milliseconds, so the time sent and the time read back compare equal.
    let start = jiff::Timestamp::from_millisecond(
        (jiff::Timestamp::now() + jiff::SignedDuration::from_secs(3)).as_millisecond(),
    )
    .unwrap();
    let created = svc
        .schedule_method_job(
            "later",
            "tags.role = 'later'",
            &method("wake", json!("up"), 5, 0),
            Some(format!("{start:.3}")),
            Some(60),
        )
        .await
        .unwrap();
    assert_eq!(created.status, "scheduled");
    assert_eq!(timestamp(&json!(created.start_time)), start);
    let scheduled = svc.list_jobs(None, Some("scheduled")).await.unwrap();
    assert_eq!(scheduled.len(), 1);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let job = svc.get_job("later").await.unwrap();
    assert_eq!(job.status, "scheduled");
    assert!(
        fleet.calls_of("f-1").is_empty(),
        "called before the start time"
    );
    assert!(device_jobs(&svc, "later").await.is_empty());

    let done = wait_job(&svc, "later", Duration::from_secs(20), is_finished).await;
    assert_eq!(done.status, "completed", "{done:?}");
    assert_eq!(fleet.calls_of("f-1"), vec![json!("up")]);
    let records = device_jobs(&svc, "later").await;
    assert!(timestamp(&records["f-1"]["startTimeUtc"]) >= start);

    // A start time in the past means now; any fraction length is accepted.
    svc.schedule_method_job(
        "past",
        "deviceId = 'f-1'",
        &method("wake", json!(2), 5, 0),
        Some("2001-02-03T04:05:06.1234567Z".into()),
        None,
    )
    .await
    .unwrap();
    let done = wait_job(&svc, "past", Duration::from_secs(20), is_finished).await;
    assert_eq!(done.status, "completed");

    // A job far in the future can be cancelled before it touches anything.
    svc.schedule_twin_job(
        "someday",
        "*",
        &json!({ "properties": { "desired": { "x": 1 } } }),
        Some("2099-01-01T00:00:00.5Z".into()),
        None,
    )
    .await
    .unwrap();
    assert_eq!(svc.get_job("someday").await.unwrap().status, "scheduled");
    let cancelled = svc.cancel_job("someday").await.unwrap();
    assert_eq!(cancelled.status, "cancelled");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(svc.get_job("someday").await.unwrap().status, "cancelled");
    let twin = svc.get_twin("f-1").await.unwrap();
    assert!(
        twin.properties
            .unwrap_or_default()
            .desired
            .get("x")
            .is_none()
    );
    assert!(device_jobs(&svc, "someday").await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_job_requests_are_refused() {
    let hub = TestHub::start().await;
    let svc = hub.owner();
    hub.device("d1").await;
    let good_method = Some(method("m", json!(null), 30, 0));
    let base = JobRequest {
        job_id: "bad".into(),
        job_type: METHOD_JOB.into(),
        cloud_to_device_method: good_method.clone(),
        query_condition: Some("*".into()),
        ..Default::default()
    };
    let cases = [
        (
            "an unknown type",
            JobRequest {
                job_type: "rebootDevice".into(),
                ..base.clone()
            },
        ),
        (
            "no type",
            JobRequest {
                job_type: String::new(),
                ..base.clone()
            },
        ),
        (
            "a bad condition",
            JobRequest {
                query_condition: Some("tags.x = ".into()),
                ..base.clone()
            },
        ),
        (
            "no condition",
            JobRequest {
                query_condition: None,
                ..base.clone()
            },
        ),
        (
            "no method",
            JobRequest {
                cloud_to_device_method: None,
                ..base.clone()
            },
        ),
        (
            "a method with a bad timeout",
            JobRequest {
                cloud_to_device_method: Some(method("m", json!(null), 1, 0)),
                ..base.clone()
            },
        ),
        (
            "a method without a name",
            JobRequest {
                cloud_to_device_method: Some(method("", json!(null), 30, 0)),
                ..base.clone()
            },
        ),
        (
            "a twin job without a twin",
            JobRequest {
                job_type: TWIN_JOB.into(),
                cloud_to_device_method: None,
                ..base.clone()
            },
        ),
        (
            "a negative maximum time",
            JobRequest {
                max_execution_time_in_seconds: Some(-5),
                ..base.clone()
            },
        ),
        (
            "a zero maximum time",
            JobRequest {
                max_execution_time_in_seconds: Some(0),
                ..base.clone()
            },
        ),
        (
            "a start time that is not a time",
            JobRequest {
                start_time: Some("tomorrow".into()),
                ..base.clone()
            },
        ),
        (
            "a job id that differs from the body's",
            JobRequest {
                job_id: "other".into(),
                ..base.clone()
            },
        ),
    ];
    for (what, req) in cases {
        // The path id is always "bad"; the body's may differ for the mismatch case.
        let path_id = "bad";
        let e = if req.job_id == path_id {
            svc.create_job(&req).await.unwrap_err()
        } else {
            raw_put_job(&hub, path_id, &req).await
        };
        assert_eq!(
            refused(&e),
            (Some(400), Some(ErrorCode::ArgumentInvalid)),
            "{what}: {e}"
        );
        assert_eq!(
            refused(&svc.get_job(path_id).await.unwrap_err()),
            (Some(404), Some(ErrorCode::JobNotFound)),
            "{what} must not leave a job behind"
        );
    }

    // Unknown jobs.
    for e in [
        svc.get_job("ghost").await.unwrap_err(),
        svc.cancel_job("ghost").await.unwrap_err(),
    ] {
        assert_eq!(
            refused(&e),
            (Some(404), Some(ErrorCode::JobNotFound)),
            "{e}"
        );
    }

    // A job id cannot be reused; the first job is untouched.
    svc.schedule_twin_job("once", "*", &json!({ "tags": { "a": 1 } }), None, None)
        .await
        .unwrap();
    let e = svc
        .schedule_method_job("once", "*", &method("m", json!(1), 30, 0), None, None)
        .await
        .unwrap_err();
    assert!(e.status().is_some_and(|s| (400..500).contains(&s)), "{e}");
    assert_eq!(svc.get_job("once").await.unwrap().job_type, TWIN_JOB);

    // The SDK refuses what it can tell is wrong before sending anything.
    for patch in [
        json!({ "properties": { "reported": { "x": 1 } } }),
        json!({ "desired": { "x": 1 } }),
        json!({}),
        json!([1]),
    ] {
        let e = svc
            .schedule_twin_job("sdk-side", "*", &patch, None, None)
            .await
            .unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{patch}: {e}");
    }
    let e = svc.create_job(&JobRequest::default()).await.unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
}

/// `PUT /jobs/v2/{path_id}` with a body whose jobId may differ (the SDK always sends the same).
async fn raw_put_job(hub: &TestHub, path_id: &str, req: &JobRequest) -> Error {
    let cs = hub.service_cs("iothubowner");
    let key = cs.rsplit_once("SharedAccessKey=").unwrap().1;
    let host = cs
        .strip_prefix("HostName=")
        .and_then(|rest| rest.split_once(';'))
        .unwrap()
        .0;
    let token = twinhub_proto::sas::generate_sas_token(
        host,
        key,
        Some("iothubowner"),
        support::now_unix() + 600,
    )
    .unwrap();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .tls_certs_merge(
            reqwest::Certificate::from_pem_bundle(&std::fs::read(hub.ca_pem()).unwrap()).unwrap(),
        )
        .build()
        .unwrap();
    let resp = http
        .put(format!(
            "https://localhost:{}/jobs/v2/{path_id}?api-version=2021-04-12",
            hub.https.port()
        ))
        .header("Authorization", token)
        .json(req)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let code = resp
        .headers()
        .get("iothub-errorcode")
        .and_then(|v| v.to_str().ok())
        .and_then(ErrorCode::from_name);
    Error::Hub {
        status,
        code,
        message: resp.text().await.unwrap_or_default(),
    }
}
