//! Embeds the web console (`console/`: HTML, CSS, ES modules) in the binary: generates a
//! table of every file under it with its bytes (`include_bytes!`) and a content hash for ETags,
//! so building twinhub needs no Node.js and serving the console touches no disk.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let console = root.join("console");
    println!("cargo:rerun-if-changed={}", console.display());
    let mut files = Vec::new();
    collect(&console, &console, &mut files);
    files.sort();
    let mut out = String::from("pub static ASSETS: &[(&str, &[u8], u64)] = &[\n");
    for (name, path) in &files {
        println!("cargo:rerun-if-changed={}", path.display());
        let bytes = std::fs::read(path).expect("console file readable");
        writeln!(
            out,
            "    ({name:?}, include_bytes!({:?}), {:#x}),",
            path.display().to_string(),
            fnv1a(&bytes)
        )
        .expect("write to a String");
    }
    out.push_str("];\n");
    let dest =
        PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets it")).join("console_assets.rs");
    std::fs::write(dest, out).expect("OUT_DIR writable");
}

fn collect(root: &Path, dir: &Path, files: &mut Vec<(String, PathBuf)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        println!("cargo:rerun-if-changed={}", path.display());
        if path.is_dir() {
            collect(root, &path, files);
        } else if let Ok(rel) = path.strip_prefix(root) {
            let name = rel.to_string_lossy().replace('\\', "/");
            // Editor droppings and hidden files are not part of the console.
            if !name
                .split('/')
                .any(|p| p.starts_with('.') || p.ends_with('~'))
            {
                files.push((name, path));
            }
        }
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}
