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
    fn own_process_is_readable() {
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
