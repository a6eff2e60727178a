//! `twinhub demo` as a user runs it: it tells the reboot story step by step with timings
//! (hub started → device connected → method invoked → device rebooting → device answered →
//! rebootTime reported → service read it), exits 0 within seconds, and leaves no data dir.
//!
//! Runs the real binary, so it needs `demo` wired into `src/main.rs`
//! (`Demo(demo::DemoArgs)` → `demo::run`).

use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_twinhub");
/// The demo must finish in seconds; this only stops a hung one.
const LIMIT: Duration = Duration::from_secs(60);

struct Run {
    status: ExitStatus,
    stdout: Vec<String>,
    stderr: String,
    took: Duration,
}

impl Run {
    fn output(&self) -> String {
        format!(
            "--- twinhub demo ({}) stdout ---\n{}\n--- stderr ---\n{}",
            self.status,
            self.stdout.join("\n"),
            self.stderr
        )
    }

    /// The first line containing `needle` at or after line `from`, with its index.
    fn find(&self, from: usize, needle: &str) -> (usize, &str) {
        self.stdout[from..]
            .iter()
            .position(|l| l.contains(needle))
            .map(|i| (from + i, self.stdout[from + i].as_str()))
            .unwrap_or_else(|| {
                panic!(
                    "no line with {needle:?} after line {from}\n{}",
                    self.output()
                )
            })
    }
}

fn demo(args: &[&str]) -> Run {
    let started = Instant::now();
    let mut child = Command::new(BIN)
        .arg("demo")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("twinhub starts");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > LIMIT {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        status,
        took: started.elapsed(),
        stdout: out
            .join()
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// The seconds stamp of a story line (`[  1.23s] ...`).
fn stamp(line: &str) -> f64 {
    line.strip_prefix('[')
        .and_then(|rest| rest.split_once("s]"))
        .and_then(|(secs, _)| secs.trim().parse().ok())
        .unwrap_or_else(|| panic!("no timing on {line:?}"))
}

#[test]
fn demo_tells_the_reboot_story_and_exits_zero() {
    let run = demo(&["--reboot-delay", "0.5"]);
    assert!(run.status.success(), "{}", run.output());
    assert!(run.took < Duration::from_secs(20), "took {:?}", run.took);

    let (at, hub) = run.find(0, "hub started: https://127.0.0.1:");
    assert!(hub.contains("mqtts://127.0.0.1:"), "{hub}");
    let data_dir = hub
        .split("data dir ")
        .nth(1)
        .expect("the data dir is named")
        .trim()
        .to_string();
    let (at, _) = run.find(at, "registered device 'demo-device'");
    let (at, _) = run.find(at, "device connected over MQTT over TLS");
    let (at, _) = run.find(at, "service invokes rebootDevice on 'demo-device'");
    let (at, _) = run.find(at, "device got rebootDevice: rebooting");
    let (at, answered) = run.find(at, "device answered 200");
    let (at, rebooted) = run.find(at, "device rebooted");
    let (at, reported) = run.find(at, "device reported rebootTime = ");
    let (at, read) = run.find(at, "service read rebootTime = ");
    let (at, _) = run.find(at, "hub stopped and its data dir removed");
    run.find(at, "Done in ");
    run.find(
        0,
        r#"service got the device's answer: 200 {"Response":"Rebooting"}"#,
    );

    // Every story line is stamped, in order, and the reboot really took its time.
    let stamps: Vec<f64> = run
        .stdout
        .iter()
        .filter(|l| l.starts_with('['))
        .map(|l| stamp(l))
        .collect();
    assert!(stamps.len() >= 10, "{}", run.output());
    assert!(stamps.windows(2).all(|w| w[0] <= w[1]), "{}", run.output());
    assert!(
        stamp(rebooted) - stamp(answered) >= 0.45,
        "{}",
        run.output()
    );

    // The service read back exactly what the device reported, and it is a timestamp.
    let value = |line: &str, marker: &str| -> String {
        line.split(marker)
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_default()
            .to_string()
    };
    let reported = value(reported, "rebootTime = ");
    assert_eq!(reported, value(read, "rebootTime = "), "{}", run.output());
    assert!(
        reported.parse::<jiff::Timestamp>().is_ok(),
        "{reported} is no RFC 3339 time"
    );

    assert!(
        !std::path::Path::new(&data_dir).exists(),
        "{data_dir} was left behind"
    );
}

#[test]
fn demo_runs_over_websockets_too() {
    let run = demo(&["--websockets", "--reboot-delay", "0"]);
    assert!(run.status.success(), "{}", run.output());
    run.find(0, "device connected over MQTT over WebSockets");
    run.find(0, "service read rebootTime = ");
}

#[test]
fn demo_refuses_a_bad_reboot_delay() {
    let run = demo(&["--reboot-delay", "soon"]);
    assert_eq!(run.status.code(), Some(2), "{}", run.output());
    assert!(run.stderr.contains("--reboot-delay"), "{}", run.output());
}
