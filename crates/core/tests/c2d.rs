//! Cloud-to-device queues and feedback over the in-memory store: IoT Hub's queue rules (depth,
//! expiry, locks, abandon count, purge), feedback records and their batching, and what a
//! reopened hub finds again.

use std::sync::Arc;
use std::time::Duration;

use twinhub_core::c2d::{C2dOptions, Holder};
use twinhub_core::{Hub, HubOptions};
use twinhub_proto::c2d::{Ack, CloudMessage, FeedbackStatus};
use twinhub_proto::error::ErrorCode;
use twinhub_proto::model::{Device, DeviceStatus};
use twinhub_store::{MemoryStore, Store, Table};

async fn hub_over(store: Arc<MemoryStore>, tweak: impl FnOnce(&mut C2dOptions)) -> Arc<Hub> {
    let mut options = HubOptions::new("hub.test", Vec::new());
    tweak(&mut options.c2d);
    Hub::open(store as Arc<dyn Store>, options)
        .await
        .expect("hub opens")
}

async fn hub_with(tweak: impl FnOnce(&mut C2dOptions)) -> Arc<Hub> {
    let hub = hub_over(Arc::new(MemoryStore::new()), tweak).await;
    for id in ["d1", "d2"] {
        hub.put_device(
            id,
            &Device {
                device_id: id.into(),
                status: DeviceStatus::Enabled,
                ..Default::default()
            },
            None,
        )
        .await
        .unwrap();
    }
    hub
}

fn message(device: &str, id: &str, ack: Ack) -> CloudMessage {
    CloudMessage {
        message_id: Some(id.into()),
        to: format!("/devices/{device}/messages/devicebound"),
        ack,
        body: id.as_bytes().to_vec(),
        application: vec![("k".into(), "v".into())],
        ..Default::default()
    }
}

