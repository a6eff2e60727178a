"""Message routing and hub events with the official SDKs, unchanged (issue 12).

azure-iot-device 2.14.0 devices send telemetry with application properties and JSON bodies; the
routes, endpoints and enrichments come from the `serve --config` TOML file (`[[endpoints]]`,
`[[routes]]`, `[[enrichments]]`, `[fallback]`), from the `twinhub endpoint|route|enrichment`
commands and from the REST API; azure-eventhub 5.15.1 reads the built-in `events` endpoint and
the `stream` endpoints twinhub hosts (`EntityPath=<endpoint name>`, the connection string of
`twinhub connection-string --events --entity NAME`); a webhook endpoint posts to an HTTP server
run by the test; azure-iot-hub 2.7.0 changes twins and identities for the system events. The
semantics checked are IoT Hub's (messaging-protocol D).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
from azure.iot.hub.models import Twin, TwinProperties

from harness import Hub, assert_iothub_error, unique_id, wait_until
from routelib import (
    StreamReader,
    WebhookServer,
    cli_ok,
    cli_run,
    events_cs,
    message,
    metric,
    metrics_text,
    of_device,
    props,
    read_to_end,
    route,
    stream,
    stream_cs,
    sysprops,
    tag_of,
    text,
    webhook,
    write_config,
)

pytestmark = pytest.mark.device


def hub_name(hub: Hub) -> str:
    """The hub's name as IoT Hub writes it in `hubName`, `user-id` and `$iothubname`: the first
    DNS label of the host name; twinhub names a hub on an IP address or localhost `twinhub`
    (as it names its Event Hub-compatible entity)."""
    host = hub.hostname
    first = host.split(".")[0]
    if re.fullmatch(r"[0-9.]+", host) or ":" in host or first.lower() == "localhost":
        return "twinhub"
    return first.lower()


def tags(events: list) -> list[str]:
    return [tag_of(e) for e in events]


def start_hub(hub_factory, tmp_path: Path, name: str = "routing.toml", **tables: Any) -> Hub:
    """A hub of the test's own, serving with a routing config file."""
    path = write_config(tmp_path / name, **tables)
    return hub_factory(extra_args=("--config", str(path)))


def connect(device_client, hub: Hub, device_id: str):
    client = device_client(hub.device_cs(device_id))
    client.connect()
    return client


# ---- routes, the fallback, dropped messages --------------------------------------------------


