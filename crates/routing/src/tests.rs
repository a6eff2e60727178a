use serde_json::json;
use twinhub_proto::message::{Message, Stamp, SystemProperties};

use super::*;

fn message(props: &[(&str, &str)], body: &str, json_body: bool) -> Message {
    Message {
        system: SystemProperties {
            message_id: Some("m1".into()),
            content_type: json_body.then(|| "application/json".to_owned()),
            content_encoding: json_body.then(|| "UTF-8".to_owned()),
            ..Default::default()
        },
        application: props
            .iter()
            .map(|(k, v)| (k.to_string(), Some(v.to_string())))
            .collect(),
        stamp: Stamp {
            device_id: "d1".into(),
            ..Default::default()
        },
        body: body.as_bytes().to_vec(),
    }
}

fn stream(name: &str) -> EndpointSpec {
    EndpointSpec {
        name: name.into(),
        kind: EndpointKind::Stream,
        url: None,
    }
}

fn route(name: &str, condition: &str, endpoints: &[&str]) -> RouteSpec {
    RouteSpec {
        name: name.into(),
        source: Source::DeviceMessages,
        condition: condition.into(),
        endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
        enabled: true,
    }
}

fn config(routes: Vec<RouteSpec>) -> RoutingConfig {
    RoutingConfig {
        endpoints: vec![stream("alerts"), stream("hot")],
        routes,
        ..Default::default()
    }
}

fn endpoints(d: &Decision) -> Vec<&str> {
    d.deliveries.iter().map(|x| x.endpoint.as_str()).collect()
}

#[test]
fn without_routes_device_messages_go_to_events_and_events_nowhere() {
    let r = Router::compile(RoutingConfig::default(), "hub").unwrap();
    let m = message(&[], "x", false);
    assert_eq!(
        endpoints(&r.decide(Source::DeviceMessages, &m, None)),
        ["events"]
    );
    assert!(r.decide(Source::TwinChangeEvents, &m, None).dropped());
}

