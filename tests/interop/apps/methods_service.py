"""Direct-methods seed, service side: invokes "DeviceMethod" and prints the response.

Environment: IOTHUB_CONNECTION_STRING, IOTHUB_DEVICE_ID.
"""

from __future__ import annotations

import json
import sys

from azure.iot.hub import IoTHubRegistryManager
from azure.iot.hub.models import CloudToDeviceMethod

from _common import env_required, say

METHOD_NAME = "DeviceMethod"
METHOD_PAYLOAD = '{"method_number":"42"}'
TIMEOUT = 60


def main() -> int:
    registry = IoTHubRegistryManager(env_required("IOTHUB_CONNECTION_STRING"))
    device_id = env_required("IOTHUB_DEVICE_ID")
    result = registry.invoke_device_method(
        device_id,
        CloudToDeviceMethod(
            method_name=METHOD_NAME, payload=METHOD_PAYLOAD, response_timeout_in_seconds=TIMEOUT
        ),
    )
    say("Device Method called")
    say("Device Method name       :", METHOD_NAME)
    say("Device Method payload    :", METHOD_PAYLOAD)
    say("Response status          :", result.status)
    say("Response payload         :", json.dumps(result.payload, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
