//! X.509 from the command line: `twinhub ca ...` manages the hub's CA certificates through its
//! REST API (add, list, show, remove, and IoT Hub's proof of possession: a verification code,
//! then a certificate with that code as CN signed with the CA's key); `twinhub cert ...` issues
//! development certificates locally with rcgen (a device's, from the data dir's dev CA or a CA
//! whose key you hold, or self-signed; and the proof-of-possession certificate); and the
//! `device create --auth selfSigned|ca` registrations.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand};
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, KeyUsagePurpose};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use twinhub_sdk::ServiceClient;

use crate::{Target, client, print_json};

#[derive(Subcommand)]
pub enum CaCommand {
    /// Register a CA certificate (PEM); it admits certificateAuthority devices once verified
    Add {
        name: String,
        /// The CA certificate, PEM
        #[arg(long)]
        cert: PathBuf,
    },
    /// List the registered CA certificates as a JSON array
    List,
    /// Show one CA certificate as JSON
    Show { name: String },
    /// Remove a CA certificate (closes the sessions it admitted)
    Remove { name: String },
    /// Print a new verification code: the CN of the certificate `ca verify` takes (make it
    /// with `twinhub cert verification CODE`)
    VerificationCode { name: String },
    /// Prove possession of the CA's key with a certificate whose CN is the verification code
    Verify {
        name: String,
        /// The verification certificate, PEM, signed with the CA's key
        #[arg(long)]
        cert: PathBuf,
    },
}

/// The CA that signs a development certificate: the data dir's dev CA unless given.
#[derive(Args)]
pub struct SigningCa {
    /// The CA certificate (PEM) [default: <data-dir>/tls/ca.pem]
    #[arg(long, requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// The CA's private key (PEM) [default: <data-dir>/tls/ca-key.pem]
    #[arg(long, requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// Where to write the certificate and key [default: the current directory]
    #[arg(long, default_value = ".")]
    out: PathBuf,
    /// Days the certificate is valid
    #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..=36500))]
    days: u32,
}

#[derive(Subcommand)]
pub enum CertCommand {
    /// Issue a device certificate and key with CN=ID (a module: deviceId/moduleId), signed by
    /// the dev CA or --ca-cert/--ca-key, or --self-signed; prints the paths and thumbprints
    Device {
        /// The device id (CN of the certificate)
        id: String,
        /// A self-signed certificate (for selfSigned devices) instead of a CA-signed one
        #[arg(long, conflicts_with_all = ["ca_cert", "ca_key"])]
        self_signed: bool,
        /// A certificate that expired yesterday, to see a hub refuse it
        #[arg(long)]
        expired: bool,
        #[command(flatten)]
        ca: SigningCa,
        /// A local hub's data dir, for its dev CA
        #[arg(long, env = "TWINHUB_DATA_DIR", default_value = "./twinhub-data")]
        data_dir: PathBuf,
    },
    /// Make the proof-of-possession certificate for `ca verify`: CN=CODE, signed with the CA's
    /// key. Given a CA name instead of a code, asks the hub for a new code first
    Verification {
        /// The verification code, or the name of a registered CA to get one for
        code_or_name: String,
        #[command(flatten)]
        ca: SigningCa,
        #[command(flatten)]
        target: Target,
    },
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

pub async fn ca(command: CaCommand, target: &Target) -> Result<()> {
    let (svc, _) = client(target)?;
    match command {
        CaCommand::Add { name, cert } => {
            print_json(&svc.add_certificate(&name, &read_text(&cert)?).await?)
        }
        CaCommand::List => print_json(&svc.list_certificates().await?),
        CaCommand::Show { name } => print_json(&svc.get_certificate(&name).await?),
        CaCommand::Remove { name } => {
            svc.delete_certificate(&name, None).await?;
            eprintln!("removed CA certificate {name}");
            Ok(())
        }
        CaCommand::VerificationCode { name } => {
            let d = svc.generate_verification_code(&name, None).await?;
            let code = d
                .properties
                .verification_code
                .ok_or_else(|| anyhow!("the hub answered without a verification code"))?;
            println!("{code}");
            eprintln!(
                "next: twinhub cert verification {code} [--ca-cert CA.pem --ca-key CA-key.pem]"
            );
            eprintln!("      twinhub ca verify {name} --cert ./verification-{code}.pem");
            Ok(())
        }
        CaCommand::Verify { name, cert } => print_json(
            &svc.verify_certificate(&name, &read_text(&cert)?, None)
                .await?,
        ),
    }
}

/// Upper-case hex SHA-1 and SHA-256 of a certificate's DER.
pub fn thumbprints(der: &[u8]) -> (String, String) {
    use sha1::Digest as _;
    use sha2::Digest as _;
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02X}")).collect::<String>();
    (
        hex(&sha1::Sha1::digest(der)),
        hex(&sha2::Sha256::digest(der)),
    )
}

/// The first certificate of a PEM file, as DER.
fn first_der(path: &Path) -> Result<Vec<u8>> {
    let pem = read_text(path)?;
    let der = CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .ok_or_else(|| anyhow!("{} holds no PEM certificate", path.display()))?
        .with_context(|| format!("parsing {}", path.display()))?;
    Ok(der.as_ref().to_vec())
}

