"""Shared bits of the seed apps: environment parsing and a bounded run time.

The apps are ordinary SDK programs; they trust the hub only through SSL_CERT_FILE (device)
and REQUESTS_CA_BUNDLE (service), set by the test that starts them.
"""

from __future__ import annotations

import os
import sys


def env_required(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        print(f"missing environment variable {name}", file=sys.stderr, flush=True)
        sys.exit(64)
    return value


def env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def use_websockets() -> bool:
    return os.environ.get("IOTHUB_DEVICE_TRANSPORT", "mqtt").lower() in ("websockets", "mqtt_ws", "ws")


def say(*parts: object) -> None:
    print(*parts, flush=True)
