"""Runs the Node.js interop programs of tests/interop/node against a hub.

The packages (the official @azure/event-hubs, azure-iothub, azure-iot-device with
azure-iot-device-http, rhea, ws; exact versions in node/package-lock.json) are installed by
scripts/node-env.sh, which scripts/test-interop.sh runs before pytest and exports as
TWINHUB_NODE_MODULES; a pytest run started by hand calls the script itself. The programs trust
the hub's CA through NODE_EXTRA_CA_CERTS only, and print one JSON object per line, with a
"type" ("event", "error", "redirect", "done", "fatal", and the types each program documents).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import REPO, Hub

NODE_DIR = Path(__file__).resolve().parent / "node"
NODE_ENV_SCRIPT = REPO / "scripts" / "node-env.sh"
NODE_ENV_TIMEOUT_S = 600.0

_modules: Path | None = None


def node_modules() -> Path:
    """The node_modules directory of scripts/node-env.sh; installs it when not given."""
    global _modules
    if _modules is not None:
        return _modules
    given = os.environ.get("TWINHUB_NODE_MODULES")
    if given:
        path = Path(given)
        if not (path / "@azure" / "event-hubs" / "package.json").is_file():
            raise AssertionError(f"TWINHUB_NODE_MODULES={given} holds no @azure/event-hubs")
    else:
        res = subprocess.run(
            [str(NODE_ENV_SCRIPT)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=NODE_ENV_TIMEOUT_S,
        )
        if res.returncode != 0:
            raise AssertionError(
                f"{NODE_ENV_SCRIPT} exited {res.returncode}:\n{res.stderr.decode(errors='replace')}"
            )
        path = Path(res.stdout.decode().strip().splitlines()[-1])
    _modules = path
    return path


def node_binary() -> str:
    node = shutil.which("node")
    if node is None:
        raise AssertionError("node is not on PATH (scripts/node-env.sh installs it on Debian)")
    return node


@dataclass
class NodeRun:
    """What one program run printed, split by line type."""

    args: list[str]
    returncode: int
    lines: list[dict[str, Any]]
    stderr: str
    garbage: list[str] = field(default_factory=list)

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line.get("type") == kind]

    @property
    def events(self) -> list[dict[str, Any]]:
        return self.of_type("event")

    @property
    def errors(self) -> list[dict[str, Any]]:
        return self.of_type("error") + self.of_type("fatal")

    def of_device(self, device_id: str) -> list[dict[str, Any]]:
        return [
            e for e in self.events if e["systemProperties"].get("iothub-connection-device-id") == device_id
        ]

    def explain(self) -> str:
        """For assertion messages: the exit code, error lines and stderr's tail."""
        errs = "\n".join(json.dumps(e) for e in self.errors) or "(none)"
        tail = "\n".join(self.stderr.splitlines()[-60:])
        junk = "\n".join(self.garbage[:20])
        return (
            f"node {' '.join(self.args[:1])} ... exited {self.returncode}; "
            f"{len(self.events)} events\nerror lines:\n{errs}\n"
            f"non-JSON stdout:\n{junk}\nstderr (tail):\n{tail}"
        )


def run_node(
    script: str,
    hub: Hub,
    *args: str,
    timeout: float = 60.0,
    env: dict[str, str] | None = None,
) -> NodeRun:
    """Runs node/<script> with the hub's CA trusted; bounded by `timeout` (then killed)."""
    run_env = dict(os.environ)
    run_env["TWINHUB_NODE_MODULES"] = str(node_modules())
    run_env["NODE_EXTRA_CA_CERTS"] = str(hub.ca_pem)
    # Node's own trust store plus the hub's CA; nothing else may steer it.
    for var in ("SSL_CERT_FILE", "SSL_CERT_DIR", "NODE_TLS_REJECT_UNAUTHORIZED"):
        run_env.pop(var, None)
    if env:
        run_env.update(env)
    cmd = [node_binary(), str(NODE_DIR / script), *args]
    try:
        res = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            env=run_env,
            cwd=str(NODE_DIR),
        )
        rc, out, err = res.returncode, res.stdout, res.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = -9, e.stdout or b"", (e.stderr or b"") + f"\n(killed after {timeout}s)".encode()
    lines: list[dict[str, Any]] = []
    garbage: list[str] = []
    for raw in out.decode(errors="replace").splitlines():
        try:
            obj = json.loads(raw)
        except ValueError:
            garbage.append(raw)
            continue
        if isinstance(obj, dict):
            lines.append(obj)
        else:
            garbage.append(raw)
    return NodeRun([script, *args], rc, lines, err.decode(errors="replace"), garbage)
