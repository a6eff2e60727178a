"""Twin queries and scheduled jobs through the official SDKs, unchanged.

Service side (azure-iot-hub): IoTHubRegistryManager.query_iot_hub with paging (max_item_count,
continuation token), SELECT *, projections and COUNT() with GROUP BY (non-twin values land in
Twin.additional_properties); IoTHubJobManager.create_scheduled_job for a method job and a twin
job, get_scheduled_job polled until "completed", cancel_scheduled_job, query_scheduled_jobs.
Device side (azure-iot-device): a device answering the tutorial's lockDoor method, and one
receiving a job's desired-property patch. Every test tags its own devices with a fresh marker,
so tests sharing the module hub never see each other's twins.
"""

from __future__ import annotations

import datetime as dt
import queue
import time

import pytest
from azure.iot.hub import IoTHubJobManager
from azure.iot.hub.models import (
    CloudToDeviceMethod,
    JobRequest,
    QuerySpecification,
    Twin,
    TwinProperties,
)
from msrest.exceptions import HttpOperationError

from harness import Hub, assert_iothub_error, sdk_call, unique_id, wait_until

JOB_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def jm(hub: Hub) -> IoTHubJobManager:
    manager = IoTHubJobManager.from_connection_string(hub.service_cs())
    # Explicit, so the manager keeps trusting this hub whichever bundle the process points at.
    manager.protocol.config.connection.verify = str(hub.ca_bundle)
    return manager


def _fleet(rm, marker: str, count: int, tags=lambda i: {}) -> list[str]:
    """Registers `count` devices tagged with `marker` (plus tags(i)); returns their ids in order."""
    ids = [f"{marker}-{i:02d}" for i in range(count)]
    for i, did in enumerate(ids):
        rm.create_device_with_sas(did, None, None, "enabled")
        rm.update_twin(did, Twin(tags={"suite": marker, **tags(i)}))
    return ids


def _query(rm, text: str, continuation_token=None, max_item_count=None):
    return sdk_call(rm.query_iot_hub, QuerySpecification(query=text), continuation_token, max_item_count)


def _wait_for_status(jm: IoTHubJobManager, job_id: str, status: str):
    """Polls get_scheduled_job until the status is exactly `status`; fails on any other end state."""

    def check():
        job = sdk_call(jm.get_scheduled_job, job_id)
        if job.status != status and job.status in ("completed", "failed", "cancelled"):
            raise AssertionError(f"job {job_id} ended as {job.status!r}, not {status!r}: {job.as_dict()}")
        return job if job.status == status else None

    return wait_until(check, JOB_TIMEOUT_S, interval=0.2, what=f"job {job_id} to be {status}")


def _now_iso() -> str:
    # The tutorial's form: a naive UTC ISO string, sent with however many fraction digits it has.
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None).isoformat()


# --------------------------------------------------------------------------------------------
# Queries
# --------------------------------------------------------------------------------------------


def test_query_pages_with_max_item_count_and_continuation_token(rm):
    marker = unique_id("qp")
    ids = _fleet(rm, marker, 7, tags=lambda i: {"n": i})
    text = f"SELECT * FROM devices WHERE tags.suite = '{marker}'"

    sizes, seen, token = [], [], None
    while True:
        page = _query(rm, text, token, 3)
        assert page.type == "twin"
        sizes.append(len(page.items))
        seen += [t.device_id for t in page.items]
        token = page.continuation_token
        if token is None:
            break
        assert isinstance(token, str) and token
        assert len(sizes) < 10, "the pages never ended"
    assert sizes == [3, 3, 1]
    assert sorted(seen) == ids

    # Without max_item_count every row fits the default page: no token.
    page = _query(rm, text)
    assert len(page.items) == 7 and page.continuation_token is None


