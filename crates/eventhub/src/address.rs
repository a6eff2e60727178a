//! What a link's source or target address names. Clients spell addresses many ways
//! (`amqps://host:5671/eh/ConsumerGroups/$Default/Partitions/0`, `/messages/events/...`,
//! `/messages/serviceBound/feedback`, `$cbs`), so matching strips the scheme and host, a
//! leading `/`, and ignores case in the fixed words (messaging-protocol 0.6).

/// A node a link can attach to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// `$cbs`: put-token requests.
    Cbs,
    /// `<entity>/$management` or a bare `$management`: metadata requests.
    Management { entity: Option<String> },
    /// `<entity>/ConsumerGroups/<cg>/Partitions/<p>`: a partition read by a consumer group.
    Partition {
        entity: String,
        consumer_group: String,
        partition: String,
    },
    /// IoT Hub's own `messages/events/$management`: answered with a redirect.
    HubEventsManagement,
    /// IoT Hub's own `messages/events/ConsumerGroups/<cg>/Partitions/<p>`: a redirect too.
    HubEventsPartition {
        consumer_group: String,
        partition: String,
    },
    /// `messages/devicebound`: back ends send cloud-to-device messages to it (the client's
    /// sender link targets it; each message's `to` names the device).
    DeviceBound,
    /// `messages/servicebound/feedback`: back ends receive delivery feedback from it (the
    /// client's receiver link has it as source).
    Feedback,
    /// Anything else (refused with `amqp:not-found`).
    Other(String),
}

/// Strips `amqps://host[:port]` (or `amqp://`, `sb://`) and a leading `/`.
pub fn path_of(address: &str) -> &str {
    let lower_has_scheme = address
        .find("://")
        .filter(|&i| address[..i].bytes().all(|b| b.is_ascii_alphabetic()));
    let rest = match lower_has_scheme {
        Some(i) => {
            let after = &address[i + 3..];
            match after.find('/') {
                Some(slash) => &after[slash..],
                None => "",
            }
        }
        None => address,
    };
    rest.trim_start_matches('/')
}

/// Classifies `address`.
pub fn parse_address(address: &str) -> Node {
    let path = path_of(address).trim_end_matches('/');
    let parts: Vec<&str> = path.split('/').collect();
    let eq = |a: &str, b: &str| a.eq_ignore_ascii_case(b);
    match parts.as_slice() {
        [one] if eq(one, "$cbs") => Node::Cbs,
        [one] if eq(one, "$management") => Node::Management { entity: None },
        [m, d] if eq(m, "messages") && eq(d, "devicebound") => Node::DeviceBound,
        [m, s, f] if eq(m, "messages") && eq(s, "servicebound") && eq(f, "feedback") => {
            Node::Feedback
        }
        [m, e, mgmt] if eq(m, "messages") && eq(e, "events") && eq(mgmt, "$management") => {
            Node::HubEventsManagement
        }
        [m, e, cgs, cg, ps, p]
            if eq(m, "messages")
                && eq(e, "events")
                && eq(cgs, "consumergroups")
                && eq(ps, "partitions") =>
        {
            Node::HubEventsPartition {
                consumer_group: (*cg).to_owned(),
                partition: (*p).to_owned(),
            }
        }
        [entity, mgmt] if eq(mgmt, "$management") && !entity.is_empty() => Node::Management {
            entity: Some((*entity).to_owned()),
        },
        [entity, cgs, cg, ps, p]
            if eq(cgs, "consumergroups") && eq(ps, "partitions") && !entity.is_empty() =>
        {
            Node::Partition {
                entity: (*entity).to_owned(),
                consumer_group: (*cg).to_owned(),
                partition: (*p).to_owned(),
            }
        }
        _ => Node::Other(path.to_owned()),
    }
}

/// The address IoT Hub puts in a redirect: `amqps://<host>:<port>/<entity>/<rest>`, with the
/// port spelled out because the samples parse it with regexes (messaging-protocol A7).
pub fn redirect_address(host: &str, port: u16, entity: &str, rest: &str) -> String {
    format!("amqps://{host}:{port}/{entity}/{rest}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partition(entity: &str, cg: &str, p: &str) -> Node {
        Node::Partition {
            entity: entity.into(),
            consumer_group: cg.into(),
            partition: p.into(),
        }
    }

    #[test]
    fn addresses_as_clients_send_them() {
        assert_eq!(
            parse_address("amqps://h.example:5671/hub/ConsumerGroups/$Default/Partitions/0"),
            partition("hub", "$Default", "0")
        );
        assert_eq!(
            parse_address("amqps://h.example/hub/consumergroups/$default/partitions/3"),
            partition("hub", "$default", "3")
        );
        assert_eq!(
            parse_address("/hub/ConsumerGroups/cg/Partitions/1"),
            partition("hub", "cg", "1")
        );
        assert_eq!(parse_address("$cbs"), Node::Cbs);
        assert_eq!(parse_address("$CBS"), Node::Cbs);
        assert_eq!(
            parse_address("amqps://h:5671/hub/$management"),
            Node::Management {
                entity: Some("hub".into())
            }
        );
        assert_eq!(
            parse_address("$management"),
            Node::Management { entity: None }
        );
        assert_eq!(
            parse_address("amqps://h/messages/events/$management"),
            Node::HubEventsManagement
        );
        assert_eq!(
            parse_address("/messages/events/ConsumerGroups/$Default/Partitions/0"),
            Node::HubEventsPartition {
                consumer_group: "$Default".into(),
                partition: "0".into()
            }
        );
        assert!(matches!(parse_address(""), Node::Other(_)));
        assert!(matches!(parse_address("amqps://host-only"), Node::Other(_)));
    }

    #[test]
    fn cloud_to_device_addresses_as_the_service_sdks_send_them() {
        // uamqp (azure-iot-hub), Node azure-iothub, the az CLI.
        for a in [
            "amqps://h.example/messages/devicebound",
            "amqps://h.example:5671/messages/devicebound",
            "/messages/devicebound",
            "messages/devicebound",
            "/Messages/DeviceBound/",
        ] {
            assert_eq!(parse_address(a), Node::DeviceBound, "{a}");
        }
        for a in [
            "/messages/serviceBound/feedback",
            "/messages/servicebound/feedback",
            "amqps://h.example:5671/messages/servicebound/feedback",
            "messages/ServiceBound/Feedback",
        ] {
            assert_eq!(parse_address(a), Node::Feedback, "{a}");
        }
        // Near misses stay unknown: not-found, not a silent match.
        for a in [
            "/messages/devicebound/extra",
            "/devices/d1/messages/devicebound",
            "/messages/serviceBound/filenotifications",
            "/messages/feedback",
            "/messages/servicebound",
        ] {
            assert!(matches!(parse_address(a), Node::Other(_)), "{a}");
        }
    }

    #[test]
    fn redirect_addresses_keep_the_port() {
        assert_eq!(
            redirect_address("h", 5671, "hub", "$management"),
            "amqps://h:5671/hub/$management"
        );
    }
}
