"""Fixtures for the interop tests: twinhub processes, registry clients, device clients.

Each hub runs on its own loopback address (127.0.0.10 upwards) with the fixed ports the
device SDK dials (443 and 8883), its own temp data dir, and hostname = that address. The test
process trusts the hub a test uses through REQUESTS_CA_BUNDLE / SSL_CERT_FILE (see
harness.ProcessTrust); subprocesses get their hub's bundle through `hub.env()`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import pytest

from harness import TRUST, AddressAllocator, Hub, HubError, hub_binary, hub_for_host, shutdown_bounded

_ALLOCATOR = AddressAllocator(start=10)


def pytest_configure(config: pytest.Config) -> None:
    # Before any test builds an SDK client: a machine may set these globally to other bundles.
    TRUST.apply_baseline()


class HubFactory:
    """Starts hubs on demand and stops every one of them at teardown."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self._tmp = tmp_path_factory
        self.hubs: list[Hub] = []

    def __call__(
        self,
        *,
        https_port: int = 443,
        mqtt_port: int = 8883,
        mqtt_connect_timeout: float | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> Hub:
        ip = _ALLOCATOR.allocate(extra_ports=(https_port, mqtt_port))
        hub = Hub(
            binary=hub_binary(),
            ip=ip,
            workdir=self._tmp.mktemp(f"hub-{ip}-", numbered=True),
            https_port=https_port,
            mqtt_port=mqtt_port,
            mqtt_connect_timeout=mqtt_connect_timeout,
            extra_args=extra_args,
        )
        self.hubs.append(hub)
        hub.start()
        return hub

    def close(self) -> None:
        errors: list[str] = []
        for hub in self.hubs:
            try:
                hub.teardown()
            except HubError as e:
                errors.append(f"{hub!r}: {e}")
        if errors:
            raise HubError("hub teardown failed:\n" + "\n".join(errors))


@pytest.fixture
def hub_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubFactory]:
    """Function-scoped factory: `hub_factory(mqtt_connect_timeout=2)` starts a hub."""
    factory = HubFactory(tmp_path_factory)
    yield factory
    factory.close()


@pytest.fixture(scope="session")
def address_allocator() -> AddressAllocator:
    """The session's loopback addresses, for fixtures that place processes of their own
    (a cluster's nodes and load balancer) beside the hubs above."""
    return _ALLOCATOR


@pytest.fixture(scope="module")
def module_hub_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubFactory]:
    factory = HubFactory(tmp_path_factory)
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def hub(module_hub_factory: HubFactory) -> Hub:
    """One hub shared by the tests of a module that never restart it."""
    return module_hub_factory()


@pytest.fixture
def fresh_hub(hub_factory: HubFactory) -> Hub:
    """A hub of the test's own, for tests that stop, kill or restart it."""
    return hub_factory()


@pytest.fixture(scope="module")
def rm(hub: Hub):
    """An IoTHubRegistryManager (iothubowner) on the module hub; `.recorder` holds statuses."""
    return hub.registry()


@pytest.fixture
def device_client() -> Iterator[Callable[..., Any]]:
    """Factory for IoTHubDeviceClient from a connection string; all are shut down at teardown."""
    from azure.iot.device import IoTHubDeviceClient

    clients: list[Any] = []

    def make(cs: str, **kwargs: Any) -> Any:
        host = dict(p.split("=", 1) for p in cs.split(";")).get("HostName", "")
        hub = hub_for_host(host)
        if hub is None:
            raise HubError(f"no running hub serves HostName={host}")
        # The SDK reads SSL_CERT_FILE when it builds its TLS context, i.e. right here.
        hub.trust_process()
        client = IoTHubDeviceClient.create_from_connection_string(cs, **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        shutdown_bounded(client)


def _hubs_of(item: pytest.Item) -> list[Hub]:
    found: list[Hub] = []
    for value in getattr(item, "funcargs", {}).values():
        if isinstance(value, Hub):
            found.append(value)
        elif isinstance(value, HubFactory):
            found.extend(value.hubs)
        elif isinstance(getattr(value, "nodes", None), list):
            # A cluster (clusterlib.Cluster): its nodes are hubs.
            found.extend(h for h in value.nodes if isinstance(h, Hub))
    unique: list[Hub] = []
    for h in found:
        if all(h is not u for u in unique):
            unique.append(h)
    return unique


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    # Fixtures are set up; make the process trust the hub this test talks to.
    hubs = _hubs_of(item)
    if hubs:
        hubs[0].trust_process()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for h in _hubs_of(item):
            report.sections.append((f"twinhub {h.ip} log", h.log_tail()))
        for value in getattr(item, "funcargs", {}).values():
            # Services a fixture runs beside the hubs (a cluster's load balancer, NATS, ...).
            sections = getattr(value, "failure_sections", None)
            if callable(sections):
                report.sections.extend(sections())
