//! The chaos tool as a user runs it, at a tiny scale: one `kill` trial (a few devices, load
//! of at most 2 s, SIGKILL, restart, read-back) and a few seconds of `soak`, each against the
//! workspace's own `twinhub serve`.
//!
//! Finding `twinhub`: it is another package's binary, so cargo sets no `CARGO_BIN_EXE_twinhub`
//! here, and a dev-dependency cannot build a binary-only package. The test looks next to its
//! own `twinhub-chaos` (the same target dir and profile): `cargo test --workspace` builds
//! `twinhub` there before any test runs, so under it the binary is used as is. When it is
//! missing or older than any source of the workspace's crates (e.g. under
//! `cargo test -p twinhub-chaos`), the test builds it with `cargo build -p twinhub` for that
//! target dir and profile and takes the path cargo reports, so it never runs a stale hub.
//! Cargo holds no build lock while tests run, so the nested build does not wait on the outer
//! one; it runs without the `CARGO_MANIFEST_DIR` / `CARGO_PKG_*` variables cargo gives tests,
//! because build scripts that watch them (ring's does) would otherwise see a change and
//! rebuild half the tree each time. `TWINHUB_BIN=/path/to/twinhub` skips all of this.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

const CHAOS: &str = env!("CARGO_BIN_EXE_twinhub-chaos");

/// The hub binary, found (and built if need be) once per test process.
fn twinhub_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(find_twinhub).clone()
}

/// Whether cargo set `name` for this test process (as opposed to the user's environment).
fn set_by_cargo_for_tests(name: &str) -> bool {
    name.starts_with("CARGO_PKG_")
        || name.starts_with("CARGO_BIN_EXE_")
        || matches!(
            name,
            "CARGO_MANIFEST_DIR"
                | "CARGO_MANIFEST_PATH"
                | "CARGO_CRATE_NAME"
                | "CARGO_PRIMARY_PACKAGE"
                | "CARGO_TARGET_TMPDIR"
        )
}

