//! The Event Hub-compatible endpoint: AMQP 1.0 over TLS (`--amqp-port`, 5671), over
//! WebSockets on the HTTPS port (`AMQPWSB10`), and in plaintext on loopback when asked
//! (`--amqp-plain-port`). fe2o3-amqp's acceptor runs the protocol state machines; this module
//! chooses SASL or not from the client's first header, offers the mechanisms the Azure clients
//! use, and hands each link to `links` (CBS, `$management`, partition receivers, redirects,
//! and the cloud-to-device links of `c2d`); `entity` says which log an Event Hub name reads
//! (the built-in endpoint, or a custom stream endpoint of the routing configuration).
//! What addresses, filters and replies mean is decided in `twinhub_eventhub`.

mod c2d;
mod entity;
mod links;
pub mod owners;
mod pad;

use std::sync::{Arc, Mutex};

use std::time::Duration;

use fe2o3_amqp::acceptor::{
    ConnectionAcceptor, SaslAcceptor, SessionAcceptor, sasl_acceptor::SaslServerFrame,
};
use fe2o3_amqp_types::primitives::{Array, Symbol};
use fe2o3_amqp_types::sasl::{SaslCode, SaslInit, SaslOutcome, SaslResponse};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use twinhub_core::Hub;
use twinhub_core::auth::{AmqpGrant, Right};
use twinhub_core::keys;
use twinhub_core::logsafe::Shown;

pub use owners::Owners;

/// How long a client has to send its protocol header and open the connection.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection may stay without a valid token (CBS or SASL PLAIN).
const AUTH_TIMEOUT: Duration = Duration::from_secs(60);
/// The largest frame we accept. Clients send small frames (tokens, requests); it also fits
/// the WebSocket frame limit.
const MAX_FRAME: u32 = 64 * 1024;

/// What every AMQP connection needs from the process.
#[derive(Clone)]
pub struct AmqpContext {
    pub hub: Arc<Hub>,
    /// The Event Hub-compatible name of the built-in endpoint.
    pub entity: String,
    /// Where redirects point: the hub's host name and its AMQP/TLS port.
    pub redirect_host: String,
    pub redirect_port: u16,
    pub owners: Arc<Owners>,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
}

/// What a connection has proved: the grants of every token it presented.
#[derive(Default)]
pub(crate) struct Grants {
    grants: Mutex<Vec<AmqpGrant>>,
    /// Fired at the first grant (the connection is then no longer unauthenticated).
    first: tokio::sync::Notify,
}

impl Grants {
    pub(crate) fn add(&self, grant: AmqpGrant) {
        let mut grants = self.grants.lock().unwrap_or_else(|e| e.into_inner());
        let now = keys::now_unix();
        grants.retain(|g| g.expiry > now);
        grants.push(grant);
        self.first.notify_one();
    }

    pub(crate) fn allows(&self, right: Right) -> bool {
        let now = keys::now_unix();
        let grants = self.grants.lock().unwrap_or_else(|e| e.into_inner());
        grants.iter().any(|g| g.allows(right, now))
    }
}

/// SASL as the Azure clients expect it: MSSBCBS and ANONYMOUS succeed at once (the token
/// comes later, through CBS); PLAIN is checked here. Never a challenge (pyamqp cannot take
/// one).
#[derive(Clone)]
struct HubSasl {
    hub: Arc<Hub>,
    grants: Arc<Grants>,
    peer: Arc<str>,
}

impl SaslAcceptor for HubSasl {
    fn mechanisms(&self) -> Array<Symbol> {
        Array::from(vec![
            Symbol::from("MSSBCBS"),
            Symbol::from("ANONYMOUS"),
            Symbol::from("PLAIN"),
        ])
    }

