//! One live connection inside the task: the read half and its buffer, the write side with at
//! most one batch in flight (so reading never waits for a slow write), keep-alive timestamps,
//! and the per-connection part of a token renewal.

use std::collections::HashSet;
use std::future::Future;
use std::io;
use std::pin::Pin;

use bytes::BytesMut;
use tokio::time::Instant;
use twinhub_mqtt::Packet;

use crate::device::link::{Link, Reader, Writer};
use crate::error::{Error, Result};

type WriteFut = Pin<Box<dyn Future<Output = (Writer, io::Result<()>)> + Send>>;

/// A renewal in progress: methods unsubscribed, waiting for the connection to fall quiet.
pub(super) struct Drain {
    /// Disconnect at the latest then, quiet or not.
    pub deadline: Instant,
    /// When the hub confirmed it stopped routing methods here.
    pub unsuback_at: Option<Instant>,
}

/// The sending side: packets are encoded into `buf` and leave in batches, one at a time.
pub(super) struct Out {
    /// `None` while a write runs: the write owns it.
    writer: Option<Writer>,
    writing: Option<WriteFut>,
    buf: BytesMut,
    pub last_write: Instant,
}

impl Out {
    /// Encodes `packet` into the next batch.
    pub fn push(&mut self, packet: &Packet) -> Result<()> {
        twinhub_mqtt::encode(packet, &mut self.buf).map_err(|e| {
            Error::InvalidArgument(format!("cannot encode {}: {e}", packet.packet_type()))
        })
    }

    /// Starts writing what is buffered, unless a write is already running.
    pub fn start_write(&mut self) {
        if self.writing.is_some() || self.buf.is_empty() {
            return;
        }
        let Some(mut writer) = self.writer.take() else {
            return;
        };
        let data = self.buf.split().freeze();
        self.writing = Some(Box::pin(async move {
            let result = writer.write(data).await;
            (writer, result)
        }));
    }

    /// Completes when the running write does (never while none runs). Cancel-safe: an
    /// unfinished write stays in place for the next call.
    pub async fn written(&mut self) -> io::Result<()> {
        let Some(running) = self.writing.as_mut() else {
            return std::future::pending().await;
        };
        let (writer, result) = running.await;
        self.writing = None;
        self.writer = Some(writer);
        if result.is_ok() {
            self.last_write = Instant::now();
        }
        result
    }

    /// Completes the running write and the buffered rest, then closes the sending side.
    pub async fn finish(&mut self) -> io::Result<()> {
        if let Some(running) = self.writing.take() {
            let (writer, result) = running.await;
            self.writer = Some(writer);
            result?;
        }
        if let Some(writer) = self.writer.as_mut() {
            if !self.buf.is_empty() {
                writer.write(self.buf.split().freeze()).await?;
            }
            writer.close().await;
        }
        Ok(())
    }
}

pub(super) struct Conn {
    pub reader: Reader,
    pub inbuf: BytesMut,
    pub out: Out,
    pub last_read: Instant,
    pub ping_sent: Option<Instant>,
    /// `None` when the credential never needs renewing (a client certificate).
    pub renew_at: Option<Instant>,
    pub drain: Option<Drain>,
    /// Method calls received on this connection whose answer has no PUBACK yet.
    pub methods_outstanding: HashSet<String>,
    pub last_method_at: Option<Instant>,
}

impl Conn {
    pub fn new(link: Link) -> Conn {
        let now = Instant::now();
        Conn {
            reader: link.reader,
            inbuf: link.inbuf,
            out: Out {
                writer: Some(link.writer),
                writing: None,
                buf: BytesMut::with_capacity(4096),
                last_write: now,
            },
            last_read: now,
            ping_sent: None,
            renew_at: link.renew_at,
            drain: None,
            methods_outstanding: HashSet::new(),
            last_method_at: None,
        }
    }

    pub fn push(&mut self, packet: &Packet) -> Result<()> {
        self.out.push(packet)
    }
}
