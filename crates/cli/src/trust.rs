//! `twinhub trust`: puts the hub's development CA where clients look for trust, in the spirit
//! of `mkcert -install`. azure-eventhub trusts only certifi's bundle (no environment variable
//! reaches it), so `--python` appends the CA to the certifi bundle of that interpreter;
//! `--system` installs it in the Debian/Ubuntu trust store. Each change is marked with the
//! CA's fingerprint, so it is idempotent and `--remove` takes out exactly what was added.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use sha2::{Digest, Sha256};

#[derive(Args)]
pub struct TrustArgs {
    /// The hub's data dir (its CA is tls/ca.pem there)
    #[arg(long, env = "TWINHUB_DATA_DIR", default_value = "./twinhub-data")]
    data_dir: PathBuf,
    /// A Python interpreter whose certifi bundle gets the CA (e.g. a venv's bin/python)
    #[arg(long, value_name = "PATH")]
    python: Option<PathBuf>,
    /// Install the CA in the system trust store (/usr/local/share/ca-certificates; needs root)
    #[arg(long)]
    system: bool,
    /// Take the CA out again instead
    #[arg(long)]
    remove: bool,
}

const SYSTEM_DIR: &str = "/usr/local/share/ca-certificates";

fn marker(fingerprint: &str, end: bool) -> String {
    format!(
        "# twinhub development CA {fingerprint} {}\n",
        if end { "end" } else { "begin" }
    )
}

/// The CA's PEM and a short fingerprint of it.
fn read_ca(data_dir: &Path) -> Result<(String, String)> {
    let path = data_dir.join("tls").join("ca.pem");
    let pem = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read {} (has `twinhub serve` run with this data dir? an operator certificate has no development CA to trust)",
            path.display()
        )
    })?;
    let digest = Sha256::digest(pem.trim().as_bytes());
    let fingerprint: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    Ok((pem, fingerprint))
}

fn certifi_bundle(python: &Path) -> Result<PathBuf> {
    let out = Command::new(python)
        .args(["-c", "import certifi; print(certifi.where())"])
        .output()
        .with_context(|| format!("cannot run {}", python.display()))?;
    if !out.status.success() {
        bail!(
            "{} cannot import certifi: {}",
            python.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if path.is_empty() {
        bail!("{} printed no certifi bundle path", python.display());
    }
    Ok(PathBuf::from(path))
}

/// `text` without the block between this CA's markers (and the markers).
fn without_block(text: &str, fingerprint: &str) -> String {
    let (begin, end) = (marker(fingerprint, false), marker(fingerprint, true));
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(&begin) {
        out.push_str(&rest[..at]);
        match rest[at..].find(&end) {
            Some(stop) => rest = &rest[at + stop + end.len()..],
            None => {
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

fn update_bundle(bundle: &Path, pem: &str, fingerprint: &str, remove: bool) -> Result<bool> {
    let text = std::fs::read_to_string(bundle)
        .with_context(|| format!("cannot read {}", bundle.display()))?;
    let cleaned = without_block(&text, fingerprint);
    let new = if remove {
        cleaned
    } else {
        let mut new = cleaned;
        if !new.is_empty() && !new.ends_with('\n') {
            new.push('\n');
        }
        new.push_str(&marker(fingerprint, false));
        new.push_str(pem.trim_end());
        new.push('\n');
        new.push_str(&marker(fingerprint, true));
        new
    };
    if new == text {
        return Ok(false);
    }
    // Through a temporary file in the same directory: a crash never leaves a torn bundle.
    let tmp = bundle.with_extension("pem.twinhub-tmp");
    std::fs::write(&tmp, new.as_bytes())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, bundle)
        .with_context(|| format!("cannot replace {}", bundle.display()))?;
    Ok(true)
}

fn run_update_ca_certificates() -> Result<()> {
    let status = Command::new("update-ca-certificates")
        .status()
        .context("cannot run update-ca-certificates (is this Debian or Ubuntu with ca-certificates installed?)")?;
    if !status.success() {
        bail!("update-ca-certificates failed ({status})");
    }
    Ok(())
}

pub fn run(args: TrustArgs) -> Result<()> {
    let (pem, fingerprint) = read_ca(&args.data_dir)?;
    if args.python.is_none() && !args.system {
        let ca = args.data_dir.join("tls").join("ca.pem");
        println!("twinhub trust changes nothing without a flag. It would:");
        println!(
            "  --python PATH  append {} (marked {fingerprint}) to the certifi bundle of PATH,",
            ca.display()
        );
        println!("                 which azure-eventhub and the az CLI trust");
        println!(
            "  --system       copy it to {SYSTEM_DIR}/twinhub-{fingerprint}.crt and run update-ca-certificates"
        );
        println!("  --remove       with either flag, take it out again");
        return Ok(());
    }
    let verb = if args.remove { "removed" } else { "added" };
    if let Some(python) = &args.python {
        let bundle = certifi_bundle(python)?;
        let changed = update_bundle(&bundle, &pem, &fingerprint, args.remove)?;
        if changed {
            println!(
                "{verb} the twinhub CA {fingerprint} in {}",
                bundle.display()
            );
        } else {
            println!(
                "{} already {} the twinhub CA {fingerprint}",
                bundle.display(),
                if args.remove { "lacks" } else { "holds" }
            );
        }
    }
    if args.system {
        let target = Path::new(SYSTEM_DIR).join(format!("twinhub-{fingerprint}.crt"));
        if args.remove {
            match std::fs::remove_file(&target) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    println!("{} is not installed", target.display());
                    return Ok(());
                }
                Err(e) => return Err(anyhow!("cannot remove {}: {e}", target.display())),
            }
        } else {
            std::fs::create_dir_all(SYSTEM_DIR)
                .with_context(|| format!("cannot create {SYSTEM_DIR} (run as root)"))?;
            std::fs::write(&target, pem.as_bytes())
                .with_context(|| format!("cannot write {} (run as root)", target.display()))?;
        }
        run_update_ca_certificates()?;
        println!("{verb} {} in the system trust store", target.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_added_once_and_removed_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("cacert.pem");
        let original = "-----BEGIN CERTIFICATE-----\nROOT\n-----END CERTIFICATE-----\n";
        std::fs::write(&bundle, original).unwrap();
        let pem = "-----BEGIN CERTIFICATE-----\nDEV\n-----END CERTIFICATE-----\n";
        assert!(update_bundle(&bundle, pem, "abcd", false).unwrap());
        let once = std::fs::read_to_string(&bundle).unwrap();
        assert!(!update_bundle(&bundle, pem, "abcd", false).unwrap());
        assert_eq!(std::fs::read_to_string(&bundle).unwrap(), once);
        assert_eq!(once.matches("DEV").count(), 1);
        // Another hub's CA sits beside it and survives this one's removal.
        assert!(update_bundle(&bundle, pem, "ef01", false).unwrap());
        assert!(update_bundle(&bundle, pem, "abcd", true).unwrap());
        let left = std::fs::read_to_string(&bundle).unwrap();
        assert!(left.contains("ef01") && !left.contains("abcd"));
        assert!(update_bundle(&bundle, pem, "ef01", true).unwrap());
        assert_eq!(std::fs::read_to_string(&bundle).unwrap(), original);
    }
}
