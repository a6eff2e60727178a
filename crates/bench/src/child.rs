//! Child processes the bench starts (the hub, Mosquitto, the echo floor): std's process API
//! with a polite stop (SIGTERM, a bounded wait, then SIGKILL) and a guard that kills the
//! child if the bench itself unwinds or returns early, so no server outlives a run.

use std::process::{Child, ChildStdout, Command, ExitStatus};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// A started child process, killed when dropped.
pub struct ChildProcess {
    child: Child,
}

impl ChildProcess {
    /// Spawns `cmd`; `what` names it in errors.
    pub fn spawn(cmd: &mut Command, what: &str) -> Result<ChildProcess> {
        cmd.spawn()
            .map(|child| ChildProcess { child })
            .map_err(|e| Error::io(format!("starting {what}"), e))
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, if the child has ended.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.child.stdout.take()
    }

    /// Asks the child to stop with SIGTERM and waits up to `grace`; kills it after that.
    pub async fn terminate(mut self, grace: Duration) {
        // kill(2) needs `unsafe` or a libc binding; the coreutils command does the same.
        let _ = tokio::task::spawn_blocking({
            let pid = self.child.id().to_string();
            move || Command::new("kill").args(["-TERM", &pid]).status()
        })
        .await;
        let started = Instant::now();
        while self.exited().is_none() && started.elapsed() < grace {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Drop kills whatever is still running.
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
