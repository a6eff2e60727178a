//! Message routing end to end through a real hub on loopback: routes and a stream endpoint
//! from the TOML config file, changes through the REST API (the SDK's `routing_*` calls) with
//! their refusals and rights, raw MQTT devices whose telemetry lands in the stream endpoint
//! (read over AMQP with the SDK's `EventsClient` and `EntityPath=<endpoint>`) or in `events`
//! through the fallback route, nothing with the fallback off, the route test, and all of it
//! again after a restart.

mod support;

use std::time::Duration;

use bytes::Bytes;
use serde_json::{Map, Value, json};
use support::*;
use twinhub_mqtt::{Packet, Publish, QoS, Topic};
use twinhub_proto::error::ErrorCode;
use twinhub_sdk::routing::{Enrichment, Route, RouteTest, RoutingEndpoint};
use twinhub_sdk::{Event, EventStream, EventsClient, StartPosition};
use twinhub_server::{Config, Overrides};

const WAIT: Duration = Duration::from_secs(15);

const HUB_TOML: &str = r#"
[[endpoints]]
name = "alerts"
kind = "stream"

[[routes]]
name = "hot"
source = "DeviceMessages"
condition = "temperatureAlert = 'true'"
endpoints = ["alerts"]
"#;

/// Loads the settings from `hub.toml` in the data dir, as `twinhub serve --config` does, on
/// the ports the support code chose.
fn from_file(cfg: &mut Config) {
    let overrides = Overrides {
        data_dir: Some(cfg.data_dir.clone()),
        hostname: Some(cfg.hostname.clone()),
        bind: Some(cfg.bind),
        https_port: Some(cfg.https_port),
        mqtt_port: Some(cfg.mqtt_port),
        amqp_port: Some(0),
        mqtt_connect_timeout: Some(2),
        ..Overrides::default()
    };
    *cfg = Config::load(Some(&cfg.data_dir.join("hub.toml")), &overrides)
        .expect("the config file loads");
}

async fn start_from_file() -> TestHub {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hub.toml"), HUB_TOML).unwrap();
    TestHub::start_in(dir, from_file).await
}

/// An Event Hubs reader of `entity` (`None`: the built-in endpoint).
async fn reader(hub: &TestHub, entity: Option<&str>) -> twinhub_sdk::Result<EventsClient> {
    let file = &hub.server().hub_file;
    let cs = match entity {
        Some(name) => file.entity_connection_string("service", false, name),
        None => file.events_connection_string("service", false),
    }
    .expect("the hub file has the AMQP port");
    EventsClient::builder(&cs)
        .extra_ca_pem(std::fs::read(hub.ca_pem()).unwrap())
        .connect()
        .await
}

/// A reader of every partition of `entity` from the start. The client comes along because
/// its connection carries the stream.
async fn stream(hub: &TestHub, entity: Option<&str>) -> (EventsClient, EventStream) {
    let client = reader(hub, entity).await.expect("the reader signs in");
    let stream = client
        .receive(None, StartPosition::Earliest)
        .await
        .expect("the receivers attach");
    (client, stream)
}

async fn read(stream: &mut EventStream, n: usize) -> Vec<Event> {
    let mut got = Vec::new();
    while got.len() < n {
        match tokio::time::timeout(WAIT, stream.next()).await {
            Ok(Some(Ok(e))) => got.push(e),
            Ok(Some(Err(e))) => panic!("reading events failed: {e}"),
            Ok(None) => panic!("the event stream ended after {} of {n}", got.len()),
            Err(_) => panic!("only {} of {n} events arrived within {WAIT:?}", got.len()),
        }
    }
    got
}

fn bodies(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .map(|e| String::from_utf8_lossy(&e.body).into_owned())
        .collect()
}

async fn nothing_within(stream: &mut EventStream, limit: Duration) {
    if let Ok(Some(e)) = tokio::time::timeout(limit, stream.next()).await {
        panic!("expected no event, got {e:?}");
    }
}

