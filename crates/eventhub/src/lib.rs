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

/// The Event Hub-compatible name for a hub host name: its first DNS label, as IoT Hub names its
/// built-in endpoint after the hub. An IP address or `localhost` gives `twinhub`.
pub fn entity_name(hostname: &str) -> String {
    let is_ip = hostname.parse::<std::net::IpAddr>().is_ok()
        || hostname.starts_with('[')
        || hostname
            .rsplit_once(':')
            .is_some_and(|(h, _)| h.parse::<std::net::IpAddr>().is_ok());
    let host = hostname.split(':').next().unwrap_or(hostname);
    let first = host.split('.').next().unwrap_or("");
    if is_ip || first.is_empty() || first.eq_ignore_ascii_case("localhost") {
        "twinhub".to_owned()
    } else {
        first.to_ascii_lowercase()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entity_names() {
        assert_eq!(entity_name("myhub.azure-devices.net"), "myhub");
        assert_eq!(entity_name("Hub1.example"), "hub1");
        assert_eq!(entity_name("127.0.0.1"), "twinhub");
        assert_eq!(entity_name("localhost"), "twinhub");
        assert_eq!(entity_name("[::1]"), "twinhub");
        assert_eq!(partition_ids(3), ["0", "1", "2"]);
    }
}
