"""Device twins over REST through IoTHubRegistryManager: get, update (PATCH), replace (PUT).

Checks the document shape the SDKs and apps read ($version, $metadata, version, etag) and the
merge rules (null deletes, $version +1 per change, read-only fields ignored on replace).
"""

from __future__ import annotations

import datetime as dt

from azure.iot.hub.models import Twin, TwinProperties

from harness import Hub, unique_id


def _new_device(rm) -> str:
    did = unique_id("twin")
    rm.create_device_with_sas(did, None, None, "enabled")
    return did


def _user_keys(section: dict) -> dict:
    return {k: v for k, v in section.items() if not k.startswith("$")}


def _assert_section_shape(section: dict, name: str) -> None:
    assert isinstance(section.get("$version"), int), f"{name} lacks an integer $version: {section}"
    meta = section.get("$metadata")
    assert isinstance(meta, dict), f"{name} lacks $metadata: {section}"
    assert "$lastUpdated" in meta, f"{name}.$metadata lacks $lastUpdated: {meta}"
    dt.datetime.fromisoformat(meta["$lastUpdated"])


def test_get_twin_shape(rm, hub: Hub):
    did = _new_device(rm)
    twin = rm.get_twin(did)
    assert rm.recorder.last_call()[0] == "GET" and rm.recorder.last == 200
    assert twin.device_id == did
    assert twin.etag and isinstance(twin.version, int)
    assert isinstance(twin.properties.desired["$version"], int)
    assert isinstance(twin.properties.reported["$version"], int)

    r = hub.rest("GET", f"/twins/{did}")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["deviceId"] == did
    assert isinstance(body["etag"], str) and body["etag"]
    assert isinstance(body["version"], int)
    _assert_section_shape(body["properties"]["desired"], "desired")
    _assert_section_shape(body["properties"]["reported"], "reported")
    assert _user_keys(body["properties"]["desired"]) == {}
    assert _user_keys(body["properties"]["reported"]) == {}
    assert body.get("tags", {}) in ({}, None)


def test_update_twin_merges_tags_and_desired(rm, hub: Hub):
    did = _new_device(rm)
    t0 = rm.get_twin(did)
    v0 = t0.properties.desired["$version"]

    t1 = rm.update_twin(
        did,
        Twin(
            tags={"site": "lab", "floor": 3},
            properties=TwinProperties(desired={"temp": 21, "mode": {"fan": "auto"}}),
        ),
        t0.etag,
    )
    assert rm.recorder.last_call()[0] == "PATCH" and rm.recorder.last == 200
    assert t1.tags == {"site": "lab", "floor": 3}
    assert _user_keys(t1.properties.desired) == {"temp": 21, "mode": {"fan": "auto"}}
    assert t1.properties.desired["$version"] == v0 + 1
    assert t1.version > t0.version
    assert t1.etag != t0.etag
    meta = t1.properties.desired["$metadata"]
    assert "$lastUpdated" in meta
    assert "$lastUpdated" in meta["temp"], f"no per-key metadata: {meta}"
    assert meta["temp"].get("$lastUpdatedVersion") == v0 + 1, meta

    # A second patch merges; null deletes a key (and its metadata); etag None sends If-Match "*".
    t2 = rm.update_twin(
        did,
        Twin(
            tags={"floor": None, "owner": "ops"},
            properties=TwinProperties(desired={"temp": None, "mode": {"speed": 2}}),
        ),
    )
    assert rm.recorder.last == 200
    assert t2.tags == {"site": "lab", "owner": "ops"}
    assert _user_keys(t2.properties.desired) == {"mode": {"fan": "auto", "speed": 2}}
    assert "temp" not in t2.properties.desired["$metadata"]
    assert t2.properties.desired["$version"] == v0 + 2
    assert t2.version > t1.version

    # What the update returned is what is stored.
    stored = hub.rest("GET", f"/twins/{did}").json()
    assert stored["tags"] == t2.tags
    assert _user_keys(stored["properties"]["desired"]) == _user_keys(t2.properties.desired)
    assert stored["properties"]["desired"]["$version"] == v0 + 2
    assert stored["etag"] == t2.etag


def test_update_twin_tags_only_keeps_desired_version(rm):
    did = _new_device(rm)
    v0 = rm.get_twin(did).properties.desired["$version"]
    t = rm.update_twin(did, Twin(tags={"only": "tags"}))
    assert rm.recorder.last == 200
    assert t.tags == {"only": "tags"}
    assert t.properties.desired["$version"] == v0, "a tags-only patch must not bump desired $version"


def test_replace_twin_with_edited_get_twin_result(rm, hub: Hub):
    did = _new_device(rm)
    rm.update_twin(
        did, Twin(tags={"old": 1, "keep": "x"}, properties=TwinProperties(desired={"a": 1, "b": 2}))
    )
    twin = rm.get_twin(did)
    v_before = twin.properties.desired["$version"]
    reported_before = dict(twin.properties.reported)
    device_etag_before = rm.get_device(did).etag

    # Edit the object exactly as an app would; every read-only field is echoed back as-is.
    twin.tags = {"new": True}
    twin.properties.desired.pop("a")
    twin.properties.desired["c"] = {"nested": [1, 2]}
    twin.properties.reported["injected"] = "must be ignored"

    replaced = rm.replace_twin(did, twin, twin.etag)
    assert rm.recorder.last_call()[0] == "PUT" and rm.recorder.last == 200
    assert replaced.tags == {"new": True}, "replace must drop tags not in the document"
    assert _user_keys(replaced.properties.desired) == {"b": 2, "c": {"nested": [1, 2]}}
    assert replaced.properties.desired["$version"] == v_before + 1, "echoed $version must be ignored"
    assert _user_keys(replaced.properties.reported) == _user_keys(reported_before)
    assert replaced.properties.reported["$version"] == reported_before["$version"]
    assert replaced.device_id == did and replaced.status == "enabled"
    assert rm.get_device(did).etag == device_etag_before, "replacing a twin must not touch the identity"

    stored = hub.rest("GET", f"/twins/{did}").json()
    assert stored["tags"] == {"new": True}
    assert _user_keys(stored["properties"]["desired"]) == {"b": 2, "c": {"nested": [1, 2]}}
    assert "injected" not in stored["properties"]["reported"]


def test_replace_twin_with_etag_none(rm):
    did = _new_device(rm)
    t = rm.replace_twin(did, Twin(tags={"k": "v"}, properties=TwinProperties(desired={"x": 1})))
    assert rm.recorder.last == 200
    assert t.tags == {"k": "v"}
    assert _user_keys(t.properties.desired) == {"x": 1}
