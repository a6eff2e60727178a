"""A known defect's reproduction, kept out of the suite until the hub handles it: the name does
not match pytest's test_*.py, so the suite neither runs nor counts it. Run it by hand with
`pytest tests/interop/pending_node_close.py`. The official Node.js EventHubConsumerClient
closes while a partition is still delivering events. At 6a988e8 (frames after a client's end
dropped, its end held for our detach replies) it still fails about half the time: fe2o3's
session refuses outgoing link frames once it has the client's end, and answers
`amqp:illegal-state`. The description below is of the first failure, before those changes.

rhea ends each partition session (detach, then end) and then settles the transfers that were
already on the wire with dispositions on the channel it has just ended. twinhub (fe2o3-amqp's
acceptor drops the channel from its routing table as soon as the client's `end` arrives)
treats those dispositions as frames for an unknown session and closes the whole connection
with `amqp:not-found`, so the detach of the session still open (and of the $cbs links) is
never answered: `EventHubConsumerClient.close()` hangs for 60 s and rejects with
OperationTimeoutError. In the other interleaving the session itself answers with
`end` carrying `amqp:illegal-state`, and the node process exits 13 with its close() pending.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from harness import Hub, unique_id
from node_runner import run_node

pytestmark = pytest.mark.device

DEVICES = 8  # devices hash to partitions: every partition gets a backlog
PER_DEVICE = 60
BODY = "x" * 2000
ATTEMPTS = 4  # the race is per close; a few closes make it near certain
FRAME = re.compile(r"rhea:frames \[connection-(\d+)\]:(\d+) (->|<-) (\w+)#\w+ ?(.*)")


def wire_summary(stderr: str) -> str:
    """The frames that matter: each detach, end and close, and (counted, in runs) the frames
    the client sent on a channel after its own end."""
    ended: set[tuple[str, str]] = set()
    out: list[str] = []
    late = 0
    for line in stderr.splitlines():
        m = FRAME.search(line)
        if not m:
            continue
        conn, ch, way, perf, rest = m.groups()
        key = (conn, ch)
        if way == "->" and perf == "end":
            ended.add(key)
        elif way == "->" and key in ended and perf != "close":
            late += 1
            tag = f"conn {conn} ch {ch} -> {perf} AFTER THE CLIENT'S END"
            if out and out[-1].startswith(tag):
                n = int(out[-1].rsplit("x", 1)[1]) + 1
                out[-1] = f"{tag} x{n}"
            else:
                out.append(f"{tag} x1")
            continue
        if perf in ("detach", "end", "close"):
            out.append(f"conn {conn} ch {ch} {way} {perf} {rest[:90]}")
    return f"{late} frames sent on channels after the client's end:\n" + "\n".join(out)


def events_cs(hub: Hub) -> str:
    return hub.cli("connection-string", "--events", "--data-dir", str(hub.data_dir)).strip()


def test_consumer_closes_cleanly_while_events_are_in_flight(hub, device_client):
    from azure.iot.device import Message

    for d in range(DEVICES):
        client = device_client(hub.device_cs(unique_id(f"nodeclose{d}")))
        client.connect()
        for i in range(PER_DEVICE):
            client.send_message(Message(json.dumps({"i": i, "pad": BODY})))
    for attempt in range(ATTEMPTS):
        # Stop after the first event: other partitions' backlogs are still being delivered.
        started = time.monotonic()
        run = run_node(
            "read_events.mjs",
            hub,
            events_cs(hub),
            "--count",
            "1",
            "--timeout",
            "30",
            timeout=120,
            env={"DEBUG": "rhea:frames"},
        )
        took = time.monotonic() - started
        log = Path(hub.workdir) / f"node-close-{attempt}.log"
        log.write_text(run.stderr)
        ok = run.returncode == 0 and not run.errors and took < 20
        assert ok, (
            f"close #{attempt + 1}: exit {run.returncode} after {took:.0f}s, errors {run.errors}\n"
            f"full rhea trace: {log}\n{wire_summary(run.stderr)}"
        )
