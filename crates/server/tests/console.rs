//! The web console's server side through a real hub over HTTPS: the embedded files (types,
//! ETags, the security headers, nothing outside the console), `/twinhub/hub` (who may ask and
//! which rights it reports), the C2D send over HTTPS, and the live telemetry stream (who may
//! read it, filtering, resuming from an id, the end at the token's expiry, and that a client
//! that goes away releases its stream).

mod support;

use std::time::Duration;

use futures_util::StreamExt;
use support::*;

const WAIT: Duration = Duration::from_secs(15);

fn url(hub: &TestHub, path: &str) -> String {
    format!("https://localhost:{}{path}", hub.https.port())
}

#[tokio::test]
async fn the_console_is_served_from_the_binary_with_its_security_headers() {
    let hub = TestHub::start().await;
    let client = https_client(&hub);

    let index = client.get(url(&hub, "/")).send().await.unwrap();
    assert_eq!(index.status(), 200);
    let h = index.headers().clone();
    assert_eq!(h["content-type"], "text/html; charset=utf-8");
    let csp = h["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'self'") && csp.contains("frame-ancestors 'none'"));
    assert_eq!(h["x-content-type-options"], "nosniff");
    let etag = h["etag"].to_str().unwrap().to_owned();
    let body = index.text().await.unwrap();
    assert!(body.contains("/console/js/app.js"), "{body}");

    // Unchanged files revalidate to 304.
    let again = client
        .get(url(&hub, "/"))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 304);

    let js = client
        .get(url(&hub, "/console/js/app.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(js.status(), 200);
    assert_eq!(
        js.headers()["content-type"],
        "text/javascript; charset=utf-8"
    );
    let css = client
        .get(url(&hub, "/console/app.css"))
        .send()
        .await
        .unwrap();
    assert_eq!(css.headers()["content-type"], "text/css; charset=utf-8");

    // Nothing but the embedded files: no traversal, no unknown names.
    for path in [
        "/console/nope.js",
        "/console/../Cargo.toml",
        "/console/%2e%2e/Cargo.toml",
        "/console/js/../../build.rs",
    ] {
        let resp = client.get(url(&hub, path)).send().await.unwrap();
        // 404 from the console, or 400 from the router when the client folded the dots.
        let status = resp.status().as_u16();
        assert!(status == 404 || status == 400, "{path}: {status}");
        assert!(!resp.text().await.unwrap().contains("[package]"), "{path}");
    }
}

#[tokio::test]
async fn hub_facts_name_the_policy_and_its_rights_and_need_a_valid_token() {
    let hub = TestHub::start().await;
    let client = https_client(&hub);

    let missing = client.get(url(&hub, "/twinhub/hub")).send().await.unwrap();
    assert_eq!(missing.status(), 401);
    assert_eq!(
        missing.headers()["iothub-errorcode"],
        "IotHubUnauthorizedAccess"
    );

    // A token signed with the wrong key is refused the same way.
    let forged = twinhub_proto::sas::generate_sas_token(
        "localhost",
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        Some("iothubowner"),
        now_unix() + 60,
    )
    .unwrap();
    let refused = client
        .get(url(&hub, "/twinhub/hub"))
        .header("authorization", forged)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);

    for (policy, rights) in [
        (
            "iothubowner",
            vec![
                "RegistryRead",
                "RegistryWrite",
                "ServiceConnect",
                "DeviceConnect",
            ],
        ),
        ("service", vec!["ServiceConnect"]),
        ("registryRead", vec!["RegistryRead"]),
    ] {
        let facts: serde_json::Value = client
            .get(url(&hub, "/twinhub/hub"))
            .header("authorization", policy_token(&hub, policy, 60))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(facts["policy"], policy);
        assert_eq!(facts["rights"], serde_json::json!(rights), "{policy}");
        assert_eq!(facts["hostName"], "localhost");
        assert_eq!(facts["httpsPort"], hub.https.port());
        assert_eq!(facts["partitions"], 4);
    }
}