#[test]
fn routes_match_properties_and_body_and_the_fallback_takes_the_rest() {
    let r = Router::compile(
        config(vec![
            route("a", "level = 'critical'", &["alerts"]),
            route("b", "$body.temperature > 30", &["hot"]),
        ]),
        "hub",
    )
    .unwrap();
    let crit = message(&[("level", "critical")], r#"{"temperature": 20}"#, true);
    let d = r.decide(Source::DeviceMessages, &crit, None);
    assert_eq!(endpoints(&d), ["alerts"]);
    assert_eq!(d.matched_routes, ["a"]);
    assert!(!d.fallback);
    let hot = message(&[], r#"{"temperature": 31}"#, true);
    assert_eq!(
        endpoints(&r.decide(Source::DeviceMessages, &hot, None)),
        ["hot"]
    );
    // $body is not evaluated unless the body is JSON in a UTF encoding.
    let opaque = message(&[], r#"{"temperature": 31}"#, false);
    let d = r.decide(Source::DeviceMessages, &opaque, None);
    assert!(d.fallback);
    assert_eq!(endpoints(&d), ["events"]);
    // Property names are matched ignoring case.
    let upper = message(&[("LEVEL", "critical")], "x", false);
    assert_eq!(
        endpoints(&r.decide(Source::DeviceMessages, &upper, None)),
        ["alerts"]
    );
}

#[test]
fn without_the_fallback_unmatched_messages_are_dropped() {
    let mut c = config(vec![route("a", "level = 'critical'", &["alerts"])]);
    c.fallback_enabled = false;
    let r = Router::compile(c, "hub").unwrap();
    assert!(
        r.decide(Source::DeviceMessages, &message(&[], "x", false), None)
            .dropped()
    );
}

#[test]
fn several_routes_to_one_endpoint_deliver_once_and_disabled_routes_do_nothing() {
    let mut off = route("c", "true", &["hot"]);
    off.enabled = false;
    let r = Router::compile(
        config(vec![
            route("a", "true", &["alerts", "events"]),
            route("b", "level = 'x'", &["alerts"]),
            off,
        ]),
        "hub",
    )
    .unwrap();
    let d = r.decide(
        Source::DeviceMessages,
        &message(&[("level", "x")], "", false),
        None,
    );
    assert_eq!(endpoints(&d), ["events", "alerts"]);
    assert_eq!(d.matched_routes, ["a", "b"]);
}

#[test]
fn routes_take_only_their_source() {
    let mut twin_route = route("t", "true", &["alerts"]);
    twin_route.source = Source::TwinChangeEvents;
    let r = Router::compile(config(vec![twin_route]), "hub").unwrap();
    let m = message(&[], "{}", true);
    assert_eq!(
        endpoints(&r.decide(Source::TwinChangeEvents, &m, None)),
        ["alerts"]
    );
    // Device messages meet no route of theirs: the fallback.
    assert_eq!(
        endpoints(&r.decide(Source::DeviceMessages, &m, None)),
        ["events"]
    );
    assert!(r.decide(Source::DeviceLifecycleEvents, &m, None).dropped());
}

#[test]
fn twin_conditions_and_enrichments() {
    let mut c = config(vec![route("a", "$twin.tags.region = 'eu'", &["alerts"])]);
    c.enrichments = vec![
        EnrichmentSpec {
            key: "region".into(),
            value: "$twin.tags.region".into(),
            endpoints: vec!["alerts".into()],
        },
        EnrichmentSpec {
            key: "hub".into(),
            value: "$iothubname".into(),
            endpoints: vec!["alerts".into(), "events".into()],
        },
        EnrichmentSpec {
            key: "missing".into(),
            value: "$twin.tags.nowhere".into(),
            endpoints: vec!["alerts".into()],
        },
        EnrichmentSpec {
            key: "fixed".into(),
            value: "v1".into(),
            endpoints: vec!["alerts".into()],
        },
    ];
    let r = Router::compile(c, "myhub").unwrap();
    assert!(r.needs_twin(Source::DeviceMessages));
    let twin = json!({"tags": {"region": "eu"}, "properties": {"desired": {}}});
    let d = r.decide(
        Source::DeviceMessages,
        &message(&[], "", false),
        Some(&twin),
    );
    assert_eq!(endpoints(&d), ["alerts"]);
    assert_eq!(
        d.deliveries[0].enrichments,
        vec![
            ("region".to_string(), "eu".to_string()),
            ("hub".to_string(), "myhub".to_string()),
            ("missing".to_string(), "$twin.tags.nowhere".to_string()),
            ("fixed".to_string(), "v1".to_string()),
        ]
    );
    // Elsewhere the fallback, with the events endpoint's own enrichment.
    let other = json!({"tags": {"region": "us"}});
    let d = r.decide(
        Source::DeviceMessages,
        &message(&[], "", false),
        Some(&other),
    );
    assert_eq!(endpoints(&d), ["events"]);
    assert_eq!(
        d.deliveries[0].enrichments,
        vec![("hub".to_string(), "myhub".to_string())]
    );
}

#[test]
fn bad_configurations_are_refused_with_the_reason() {
    let unknown = config(vec![route("a", "true", &["nowhere"])]);
    assert!(matches!(
        Router::compile(unknown, "h"),
        Err(RoutingError::UnknownEndpoint { .. })
    ));
    let bad = config(vec![route("a", "level = = 3", &["alerts"])]);
    assert!(matches!(
        Router::compile(bad, "h"),
        Err(RoutingError::Condition { .. })
    ));
    let mut reserved = RoutingConfig::default();
    reserved.endpoints.push(stream("events"));
    assert!(Router::compile(reserved, "h").is_err());
    let mut no_url = RoutingConfig::default();
    no_url.endpoints.push(EndpointSpec {
        name: "w".into(),
        kind: EndpointKind::Webhook,
        url: None,
    });
    assert!(Router::compile(no_url, "h").is_err());
    let mut many = RoutingConfig::default();
    for i in 0..=MAX_ENRICHMENTS {
        many.enrichments.push(EnrichmentSpec {
            key: format!("k{i}"),
            value: "v".into(),
            endpoints: vec!["events".into()],
        });
    }
    assert!(Router::compile(many, "h").is_err());
    let twice = config(vec![
        route("a", "true", &["alerts"]),
        route("A", "true", &["hot"]),
    ]);
    assert!(Router::compile(twice, "h").is_err());
    let bad_name = config(vec![route("a b", "true", &["alerts"])]);
    assert!(Router::compile(bad_name, "h").is_err());
}

#[test]
fn the_configuration_reads_from_toml_shaped_json_with_defaults() {
    let c: RoutingConfig = serde_json::from_value(json!({
        "endpoints": [{"name": "alerts", "kind": "stream"}, {"name": "hook", "kind": "webhook", "url": "http://127.0.0.1:9/x"}],
        "routes": [{"name": "r", "source": "DeviceMessages", "endpoints": ["alerts"]}],
    }))
    .unwrap();
    assert!(c.fallback_enabled);
    assert_eq!(c.routes[0].condition, "true");
    assert!(c.routes[0].enabled);
    Router::compile(c, "h").unwrap();
    assert_eq!(
        Source::parse("twinchangeevents"),
        Some(Source::TwinChangeEvents)
    );
}
