"""A three-node twinhub cluster behind HAProxy, with the official Python SDKs unchanged.

The nodes share a private PostgreSQL (a fresh database) and a private nats-server with
JetStream; HAProxy on its own loopback address L balances 443, 8883 and 5671 round robin
over the nodes, and every node runs with `--hostname L` (clusterlib.py). Clients use
connection strings naming L, as with one hub; a node is also called at its own address, with
tokens that still name L, to show that any node serves any device.

The tests share one cluster and run in order: the spread of devices, the two seed flows, methods
and desired patches across nodes, telemetry read through every AMQP endpoint, then the
disruptive ones: kill -9 of a node under load (its devices reconnect through HAProxy, nothing
acknowledged is lost, the node rejoins), and PostgreSQL and NATS restarts under light load.
Last, jobs, which only the holder of the jobs lease runs: a method job over devices on every
node calls each once, and a job whose leader is killed with kill -9 is resumed by the node that
takes the lease over and completes there.
Measured times are printed (`pytest -rP` shows them).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import pytest

from apprunner import App
from clusterlib import Cluster, wait_for
from harness import Hub, sdk_call, shutdown_bounded, unique_id

pytestmark = pytest.mark.device

FLEET_SIZE = 6
DEVICE_RESPONSE = {"Response": "This is the response from the device"}
# How long a device of a killed node may take to answer methods again through another node:
# HAProxy's checks (2 x 500 ms) and the device SDK's reconnect (it retries every 10 s).
NODE_LOSS_RECOVERY_S = 45.0
# How long methods and reported patches may take to work again once PostgreSQL or NATS is back.
SERVICE_RECOVERY_S = 30.0
# How long a service stays down in the restart tests.
OUTAGE_S = 2.0


# --------------------------------------------------------------------------------------------
# Fixtures: the cluster, and devices that know which node holds them
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, address_allocator) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("cluster"), address_allocator)
    try:
        c.start()
    except BaseException:
        c.close()
        raise
    yield c
    c.close()


class Device:
    """A device SDK client through the load balancer that answers every method with 200 and
    records the methods and desired patches it gets."""

    def __init__(self, cluster: Cluster, device_id: str, **client_kwargs: Any) -> None:
        from azure.iot.device import IoTHubDeviceClient

        self.id = device_id
        cs = cluster.device_cs(device_id)
        cluster.trust()  # the SDK reads SSL_CERT_FILE as it builds its TLS context
        self.client = IoTHubDeviceClient.create_from_connection_string(cs, **client_kwargs)
        self.node: Hub | None = None
        self.lock = threading.Lock()
        self.methods: list[tuple[str, Any]] = []
        self.patches: list[dict[str, Any]] = []

    def start(self, cluster: Cluster) -> "Device":
        """Connects, finds the node that took the session (its connected gauge goes up), then
        sets the handlers (each subscribes before returning)."""
        self.node = connect_and_locate(cluster, self.client.connect, self.id)
        self.client.on_method_request_received = self._on_method
        self.client.on_twin_desired_properties_patch_received = self._on_patch
        return self

    def _on_method(self, request) -> None:
        from azure.iot.device import MethodResponse

        with self.lock:
            self.methods.append((request.name, request.payload))
        payload = {"device": self.id, "method": request.name, "payload": request.payload}
        self.client.send_method_response(MethodResponse.create_from_method_request(request, 200, payload))

    def _on_patch(self, patch: dict[str, Any]) -> None:
        with self.lock:
            self.patches.append(patch)

    def patch_with(self, key: str, value: Any) -> dict[str, Any] | None:
        with self.lock:
            for p in self.patches:
                if p.get(key) == value:
                    return p
        return None


def connect_and_locate(cluster: Cluster, connect: Callable[[], None], what: str) -> Hub:
    """Runs connect() and returns the one node whose `twinhub_connected_devices` went up."""
    before = cluster.connected_counts()
    connect()

    def grown() -> Hub | None:
        now = cluster.connected_counts()
        up = [h for h in cluster.nodes if h.running and (now[h.name] or 0) > (before[h.name] or 0)]
        return up[0] if len(up) == 1 else None

    return wait_for(
        grown,
        10,
        f"one node's connected gauge to count {what}",
        detail=lambda: str(cluster.connected_counts()),
    )


@pytest.fixture(scope="module")
def fleet(cluster: Cluster) -> Iterator[list[Device]]:
    """FLEET_SIZE devices connected one by one through the load balancer."""
    devices: list[Device] = []
    try:
        for _ in range(FLEET_SIZE):
            devices.append(Device(cluster, unique_id("fleet")).start(cluster))
        yield devices
    finally:
        for d in devices:
            shutdown_bounded(d.client)


def spread(devices: list[Device]) -> dict[str, list[str]]:
    by_node: dict[str, list[str]] = {}
    for d in devices:
        assert d.node is not None
        by_node.setdefault(d.node.name, []).append(d.id)
    return by_node


def method(name: str, payload: Any = None, response_timeout: int = 10, connect_timeout: int = 0):
    from azure.iot.hub.models import CloudToDeviceMethod

    return CloudToDeviceMethod(
        method_name=name,
        payload=payload,
        response_timeout_in_seconds=response_timeout,
        connect_timeout_in_seconds=connect_timeout,
    )


def report(name: str, value: Any) -> None:
    """A measurement, printed: `pytest -rP` shows it."""
    print(f"MEASURED {name}: {value}")


# --------------------------------------------------------------------------------------------
# Telemetry read back with azure-eventhub
# --------------------------------------------------------------------------------------------


def read_tagged_events(
    cluster: Cluster, tag: str, want: set[tuple[str, int]], timeout: float = 30.0, node: Hub | None = None
):
    """Reads the built-in endpoint from the start until the events whose JSON body carries
    `"run": tag` cover every (dev, i) in `want`; through the load balancer, or through `node`'s
    own AMQP endpoint (`custom_endpoint_address`, the SAS token still naming L). Returns the
    bodies of all the run's events read (a message the SDK sent twice is there twice)."""
    from azure.eventhub import EventHubConsumerClient

    kwargs: dict[str, Any] = {"connection_verify": str(cluster.ca_bundle)}
    if node is not None:
        kwargs["custom_endpoint_address"] = f"sb://{node.ip}:5671"
    client = EventHubConsumerClient.from_connection_string(
        cluster.events_cs(), consumer_group="$default", **kwargs
    )
    found: list[dict[str, Any]] = []
    seen: set[tuple[Any, Any]] = set()
    errors: list[BaseException] = []
    done = threading.Event()

    def on_batch(_partition_context, batch) -> None:
        for event in batch:
            try:
                body = json.loads(event.body_as_str())
            except ValueError:
                continue
            if isinstance(body, dict) and body.get("run") == tag:
                body["_device"] = event.system_properties.get(b"iothub-connection-device-id", b"").decode()
                found.append(body)
                seen.add((body.get("dev"), body.get("i")))
        if want <= seen:
            done.set()

    def on_error(_partition_context, error) -> None:
        errors.append(error)

    t = threading.Thread(
        target=client.receive_batch,
        kwargs={
            "on_event_batch": on_batch,
            "on_error": on_error,
            "starting_position": "-1",
            "max_batch_size": 300,
            "max_wait_time": 1,
        },
        daemon=True,
    )
    t.start()
    done.wait(timeout)
    client.close()
    t.join(15)
    assert not t.is_alive(), "EventHubConsumerClient.receive_batch did not return after close()"
    where = f"node {node.name} ({node.ip})" if node is not None else f"the load balancer ({cluster.lb_ip})"
    missing = want - seen
    assert not missing, (
        f"through {where}: {len(missing)} of {len(want)} events of run {tag} not read within {timeout}s "
        f"(first missing: {sorted(missing)[:10]}); receiver errors: {errors[:3]!r}"
    )
    return found