#[tokio::test]
async fn a_c2d_message_sent_over_https_reaches_the_device() {
    let hub = TestHub::start().await;
    let client = https_client(&hub);
    let key = hub.device("d1").await;
    let device = device_client(&hub, "d1", &key);
    device.connect().await.unwrap();
    let mut messages = device.c2d_messages();

    // ServiceConnect is needed: the registry-only policy is refused.
    let refused = client
        .post(url(&hub, "/twinhub/devices/d1/messages"))
        .header("authorization", policy_token(&hub, "registryRead", 60))
        .body(r#"{"body":"x"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);

    let bad = client
        .post(url(&hub, "/twinhub/devices/d1/messages"))
        .header("authorization", policy_token(&hub, "service", 60))
        .body(r#"{"body":"x","ack":"sometimes"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    assert!(bad.text().await.unwrap().contains("ack must be"));

    let unknown = client
        .post(url(&hub, "/twinhub/devices/nobody/messages"))
        .header("authorization", policy_token(&hub, "service", 60))
        .body(r#"{"body":"x"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    assert_eq!(unknown.headers()["iothub-errorcode"], "DeviceNotFound");

    let sent: serde_json::Value = client
        .post(url(&hub, "/twinhub/devices/d1/messages"))
        .header("authorization", policy_token(&hub, "service", 60))
        .body(
            r#"{"body":"turn on","properties":{"color":"green"},"messageId":"m-1","ack":"full","ttlSeconds":600}"#,
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(sent["sequenceNumber"].as_u64().is_some(), "{sent}");
    assert_eq!(sent["messageId"], "m-1");

    let got = tokio::time::timeout(WAIT, messages.recv())
        .await
        .expect("the message arrives in time")
        .expect("the stream is open");
    assert_eq!(got.body.as_ref(), b"turn on");
    assert_eq!(got.message_id.as_deref(), Some("m-1"));
    assert!(
        got.properties
            .iter()
            .any(|(k, v)| k == "color" && v == "green"),
        "{:?}",
        got.properties
    );
}

/// Reads server-sent events from a streaming response: (id, data) pairs.
struct Sse {
    body: futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buffer: String,
}

impl Sse {
    fn new(resp: reqwest::Response) -> Sse {
        Sse {
            body: resp.bytes_stream().boxed(),
            buffer: String::new(),
        }
    }

    /// The next event, `None` when the stream ended; panics after [`WAIT`].
    async fn next(&mut self) -> Option<(String, serde_json::Value)> {
        tokio::time::timeout(WAIT, async {
            loop {
                while let Some(cut) = self.buffer.find("\n\n") {
                    let block: String = self.buffer.drain(..cut + 2).collect();
                    let mut id = String::new();
                    let mut data = String::new();
                    for line in block.lines() {
                        if let Some(v) = line.strip_prefix("id:") {
                            id = v.trim().to_owned();
                        } else if let Some(v) = line.strip_prefix("data:") {
                            data.push_str(v.trim_start());
                        }
                    }
                    if !data.is_empty() {
                        return Some((id, serde_json::from_str(&data).unwrap()));
                    }
                }
                match self.body.next().await {
                    Some(Ok(chunk)) => self.buffer.push_str(&String::from_utf8_lossy(&chunk)),
                    Some(Err(e)) => panic!("the stream failed: {e}"),
                    None => return None,
                }
            }
        })
        .await
        .expect("an event or the end within the wait")
    }
}

async fn open_stream(
    client: &reqwest::Client,
    hub: &TestHub,
    query: &str,
    auth: &str,
    last_id: Option<&str>,
) -> reqwest::Response {
    let mut req = client
        .get(url(hub, &format!("/twinhub/telemetry{query}")))
        .header("authorization", auth);
    if let Some(id) = last_id {
        req = req.header("last-event-id", id);
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn the_telemetry_stream_needs_service_connect() {
    let hub = TestHub::start().await;
    let client = https_client(&hub);
    let none = client
        .get(url(&hub, "/twinhub/telemetry"))
        .send()
        .await
        .unwrap();
    assert_eq!(none.status(), 401);
    for policy in ["registryRead", "registryReadWrite"] {
        let resp = open_stream(&client, &hub, "", &policy_token(&hub, policy, 60), None).await;
        assert_eq!(resp.status(), 401, "{policy}");
        assert_eq!(
            resp.headers()["iothub-errorcode"],
            "IotHubUnauthorizedAccess"
        );
    }
    let bad_from = open_stream(
        &client,
        &hub,
        "?from=yesterday",
        &policy_token(&hub, "service", 60),
        None,
    )
    .await;
    assert_eq!(bad_from.status(), 400);
    assert_eq!(hub.server().console.open_streams(), 0);
}

#[tokio::test]
async fn the_telemetry_stream_shows_one_device_or_all_and_resumes_from_its_id() {
    let hub = TestHub::start().await;
    let client = https_client(&hub);
    let auth = policy_token(&hub, "service", 600);
    let k1 = hub.device("d1").await;
    let k2 = hub.device("d2").await;
    let d1 = device_client(&hub, "d1", &k1);
    let d2 = device_client(&hub, "d2", &k2);
    d1.connect().await.unwrap();
    d2.connect().await.unwrap();

    // Sent before the stream opens: only `earliest` sees it.
    d1.send_event(&b"before"[..], &[]).await.unwrap();

    let resp = open_stream(&client, &hub, "?deviceId=d1", &auth, None).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut only_d1 = Sse::new(resp);
    let mut all = Sse::new(open_stream(&client, &hub, "?from=earliest", &auth, None).await);

    d2.send_event(&b"from d2"[..], &[]).await.unwrap();
    d1.send_event(
        &br#"{"temperature":21.5}"#[..],
        &[
            ("alert".to_owned(), "no".to_owned()),
            ("$.ct".to_owned(), "application/json".to_owned()),
        ],
    )
    .await
    .unwrap();
    d1.send_event(&b"third"[..], &[]).await.unwrap();

    let (first_id, first) = only_d1.next().await.unwrap();
    assert_eq!(first["deviceId"], "d1");
    assert_eq!(first["body"], r#"{"temperature":21.5}"#);
    assert_eq!(first["properties"]["alert"], "no");
    assert_eq!(
        first["systemProperties"]["content-type"],
        "application/json"
    );
    assert_eq!(first["source"], "Telemetry");
    assert!(first["enqueuedTime"].as_str().unwrap().ends_with('Z'));
    let (_, second) = only_d1.next().await.unwrap();
    assert_eq!(second["body"], "third");

    // All devices from the earliest: the four messages, each device's in order.
    let mut bodies = Vec::new();
    for _ in 0..4 {
        let (_, e) = all.next().await.unwrap();
        bodies.push(format!(
            "{}:{}",
            e["deviceId"].as_str().unwrap(),
            e["body"].as_str().unwrap()
        ));
    }
    let d1_bodies: Vec<&String> = bodies.iter().filter(|b| b.starts_with("d1:")).collect();
    assert_eq!(
        d1_bodies,
        ["d1:before", r#"d1:{"temperature":21.5}"#, "d1:third"],
        "{bodies:?}"
    );
    assert!(bodies.contains(&"d2:from d2".to_owned()), "{bodies:?}");

    // Resuming after the first event's id gives the second, not the first again.
    let mut resumed =
        Sse::new(open_stream(&client, &hub, "?deviceId=d1", &auth, Some(&first_id)).await);
    let (_, again) = resumed.next().await.unwrap();
    assert_eq!(again["body"], "third");
}

#[tokio::test]
async fn a_client_that_goes_away_releases_its_stream() {
    let hub = TestHub::start().await;
    let client = https_client(&hub);
    let auth = policy_token(&hub, "service", 600);
    let key = hub.device("d1").await;
    let device = device_client(&hub, "d1", &key);
    device.connect().await.unwrap();

    let mut streams = Vec::new();
    for _ in 0..3 {
        streams.push(open_stream(&client, &hub, "", &auth, None).await);
    }
    assert_eq!(hub.server().console.open_streams(), 3);
    device.send_event(&b"x"[..], &[]).await.unwrap();
    let mut first = Sse::new(streams.remove(0));
    assert_eq!(first.next().await.unwrap().1["body"], "x");

    // Dropping the responses closes their HTTP/2 streams; the hub drops the readers.
    drop(first);
    drop(streams);
    let deadline = tokio::time::Instant::now() + WAIT;
    while hub.server().console.open_streams() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} streams still open after their clients left",
            hub.server().console.open_streams()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_stream_ends_when_its_token_expires() {
    let hub = TestHub::start().await;
    let client = https_client(&hub);
    let started = std::time::Instant::now();
    let resp = open_stream(&client, &hub, "", &policy_token(&hub, "service", 2), None).await;
    assert_eq!(resp.status(), 200);
    let mut sse = Sse::new(resp);
    assert!(sse.next().await.is_none(), "no events, then the end");
    let lasted = started.elapsed();
    assert!(
        lasted >= Duration::from_millis(900) && lasted < Duration::from_secs(10),
        "{lasted:?}"
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    while hub.server().console.open_streams() > 0 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
