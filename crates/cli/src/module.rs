//! `twinhub module ...` (module identities under a device), the module twin behind
//! `twinhub twin show|update --module`, and `twinhub method invoke` for a device or one of its
//! modules. Output follows the device commands: JSON on stdout, confirmations on stderr.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Subcommand, ValueEnum};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde_json::Value;
use twinhub_sdk::proto::connection_string::ConnectionString;
use twinhub_sdk::proto::model::{
    AuthenticationMechanism, AuthenticationType, CloudToDeviceMethod, Module, X509Thumbprint,
};
use twinhub_sdk::{NewModule, ServiceClient};

use crate::{Target, client, print_json};

#[derive(Subcommand)]
pub enum ModuleCommand {
    /// Register a module on a device, with generated SAS keys unless given, or an X.509 one
    /// (--auth selfSigned|ca)
    Create {
        device: String,
        module: String,
        /// Who manages the module (IoT Edge sets IotEdge)
        #[arg(long)]
        managed_by: Option<String>,
        /// The primary key (base64) instead of a generated one
        #[arg(long, conflicts_with = "cert")]
        primary_key: Option<String>,
        /// The secondary key (base64) instead of a generated one
        #[arg(long, conflicts_with = "cert")]
        secondary_key: Option<String>,
        /// How it signs in: SAS keys, a certificate by thumbprint, or one from a verified CA
        /// (CN deviceId/moduleId)
        #[arg(long, default_value = "sas", value_parser = ["sas", "selfSigned", "ca"])]
        auth: String,
        /// With --auth selfSigned: the certificate (PEM) whose thumbprint to register
        #[arg(long)]
        cert: Option<PathBuf>,
        /// With --auth selfSigned: a second certificate (the secondary thumbprint)
        #[arg(long, requires = "cert")]
        secondary_cert: Option<PathBuf>,
    },
    /// Show a module identity as JSON
    Show { device: String, module: String },
    /// List a device's modules as a JSON array
    List { device: String },
    /// Delete a module (its session ends)
    Delete { device: String, module: String },
    /// Print the module's connection string
    ConnectionString {
        device: String,
        module: String,
        /// Which of the module's keys goes into the string
        #[arg(long, value_enum, default_value_t = KeyChoice::Primary)]
        key: KeyChoice,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KeyChoice {
    Primary,
    Secondary,
}

pub async fn module(command: ModuleCommand, target: &Target) -> Result<()> {
    let (svc, host) = client(target)?;
    match command {
        ModuleCommand::Create {
            device,
            module,
            managed_by,
            primary_key,
            secondary_key,
            auth,
            cert,
            secondary_cert,
        } => {
            let new = NewModule {
                primary_key,
                secondary_key,
                managed_by,
                authentication: authentication(&auth, cert.as_deref(), secondary_cert.as_deref())?,
            };
            print_json(&svc.create_module(&device, &module, new).await?)
        }
        ModuleCommand::Show { device, module } => {
            print_json(&svc.get_module(&device, &module).await?)
        }
        ModuleCommand::List { device } => print_json(&svc.list_modules(&device).await?),
        ModuleCommand::Delete { device, module } => {
            svc.delete_module(&device, &module, None).await?;
            eprintln!("deleted module {module} of device {device}");
            Ok(())
        }
        ModuleCommand::ConnectionString {
            device,
            module,
            key,
        } => {
            let found = svc.get_module(&device, &module).await?;
            println!("{}", connection_string(&host, &found, key)?);
            Ok(())
        }
    }
}

/// The authentication `--auth` asks for; `None` for SAS (keys generated or given).
fn authentication(
    auth: &str,
    cert: Option<&Path>,
    secondary: Option<&Path>,
) -> Result<Option<AuthenticationMechanism>> {
    let (auth_type, thumbprints) = match auth {
        "sas" if cert.is_some() => bail!("--cert is for --auth selfSigned"),
        "sas" => return Ok(None),
        "selfSigned" => {
            let cert = cert.ok_or_else(|| anyhow!("--auth selfSigned needs --cert FILE"))?;
            let thumbprints = X509Thumbprint {
                primary_thumbprint: Some(sha1_thumbprint(cert)?),
                secondary_thumbprint: secondary.map(sha1_thumbprint).transpose()?,
            };
            (AuthenticationType::SelfSigned, Some(thumbprints))
        }
        "ca" if cert.is_some() => {
            bail!(
                "--auth ca takes no --cert: the module's certificate must chain to a verified CA and have CN=DEVICE/MODULE"
            )
        }
        "ca" => (AuthenticationType::CertificateAuthority, None),
        other => bail!("unknown --auth {other}"),
    };
    Ok(Some(AuthenticationMechanism {
        symmetric_key: None,
        x509_thumbprint: thumbprints,
        auth_type,
    }))
}

/// The SHA-1 thumbprint (upper-case hex, as IoT Hub shows it) of the first certificate in the
/// PEM file at `path`.
fn sha1_thumbprint(path: &Path) -> Result<String> {
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let der = CertificateDer::pem_slice_iter(&pem)
        .next()
        .ok_or_else(|| anyhow!("{} holds no PEM certificate", path.display()))?
        .with_context(|| format!("parsing {}", path.display()))?;
    Ok(crate::ca::thumbprints(der.as_ref()).0)
}

/// The module's connection string with the chosen key; an X.509 module has no key to print.
fn connection_string(host: &str, module: &Module, key: KeyChoice) -> Result<String> {
    let keys = module
        .authentication
        .as_ref()
        .and_then(|a| a.symmetric_key.as_ref());
    let chosen = keys.and_then(|k| match key {
        KeyChoice::Primary => k.primary_key.as_deref(),
        KeyChoice::Secondary => k.secondary_key.as_deref(),
    });
    let chosen = chosen.filter(|k| !k.is_empty()).ok_or_else(|| {
        anyhow!(
            "module {} of device {} does not use SAS keys",
            module.module_id,
            module.device_id
        )
    })?;
    Ok(ConnectionString::module(host, &module.device_id, &module.module_id, chosen).to_string())
}

/// `twin show --module M`: the module's twin.
pub async fn show_twin(svc: &ServiceClient, device: &str, module: &str) -> Result<()> {
    print_json(&svc.get_module_twin(device, module).await?)
}

/// `twin update --module M`: merges `patch` into the module's twin.
pub async fn update_twin(
    svc: &ServiceClient,
    device: &str,
    module: &str,
    patch: &Value,
) -> Result<()> {
    print_json(&svc.update_module_twin(device, module, patch, None).await?)
}

#[derive(Subcommand)]
pub enum MethodCommand {
    /// Invoke a direct method on a device (or one of its modules) and print its status and
    /// payload as JSON
    Invoke {
        device: String,
        /// The method's name
        method: String,
        /// Call this module of the device instead of the device itself
        #[arg(long)]
        module: Option<String>,
        /// The method's payload, any JSON [default: null]
        #[arg(long)]
        payload: Option<String>,
        /// Seconds to wait for the answer (5 to 300)
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u16).range(5..=300))]
        timeout: u16,
        /// Seconds to wait for an offline device or module to connect (0 to 300) [default: 0]
        #[arg(long, value_parser = clap::value_parser!(u16).range(0..=300))]
        connect_timeout: Option<u16>,
    },
}