# --------------------------------------------------------------------------------------------
# Spread, seed flows, methods, desired patches, telemetry
# --------------------------------------------------------------------------------------------


def test_devices_land_on_every_node(cluster: Cluster, fleet: list[Device]):
    by_node = spread(fleet)
    report("device_spread", {k: len(v) for k, v in sorted(by_node.items())})
    assert sorted(by_node) == [h.name for h in cluster.nodes], f"devices by node: {by_node}"
    # Each node's own gauge agrees with where the sessions went.
    counts = cluster.connected_counts()
    assert counts == {h.name: len(by_node.get(h.name, [])) for h in cluster.nodes}, counts
    # Every node shows every device connected (connectionState is cluster-wide).
    for node in cluster.nodes:
        rm = cluster.registry(node)
        for d in fleet:
            assert rm.get_device(d.id).connection_state == "Connected", (node.name, d.id)


def _device_env(cluster: Cluster, device_id: str, transport: str, **extra: str) -> dict[str, str]:
    env = cluster.env()
    env["IOTHUB_DEVICE_CONNECTION_STRING"] = cluster.device_cs(device_id)
    env["IOTHUB_DEVICE_TRANSPORT"] = transport
    env.update(extra)
    return env


def _service_env(cluster: Cluster, device_id: str, **extra: str) -> dict[str, str]:
    env = cluster.env()
    env["IOTHUB_CONNECTION_STRING"] = cluster.service_cs()
    env["IOTHUB_DEVICE_ID"] = device_id
    env.update(extra)
    return env


TRANSPORTS = ("mqtt", "websockets")


def _run_seed_pairs(
    cluster: Cluster, device_app: str, service_app: str, device_extra: dict, service_extra: dict
):
    """Per transport, one device app and then its service app, all pairs at once, through the
    load balancer; returns [(transport, device id, device app, service app)]."""
    pairs = []
    for transport in TRANSPORTS:
        did = unique_id(f"seed-{transport[:2]}")
        device = App(device_app, _device_env(cluster, did, transport, APP_SECONDS="60", **device_extra))
        pairs.append((transport, did, device))
    results = []
    services: list[App] = []
    try:
        for _, _, device in pairs:
            device.wait_for_line(r"^READY$", timeout=30)
        for _, did, _ in pairs:
            services.append(App(service_app, _service_env(cluster, did, **service_extra)))
        for (transport, did, device), service in zip(pairs, services, strict=True):
            rc = service.wait(timeout=90)
            assert rc == 0, f"[{transport}] " + service.output() + device.output()
            assert device.wait(timeout=30) == 0, f"[{transport}] " + device.output()
            results.append((transport, did, device, service))
    finally:
        for app in [*services, *(device for _, _, device in pairs)]:
            app.terminate()
    return results


