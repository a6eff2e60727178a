//! Timestamps as IoT Hub writes them on the wire: RFC 3339 UTC with a 7-digit fraction, and
//! `0001-01-01T00:00:00Z` for "never". Models keep them as `String`; core and server convert.

use jiff::Timestamp;

/// The value IoT Hub reports for a time that was never set (e.g. `statusUpdateTime`).
pub const NEVER: &str = "0001-01-01T00:00:00Z";

/// The instant [`NEVER`] denotes: 0001-01-01T00:00:00Z.
const NEVER_UNIX_SECONDS: i64 = -62_135_596_800;

/// Formats `ts` the way IoT Hub does, e.g. `2019-12-29T00:58:49.9315265Z`.
///
/// The instant of [`NEVER`] is written as [`NEVER`] itself, so "never" survives a
/// parse/format round trip in IoT Hub's exact spelling.
pub fn format_timestamp(ts: Timestamp) -> String {
    if is_never(ts) {
        return NEVER.to_owned();
    }
    // Timestamp's Display is RFC 3339 in UTC with `Z`; the precision pins 7 fraction digits
    // (.NET's DateTime resolution, which is what the real hub emits).
    format!("{ts:.7}")
}

/// Parses an RFC 3339 timestamp with any fraction length (0 to 9 digits) and any offset.
///
/// Clients send variable precision (msrest drops trailing zeros), so this accepts all of
/// them. A time without an offset is ambiguous and rejected.
pub fn parse_timestamp(s: &str) -> Option<Timestamp> {
    s.parse::<Timestamp>().ok()
}

/// Whether `ts` is the instant IoT Hub uses for "never".
pub fn is_never(ts: Timestamp) -> bool {
    ts.as_second() == NEVER_UNIX_SECONDS && ts.subsec_nanosecond() == 0
}

/// The instant of [`NEVER`] as a timestamp.
pub fn never() -> Timestamp {
    Timestamp::from_second(NEVER_UNIX_SECONDS).unwrap_or(Timestamp::MIN)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        parse_timestamp(s).unwrap_or_else(|| panic!("test input {s} must parse"))
    }

    #[test]
    fn formats_seven_fraction_digits() {
        let t = ts("2019-12-29T00:58:49.9315265Z");
        assert_eq!(format_timestamp(t), "2019-12-29T00:58:49.9315265Z");
        assert_eq!(
            format_timestamp(ts("2030-01-01T00:00:00Z")),
            "2030-01-01T00:00:00.0000000Z"
        );
        // Nanoseconds beyond the 7th digit are truncated, not rounded up.
        assert_eq!(
            format_timestamp(ts("2020-01-01T00:00:00.123456789Z")),
            "2020-01-01T00:00:00.1234567Z"
        );
    }

    #[test]
    fn parses_any_fraction_length_and_offsets() {
        let base = ts("2026-11-23T02:31:04Z");
        for (text, nanos) in [
            ("2026-11-23T02:31:04Z", 0),
            ("2026-11-23T02:31:04.5Z", 500_000_000),
            ("2026-11-23T02:31:04.550Z", 550_000_000),
            ("2026-11-23T02:31:04.55534Z", 555_340_000),
            ("2026-11-23T02:31:04.5553412Z", 555_341_200),
            ("2026-11-23T02:31:04.555341234Z", 555_341_234),
        ] {
            let t = ts(text);
            assert_eq!(t.as_second(), base.as_second(), "{text}");
            assert_eq!(t.subsec_nanosecond(), nanos, "{text}");
        }
        assert_eq!(ts("2026-11-23T03:31:04+01:00"), base);
        assert_eq!(ts("2026-11-22T21:01:04-05:30"), base);
    }

    #[test]
    fn rejects_garbage_and_offsetless_times() {
        for bad in [
            "",
            "yesterday",
            "2026-11-23T02:31:04",
            "2026-13-01T00:00:00Z",
        ] {
            assert_eq!(parse_timestamp(bad), None, "{bad}");
        }
    }

    #[test]
    fn never_round_trips() {
        let n = ts(NEVER);
        assert!(is_never(n));
        assert_eq!(n, never());
        assert_eq!(format_timestamp(n), NEVER);
        assert!(!is_never(ts("0001-01-01T00:00:00.0000001Z")));
    }
}
