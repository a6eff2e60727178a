//! Facts about the machine and processes, read from `/proc`: cores, memory, CPU model,
//! kernel, a process's resident memory, and the open-file limit (raised to its hard limit so
//! the connection scenario can hold as many sockets as the system allows).

use std::fs;

use serde::Serialize;

/// The machine a run was measured on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub memory_bytes: Option<u64>,
    pub cpu_model: Option<String>,
    pub kernel: Option<String>,
    /// The open-file limit (soft, after raising it; hard) the bench and its children run with.
    pub nofile_soft: u64,
    pub nofile_hard: u64,
}

impl Machine {
    pub fn read() -> Machine {
        let (nofile_soft, nofile_hard) = nofile_limits();
        Machine {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_bytes: fs::read_to_string("/proc/meminfo")
                .ok()
                .and_then(|t| status_kib(&t, "MemTotal"))
                .map(|kib| kib * 1024),
            cpu_model: fs::read_to_string("/proc/cpuinfo").ok().and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            }),
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
                .ok()
                .map(|s| s.trim().to_string()),
            nofile_soft,
            nofile_hard,
        }
    }
}

/// Reads a `Key:   1234 kB` line of `/proc/*/status` or `/proc/meminfo`, in KiB.
pub fn status_kib(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        if k.trim() != key {
            return None;
        }
        let mut parts = v.split_whitespace();
        let value: u64 = parts.next()?.parse().ok()?;
        match parts.next() {
            Some("kB") | None => Some(value),
            Some(_) => None,
        }
    })
}

/// Resident memory of process `pid` in bytes (VmRSS), if it can be read.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status_kib(&text, "VmRSS").map(|kib| kib * 1024)
}

/// Clock ticks per second in `/proc/*/stat` (USER_HZ: 100 on every Linux architecture the
/// bench runs on; reading it properly needs sysconf, which needs `unsafe`).
pub(crate) const USER_HZ: f64 = 100.0;

/// CPU time (user + system, all threads) process `pid` has used so far, in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_cpu_seconds(&text)
}

/// utime + stime from a `/proc/*/stat` line. The command name (field 2) may hold spaces and
/// parentheses, so fields are counted from the last ')'.
pub fn stat_cpu_seconds(stat: &str) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After the name: state is field 3, utime field 14, stime field 15.
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

/// CPU time the whole machine has spent busy and stolen by the hypervisor so far, in
/// seconds, from the aggregate `cpu` line of `/proc/stat`.
pub fn machine_cpu_seconds() -> Option<MachineCpu> {
    parse_proc_stat(&fs::read_to_string("/proc/stat").ok()?)
}

/// Busy and stolen CPU seconds of the whole machine.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MachineCpu {
    pub busy: f64,
    pub steal: f64,
}

/// Reads `cpu  user nice system idle iowait irq softirq steal ...`.
pub fn parse_proc_stat(text: &str) -> Option<MachineCpu> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let get = |i: usize| v.get(i).copied().unwrap_or(0);
    // user + nice + system + irq + softirq; idle (3) and iowait (4) are not busy.
    let busy = get(0) + get(1) + get(2) + get(5) + get(6);
    Some(MachineCpu {
        busy: busy as f64 / USER_HZ,
        steal: get(7) as f64 / USER_HZ,
    })
}

/// The current open-file limits (soft, hard).
pub fn nofile_limits() -> (u64, u64) {
    rlimit::Resource::NOFILE.get().unwrap_or((1024, 1024))
}

/// Raises the soft open-file limit to the hard limit; child processes (the hub, Mosquitto)
/// inherit it. Raising the hard limit needs CAP_SYS_RESOURCE, which the bench never assumes.
pub fn raise_nofile_limit() -> u64 {
    rlimit::increase_nofile_limit(u64::MAX).unwrap_or_else(|_| nofile_limits().0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_are_read_in_kib() {
        let text = "Name:\ttwinhub\nVmPeak:\t  900 kB\nVmRSS:\t   123456 kB\nThreads:\t3\n";
        assert_eq!(status_kib(text, "VmRSS"), Some(123_456));
        assert_eq!(status_kib(text, "VmPeak"), Some(900));
        assert_eq!(status_kib(text, "Threads"), Some(3));
        assert_eq!(status_kib(text, "VmSwap"), None);
        assert_eq!(status_kib("VmRSS: lots kB", "VmRSS"), None);
        assert_eq!(status_kib("VmRSS: 12 MB", "VmRSS"), None);
    }

    #[test]
    fn cpu_time_is_read_past_an_awkward_command_name() {
        let stat = "42 (my (odd) name) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0";
        assert_eq!(stat_cpu_seconds(stat), Some(3.0));
        assert_eq!(stat_cpu_seconds("42 (x) S 1"), None);
        assert_eq!(stat_cpu_seconds("no parenthesis"), None);
    }

    #[test]
    fn machine_cpu_counts_busy_and_stolen_time() {
        let text = "cpu  100 20 30 5000 7 1 2 40 0 0\ncpu0 50 10 15 2500 3 0 1 20 0 0\n";
        let cpu = parse_proc_stat(text).expect("parses");
        assert!((cpu.busy - 1.53).abs() < 1e-9, "{cpu:?}");
        assert!((cpu.steal - 0.4).abs() < 1e-9, "{cpu:?}");
        assert_eq!(parse_proc_stat("cpu0 1 2 3\n"), None);
        assert!(machine_cpu_seconds().is_some());
    }

    #[test]
    fn own_process_is_readable() {
        assert!(cpu_seconds(std::process::id()).is_some());
        let rss = rss_bytes(std::process::id()).unwrap_or(0);
        assert!(
            rss > 1024 * 1024,
            "a test process uses more than 1 MiB: {rss}"
        );
        let m = Machine::read();
        assert!(m.cores >= 1);
        assert!(m.nofile_soft <= m.nofile_hard);
    }
}
