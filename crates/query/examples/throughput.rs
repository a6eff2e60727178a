//! Measures the query engine: parse time of typical queries, `matches` throughput over
//! 100,000 synthetic device twins, and a fleet-status GROUP BY over the same twins.
//!
//! Run with `cargo run -p twinhub-query --release --example throughput`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const TWINS: usize = 100_000;

fn synthetic_twin(n: usize) -> Value {
    let statuses = ["current", "downloading", "applying", "error"];
    let connectivity = ["wired", "wifi", "cellular"];
    let mut reported = json!({
        "connectivity": {"type": connectivity[n % 3]},
        "telemetryConfig": {"sendFrequencyInSecs": 30 + (n % 10) * 30, "status": "Success"},
        "temperature": 15.0 + (n % 200) as f64 / 10.0,
        "$metadata": {"$lastUpdated": "2024-05-01T12:00:00.0000000Z"},
        "$version": 1 + n % 40
    });
    if !n.is_multiple_of(7) {
        reported["iothubDM"] = json!({"firmwareUpdate": {"status": statuses[n % 4]}});
    }
    json!({
        "deviceId": format!("device-{n:06}"),
        "etag": "AAAAAAAAAAE=",
        "deviceEtag": "NTgwMDg5MDAz",
        "status": if n.is_multiple_of(50) { "disabled" } else { "enabled" },
        "statusUpdateTime": "0001-01-01T00:00:00Z",
        "connectionState": if n.is_multiple_of(3) { "Disconnected" } else { "Connected" },
        "lastActivityTime": "2024-05-01T12:00:00.0000000Z",
        "cloudToDeviceMessageCount": 0,
        "authenticationType": "sas",
        "x509Thumbprint": {"primaryThumbprint": null, "secondaryThumbprint": null},
        "modelId": "",
        "version": 2 + n % 100,
        "tags": {"location": {"region": "US", "plant": format!("Redmond{}", n % 50)}},
        "properties": {
            "desired": {
                "telemetryConfig": {"sendFrequencyInSecs": 300},
                "$metadata": {"$lastUpdated": "2024-05-01T12:00:00.0000000Z", "$lastUpdatedVersion": 2},
                "$version": 2
            },
            "reported": reported
        },
        "capabilities": {"iotEdge": n.is_multiple_of(10)}
    })
}

fn per_call(elapsed: Duration, calls: usize) -> f64 {
    elapsed.as_secs_f64() * 1e6 / calls as f64
}

fn main() -> Result<(), twinhub_query::ParseError> {
    let parse_cases = [
        "SELECT * FROM devices WHERE tags.location.plant = 'Redmond43'",
        "SELECT * FROM devices WHERE tags.location.region = 'US' \
         AND properties.reported.telemetryConfig.sendFrequencyInSecs >= 60 \
         AND properties.reported.connectivity.type IN ['wired', 'wifi']",
        "SELECT properties.reported.iothubDM.firmwareUpdate.status AS s, COUNT() AS n \
         FROM devices GROUP BY properties.reported.iothubDM.firmwareUpdate.status",
    ];
    println!("parse time (mean of 20,000 parses):");
    for text in parse_cases {
        let rounds = 20_000;
        let start = Instant::now();
        for _ in 0..rounds {
            black_box(twinhub_query::parse(black_box(text))?);
        }
        println!(
            "  {:>7.2} us  {} chars: {}",
            per_call(start.elapsed(), rounds),
            text.len(),
            &text[..text.len().min(70)]
        );
    }

    let twins: Vec<Value> = (0..TWINS).map(synthetic_twin).collect();
    let filters = [
        "SELECT * FROM devices WHERE tags.location.plant = 'Redmond43'",
        "SELECT * FROM devices WHERE tags.location.region = 'US' \
         AND properties.reported.telemetryConfig.sendFrequencyInSecs >= 60 \
         AND properties.reported.connectivity.type IN ['wired', 'wifi']",
        "SELECT * FROM devices WHERE properties.reported.notThere = 1",
        "SELECT * FROM devices WHERE STARTSWITH(LOWER(deviceId), 'device-00') AND status = 'enabled'",
        "SELECT * FROM devices WHERE properties.reported.$metadata.$lastUpdated > '2024-01-01' \
         AND capabilities.iotEdge = false",
    ];
    println!("\nmatches over {TWINS} twins (best of 5 passes):");
    for text in filters {
        let query = twinhub_query::parse(text)?;
        let mut best = Duration::MAX;
        let mut hits = 0;
        for _ in 0..5 {
            let start = Instant::now();
            hits = twins
                .iter()
                .filter(|twin| query.matches(black_box(twin)))
                .count();
            best = best.min(start.elapsed());
        }
        println!(
            "  {:>6.1} ms  {:>5.1} M twins/s  {hits:>6} hits  {}",
            best.as_secs_f64() * 1e3,
            TWINS as f64 / best.as_secs_f64() / 1e6,
            &text[29..text.len().min(100)]
        );
    }

    let fleet = twinhub_query::parse(parse_cases[2])?;
    let start = Instant::now();
    let rows = fleet.aggregate(&twins);
    println!(
        "\nfleet-status GROUP BY over {TWINS} twins: {:.1} ms, {} rows: {}",
        start.elapsed().as_secs_f64() * 1e3,
        rows.len(),
        Value::Array(rows)
    );
    Ok(())
}
