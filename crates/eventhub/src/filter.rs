//! Where a receiver starts, from the selector filter on its source: `amqp.annotation.<field>
//! <op> <value>` with field `x-opt-offset`, `x-opt-sequence-number`, `x-opt-enqueued-time` or
//! the legacy `x-opt-enqueuedtimeutc`, op `>` or `>=`, the value quoted or not
//! (messaging-protocol A5).

/// The filter map key and descriptor the Event Hubs clients use.
pub const SELECTOR_FILTER: &str = "apache.org:selector-filter:string";
/// The same descriptor as a numeric code (Microsoft's domain 0x468C, filter 4).
pub const SELECTOR_FILTER_CODE: u64 = 0x0000_468C_0000_0004;

/// A receiver's starting point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartPosition {
    /// The oldest retained event (offset `-1`, or no filter at all).
    Earliest,
    /// Only events enqueued after the link attaches (`@latest`).
    Latest,
    Offset {
        offset: u64,
        inclusive: bool,
    },
    Sequence {
        sequence: i64,
        inclusive: bool,
    },
    /// Milliseconds since the epoch.
    EnqueuedTime {
        ms: i64,
        inclusive: bool,
    },
}

/// A selector this endpoint does not understand.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unsupported selector filter \"{0}\"")]
pub struct FilterError(pub String);

/// Parses a selector filter expression.
pub fn parse_selector(text: &str) -> Result<StartPosition, FilterError> {
    let bad = || FilterError(text.chars().take(120).collect());
    let rest = text.trim();
    let rest = rest
        .get(..15)
        .filter(|p| p.eq_ignore_ascii_case("amqp.annotation"))
        .map(|_| &rest[15..])
        .ok_or_else(bad)?;
    let rest = rest.strip_prefix('.').ok_or_else(bad)?;
    let field_end = rest
        .find(|c: char| c.is_whitespace() || c == '>' || c == '=' || c == '<')
        .ok_or_else(bad)?;
    let field = rest[..field_end].to_ascii_lowercase();
    let rest = rest[field_end..].trim_start();
    let (inclusive, rest) = if let Some(r) = rest.strip_prefix(">=") {
        (true, r)
    } else if let Some(r) = rest.strip_prefix('>') {
        (false, r)
    } else {
        return Err(bad());
    };
    let value = rest.trim();
    let value = value
        .strip_prefix('\'')
        .and_then(|v| v.strip_suffix('\''))
        .or_else(|| value.strip_prefix('"').and_then(|v| v.strip_suffix('"')))
        .unwrap_or(value)
        .trim();
    match field.as_str() {
        "x-opt-offset" => match value {
            "-1" => Ok(StartPosition::Earliest),
            v if v.eq_ignore_ascii_case("@latest") => Ok(StartPosition::Latest),
            v => v
                .parse::<u64>()
                .map(|offset| StartPosition::Offset { offset, inclusive })
                .map_err(|_| bad()),
        },
        "x-opt-sequence-number" => value
            .parse::<i64>()
            .map(|sequence| StartPosition::Sequence {
                sequence,
                inclusive,
            })
            .map_err(|_| bad()),
        "x-opt-enqueued-time" | "x-opt-enqueuedtimeutc" => value
            .parse::<i64>()
            .map(|ms| StartPosition::EnqueuedTime { ms, inclusive })
            .map_err(|_| bad()),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_forms_azure_eventhub_sends() {
        assert_eq!(
            parse_selector("amqp.annotation.x-opt-offset > '@latest'"),
            Ok(StartPosition::Latest)
        );
        assert_eq!(
            parse_selector("amqp.annotation.x-opt-offset > '-1'"),
            Ok(StartPosition::Earliest)
        );
        assert_eq!(
            parse_selector("amqp.annotation.x-opt-offset >= '1234'"),
            Ok(StartPosition::Offset {
                offset: 1234,
                inclusive: true
            })
        );
        assert_eq!(
            parse_selector("amqp.annotation.x-opt-sequence-number > '7'"),
            Ok(StartPosition::Sequence {
                sequence: 7,
                inclusive: false
            })
        );
        assert_eq!(
            parse_selector("amqp.annotation.x-opt-enqueued-time >= '1518731960545'"),
            Ok(StartPosition::EnqueuedTime {
                ms: 1518731960545,
                inclusive: true
            })
        );
    }

    #[test]
    fn the_legacy_unquoted_form() {
        assert_eq!(
            parse_selector("amqp.annotation.x-opt-enqueuedtimeutc > 1518731960545"),
            Ok(StartPosition::EnqueuedTime {
                ms: 1518731960545,
                inclusive: false
            })
        );
        assert_eq!(
            parse_selector("AMQP.ANNOTATION.X-OPT-OFFSET>'5'"),
            Ok(StartPosition::Offset {
                offset: 5,
                inclusive: false
            })
        );
    }

    #[test]
    fn nonsense_is_refused() {
        for text in [
            "",
            "amqp.annotation.x-opt-offset",
            "amqp.annotation.x-opt-offset < '5'",
            "amqp.annotation.x-opt-offset > 'abc'",
            "amqp.annotation.x-opt-partition-key > '1'",
            "x-opt-offset > '1'",
            "amqp.annotation.x-opt-sequence-number > ''",
        ] {
            assert!(parse_selector(text).is_err(), "{text}");
        }
    }
}
