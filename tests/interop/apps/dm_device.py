"""Device-management seed, device side: waits for "rebootDevice", simulates a reboot,
reports rebootTime, then answers 200.

Environment: IOTHUB_DEVICE_CONNECTION_STRING; optional IOTHUB_DEVICE_TRANSPORT=websockets,
REBOOT_SECONDS (default 2), APP_SECONDS (default 60, the bounded run time),
MAX_REQUESTS (default 1). Prints READY once it listens for the method.
"""

from __future__ import annotations

import datetime
import json
import sys
import time

from azure.iot.device import IoTHubDeviceClient, MethodResponse

from _common import env_float, env_required, say, use_websockets

METHOD_NAME = "rebootDevice"


def main() -> int:
    conn_str = env_required("IOTHUB_DEVICE_CONNECTION_STRING")
    reboot_s = env_float("REBOOT_SECONDS", 2)
    deadline = time.monotonic() + env_float("APP_SECONDS", 60)
    wanted = int(env_float("MAX_REQUESTS", 1))

    client = IoTHubDeviceClient.create_from_connection_string(conn_str, websockets=use_websockets())
    try:
        client.connect()
        # A non-blocking receive subscribes to methods before we announce readiness.
        client.receive_method_request(METHOD_NAME, block=False)
        say("READY")
        handled = 0
        while handled < wanted and time.monotonic() < deadline:
            request = client.receive_method_request(METHOD_NAME, block=True, timeout=1)
            if request is None:
                continue
            say("METHOD", request.name, "PAYLOAD", json.dumps(request.payload))
            say("Rebooting device")
            time.sleep(reboot_s)
            say("Device rebooted")
            reboot_time = str(datetime.datetime.now())
            client.patch_twin_reported_properties({"rebootTime": reboot_time})
            say("REPORTED rebootTime=" + reboot_time)
            client.send_method_response(
                MethodResponse(request.request_id, 200, {"Response": "This is the response from the device"})
            )
            say("RESPONDED 200")
            handled += 1
        if handled < wanted:
            say(f"TIMEOUT handled {handled} of {wanted} requests")
            return 2
        return 0
    finally:
        client.shutdown()


if __name__ == "__main__":
    sys.exit(main())
