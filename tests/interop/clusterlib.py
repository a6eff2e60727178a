"""A twinhub cluster for the interop tests: three nodes behind HAProxy, sharing a private
PostgreSQL (a fresh database) and a private nats-server with JetStream (services.py).

Addresses: the load balancer gets its own loopback address L and listens on L:443, L:8883 and
L:5671; node i gets its own address N_i with the same ports. Every node runs with
`--hostname L` (the name clients put in HostName, that SAS tokens' `sr` carry and that the
certificate must name), `--store` (the cluster's database), `--cluster` (the NATS URL),
`--node-id node<i>` and a data dir of its own. The nodes share one CA through the store, so
any node's `tls/ca-bundle.pem` is the cluster's bundle.

Clients reach the cluster through the load balancer as they would reach one hub: a device
connection string with HostName=L. A node is reached directly by dialling N_i while tokens
still name L: the service SDK with its client's `config.base_url` pointed at N_i, the Event
Hubs SDK with `custom_endpoint_address`, `node_rest` for raw calls.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import requests

from harness import TRUST, AddressAllocator, Hub, HubError, hub_binary
from services import Backend, HaProxy, NatsServer, PgServer, ServiceError

PORTS = (443, 8883, 5671)
NODE_COUNT = 3


class Cluster:
    """PostgreSQL, NATS, three nodes and HAProxy; `close()` stops all of them, bounded."""

    def __init__(self, workdir: Path, allocator: AddressAllocator, size: int = NODE_COUNT) -> None:
        self.workdir = workdir
        self.allocator = allocator
        self.size = size
        self.pg = PgServer()
        self.nats = NatsServer()
        self.store_url = ""
        self.lb_ip = ""
        self.nodes: list[Hub] = []
        self.lb: HaProxy | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> "Cluster":
        self.pg.start()
        self.store_url = self.pg.fresh_database("cluster")
        self.nats.start()
        self.lb_ip = self.allocator.allocate()
        for i in range(1, self.size + 1):
            ip = self.allocator.allocate()
            name = f"node{i}"
            hub = Hub(
                binary=hub_binary(),
                ip=ip,
                workdir=self.workdir / name,
                hostname=self.lb_ip,
                name=name,
                extra_args=("--store", self.store_url, "--cluster", self.nats.url, "--node-id", name),
            )
            self.nodes.append(hub)
            # One at a time: the first node writes the shared identity, the others adopt it.
            hub.start()
        self.lb = HaProxy(self.lb_ip, PORTS, [Backend(h.name, h.ip) for h in self.nodes]).start()
        self.trust()
        return self

    def close(self) -> None:
        errors: list[str] = []
        for hub in self.nodes:
            try:
                hub.teardown()
            except HubError as e:
                errors.append(f"{hub!r}: {e}")
        for service in (self.lb, self.nats):
            if service is not None:
                try:
                    service.close()
                except (ServiceError, OSError) as e:
                    errors.append(f"{type(service).__name__}: {e}")
        try:
            self.pg.close()
        except ServiceError as e:
            errors.append(f"PgServer: {e}")
        if errors:
            raise HubError("cluster teardown failed:\n" + "\n".join(errors))

    # ---- trust and clients -----------------------------------------------------------------

    @property
    def entry(self) -> Hub:
        """A running node, for what goes through the load balancer (its hostname is L)."""
        for hub in self.nodes:
            if hub.running:
                return hub
        raise HubError("no node of the cluster is running")

    @property
    def ca_bundle(self) -> Path:
        return self.nodes[0].ca_bundle

    def trust(self) -> None:
        TRUST.use(self.ca_bundle)

    def env(self) -> dict[str, str]:
        return self.entry.env()

    def service_cs(self) -> str:
        return self.entry.service_cs()

    def device_cs(self, device_id: str) -> str:
        """Creates the device (through the load balancer) and returns its connection string."""
        return self.entry.device_cs(device_id)

    def registry(self, node: Hub | None = None):
        """An IoTHubRegistryManager with tokens for L; through `node`'s own address if given."""
        rm = self.entry.registry()
        if node is not None:
            # msrest formats every request URL from this; the SAS token still names L.
            rm.protocol.config.base_url = node.own_url
        return rm

    def node_rest(self, node: Hub, method: str, path: str, json_body: Any = None, timeout: float = 30):
        """A REST call to one node's own address with an iothubowner token for L."""
        creds = self.entry.credentials()
        return requests.request(
            method,
            node.own_url + path,
            params={"api-version": "2021-04-12"},
            headers={"Authorization": creds.token(), "Accept": "application/json"},
            json=json_body,
            verify=str(self.ca_bundle),
            timeout=timeout,
        )

    def events_cs(self) -> str:
        hub = self.entry
        return hub.cli("connection-string", "--events", "--data-dir", str(hub.data_dir)).strip()

    # ---- observation -----------------------------------------------------------------------

    def connected_on(self, node: Hub) -> int | None:
        """The node's own `twinhub_connected_devices` gauge (None if it does not answer)."""
        try:
            r = requests.get(node.own_url + "/metrics", verify=str(self.ca_bundle), timeout=5)
        except requests.RequestException:
            return None
        if r.status_code != 200:
            return None
        m = re.search(r"^twinhub_connected_devices(?:\{[^}]*\})?\s+([0-9.e+]+)\s*$", r.text, re.M)
        return int(float(m.group(1))) if m else 0

    def connected_counts(self) -> dict[str, int | None]:
        return {h.name: self.connected_on(h) for h in self.nodes}

    def failure_sections(self) -> list[tuple[str, str]]:
        """Log tails of the services, for a failed test's report (conftest adds the nodes')."""
        sections = [
            ("cluster", f"load balancer {self.lb_ip}; " + ", ".join(f"{h.name}={h.ip}" for h in self.nodes))
        ]
        if self.lb is not None:
            sections.append(("haproxy log", self.lb.log_tail(30)))
        sections.append(("nats-server log", self.nats.log_tail(30)))
        sections.append(("postgresql log", self.pg.log_tail(30)))
        return sections

    def logs_tail(self, lines: int = 60) -> str:
        """Every node's log tail as one text, for assertion messages."""
        return "\n".join(h.log_tail(lines) for h in self.nodes)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1, detail=None):
    """Polls predicate() until truthy; bounded; the failure says what and, if given, detail()."""
    __tracebackhide__ = True
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            extra = f"\n{detail()}" if detail is not None else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r}){extra}")
        time.sleep(interval)