async fn statuses(hub: &Hub) -> Vec<(String, FeedbackStatus)> {
    let mut out = Vec::new();
    while let Some(batch) = hub.c2d_feedback_poll() {
        out.extend(
            batch
                .records
                .iter()
                .map(|r| (r.original_message_id.clone(), r.status_code)),
        );
        let token = batch.lock_token.clone();
        hub.c2d_feedback_complete(&token).await.unwrap();
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_goes_out_in_order_and_completion_gives_success_feedback() {
    let hub = hub_with(|_| {}).await;
    let first = hub.send_c2d(message("d1", "m1", Ack::Full)).await.unwrap();
    let second = hub.send_c2d(message("d1", "m2", Ack::None)).await.unwrap();
    assert!(second > first);
    assert_eq!(hub.c2d().depth("d1"), 2);
    assert_eq!(
        hub.get_device("d1")
            .await
            .unwrap()
            .cloud_to_device_message_count,
        Some(2)
    );
    let got = hub.c2d_receive("d1", Holder::Poll).await.unwrap().unwrap();
    assert_eq!(got.message.message_id.as_deref(), Some("m1"));
    assert_eq!(got.message.body, b"m1");
    assert_eq!(
        got.message.application,
        vec![("k".to_string(), "v".to_string())]
    );
    assert!(got.message.expiry_ms > got.message.enqueued_ms);
    assert!(!got.redelivery);
    // The locked one is invisible; the next in order is handed out.
    let next = hub.c2d_receive("d1", Holder::Poll).await.unwrap().unwrap();
    assert_eq!(next.message.message_id.as_deref(), Some("m2"));
    assert!(hub.c2d_receive("d1", Holder::Poll).await.unwrap().is_none());
    hub.c2d_complete("d1", &got.lock_token).await.unwrap();
    hub.c2d_complete("d1", &next.lock_token).await.unwrap();
    assert_eq!(hub.c2d().depth("d1"), 0);
    // Only the message that asked for feedback has a record.
    assert_eq!(
        statuses(&hub).await,
        vec![("m1".to_string(), FeedbackStatus::Success)]
    );
    // A second completion with the same token finds no lock.
    let err = hub.c2d_complete("d1", &got.lock_token).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::DeviceMessageLockLost);
}

#[tokio::test]
async fn bad_sends_are_refused_with_iot_hub_codes() {
    let hub = hub_with(|o| o.max_queue_depth = 2).await;
    let err = hub
        .send_c2d(message("nobody", "m", Ack::None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::DeviceNotFound);
    let mut big = message("d1", "big", Ack::None);
    big.body = vec![b'x'; 64 * 1024 + 1];
    assert_eq!(
        hub.send_c2d(big).await.unwrap_err().code(),
        ErrorCode::MessageTooLarge
    );
    let mut late = message("d1", "late", Ack::None);
    late.expiry_ms = 1_000;
    assert_eq!(
        hub.send_c2d(late).await.unwrap_err().code(),
        ErrorCode::ArgumentInvalid
    );
    let mut nowhere = message("d1", "x", Ack::None);
    nowhere.to = "/devices/d1/messages/events".into();
    assert_eq!(
        hub.send_c2d(nowhere).await.unwrap_err().code(),
        ErrorCode::ArgumentInvalid
    );
    let mut module = message("d1", "x", Ack::None);
    module.to = "/devices/d1/modules/m1/messages/devicebound".into();
    assert_eq!(
        hub.send_c2d(module).await.unwrap_err().code(),
        ErrorCode::ModuleNotFound
    );
    hub.send_c2d(message("d1", "a", Ack::None)).await.unwrap();
    hub.send_c2d(message("d1", "b", Ack::None)).await.unwrap();
    let err = hub
        .send_c2d(message("d1", "c", Ack::None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::DeviceMaximumQueueDepthExceeded);
    // Another device's queue is its own.
    hub.send_c2d(message("d2", "c", Ack::None)).await.unwrap();
    // An expiry beyond the maximum is cut to it.
    let mut far = message("d2", "far", Ack::None);
    far.expiry_ms = i64::MAX / 2;
    hub.send_c2d(far).await.unwrap();
    let _ = hub.c2d_receive("d2", Holder::Poll).await.unwrap().unwrap();
    let far = hub.c2d_receive("d2", Holder::Poll).await.unwrap().unwrap();
    let two_days = 2 * 86_400_000;
    assert!(far.message.expiry_ms - far.message.enqueued_ms <= two_days);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandons_count_until_the_message_is_dead_lettered() {
    let hub = hub_with(|o| o.max_delivery_count = 3).await;
    hub.send_c2d(message("d1", "m", Ack::Negative))
        .await
        .unwrap();
    for round in 1..=3u32 {
        let got = hub.c2d_receive("d1", Holder::Poll).await.unwrap().unwrap();
        assert_eq!(got.message.delivery_count, round - 1);
        assert_eq!(got.redelivery, round > 1);
        hub.c2d_abandon("d1", &got.lock_token).await.unwrap();
    }
    assert_eq!(hub.c2d().depth("d1"), 0);
    assert!(hub.c2d_receive("d1", Holder::Poll).await.unwrap().is_none());
    assert_eq!(
        statuses(&hub).await,
        vec![("m".to_string(), FeedbackStatus::DeliveryCountExceeded)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_dead_letters_and_positive_ack_hears_nothing_of_it() {
    let hub = hub_with(|_| {}).await;
    hub.send_c2d(message("d1", "pos", Ack::Positive))
        .await
        .unwrap();
    hub.send_c2d(message("d1", "neg", Ack::Negative))
        .await
        .unwrap();
    for _ in 0..2 {
        let got = hub.c2d_receive("d1", Holder::Poll).await.unwrap().unwrap();
        hub.c2d_reject("d1", &got.lock_token).await.unwrap();
    }
    assert_eq!(
        statuses(&hub).await,
        vec![("neg".to_string(), FeedbackStatus::Rejected)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lapsed_lock_hands_the_message_out_again_without_counting() {
    let hub = hub_with(|o| o.lock_duration = Duration::from_millis(50)).await;
    hub.send_c2d(message("d1", "m", Ack::Full)).await.unwrap();
    let first = hub.c2d_receive("d1", Holder::Poll).await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(80)).await;
    let again = hub.c2d_receive("d1", Holder::Poll).await.unwrap().unwrap();
    assert!(again.redelivery);
    assert_eq!(again.message.delivery_count, 0);
    // The first lock is gone: its token completes nothing.
    assert_eq!(
        hub.c2d_complete("d1", &first.lock_token)
            .await
            .unwrap_err()
            .code(),
        ErrorCode::DeviceMessageLockLost
    );
    hub.c2d_complete("d1", &again.lock_token).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_keeps_its_locks_until_it_ends() {
    let hub = hub_with(|o| o.lock_duration = Duration::from_millis(20)).await;
    hub.send_c2d(message("d1", "m", Ack::None)).await.unwrap();
    let held = hub
        .c2d_receive("d1", Holder::Session(7))
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(40)).await;
    hub.c2d_sweep().await.unwrap();
    assert!(hub.c2d_receive("d1", Holder::Poll).await.unwrap().is_none());
    let watch = hub.c2d().watch("d1");
    hub.c2d_release("d1", 7);
    tokio::time::timeout(Duration::from_secs(5), watch.notified())
        .await
        .expect("a release wakes the device's watcher");
    let again = hub
        .c2d_receive("d1", Holder::Session(8))
        .await
        .unwrap()
        .unwrap();
    assert!(again.redelivery);
    assert_eq!(again.message.message_id, held.message.message_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_messages_are_never_delivered_and_give_expired_feedback() {
    let hub = hub_with(|_| {}).await;
    let mut m = message("d1", "short", Ack::Full);
    m.expiry_ms = twinhub_core::keys::now_millis() + 100;
    hub.send_c2d(m).await.unwrap();
    hub.send_c2d(message("d1", "long", Ack::None))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let got = hub.c2d_receive("d1", Holder::Poll).await.unwrap().unwrap();
    assert_eq!(got.message.message_id.as_deref(), Some("long"));
    assert_eq!(
        statuses(&hub).await,
        vec![("short".to_string(), FeedbackStatus::Expired)]
    );
    // The sweep finds expiries of devices that never ask.
    let mut m = message("d2", "swept", Ack::Negative);
    m.expiry_ms = twinhub_core::keys::now_millis() + 50;
    hub.send_c2d(m).await.unwrap();
    tokio::time::sleep(Duration::from_millis(80)).await;
    hub.c2d_sweep().await.unwrap();
    assert_eq!(hub.c2d().depth("d2"), 0);
    assert_eq!(
        statuses(&hub).await,
        vec![("swept".to_string(), FeedbackStatus::Expired)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_removes_locked_and_waiting_messages() {
    let hub = hub_with(|_| {}).await;
    for id in ["a", "b", "c"] {
        hub.send_c2d(message("d1", id, Ack::Full)).await.unwrap();
    }
    let locked = hub.c2d_receive("d1", Holder::Poll).await.unwrap().unwrap();
    assert_eq!(hub.c2d_purge("d1").await.unwrap(), 3);
    assert_eq!(hub.c2d_purge("d1").await.unwrap(), 0);
    assert_eq!(hub.c2d().depth("d1"), 0);
    assert_eq!(
        hub.c2d_complete("d1", &locked.lock_token)
            .await
            .unwrap_err()
            .code(),
        ErrorCode::DeviceMessageLockLost
    );
    let purged = statuses(&hub).await;
    assert_eq!(purged.len(), 3);
    assert!(purged.iter().all(|(_, s)| *s == FeedbackStatus::Purged));
    assert_eq!(
        hub.c2d_purge("nobody").await.unwrap_err().code(),
        ErrorCode::DeviceNotFound
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reopened_hub_finds_its_queues_and_feedback_and_numbers_on() {
    let store = Arc::new(MemoryStore::new());
    let last = {
        let hub = hub_over(store.clone(), |_| {}).await;
        hub.put_device(
            "d1",
            &Device {
                device_id: "d1".into(),
                ..Default::default()
            },
            None,
        )
        .await
        .unwrap();
        hub.send_c2d(message("d1", "done", Ack::Full))
            .await
            .unwrap();
        let got = hub
            .c2d_receive("d1", Holder::Session(1))
            .await
            .unwrap()
            .unwrap();
        hub.c2d_complete("d1", &got.lock_token).await.unwrap();
        hub.send_c2d(message("d1", "a", Ack::None)).await.unwrap();
        let last = hub.send_c2d(message("d1", "b", Ack::None)).await.unwrap();
        // Locked when the hub stops: queued again after the restart.
        hub.c2d_receive("d1", Holder::Session(1))
            .await
            .unwrap()
            .unwrap();
        last
    };
    let hub = hub_over(store.clone(), |_| {}).await;
    assert_eq!(hub.c2d().depth("d1"), 2);
    let a = hub.c2d_receive("d1", Holder::Poll).await.unwrap().unwrap();
    assert_eq!(a.message.message_id.as_deref(), Some("a"));
    let next = hub.send_c2d(message("d1", "c", Ack::None)).await.unwrap();
    assert!(next > last, "{next} after {last}");
    assert_eq!(
        statuses(&hub).await,
        vec![("done".to_string(), FeedbackStatus::Success)]
    );
    assert_eq!(store.count(Table::Feedback).await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_device_drops_its_queue_and_feedback() {
    let store = Arc::new(MemoryStore::new());
    let hub = hub_over(store.clone(), |_| {}).await;
    hub.put_device(
        "d1",
        &Device {
            device_id: "d1".into(),
            ..Default::default()
        },
        None,
    )
    .await
    .unwrap();
    hub.send_c2d(message("d1", "gone", Ack::Full))
        .await
        .unwrap();
    hub.send_c2d(message("d1", "rejected", Ack::Full))
        .await
        .unwrap();
    let got = hub.c2d_receive("d1", Holder::Poll).await.unwrap().unwrap();
    hub.c2d_reject("d1", &got.lock_token).await.unwrap();
    assert_eq!(hub.c2d().feedback_depth(), 1);
    hub.delete_device("d1", None).await.unwrap();
    assert_eq!(hub.c2d().depth("d1"), 0);
    assert_eq!(hub.c2d().feedback_depth(), 0);
    assert_eq!(store.count(Table::CloudMessages).await.unwrap(), 0);
    assert_eq!(store.count(Table::Feedback).await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_goes_out_in_batches_by_count_or_interval() {
    let hub = hub_with(|o| {
        o.feedback_batch = 4;
        o.feedback_interval = Duration::from_millis(300);
        o.max_queue_depth = 50;
    })
    .await;
    let finish = |id: &'static str| {
        let hub = hub.clone();
        async move {
            hub.send_c2d(message("d1", id, Ack::Full)).await.unwrap();
            let got = hub.c2d_receive("d1", Holder::Poll).await.unwrap().unwrap();
            hub.c2d_complete("d1", &got.lock_token).await.unwrap();
        }
    };
    // Nothing sent lately: the first record goes out at once.
    finish("first").await;
    let first = tokio::time::timeout(Duration::from_millis(200), hub.c2d_feedback_next())
        .await
        .expect("the first record is due at once");
    assert_eq!(first.records.len(), 1);
    assert!(
        serde_json::from_slice::<serde_json::Value>(&first.body())
            .unwrap()
            .is_array()
    );
    hub.c2d_feedback_complete(&first.lock_token).await.unwrap();
    // One record soon after waits for the interval.
    finish("second").await;
    let started = std::time::Instant::now();
    let second = hub.c2d_feedback_next().await;
    assert!(
        started.elapsed() >= Duration::from_millis(150),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(second.records.len(), 1);
    // Abandoned, it comes back with a count; completed, it is gone.
    hub.c2d_feedback_abandon(&second.lock_token).await.unwrap();
    let again = hub.c2d_feedback_poll().unwrap();
    assert_eq!(again.delivery_count, 1);
    hub.c2d_feedback_complete(&again.lock_token).await.unwrap();
    assert_eq!(
        hub.c2d_feedback_complete(&again.lock_token)
            .await
            .unwrap_err()
            .code(),
        ErrorCode::DeviceMessageLockLost
    );
    // A full batch does not wait.
    for id in ["a", "b", "c", "d", "e"] {
        finish(id).await;
    }
    let full = tokio::time::timeout(Duration::from_millis(200), hub.c2d_feedback_next())
        .await
        .expect("a full batch is due at once");
    assert_eq!(full.records.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_feedback_receiver_is_woken_by_the_first_record() {
    let hub = hub_with(|_| {}).await;
    // Nothing waits yet: the receiver parks with no deadline worth speaking of.
    let waiter = tokio::spawn({
        let hub = hub.clone();
        async move { hub.c2d_feedback_next().await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    hub.send_c2d(message("d1", "late", Ack::Full))
        .await
        .unwrap();
    let got = hub.c2d_receive("d1", Holder::Poll).await.unwrap().unwrap();
    hub.c2d_complete("d1", &got.lock_token).await.unwrap();
    let batch = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("the record wakes the parked receiver")
        .unwrap();
    assert_eq!(batch.records[0].original_message_id, "late");
}
