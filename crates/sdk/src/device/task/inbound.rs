//! What the hub sends: packets decoded from the read buffer and routed to acknowledgements,
//! twin answers, desired patches, and direct-method calls (run by the application's handler
//! or queued on its stream, and answered through the task).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::Instant;
use twinhub_mqtt::{Packet, Publish, QoS};
use twinhub_proto::topic::{self as iot, Delivery};

use super::conn::Conn;
use super::outbox::Feature;
use super::{Command, Task, TwinReply};
use crate::device::link::MAX_PACKET;
use crate::device::messages::{
    C2dDelivery, CloudToDeviceMessage, MethodRequest, MethodResponse, Responder,
};

impl Task {
    /// Handles every complete packet in the read buffer; `Err` ends the connection.
    pub(super) fn drain_input(&mut self, conn: &mut Conn) -> Result<(), String> {
        loop {
            match twinhub_mqtt::decode(&mut conn.inbuf, MAX_PACKET) {
                Ok(Some(packet)) => self.packet(conn, packet)?,
                Ok(None) => return Ok(()),
                Err(e) => return Err(format!("malformed packet from the hub: {e}")),
            }
        }
    }

    fn packet(&mut self, conn: &mut Conn, packet: Packet) -> Result<(), String> {
        match packet {
            Packet::Publish(p) => return self.publish(conn, p),
            Packet::PubAck(pkid) => self.puback(conn, pkid),
            Packet::SubAck(ack) => {
                if self.suback(ack).contains(&Feature::DesiredPatches) {
                    self.start_resync();
                }
            }
            Packet::UnsubAck(pkid) => {
                if self.unsuback(pkid)
                    && let Some(drain) = conn.drain.as_mut()
                {
                    drain.unsuback_at = Some(Instant::now());
                }
            }
            Packet::PingResp => conn.ping_sent = None,
            other => {
                return Err(format!(
                    "the hub sent {}, which a server never sends",
                    other.packet_type()
                ));
            }
        }
        Ok(())
    }

    /// Handles a PUBLISH from the hub; QoS 1 ones are acknowledged whatever they carry.
    fn publish(&mut self, conn: &mut Conn, p: Publish) -> Result<(), String> {
        if p.qos == QoS::AtLeastOnce
            && let Ok(Delivery::CloudToDevice { properties, .. }) =
                iot::parse_delivery_topic(p.topic.as_str())
        {
            self.c2d_message(conn, properties, &p);
            return Ok(());
        }
        match p.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => {
                let _ = conn.push(&Packet::PubAck(p.pkid));
            }
            QoS::ExactlyOnce => return Err("the hub sent a QoS 2 PUBLISH".into()),
        }
        match iot::parse_delivery_topic(p.topic.as_str()) {
            Ok(Delivery::MethodRequest { method_name, rid }) => {
                let (name, rid) = (method_name.into_owned(), rid.into_owned());
                self.method_request(conn, name, rid, &p.payload);
            }
            Ok(Delivery::TwinResponse {
                status,
                rid,
                version,
            }) => {
                let reply = TwinReply {
                    status,
                    version,
                    payload: p.payload.clone(),
                };
                self.twin_response(&rid, reply);
            }
            Ok(Delivery::DesiredPatch { version }) => self.desired_patch(version, &p.payload),
            Ok(other) => {
                tracing::debug!("ignoring a delivery this client did not ask for: {other:?}")
            }
            Err(e) => tracing::warn!("ignoring a PUBLISH on an unknown topic: {e}"),
        }
        Ok(())
    }

    /// A cloud-to-device message goes to the application's stream and is acknowledged when
    /// the application takes it; with no stream it is acknowledged (completed) at once.
    fn c2d_message(&mut self, conn: &mut Conn, bag: &str, p: &Publish) {
        let message = CloudToDeviceMessage::from_bag(bag, p.payload.clone(), p.dup);
        let stream = self.shared.dispatch().c2d.clone();
        let delivery = C2dDelivery {
            connection: self.connection,
            pkid: p.pkid,
            message,
        };
        let refused = match stream {
            Some(tx) => match tx.try_send(delivery) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(d) | mpsc::error::TrySendError::Closed(d)) => d,
            },
            None => delivery,
        };
        tracing::warn!(
            message_id = refused.message.message_id.as_deref().unwrap_or(""),
            "a cloud-to-device message arrived with no stream to take it; completed unread"
        );
        let _ = conn.push(&Packet::PubAck(p.pkid));
    }

    fn twin_response(&mut self, rid: &str, reply: TwinReply) {
        let Some(wait) = self.twins.remove(rid) else {
            // Late (the caller gave up) or a duplicate: nobody waits for it.
            return;
        };
        match wait.reply {
            Some(tx) => {
                let _ = tx.send(Ok(reply));
            }
            None if self.desired.resync.as_deref() == Some(rid) => self.resync_answer(reply),
            None => {}
        }
    }

    /// Answers method call `rid` from inside the task (no handler, unreadable request).
    fn answer(&mut self, rid: &str, status: i32, message: &str) {
        let payload = serde_json::json!({ "message": message });
        self.accept(Command::method_response(status, rid, &payload, None));
    }

    fn method_request(&mut self, conn: &mut Conn, name: String, rid: String, payload: &Bytes) {
        conn.methods_outstanding.insert(rid.clone());
        conn.last_method_at = Some(Instant::now());
        // An empty payload means "no payload", as in the official SDKs.
        let payload = if payload.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            match serde_json::from_slice(payload) {
                Ok(v) => v,
                Err(_) => return self.answer(&rid, 400, "the method payload is not JSON"),
            }
        };
        let (handler, stream) = {
            let d = self.shared.dispatch();
            (d.handler.clone(), d.methods.clone())
        };
        let answered = Arc::new(AtomicBool::new(false));
        let request = MethodRequest {
            name,
            payload,
            request_id: rid.clone(),
            responder: Responder {
                commands: self.responder.clone(),
                rid: rid.clone(),
                answered: answered.clone(),
                // The handler's return value is the answer; see below.
                answer_on_drop: handler.is_none(),
                timeout: self.settings.operation_timeout,
            },
        };
        if let Some(handler) = handler {
            let commands = self.responder.clone();
            tokio::spawn(async move {
                // The handler runs as a task of its own so that a panic becomes a 500.
                let response = match tokio::spawn(handler(request)).await {
                    Ok(response) => response,
                    Err(_) => MethodResponse::new(
                        500,
                        serde_json::json!({"message": "the device's method handler failed"}),
                    ),
                };
                // Unless the handler already answered through `respond`.
                if !answered.swap(true, Ordering::AcqRel) {
                    let command =
                        Command::method_response(response.status, &rid, &response.payload, None);
                    let _ = commands.send(command).await;
                }
            });
            return;
        }
        let Some(stream) = stream else {
            answered.store(true, Ordering::Release);
            return self.answer(&rid, 501, "the device has no handler for direct methods");
        };
        match stream.try_send(request) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(request)) => {
                // Answered here instead of by the dropped request's 500.
                request.responder.answered.store(true, Ordering::Release);
                self.answer(&rid, 503, "the device is busy with other method calls");
            }
            Err(mpsc::error::TrySendError::Closed(request)) => {
                request.responder.answered.store(true, Ordering::Release);
                self.shared.dispatch().methods = None;
                self.answer(&rid, 501, "the device has no handler for direct methods");
            }
        }
    }
}
