//! Links an optimized `isthmus-proxy` with the code a sidecar runs laid out together, as
//! `link/isthmus-proxy.ld` lists it (written by `link/order.sh`).

fn main() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/link/isthmus-proxy.ld");
    println!("cargo::rerun-if-changed={script}");
    // Section names are ELF's; sections the script does not name keep the compiler's order.
    // `PROFILE` is `release` for every profile that inherits it (`production` among them).
    let elf = std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux");
    if elf && std::env::var("PROFILE").as_deref() == Ok("release") {
        println!("cargo::rustc-link-arg-bin=isthmus-proxy=-Wl,-T,{script}");
    }
}
