//! Twin documents shared by the integration tests, shaped like IoT Hub's query results
//! (wire-protocol.md section h).

#![allow(dead_code)]

use serde_json::{Value, json};

/// The device twin used throughout the IoT Hub query documentation.
pub fn docs_twin() -> Value {
    json!({
        "deviceId": "myDeviceId",
        "etag": "AAAAAAAAAAc=",
        "status": "enabled",
        "statusUpdateTime": "0001-01-01T00:00:00",
        "connectionState": "Disconnected",
        "lastActivityTime": "0001-01-01T00:00:00",
        "cloudToDeviceMessageCount": 0,
        "authenticationType": "sas",
        "x509Thumbprint": {"primaryThumbprint": null, "secondaryThumbprint": null},
        "version": 2,
        "capabilities": {"iotEdge": false},
        "tags": {"location": {"region": "US", "plant": "Redmond43"}},
        "properties": {
            "desired": {
                "telemetryConfig": {
                    "configId": "db00ebf5-eeeb-42be-86a1-458cccb69e57",
                    "sendFrequencyInSecs": 300
                },
                "$metadata": {
                    "$lastUpdated": "2024-01-02T03:04:05.0000000Z",
                    "$lastUpdatedVersion": 4,
                    "telemetryConfig": {"$lastUpdated": "2024-01-02T03:04:05.0000000Z"}
                },
                "$version": 4
            },
            "reported": {
                "connectivity": {"type": "cellular"},
                "telemetryConfig": {
                    "configId": "db00ebf5-eeeb-42be-86a1-458cccb69e57",
                    "sendFrequencyInSecs": 300,
                    "status": "Success"
                },
                "$metadata": {
                    "$lastUpdated": "2024-02-03T04:05:06.0000000Z",
                    "telemetryConfig": {
                        "$lastUpdated": "2024-02-03T04:05:06.0000000Z",
                        "status": {"$lastUpdated": "2024-02-03T04:05:06.0000000Z"}
                    }
                },
                "$version": 7
            }
        }
    })
}

/// A small twin with the given id, firmware-update status (None: not reported) and tags.
pub fn twin(device_id: &str, firmware_status: Option<&str>, tags: Value) -> Value {
    let mut reported =
        json!({"$version": 1, "$metadata": {"$lastUpdated": "2024-01-01T00:00:00Z"}});
    if let Some(status) = firmware_status {
        reported["iothubDM"] = json!({"firmwareUpdate": {"status": status}});
    }
    json!({
        "deviceId": device_id,
        "status": "enabled",
        "connectionState": "Connected",
        "version": 3,
        "tags": tags,
        "properties": {"desired": {"$version": 1, "$metadata": {}}, "reported": reported},
        "capabilities": {"iotEdge": false}
    })
}

/// A job record as `FROM devices.jobs` sees it.
pub fn job(device_id: &str, job_id: &str, status: &str) -> Value {
    json!({
        "deviceId": device_id,
        "jobId": job_id,
        "jobType": "scheduleUpdateTwin",
        "status": status,
        "startTimeUtc": "2016-09-29T18:18:52.7418462",
        "endTimeUtc": "2016-09-29T18:20:52.7418462",
        "createdDateTimeUtc": "2016-09-29T18:18:56.7787107Z",
        "lastUpdatedDateTimeUtc": "2016-09-29T18:18:56.8894408Z",
        "outcome": {"deviceMethodResponse": null}
    })
}
