//! Ctrl-C and SIGTERM as one awaitable event, for `twinhub serve`, `twinhub demo` and the
//! example programs (which include this file through `examples/common`).
//!
//! The handlers are installed when [`Interrupt::install`] returns, not when the program first
//! waits: a signal that arrives in between (say, just after a "ready" line is printed) is kept
//! and ends the next wait, instead of killing the process with the default disposition.

use std::io;

/// Ctrl-C (SIGINT) and, on Unix, SIGTERM: how people and service managers stop a process.
#[derive(Debug)]
pub struct Interrupt {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
    #[cfg(windows)]
    ctrl_c: tokio::signal::windows::CtrlC,
}

impl Interrupt {
    /// Installs the handlers now. Must run inside a Tokio runtime.
    pub fn install() -> io::Result<Interrupt> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Interrupt {
                interrupt: signal(SignalKind::interrupt())?,
                terminate: signal(SignalKind::terminate())?,
            })
        }
        #[cfg(windows)]
        {
            Ok(Interrupt {
                ctrl_c: tokio::signal::windows::ctrl_c()?,
            })
        }
    }

    /// Resolves at the next signal, or at once for one that arrived since the last wait.
    pub async fn wait(&mut self) {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.interrupt.recv() => {}
                _ = self.terminate.recv() => {}
            }
        }
        #[cfg(windows)]
        {
            self.ctrl_c.recv().await;
        }
    }
}
