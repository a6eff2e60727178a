//! MQTT 3.1.1 packet codec for twinhub: bytes in, [`Packet`]s out, and back again, with no I/O.
//! The server's per-connection task and the Rust SDK own the sockets and buffers; they call
//! [`decode`] on what they read and [`encode`] on what they are about to write.
//!
//! Decoding is zero-copy where it matters: a PUBLISH topic and payload are slices of the
//! received frame, so a message is never copied between the socket and its subscribers.
//! Anything the specification calls malformed is an [`Error`]; the caller closes the
//! connection, as MQTT 3.1.1 §4.8 requires.

mod decode;
mod encode;
mod error;
mod packet;
mod topic;

pub use decode::decode;
pub use encode::{encode, encoded_len};
pub use error::Error;
pub use packet::{
    ConnAck, Connect, ConnectReturnCode, LastWill, Packet, PacketType, Publish, QoS, SubAck,
    Subscribe, SubscribeReturnCode, Unsubscribe,
};
pub use topic::Topic;

/// The largest frame the server accepts by default: 256 KiB of payload plus 4 KiB for the fixed
/// header, topic and packet id. This is the limit Azure IoT Hub enforces on device messages.
pub const DEFAULT_MAX_PACKET_SIZE: usize = 262_144 + 4_096;

/// The largest remaining length the 4-byte variable-length encoding can express (§2.2.3).
pub const MAX_REMAINING_LENGTH: usize = 268_435_455;

/// The longest UTF-8 string or binary field: its length prefix is 16 bits (§1.5.3).
pub const MAX_STRING_LENGTH: usize = 65_535;
