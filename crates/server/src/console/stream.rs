//! `GET /twinhub/telemetry`: the built-in endpoint's messages as server-sent events, for the
//! console's live view (and `curl -N`). ServiceConnect, as reading the Event Hub-compatible
//! endpoint needs. One reader per partition (or only the device's partition), each pulled by
//! the response body: nothing is read ahead of a slow client, and when the client goes away
//! hyper drops the body and with it every reader and the stream's permit.
//!
//! Query: `deviceId`, `moduleId` (filters), `from` = `latest` (default) | `earliest` |
//! `enqueuedTime:<ms since the epoch or RFC 3339>` | a cursor `<partition>:<sequence>,...`
//! (resume after those events; partitions it does not name start at the latest). Each event's
//! SSE id is such a cursor, so `Last-Event-ID` resumes where a dropped stream ended. The stream
//! ends when the SAS token expires or the hub shuts down; the client reconnects with a fresh
//! token and the last id.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream, StreamExt};
use serde::{Deserialize, Serialize};
use twinhub_eventlog::{EventLog, Position, StoredEvent, partition_for};
use twinhub_proto::error::ErrorCode;
use twinhub_proto::message::Message;

use crate::rest::{ApiError, ApiResult, AppState, Authorized, ServiceConnect};

/// Events per read and their bytes: a batch the client drains before the next read.
const READ_EVENTS: usize = 64;
const READ_BYTES: usize = 1024 * 1024;
/// A comment line this often keeps proxies and the connection watchdog from closing a quiet
/// stream, and finds a client that left without closing.
const KEEPALIVE: Duration = Duration::from_secs(15);

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct StreamQuery {
    device_id: Option<String>,
    module_id: Option<String>,
    from: Option<String>,
}

enum Start {
    Latest,
    Earliest,
    Time(i64),
    Cursor(BTreeMap<u32, i64>),
}

fn bad(text: String) -> ApiError {
    ApiError::from(twinhub_core::Error::invalid(text))
}

fn parse_cursor(text: &str) -> Option<BTreeMap<u32, i64>> {
    let mut map = BTreeMap::new();
    for part in text.split(',').filter(|p| !p.trim().is_empty()) {
        let (p, s) = part.trim().split_once(':')?;
        map.insert(p.parse().ok()?, s.parse().ok()?);
    }
    (!map.is_empty()).then_some(map)
}

fn parse_from(text: &str) -> Result<Start, ApiError> {
    let text = text.trim();
    if text.is_empty() || text.eq_ignore_ascii_case("latest") || text.eq_ignore_ascii_case("now") {
        return Ok(Start::Latest);
    }
    if text.eq_ignore_ascii_case("earliest") {
        return Ok(Start::Earliest);
    }
    if let Some(time) = text.strip_prefix("enqueuedTime:") {
        if let Ok(ms) = time.parse::<i64>() {
            return Ok(Start::Time(ms));
        }
        return time
            .parse::<jiff::Timestamp>()
            .map(|t| Start::Time(t.as_millisecond()))
            .map_err(|e| bad(format!("from=enqueuedTime:{time} is not a time: {e}")));
    }
    parse_cursor(text).map(Start::Cursor).ok_or_else(|| {
        bad(format!(
            "from must be latest, earliest, enqueuedTime:<ms or RFC 3339> or partition:sequence pairs, not {:?}",
            twinhub_core::logsafe::Shown(text).to_string()
        ))
    })
}

/// One message as the console shows it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Shown<'a> {
    device_id: &'a str,
    module_id: Option<&'a str>,
    partition: u32,
    sequence_number: i64,
    offset: String,
    enqueued_time: String,
    source: &'a str,
    properties: BTreeMap<&'a str, Option<&'a str>>,
    system_properties: BTreeMap<&'static str, &'a str>,
    /// The body as text when it is UTF-8.
    body: Option<String>,
    /// The body in base64 when it is not.
    body_base64: Option<String>,
}

fn render(partition: u32, event: &StoredEvent, m: &Message) -> String {
    use base64::Engine as _;
    let text = std::str::from_utf8(&m.body).ok().map(str::to_owned);
    let shown = Shown {
        device_id: &m.stamp.device_id,
        module_id: m.stamp.module_id.as_deref(),
        partition,
        sequence_number: event.sequence,
        offset: event.offset.to_string(),
        enqueued_time: jiff::Timestamp::from_millisecond(event.enqueued_ms)
            .map(|t| t.to_string())
            .unwrap_or_default(),
        source: &m.stamp.source,
        properties: m
            .application
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_deref()))
            .collect(),
        system_properties: m.system.fields().collect(),
        body_base64: text
            .is_none()
            .then(|| base64::engine::general_purpose::STANDARD.encode(&m.body)),
        body: text,
    };
    serde_json::to_string(&shown).unwrap_or_default()
}

struct Reader {
    log: Arc<dyn EventLog>,
    partition: u32,
    next: i64,
    batch: std::collections::VecDeque<StoredEvent>,
}

