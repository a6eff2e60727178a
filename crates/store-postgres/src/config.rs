//! From a connection URL and [`PostgresOptions`] to a tokio-postgres `Config` and a TLS
//! connector: the libpq TLS parameters tokio-postgres does not know, timeouts, and the session
//! settings the store relies on.
//!
//! tokio-postgres understands `sslmode=disable|prefer|require` only, never checks certificates
//! itself, and rejects parameters it does not know, such as `sslrootcert`. So the URL's
//! `sslmode` and `sslrootcert` are taken out here and decide the connector:
//!
//! * `sslmode` absent, `disable`, `allow` or `prefer`: plaintext. We do not do opportunistic,
//!   unverified TLS: a store that holds every device key either verifies its server or is told
//!   plainly that it does not.
//! * `require`, `verify-ca`, `verify-full`: TLS through rustls (ring), which always verifies
//!   the chain and the host name, so all three mean libpq's `verify-full` (stricter than
//!   libpq's `require`). The roots: the PEM file named by `sslrootcert=` (percent-encoded in
//!   the URL if need be), else [`PostgresOptions::ca_file`], else the system's roots (also
//!   with `sslrootcert=system`, as libpq 16 spells it).
//!
//! Only the URL form (`postgres://` or `postgresql://`) is rewritten; a `key=value` string goes
//! to tokio-postgres as it is (its `sslmode=require` then uses TLS with the CA option or the
//! system roots).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::{ConnectError, PostgresOptions};

/// Until the kernel gives up on data the server does not acknowledge, unless the URL says.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(10);

/// What [`parse`] makes of a URL: the connection settings and, when TLS is asked for, the
/// connector to use.
pub(crate) struct Target {
    pub(crate) pg: tokio_postgres::Config,
    pub(crate) tls: Option<MakeRustlsConnect>,
}

/// Where the CA to verify the server with comes from.
enum Roots {
    File(PathBuf),
    System,
}

pub(crate) fn parse(url: &str, options: &PostgresOptions) -> Result<Target, ConnectError> {
    let (rest, ssl_mode, root_cert) = take_tls_params(url)?;
    let mut pg: tokio_postgres::Config = rest
        .parse()
        .map_err(|e| ConnectError::Config(crate::error::describe(&e)))?;

    let wants_tls = match ssl_mode.as_deref() {
        Some("require" | "verify-ca" | "verify-full") => true,
        Some("disable" | "allow" | "prefer") => false,
        Some(other) => {
            return Err(ConnectError::Config(format!(
                "sslmode={other} is not one of disable, allow, prefer, require, verify-ca, verify-full"
            )));
        }
        // Not in the URL: a key=value string's own sslmode, if it asked for TLS.
        None => pg.get_ssl_mode() == SslMode::Require && !url_form(url),
    };
    let tls = if wants_tls {
        pg.ssl_mode(SslMode::Require);
        let roots = match root_cert {
            Some(path) if path == "system" => Roots::System,
            Some(path) => Roots::File(PathBuf::from(path)),
            None => match &options.ca_file {
                Some(path) => Roots::File(path.clone()),
                None => Roots::System,
            },
        };
        Some(connector(roots)?)
    } else {
        pg.ssl_mode(SslMode::Disable);
        None
    };

    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(options.connect_timeout);
    }
    if pg.get_tcp_user_timeout().is_none() {
        pg.tcp_user_timeout(TCP_USER_TIMEOUT);
    }
    pg.keepalives(true);
    if pg.get_application_name().is_none() {
        pg.application_name("twinhub");
    }
    pg.options(session_options(pg.get_options(), options.statement_timeout));
    Ok(Target { pg, tls })
}

fn url_form(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// The server-side settings every session gets (startup options, so they cost no round trip):
/// a statement timeout, so nothing waits forever on a stuck server; an idle-in-transaction
/// timeout, so a node that died mid-transaction does not hold row locks; and
/// `synchronous_commit = on`, so a commit is durable when it returns. An operator's own
/// `synchronous_commit` in the URL's `options` (say `remote_apply`) is kept.
fn session_options(existing: Option<&str>, statement_timeout: Duration) -> String {
    let ms = statement_timeout.as_millis().max(1);
    let mut options = existing.unwrap_or_default().to_string();
    let mut add = |setting: String| {
        if !options.is_empty() {
            options.push(' ');
        }
        options.push_str(&setting);
    };
    add(format!("-c statement_timeout={ms}"));
    add(format!(
        "-c idle_in_transaction_session_timeout={}",
        ms.saturating_mul(2)
    ));
    if !existing.is_some_and(|o| o.contains("synchronous_commit")) {
        add("-c synchronous_commit=on".to_string());
    }
    options
}

/// Splits `sslmode` and `sslrootcert` out of a URL's query string; other forms pass through.
fn take_tls_params(url: &str) -> Result<(String, Option<String>, Option<String>), ConnectError> {
    if !url_form(url) {
        return Ok((url.to_string(), None, None));
    }
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), None, None));
    };
    let mut kept = Vec::new();
    let (mut ssl_mode, mut root_cert) = (None, None);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "sslmode" => ssl_mode = Some(percent_decode(value)?),
            "sslrootcert" => root_cert = Some(percent_decode(value)?),
            _ => kept.push(pair),
        }
    }
    let rest = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((rest, ssl_mode, root_cert))
}