def test_routes_on_a_property_and_on_the_body_deliver_to_streams_and_the_fallback_takes_the_rest(
    hub_factory, device_client, tmp_path
):
    hub = start_hub(
        hub_factory,
        tmp_path,
        endpoints=[stream("alerts"), stream("hot")],
        routes=[
            route("critical", "level = 'critical'", ["alerts"]),
            route("hot", "$body.temperature > 30", ["hot"]),
            # Also to alerts: a message matching both routes reaches alerts once.
            route("very-hot", "$body.temperature > 39", ["alerts"]),
        ],
    )
    device_id = unique_id("route")
    client = connect(device_client, hub, device_id)
    sent = {
        "crit": message("crit", {"temperature": 20}, level="critical"),
        "hot": message("hot", {"temperature": 35}, level="info"),
        "both": message("both", {"temperature": 40}, level="critical"),
        "plain": message("plain", {"temperature": 20}, level="info"),
        # $body is evaluated only for JSON in a UTF encoding: this one goes to the fallback.
        "hot-text": message("hot-text", '{"temperature": 35}', json_body=False),
        # Undefined is false: no temperature, no level.
        "none": message("none", {"humidity": 50}),
    }
    for m in sent.values():
        client.send_message(m)  # returns after the PUBACK: every append is durable

    alerts = read_to_end(hub, "alerts")
    hot = read_to_end(hub, "hot")
    events = read_to_end(hub)
    assert sorted(tags(of_device(alerts, device_id))) == ["both", "crit"]
    assert sorted(tags(of_device(hot, device_id))) == ["both", "hot"]
    assert sorted(tags(of_device(events, device_id))) == ["hot-text", "none", "plain"]

    # Each copy is the message as sent: body, system and application properties, annotations.
    [crit] = [e for e in alerts if tag_of(e) == "crit"]
    assert json.loads(crit.body_as_str()) == {"temperature": 20}
    assert props(crit) == {"tag": "crit", "level": "critical"}
    sp = sysprops(crit)
    assert text(sp["message-id"]) == sent["crit"].message_id
    assert text(sp["content-type"]) == "application/json"
    assert text(sp["content-encoding"]) == "utf-8"
    assert text(sp["iothub-message-source"]) == "Telemetry"
    assert text(sp["iothub-connection-device-id"]) == device_id
    assert "iothub-enqueuedtime" in sp and "iothub-connection-auth-generation-id" in sp
    assert isinstance(crit.sequence_number, int) and crit.offset.isdigit()
    [both_hot] = [e for e in hot if tag_of(e) == "both"]
    assert text(sysprops(both_hot)["message-id"]) == sent["both"].message_id

    # Per-route and per-endpoint counts.
    m = metrics_text(hub)
    assert metric(m, "twinhub_route_matched_total", route="critical") == 2, m
    assert metric(m, "twinhub_route_matched_total", route="hot") == 2, m
    assert metric(m, "twinhub_route_matched_total", route="very-hot") == 1, m
    assert metric(m, "twinhub_endpoint_messages_total", endpoint="alerts") == 2, m
    assert metric(m, "twinhub_endpoint_messages_total", endpoint="hot") == 2, m

    # The fallback off (CLI): unmatched messages vanish, and /metrics counts them.
    dropped_before = metric(metrics_text(hub), "twinhub_routing_dropped_total", source="DeviceMessages")
    cli_ok(hub, "route", "fallback", "off")
    client.send_message(message("dropped-1", {"temperature": 1}))
    client.send_message(message("dropped-2", {"temperature": 2}, level="info"))
    client.send_message(message("crit-2", {"temperature": 2}, level="critical"))
    assert "crit-2" in tags(of_device(read_to_end(hub, "alerts"), device_id))
    after = tags(of_device(read_to_end(hub), device_id))
    assert sorted(after) == ["hot-text", "none", "plain"], f"events got {after} with the fallback off"
    wait_until(
        lambda: metric(metrics_text(hub), "twinhub_routing_dropped_total", source="DeviceMessages")
        >= dropped_before + 2,
        10,
        what="twinhub_routing_dropped_total{source=DeviceMessages} to count the two dropped messages",
    )
    assert (
        metric(metrics_text(hub), "twinhub_routing_dropped_total", source="DeviceMessages")
        == dropped_before + 2
    )

    # And on again through REST: unmatched messages reach events once more.
    r = hub.rest("PUT", "/twinhub/routing/fallback", json_body={"enabled": True})
    assert r.status_code in (200, 204), f"PUT /twinhub/routing/fallback -> {r.status_code} {r.text[:300]!r}"
    client.send_message(message("back", {"temperature": 3}))
    assert sorted(tags(of_device(read_to_end(hub), device_id))) == ["back", "hot-text", "none", "plain"]


def test_routes_added_and_removed_at_run_time_take_effect_at_once(hub_factory, device_client, tmp_path):
    """No restart: the CLI adds a stream and a route; the next message follows them; removing
    the route sends the next one to the fallback again."""
    hub = start_hub(hub_factory, tmp_path)
    device_id = unique_id("rtadd")
    client = connect(device_client, hub, device_id)
    client.send_message(message("before", {"temperature": 50}))
    cli_ok(hub, "endpoint", "add", "late", "--kind", "stream")
    cli_ok(hub, "route", "add", "late-route", "--source", "DeviceMessages", "--condition",
           "$body.temperature >= 50", "--endpoint", "late")
    client.send_message(message("routed", {"temperature": 50}))
    client.send_message(message("fallback", {"temperature": 10}))
    assert tags(of_device(read_to_end(hub, "late"), device_id)) == ["routed"]
    assert tags(of_device(read_to_end(hub), device_id)) == ["before", "fallback"]
    assert json.loads(cli_ok(hub, "route", "list")) == [
        {
            "name": "late-route",
            "source": "DeviceMessages",
            "condition": "$body.temperature >= 50",
            "endpoints": ["late"],
            "enabled": True,
        }
    ]
    assert json.loads(cli_ok(hub, "endpoint", "list")) == [{"name": "late", "kind": "stream"}]

    cli_ok(hub, "route", "remove", "late-route")
    assert json.loads(cli_ok(hub, "route", "list")) == []
    client.send_message(message("after", {"temperature": 60}))
    assert tags(of_device(read_to_end(hub, "late"), device_id)) == ["routed"]
    # With no route left, every device message goes to events again.
    assert tags(of_device(read_to_end(hub), device_id)) == ["before", "fallback", "after"]


# ---- enrichments ------------------------------------------------------------------------------


