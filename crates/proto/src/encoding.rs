//! Percent-encoding shared by SAS tokens, MQTT topics and user names, and REST paths.
//! IoT Hub's SDKs encode with Python's `quote(safe="")`: everything but RFC 3986 unreserved
//! characters is escaped, and decoding never turns `+` into a space.

use std::borrow::Cow;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};

/// Characters escaped by `quote(s, safe="")`: all but `A-Z a-z 0-9 - . _ ~`.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes `s` the way IoT Hub's SDKs do for SAS fields, property bags, path segments
/// and user name query values.
pub fn quote(s: &str) -> Cow<'_, str> {
    utf8_percent_encode(s, COMPONENT).into()
}

/// Percent-decodes `s`; `None` when the decoded bytes are not UTF-8.
pub(crate) fn unquote(s: &str) -> Option<Cow<'_, str>> {
    percent_decode_str(s).decode_utf8().ok()
}

/// Percent-decodes `s`; `None` when a `%` is not followed by two hex digits or the decoded
/// bytes are not UTF-8 (property bags, where a garbled value must not pass silently).
pub(crate) fn unquote_strict(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut i = 0;
    while let Some(p) = bytes[i..].iter().position(|&b| b == b'%') {
        let at = i + p;
        let hex = bytes.get(at + 1..at + 3)?;
        if !hex.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        i = at + 3;
    }
    unquote(s).map(Cow::into_owned)
}

/// Percent-decodes `s`, replacing invalid UTF-8 with U+FFFD.
pub(crate) fn unquote_lossy(s: &str) -> Cow<'_, str> {
    percent_decode_str(s).decode_utf8_lossy()
}

/// Shortens text echoed in error messages so a hostile input cannot bloat logs.
pub(crate) fn excerpt(s: &str) -> String {
    const MAX: usize = 64;
    let mut out: String = s.chars().take(MAX).collect();
    if s.chars().nth(MAX).is_some() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_matches_python_quote_safe_empty() {
        // Expected values produced by python3 urllib.parse.quote(s, safe="").
        assert_eq!(quote("a b/c"), "a%20b%2Fc");
        assert_eq!(quote("x&y=z"), "x%26y%3Dz");
        assert_eq!(quote("$.mid"), "%24.mid");
        assert_eq!(quote("A-z_0.9~"), "A-z_0.9~");
        assert_eq!(quote("é+"), "%C3%A9%2B");
    }

    #[test]
    fn unquote_keeps_plus_and_rejects_bad_utf8() {
        assert_eq!(unquote("a+b%20c").as_deref(), Some("a+b c"));
        assert_eq!(unquote("%FF"), None);
        assert_eq!(unquote_lossy("%FF"), "\u{FFFD}");
        // A lone '%' is not an escape and passes through unchanged.
        assert_eq!(unquote("100%").as_deref(), Some("100%"));
    }

    #[test]
    fn excerpt_truncates_long_text() {
        assert_eq!(excerpt("short"), "short");
        let long = "x".repeat(100);
        let cut = excerpt(&long);
        assert!(cut.ends_with('…'));
        assert_eq!(cut.chars().count(), 65);
    }
}
