//! Certificates the CA signs per second on one core, for an ECDSA P-256 CA and an RSA 2048 CA
//! (Istio's plug-in CAs are often RSA). Each signature is the whole `sign_csr` path: parse the
//! CSR, check its signature, build the SPIFFE certificate, sign it, PEM-encode the chain.
//!
//! Baseline, in the same run: the bare signature operation of the CA's key (ring), i.e. the
//! floor no CA can go below. Run: `cargo bench -p isthmus-ca --bench sign`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use isthmus_ca::workload::new_key_and_csr;
use isthmus_ca::{Authority, CaOptions, SpiffeId};

const WINDOW: Duration = Duration::from_secs(3);

fn main() {
    let id = SpiffeId::new("cluster.local", "default", "sleep");
    let csrs: Vec<String> = (0..64).map(|_| new_key_and_csr(&id).unwrap().1).collect();

    let ec_dir = tempfile::tempdir().unwrap();
    let ec = Authority::load_or_create(ec_dir.path(), CaOptions::default()).unwrap();
    let ec_key = std::fs::read_to_string(ec_dir.path().join("ca-key.pem")).unwrap();

    let rsa_dir = tempfile::tempdir().unwrap();
    let rsa_key = rsa_ca(rsa_dir.path());
    let rsa = Authority::load(rsa_dir.path(), CaOptions::default()).unwrap();

    println!(
        "{:<14} {:>14} {:>16} {:>8}",
        "CA key", "certs/s", "raw signs/s", "ratio"
    );
    for (name, ca, key) in [("ECDSA P-256", &ec, &ec_key), ("RSA 2048", &rsa, &rsa_key)] {
        let certs = rate(|i| {
            ca.sign_csr(&csrs[i % csrs.len()], &id, None).unwrap();
        });
        let kp = rcgen::KeyPair::from_pem(key).unwrap();
        let raw = rate(|i| {
            // The signature alone, over a message of a certificate's size.
            let msg = [i as u8; 400];
            rcgen::SigningKey::sign(&kp, &msg).unwrap();
        });
        println!("{name:<14} {certs:>14.0} {raw:>16.0} {:>8.2}", certs / raw);
    }
}

/// Operations per second of `f` on this thread over a fixed window.
fn rate(mut f: impl FnMut(usize)) -> f64 {
    for i in 0..50 {
        f(i);
    }
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < WINDOW {
        for _ in 0..50 {
            f(n);
            n += 1;
        }
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// An RSA 2048 self-signed CA in Istio's plug-in layout. ring cannot generate RSA keys, so the
/// key comes from openssl; rcgen signs with it.
fn rsa_ca(dir: &Path) -> String {
    let key_path = dir.join("ca-key.pem");
    let status = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&key_path)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl");
    assert!(status.success());
    let key_pem = std::fs::read_to_string(&key_path).unwrap();
    let key = rcgen::KeyPair::from_pem(&key_pem).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "cluster.local");
    let cert = params.self_signed(&key).unwrap().pem();
    for f in ["ca-cert.pem", "root-cert.pem", "cert-chain.pem"] {
        std::fs::write(dir.join(f), &cert).unwrap();
    }
    key_pem
}
