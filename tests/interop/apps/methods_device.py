"""Direct-methods seed, device side: a method handler answers "DeviceMethod" with 200 and
{"Response": "This is the response from the device"}.

Environment: IOTHUB_DEVICE_CONNECTION_STRING; optional IOTHUB_DEVICE_TRANSPORT=websockets,
APP_SECONDS (default 60), MAX_REQUESTS (default 1). Prints READY once the handler is set.
"""

from __future__ import annotations

import json
import sys
import threading
import time

from azure.iot.device import IoTHubDeviceClient, MethodResponse

from _common import env_float, env_required, say, use_websockets


def main() -> int:
    conn_str = env_required("IOTHUB_DEVICE_CONNECTION_STRING")
    deadline = time.monotonic() + env_float("APP_SECONDS", 60)
    wanted = int(env_float("MAX_REQUESTS", 1))
    done = threading.Event()
    count = 0
    lock = threading.Lock()

    client = IoTHubDeviceClient.create_from_connection_string(conn_str, websockets=use_websockets())

    def on_method(request) -> None:
        nonlocal count
        if request.name == "DeviceMethod":
            say("Direct method called.")
            status, payload = 200, {"Response": "This is the response from the device"}
        else:
            status, payload = 404, {"Response": f"unknown method {request.name}"}
        say("METHOD", request.name, "PAYLOAD", json.dumps(request.payload))
        client.send_method_response(MethodResponse.create_from_method_request(request, status, payload))
        say("RESPONDED", status)
        with lock:
            count += 1
            if count >= wanted:
                done.set()

    try:
        client.connect()
        client.on_method_request_received = on_method  # subscribes before returning
        say("READY")
        while not done.is_set() and time.monotonic() < deadline:
            done.wait(0.5)
        if not done.is_set():
            say(f"TIMEOUT handled {count} of {wanted} requests")
            return 2
        return 0
    finally:
        client.shutdown()


if __name__ == "__main__":
    sys.exit(main())