fn percent_decode(value: &str) -> Result<String, ConnectError> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| {
                        ConnectError::Config(format!("bad percent-encoding in {value:?}"))
                    })?;
                out.push(hex);
                i += 3;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out)
        .map_err(|_| ConnectError::Config(format!("{value:?} does not decode to UTF-8")))
}

/// A rustls connector (ring provider, chain and host name verified) trusting `roots`.
fn connector(roots: Roots) -> Result<MakeRustlsConnect, ConnectError> {
    let mut store = RootCertStore::empty();
    match roots {
        Roots::File(path) => {
            let certs = read_pem_certs(&path)?;
            let (added, _ignored) = store.add_parsable_certificates(certs);
            if added == 0 {
                return Err(ConnectError::Tls(format!(
                    "{} holds no usable CA certificate",
                    path.display()
                )));
            }
        }
        Roots::System => {
            let found = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(found.certs);
            if store.is_empty() {
                return Err(ConnectError::Tls(
                    "TLS was asked for without sslrootcert= or a CA file, and the system has \
                     no CA certificates"
                        .into(),
                ));
            }
        }
    }
    // The ring provider explicitly, rather than a process default someone may not have set.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConnectError::Tls(format!("TLS versions: {e}")))?
        .with_root_certificates(store)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

fn read_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, ConnectError> {
    let shown = path.display();
    CertificateDer::pem_file_iter(path)
        .map_err(|e| ConnectError::Tls(format!("reading CA file {shown}: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ConnectError::Tls(format!("parsing CA file {shown}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_are_taken_out_of_the_url() {
        let (rest, mode, root) = take_tls_params(
            "postgres://u@db.example:5432/hub?sslmode=verify-full&application_name=x&sslrootcert=%2Fetc%2Fca.pem",
        )
        .unwrap();
        assert_eq!(rest, "postgres://u@db.example:5432/hub?application_name=x");
        assert_eq!(mode.as_deref(), Some("verify-full"));
        assert_eq!(root.as_deref(), Some("/etc/ca.pem"));

        let (rest, mode, root) = take_tls_params("postgres://u@h/db?sslmode=disable").unwrap();
        assert_eq!(rest, "postgres://u@h/db");
        assert_eq!(mode.as_deref(), Some("disable"));
        assert_eq!(root, None);

        let kv = "host=h user=u sslmode=require";
        assert_eq!(take_tls_params(kv).unwrap().0, kv);
    }

    #[test]
    fn plaintext_by_default_and_session_settings_added() {
        let target = parse("postgres://u@127.0.0.1:5/db", &PostgresOptions::default()).unwrap();
        assert!(target.tls.is_none());
        assert_eq!(target.pg.get_ssl_mode(), SslMode::Disable);
        let options = target.pg.get_options().unwrap();
        assert!(options.contains("statement_timeout=15000"), "{options}");
        assert!(options.contains("synchronous_commit=on"), "{options}");
        assert_eq!(
            target.pg.get_connect_timeout(),
            Some(&Duration::from_secs(5))
        );
    }

    #[test]
    fn an_operators_synchronous_commit_is_kept() {
        let url = "postgres://u@h/db?options=-c%20synchronous_commit%3Dremote_apply";
        let target = parse(url, &PostgresOptions::default()).unwrap();
        let options = target.pg.get_options().unwrap();
        assert!(options.contains("remote_apply"), "{options}");
        assert!(!options.contains("synchronous_commit=on"), "{options}");
    }

    #[test]
    fn bad_settings_are_refused() {
        let options = PostgresOptions::default();
        assert!(matches!(
            parse("postgres://h/db?sslmode=sometimes", &options),
            Err(ConnectError::Config(_))
        ));
        assert!(matches!(
            parse(
                "postgres://h/db?sslmode=require&sslrootcert=/nonexistent/ca.pem",
                &options
            ),
            Err(ConnectError::Tls(_))
        ));
    }
}
