"""Cross-language checks: the Rust example programs (examples/*.rs, built on twinhub-sdk)
against the official Azure IoT Python SDKs, through a real twinhub.

(a) Rust devices answered by the Python service SDK: dm_getstarted_device (rebootDevice),
    simulated_device (DeviceMethod) and dm_firmware_update_device (firmwareUpdate, progress
    read back through the twin).
(b) Python devices (the seed apps in apps/) driven by the Rust service programs:
    call_method_on_device and dm_getstarted_service.

The Rust programs run as a user runs them: device programs dial the standard ports (8883, or
443 over WebSockets) of the hub's 127.0.0.N address, and every program trusts the hub through
SSL_CERT_FILE alone (hub.env()), exactly like the Python apps. The binaries come from
$TWINHUB_EXAMPLES_DIR, else the `examples` dir next to the hub binary (target/debug/examples);
scripts/test-interop.sh builds them.
"""

from __future__ import annotations

import datetime
import json
import os
import queue
import subprocess
import threading
import time
from pathlib import Path

import pytest
from azure.iot.hub.models import CloudToDeviceMethod

from apprunner import App
from harness import Hub, hub_binary, sdk_call, unique_id

pytestmark = pytest.mark.device

TRANSPORTS = ["mqtt", "websockets"]
DEVICE_RESPONSE = {"Response": "This is the response from the device"}
SEED_PAYLOAD = '{"method_number":"42"}'


def examples_dir() -> Path:
    env = os.environ.get("TWINHUB_EXAMPLES_DIR")
    return Path(env) if env else hub_binary().parent / "examples"


class RustExample(App):
    """A Rust example binary, run and read like the Python seed apps (apprunner.App).

    Only the command differs: an example is its own executable rather than a script for the
    interpreter, so this sets up the same pipes and reader threads App's methods rely on.
    """

    def __init__(self, name: str, env: dict[str, str], args: list[str] | None = None) -> None:
        path = examples_dir() / name
        if not path.is_file():
            raise AssertionError(
                f"Rust example {path} is missing: build it with `cargo build -p twinhub --examples` "
                "(scripts/test-interop.sh does) or set TWINHUB_EXAMPLES_DIR"
            )
        self.script = path
        self.proc = subprocess.Popen(
            [str(path), *(args or [])],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
        self.lines = []
        self.err_lines = []
        self._q = queue.Queue()
        self._readers = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, True), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, False), daemon=True),
        ]
        for t in self._readers:
            t.start()

    def run_to_end(self, timeout: float) -> "RustExample":
        self.wait(timeout)
        return self

    def value_after(self, prefix: str) -> str:
        for line in self.lines:
            if line.startswith(prefix):
                return line[len(prefix) :]
        raise AssertionError(f"{self.script.name}: no line starting with {prefix!r}\n{self.output()}")

    def assert_in_order(self, expected: list[str]) -> None:
        at = 0
        for want in expected:
            try:
                at = self.lines.index(want, at) + 1
            except ValueError:
                raise AssertionError(
                    f"{self.script.name}: no line {want!r} in order {expected}\n{self.output()}"
                ) from None


def _device_env(hub: Hub, device_id: str, transport: str = "mqtt", **extra: str) -> dict[str, str]:
    env = hub.env()
    env["IOTHUB_DEVICE_CONNECTION_STRING"] = hub.device_cs(device_id)
    env["IOTHUB_DEVICE_TRANSPORT"] = transport
    env.update(extra)
    return env


def _service_env(hub: Hub, device_id: str) -> dict[str, str]:
    env = hub.env()
    env.pop("IOTHUB_DEVICE_CONNECTION_STRING", None)
    env["IOTHUB_CONNECTION_STRING"] = hub.service_cs()
    env["IOTHUB_DEVICE_ID"] = device_id
    return env


def _invoke(hub: Hub, device_id: str, method: str, payload) -> object:
    # The Rust device prints its ready line once connected; its method subscription follows
    # within milliseconds, so the call may wait for it (connect_timeout) rather than race it.
    return sdk_call(
        hub.registry().invoke_device_method,
        device_id,
        CloudToDeviceMethod(
            method_name=method,
            payload=payload,
            response_timeout_in_seconds=60,
            connect_timeout_in_seconds=30,
        ),
    )


def _parse_time(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


# --------------------------------------------------------------------------------------------
# (a) Rust devices, Python service SDK
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_rust_reboot_device_answers_python_service(hub: Hub, transport: str):
    did = unique_id("rs-dm")
    before = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=1)
    args = ["--reboot-delay", "1", "--max-requests", "1", "--timeout", "60"]
    device = RustExample("dm_getstarted_device", _device_env(hub, did, transport), args)
    try:
        device.wait_for_line(r"^IoTHubDeviceClient waiting for commands", timeout=30)
        result = _invoke(hub, did, "rebootDevice", SEED_PAYLOAD)
        assert result.status == 200, device.output()
        assert result.payload == DEVICE_RESPONSE
        assert device.wait(timeout=30) == 0, device.output()
        device.assert_in_order(
            ["Rebooting device", "Device rebooted", "Device twins updated with latest rebootTime"]
        )
    finally:
        device.terminate()

    # The device reports before it answers: the Python service finds rebootTime at once.
    reboot_time = hub.registry().get_twin(did).properties.reported["rebootTime"]
    assert before <= _parse_time(reboot_time) <= datetime.datetime.now(datetime.timezone.utc)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_rust_simulated_device_answers_python_service(hub: Hub, transport: str):
    did = unique_id("rs-sim")
    args = ["--max-requests", "1", "--timeout", "60"]
    device = RustExample("simulated_device", _device_env(hub, did, transport), args)
    try:
        device.wait_for_line(r"^IoTHubClient waiting for direct method call", timeout=30)
        result = _invoke(hub, did, "DeviceMethod", SEED_PAYLOAD)
        assert result.status == 200, device.output()
        assert result.payload == DEVICE_RESPONSE
        assert device.wait(timeout=30) == 0, device.output()
    finally:
        device.terminate()
    label = "MQTT_WS" if transport == "websockets" else "MQTT"
    device.assert_in_order([f"    Protocol {label}", "Direct method called.", "methodName = DeviceMethod"])
    # The Python SDK sends the seed's payload as a JSON string holding JSON; it arrives as such.
    assert json.loads(device.value_after("payload = ")) == SEED_PAYLOAD