def test_enrichments_from_twin_tags_and_the_hub_name_show_as_application_properties(
    hub_factory, device_client, tmp_path
):
    """Also a route condition on $twin: the twin as it is when the message arrives."""
    hub = start_hub(
        hub_factory,
        tmp_path,
        endpoints=[stream("enriched"), stream("emea")],
        routes=[route("all", "true", ["enriched"]), route("in-emea", "$twin.tags.region = 'emea'", ["emea"])],
        enrichments=[
            {"key": "region", "value": "$twin.tags.region", "endpoints": ["enriched"]},
            {"key": "hub", "value": "$iothubname", "endpoints": ["enriched"]},
        ],
    )
    # One more from the CLI: a static value, and a desired property.
    cli_ok(hub, "enrichment", "add", "fleet", "north-sea", "--endpoint", "enriched")
    cli_ok(hub, "enrichment", "add", "fw", "$twin.properties.desired.fw", "--endpoint", "enriched")
    listed = json.loads(cli_ok(hub, "enrichment", "list"))
    assert [(e["key"], e["value"], e["endpoints"]) for e in listed] == [
        ("region", "$twin.tags.region", ["enriched"]),
        ("hub", "$iothubname", ["enriched"]),
        ("fleet", "north-sea", ["enriched"]),
        ("fw", "$twin.properties.desired.fw", ["enriched"]),
    ], listed

    rm = hub.registry()
    tagged = unique_id("enr")
    hub.device_cs(tagged)
    rm.update_twin(tagged, Twin(tags={"region": "emea"}, properties=TwinProperties(desired={"fw": "1.2"})))
    bare = unique_id("enrbare")
    clients = {did: connect(device_client, hub, did) for did in (tagged, bare)}
    for did, client in clients.items():
        client.send_message(message(f"{did}-m", {"temperature": 1}, tornado="yes"))

    got = read_to_end(hub, "enriched")
    [t] = of_device(got, tagged)
    p = props(t)
    assert p["region"] == "emea", p
    assert p["fw"] == "1.2", p
    assert p["fleet"] == "north-sea", p
    assert p["hub"] == hub_name(hub), f"$iothubname gave {p['hub']!r}, hubName of events is {hub_name(hub)!r}"
    assert p["tornado"] == "yes" and p["tag"] == f"{tagged}-m", p
    assert json.loads(t.body_as_str()) == {"temperature": 1}
    # A missing path is stamped literally, as IoT Hub does.
    [b] = of_device(got, bare)
    pb = props(b)
    assert pb["region"] == "$twin.tags.region", pb
    assert pb["fw"] == "$twin.properties.desired.fw", pb
    # "Test route" reads the named device's twin.
    out = json.loads(cli_ok(hub, "route", "test", "--source", "DeviceMessages", "--device", tagged))
    assert out["matchedRoutes"] == ["all", "in-emea"], out
    by_name = {e["name"]: e["properties"] for e in out["endpoints"]}
    assert by_name["enriched"]["region"] == "emea" and by_name["enriched"]["hub"] == hub_name(hub), out
    assert by_name["emea"] == {}, out

    # A tag changed later is what the next message gets, in conditions and enrichments.
    rm.update_twin(tagged, Twin(tags={"region": "apac"}))
    clients[tagged].send_message(message("later", {"temperature": 2}))
    later = [e for e in of_device(read_to_end(hub, "enriched"), tagged) if tag_of(e) == "later"]
    assert [props(e)["region"] for e in later] == ["apac"]
    assert tags(of_device(read_to_end(hub, "emea"), tagged)) == [f"{tagged}-m"]
    assert not of_device(read_to_end(hub, "emea"), bare)

    # Enrichments apply per endpoint: the copies at events (none routed there) carry none.
    cli_ok(hub, "route", "add", "to-events", "--source", "DeviceMessages", "--condition", "true",
           "--endpoint", "events")
    clients[bare].send_message(message("both-endpoints", {"temperature": 3}))
    [plain] = [e for e in of_device(read_to_end(hub), bare) if tag_of(e) == "both-endpoints"]
    assert not {"region", "hub", "fleet", "fw"} & set(props(plain)), props(plain)
    [rich] = [e for e in of_device(read_to_end(hub, "enriched"), bare) if tag_of(e) == "both-endpoints"]
    assert props(rich)["fleet"] == "north-sea"


# ---- webhooks --------------------------------------------------------------------------------

CE_REQUIRED = ("ce-specversion", "ce-id", "ce-source", "ce-type", "ce-time")


def webhook_hub(
    hub_factory, tmp_path: Path, server: WebhookServer, settings: dict[str, Any] | None = None
) -> Hub:
    return start_hub(
        hub_factory,
        tmp_path,
        endpoints=[webhook("hook", server.url), stream("side")],
        routes=[
            route("to-hook", "kind = 'hook'", ["hook"]),
            route("to-side", "kind = 'side'", ["side"]),
        ],
        settings=WEBHOOK_SETTINGS if settings is None else settings,
    )