fn find_twinhub() -> PathBuf {
    if let Some(bin) = std::env::var_os("TWINHUB_BIN") {
        return PathBuf::from(bin);
    }
    // CHAOS is <target-dir>/<profile-dir>/twinhub-chaos.
    let profile_dir = Path::new(CHAOS).parent().expect("a profile directory");
    let beside = profile_dir.join(format!("twinhub{}", std::env::consts::EXE_SUFFIX));
    let built = std::fs::metadata(&beside).and_then(|m| m.modified()).ok();
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    if built.is_some_and(|built| newest_source(&workspace) <= built) {
        return beside;
    }
    let target_dir = profile_dir.parent().expect("a target directory");
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev",
        Some(other) => other,
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    for (name, _) in std::env::vars_os() {
        if set_by_cargo_for_tests(&name.to_string_lossy()) {
            build.env_remove(name);
        }
    }
    let out = build
        .args(["build", "-p", "twinhub", "--bin", "twinhub"])
        .args(["--profile", profile, "--message-format=json"])
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stderr(Stdio::inherit())
        .output()
        .expect("cargo runs");
    assert!(out.status.success(), "cargo build -p twinhub failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "twinhub")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .expect("cargo names the twinhub executable")
}

/// The workspace crates the `twinhub` package is built from: it and, transitively, the
/// `twinhub-*` crates its `[dependencies]` name (by package name, as in `crates/*/Cargo.toml`).
fn hub_crates(workspace: &Path) -> Vec<PathBuf> {
    let mut crates = BTreeMap::new();
    for entry in std::fs::read_dir(workspace.join("crates"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let Ok(manifest) = std::fs::read_to_string(entry.path().join("Cargo.toml")) else {
            continue;
        };
        let mut name = None;
        let mut deps = Vec::new();
        let mut section = String::new();
        for line in manifest.lines().map(str::trim) {
            if line.starts_with('[') {
                section = line.to_string();
            } else if section == "[package]" && line.starts_with("name") && name.is_none() {
                name = line.split('"').nth(1).map(str::to_string);
            } else if section == "[dependencies]" && line.starts_with("twinhub-") {
                deps.extend(line.split(['.', ' ', '=']).next().map(str::to_string));
            }
        }
        if let Some(name) = name {
            crates.insert(name, (entry.path(), deps));
        }
    }
    let mut todo = vec!["twinhub".to_string()];
    let mut found = BTreeMap::new();
    while let Some(name) = todo.pop() {
        if found.contains_key(&name) {
            continue;
        }
        if let Some((dir, deps)) = crates.get(&name) {
            todo.extend(deps.iter().cloned());
            found.insert(name, dir.clone());
        }
    }
    found.into_values().collect()
}

/// The newest modification time among the manifests and sources of the crates `twinhub` is
/// built from.
fn newest_source(workspace: &Path) -> SystemTime {
    fn walk(path: &Path, newest: &mut SystemTime) {
        let Ok(meta) = std::fs::metadata(path) else {
            return;
        };
        if meta.is_dir() {
            for entry in std::fs::read_dir(path).into_iter().flatten().flatten() {
                walk(&entry.path(), newest);
            }
        } else if let Ok(modified) = meta.modified() {
            *newest = (*newest).max(modified);
        }
    }
    // Not Cargo.lock or the root manifest: they change with any crate's dependencies, and a
    // change that matters to twinhub rebuilds it anyway under `cargo test --workspace`.
    let mut newest = SystemTime::UNIX_EPOCH;
    let crates = hub_crates(workspace);
    assert!(
        crates.len() > 1,
        "could not read the twinhub package's crates under {}",
        workspace.display()
    );
    for dir in crates {
        walk(&dir.join("Cargo.toml"), &mut newest);
        walk(&dir.join("src"), &mut newest);
    }
    newest
}

/// Runs the chaos tool with `args`, killing it after `limit`.
fn chaos(args: &[&str], limit: Duration) -> (Output, String) {
    let work = tempfile::tempdir().unwrap();
    let hub = twinhub_bin();
    let mut child = Command::new(CHAOS)
        .args(args)
        .arg("--twinhub")
        .arg(&hub)
        .arg("--work-dir")
        .arg(work.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("twinhub-chaos starts");
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            let mut out = String::new();
            let _ = child.stdout.take().unwrap().read_to_string(&mut out);
            panic!("twinhub-chaos {args:?} ran over {limit:?}:\n{out}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let output = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() {
        // Nothing is left behind when the campaign passes without --keep.
        let left: Vec<_> = std::fs::read_dir(work.path()).unwrap().collect();
        assert!(left.is_empty(), "left behind: {left:?}\n{text}");
        (output, text)
    } else {
        // The tool kept the failed run's data dir and hub logs: keep them for a look.
        let kept = work.keep();
        (
            output,
            format!("{text}\n(work dir kept: {})", kept.display()),
        )
    }
}

/// The number after `label` in `text`.
fn number_after(text: &str, label: &str) -> u64 {
    text.split(label)
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.trim_end_matches(',').parse().ok())
        .unwrap_or_else(|| panic!("no number after {label:?} in:\n{text}"))
}

#[test]
fn one_kill_trial_loses_nothing_and_restarts() {
    let (output, text) = chaos(
        &[
            "kill",
            "--trials",
            "1",
            "--seconds",
            "2",
            "--devices",
            "4",
            "--seed",
            "1",
        ],
        Duration::from_secs(240),
    );
    assert!(output.status.success(), "{text}");
    let trial = text
        .lines()
        .find(|l| l.starts_with("trial 1/1:"))
        .unwrap_or_else(|| panic!("no trial line:\n{text}"));
    assert!(trial.ends_with(": OK"), "{text}");
    assert_eq!(number_after(trial, "lost "), 0, "{text}");
    // The load did happen: writes of every kind were acknowledged before the kill.
    for kind in ["reported ", "desired ", "creates ", "jobs "] {
        assert!(number_after(trial, kind) > 0, "no {kind}writes: {text}");
    }
    assert!(text.contains("restart after SIGKILL"), "{text}");
    assert!(text.contains("all 1 trial(s) passed"), "{text}");
}

#[test]
fn a_short_soak_has_no_errors_and_samples_memory() {
    let (output, text) = chaos(
        &[
            "soak",
            "--devices",
            "20",
            "--minutes",
            "0.08",
            "--sample-secs",
            "2",
            "--methods-rate",
            "20",
            "--reported-rate",
            "20",
            "--desired-rate",
            "10",
            "--seed",
            "1",
        ],
        Duration::from_secs(240),
    );
    assert!(output.status.success(), "{text}");
    assert!(text.contains("soak passed: no errors"), "{text}");
    assert!(text.contains("hub RSS over the run:"), "{text}");
    for kind in ["methods", "reported", "desired"] {
        let line = text
            .lines()
            .find(|l| l.starts_with(kind))
            .unwrap_or_else(|| panic!("no {kind} total:\n{text}"));
        assert!(number_after(line, kind) > 0, "no {kind} done:\n{text}");
    }
}

#[test]
fn a_slow_consumer_is_dropped_and_measured() {
    let (output, text) = chaos(
        &[
            "slow-consumer",
            "--devices",
            "4",
            "--callers",
            "2",
            "--seconds",
            "2",
            "--patch-bytes",
            "30000",
        ],
        Duration::from_secs(240),
    );
    assert!(output.status.success(), "{text}");
    for phase in [
        "alone:",
        "beside a flooded reader:",
        "beside a slow device:",
    ] {
        let line = text
            .lines()
            .find(|l| l.starts_with(phase))
            .unwrap_or_else(|| panic!("no {phase} line:\n{text}"));
        assert!(number_after(line, phase) > 0, "no calls {phase}\n{text}");
    }
    assert!(text.contains("the slow device was dropped"), "{text}");
}

#[test]
fn the_hub_is_rebuilt_only_for_its_own_crates() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let names: Vec<String> = hub_crates(&workspace)
        .iter()
        .filter_map(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    for needed in ["cli", "server", "core", "store", "proto", "mqtt", "sdk"] {
        assert!(
            names.iter().any(|n| n == needed),
            "{needed} missing: {names:?}"
        );
    }
    for unrelated in ["chaos", "bench"] {
        assert!(
            !names.iter().any(|n| n == unrelated),
            "{unrelated} in {names:?}"
        );
    }
}
