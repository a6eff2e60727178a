//! Direct methods: validate a call, find the device's session (waiting up to the connect
//! timeout for it to connect and subscribe), hand it the request, and wait up to the response
//! timeout for the device's answer.

use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::time::Instant;
use twinhub_proto::error::ErrorCode;
use twinhub_proto::model::CloudToDeviceMethod;

use crate::directory::{MethodFailure, MethodResponse, SessionCommand, SessionHandle, subs};
use crate::error::{Error, Result};
use crate::hub::Hub;

/// IoT Hub's cap on a method request or response payload.
pub const MAX_METHOD_PAYLOAD: usize = 128 * 1024;
pub const DEFAULT_RESPONSE_TIMEOUT: u64 = 30;
pub const MIN_RESPONSE_TIMEOUT: u64 = 5;
pub const MAX_RESPONSE_TIMEOUT: u64 = 300;
pub const MAX_CONNECT_TIMEOUT: u64 = 300;

/// A validated direct-method call.
#[derive(Debug, Clone)]
pub struct MethodCall {
    pub method_name: String,
    /// The request payload as JSON text.
    pub payload: Bytes,
    pub response_timeout: Duration,
    pub connect_timeout: Duration,
}

impl MethodCall {
    /// Validates a `CloudToDeviceMethod` body: name, payload size, both timeouts.
    pub fn from_request(req: &CloudToDeviceMethod) -> Result<MethodCall> {
        let name = req.method_name.as_str();
        if name.is_empty() || name.len() > 1024 {
            return Err(Error::invalid("methodName must be 1 to 1024 characters"));
        }
        twinhub_proto::ids::validate_method_name(name)
            .map_err(|e| Error::invalid(format!("Invalid methodName: {e}")))?;
        let payload = serde_json::to_vec(req.payload.as_ref().unwrap_or(&Value::Null))
            .map_err(|_| Error::invalid("payload is not serializable JSON"))?;
        if payload.len() > MAX_METHOD_PAYLOAD {
            return Err(Error::invalid(format!(
                "The method payload is {} bytes, over the limit of {MAX_METHOD_PAYLOAD}",
                payload.len()
            )));
        }
        let response = req
            .response_timeout_in_seconds
            .unwrap_or(DEFAULT_RESPONSE_TIMEOUT as i64);
        if !(MIN_RESPONSE_TIMEOUT as i64..=MAX_RESPONSE_TIMEOUT as i64).contains(&response) {
            return Err(Error::invalid(format!(
                "responseTimeoutInSeconds must be between {MIN_RESPONSE_TIMEOUT} and {MAX_RESPONSE_TIMEOUT}"
            )));
        }
        let connect = req.connect_timeout_in_seconds.unwrap_or(0);
        if !(0..=MAX_CONNECT_TIMEOUT as i64).contains(&connect) {
            return Err(Error::invalid(format!(
                "connectTimeoutInSeconds must be between 0 and {MAX_CONNECT_TIMEOUT}"
            )));
        }
        Ok(MethodCall {
            method_name: name.to_string(),
            payload: Bytes::from(payload),
            response_timeout: Duration::from_secs(response as u64),
            connect_timeout: Duration::from_secs(connect as u64),
        })
    }
}

pub(crate) fn not_online(key: &str) -> Error {
    let who = match crate::record::split_identity(key) {
        (device, Some(module)) => format!("module '{module}' of device '{device}'"),
        (device, None) => format!("device '{device}'"),
    };
    Error::new(
        ErrorCode::DeviceNotOnline,
        format!(
            "The operation failed because the requested {who} isn't online or hasn't registered the direct method callback."
        ),
    )
}

