//! Latency and rate bookkeeping: a [`Recorder`] per worker (an HDR histogram in microseconds
//! plus an error count), merged at the end of a phase into a serialisable [`Throughput`], and
//! the [`Window`] that decides which completions count (after warm-up, before the end).

use std::fmt::Display;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// The largest latency the histograms hold (one hour); longer ones are clamped to it.
const MAX_MICROS: u64 = 3_600_000_000;

/// Latency percentiles of one phase, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Latency {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

/// What one phase achieved: completions inside the window, their rate and latency.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Throughput {
    pub completed: u64,
    pub errors: u64,
    /// Length of the measured window.
    pub seconds: f64,
    pub per_second: f64,
    pub latency: Latency,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    /// CPU the server and the load generator used during the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuUse>,
    /// CPU of further processes watched during the window (the cluster scenario: each node,
    /// PostgreSQL, nats-server).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub processes: Vec<ProcessCpu>,
}

/// One watched process (or process tree) over a measured window.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ProcessCpu {
    pub name: String,
    /// CPU seconds per second of window.
    pub cores: f64,
    /// CPU microseconds per completed operation of the window.
    pub us_per_op: Option<f64>,
}

impl Throughput {
    /// The watched process named `name`, if it was read.
    pub fn process(&self, name: &str) -> Option<&ProcessCpu> {
        self.processes.iter().find(|p| p.name == name)
    }
}

/// CPU used during a measured window, in cores (CPU seconds per second of window).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct CpuUse {
    /// The server process; absent when it runs inside the bench.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_cores: Option<f64>,
    /// The bench process (load generator, and an in-process server if any).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_cores: Option<f64>,
    /// Every process on the machine; well above server + bench means other load skewed
    /// the window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub machine_cores: Option<f64>,
    /// CPU the hypervisor took from this machine during the window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steal_cores: Option<f64>,
}

impl CpuUse {
    /// Busy cores not accounted to the server or the bench.
    pub fn other_cores(&self) -> Option<f64> {
        let other = self.machine_cores? - self.server_cores.unwrap_or(0.0) - self.client_cores?;
        Some(other.max(0.0))
    }

    /// Server CPU microseconds per operation at `per_second` operations a second.
    pub fn server_us_per_op(&self, per_second: f64) -> Option<f64> {
        let cores = self.server_cores?;
        (per_second > 0.0).then(|| cores * 1e6 / per_second)
    }
}

/// Collects latencies and errors for one worker or one phase.
#[derive(Debug, Clone)]
pub struct Recorder {
    hist: Histogram<u64>,
    errors: u64,
    first_error: Option<String>,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new()
    }
}

fn empty_histogram() -> Histogram<u64> {
    // The bounds are constants that satisfy hdrhistogram's rules (low >= 1, high >= 2 * low,
    // 3 significant figures), so this only fails if the constants are edited badly.
    Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("constant histogram bounds are valid")
}

impl Recorder {
    pub fn new() -> Recorder {
        Recorder {
            hist: empty_histogram(),
            errors: 0,
            first_error: None,
        }
    }

    /// Records one completed operation. Sub-microsecond latencies count as one microsecond.
    pub fn record(&mut self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(MAX_MICROS);
        self.hist.saturating_record(micros.clamp(1, MAX_MICROS));
    }

