//! `twinhub check --data-dir D`: verifies a data dir offline, while no hub runs on it. The
//! store (redb's integrity check and every record decoded, through `twinhub_core::check`),
//! `hub.json`, and the TLS files; each finding is one line of the report.

use std::fmt::Write as _;
use std::path::Path;

use crate::hub_file::HubFile;

/// What `check` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataDirCheck {
    /// One line per thing checked, in order.
    pub lines: Vec<String>,
    /// Whether anything is wrong.
    pub problems: usize,
}

impl DataDirCheck {
    fn ok(&mut self, line: String) {
        self.lines.push(format!("ok       {line}"));
    }

    fn bad(&mut self, line: String) {
        self.problems += 1;
        self.lines.push(format!("PROBLEM  {line}"));
    }

    fn note(&mut self, line: String) {
        self.lines.push(format!("note     {line}"));
    }

    pub fn is_clean(&self) -> bool {
        self.problems == 0
    }
}

/// Checks the data dir `dir`.
pub fn check_data_dir(dir: &Path) -> DataDirCheck {
    let mut report = DataDirCheck {
        lines: Vec::new(),
        problems: 0,
    };
    if !dir.is_dir() {
        report.bad(format!("{} is not a directory", dir.display()));
        return report;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(dir)
            && meta.permissions().mode() & 0o077 != 0
        {
            report.note(format!(
                "{} is readable by others (the hub makes it 0700 at start)",
                dir.display()
            ));
        }
    }
    match HubFile::read(dir) {
        Ok(file) => report.ok(format!(
            "hub.json: hub '{}', {} access policies",
            file.hostname,
            file.policies.len()
        )),
        Err(e) => report.bad(format!("hub.json: {e}")),
    }
    check_tls(dir, &mut report);
    let store = dir.join("store.redb");
    if !store.exists() {
        report.bad("store.redb is missing".into());
        return report;
    }
    match twinhub_core::check::check_store_file(&store) {
        Err(e) => report.bad(format!("store.redb: {e}")),
        Ok(found) => {
            if found.intact {
                report.ok("store.redb: integrity check passed".into());
            } else {
                report.note(
                    "store.redb: the integrity check repaired what an unclean stop left".into(),
                );
            }
            for (table, t) in &found.tables {
                if table == &"quarantine" {
                    if t.records > 0 {
                        report.note(format!(
                            "table quarantine: {} record(s) set aside earlier because they could not be decoded",
                            t.records
                        ));
                    }
                    continue;
                }
                if t.undecodable.is_empty() {
                    report.ok(format!("table {table}: {} records", t.records));
                } else {
                    let mut keys = String::new();
                    for k in t.undecodable.iter().take(10) {
                        let _ = write!(keys, " {}", twinhub_core::logsafe::Shown(k));
                    }
                    report.bad(format!(
                        "table {table}: {} of {} records cannot be decoded (the hub moves them to the quarantine table at start):{keys}",
                        t.undecodable.len(),
                        t.records
                    ));
                }
            }
        }
    }
    report
}

fn check_tls(dir: &Path, report: &mut DataDirCheck) {
    let tls = dir.join("tls");
    if !tls.is_dir() {
        report.note(
            "tls/: absent (an operator certificate is used, or the hub never started)".into(),
        );
        return;
    }
    for name in ["ca.pem", "server.pem"] {
        let path = tls.join(name);
        match std::fs::read(&path) {
            Ok(pem) => match x509_parser::pem::parse_x509_pem(&pem) {
                Ok((_, p)) if p.parse_x509().is_ok() => {
                    report.ok(format!("tls/{name}: a certificate"))
                }
                _ => report.bad(format!("tls/{name}: not a PEM certificate")),
            },
            Err(e) => report.bad(format!("tls/{name}: {e}")),
        }
    }
    for name in ["ca-key.pem", "server-key.pem"] {
        match std::fs::read_to_string(tls.join(name)) {
            Ok(pem) if rcgen::KeyPair::from_pem(&pem).is_ok() => {
                report.ok(format!("tls/{name}: a private key"))
            }
            Ok(_) => report.bad(format!("tls/{name}: not a PEM private key")),
            Err(e) => report.bad(format!("tls/{name}: {e}")),
        }
    }
}
