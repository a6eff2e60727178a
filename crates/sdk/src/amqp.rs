//! The AMQP connection the SDK's service-side clients open: TCP to the hub, TLS, SASL, one
//! session. `events` signs in with SASL PLAIN; `c2d` with ANONYMOUS and then a CBS token.

use std::sync::Arc;

use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::{Connection, Session};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::error::{Error, Result};

/// Connects to `host:port` and begins a session. No deadline of its own: callers bound it
/// together with what follows (a CBS sign-in, a link).
pub(crate) async fn connect(
    host: &str,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
    sasl: SaslProfile,
) -> Result<(ConnectionHandle<()>, SessionHandle<()>)> {
    let tcp = TcpStream::connect((host, port))
        .await
        .map_err(|e| Error::Unreachable(format!("{host}:{port}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let server_name = crate::device::settings::server_name(host)?;
    let stream = TlsConnector::from(tls)
        .connect(server_name, tcp)
        .await
        .map_err(|e| Error::Unreachable(format!("TLS with {host}: {e}")))?;
    let suffix = crate::device::backoff::random_u64();
    let mut connection = Connection::builder()
        .container_id(format!("twinhub-sdk-{suffix:016x}"))
        .hostname(host)
        .scheme("amqp")
        .sasl_profile(sasl)
        .open_with_stream(stream)
        .await
        .map_err(|e| match e {
            fe2o3_amqp::connection::OpenError::SaslError { .. } => {
                Error::NotAuthorized(format!("the hub refused the sign-in: {e}"))
            }
            e => Error::Unreachable(format!("AMQP open: {e}")),
        })?;
    let session = Session::begin(&mut connection)
        .await
        .map_err(|e| Error::Unreachable(format!("AMQP begin: {e}")))?;
    Ok((connection, session))
}