# Fast retries for the tests (the hub's config keys); the built-in schedule takes minutes.
WEBHOOK_SETTINGS: dict[str, Any] = {
    "webhook_max_attempts": 3,
    "webhook_initial_backoff_ms": 100,
    "webhook_max_backoff_ms": 200,
}
# Retries that outlast the recovery test's outage (seconds), still quick once it ends.
PATIENT_WEBHOOK_SETTINGS: dict[str, Any] = {
    "webhook_max_attempts": 200,
    "webhook_initial_backoff_ms": 100,
    "webhook_max_backoff_ms": 500,
    "webhook_max_retry_secs": 120,
}


def ce_tags(requests_: list[dict[str, Any]]) -> list[str]:
    return [r["headers"].get("ce-tag") for r in requests_]


def test_a_webhook_gets_each_matching_message_in_cloudevents_binary_mode(
    hub_factory, device_client, tmp_path
):
    server = WebhookServer()
    try:
        hub = webhook_hub(hub_factory, tmp_path, server)
        device_id = unique_id("hook")
        client = connect(device_client, hub, device_id)
        sent = []
        for i in range(3):
            m = message(
                f"h{i}", {"temperature": 30 + i}, kind="hook", severity="high", **{"Temp-Alert": "very hot"}
            )
            m.correlation_id = f"corr-{i}"
            client.send_message(m)
            sent.append(m)
        client.send_message(message("not-hook", {"temperature": 1}, kind="other"))

        got = server.wait_for(lambda rs: {"h0", "h1", "h2"} <= set(ce_tags(rs)), 30, what="3 posts")
        by_tag = {r["headers"].get("ce-tag"): r for r in got}
        assert "not-hook" not in by_tag
        ids = set()
        for i, m in enumerate(sent):
            r = by_tag[f"h{i}"]
            h = r["headers"]
            assert r["method"] == "POST" and r["path"] == "/hook", r
            for name in CE_REQUIRED:
                assert h.get(name), f"no {name} header: {h}"
            assert h["ce-specversion"] == "1.0", h
            assert json.loads(r["body"]) == {"temperature": 30 + i}, r["body"]
            assert h.get("content-type", "").startswith("application/json"), h
            # Application properties as ce- extension headers.
            assert h.get("ce-kind") == "hook" and h.get("ce-severity") == "high", h
            # CloudEvents names are lower-case a-z0-9; values percent-encoded (the HTTP binding).
            assert h.get("ce-tempalert") == "very%20hot", h
            # The message id is the event id; the device is the subject and in the source.
            assert h["ce-id"] == m.message_id, h
            ids.add(h["ce-id"])
            assert h["ce-source"] == f"/twinhub/{hub_name(hub)}/devices/{device_id}", h
            assert h["ce-type"] == "Microsoft.Devices.DeviceTelemetry", h
            assert h.get("ce-subject") == device_id, h
            assert h.get("ce-iothubconnectiondeviceid") == device_id, h
            assert h.get("ce-iothubcorrelationid") == f"corr-{i}", h
            assert h.get("ce-iothubcontentencoding") == "utf-8", h
            # ce-time is RFC 3339.
            assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$", h["ce-time"]), h
        assert len(ids) == 3, f"ce-id must differ per message: {ids}"
        # Exactly once while the server answers 200.
        time.sleep(1.0)
        tags_now = ce_tags(server.snapshot())
        assert sorted(tags_now) == ["h0", "h1", "h2"], tags_now
        m = metrics_text(hub)
        assert metric(m, "twinhub_webhook_delivered_total", endpoint="hook") == 3, m
        assert metric(m, "twinhub_webhook_retried_total", endpoint="hook") == 0, m
        assert metric(m, "twinhub_webhook_delivery_lag_seconds_count", endpoint="hook") == 3, m
    finally:
        server.close()


