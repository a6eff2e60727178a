//! Identifier rules of IoT Hub: device and module ids (1 to 128 characters of ASCII
//! alphanumerics and `- : . + % _ # * ? ! ( ) , = @ ; $ '`, as Microsoft documents them) and
//! direct-method names. The registry and REST layers validate with these before storing or
//! routing anything.

use std::fmt;

/// The longest device or module id IoT Hub accepts.
pub const MAX_ID_LEN: usize = 128;

/// Non-alphanumeric characters IoT Hub allows in device and module ids.
pub const ID_SPECIAL_CHARS: &str = "-:.+%_#*?!(),=@;$'";

/// What kind of identifier failed validation (used in error messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdKind {
    Device,
    Module,
    MethodName,
}

impl fmt::Display for IdKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IdKind::Device => "device id",
            IdKind::Module => "module id",
            IdKind::MethodName => "method name",
        })
    }
}

/// Why an identifier was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} is empty")]
    Empty { kind: IdKind },
    #[error("{kind} is {len} characters long; at most {MAX_ID_LEN} are allowed")]
    TooLong { kind: IdKind, len: usize },
    #[error(
        "{kind} contains {found:?} at index {index}; allowed are ASCII letters, digits and \
         {ID_SPECIAL_CHARS}"
    )]
    InvalidChar {
        kind: IdKind,
        found: char,
        index: usize,
    },
    #[error("method name contains {found:?} at index {index}, which would break MQTT topics")]
    InvalidMethodChar { found: char, index: usize },
}

/// Checks a device id against IoT Hub's rules.
pub fn validate_device_id(id: &str) -> Result<(), IdError> {
    validate_id(id, IdKind::Device)
}

/// Checks a module id against IoT Hub's rules (the same as for device ids).
pub fn validate_module_id(id: &str) -> Result<(), IdError> {
    validate_id(id, IdKind::Module)
}

/// Checks that a direct-method name can travel in `$iothub/methods/POST/{name}/?$rid=`:
/// non-empty, and free of `/` and `?` (they split the topic), the MQTT wildcards `+` and `#`,
/// and control characters.
pub fn validate_method_name(name: &str) -> Result<(), IdError> {
    if name.is_empty() {
        return Err(IdError::Empty {
            kind: IdKind::MethodName,
        });
    }
    match name
        .chars()
        .enumerate()
        .find(|(_, c)| matches!(c, '/' | '?' | '+' | '#') || c.is_control())
    {
        Some((index, found)) => Err(IdError::InvalidMethodChar { found, index }),
        None => Ok(()),
    }
}

fn validate_id(id: &str, kind: IdKind) -> Result<(), IdError> {
    if id.is_empty() {
        return Err(IdError::Empty { kind });
    }
    // Every allowed character is ASCII, so a valid id has as many bytes as characters; a
    // non-ASCII id is reported by the character scan below.
    let len = id.chars().count();
    if len > MAX_ID_LEN {
        return Err(IdError::TooLong { kind, len });
    }
    match id
        .chars()
        .enumerate()
        .find(|&(_, c)| !(c.is_ascii_alphanumeric() || ID_SPECIAL_CHARS.contains(c)))
    {
        Some((index, found)) => Err(IdError::InvalidChar { kind, found, index }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_documented_characters() {
        assert_eq!(validate_device_id("d1"), Ok(()));
        assert_eq!(validate_device_id("Az09-:.+%_#*?!(),=@;$'"), Ok(()));
        assert_eq!(validate_module_id("module-1"), Ok(()));
        assert_eq!(validate_device_id(&"x".repeat(MAX_ID_LEN)), Ok(()));
    }

    #[test]
    fn rejects_bad_ids() {
        assert_eq!(
            validate_device_id(""),
            Err(IdError::Empty {
                kind: IdKind::Device
            })
        );
        assert_eq!(
            validate_module_id(&"m".repeat(129)),
            Err(IdError::TooLong {
                kind: IdKind::Module,
                len: 129
            })
        );
        for (id, found, index) in [
            ("d/with slash", '/', 1),
            ("a b", ' ', 1),
            ("tab\t", '\t', 3),
            ("quote\"", '"', 5),
            ("brace{", '{', 5),
            ("amp&", '&', 3),
            ("tilde~", '~', 5),
            ("back\\", '\\', 4),
            ("é", 'é', 0),
        ] {
            assert_eq!(
                validate_device_id(id),
                Err(IdError::InvalidChar {
                    kind: IdKind::Device,
                    found,
                    index
                }),
                "{id:?}"
            );
        }
    }

    #[test]
    fn length_counts_characters_not_bytes() {
        // 128 two-byte characters: too long is not the reason, the characters are.
        let id = "é".repeat(128);
        assert!(matches!(
            validate_device_id(&id),
            Err(IdError::InvalidChar { index: 0, .. })
        ));
    }

    #[test]
    fn error_messages_name_the_problem() {
        let err = validate_device_id("a b").expect_err("space is not allowed");
        assert_eq!(
            err.to_string(),
            "device id contains ' ' at index 1; allowed are ASCII letters, digits and -:.+%_#*?!(),=@;$'"
        );
        let err = validate_module_id("").expect_err("empty");
        assert_eq!(err.to_string(), "module id is empty");
    }

    #[test]
    fn method_names() {
        assert_eq!(validate_method_name("reboot"), Ok(()));
        assert_eq!(validate_method_name("get status"), Ok(()));
        assert_eq!(validate_method_name("ünïcode"), Ok(()));
        assert_eq!(
            validate_method_name(""),
            Err(IdError::Empty {
                kind: IdKind::MethodName
            })
        );
        for (name, found, index) in [
            ("a/b", '/', 1),
            ("a?b", '?', 1),
            ("+", '+', 0),
            ("x#", '#', 1),
            ("x\n", '\n', 1),
        ] {
            assert_eq!(
                validate_method_name(name),
                Err(IdError::InvalidMethodChar { found, index }),
                "{name:?}"
            );
        }
    }
}
