//! The campaign's devices: registered in bulk with one key the tool chooses (so it never
//! reads keys back), then connected with the SDK's `DeviceClient` over MQTT/TLS in waves.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::task::JoinSet;
use twinhub_proto::model::{
    AuthenticationMechanism, AuthenticationType, ExportImportDevice, ImportMode, SymmetricKey,
};
use twinhub_sdk::{DeviceClient, ServiceClient, Transport};

use crate::hub::HubProcess;

/// Every campaign device's primary and secondary key (base64 of 32 bytes); the SAS tokens
/// still differ per device because each signs its own resource URI.
pub const DEVICE_KEY: &str = "dHdpbmh1Yi1jaGFvcy1zaGFyZWQtZGV2aWNlLWtleSE=";
/// The registry's bulk call takes at most this many devices.
const BULK_CHUNK: usize = 100;
/// Bulk calls in flight while registering.
const BULK_CONCURRENCY: usize = 4;

/// The id of campaign device `i`; ids sort in creation order.
pub fn device_id(i: usize) -> String {
    format!("dev-{i:05}")
}

fn create_op(id: String) -> ExportImportDevice {
    ExportImportDevice {
        id,
        import_mode: ImportMode::Create,
        authentication: Some(AuthenticationMechanism {
            symmetric_key: Some(SymmetricKey {
                primary_key: Some(DEVICE_KEY.into()),
                secondary_key: Some(DEVICE_KEY.into()),
            }),
            x509_thumbprint: None,
            auth_type: AuthenticationType::Sas,
        }),
        ..Default::default()
    }
}

/// Registers devices `0..count` (`POST /devices`, 100 per call, a few calls at a time).
pub async fn register(service: &ServiceClient, count: usize) -> Result<()> {
    let mut chunks = (0..count).step_by(BULK_CHUNK);
    let mut calls = JoinSet::new();
    loop {
        while calls.len() < BULK_CONCURRENCY {
            let Some(first) = chunks.next() else { break };
            let ops: Vec<_> = (first..count.min(first + BULK_CHUNK))
                .map(|i| create_op(device_id(i)))
                .collect();
            let service = service.clone();
            calls.spawn(async move {
                let result = service.bulk(&ops).await?;
                if !result.is_successful {
                    let first = result
                        .errors
                        .first()
                        .map(|e| format!("{}: {} {}", e.device_id, e.error_code, e.error_status))
                        .unwrap_or_default();
                    bail!(
                        "registering {} devices failed for {} (first: {first})",
                        ops.len(),
                        result.errors.len()
                    );
                }
                anyhow::Ok(())
            });
        }
        let Some(done) = calls.join_next().await else {
            return Ok(());
        };
        done.context("a registration task panicked")??;
    }
}

/// How campaign devices connect.
#[derive(Debug, Clone)]
pub struct DeviceSettings {
    pub operation_timeout: Duration,
    pub connect_timeout: Duration,
    pub sas_token_ttl: Duration,
}

/// A `DeviceClient` for campaign device `id` on `hub`'s MQTT/TLS port (not yet connected).
pub fn client(hub: &HubProcess, id: &str, settings: &DeviceSettings) -> Result<DeviceClient> {
    let cs = format!("HostName=localhost;DeviceId={id};SharedAccessKey={DEVICE_KEY}");
    Ok(DeviceClient::builder(&cs)
        .extra_ca_pem(hub.ca_pem.clone())
        .transport(Transport::Mqtt)
        .port(hub.mqtt_port)
        .operation_timeout(settings.operation_timeout)
        .connect_timeout(settings.connect_timeout)
        .sas_token_ttl(settings.sas_token_ttl)
        .build()?)
}

/// Connects `devices` in waves of `wave`: each wave's connects run together and the next
/// starts when they are all done, so the hub never sees more than `wave` handshakes at
/// once. `prepare` runs on each client (with its index) before it connects, to set handlers
/// and streams; `on_wave` hears how many are connected after each wave.
pub async fn connect_in_waves(
    devices: &[DeviceClient],
    wave: usize,
    mut prepare: impl FnMut(usize, &DeviceClient),
    mut on_wave: impl FnMut(usize),
) -> Result<()> {
    let wave = wave.max(1);
    let mut connected = 0;
    for (w, chunk) in devices.chunks(wave).enumerate() {
        let mut set = JoinSet::new();
        for (j, device) in chunk.iter().enumerate() {
            prepare(w * wave + j, device);
            let device = device.clone();
            set.spawn(async move {
                device
                    .connect()
                    .await
                    .with_context(|| format!("connecting {}", device.device_id()))
            });
        }
        while let Some(done) = set.join_next().await {
            done.context("a connect task panicked")??;
            connected += 1;
        }
        on_wave(connected);
    }
    Ok(())
}

/// Closes every client, a few hundred at a time, each bounded by `limit`.
pub async fn close_all(devices: &[DeviceClient], limit: Duration) {
    for chunk in devices.chunks(256) {
        let mut set = JoinSet::new();
        for device in chunk {
            let device = device.clone();
            set.spawn(async move {
                let _ = tokio::time::timeout(limit, device.close()).await;
            });
        }
        while set.join_next().await.is_some() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_sort_in_creation_order_and_the_key_signs() {
        assert_eq!(device_id(7), "dev-00007");
        assert!(device_id(9) < device_id(10));
        assert!(
            twinhub_proto::sas::generate_sas_token(
                "localhost/devices/dev-00001",
                DEVICE_KEY,
                None,
                1
            )
            .is_ok()
        );
    }
}