pub async fn method(command: MethodCommand, target: &Target) -> Result<()> {
    let MethodCommand::Invoke {
        device,
        method,
        module,
        payload,
        timeout,
        connect_timeout,
    } = command;
    let payload = payload
        .map(|p| {
            serde_json::from_str::<Value>(&p).map_err(|e| anyhow!("--payload is not JSON: {e}"))
        })
        .transpose()?;
    let call = CloudToDeviceMethod {
        method_name: method,
        payload,
        response_timeout_in_seconds: Some(i64::from(timeout)),
        connect_timeout_in_seconds: connect_timeout.map(i64::from),
    };
    // The HTTP request waits for the answer: give it the method's whole time and some.
    let wait = u64::from(timeout) + u64::from(connect_timeout.unwrap_or(0)) + 30;
    let (svc, _) = crate::client_with_timeout(target, std::time::Duration::from_secs(wait))?;
    let result = match &module {
        Some(module) => svc.invoke_module_method(&device, module, &call).await?,
        None => svc.invoke_method(&device, &call).await?,
    };
    print_json(&result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use twinhub_sdk::proto::model::SymmetricKey;

    #[test]
    fn connection_strings_carry_the_chosen_key() {
        let module = Module {
            device_id: "d1".into(),
            module_id: "m1".into(),
            authentication: Some(AuthenticationMechanism {
                symmetric_key: Some(SymmetricKey {
                    primary_key: Some("cA==".into()),
                    secondary_key: Some("cw==".into()),
                }),
                ..Default::default()
            }),
            ..Module::default()
        };
        assert_eq!(
            connection_string("localhost", &module, KeyChoice::Secondary).unwrap(),
            "HostName=localhost;DeviceId=d1;ModuleId=m1;SharedAccessKey=cw=="
        );
        let x509 = Module {
            authentication: None,
            ..module
        };
        assert!(connection_string("localhost", &x509, KeyChoice::Primary).is_err());
    }

    #[test]
    fn auth_flags_pick_the_authentication() {
        assert_eq!(authentication("sas", None, None).unwrap(), None);
        let ca = authentication("ca", None, None).unwrap().unwrap();
        assert_eq!(ca.auth_type, AuthenticationType::CertificateAuthority);
        assert!(authentication("selfSigned", None, None).is_err());
        assert!(authentication("ca", Some(Path::new("x.pem")), None).is_err());
        assert!(authentication("sas", Some(Path::new("x.pem")), None).is_err());
    }
}
