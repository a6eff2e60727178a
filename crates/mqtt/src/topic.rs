//! [`Topic`]: a topic name or filter held as a validated slice of the received frame, so routing
//! a PUBLISH never copies its topic. Also the MQTT string checks shared by decode and encode.

use std::fmt;

use bytes::Bytes;

use crate::{Error, MAX_STRING_LENGTH};

/// A topic name (in PUBLISH and wills) or topic filter (in SUBSCRIBE and UNSUBSCRIBE).
///
/// Invariant: the bytes are valid UTF-8, contain no U+0000 and are at most 65535 bytes long, so
/// every `Topic` can be encoded. Whether it is a valid *name* or *filter* is a separate question
/// answered by [`Topic::is_valid_name`] and [`Topic::is_valid_filter`].
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Topic(Bytes);

impl Topic {
    /// Validates `bytes` as an MQTT UTF-8 string and wraps it without copying.
    pub fn new(bytes: impl Into<Bytes>) -> Result<Topic, Error> {
        let bytes = bytes.into();
        check_mqtt_str(&bytes, "topic")?;
        Ok(Topic(bytes))
    }

    /// A topic from a string literal, without allocating.
    ///
    /// # Panics
    ///
    /// If `topic` contains U+0000 or is longer than 65535 bytes. Meant for constants, where
    /// that is a programming error; in a `const` it fails the build instead.
    pub const fn from_static(topic: &'static str) -> Topic {
        let bytes = topic.as_bytes();
        assert!(
            bytes.len() <= MAX_STRING_LENGTH,
            "MQTT topic longer than 65535 bytes"
        );
        let mut i = 0;
        while i < bytes.len() {
            assert!(bytes[i] != 0, "MQTT topic contains U+0000");
            i += 1;
        }
        Topic(Bytes::from_static(bytes))
    }

    /// Decoding already validated the bytes; this is only reached with checked input.
    pub(crate) fn from_checked(bytes: Bytes) -> Topic {
        Topic(bytes)
    }

    pub fn as_str(&self) -> &str {
        // Without `unsafe` there is no unchecked conversion, so this re-validates; topics are
        // short and std's validator is fast. The constructor guarantees the fallback is never
        // taken.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The underlying buffer, sharing the frame it was decoded from.
    pub fn into_bytes(self) -> Bytes {
        self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether this may name a PUBLISH or will topic: non-empty and free of the wildcards `+`
    /// and `#` (§4.7.1, §4.7.3).
    pub fn is_valid_name(&self) -> bool {
        check_topic_name(self).is_ok()
    }

    /// Whether this is a well-formed subscription filter (§4.7.1): non-empty, `#` only as the
    /// whole last level, `+` only as a whole level. A server answers an invalid filter with
    /// the SUBACK failure code rather than a decode error, so decoding does not check this.
    pub fn is_valid_filter(&self) -> bool {
        if self.0.is_empty() {
            return false;
        }
        let mut levels = self.0.split(|&b| b == b'/').peekable();
        while let Some(level) = levels.next() {
            let is_last = levels.peek().is_none();
            match level {
                b"#" if is_last => {}
                b"+" => {}
                _ if level.contains(&b'#') || level.contains(&b'+') => return false,
                _ => {}
            }
        }
        true
    }
}

/// Checks that `topic` may name a PUBLISH or will: decode rejects the packet otherwise, and
/// encode refuses to produce one.
pub(crate) fn check_topic_name(topic: &Topic) -> Result<(), Error> {
    let bytes = topic.as_bytes();
    if bytes.is_empty() {
        Err(Error::InvalidTopicName("a topic name must not be empty"))
    } else if bytes.iter().any(|&b| b == b'+' || b == b'#') {
        Err(Error::InvalidTopicName(
            "a topic name must not contain the wildcards '+' or '#'",
        ))
    } else {
        Ok(())
    }
}

/// Checks the rules every MQTT UTF-8 string follows (§1.5.3): length fits the 16-bit prefix,
/// well-formed UTF-8 (which excludes surrogates), and no U+0000.
pub(crate) fn check_mqtt_str<'a>(bytes: &'a [u8], field: &'static str) -> Result<&'a str, Error> {
    if bytes.len() > MAX_STRING_LENGTH {
        return Err(Error::StringTooLong {
            field,
            len: bytes.len(),
        });
    }
    let text = std::str::from_utf8(bytes).map_err(|_| Error::InvalidUtf8 { field })?;
    // In UTF-8 the byte 0 only ever encodes U+0000, so a byte scan suffices.
    if bytes.contains(&0) {
        return Err(Error::NullCharacter { field });
    }
    Ok(text)
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl PartialEq<str> for Topic {
    fn eq(&self, other: &str) -> bool {
        self.0 == other.as_bytes()
    }
}

impl PartialEq<&str> for Topic {
    fn eq(&self, other: &&str) -> bool {
        self.0 == other.as_bytes()
    }
}

impl PartialEq<Topic> for str {
    fn eq(&self, other: &Topic) -> bool {
        other == self
    }
}

impl PartialEq<Topic> for &str {
    fn eq(&self, other: &Topic) -> bool {
        other == *self
    }
}

impl TryFrom<String> for Topic {
    type Error = Error;

    fn try_from(value: String) -> Result<Topic, Error> {
        Topic::new(value)
    }
}

impl TryFrom<&str> for Topic {
    type Error = Error;

    fn try_from(value: &str) -> Result<Topic, Error> {
        Topic::new(Bytes::copy_from_slice(value.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_rejects_invalid_utf8_and_nul() {
        assert_eq!(
            Topic::new(&b"a/\xff"[..]),
            Err(Error::InvalidUtf8 { field: "topic" })
        );
        assert_eq!(
            Topic::new(&b"a\0b"[..]),
            Err(Error::NullCharacter { field: "topic" })
        );
        assert_eq!(
            Topic::new(vec![b'a'; 65_536]),
            Err(Error::StringTooLong {
                field: "topic",
                len: 65_536
            })
        );
        assert!(Topic::new(vec![b'a'; 65_535]).is_ok());
    }

    #[test]
    fn compares_and_displays_as_text() {
        let topic = Topic::from_static("devices/d1/messages/events/");
        assert_eq!(topic, "devices/d1/messages/events/");
        assert_eq!("devices/d1/messages/events/", topic);
        assert_ne!(topic, "devices/d2/messages/events/");
        assert_eq!(topic.to_string(), "devices/d1/messages/events/");
        assert_eq!(format!("{topic:?}"), "\"devices/d1/messages/events/\"");
        assert_eq!(Topic::try_from("é/ü").map(|t| t.len()), Ok(5));
    }

    #[test]
    fn names_exclude_wildcards_and_empty() {
        assert!(Topic::from_static("$iothub/twin/res/200/?$rid=1").is_valid_name());
        assert!(!Topic::from_static("").is_valid_name());
        assert!(!Topic::from_static("a/+/b").is_valid_name());
        assert!(!Topic::from_static("a/#").is_valid_name());
    }

    #[test]
    fn filters_follow_wildcard_placement_rules() {
        for ok in [
            "#",
            "+",
            "a/#",
            "+/+/#",
            "$iothub/methods/POST/#",
            "/",
            "a//b",
            "+/",
        ] {
            assert!(Topic::from_static(ok).is_valid_filter(), "{ok}");
        }
        for bad in ["", "a#", "a/#/b", "#/", "a+/b", "a/b+", "##"] {
            assert!(!Topic::from_static(bad).is_valid_filter(), "{bad}");
        }
    }
}