def test_a_failing_webhook_gets_its_messages_after_it_recovers_and_other_endpoints_keep_flowing(
    hub_factory, device_client, tmp_path
):
    server = WebhookServer()
    failing = {"on": True}
    server.policy = lambda req: 503 if failing["on"] else 200
    try:
        hub = webhook_hub(hub_factory, tmp_path, server, PATIENT_WEBHOOK_SETTINGS)
        device_id = unique_id("hookrec")
        client = connect(device_client, hub, device_id)
        for i in range(3):
            client.send_message(message(f"r{i}", {"i": i}, kind="hook"))
        # The hub tries, gets 503, and tries again.
        server.wait_for(lambda rs: len(rs) >= 4, 30, what="the hub retrying on 503")
        # Meanwhile the device's other messages reach their stream at once.
        t0 = time.monotonic()
        for i in range(3):
            client.send_message(message(f"s{i}", {"i": i}, kind="side"))
        side = StreamReader(hub, "side")
        try:
            side.wait_tags(device_id, {"s0", "s1", "s2"}, timeout=15)
        finally:
            side.close()
        assert time.monotonic() - t0 < 15
        assert not server.accepted(), "nothing may be accepted while the server answers 503"

        failing["on"] = False
        got = server.wait_for(
            lambda rs: {"r0", "r1", "r2"} <= set(ce_tags([r for r in rs if r["status"] == 200])),
            120,
            what="the three messages after the webhook recovered",
        )
        ok = [r for r in got if r["status"] == 200]
        assert {json.loads(r["body"])["i"] for r in ok} == {0, 1, 2}
        m = metrics_text(hub)
        assert metric(m, "twinhub_webhook_delivered_total", endpoint="hook") >= 3, m
        refused = len([r for r in server.snapshot() if r["status"] == 503])
        assert metric(m, "twinhub_webhook_retried_total", endpoint="hook") == refused, (refused, m)
        # Nothing was dead-lettered.
        assert not of_device(read_to_end(hub, "hook-deadletter"), device_id)
    finally:
        server.close()


# With WEBHOOK_SETTINGS a message that always gets a 500 is dead-lettered after 3 attempts
# within a second (the hub's defaults would take 1 to 2 minutes).
@pytest.mark.parametrize("status", [500, 400])
def test_a_webhook_that_never_recovers_dead_letters_its_messages(
    hub_factory, device_client, tmp_path, status
):
    server = WebhookServer()
    server.policy = lambda req: status
    try:
        hub = webhook_hub(hub_factory, tmp_path, server)
        device_id = unique_id("hookdl")
        client = connect(device_client, hub, device_id)
        sent = {}
        for i in range(2):
            m = message(f"d{i}", {"i": i}, kind="hook", note="x y")
            client.send_message(m)
            sent[f"d{i}"] = m
        client.send_message(message("s0", {"i": 0}, kind="side"))
        # The stream endpoint is not held up by the failing webhook.
        side = StreamReader(hub, "side")
        try:
            side.wait_tags(device_id, {"s0"}, timeout=15)
        finally:
            side.close()
        dl = StreamReader(hub, "hook-deadletter")
        try:
            got = dl.wait_tags(device_id, {"d0", "d1"}, timeout=240)
        finally:
            dl.close()
        assert sorted(tags(got)) == ["d0", "d1"], tags(got)
        for e in got:
            tag = tag_of(e)
            m = sent[tag]
            assert json.loads(e.body_as_str()) == {"i": int(tag[1:])}
            p = props(e)
            assert p["kind"] == "hook" and p["note"] == "x y", p
            assert str(status) in p.get("webhook-error", ""), p
            attempts = [r for r in server.snapshot() if r["headers"].get("ce-tag") == tag]
            assert p.get("webhook-attempts") == str(len(attempts)), (p, len(attempts))
            if status == 400:
                assert len(attempts) == 1, f"a 400 is final, yet it was tried {len(attempts)} times"
            else:
                assert len(attempts) >= 2, f"a 500 must be retried before dead-lettering: {len(attempts)}"
            sp = sysprops(e)
            assert text(sp["message-id"]) == m.message_id, sp
            assert text(sp["iothub-connection-device-id"]) == device_id, sp
            assert text(sp["iothub-message-source"]) == "Telemetry", sp
        m = metrics_text(hub)
        assert metric(m, "twinhub_webhook_dead_lettered_total", endpoint="hook") == 2, m
        assert metric(m, "twinhub_webhook_delivered_total", endpoint="hook") == 0, m
        assert tags(of_device(read_to_end(hub, "side"), device_id)) == ["s0"]
    finally:
        server.close()


# ---- system events ---------------------------------------------------------------------------

OP_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{7}Z$")
SEQ = re.compile(r"^[0-9A-Fa-f]{64}$")


def check_system_event(e: Any, hub: Hub, device_id: str, source: str, schema: str) -> dict[str, Any]:
    """The common shape of a system event (messaging-protocol D); returns its parsed body."""
    __tracebackhide__ = True
    p = props(e)
    sp = sysprops(e)
    assert p.get("hubName") == hub_name(hub), p
    assert p.get("deviceId") == device_id, p
    assert p.get("iothub-message-schema") == schema, p
    assert OP_TIMESTAMP.match(p.get("operationTimestamp", "")), p
    assert text(sp.get("iothub-message-source")) == source, sp
    assert text(sp.get("iothub-connection-device-id")) == device_id, sp
    assert "iothub-enqueuedtime" in sp, sp
    assert text(sp.get("content-type")) == "application/json", sp
    assert text(sp.get("content-encoding")) == "utf-8", sp
    assert sp.get("correlation-id"), sp
    assert text(sp.get("user-id")) == hub_name(hub), sp
    return json.loads(e.body_as_str())


