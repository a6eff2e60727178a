//! twinhub-eventhub: the rules of the Event Hub-compatible endpoint, without I/O. The server's
//! AMQP endpoint asks this crate what a link address names ([`address`]), where a receiver
//! starts ([`filter`]), what a `$cbs` or `$management` request says and how to answer it
//! ([`management`]), and how a stored device-to-cloud message looks as an AMQP message
//! ([`event`]). Facts: `messaging-protocol.md` sections 0 and A.

pub mod address;
pub mod event;
pub mod filter;
pub mod management;

pub use address::{Node, parse_address};
pub use event::{EventMeta, RuntimeInfo, event_message};
pub use filter::{FilterError, StartPosition, parse_selector};

/// The partition ids of an endpoint with `count` partitions: `"0"`, `"1"`, ...
pub fn partition_ids(count: u32) -> Vec<String> {
    (0..count).map(|p| p.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_ids_count_from_zero() {
        assert_eq!(partition_ids(3), ["0", "1", "2"]);
    }
}