def test_seed_device_management_reboot_through_the_load_balancer(cluster: Cluster):
    results = _run_seed_pairs(
        cluster,
        "dm_device.py",
        "dm_service.py",
        {"REBOOT_SECONDS": "2"},
        {"WAIT_COUNT": "20", "WAIT_SECONDS": "1"},
    )
    for transport, did, device, service in results:
        out = service.lines
        assert "METHOD_STATUS 200" in out, f"[{transport}] " + service.output()
        assert "METHOD_PAYLOAD " + json.dumps(DEVICE_RESPONSE, sort_keys=True) in out, service.output()
        m = device.wait_for_line(r"^METHOD rebootDevice PAYLOAD (.*)$", timeout=5)
        assert json.loads(m.group(1)) == '{"method_number":"42"}'
        reported = device.wait_for_line(r"^REPORTED rebootTime=(.*)$", timeout=5).group(1)
        assert [line for line in out if line.startswith("Last reboot time: ")] == [
            f"Last reboot time: {reported}"
        ], service.output()
        # Stored in the shared store: every node reads it.
        for node in cluster.nodes:
            assert cluster.registry(node).get_twin(did).properties.reported["rebootTime"] == reported, (
                node.name
            )


def test_seed_direct_method_through_the_load_balancer(cluster: Cluster):
    results = _run_seed_pairs(cluster, "methods_device.py", "methods_service.py", {}, {})
    for transport, _did, device, service in results:
        out = service.lines
        assert "Response status          : 200" in out, f"[{transport}] " + service.output()
        assert "Response payload         : " + json.dumps(DEVICE_RESPONSE, sort_keys=True) in out, (
            service.output()
        )
        device.wait_for_line(r"^Direct method called\.$", timeout=5)
        m = device.wait_for_line(r"^METHOD DeviceMethod PAYLOAD (.*)$", timeout=5)
        assert json.loads(m.group(1)) == '{"method_number":"42"}'


def test_methods_through_each_node_reach_devices_on_every_node(cluster: Cluster, fleet: list[Device]):
    from msrest.exceptions import HttpOperationError

    from harness import error_codes_in

    crossed = set()
    for node in cluster.nodes:
        rm = cluster.registry(node)
        for d in fleet:
            payload = {"via": node.name, "n": uuid.uuid4().hex[:8]}
            result = rm.invoke_device_method(d.id, method("whereAmI", payload))
            assert result.status == 200, (node.name, d.id, result.as_dict())
            assert result.payload == {"device": d.id, "method": "whereAmI", "payload": payload}, (
                node.name,
                d.id,
                result.payload,
            )
            assert d.node is not None
            if d.node is not node:
                crossed.add((node.name, d.node.name))
        # A registered device connected nowhere: IoT Hub's 404103 through every node.
        idle = unique_id("idle")
        cluster.device_cs(idle)
        with pytest.raises(HttpOperationError) as e:
            rm.invoke_device_method(idle, method("anything"))
        assert e.value.response.status_code == 404, e.value.response.text
        assert 404103 in error_codes_in(e.value.response.text), e.value.response.text
    # Every node called devices held by each of the other nodes.
    want = {(a.name, b.name) for a in cluster.nodes for b in cluster.nodes if a is not b}
    assert crossed == want, f"cross-node pairs exercised: {sorted(crossed)}; spread {spread(fleet)}"


def test_desired_patch_through_one_node_reaches_a_device_on_another(cluster: Cluster, fleet: list[Device]):
    from azure.iot.hub.models import Twin, TwinProperties

    nodes = cluster.nodes
    for d in fleet:
        assert d.node is not None
        via = nodes[(nodes.index(d.node) + 1) % len(nodes)]
        tag = uuid.uuid4().hex[:12]
        twin = cluster.registry(via).update_twin(
            d.id, Twin(properties=TwinProperties(desired={"tag": tag, "via": via.name})), "*"
        )
        version = twin.properties.desired["$version"]
        patch = wait_for(
            lambda d=d, tag=tag: d.patch_with("tag", tag),
            15,
            f"the desired patch through {via.name} at {d.id} on {d.node.name}",
            detail=cluster.logs_tail,
        )
        assert patch["via"] == via.name
        assert patch["$version"] == version, (patch, version)