def test_twin_lifecycle_and_connection_state_events_reach_a_stream(hub_factory, device_client, tmp_path):
    hub = start_hub(
        hub_factory,
        tmp_path,
        endpoints=[stream("hubevents")],
        routes=[
            route("twins", "true", ["hubevents"], source="TwinChangeEvents"),
            route("life", "true", ["hubevents"], source="DeviceLifecycleEvents"),
            route("conn", "true", ["hubevents"], source="DeviceConnectionStateEvents"),
        ],
    )
    reader = StreamReader(hub, "hubevents")
    try:
        rm = hub.registry()
        device_id = unique_id("sysev")
        created = rm.create_device_with_sas(device_id, None, None, "enabled")

        def ops(evs: list) -> list[str]:
            return [props(e).get("opType") for e in of_device(evs, device_id)]

        reader.wait_for(lambda evs: "createDeviceIdentity" in ops(evs), what="createDeviceIdentity")

        rm.update_twin(
            device_id, Twin(tags={"site": "lab"}, properties=TwinProperties(desired={"setpoint": 21}))
        )
        reader.wait_for(lambda evs: ops(evs).count("updateTwin") >= 1, what="updateTwin (service patch)")
        rm.replace_twin(
            device_id, Twin(tags={"site": "plant"}, properties=TwinProperties(desired={"setpoint": 22}))
        )
        reader.wait_for(lambda evs: "replaceTwin" in ops(evs), what="replaceTwin")

        client = device_client(hub.device_cs_for(device_id, created.authentication.symmetric_key.primary_key))
        client.connect()
        reader.wait_for(lambda evs: "deviceConnected" in ops(evs), what="deviceConnected")
        client.patch_twin_reported_properties({"fw": "2.0"})
        reader.wait_for(lambda evs: ops(evs).count("updateTwin") >= 2, what="updateTwin (reported patch)")
        client.disconnect()
        reader.wait_for(lambda evs: "deviceDisconnected" in ops(evs), what="deviceDisconnected")
        client.connect()
        client.disconnect()
        reader.wait_for(lambda evs: ops(evs).count("deviceDisconnected") >= 2, what="a second disconnect")
        rm.delete_device(device_id)
        reader.wait_for(lambda evs: "deleteDeviceIdentity" in ops(evs), what="deleteDeviceIdentity")
        # Telemetry has no route to this stream.
        evs = of_device(reader.snapshot(), device_id)
    finally:
        reader.close()

    order = [props(e).get("opType") for e in evs]
    assert order == [
        "createDeviceIdentity",
        "updateTwin",
        "replaceTwin",
        "deviceConnected",
        "updateTwin",
        "deviceDisconnected",
        "deviceConnected",
        "deviceDisconnected",
        "deleteDeviceIdentity",
    ], order

    # Lifecycle: the twin as the body.
    create, delete = evs[0], evs[-1]
    for e in (create, delete):
        body = check_system_event(e, hub, device_id, "deviceLifecycleEvents", "deviceLifecycleNotification")
        assert body["deviceId"] == device_id, body
        assert body.get("etag") and isinstance(body.get("version"), int), body
        desired = body["properties"]["desired"]
        assert "$metadata" in desired and "$version" in desired, body
        assert "reported" in body["properties"], body
    assert json.loads(delete.body_as_str())["properties"]["reported"].get("fw") == "2.0"

    # Twin changes: the change (updateTwin) or the whole twin (replaceTwin).
    service_patch, replace, reported_patch = evs[1], evs[2], evs[4]
    body = check_system_event(service_patch, hub, device_id, "twinChangeEvents", "twinChangeNotification")
    assert isinstance(body.get("version"), int), body
    assert body.get("tags") == {"site": "lab"}, body
    d = body["properties"]["desired"]
    assert d["setpoint"] == 21 and "$version" in d and "$metadata" in d, body
    body = check_system_event(replace, hub, device_id, "twinChangeEvents", "twinChangeNotification")
    assert body["deviceId"] == device_id and body.get("etag"), body
    assert body["tags"] == {"site": "plant"} and body["properties"]["desired"]["setpoint"] == 22, body
    body = check_system_event(reported_patch, hub, device_id, "twinChangeEvents", "twinChangeNotification")
    r = body["properties"]["reported"]
    assert r["fw"] == "2.0" and "$version" in r and "$metadata" in r, body
    assert "desired" not in body["properties"], body

    # Connection state: a strictly increasing 64-hex-digit sequence number.
    seqs = []
    for e in (evs[3], evs[5], evs[6], evs[7]):
        body = check_system_event(
            e, hub, device_id, "deviceConnectionStateEvents", "deviceConnectionStateNotification"
        )
        assert set(body) == {"sequenceNumber"} and SEQ.match(body["sequenceNumber"]), body
        seqs.append(body["sequenceNumber"])
    assert seqs == sorted(seqs) and len(set(seqs)) == 4, seqs
    assert [int(s, 16) for s in seqs] == sorted(int(s, 16) for s in seqs)