def test_query_select_star_projections_and_group_by(rm):
    marker = unique_id("qs")
    colors = ["red", "green", "red", "blue", "red", "green"]
    ids = _fleet(rm, marker, len(colors), tags=lambda i: {"color": colors[i], "n": i})

    # SELECT *: whole twins, tags included.
    twins = _query(rm, f"SELECT * FROM devices WHERE tags.suite = '{marker}' AND tags.n < 2").items
    assert sorted(t.device_id for t in twins) == ids[:2]
    for t in twins:
        assert t.tags["suite"] == marker and t.tags["color"] in ("red", "green")
        assert t.etag and isinstance(t.version, int)
        assert isinstance(t.properties.desired["$version"], int)

    # Projections with aliases: known twin fields fill the model, the rest additional_properties.
    rows = _query(
        rm,
        f"SELECT deviceId, tags.color AS color, tags.n AS n FROM devices "
        f"WHERE tags.suite = '{marker}' AND tags.color = 'red'",
    ).items
    got = sorted((r.device_id, r.additional_properties["color"], r.additional_properties["n"]) for r in rows)
    assert got == [(ids[0], "red", 0), (ids[2], "red", 2), (ids[4], "red", 4)]

    # COUNT() alone, then grouped: the fleet-status pattern.
    total = _query(rm, f"SELECT COUNT() AS total FROM devices WHERE tags.suite = '{marker}'").items
    assert [r.additional_properties["total"] for r in total] == [6]
    groups = _query(
        rm,
        f"SELECT tags.color AS color, COUNT() AS cnt FROM devices "
        f"WHERE tags.suite = '{marker}' GROUP BY tags.color",
        max_item_count=1,
    )
    assert groups.continuation_token is None, "an aggregate comes in one page"
    counts = {g.additional_properties["color"]: g.additional_properties["cnt"] for g in groups.items}
    assert counts == {"red": 3, "green": 2, "blue": 1}


def test_query_errors_are_400(rm):
    with pytest.raises(HttpOperationError) as info:
        rm.query_iot_hub(QuerySpecification(query="SELECT * FROM devices WHERE"))
    assert_iothub_error(info.value.response, 400)
    with pytest.raises(HttpOperationError) as info:
        rm.query_iot_hub(QuerySpecification(query="SELECT * FROM devices"), None, 0)
    assert_iothub_error(info.value.response, 400)


# --------------------------------------------------------------------------------------------
# Jobs
# --------------------------------------------------------------------------------------------


@pytest.mark.device
def test_method_job_reaches_a_device_answering_lock_door(hub: Hub, rm, jm, device_client):
    from azure.iot.device import MethodResponse

    marker = unique_id("lock")
    online, offline = _fleet(rm, marker, 2)
    client = device_client(hub.device_cs(online))
    calls: queue.Queue = queue.Queue()

    def handler(request) -> None:
        calls.put((request.name, request.payload))
        status = 200 if request.name == "lockDoor" else 404
        client.send_method_response(MethodResponse.create_from_method_request(request, status, {"locked": True}))

    client.connect()
    client.on_method_request_received = handler

    job_id = unique_id("lockjob")
    request = JobRequest(
        job_id=job_id,
        type="scheduleDeviceMethod",
        cloud_to_device_method=CloudToDeviceMethod(
            method_name="lockDoor", payload={"lockDoor": "now"}, response_timeout_in_seconds=15
        ),
        query_condition=f"tags.suite = '{marker}'",
        start_time=_now_iso(),
        max_execution_time_in_seconds=120,
    )
    created = sdk_call(jm.create_scheduled_job, job_id, request)
    assert created.job_id == job_id and created.type == "scheduleDeviceMethod"
    assert created.status in ("queued", "scheduled", "running", "completed")

    job = _wait_for_status(jm, job_id, "completed")
    stats = job.device_job_statistics
    assert (stats.device_count, stats.succeeded_count, stats.failed_count) == (2, 1, 1), job.as_dict()
    assert (stats.running_count, stats.pending_count) == (0, 0)
    assert job.end_time is not None
    assert calls.get(timeout=5) == ("lockDoor", {"lockDoor": "now"})
    assert calls.empty(), "the device was called once"

    # Per-device records through the twin query API.
    records = _query(rm, f"SELECT * FROM devices.jobs WHERE devices.jobs.jobId = '{job_id}'")
    assert records.type == "deviceJob"
    by_device = {r.device_id: r for r in records.items}
    assert set(by_device) == {online, offline}
    answered = by_device[online]
    assert answered.status == "completed"
    assert answered.additional_properties["jobId"] == job_id
    outcome = answered.additional_properties["outcome"]["deviceMethodResponse"]
    assert outcome == {"status": 200, "payload": {"locked": True}}
    missed = by_device[offline]
    assert missed.status == "failed"
    assert missed.additional_properties["error"]["code"] == "DeviceNotOnline"

    # query_scheduled_jobs: a QueryResult whose items hold the job.
    result = sdk_call(jm.query_scheduled_jobs, "scheduleDeviceMethod", "completed")
    assert result.type == "jobResponse"
    listed = [item for item in result.items if item["jobId"] == job_id]
    assert len(listed) == 1 and listed[0]["status"] == "completed"
    none = sdk_call(jm.query_scheduled_jobs, "scheduleUpdateTwin", "completed")
    assert all(item["jobId"] != job_id for item in none.items)


