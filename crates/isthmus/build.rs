//! Links an optimized `isthmus-proxy` with the code a sidecar runs laid out together, as
//! `link/isthmus-proxy.ld` lists it (written by `link/order.sh`), and names the build: a
//! fingerprint of the workspace's sources, the same in `isthmus` and `isthmus-proxy` when
//! they come from the same code, so that the local runtime does not start a sidecar binary
//! left over from another build.

use std::hash::Hasher;
use std::path::{Path, PathBuf};

fn main() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/link/isthmus-proxy.ld");
    println!("cargo::rerun-if-changed={script}");
    // Section names are ELF's; sections the script does not name keep the compiler's order.
    // `PROFILE` is `release` for every profile that inherits it (`production` among them).
    let elf = std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux");
    if elf && std::env::var("PROFILE").as_deref() == Ok("release") {
        println!("cargo::rustc-link-arg-bin=isthmus-proxy=-Wl,-T,{script}");
    }
    println!("cargo::rustc-env=ISTHMUS_BUILD_ID={}", build_id());
}

/// A hash of every crate's files but its tests and benchmarks, and of the workspace's manifest
/// and lock file, in path order.
fn build_id() -> String {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut files = vec![workspace.join("Cargo.toml"), workspace.join("Cargo.lock")];
    let entries = |dir: &Path| {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect::<Vec<_>>()
    };
    for krate in entries(&workspace.join("crates")) {
        for part in entries(&krate) {
            if part.ends_with("tests") || part.ends_with("benches") {
                continue;
            }
            println!("cargo::rerun-if-changed={}", part.display());
            walk(&part, &mut files);
        }
    }
    files.sort();
    // The same sources give the same number; SipHash with fixed keys, not a cryptographic one.
    let mut h = std::hash::DefaultHasher::new();
    for f in &files {
        if let Ok(bytes) = std::fs::read(f) {
            h.write(
                f.strip_prefix(&workspace)
                    .unwrap_or(f)
                    .as_os_str()
                    .as_encoded_bytes(),
            );
            h.write(&bytes);
        }
    }
    format!("{:016x}", h.finish())
}

/// `path` and, for a directory, every file under it.
fn walk(path: &Path, out: &mut Vec<PathBuf>) {
    if !path.is_dir() {
        out.push(path.to_path_buf());
        return;
    }
    for entry in std::fs::read_dir(path).into_iter().flatten().flatten() {
        walk(&entry.path(), out);
    }
}
