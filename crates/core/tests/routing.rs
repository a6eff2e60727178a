//! Routing in the hub over the in-memory store: device messages go where routes and the
//! fallback send them, enriched per endpoint, dropped when nothing takes them; the
//! configuration is validated, kept, and folded together with the config file's at open.

use std::sync::Arc;

use serde_json::json;
use twinhub_core::{Hub, HubOptions};
use twinhub_eventlog::EventLog;
use twinhub_proto::error::ErrorCode;
use twinhub_proto::message::Message;
use twinhub_proto::model::{Device, DeviceStatus};
use twinhub_routing::{
    EndpointKind, EndpointSpec, EnrichmentSpec, RouteSpec, RoutingConfig, Source,
};
use twinhub_store::{MemoryStore, Store};

async fn hub_over(store: Arc<MemoryStore>, file: RoutingConfig) -> Arc<Hub> {
    let mut options = HubOptions::new("hub.test", Vec::new());
    options.routing = file;
    Hub::open(store as Arc<dyn Store>, options)
        .await
        .expect("hub opens")
}

async fn hub() -> Arc<Hub> {
    let hub = hub_over(Arc::new(MemoryStore::new()), RoutingConfig::default()).await;
    hub.put_device(
        "d1",
        &Device {
            device_id: "d1".into(),
            status: DeviceStatus::Enabled,
            ..Default::default()
        },
        None,
    )
    .await
    .unwrap();
    hub
}

fn stream(name: &str) -> EndpointSpec {
    EndpointSpec {
        name: name.into(),
        kind: EndpointKind::Stream,
        url: None,
    }
}

fn route(name: &str, condition: &str, endpoint: &str) -> RouteSpec {
    RouteSpec {
        name: name.into(),
        source: Source::DeviceMessages,
        condition: condition.into(),
        endpoints: vec![endpoint.into()],
        enabled: true,
    }
}

/// Sends one telemetry message from d1 as a session would.
async fn send(hub: &Hub, bag: &str, body: &str) {
    let event = hub
        .prepare_device_telemetry(
            "d1",
            "g1",
            bag,
            body.as_bytes().to_vec(),
            Default::default(),
        )
        .unwrap();
    hub.append_telemetry("d1", vec![event]).await.unwrap();
}

/// Every message in `log`, in partition then sequence order.
async fn all(log: &Arc<dyn EventLog>) -> Vec<Message> {
    let mut out = Vec::new();
    for p in 0..log.partition_count() {
        for e in log.read(p, 0, 1000, 1 << 24).await.unwrap() {
            out.push(Message::decode(&e.data).unwrap());
        }
    }
    out
}

fn prop<'a>(m: &'a Message, key: &str) -> Option<&'a str> {
    m.application
        .iter()
        .find(|(k, _)| k == key)
        .and_then(|(_, v)| v.as_deref())
}

#[tokio::test]
async fn messages_follow_routes_the_fallback_takes_the_rest_and_without_it_they_vanish() {
    let hub = hub().await;
    hub.add_endpoint(stream("alerts")).await.unwrap();
    hub.add_endpoint(stream("hot")).await.unwrap();
    hub.add_route(route("crit", "level = 'critical'", "alerts"))
        .await
        .unwrap();
    hub.add_route(route("hot", "$body.t > 30", "hot"))
        .await
        .unwrap();
    send(&hub, "level=critical", "{}").await;
    send(
        &hub,
        "%24.ct=application%2Fjson&%24.ce=utf-8",
        r#"{"t": 31}"#,
    )
    .await;
    send(&hub, "level=info", "plain").await;
    let alerts = all(&hub.endpoint_log("alerts").unwrap()).await;
    assert_eq!(alerts.len(), 1);
    assert_eq!(prop(&alerts[0], "level"), Some("critical"));
    assert_eq!(alerts[0].stamp.device_id, "d1");
    assert_eq!(all(&hub.endpoint_log("hot").unwrap()).await.len(), 1);
    let events = all(&hub.endpoint_log("events").unwrap()).await;
    assert_eq!(
        events.len(),
        1,
        "only the unmatched one, through the fallback"
    );
    assert_eq!(prop(&events[0], "level"), Some("info"));
    hub.set_fallback(false).await.unwrap();
    send(&hub, "level=info", "gone").await;
    assert_eq!(all(&hub.endpoint_log("events").unwrap()).await.len(), 1);
}

#[tokio::test]
async fn enrichments_stamp_twin_tags_and_the_hub_name_per_endpoint() {
    let hub = hub().await;
    hub.write_twin("d1", &json!({"tags": {"region": "eu-west"}}), None, false)
        .await
        .unwrap();
    hub.add_endpoint(stream("alerts")).await.unwrap();
    hub.add_route(route("all", "true", "alerts")).await.unwrap();
    hub.add_enrichment(EnrichmentSpec {
        key: "region".into(),
        value: "$twin.tags.region".into(),
        endpoints: vec!["alerts".into()],
    })
    .await
    .unwrap();
    hub.add_enrichment(EnrichmentSpec {
        key: "hub".into(),
        value: "$iothubname".into(),
        endpoints: vec!["alerts".into()],
    })
    .await
    .unwrap();
    send(&hub, "region=spoofed", "x").await;
    let got = all(&hub.endpoint_log("alerts").unwrap()).await;
    assert_eq!(prop(&got[0], "region"), Some("eu-west"));
    assert_eq!(
        prop(&got[0], "hub"),
        Some("hub"),
        "the short hub name, as IoT Hub stamps"
    );
}

#[tokio::test]
async fn bad_changes_are_refused_and_good_ones_survive_a_reopen_merged_with_the_file() {
    let store = Arc::new(MemoryStore::new());
    let file = RoutingConfig {
        endpoints: vec![stream("fromfile")],
        routes: vec![route("filed", "true", "fromfile")],
        ..Default::default()
    };
    {
        let hub = hub_over(store.clone(), file.clone()).await;
        let err = hub
            .add_route(route("bad", "level = = 1", "fromfile"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::ArgumentInvalid);
        let err = hub
            .add_route(route("nowhere", "true", "missing"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::ArgumentInvalid);
        assert!(err.message().contains("missing"), "{}", err.message());
        hub.add_endpoint(stream("cli")).await.unwrap();
        hub.add_route(route("added", "a = 'b'", "cli"))
            .await
            .unwrap();
        // An endpoint a route names cannot go.
        assert!(hub.remove_endpoint("cli").await.is_err());
        assert!(hub.remove_route("nope").await.is_err());
    }
    let hub = hub_over(store, file).await;
    let config = hub.routing().config();
    let names: Vec<&str> = config.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["filed", "added"]);
    assert!(hub.routing().endpoint("CLI").is_some());
    let test = hub
        .test_route(Source::DeviceMessages, &{
            let mut m = Message::default();
            m.application.push(("a".into(), Some("b".into())));
            m.stamp.device_id = "d1".into();
            m
        })
        .await
        .unwrap();
    assert_eq!(test.decision.matched_routes, ["filed", "added"]);
}

#[tokio::test]
async fn a_file_configuration_that_does_not_validate_stops_the_hub() {
    let bad = RoutingConfig {
        routes: vec![route("r", "true", "nowhere")],
        ..Default::default()
    };
    let mut options = HubOptions::new("hub.test", Vec::new());
    options.routing = bad;
    let err = Hub::open(Arc::new(MemoryStore::new()) as Arc<dyn Store>, options)
        .await
        .err()
        .expect("refused");
    assert!(err.message().contains("nowhere"), "{}", err.message());
}
