//! Log hygiene for text a peer chose: [`Shown`] cuts it short and escapes control characters
//! (a newline in a client id must not forge a log line), and [`RateLimit`] lets a burst of
//! refusals leave a few lines and then a count, instead of filling the disk.

use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most this many characters of peer-chosen text reach a log line.
pub const SHOWN_CHARS: usize = 96;

/// Peer-chosen text as a log line may carry it: at most [`SHOWN_CHARS`] characters, control
/// and non-printable characters escaped, quoted, with the original length when cut.
pub struct Shown<'a>(pub &'a str);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"")?;
        for (count, c) in self.0.chars().enumerate() {
            if count == SHOWN_CHARS {
                return write!(f, "\"... ({} bytes)", self.0.len());
            }
            if c == '"' || c == '\\' || c.is_control() || (!c.is_ascii() && !c.is_alphanumeric()) {
                write!(f, "{}", c.escape_default())?;
            } else {
                f.write_fmt(format_args!("{c}"))?;
            }
        }
        f.write_str("\"")
    }
}

impl fmt::Debug for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Allows `burst` events per `period`; reports how many were suppressed since the last one
/// allowed.
pub struct RateLimit {
    period: Duration,
    burst: u32,
    state: Mutex<State>,
}

struct State {
    window: Option<Instant>,
    used: u32,
    suppressed: u64,
}

impl RateLimit {
    pub const fn new(period: Duration, burst: u32) -> Self {
        RateLimit {
            period,
            burst,
            state: Mutex::new(State {
                window: None,
                used: 0,
                suppressed: 0,
            }),
        }
    }

    /// `Some(suppressed since the last allowed event)` when this event may be logged.
    pub fn allow(&self) -> Option<u64> {
        let now = Instant::now();
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.window
            .is_none_or(|w| now.duration_since(w) >= self.period)
        {
            s.window = Some(now);
            s.used = 0;
        }
        if s.used < self.burst {
            s.used += 1;
            Some(std::mem::take(&mut s.suppressed))
        } else {
            s.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_escapes_and_cuts() {
        assert_eq!(Shown("dev-1").to_string(), "\"dev-1\"");
        assert_eq!(Shown("a\nINFO forged").to_string(), "\"a\\nINFO forged\"");
        assert_eq!(Shown("\u{1b}[31m").to_string(), "\"\\u{1b}[31m\"");
        let long = "x".repeat(100_000);
        let shown = Shown(&long).to_string();
        assert!(shown.len() < 130, "{shown}");
        assert!(shown.ends_with("(100000 bytes)"));
        // Letters of any script stay readable.
        assert_eq!(Shown("設備").to_string(), "\"設備\"");
    }

    #[test]
    fn rate_limit_counts_what_it_suppressed() {
        let r = RateLimit::new(Duration::from_secs(3600), 2);
        assert_eq!(r.allow(), Some(0));
        assert_eq!(r.allow(), Some(0));
        assert_eq!(r.allow(), None);
        assert_eq!(r.allow(), None);
    }
}