def test_telemetry_from_every_node_is_read_through_every_amqp_endpoint(cluster: Cluster, fleet: list[Device]):
    from azure.iot.device import Message

    tag = uuid.uuid4().hex
    per_device = 3
    for d in fleet:
        for i in range(per_device):
            msg = Message(json.dumps({"run": tag, "dev": d.id, "i": i}))
            msg.content_type = "application/json"
            msg.content_encoding = "utf-8"
            d.client.send_message(msg)  # returns after the node's PUBACK
    want = {(d.id, i) for d in fleet for i in range(per_device)}
    timings = {}
    for node in [None, *cluster.nodes]:
        started = time.monotonic()
        bodies = read_tagged_events(cluster, tag, want, node=node)
        timings["lb" if node is None else node.name] = round(time.monotonic() - started, 2)
        got = [(b["dev"], b["i"]) for b in bodies]
        assert sorted(set(got)) == sorted(want), f"missing {sorted(want - set(got))}"
        assert len(got) == len(want), "an event was read twice"
        assert all(b["_device"] == b["dev"] for b in bodies), "iothub-connection-device-id differs"
        # One device: one partition, read in the order sent.
        for d in fleet:
            assert [b["i"] for b in bodies if b["dev"] == d.id] == list(range(per_device)), d.id
    report("telemetry_read_seconds", timings)


# --------------------------------------------------------------------------------------------
# Failures: a node killed under load, PostgreSQL and NATS restarted
# --------------------------------------------------------------------------------------------