    fn on_init(&mut self, init: SaslInit) -> SaslServerFrame {
        let code = match init.mechanism.0.as_str() {
            "MSSBCBS" | "ANONYMOUS" => SaslCode::Ok,
            "PLAIN" => {
                let response = init
                    .initial_response
                    .map(|b| b.into_vec())
                    .unwrap_or_default();
                // authzid \0 authcid \0 password
                let mut parts = response.split(|&b| b == 0);
                let (_, user, password) = (parts.next(), parts.next(), parts.next());
                let user = user.map(String::from_utf8_lossy).unwrap_or_default();
                let password = password.map(String::from_utf8_lossy).unwrap_or_default();
                match self
                    .hub
                    .authorizer()
                    .authorize_amqp_plain(&user, &password, keys::now_unix())
                {
                    Ok(grant) => {
                        self.grants.add(grant);
                        SaslCode::Ok
                    }
                    Err(e) => {
                        tracing::info!(peer = %self.peer, user = %Shown(&user), "AMQP SASL PLAIN refused: {}", e.message());
                        SaslCode::Auth
                    }
                }
            }
            other => {
                tracing::info!(peer = %self.peer, mechanism = %Shown(other), "AMQP SASL mechanism not offered");
                SaslCode::Auth
            }
        };
        SaslServerFrame::Outcome(SaslOutcome {
            code,
            additional_data: None,
        })
    }

    fn on_response(&mut self, _response: SaslResponse) -> SaslServerFrame {
        SaslServerFrame::Outcome(SaslOutcome {
            code: SaslCode::Auth,
            additional_data: None,
        })
    }
}

/// Serves one AMQP connection over `io` (TLS, WebSocket bridge or plaintext). `admission`
/// (the peer's place among unauthenticated connections) is given back once a token is
/// accepted.
pub async fn serve_connection<Io>(
    ctx: AmqpContext,
    mut io: Io,
    peer: String,
    admission: Option<OwnedSemaphorePermit>,
) where
    Io: AsyncRead + AsyncWrite + std::fmt::Debug + Send + Unpin + 'static,
{
    let mut header = [0u8; 8];
    match tokio::time::timeout(OPEN_TIMEOUT, io.read_exact(&mut header)).await {
        Ok(Ok(_)) => {}
        _ => {
            tracing::debug!(%peer, "AMQP client sent no protocol header");
            return;
        }
    }
    if &header[..4] != b"AMQP" {
        tracing::debug!(%peer, "not an AMQP protocol header");
        return;
    }
    let sasl = header[4] == 3;
    let io = pad::Padded::with_head(io, &header);
    let grants = Arc::new(Grants::default());
    let builder = ConnectionAcceptor::builder()
        .container_id(format!("twinhub-{}", ctx.entity))
        .max_frame_size(MAX_FRAME)
        .channel_max(255u16);
    let opened = if sasl {
        let acceptor = builder
            .sasl_acceptor(HubSasl {
                hub: ctx.hub.clone(),
                grants: grants.clone(),
                peer: Arc::from(peer.as_str()),
            })
            .build();
        tokio::time::timeout(OPEN_TIMEOUT, acceptor.accept(io)).await
    } else {
        // Clients that skip SASL (rhea in the Node service SDK) authorize through CBS.
        let acceptor = builder.build();
        tokio::time::timeout(OPEN_TIMEOUT, acceptor.accept(io)).await
    };
    let mut connection = match opened {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::debug!(%peer, "AMQP open failed: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "AMQP open timed out");
            return;
        }
    };
    metrics::counter!("twinhub_amqp_connections_total").increment(1);
    let connection_done = CancellationToken::new();
    let sessions = TaskTracker::new();
    let mut admission = admission;
    let auth_deadline = tokio::time::sleep(AUTH_TIMEOUT);
    tokio::pin!(auth_deadline);
    let mut authenticated = grants.allows(Right::ServiceConnect);
    if authenticated {
        admission.take();
    }
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            _ = grants.first.notified(), if !authenticated => {
                authenticated = true;
                admission.take();
            }
            _ = &mut auth_deadline, if !authenticated => {
                tracing::info!(%peer, "AMQP connection closed: no valid token within {AUTH_TIMEOUT:?}");
                break;
            }
            incoming = connection.next_incoming_session() => {
                let Some(incoming) = incoming else { break };
                let session = match SessionAcceptor::new()
                    .accept_incoming_session(incoming, &mut connection)
                    .await
                {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::debug!(%peer, "AMQP begin failed: {e}");
                        break;
                    }
                };
                sessions.spawn(links::serve_session(
                    ctx.clone(),
                    session,
                    grants.clone(),
                    connection_done.clone(),
                    peer.clone(),
                ));
            }
        }
    }
    connection_done.cancel();
    sessions.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), sessions.wait()).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), connection.close()).await;
    tracing::debug!(%peer, "AMQP connection ended");
}
