"""The two seed scenarios, run as unchanged standalone apps (apps/*.py) over MQTT and WebSockets.

(a) device management: the service invokes rebootDevice, the device "reboots", reports
rebootTime and answers; the service then finds rebootTime in the twin.
(b) direct methods: a handler-style device answers DeviceMethod.
The apps trust the hub through environment variables only (hub.env()).
"""

from __future__ import annotations

import json

import pytest

from apprunner import App, run_app
from harness import Hub, unique_id

pytestmark = pytest.mark.device

TRANSPORTS = ["mqtt", "websockets"]
DEVICE_RESPONSE = {"Response": "This is the response from the device"}


def _device_env(hub: Hub, device_id: str, transport: str, **extra: str) -> dict[str, str]:
    env = hub.env()
    env["IOTHUB_DEVICE_CONNECTION_STRING"] = hub.device_cs(device_id)
    env["IOTHUB_DEVICE_TRANSPORT"] = transport
    env.update(extra)
    return env


def _service_env(hub: Hub, device_id: str, **extra: str) -> dict[str, str]:
    env = hub.env()
    env["IOTHUB_CONNECTION_STRING"] = hub.service_cs()
    env["IOTHUB_DEVICE_ID"] = device_id
    env.update(extra)
    return env


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_device_management_reboot_seed(hub: Hub, transport: str):
    did = unique_id("dm")
    device = App("dm_device.py", _device_env(hub, did, transport, REBOOT_SECONDS="2", APP_SECONDS="60"))
    try:
        device.wait_for_line(r"^READY$", timeout=30)
        service = run_app(
            "dm_service.py", _service_env(hub, did, WAIT_COUNT="20", WAIT_SECONDS="1"), timeout=90
        )
        assert service.proc.returncode == 0, service.output() + device.output()

        out = service.lines
        assert "METHOD_STATUS 200" in out, service.output()
        assert "METHOD_PAYLOAD " + json.dumps(DEVICE_RESPONSE, sort_keys=True) in out, service.output()

        # The device saw the seed's payload unchanged: a JSON string holding JSON.
        m = device.wait_for_line(r"^METHOD rebootDevice PAYLOAD (.*)$", timeout=5)
        assert json.loads(m.group(1)) == '{"method_number":"42"}'
        reported = device.wait_for_line(r"^REPORTED rebootTime=(.*)$", timeout=5).group(1)
        last = [line for line in out if line.startswith("Last reboot time: ")]
        assert last == [f"Last reboot time: {reported}"], service.output()

        assert device.wait(timeout=30) == 0, device.output()
    finally:
        device.terminate()

    # The reported property is really stored, not only echoed to the service app.
    assert hub.registry().get_twin(did).properties.reported["rebootTime"] == reported


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_direct_method_seed(hub: Hub, transport: str):
    did = unique_id("dm")
    device = App("methods_device.py", _device_env(hub, did, transport, APP_SECONDS="60"))
    try:
        device.wait_for_line(r"^READY$", timeout=30)
        service = run_app("methods_service.py", _service_env(hub, did), timeout=90)
        assert service.proc.returncode == 0, service.output() + device.output()
        out = service.lines
        assert "Response status          : 200" in out, service.output()
        assert "Response payload         : " + json.dumps(DEVICE_RESPONSE, sort_keys=True) in out, (
            service.output()
        )

        device.wait_for_line(r"^Direct method called\.$", timeout=5)
        m = device.wait_for_line(r"^METHOD DeviceMethod PAYLOAD (.*)$", timeout=5)
        assert json.loads(m.group(1)) == '{"method_number":"42"}'
        assert device.wait(timeout=30) == 0, device.output()
    finally:
        device.terminate()