@dataclass
class LoadLog:
    """What a device's load thread got acknowledged, with times (time.monotonic())."""

    device: Device
    reported_acked: dict[int, float] = field(default_factory=dict)
    telemetry_acked: dict[int, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def device_load(
    log: LoadLog, stop: threading.Event, tag: str, telemetry: bool = True, interval: float = 0.1
) -> None:
    """Reported patches (a new key each) and telemetry, one after the other, until stop."""
    from azure.iot.device import Message

    client = log.device.client
    i = 0
    while not stop.is_set():
        try:
            client.patch_twin_reported_properties({f"{tag}_{i}": i, f"{tag}_last": i})
            log.reported_acked[i] = time.monotonic()
        except Exception as e:  # noqa: BLE001 - recorded; the load goes on
            log.errors.append(f"{time.monotonic():.2f} reported {i}: {type(e).__name__}: {e}")
        if telemetry:
            try:
                client.send_message(Message(json.dumps({"run": tag, "dev": log.device.id, "i": i})))
                log.telemetry_acked[i] = time.monotonic()
            except Exception as e:  # noqa: BLE001
                log.errors.append(f"{time.monotonic():.2f} telemetry {i}: {type(e).__name__}: {e}")
        i += 1
        stop.wait(interval)


@dataclass
class MethodLog:
    # (started, finished, device id, status or None, error text)
    calls: list[tuple[float, float, str, int | None, str]] = field(default_factory=list)

    def first_success_after(self, device_id: str, t: float) -> float | None:
        for started, finished, did, status, _ in self.calls:
            if did == device_id and status == 200 and started >= t:
                return finished
        return None


def method_load(cluster: Cluster, devices: list[Device], log: MethodLog, stop: threading.Event) -> None:
    """Methods through the load balancer, round robin over the devices, until stop."""
    rm = cluster.registry()
    n = 0
    while not stop.is_set():
        d = devices[n % len(devices)]
        n += 1
        started = time.monotonic()
        try:
            result = rm.invoke_device_method(d.id, method("load", {"n": n}, response_timeout=5))
            log.calls.append((started, time.monotonic(), d.id, result.status, ""))
        except Exception as e:  # noqa: BLE001 - recorded; the load goes on
            log.calls.append((started, time.monotonic(), d.id, None, f"{type(e).__name__}: {str(e)[:200]}"))
            stop.wait(0.1)
        stop.wait(0.05)


def join_all(threads: list[threading.Thread], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threads if t.is_alive()]
    assert not stuck, f"{what}: threads still blocked {timeout}s after stop: {stuck}"


def check_acknowledged_reported(cluster: Cluster, logs: list[LoadLog], tag: str) -> int:
    """Every acknowledged reported patch is in the twin; returns how many were checked."""
    rm = cluster.registry()
    checked = 0
    for log in logs:
        reported = rm.get_twin(log.device.id).properties.reported
        missing = [i for i in log.reported_acked if reported.get(f"{tag}_{i}") != i]
        assert not missing, (
            f"{log.device.id}: acknowledged reported patches missing from the twin: {missing[:20]} "
            f"(of {len(log.reported_acked)})"
        )
        checked += len(log.reported_acked)
    return checked


@pytest.mark.timeout(240)
def test_kill_9_of_a_node_under_load_loses_nothing_acknowledged(cluster: Cluster, fleet: list[Device]):
    tag = "k" + uuid.uuid4().hex[:8]
    # Half over MQTT/TLS (8883), half over MQTT over WebSockets (443): both pass HAProxy.
    devices = [
        Device(cluster, unique_id("load"), websockets=bool(i % 2)).start(cluster) for i in range(FLEET_SIZE)
    ]
    try:
        by_node = spread(devices)
        victim = next((h for h in cluster.nodes[1:] if by_node.get(h.name)), None) or next(
            h for h in cluster.nodes if by_node.get(h.name)
        )
        victims = [d for d in devices if d.node is victim]
        report("kill_load_spread", {k: len(v) for k, v in sorted(by_node.items())})

        stop = threading.Event()
        logs = [LoadLog(d) for d in devices]
        methods = MethodLog()
        threads = [
            threading.Thread(
                target=device_load, args=(log, stop, tag), name=f"load-{log.device.id}", daemon=True
            )
            for log in logs
        ]
        threads.append(
            threading.Thread(
                target=method_load, args=(cluster, devices, methods, stop), name="methods", daemon=True
            )
        )
        for t in threads:
            t.start()
        try:
            wait_for(
                lambda: (
                    all(len(log.reported_acked) >= 3 for log in logs)
                    and sum(1 for c in methods.calls if c[3] == 200) >= len(devices)
                ),
                20,
                "the load to run on every device before the kill",
                detail=lambda: str([(lg.device.id, len(lg.reported_acked), lg.errors[-2:]) for lg in logs]),
            )
            killed_at = time.monotonic()
            victim.kill()

            def recovered() -> dict[str, float] | None:
                firsts = {d.id: methods.first_success_after(d.id, killed_at) for d in devices}
                return firsts if all(v is not None for v in firsts.values()) else None

            firsts = wait_for(
                recovered,
                NODE_LOSS_RECOVERY_S,
                f"every device to answer a method again after kill -9 of {victim.name}",
                interval=0.2,
                detail=lambda: "last calls: " + str(methods.calls[-6:]) + "\n" + cluster.logs_tail(40),
            )
            recovery = {d.id: round(firsts[d.id] - killed_at, 2) for d in devices}
            # The victim's devices then make progress on reported patches too.
            wait_for(
                lambda: all(any(t > killed_at for t in log.reported_acked.values()) for log in logs),
                NODE_LOSS_RECOVERY_S,
                "every device's reported patches to be acknowledged again after the kill",
                detail=lambda: str([(lg.device.id, lg.errors[-2:]) for lg in logs]),
            )
            stop.wait(3.0)
        finally:
            stop.set()
        join_all(threads, 40, "load")

        report("kill_victim", victim.name)
        report(
            "kill_method_recovery_seconds",
            {
                "victim_devices": {d.id: recovery[d.id] for d in victims},
                "other_devices_max": max((recovery[d.id] for d in devices if d not in victims), default=None),
            },
        )
        failed_calls = [c for c in methods.calls if c[3] != 200 and c[0] >= killed_at]
        report(
            "kill_methods",
            {"calls": len(methods.calls), "failed_after_kill": len(failed_calls)},
        )
        report(
            "kill_device_errors",
            {log.device.id: len(log.errors) for log in logs if log.errors},
        )

        # The victim's devices are held by the survivors now.
        survivors = [h for h in cluster.nodes if h is not victim]
        total = len(devices) + len(fleet)
        wait_for(
            lambda: sum(cluster.connected_on(h) or 0 for h in survivors) == total,
            NODE_LOSS_RECOVERY_S,
            f"the survivors to hold all {total} devices",
            detail=lambda: str(cluster.connected_counts()),
        )

        # Nothing acknowledged is lost: every reported patch is in the twin, every message in
        # the events endpoint.
        checked = check_acknowledged_reported(cluster, logs, tag)
        acked_events = {(log.device.id, i) for log in logs for i in log.telemetry_acked}
        # (read_tagged_events fails, naming them, if any acknowledged message is missing)
        read_tagged_events(cluster, tag, acked_events, timeout=45)
        report(
            "kill_acknowledged_checked",
            {"reported": checked, "telemetry": len(acked_events)},
        )

        # The killed node starts again under its name, rejoins the pool and serves every device.
        victim.start()
        rm = cluster.registry(victim)
        for d in devices:
            result = rm.invoke_device_method(d.id, method("afterRestart"))
            assert result.status == 200, (d.id, result.as_dict())
        wait_lb_routes_to(cluster, victim)
    finally:
        for d in devices:
            shutdown_bounded(d.client)


def wait_lb_routes_to(cluster: Cluster, node: Hub, timeout: float = 15.0) -> None:
    """New HTTPS requests through the load balancer until HAProxy's log shows one sent to
    `node` (its health checks took it back into the pool)."""
    import requests

    assert cluster.lb is not None
    before = cluster.lb.connections_by_server(443).get(node.name, 0)

    def routed() -> bool:
        try:
            requests.get(f"https://{cluster.lb_ip}/health", verify=str(cluster.ca_bundle), timeout=3)
        except requests.RequestException:
            pass
        return cluster.lb.connections_by_server(443).get(node.name, 0) > before

    wait_for(
        routed,
        timeout,
        f"HAProxy to send connections to {node.name} again",
        interval=0.2,
        detail=lambda: cluster.lb.log_tail(10),
    )


def _restart_under_light_load(cluster: Cluster, fleet: list[Device], restart: Callable[[], None], label: str):
    """Light load (a reported patch and a method per device of one per node, every 0.3 s)
    while `restart` takes a service down and back. Returns the measured times."""
    probes: list[Device] = []
    for node in cluster.nodes:
        on_node = [d for d in fleet if d.node is node]
        if on_node:
            probes.append(on_node[0])
    tag = label + uuid.uuid4().hex[:6]
    stop = threading.Event()
    logs = [LoadLog(d) for d in probes]
    methods = MethodLog()
    threads = [
        threading.Thread(
            target=device_load,
            args=(log, stop, tag),
            kwargs={"telemetry": False, "interval": 0.3},
            name=f"light-{log.device.id}",
            daemon=True,
        )
        for log in logs
    ]
    threads.append(threading.Thread(target=method_load, args=(cluster, probes, methods, stop), daemon=True))
    for t in threads:
        t.start()
    try:
        wait_for(
            lambda: all(log.reported_acked for log in logs) and any(c[3] == 200 for c in methods.calls),
            20,
            f"the light load to run before the {label} restart",
        )
        down_at = time.monotonic()
        restart()
        up_at = time.monotonic()

        def recovered() -> bool:
            return all(methods.first_success_after(d.id, up_at) is not None for d in probes) and all(
                any(t > up_at for t in log.reported_acked.values()) for log in logs
            )

        wait_for(
            recovered,
            SERVICE_RECOVERY_S,
            f"methods and reported patches to work again after the {label} restart",
            interval=0.2,
            detail=lambda: (
                f"last calls: {methods.calls[-6:]}\n"
                f"device errors: {[(lg.device.id, lg.errors[-3:]) for lg in logs]}\n{cluster.logs_tail(40)}"
            ),
        )
        method_back = max(methods.first_success_after(d.id, up_at) for d in probes) - up_at
        reported_back = max(min(t for t in log.reported_acked.values() if t > up_at) for log in logs) - up_at
        # A little more load once recovered: it keeps working.
        stop.wait(1.0)
    finally:
        stop.set()
    join_all(threads, 40, f"{label} light load")
    checked = check_acknowledged_reported(cluster, logs, tag)
    during = [c for c in methods.calls if down_at <= c[0] < up_at]
    after = [c for c in methods.calls if c[0] >= up_at + max(method_back, reported_back)]
    return {
        "down_seconds": round(up_at - down_at, 2),
        "methods_back_after_seconds": round(method_back, 2),
        "reported_back_after_seconds": round(reported_back, 2),
        "methods_during_outage": {
            "ok": sum(1 for c in during if c[3] == 200),
            "failed": sorted({c[4][:120] for c in during if c[3] != 200}),
        },
        "methods_failed_after_recovery": [c[4][:120] for c in after if c[3] != 200],
        "reported_acked_during_outage": sum(
            1 for log in logs for t in log.reported_acked.values() if down_at <= t < up_at
        ),
        "device_errors": sorted(
            {e.split(" ", 1)[1].split(":", 1)[1][:100] for log in logs for e in log.errors}
        ),
        "acknowledged_reported_checked": checked,
    }


def test_postgres_restart_under_light_load_recovers_by_itself(cluster: Cluster, fleet: list[Device]):
    def restart() -> None:
        cluster.pg.stop()
        time.sleep(OUTAGE_S)  # a real outage, not only a reconnect
        cluster.pg.start_again()

    result = _restart_under_light_load(cluster, fleet, restart, "pg")
    report("postgres_restart", result)
    assert not result["methods_failed_after_recovery"], result
    assert all(h.running for h in cluster.nodes), "a node exited during the PostgreSQL restart"


def test_nats_restart_under_light_load_recovers_by_itself(cluster: Cluster, fleet: list[Device]):
    from azure.iot.device import Message

    # Telemetry acknowledged before the restart is still there after it (JetStream's store).
    before = uuid.uuid4().hex
    for d in fleet:
        d.client.send_message(Message(json.dumps({"run": before, "dev": d.id, "i": 0})))

    def restart() -> None:
        cluster.nats.stop()
        time.sleep(OUTAGE_S)
        cluster.nats.start()

    result = _restart_under_light_load(cluster, fleet, restart, "nats")
    report("nats_restart", result)
    assert not result["methods_failed_after_recovery"], result
    assert all(h.running for h in cluster.nodes), "a node exited during the NATS restart"
    # Telemetry works again too; both runs read back through the load balancer.
    after = uuid.uuid4().hex
    for d in fleet:
        d.client.send_message(Message(json.dumps({"run": after, "dev": d.id, "i": 0})))
    for tag in (before, after):
        read_tagged_events(cluster, tag, {(d.id, 0) for d in fleet})


# --------------------------------------------------------------------------------------------
# Jobs: run once cluster-wide by the holder of the jobs lease, resumed by another node
# --------------------------------------------------------------------------------------------

# From kill -9 of the jobs leader to the job's completion: the lease lapses 5 s after its
# holder's last renewal, another node looks every second and resumes the unfinished jobs, and
# the late device connects through HAProxy (retrying if it is sent to the dead node).
JOB_FAILOVER_S = 20.0
JOB_TIMEOUT_S = 30.0
LEASE_KEY = "cluster/jobs-leader"


def job_manager(cluster: Cluster, node: Hub):
    """An IoTHubJobManager with tokens for L, calling `node`'s own address."""
    from azure.iot.hub import IoTHubJobManager

    jm = IoTHubJobManager.from_connection_string(cluster.service_cs())
    jm.protocol.config.base_url = node.own_url
    jm.protocol.config.connection.verify = str(cluster.ca_bundle)
    return jm


def tag_devices(cluster: Cluster, ids: list[str], marker: str) -> None:
    from azure.iot.hub.models import Twin

    rm = cluster.registry()
    for did in ids:
        rm.update_twin(did, Twin(tags={"jobsuite": marker}))


def method_job(job_id: str, marker: str, name: str, connect_timeout: int = 0):
    import datetime as dt

    from azure.iot.hub.models import JobRequest

    return JobRequest(
        job_id=job_id,
        type="scheduleDeviceMethod",
        cloud_to_device_method=method(
            name, {"job": job_id}, response_timeout=10, connect_timeout=connect_timeout
        ),
        query_condition=f"tags.jobsuite = '{marker}'",
        start_time=dt.datetime.now(dt.timezone.utc).replace(tzinfo=None).isoformat(),
        max_execution_time_in_seconds=120,
    )


def job_state(jm, job_id: str):
    return sdk_call(jm.get_scheduled_job, job_id)


def stats_of(job) -> dict[str, Any]:
    s = job.device_job_statistics
    if s is None:
        return {"status": job.status}
    return {
        "status": job.status,
        "devices": s.device_count,
        "succeeded": s.succeeded_count,
        "failed": s.failed_count,
        "running": s.running_count,
        "pending": s.pending_count,
    }


def wait_job_completed(cluster: Cluster, jm, job_id: str, timeout: float, what: str):
    last: dict[str, Any] = {}

    def done():
        job = job_state(jm, job_id)
        last["job"] = job
        if job.status in ("failed", "cancelled"):
            raise AssertionError(
                f"job {job_id} ended as {job.status!r}: {job.as_dict()}\n{cluster.logs_tail(60)}"
            )
        return job if job.status == "completed" else None

    return wait_for(
        done,
        timeout,
        what,
        interval=0.2,
        detail=lambda: f"job: {stats_of(last['job']) if 'job' in last else None}\n{cluster.logs_tail(60)}",
    )


def calls_named(d: Device, name: str) -> int:
    with d.lock:
        return sum(1 for n, _ in d.methods if n == name)


def lease_holder(cluster: Cluster) -> dict[str, Any] | None:
    """The jobs lease as stored in PostgreSQL (meta table, tbl 1), or None if absent."""
    database = cluster.store_url.rsplit("/", 1)[1]
    out = cluster.pg.psql(
        database,
        "SELECT convert_from(value, 'UTF8') FROM twinhub_kv "
        f"WHERE tbl = 1 AND key = convert_to('{LEASE_KEY}', 'UTF8')",
    ).strip()
    return json.loads(out) if out else None


def current_leader(cluster: Cluster) -> Hub | None:
    """The running node whose lease is still valid, or None."""
    lease = lease_holder(cluster)
    if not lease or lease.get("untilMs", 0) <= time.time() * 1000:
        return None
    return next((h for h in cluster.nodes if h.name == lease.get("node") and h.running), None)


@pytest.mark.timeout(120)
def test_a_method_job_over_devices_on_all_nodes_completes_once(cluster: Cluster):
    started = time.monotonic()
    marker = unique_id("jobs")
    name = "jobOnce"
    devices: list[Device] = []
    try:
        # Through HAProxy, until every node holds at least one of them (bounded).
        while len({d.node.name for d in devices if d.node}) < len(cluster.nodes) and len(devices) < 9:
            devices.append(Device(cluster, unique_id("jobdev")).start(cluster))
        by_node = spread(devices)
        report("job_once_spread", {k: len(v) for k, v in sorted(by_node.items())})
        assert sorted(by_node) == [h.name for h in cluster.nodes], f"devices by node: {by_node}"
        tag_devices(cluster, [d.id for d in devices], marker)

        leader = current_leader(cluster)
        # Created through a node that does not run the jobs, so the job crosses the bus.
        via = next((h for h in cluster.nodes if h is not leader), cluster.nodes[0])
        jm = job_manager(cluster, via)
        job_id = unique_id("oncejob")
        created_at = time.monotonic()
        sdk_call(jm.create_scheduled_job, job_id, method_job(job_id, marker, name))
        job = wait_job_completed(
            cluster, jm, job_id, JOB_TIMEOUT_S, f"job {job_id} (created via {via.name}) to complete"
        )
        report("job_once_seconds", round(time.monotonic() - created_at, 2))
        report("job_once_nodes", {"leader": leader.name if leader else None, "created_via": via.name})

        stats = stats_of(job)
        n = len(devices)
        want = {"status": "completed", "devices": n, "succeeded": n, "failed": 0, "running": 0, "pending": 0}
        assert stats == want, f"{stats}\n{job.as_dict()}\n{cluster.logs_tail(60)}"
        # Another node running the job too would call the devices a second time: give it a moment.
        time.sleep(1.0)
        counts = {d.id: calls_named(d, name) for d in devices}
        assert all(c == 1 for c in counts.values()), (
            f"each device must be called exactly once: {counts} (spread {by_node})\n{cluster.logs_tail(60)}"
        )
        # The job's statistics read the same through every node.
        for node in cluster.nodes:
            assert stats_of(job_state(job_manager(cluster, node), job_id)) == stats, node.name
    finally:
        for d in devices:
            shutdown_bounded(d.client)
    report("job_once_test_seconds", round(time.monotonic() - started, 2))


@pytest.mark.timeout(150)
def test_a_job_led_by_a_killed_node_finishes_on_another_node(cluster: Cluster):
    started = time.monotonic()
    marker = unique_id("jobsf")
    name = "jobResume"
    leader = wait_for(
        lambda: current_leader(cluster),
        10,
        "a running node to hold the jobs lease",
        detail=lambda: f"lease: {lease_holder(cluster)}\n{cluster.logs_tail(30)}",
    )
    others = [h for h in cluster.nodes if h is not leader and h.running]
    assert others, "no node besides the leader is running"
    online: list[Device] = []
    late_client = None
    try:
        # At least one device on the leader, so one finished device moves node after the kill.
        while len(online) < 3 or (leader.name not in spread(online) and len(online) < 6):
            online.append(Device(cluster, unique_id("jobon")).start(cluster))
        # Registered, with its client built, but not connected until the leader is gone.
        late = Device(cluster, unique_id("joblate"))
        late_client = late.client
        tag_devices(cluster, [d.id for d in [*online, late]], marker)

        # Created through another node (the job reaches the leader over NATS) and watched there.
        jm = job_manager(cluster, others[0])
        job_id = unique_id("failjob")
        sdk_call(jm.create_scheduled_job, job_id, method_job(job_id, marker, name, connect_timeout=60))
        wait_for(
            lambda: (stats_of(job_state(jm, job_id)).get("succeeded") or 0) >= len(online),
            JOB_TIMEOUT_S,
            f"the {len(online)} connected devices to be done in job {job_id}",
            interval=0.2,
            detail=lambda: f"job: {stats_of(job_state(jm, job_id))}\n{cluster.logs_tail(40)}",
        )
        before_kill = stats_of(job_state(jm, job_id))
        assert before_kill["status"] == "running" and before_kill["succeeded"] == len(online), (
            f"{before_kill}\n{cluster.logs_tail(40)}"
        )
        early = {d.id: calls_named(d, name) for d in online}
        assert early == {d.id: 1 for d in online}, f"calls before the kill: {early}\n{cluster.logs_tail(40)}"

        killed_at = time.monotonic()
        leader.kill()
        report("job_failover_killed", {"leader": leader.name, "spread": spread(online), "late": late.id})

        # Another node takes the lease once it lapses; only then does the late device come online
        # (through HAProxy, which may still try the dead node once), so the node that resumed the
        # job is the one that sees it connect, wherever its session lands.
        def successor() -> Hub | None:
            holder = current_leader(cluster)
            return holder if holder is not None and holder is not leader else None

        new_leader = wait_for(
            successor,
            15,
            f"another node to take the jobs lease after kill -9 of {leader.name}",
            interval=0.2,
            detail=lambda: f"lease: {lease_holder(cluster)}\n{cluster.logs_tail(40)}",
        )
        took_over_at = time.monotonic()
        deadline = time.monotonic() + 20
        errors: list[str] = []
        while True:
            try:
                late_client.connect()
                break
            except Exception as e:  # noqa: BLE001 - retried, bounded
                errors.append(f"{type(e).__name__}: {e}")
                if time.monotonic() >= deadline:
                    raise AssertionError(f"the late device could not connect through HAProxy: {errors[-3:]}")
                time.sleep(0.5)
        late_client.on_method_request_received = late._on_method
        connected_at = time.monotonic()

        job = wait_job_completed(
            cluster,
            jm,
            job_id,
            max(1.0, JOB_FAILOVER_S - (time.monotonic() - killed_at)),
            f"job {job_id} to complete on {new_leader.name} within {JOB_FAILOVER_S}s of kill -9 of "
            f"its leader {leader.name}",
        )
        done_at = time.monotonic()
        report(
            "job_failover_seconds",
            {
                "lease_taken_after_kill": round(took_over_at - killed_at, 2),
                "late_connected_after_kill": round(connected_at - killed_at, 2),
                "completed_after_kill": round(done_at - killed_at, 2),
                "new_leader": new_leader.name if new_leader else None,
                "connect_retries": len(errors),
            },
        )
        n = len(online) + 1
        stats = stats_of(job)
        want = {"status": "completed", "devices": n, "succeeded": n, "failed": 0, "running": 0, "pending": 0}
        assert stats == want, f"{stats}\n{job.as_dict()}\n{cluster.logs_tail(60)}"
        assert current_leader(cluster) is new_leader, f"lease after the job: {lease_holder(cluster)}"
        time.sleep(1.0)
        counts = {d.id: calls_named(d, name) for d in [*online, late]}
        assert counts == {d.id: 1 for d in [*online, late]}, (
            f"devices done before the kill once, the late device once: {counts}\n{cluster.logs_tail(60)}"
        )
    finally:
        for d in online:
            shutdown_bounded(d.client)
        if late_client is not None:
            shutdown_bounded(late_client)
        # The killed node rejoins, as after the kill test above.
        if not leader.running:
            leader.start()
    report("job_failover_test_seconds", round(time.monotonic() - started, 2))
