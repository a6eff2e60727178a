"""Device-management seed, service side: invokes "rebootDevice", prints the device's answer,
then polls the twin until the device reports rebootTime.

Environment: IOTHUB_CONNECTION_STRING, IOTHUB_DEVICE_ID; optional WAIT_COUNT (default 20)
and WAIT_SECONDS (default 1) bound the polling.
"""

from __future__ import annotations

import json
import sys
import time

from azure.iot.hub import IoTHubRegistryManager
from azure.iot.hub.models import CloudToDeviceMethod

from _common import env_float, env_required, say

METHOD_NAME = "rebootDevice"
METHOD_PAYLOAD = '{"method_number":"42"}'


def main() -> int:
    registry = IoTHubRegistryManager(env_required("IOTHUB_CONNECTION_STRING"))
    device_id = env_required("IOTHUB_DEVICE_ID")
    wait_count = int(env_float("WAIT_COUNT", 20))
    wait_s = env_float("WAIT_SECONDS", 1)

    say("Invoking device to reboot...")
    result = registry.invoke_device_method(
        device_id,
        CloudToDeviceMethod(method_name=METHOD_NAME, payload=METHOD_PAYLOAD, response_timeout_in_seconds=60),
    )
    say("Successfully invoked the device to reboot.")
    say("METHOD_STATUS", result.status)
    say("METHOD_PAYLOAD", json.dumps(result.payload, sort_keys=True))

    for _ in range(wait_count):
        reported = registry.get_twin(device_id).properties.reported
        reboot_time = reported.get("rebootTime")
        if reboot_time is not None:
            say("Last reboot time: " + reboot_time)
            return 0
        say("Waiting for device to report last reboot time...")
        time.sleep(wait_s)
    say("GAVE UP waiting for rebootTime")
    return 3


if __name__ == "__main__":
    sys.exit(main())