async fn device(hub: &TestHub, id: &str) -> RawMqtt {
    let key = hub.device(id).await;
    RawMqtt::device(hub, id, &key, true).await.0
}

/// Publishes telemetry at QoS 1 and waits for its PUBACK (sent once every endpoint has it).
async fn send(d: &mut RawMqtt, device: &str, bag: &str, body: &str, pkid: u16) {
    d.send(&Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: Topic::try_from(format!("devices/{device}/messages/events/{bag}")).unwrap(),
        pkid,
        payload: Bytes::copy_from_slice(body.as_bytes()),
    }))
    .await;
    match d.recv_within(WAIT).await {
        Ok(Some(Packet::PubAck(id))) => assert_eq!(id, pkid),
        other => panic!("expected PUBACK {pkid}, got {other:?}"),
    }
}

fn stream_endpoint(name: &str) -> RoutingEndpoint {
    RoutingEndpoint {
        name: name.into(),
        kind: "stream".into(),
        url: None,
    }
}

fn route(name: &str, condition: &str, endpoints: &[&str]) -> Route {
    Route {
        name: name.into(),
        source: "DeviceMessages".into(),
        condition: condition.into(),
        endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
        enabled: true,
    }
}

/// The status, code and message of a refusal.
fn refusal<T: std::fmt::Debug>(result: twinhub_sdk::Result<T>) -> (u16, Option<ErrorCode>, String) {
    match result {
        Err(twinhub_sdk::Error::Hub {
            status,
            code,
            message,
        }) => (status, code, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn file_routing_is_in_force_at_start_and_routed_telemetry_reads_over_amqp() {
    let mut hub = start_from_file().await;
    let svc = hub.owner();
    let config = svc.routing_config().await.unwrap();
    assert_eq!(config.endpoints, [stream_endpoint("alerts")]);
    assert_eq!(
        config.routes,
        [route("hot", "temperatureAlert = 'true'", &["alerts"])]
    );
    assert!(config.fallback.enabled, "IoT Hub's default");

    // The stream is an Event Hub of its own, with the built-in endpoint's partitions.
    let alerts_reader = reader(&hub, Some("alerts")).await.unwrap();
    assert_eq!(alerts_reader.event_hub_name(), "alerts");
    assert_eq!(alerts_reader.partition_ids(), ["0", "1", "2", "3"]);
    let mut alerts = alerts_reader
        .receive(None, StartPosition::Earliest)
        .await
        .unwrap();
    let (_events_reader, mut events) = stream(&hub, None).await;

    let mut d = device(&hub, "route-1").await;
    send(&mut d, "route-1", "temperatureAlert=true", "hot-1", 1).await;
    send(&mut d, "route-1", "temperatureAlert=false", "cold-1", 2).await;
    send(&mut d, "route-1", "", "plain-1", 3).await;

    let got = read(&mut alerts, 1).await;
    assert_eq!(bodies(&got), ["hot-1"]);
    assert_eq!(got[0].device_id.as_deref(), Some("route-1"));
    assert_eq!(
        got[0].properties["temperatureAlert"].as_deref(),
        Some("true")
    );
    assert_eq!(
        got[0].sequence_number, 0,
        "the stream numbers its own events"
    );
    // Unmatched messages take the fallback route; the matched one does not also go there.
    assert_eq!(bodies(&read(&mut events, 2).await), ["cold-1", "plain-1"]);
    nothing_within(&mut alerts, Duration::from_millis(300)).await;
    nothing_within(&mut events, Duration::from_millis(300)).await;

    // With the fallback off, unmatched messages are acknowledged and dropped.
    assert!(!svc.routing_set_fallback(false).await.unwrap());
    send(&mut d, "route-1", "temperatureAlert=false", "cold-2", 4).await;
    send(&mut d, "route-1", "temperatureAlert=true", "hot-2", 5).await;
    assert_eq!(bodies(&read(&mut alerts, 1).await), ["hot-2"]);
    nothing_within(&mut events, Duration::from_secs(1)).await;

    // A route added at run time, to the built-in endpoint, is in force at once.
    svc.routing_add_route(&route("cold", "temperatureAlert = 'false'", &["events"]))
        .await
        .unwrap();
    send(&mut d, "route-1", "temperatureAlert=false", "cold-3", 6).await;
    assert_eq!(bodies(&read(&mut events, 1).await), ["cold-3"]);
    drop((alerts, events, alerts_reader, _events_reader, d));

    // Everything survives a restart: the file's entries, the REST ones, the switch and the
    // stream's stored events.
    hub.restart().await;
    let svc = hub.owner();
    let config = svc.routing_config().await.unwrap();
    let names: Vec<&str> = config.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["hot", "cold"]);
    assert!(!config.fallback.enabled);
    let (_alerts_reader, mut alerts) = stream(&hub, Some("alerts")).await;
    assert_eq!(bodies(&read(&mut alerts, 2).await), ["hot-1", "hot-2"]);
    let (_events_reader, mut events) = stream(&hub, None).await;
    assert_eq!(
        bodies(&read(&mut events, 3).await),
        ["cold-1", "plain-1", "cold-3"]
    );
    let mut d = device_again(&hub, "route-1").await;
    send(&mut d, "route-1", "", "plain-2", 7).await;
    send(&mut d, "route-1", "temperatureAlert=true", "hot-3", 8).await;
    let got = read(&mut alerts, 1).await;
    assert_eq!(bodies(&got), ["hot-3"]);
    assert_eq!(
        got[0].sequence_number, 2,
        "numbering goes on after the restart"
    );
    nothing_within(&mut events, Duration::from_secs(1)).await;
    drop((alerts, events, _alerts_reader, _events_reader, d));

    // The file's entries come back at every start, and an explicit `[fallback] enabled =
    // true` turns the switch back on.
    svc.routing_remove_route("hot").await.unwrap();
    let toml = format!("{HUB_TOML}\n[fallback]\nenabled = true\n");
    std::fs::write(hub.dir.path().join("hub.toml"), toml).unwrap();
    hub.restart().await;
    let config = hub.owner().routing_config().await.unwrap();
    let names: Vec<&str> = config.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["cold", "hot"]);
    assert!(config.fallback.enabled);
}

/// Connects an existing device again (its key from the registry).
async fn device_again(hub: &TestHub, id: &str) -> RawMqtt {
    let key = primary_key(hub.owner().get_device(id).await.unwrap());
    RawMqtt::device(hub, id, &key, true).await.0
}

#[tokio::test]
async fn changes_through_rest_are_checked_and_refused_with_iot_hub_codes() {
    let hub = TestHub::start().await;
    let svc = hub.owner();
    svc.routing_add_endpoint(&stream_endpoint("alerts"))
        .await
        .unwrap();

    let (status, code, message) =
        refusal(svc.routing_add_endpoint(&stream_endpoint("ALERTS")).await);
    assert_eq!((status, code), (400, Some(ErrorCode::InvalidOperation)));
    assert!(message.contains("already exists"), "{message}");

    let (status, code, message) = refusal(
        svc.routing_add_route(&route("r1", "true", &["nowhere"]))
            .await,
    );
    assert_eq!((status, code), (400, Some(ErrorCode::ArgumentInvalid)));
    assert!(
        message.contains("nowhere, which does not exist"),
        "{message}"
    );

    let (status, code, message) = refusal(
        svc.routing_add_route(&route("r1", "temperature >", &["alerts"]))
            .await,
    );
    assert_eq!((status, code), (400, Some(ErrorCode::ArgumentInvalid)));
    assert!(
        message.contains("route r1: the condition does not parse"),
        "{message}"
    );

    let (_, code, message) = refusal(
        svc.routing_add_endpoint(&RoutingEndpoint {
            name: "hook".into(),
            kind: "webhook".into(),
            url: None,
        })
        .await,
    );
    assert_eq!(code, Some(ErrorCode::ArgumentInvalid));
    assert!(message.contains("needs a url"), "{message}");
    let (_, code, message) = refusal(svc.routing_add_endpoint(&stream_endpoint("twinhub")).await);
    assert_eq!(code, Some(ErrorCode::ArgumentInvalid));
    assert!(
        message.contains("built-in endpoint's Event Hub name"),
        "{message}"
    );
    // `events` is the built-in endpoint's routing name.
    let (_, code, message) = refusal(svc.routing_add_endpoint(&stream_endpoint("events")).await);
    assert_eq!(code, Some(ErrorCode::InvalidOperation));
    assert!(message.contains("already exists"), "{message}");

    svc.routing_add_route(&route("r1", "level = 'high'", &["alerts", "events"]))
        .await
        .unwrap();
    let (status, code, message) = refusal(
        svc.routing_add_route(&route("R1", "true", &["alerts"]))
            .await,
    );
    assert_eq!((status, code), (400, Some(ErrorCode::InvalidOperation)));
    assert!(message.contains("already exists"), "{message}");

    svc.routing_add_enrichment(&Enrichment {
        key: "hub".into(),
        value: "$iothubname".into(),
        endpoints: vec!["alerts".into()],
    })
    .await
    .unwrap();

    // An endpoint in use stays until its users go.
    let (status, code, message) = refusal(svc.routing_remove_endpoint("alerts").await);
    assert_eq!((status, code), (400, Some(ErrorCode::InvalidOperation)));
    assert!(
        message.contains("route r1") && message.contains("enrichment hub"),
        "{message}"
    );
    let (status, code, _) = refusal(svc.routing_remove_route("nope").await);
    assert_eq!((status, code), (404, Some(ErrorCode::IotHubNotFound)));
    let (status, _, _) = refusal(svc.routing_remove_enrichment("nope").await);
    assert_eq!(status, 404);
    let (status, _, _) = refusal(svc.routing_remove_endpoint("nope").await);
    assert_eq!(status, 404);

    let config = svc.routing_config().await.unwrap();
    assert_eq!(config.endpoints.len(), 1);
    assert_eq!(config.routes.len(), 1);
    assert_eq!(config.enrichments.len(), 1);

    // The service policy (ServiceConnect) reads and tests, but does not change.
    let service = hub.service("service");
    assert_eq!(service.routing_config().await.unwrap(), config);
    service.routing_test(&RouteTest::default()).await.unwrap();
    let (status, code, _) = refusal(service.routing_set_fallback(false).await);
    assert_eq!(
        (status, code),
        (401, Some(ErrorCode::IotHubUnauthorizedAccess))
    );
    let (status, _, _) = refusal(service.routing_remove_route("r1").await);
    assert_eq!(status, 401);

    svc.routing_remove_route("r1").await.unwrap();
    svc.routing_remove_enrichment("hub").await.unwrap();
    svc.routing_remove_endpoint("alerts").await.unwrap();
    let config = svc.routing_config().await.unwrap();
    assert!(config.endpoints.is_empty() && config.routes.is_empty());
    assert!(config.enrichments.is_empty());

    // Re-adding a removed stream gets its log back (the directory is locked while open).
    svc.routing_add_endpoint(&stream_endpoint("alerts"))
        .await
        .unwrap();
}

#[tokio::test]
async fn route_test_answers_which_routes_match_and_what_each_endpoint_gets() {
    let hub = TestHub::start().await;
    let svc = hub.owner();
    svc.routing_add_endpoint(&stream_endpoint("alerts"))
        .await
        .unwrap();
    svc.routing_add_route(&route("hot", "temperatureAlert = 'true'", &["alerts"]))
        .await
        .unwrap();
    svc.routing_add_route(&route("json", "$body.level > 3", &["alerts", "events"]))
        .await
        .unwrap();
    svc.routing_add_enrichment(&Enrichment {
        key: "region".into(),
        value: "$twin.tags.region".into(),
        endpoints: vec!["alerts".into()],
    })
    .await
    .unwrap();
    hub.device("rt-1").await;
    svc.update_twin("rt-1", &json!({"tags": {"region": "north"}}), None)
        .await
        .unwrap();

    let mut props = Map::new();
    props.insert("temperatureAlert".into(), Value::from("true"));
    let result = svc
        .routing_test(&RouteTest {
            body: Some(r#"{"level": 5}"#.into()),
            properties: props.clone(),
            device_id: Some("rt-1".into()),
            content_type: Some("application/json".into()),
            content_encoding: Some("utf-8".into()),
            ..RouteTest::default()
        })
        .await
        .unwrap();
    assert_eq!(result.matched_routes, ["hot", "json"]);
    assert!(!result.fallback);
    let names: Vec<&str> = result.endpoints.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["events", "alerts"], "each endpoint once");
    let alerts = &result.endpoints[1];
    assert_eq!(
        alerts.properties["region"], "north",
        "enriched from the twin"
    );
    assert_eq!(alerts.properties["temperatureAlert"], "true");
    assert!(
        !result.endpoints[0].properties.contains_key("region"),
        "enrichments go only to their endpoints"
    );

    // $body is read only for JSON in a UTF encoding.
    let result = svc
        .routing_test(&RouteTest {
            body: Some(r#"{"level": 5}"#.into()),
            content_type: Some("text/plain".into()),
            ..RouteTest::default()
        })
        .await
        .unwrap();
    assert!(result.matched_routes.is_empty());
    assert!(result.fallback);
    assert_eq!(result.endpoints.len(), 1);
    assert_eq!(result.endpoints[0].name, "events");

    svc.routing_set_fallback(false).await.unwrap();
    let result = svc.routing_test(&RouteTest::default()).await.unwrap();
    assert!(!result.fallback);
    assert!(result.endpoints.is_empty(), "dropped: {result:?}");

    let (status, code, message) = refusal(
        svc.routing_test(&RouteTest {
            source: Some("Telemetry".into()),
            ..RouteTest::default()
        })
        .await,
    );
    assert_eq!((status, code), (400, Some(ErrorCode::ArgumentInvalid)));
    assert!(message.contains("DeviceMessages"), "{message}");
}

#[tokio::test]
async fn amqp_readers_find_streams_only_under_their_own_names() {
    let hub = TestHub::start().await;
    let svc = hub.owner();
    svc.routing_add_endpoint(&stream_endpoint("alerts"))
        .await
        .unwrap();
    svc.routing_add_endpoint(&RoutingEndpoint {
        name: "hook".into(),
        kind: "webhook".into(),
        url: Some("http://127.0.0.1:9/".into()),
    })
    .await
    .unwrap();

    // Unknown entities and webhook buffers are not Event Hubs: the client's $management
    // READ of the entity is answered 404.
    for name in ["nowhere", "hook"] {
        let err = reader(&hub, Some(name)).await.err().map(|e| e.to_string());
        let err = err.unwrap_or_else(|| panic!("{name} must not be readable"));
        assert!(err.contains("404"), "{name}: {err}");
    }
    // A stream has one consumer group, $Default.
    let client = EventsClient::builder(
        &hub.server()
            .hub_file
            .entity_connection_string("service", false, "alerts")
            .unwrap(),
    )
    .extra_ca_pem(std::fs::read(hub.ca_pem()).unwrap())
    .consumer_group("analytics")
    .connect()
    .await
    .unwrap();
    let refused = match client.receive(None, StartPosition::Earliest).await {
        Err(e) => e.to_string(),
        Ok(mut s) => match tokio::time::timeout(WAIT, s.next()).await {
            Ok(Some(Err(e))) => e.to_string(),
            other => panic!("expected a refusal, got {other:?}"),
        },
    };
    assert!(refused.contains("consumer group"), "{refused}");
    // A webhook's dead-letter stream is read like a stream.
    let dead_letters = reader(&hub, Some("hook-deadletter")).await.unwrap();
    assert_eq!(dead_letters.event_hub_name(), "hook-deadletter");
    assert_eq!(dead_letters.partition_ids().len(), 4);
    // The entity name is matched without case, as Event Hubs does.
    let upper = reader(&hub, Some("ALERTS")).await.unwrap();
    assert_eq!(upper.partition_ids().len(), 4);
}