/// A partition's events from `next` on, reading a batch when the last is drained and waiting
/// on the log (never polling) when there is nothing new. Ends when the log closes or fails.
fn partition_events(reader: Reader) -> impl Stream<Item = (u32, StoredEvent)> + Send {
    stream::unfold(reader, |mut r| async move {
        loop {
            if let Some(event) = r.batch.pop_front() {
                return Some(((r.partition, event), r));
            }
            match r
                .log
                .read(r.partition, r.next, READ_EVENTS, READ_BYTES)
                .await
            {
                Ok(events) if !events.is_empty() => {
                    r.next = events.last().map_or(r.next, |e| e.sequence + 1);
                    r.batch.extend(events);
                }
                Ok(_) => {
                    if r.log.wait_for(r.partition, r.next).await.is_err() {
                        return None;
                    }
                }
                Err(e) => {
                    tracing::debug!(partition = r.partition, "telemetry stream ends: {e}");
                    return None;
                }
            }
        }
    })
}

/// Counts the stream as open while it lives; dropping the body drops it.
struct Open {
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Open {
    fn new(permit: tokio::sync::OwnedSemaphorePermit) -> Open {
        metrics::gauge!("twinhub_console_streams").increment(1.0);
        Open { _permit: permit }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        metrics::gauge!("twinhub_console_streams").decrement(1.0);
    }
}

pub(super) async fn telemetry(
    State(s): State<AppState>,
    _: Authorized<ServiceConnect>,
    headers: HeaderMap,
    Query(q): Query<StreamQuery>,
) -> ApiResult<Response> {
    let token_expiry = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|h| twinhub_proto::sas::SasToken::parse(h).ok())
        .map(|t| t.expiry)
        .unwrap_or(0);
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_cursor);
    let from = match resume {
        Some(cursor) => Start::Cursor(cursor),
        None => parse_from(q.from.as_deref().unwrap_or("latest"))?,
    };
    let device = q.device_id.filter(|d| !d.is_empty());
    let module = q.module_id.filter(|m| !m.is_empty());
    if module.is_some() && device.is_none() {
        return Err(bad("moduleId needs deviceId".to_owned()));
    }
    let Ok(permit) = s.console.streams.clone().try_acquire_owned() else {
        return Err(ApiError::from(twinhub_core::Error::new(
            ErrorCode::ThrottlingException,
            format!(
                "{} telemetry streams are open, the most the hub serves at once; close one and retry",
                super::MAX_STREAMS
            ),
        )));
    };
    let open = Open::new(permit);

    let log = s.hub.events().log().clone();
    let count = log.partition_count();
    let partitions: Vec<u32> = match &device {
        Some(d) => vec![partition_for(d, count)],
        None => (0..count).collect(),
    };
    let mut cursor = BTreeMap::new();
    let mut readers = Vec::with_capacity(partitions.len());
    for p in partitions {
        let position = match &from {
            Start::Latest => Position::Latest,
            Start::Earliest => Position::Earliest,
            Start::Time(ms) => Position::EnqueuedTime {
                ms: *ms,
                inclusive: false,
            },
            Start::Cursor(map) => match map.get(&p) {
                Some(seq) => Position::Sequence {
                    sequence: *seq,
                    inclusive: false,
                },
                None => Position::Latest,
            },
        };
        let next = log
            .resolve(p, &position)
            .map_err(|e| ApiError::from(twinhub_core::telemetry::log_error(e)))?;
        cursor.insert(p, next - 1);
        readers.push(partition_events(Reader {
            log: log.clone(),
            partition: p,
            next,
            batch: Default::default(),
        }));
    }

    let events = stream::select_all(readers.into_iter().map(StreamExt::boxed)).filter_map(
        move |(partition, event)| {
            cursor.insert(partition, event.sequence);
            let shown = match Message::decode(&event.data) {
                Ok(m) => {
                    let wanted = device.as_deref().is_none_or(|d| m.stamp.device_id == d)
                        && module
                            .as_deref()
                            .is_none_or(|want| m.stamp.module_id.as_deref() == Some(want));
                    wanted.then(|| render(partition, &event, &m))
                }
                Err(e) => {
                    tracing::debug!(
                        partition,
                        sequence = event.sequence,
                        "undecodable event: {e}"
                    );
                    None
                }
            };
            let id = cursor
                .iter()
                .map(|(p, s)| format!("{p}:{s}"))
                .collect::<Vec<_>>()
                .join(",");
            std::future::ready(
                shown.map(|data| Ok::<_, Infallible>(Event::default().id(id).data(data))),
            )
        },
    );

    // Ends at the token's expiry (the client renews it and resumes) or the hub's shutdown.
    let expires_in =
        Duration::from_secs(token_expiry.saturating_sub(twinhub_core::keys::now_unix()));
    let shutdown = s.sessions.shutdown.clone();
    let end = async move {
        tokio::select! {
            _ = tokio::time::sleep(expires_in) => {}
            _ = shutdown.cancelled() => {}
        }
    };
    let events = events.take_until(end).map(move |item| {
        // The stream owns its permit: dropped with the body.
        let _ = &open;
        item
    });
    let mut resp = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(KEEPALIVE))
        .into_response();
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-cache"),
    );
    resp.headers_mut().insert(
        "x-accel-buffering",
        axum::http::HeaderValue::from_static("no"),
    );
    Ok(resp)
}