@pytest.mark.device
def test_twin_job_patch_reaches_the_device(hub: Hub, rm, jm, device_client):
    marker = unique_id("tj")
    (did,) = _fleet(rm, marker, 1)
    client = device_client(hub.device_cs(did))
    patches: queue.Queue = queue.Queue()
    client.connect()
    client.on_twin_desired_properties_patch_received = patches.put

    job_id = unique_id("twinjob")
    request = JobRequest(
        job_id=job_id,
        type="scheduleUpdateTwin",
        update_twin=Twin(
            etag="*",
            tags={"updatedBy": "job"},
            properties=TwinProperties(desired={"lockMode": "auto", "interval": 30}),
        ),
        query_condition=f"deviceId IN ['{did}']",
        start_time=_now_iso(),
        max_execution_time_in_seconds=100,
    )
    sdk_call(jm.create_scheduled_job, job_id, request)
    job = _wait_for_status(jm, job_id, "completed")
    assert job.device_job_statistics.succeeded_count == 1
    assert job.type == "scheduleUpdateTwin"

    patch = patches.get(timeout=15)
    assert patch["lockMode"] == "auto" and patch["interval"] == 30
    assert isinstance(patch["$version"], int)
    twin = rm.get_twin(did)
    assert twin.tags["updatedBy"] == "job" and twin.tags["suite"] == marker
    assert twin.properties.desired["lockMode"] == "auto"
    assert twin.properties.desired["$version"] == patch["$version"]


def test_cancel_a_scheduled_job_and_query_jobs(jm, rm):
    marker = unique_id("cx")
    _fleet(rm, marker, 1)
    job_id = unique_id("later")
    request = JobRequest(
        job_id=job_id,
        type="scheduleUpdateTwin",
        update_twin=Twin(etag="*", properties=TwinProperties(desired={"never": True})),
        query_condition=f"tags.suite = '{marker}'",
        # A datetime, serialized by msrest as YYYY-MM-DDTHH:MM:SS.fffZ.
        start_time=dt.datetime(2099, 1, 1, tzinfo=dt.timezone.utc),
        max_execution_time_in_seconds=60,
    )
    created = sdk_call(jm.create_scheduled_job, job_id, request)
    assert created.status == "scheduled"
    scheduled = sdk_call(jm.query_scheduled_jobs, None, "scheduled")
    assert job_id in [item["jobId"] for item in scheduled.items]

    cancelled = sdk_call(jm.cancel_scheduled_job, job_id)
    assert cancelled.status == "cancelled"
    time.sleep(0.3)
    assert sdk_call(jm.get_scheduled_job, job_id).status == "cancelled"
    by_status = sdk_call(jm.query_scheduled_jobs, "scheduleUpdateTwin", "cancelled")
    assert job_id in [item["jobId"] for item in by_status.items]
    assert "never" not in rm.get_twin(f"{marker}-00").properties.desired

    with pytest.raises(HttpOperationError) as info:
        jm.get_scheduled_job(unique_id("ghost"))
    assert_iothub_error(info.value.response, 404, 404002, "JobNotFound")
    with pytest.raises(HttpOperationError) as info:
        jm.create_scheduled_job(
            "bad-type",
            JobRequest(job_id="bad-type", type="rebootDevice", query_condition="*", max_execution_time_in_seconds=60),
        )
    assert_iothub_error(info.value.response, 400)