    /// Counts a failed operation, keeping the first message for the report.
    pub fn error(&mut self, why: impl Display) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(why.to_string());
        }
    }

    pub fn completed(&self) -> u64 {
        self.hist.len()
    }

    pub fn errors(&self) -> u64 {
        self.errors
    }

    /// What a worker recorded, or the one error that stopped it before it could record more.
    pub fn or_failure<E: Display>(worker: Result<Recorder, E>) -> Recorder {
        worker.unwrap_or_else(|e| {
            let mut rec = Recorder::new();
            rec.error(e);
            rec
        })
    }

    /// Merges what every worker task of a phase recorded; a task that panicked or was
    /// cancelled counts as one error, named after `what` the task was.
    pub async fn join_all(mut workers: tokio::task::JoinSet<Recorder>, what: &str) -> Recorder {
        let mut total = Recorder::new();
        while let Some(joined) = workers.join_next().await {
            match joined {
                Ok(rec) => total.merge(&rec),
                Err(e) => total.error(format!("{what} failed: {e}")),
            }
        }
        total
    }

    /// Adds another recorder's figures to this one.
    pub fn merge(&mut self, other: &Recorder) {
        // Both histograms share the same bounds, so adding cannot go out of range.
        let _ = self.hist.add(&other.hist);
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error.clone_from(&other.first_error);
        }
    }

    pub fn latency(&self) -> Latency {
        let h = &self.hist;
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            count: h.len(),
            mean_us: h.mean(),
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }

    /// The phase's figures, with the rate over `window`.
    pub fn throughput(&self, window: Duration) -> Throughput {
        let seconds = window.as_secs_f64();
        let completed = self.completed();
        Throughput {
            completed,
            errors: self.errors,
            seconds,
            per_second: if seconds > 0.0 {
                completed as f64 / seconds
            } else {
                0.0
            },
            latency: self.latency(),
            first_error: self.first_error.clone(),
            cpu: None,
            processes: Vec::new(),
        }
    }
}

/// The measured part of a closed-loop phase: completions after `warm_end` and up to `end`
/// count; nothing new is started after `end`.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub warm_end: Instant,
    pub end: Instant,
}

impl Window {
    /// A window that opens `warmup` from now and lasts `measure`.
    pub fn starting_now(warmup: Duration, measure: Duration) -> Window {
        let warm_end = Instant::now() + warmup;
        Window {
            warm_end,
            end: warm_end + measure,
        }
    }

    /// Whether an operation that completed at `at` is part of the measurement.
    pub fn counts(&self, at: Instant) -> bool {
        at >= self.warm_end && at <= self.end
    }

    /// Whether new operations may still be started.
    pub fn open(&self, now: Instant) -> bool {
        now < self.end
    }

    pub fn measured(&self) -> Duration {
        self.end.saturating_duration_since(self.warm_end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_follow_the_recorded_values() {
        let mut r = Recorder::new();
        for micros in 1..=1000u64 {
            r.record(Duration::from_micros(micros));
        }
        let l = r.latency();
        assert_eq!(l.count, 1000);
        // Three significant digits: values are exact to within 0.1 %.
        assert!((499..=501).contains(&l.p50_us), "{l:?}");
        assert!((899..=901).contains(&l.p90_us), "{l:?}");
        assert!((989..=991).contains(&l.p99_us), "{l:?}");
        assert!((998..=1000).contains(&l.p999_us), "{l:?}");
        assert!((999..=1001).contains(&l.max_us), "{l:?}");
    }

    #[test]
    fn merge_adds_counts_and_keeps_the_first_error() {
        let mut a = Recorder::new();
        a.record(Duration::from_micros(10));
        let mut b = Recorder::new();
        b.record(Duration::from_millis(5));
        b.error("first");
        b.error("second");
        a.merge(&b);
        assert_eq!(a.completed(), 2);
        assert_eq!(a.errors(), 2);
        let t = a.throughput(Duration::from_secs(2));
        assert_eq!(t.first_error.as_deref(), Some("first"));
        assert!((t.per_second - 1.0).abs() < 1e-9);
        assert!(t.latency.max_us >= 4995, "{t:?}");
    }

    #[test]
    fn tiny_and_huge_latencies_are_clamped_not_lost() {
        let mut r = Recorder::new();
        r.record(Duration::from_nanos(10));
        r.record(Duration::from_secs(100_000));
        let l = r.latency();
        assert_eq!(l.count, 2);
        assert_eq!(r.latency().p50_us, 1);
        assert!(l.max_us >= MAX_MICROS - MAX_MICROS / 500, "{l:?}");
    }

    #[test]
    fn window_counts_only_inside() {
        let w = Window::starting_now(Duration::from_millis(100), Duration::from_millis(100));
        assert!(!w.counts(w.warm_end - Duration::from_millis(1)));
        assert!(w.counts(w.warm_end));
        assert!(w.counts(w.end));
        assert!(!w.counts(w.end + Duration::from_millis(1)));
        assert!(w.open(w.warm_end));
        assert!(!w.open(w.end));
        assert_eq!(w.measured(), Duration::from_millis(100));
    }
}