impl Hub {
    /// Invokes a direct method on a device and returns its answer. In a cluster, a session
    /// held by another node is reached through it.
    pub async fn invoke_method(&self, device_id: &str, call: MethodCall) -> Result<MethodResponse> {
        // The common case is a listening device: no store read on that path. Only when it is
        // not listening does the registry tell "unknown device" from "not online".
        if let Some(handle) = self.listening(device_id) {
            return self.invoke_on(device_id, handle, call).await;
        }
        // In a cluster the index knows which node holds the session: straight there, with no
        // store read. It may be a moment behind (the device just moved): then the store says.
        if let Some(node) = self.twin_index.node_of(device_id)
            && let Some(remote) = self.remote_node(Some(&node))
        {
            match self
                .invoke_remote(remote, device_id, &call, Duration::ZERO)
                .await
            {
                Err(e) if e.code() == ErrorCode::DeviceNotOnline => {}
                done => return done,
            }
        }
        // DeviceNotFound for a device, ModuleNotFound for a `deviceId/moduleId` key.
        let rec = self.load_existing(device_id).await?;
        let Some(poll) = self.presence_poll() else {
            let handle = self
                .wait_for_method_listener(device_id, call.connect_timeout)
                .await?;
            return self.invoke_on(device_id, handle, call).await;
        };
        let deadline = Instant::now() + call.connect_timeout;
        let mut node = rec.node;
        loop {
            if let Some(remote) = self.remote_node(node.as_deref()) {
                let left = deadline.saturating_duration_since(Instant::now());
                return self.invoke_remote(remote, device_id, &call, left).await;
            }
            // Here, or nowhere yet: wait on this node's directory, and look in the store for
            // a session another node took meanwhile.
            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .wait_for_method_listener(device_id, left.min(poll))
                .await
            {
                Ok(handle) => return self.invoke_on(device_id, handle, call).await,
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => node = self.load_existing(device_id).await?.node,
            }
        }
    }

    /// Invokes a method on a session of this node only (a call another node forwarded).
    pub(crate) async fn invoke_local(
        &self,
        device_id: &str,
        call: MethodCall,
    ) -> Result<MethodResponse> {
        let handle = match self.listening(device_id) {
            Some(h) => h,
            None => {
                self.load_existing(device_id).await?;
                self.wait_for_method_listener(device_id, call.connect_timeout)
                    .await?
            }
        };
        self.invoke_on(device_id, handle, call).await
    }

    fn listening(&self, device_id: &str) -> Option<SessionHandle> {
        self.directory
            .get(device_id)
            .filter(|h| h.is_subscribed(subs::METHODS))
    }

    async fn invoke_on(
        &self,
        device_id: &str,
        handle: SessionHandle,
        call: MethodCall,
    ) -> Result<MethodResponse> {
        let (reply, answer) = oneshot::channel();
        let command = SessionCommand::InvokeMethod {
            method_name: call.method_name,
            payload: call.payload,
            reply,
        };
        if let Err(e) = handle.commands.try_send(command) {
            return Err(match e {
                tokio::sync::mpsc::error::TrySendError::Full(_) => Error::new(
                    ErrorCode::ThrottlingException,
                    format!("Too many requests are queued for device '{device_id}'"),
                ),
                tokio::sync::mpsc::error::TrySendError::Closed(_) => not_online(device_id),
            });
        }
        let timed_out = || {
            Error::new(
                ErrorCode::GatewayTimeout,
                format!("Timed out waiting for the response from device '{device_id}'."),
            )
        };
        match tokio::time::timeout(call.response_timeout, answer).await {
            Ok(Ok(Ok(response))) => Ok(response),
            Ok(Ok(Err(MethodFailure::BadResponse(why)))) => Err(Error::invalid(format!(
                "The device's response was rejected: {why}"
            ))),
            // The session ended before the device answered: the answer can no longer come.
            Ok(Err(_)) => Err(timed_out()),
            Err(_) => Err(timed_out()),
        }
    }

    async fn wait_for_method_listener(
        &self,
        device_id: &str,
        connect_timeout: Duration,
    ) -> Result<SessionHandle> {
        let deadline = Instant::now() + connect_timeout;
        let watch = self.directory.watch(device_id);
        loop {
            // Registered before the check so a change between check and wait is not missed.
            let changed = watch.changed();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(h) = self.directory.get(device_id)
                && h.is_subscribed(subs::METHODS)
            {
                return Ok(h);
            }
            if Instant::now() >= deadline {
                return Err(not_online(device_id));
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Err(not_online(device_id));
            }
        }
    }
}
