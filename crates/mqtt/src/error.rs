//! The crate's one error type: what [`decode`](crate::decode) rejects as malformed, what
//! [`encode`](crate::encode) refuses to put on the wire, and the packet size limit.

use crate::packet::PacketType;

/// Why a packet could not be decoded or encoded.
///
/// Every decode error means the peer broke the protocol; the only sound reaction is to close
/// the connection (MQTT 3.1.1 §4.8), so the variants aim at a useful log line rather than at
/// recovery.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The frame (fixed header plus remaining length) is larger than the caller's limit.
    /// Raised as soon as the fixed header is readable, before the body arrives.
    #[error("packet of {size} bytes exceeds the limit of {max} bytes")]
    PacketTooLarge { size: usize, max: usize },

    #[error("malformed remaining length: the variable-length encoding uses more than 4 bytes")]
    MalformedRemainingLength,

    #[error("unknown packet type {0} (types 0 and 15 are reserved)")]
    UnknownPacketType(u8),

    #[error(
        "invalid fixed header flags {flags:#06b} for {packet}: MQTT 3.1.1 §2.2.2 requires {expected:#06b}"
    )]
    InvalidFlags {
        packet: PacketType,
        flags: u8,
        expected: u8,
    },

    #[error("invalid QoS level {0}")]
    InvalidQoS(u8),

    #[error("PUBLISH with QoS 0 must not set the DUP flag")]
    DupWithQoS0,

    #[error("{packet} must have a remaining length of {expected} bytes, not {actual}")]
    InvalidRemainingLength {
        packet: PacketType,
        expected: usize,
        actual: usize,
    },

    /// A field, or the length prefix of one, runs past the end given by the remaining length.
    #[error("{field} runs past the end of the packet given by its remaining length")]
    Truncated { field: &'static str },

    #[error("{packet} has {len} unexpected bytes after its last field")]
    TrailingBytes { packet: PacketType, len: usize },

    #[error("{field} is not valid UTF-8")]
    InvalidUtf8 { field: &'static str },

    #[error("{field} contains the null character U+0000, which MQTT forbids")]
    NullCharacter { field: &'static str },

    #[error("{field} is {len} bytes long; MQTT strings and binary fields hold at most 65535")]
    StringTooLong { field: &'static str, len: usize },

    #[error("remaining length {0} exceeds the MQTT maximum of 268435455 bytes")]
    RemainingLengthTooLarge(usize),

    #[error("{0} carries packet identifier 0; it must be non-zero")]
    ZeroPacketId(PacketType),

    #[error("{0} carries no topic filters; at least one is required")]
    NoTopicFilters(PacketType),

    #[error("SUBACK carries no return codes; at least one is required")]
    NoReturnCodes,

    #[error("invalid SUBSCRIBE options byte {0:#04x}: bits 7-2 are reserved and must be zero")]
    InvalidSubscribeOptions(u8),

    #[error("invalid SUBACK return code {0:#04x}")]
    InvalidSubAckReturnCode(u8),

    #[error("invalid topic name: {0}")]
    InvalidTopicName(&'static str),

    #[error("CONNECT flags have the reserved bit 0 set")]
    ConnectReservedFlag,

    #[error("CONNECT has the password flag set without the user name flag")]
    PasswordWithoutUsername,

    #[error("CONNECT sets will QoS or will retain without the will flag")]
    InconsistentWillFlags,

    #[error("invalid CONNACK acknowledge flags {0:#04x}: bits 7-1 are reserved and must be zero")]
    InvalidConnAckFlags(u8),

    #[error("invalid CONNACK return code {0}")]
    InvalidConnectReturnCode(u8),

    #[error("CONNACK refuses the connection (return code {0}) yet sets session present")]
    SessionPresentWithRefusal(u8),
}