impl SigningCa {
    /// The signing CA: --ca-cert/--ca-key, else the dev CA of the hub in `data_dir`.
    fn issuer(&self, data_dir: &Path) -> Result<Issuer<'static, KeyPair>> {
        let (cert, key) = match (&self.ca_cert, &self.ca_key) {
            (Some(c), Some(k)) => (c.clone(), k.clone()),
            _ => {
                let dir = data_dir.join("tls");
                (dir.join("ca.pem"), dir.join("ca-key.pem"))
            }
        };
        let key = KeyPair::from_pem(&read_text(&key)?)
            .with_context(|| format!("parsing the CA key {}", key.display()))?;
        Issuer::from_ca_cert_pem(&read_text(&cert)?, key)
            .with_context(|| format!("loading the CA certificate {}", cert.display()))
    }

    /// A leaf's parameters: CN, a random serial, valid from an hour ago for `--days` (or, when
    /// `expired`, for `--days` up to yesterday).
    fn params(&self, cn: &str, client_auth: bool, expired: bool) -> Result<CertificateParams> {
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.distinguished_name.push(DnType::CommonName, cn);
        if client_auth {
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
        let mut serial = [0u8; 16];
        getrandom::fill(&mut serial).map_err(|e| anyhow!("no randomness: {e}"))?;
        serial[0] &= 0x7f;
        p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let now = time::OffsetDateTime::now_utc();
        // A little slack before now: a device whose clock runs behind still accepts it.
        let days = time::Duration::days(i64::from(self.days));
        if expired {
            p.not_after = now - time::Duration::days(1);
            p.not_before = p.not_after - days;
        } else {
            p.not_before = now - time::Duration::hours(1);
            p.not_after = now + days;
        }
        Ok(p)
    }

    /// Writes `{stem}.pem` and `{stem}-key.pem` under `--out`; returns the paths.
    fn write(&self, stem: &str, cert_pem: &str, key: &KeyPair) -> Result<(PathBuf, PathBuf)> {
        std::fs::create_dir_all(&self.out)
            .with_context(|| format!("creating {}", self.out.display()))?;
        let cert_path = self.out.join(format!("{stem}.pem"));
        let key_path = self.out.join(format!("{stem}-key.pem"));
        std::fs::write(&cert_path, cert_pem)
            .with_context(|| format!("writing {}", cert_path.display()))?;
        write_private(&key_path, &key.serialize_pem())?;
        Ok((cert_path, key_path))
    }
}

/// A private key file readable by its owner only.
fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// A file name for an identity (a module's `deviceId/moduleId` has a slash).
fn stem(id: &str) -> String {
    id.replace('/', "-")
}

pub async fn cert(command: CertCommand) -> Result<()> {
    match command {
        CertCommand::Device {
            id,
            self_signed,
            expired,
            ca,
            data_dir,
        } => {
            let key = KeyPair::generate()?;
            let params = ca.params(&id, true, expired)?;
            let cert = if self_signed {
                params.self_signed(&key)?
            } else {
                params.signed_by(&key, &ca.issuer(&data_dir)?)?
            };
            let (cert_path, key_path) = ca.write(&stem(&id), &cert.pem(), &key)?;
            let (sha1, sha256) = thumbprints(cert.der());
            println!("certificate: {}", cert_path.display());
            println!("key:         {}", key_path.display());
            println!("sha1:        {sha1}");
            println!("sha256:      {sha256}");
            Ok(())
        }
        CertCommand::Verification {
            code_or_name,
            ca,
            target,
        } => {
            let is_code =
                code_or_name.len() >= 32 && code_or_name.bytes().all(|b| b.is_ascii_hexdigit());
            let code = if is_code {
                code_or_name
            } else {
                let (svc, _) = client(&target)?;
                svc.generate_verification_code(&code_or_name, None)
                    .await?
                    .properties
                    .verification_code
                    .ok_or_else(|| anyhow!("the hub answered without a verification code"))?
            };
            let key = KeyPair::generate()?;
            let cert = ca
                .params(&code, false, false)?
                .signed_by(&key, &ca.issuer(&target.data_dir)?)?;
            let (cert_path, _) = ca.write(&format!("verification-{code}"), &cert.pem(), &key)?;
            println!("{}", cert_path.display());
            Ok(())
        }
    }
}

/// `device create ID --auth selfSigned --cert FILE [--secondary-cert FILE]` or `--auth ca`.
pub async fn create_device(
    svc: &ServiceClient,
    id: &str,
    auth: &str,
    cert: Option<&Path>,
    secondary: Option<&Path>,
) -> Result<()> {
    let device = match auth {
        "selfSigned" => {
            let cert = cert.ok_or_else(|| anyhow!("--auth selfSigned needs --cert FILE"))?;
            let (primary, _) = thumbprints(&first_der(cert)?);
            let secondary = secondary
                .map(|p| first_der(p).map(|der| thumbprints(&der).0))
                .transpose()?;
            svc.create_x509_device(id, &primary, secondary.as_deref())
                .await?
        }
        "ca" => {
            if cert.is_some() || secondary.is_some() {
                bail!(
                    "--auth ca takes no --cert: the device's certificate must chain to a verified CA and have CN={id}"
                );
            }
            svc.create_ca_device(id).await?
        }
        other => bail!("unknown --auth {other}"),
    };
    print_json(&device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thumbprints_are_upper_hex_of_the_der() {
        let (sha1, sha256) = thumbprints(b"abc");
        assert_eq!(sha1, "A9993E364706816ABA3E25717850C26C9CD0D89D");
        assert_eq!(sha256.len(), 64);
        assert_eq!(stem("d/m"), "d-m");
    }
}