def test_system_events_go_nowhere_without_a_route_and_never_to_events(hub_factory, device_client, tmp_path):
    """Only a route for its source takes a system event; the fallback is for device messages."""
    hub = start_hub(
        hub_factory,
        tmp_path,
        endpoints=[stream("lifeonly")],
        routes=[route("life", "true", ["lifeonly"], source="DeviceLifecycleEvents")],
    )
    rm = hub.registry()
    device_id = unique_id("sysnone")
    rm.create_device_with_sas(device_id, None, None, "enabled")
    rm.update_twin(device_id, Twin(tags={"x": 1}))
    connect(device_client, hub, device_id).send_message(message("t", {"temperature": 1}))
    got = of_device(read_to_end(hub, "lifeonly"), device_id)
    assert [props(e).get("opType") for e in got] == ["createDeviceIdentity"]
    assert tags(of_device(read_to_end(hub), device_id)) == ["t"]


# ---- durability, route test, refusals --------------------------------------------------------


def test_routes_from_the_file_and_the_cli_survive_a_restart(hub_factory, device_client, tmp_path):
    hub = start_hub(
        hub_factory,
        tmp_path,
        endpoints=[stream("alerts")],
        routes=[route("critical", "level = 'critical'", ["alerts"])],
    )
    cli_ok(hub, "endpoint", "add", "cold", "--kind", "stream")
    cli_ok(hub, "route", "add", "cold-route", "--source", "DeviceMessages", "--condition",
           "$body.temperature < 0", "--endpoint", "cold")
    cli_ok(hub, "enrichment", "add", "site", "lab-7", "--endpoint", "cold")
    device_id = unique_id("rtdur")
    client = connect(device_client, hub, device_id)
    client.send_message(message("cold-1", {"temperature": -5}))
    client.disconnect()

    assert hub.restart() == 0
    def names(what: str, key: str = "name") -> list[str]:
        return [x[key] for x in json.loads(cli_ok(hub, what, "list"))]

    assert names("route") == ["critical", "cold-route"]
    assert names("endpoint") == ["alerts", "cold"]
    assert names("enrichment", "key") == ["site"]

    client.connect()
    client.send_message(message("cold-2", {"temperature": -9}))
    client.send_message(message("crit", {"temperature": 5}, level="critical"))
    client.send_message(message("plain", {"temperature": 5}))
    cold = of_device(read_to_end(hub, "cold"), device_id)
    assert tags(cold) == ["cold-1", "cold-2"], "the stream kept what it held and routes again"
    assert all(props(e)["site"] == "lab-7" for e in cold)
    assert tags(of_device(read_to_end(hub, "alerts"), device_id)) == ["crit"]
    assert tags(of_device(read_to_end(hub), device_id)) == ["plain"]

    # The portal's "Test route": which routes match, and what each endpoint would get.
    out = json.loads(
        cli_ok(hub, "route", "test", "--source", "DeviceMessages", "--property", "level=critical")
    )
    assert out["matchedRoutes"] == ["critical"] and out["fallback"] is False, out
    assert out["endpoints"] == [{"name": "alerts", "properties": {"level": "critical"}}], out
    out = json.loads(
        cli_ok(
            hub, "route", "test", "--source", "DeviceMessages", "--body", '{"temperature": -1}',
            "--content-type", "application/json", "--content-encoding", "utf-8", "--property", "level=info",
        )
    )
    assert out["matchedRoutes"] == ["cold-route"], out
    assert out["endpoints"] == [{"name": "cold", "properties": {"level": "info", "site": "lab-7"}}], out
    # $body is read only for JSON in a UTF encoding: without a content type, the fallback.
    out = json.loads(
        cli_ok(hub, "route", "test", "--source", "DeviceMessages", "--body", '{"temperature": -1}')
    )
    assert out["matchedRoutes"] == [] and out["fallback"] is True, out
    assert [e["name"] for e in out["endpoints"]] == ["events"], out


