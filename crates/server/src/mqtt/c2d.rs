//! Cloud-to-device delivery on one MQTT session: which queued messages are out at QoS 1
//! under which packet ids, in queue order. The session (`session.rs`) publishes what
//! [`Outbox::track`] numbers and hands PUBACKs to [`Outbox::acked`]; the hub's queue
//! (`twinhub_core::c2d`) locks each message to the session until its PUBACK completes it or
//! the session ends.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::Notify;

/// Messages out at once per session. IoT Hub does not document its number; a few keep a
/// device busy without holding much of its queue away from a reconnecting session.
pub(super) const MAX_IN_FLIGHT: usize = 8;

/// What a PUBACK means for the outbox.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Acked {
    /// The oldest message out: complete it with this lock token.
    Completed(String),
    /// A message out, but not the oldest: MQTT 3.1.1 (4.6) and IoT Hub require PUBACKs in
    /// PUBLISH order.
    OutOfOrder { expected: u16 },
    /// No message of ours (a stray PUBACK).
    Unknown,
}

pub(super) struct Outbox {
    /// The device queue's signal, held only while subscribed: most sessions never subscribe
    /// to cloud-to-device messages, and an idle connection should not carry the hub's watch
    /// entry for them.
    watch: Option<Arc<Notify>>,
    in_flight: VecDeque<(u16, String)>,
    next_pkid: u16,
}

impl Outbox {
    pub(super) fn new() -> Outbox {
        Outbox {
            watch: None,
            in_flight: VecDeque::new(),
            next_pkid: 1,
        }
    }

    /// Completes when the device's queue may have something to hand out; never while not
    /// subscribed.
    pub(super) async fn changed(&self) {
        match &self.watch {
            Some(watch) => watch.notified().await,
            None => std::future::pending().await,
        }
    }

    /// Follows the session's subscription; `watch` gives the device queue's signal when it
    /// subscribes (before the session first takes from the queue, so no wake-up is lost).
    pub(super) fn set_subscribed(&mut self, subscribed: bool, watch: impl FnOnce() -> Arc<Notify>) {
        match (subscribed, &self.watch) {
            (true, None) => self.watch = Some(watch()),
            (false, Some(_)) => self.watch = None,
            _ => {}
        }
    }

    /// Whether the session should take another message from the queue.
    pub(super) fn wants_more(&self) -> bool {
        self.watch.is_some() && self.in_flight.len() < MAX_IN_FLIGHT
    }

    /// Numbers a message about to be published; returns its packet id.
    pub(super) fn track(&mut self, lock_token: String) -> u16 {
        let pkid = loop {
            let candidate = self.next_pkid;
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            if !self.in_flight.iter().any(|(p, _)| *p == candidate) {
                break candidate;
            }
        };
        self.in_flight.push_back((pkid, lock_token));
        pkid
    }

    pub(super) fn acked(&mut self, pkid: u16) -> Acked {
        match self.in_flight.front() {
            Some((front, _)) if *front == pkid => {
                let (_, token) = self.in_flight.pop_front().unwrap_or_default();
                Acked::Completed(token)
            }
            Some((front, _)) if self.in_flight.iter().any(|(p, _)| *p == pkid) => {
                Acked::OutOfOrder { expected: *front }
            }
            _ => Acked::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pubacks_complete_in_order_and_out_of_order_is_named() {
        let mut o = Outbox::new();
        assert!(!o.wants_more());
        o.set_subscribed(true, || Arc::new(Notify::new()));
        let a = o.track("a".into());
        let b = o.track("b".into());
        assert_ne!(a, b);
        assert_eq!(o.acked(999), Acked::Unknown);
        assert_eq!(o.acked(b), Acked::OutOfOrder { expected: a });
        assert_eq!(o.acked(a), Acked::Completed("a".into()));
        assert_eq!(o.acked(b), Acked::Completed("b".into()));
        assert_eq!(o.acked(b), Acked::Unknown);
    }

    #[test]
    fn in_flight_is_bounded_and_packet_ids_skip_zero_and_ids_in_use() {
        let mut o = Outbox::new();
        o.set_subscribed(true, || Arc::new(Notify::new()));
        o.next_pkid = u16::MAX;
        let first = o.track("x".into());
        assert_eq!(first, u16::MAX);
        let second = o.track("y".into());
        assert_eq!(second, 1);
        o.next_pkid = u16::MAX;
        let third = o.track("z".into());
        assert_eq!(third, 2, "65535 and 1 are in use");
        for i in 3..MAX_IN_FLIGHT {
            assert!(o.wants_more());
            o.track(format!("t{i}"));
        }
        assert!(!o.wants_more());
        o.acked(first);
        assert!(o.wants_more());
        o.set_subscribed(false, || unreachable!("no signal is needed to unsubscribe"));
        assert!(!o.wants_more());
    }
}