def test_rust_firmware_device_reports_progress_to_python_service(hub: Hub):
    did = unique_id("rs-fw")
    args = ["--step-delay", "0.2", "--max-requests", "1", "--timeout", "60"]
    device = RustExample("dm_firmware_update_device", _device_env(hub, did), args)
    uri = "https://firmware.example.com/images/v3.bin"
    try:
        device.wait_for_line(r"^IoTHubDeviceClient waiting for commands", timeout=30)
        result = _invoke(hub, did, "firmwareUpdate", {"fwPackageUri": uri})
        assert result.status == 200, device.output()
        assert result.payload == {"Response": "Firmware update started"}
        assert device.wait(timeout=30) == 0, device.output()
    finally:
        device.terminate()
    device.assert_in_order(
        [f"firmwareUpdate status: {s}" for s in ("waiting", "downloading", "downloadComplete", "applying")]
        + ["firmwareUpdate status: applyComplete", "Firmware update complete"]
    )

    state = hub.registry().get_twin(did).properties.reported["iothubDM"]["firmwareUpdate"]
    assert state["status"] == "applyComplete"
    assert state["fwPackageUri"] == uri
    assert "error" not in state
    times = [
        _parse_time(state[k])
        for k in (
            "startedWaitingTime",
            "startedDownloadingTime",
            "downloadCompleteTime",
            "startedApplyingTime",
            "lastFirmwareUpdate",
        )
    ]
    assert times == sorted(times), state


# --------------------------------------------------------------------------------------------
# (b) Python devices, Rust service programs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_rust_call_method_drives_python_device(hub: Hub, transport: str):
    did = unique_id("py-sim")
    device = App("methods_device.py", _device_env(hub, did, transport, APP_SECONDS="60"))
    try:
        device.wait_for_line(r"^READY$", timeout=30)
        service = RustExample("call_method_on_device", _service_env(hub, did)).run_to_end(60)
        assert service.proc.returncode == 0, service.output() + device.output()
        service.assert_in_order(
            [
                "Device Method name       : DeviceMethod",
                f"Device Method payload    : {SEED_PAYLOAD}",
                "Response status          : 200",
            ]
        )
        assert json.loads(service.value_after("Response payload         : ")) == DEVICE_RESPONSE

        device.wait_for_line(r"^Direct method called\.$", timeout=5)
        m = device.wait_for_line(r"^METHOD DeviceMethod PAYLOAD (.*)$", timeout=5)
        # The Rust service sends the payload as a JSON object, which the Python device sees.
        assert json.loads(m.group(1)) == {"method_number": "42"}
        assert device.wait(timeout=30) == 0, device.output()
    finally:
        device.terminate()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_rust_dm_service_drives_python_device(hub: Hub, transport: str):
    did = unique_id("py-dm")
    env = _device_env(hub, did, transport, REBOOT_SECONDS="1", APP_SECONDS="60")
    device = App("dm_device.py", env)
    try:
        device.wait_for_line(r"^READY$", timeout=30)
        started = time.monotonic()
        args = ["--poll-interval", "0.5", "--max-polls", "40"]
        service = RustExample("dm_getstarted_service", _service_env(hub, did), args).run_to_end(90)
        assert service.proc.returncode == 0, service.output() + device.output()
        # The seed device reboots before it answers: the call lasts at least the reboot.
        assert time.monotonic() - started >= 1
        service.assert_in_order(
            [
                "Invoking device to reboot...",
                "Successfully invoked the device to reboot.",
                json.dumps(DEVICE_RESPONSE, separators=(",", ":")),
            ]
        )
        reported = device.wait_for_line(r"^REPORTED rebootTime=(.*)$", timeout=5).group(1)
        assert service.value_after("Last reboot time: ") == reported
        assert device.wait(timeout=30) == 0, device.output()
    finally:
        device.terminate()

    twin = hub.registry().get_twin(did)
    assert twin.properties.reported["rebootTime"] == reported


def test_rust_service_reports_unknown_device(hub: Hub):
    service = RustExample("call_method_on_device", _service_env(hub, unique_id("nobody"))).run_to_end(60)
    assert service.proc.returncode != 0, service.output()
    assert any("DeviceNotFound" in line for line in service.err_lines), service.output()
    # Nothing about the failure hides in a half-printed success.
    assert not any(line.startswith("Response status") for line in service.lines)