REFUSALS = [
    (
        ("route", "add", "r1", "--source", "DeviceMessages", "--condition", "true", "--endpoint", "nosuch"),
        "route r1 names endpoint nosuch, which does not exist",
    ),
    (
        ("route", "add", "r2", "--source", "DeviceMessages", "--condition", "level = = 'x'",
         "--endpoint", "alerts"),
        "route r2: the condition does not parse",
    ),
    (("route", "add", "r3", "--source", "NoSuchSource", "--endpoint", "alerts"), "NoSuchSource"),
    (("route", "add", "bad name!", "--source", "DeviceMessages", "--endpoint", "alerts"), "is invalid"),
    (
        ("route", "add", "used", "--source", "DeviceMessages", "--endpoint", "alerts"),
        "route used already exists",
    ),
    (("route", "remove", "nosuch"), "does not exist"),
    (("endpoint", "add", "w", "--kind", "webhook"), "a webhook needs a url"),
    (
        ("endpoint", "add", "w", "--kind", "webhook", "--url", "ftp://x"),
        "must start with http:// or https://",
    ),
    (("endpoint", "add", "alerts", "--kind", "stream"), "endpoint alerts already exists"),
    (("endpoint", "remove", "alerts"), "used by route used"),
    (("enrichment", "add", "k", "v", "--endpoint", "nosuch"), "enrichment k names endpoint nosuch"),
]


def test_a_route_naming_an_unknown_endpoint_or_an_invalid_condition_is_refused(hub_factory, tmp_path):
    """The CLI exits non-zero with the hub's reason on one line; nothing refused is kept. The
    REST API answers the same refusals as IoT Hub errors."""
    hub = start_hub(
        hub_factory, tmp_path, endpoints=[stream("alerts")], routes=[route("used", "true", ["alerts"])]
    )
    before = {w: cli_ok(hub, w, "list") for w in ("route", "endpoint", "enrichment")}
    for args, reason in REFUSALS:
        res = cli_run(hub, *args)
        assert res.returncode != 0, f"`twinhub {' '.join(args)}` succeeded: {res.stdout}"
        assert reason in res.stderr, f"`twinhub {' '.join(args)}`: {res.stderr!r}"
        assert len(res.stderr.strip().splitlines()) == 1, f"not one clear line: {res.stderr!r}"
        assert res.stdout == "", res.stdout
    assert {w: cli_ok(hub, w, "list") for w in before} == before, "a refused change was kept"

    r = hub.rest(
        "PUT",
        "/twinhub/routing/routes/r9",
        json_body={"source": "DeviceMessages", "condition": "true", "endpoints": ["nosuch"]},
    )
    body = assert_iothub_error(r, 400)
    assert "nosuch" in json.dumps(body), body
    r = hub.rest(
        "PUT",
        "/twinhub/routing/routes/r9",
        json_body={"source": "DeviceMessages", "condition": "$body.a >", "endpoints": ["alerts"]},
    )
    assert_iothub_error(r, 400)
    # Reading needs only RegistryRead; changing needs RegistryWrite.
    assert hub.rest("GET", "/twinhub/routing", policy="registryRead").status_code == 200
    r = hub.rest("PUT", "/twinhub/routing/fallback", policy="registryRead", json_body={"enabled": False})
    assert_iothub_error(r, 401)
    assert json.loads(cli_ok(hub, "route", "list")) == json.loads(before["route"])


def test_a_config_file_with_a_bad_route_stops_serve_with_the_reason(hub_factory, tmp_path):
    from harness import HubError

    with pytest.raises(HubError) as info:
        start_hub(
            hub_factory,
            tmp_path,
            endpoints=[stream("alerts")],
            routes=[route("bad", "true", ["nowhere"])],
        )
    hub_factory.hubs[-1].kill()  # it exited as it should: not a crash for the teardown
    log = str(info.value)
    assert "exited with code" in log, log[-2000:]
    assert "route bad" in log and "nowhere" in log, log[-2000:]


def test_stream_connection_strings_name_their_entity(hub_factory, tmp_path):
    hub = start_hub(hub_factory, tmp_path, endpoints=[stream("alerts")])
    builtin = events_cs(hub)
    cs = events_cs(hub, "alerts")
    assert cs == stream_cs(hub, "alerts"), (cs, builtin)
    assert cs.endswith(";EntityPath=alerts"), cs
    # The service policy, as for the built-in endpoint.
    assert "SharedAccessKeyName=service;" in cs, cs
