"""Finding the built-in events endpoint from the IoT Hub connection string alone, as the newest
az CLI IoT extension does for `az iot hub monitor-events --login <connection string>`: the
pure-Python AMQP stack inside azure-eventhub (`azure.eventhub._pyamqp`) signs in with SASL
ANONYMOUS and a CBS put-token for audience `<host>` (an IoT Hub-signed SAS token, sr=<host>),
attaches a receiver to the hub's own `messages/events/$management`, and catches the
`amqp:link:redirect` detach (AMQPLinkRedirect). From its `hostname` and `address` it builds
`Endpoint=sb://<hostname>/;...;EntityPath=<entity>` and reads with EventHubConsumerClient.
The SDK is not patched: trust is given with its own `connection_verify` keyword.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections import namedtuple

import pytest

from harness import Hub, service_sas, unique_id

pytestmark = pytest.mark.device

RECEIVE_TIMEOUT_S = 30.0
TOKEN_TTL_S = 360

# What pyamqp's CBS auth calls get_token() for.
AccessToken = namedtuple("AccessToken", ["token", "expires_on"])


def discover(hub: Hub, source: str) -> "object":
    """Runs the CLI's redirect discovery against `source`; returns the AMQPLinkRedirect."""
    from azure.eventhub._pyamqp import ReceiveClient
    from azure.eventhub._pyamqp.authentication import _CBSAuth
    from azure.eventhub._pyamqp.error import AMQPLinkRedirect

    creds = hub.credentials("service")

    def get_token() -> AccessToken:
        se = int(time.time()) + TOKEN_TTL_S
        return AccessToken(service_sas(creds.host, creds.policy, creds.key, se), se)

    auth = _CBSAuth(
        uri=source,
        audience=creds.host,
        token_type=b"servicebus.windows.net:sastoken",
        get_token=get_token,
        expires_in=TOKEN_TTL_S,
    )
    client = ReceiveClient(
        creds.host,
        source,
        auth=auth,
        network_trace=True,  # frames go to the azure.eventhub._pyamqp loggers (shown on failure)
        timeout=30000,
        prefetch=1,
        connection_verify=str(hub.ca_pem),
    )
    try:
        client.open()
        got = client.receive_message_batch(max_batch_size=1, timeout=5000)
    except AMQPLinkRedirect as redirect:
        return redirect
    finally:
        client.close()
    raise AssertionError(f"no amqp:link:redirect from {source}; received {got!r}")


def entity_of(hub: Hub) -> str:
    cs = hub.cli("connection-string", "--events", "--data-dir", str(hub.data_dir)).strip()
    return cs.split("EntityPath=", 1)[1].split(";")[0]


def path_from_address(address: str) -> str:
    """The CLI's reading of a redirect address: drop the scheme, host:port and /$management."""
    path = address.replace("amqps://", "").split("/", 1)[1]
    if path.endswith("/$management"):
        path = path[: -len("/$management")]
    return path


def send(device_client, hub: Hub, device_id: str, n: int) -> list[dict]:
    from azure.iot.device import Message

    client = device_client(hub.device_cs(device_id))
    client.connect()
    sent = []
    for i in range(n):
        msg = Message(json.dumps({"i": i, "t": 21.5 + i}))
        msg.message_id = str(uuid.uuid4())
        msg.content_type = "application/json"
        msg.content_encoding = "utf-8"
        msg.custom_properties["level"] = f"l{i}"
        client.send_message(msg)
        sent.append({"i": i, "message_id": msg.message_id})
    return sent


async def read_async(cs: str, hub: Hub, device_id: str, want: int) -> list:
    """The CLI's reader: azure.eventhub.aio.EventHubConsumerClient, all partitions, from the start."""
    from azure.eventhub.aio import EventHubConsumerClient

    client = EventHubConsumerClient.from_connection_string(
        cs, consumer_group="$Default", connection_verify=str(hub.ca_pem)
    )
    events: list = []
    done = asyncio.Event()

    async def on_event(partition_context, event):
        if event is None:
            return
        if event.system_properties.get(b"iothub-connection-device-id") == device_id.encode():
            events.append(event)
            if len(events) >= want:
                done.set()

    async with client:
        partition_ids = await client.get_partition_ids()
        assert partition_ids == ["0", "1", "2", "3"]
        task = asyncio.create_task(client.receive(on_event=on_event, starting_position="-1"))
        try:
            await asyncio.wait_for(done.wait(), RECEIVE_TIMEOUT_S)
        except asyncio.TimeoutError:
            pass
    # close() has stopped the partition consumers; receive() itself only notices at the end of
    # its load-balancing sleep (30 s by default), so it is cancelled rather than awaited.
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return events


def test_cli_discovery_through_the_redirect_then_read(hub, device_client, caplog):
    device_id = unique_id("redir")
    sent = send(device_client, hub, device_id, 4)

    # The discovery's frames are kept (shown if the test fails); the reader's are not.
    with caplog.at_level(logging.DEBUG, logger="azure.eventhub._pyamqp"):
        redirect = discover(hub, f"amqps://{hub.hostname}/messages/events/$management")
    entity = entity_of(hub)
    assert redirect.condition == b"amqp:link:redirect"
    assert redirect.hostname == hub.hostname
    assert redirect.network_host == hub.hostname
    assert redirect.port == 5671
    assert redirect.address == f"amqps://{hub.hostname}:5671/{entity}/$management"
    path = path_from_address(redirect.address)
    assert path == entity

    creds = hub.credentials("service")
    cs = (
        f"Endpoint=sb://{redirect.hostname}/;SharedAccessKeyName={creds.policy};"
        f"SharedAccessKey={creds.key};EntityPath={path}"
    )
    events = asyncio.run(read_async(cs, hub, device_id, len(sent)))
    assert len(events) == len(sent), f"read {len(events)} of {len(sent)}"
    for ev, want in zip(events, sent, strict=True):
        assert json.loads(ev.body_as_str())["i"] == want["i"]
        assert ev.properties[b"level"] == f"l{want['i']}".encode()
        sp = ev.system_properties
        assert sp[b"message-id"] in (want["message_id"], want["message_id"].encode())
        assert sp[b"content-type"] in (b"application/json", "application/json")
    seqs = [e.sequence_number for e in events]
    assert seqs == sorted(seqs)


def test_partition_path_redirects_to_the_same_partition(hub, caplog):
    """The older samples attach to messages/events/ConsumerGroups/<cg>/Partitions/<n> instead."""
    with caplog.at_level(logging.DEBUG, logger="azure.eventhub._pyamqp"):
        redirect = discover(
            hub, f"amqps://{hub.hostname}/messages/events/ConsumerGroups/$Default/Partitions/2"
        )
    entity = entity_of(hub)
    assert redirect.hostname == hub.hostname and redirect.port == 5671
    assert redirect.address == f"amqps://{hub.hostname}:5671/{entity}/ConsumerGroups/$Default/Partitions/2"
    # azure-eventhub's IoT Hub sample finds the entity name with this pattern.
    assert re.search(r":\d+\/.*/ConsumerGroups", redirect.address)
