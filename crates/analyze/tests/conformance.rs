//! Runs Istio's analyzer test cases (`conformance/istio/analyzers/cases.tsv`): each case runs one
//! analyzer over its input files plus the default resources, and its messages must equal the
//! expected ones as a multiset of (code, name, resource).
//!
//! `ISTHMUS_ANALYZER_CONFORMANCE=<dir>` runs the cases of another directory of the same layout.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use isthmus_analyze::{Input, all, run};
use isthmus_config::mesh::{MeshConfig, MeshNetworks};
use isthmus_config::{Loader, Snapshot};

fn conformance_dir() -> PathBuf {
    match std::env::var_os("ISTHMUS_ANALYZER_CONFORMANCE") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../conformance/istio/analyzers"),
    }
}

struct Case {
    name: String,
    inputs: Vec<String>,
    expected: Vec<(String, String, String)>,
    analyzer: String,
    mesh_config: String,
    mesh_networks: String,
}

fn cases(dir: &Path) -> Vec<Case> {
    let text = std::fs::read_to_string(dir.join("cases.tsv")).expect("cases.tsv");
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split('\t').collect();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .unwrap_or_else(|| panic!("column {name}"))
    };
    let (c_name, c_inputs, c_expected, c_analyzer, c_mesh, c_networks) = (
        col("case_name"),
        col("input_files"),
        col("expected"),
        col("analyzer_metadata_name"),
        col("mesh_config_file"),
        col("mesh_networks_file"),
    );
    lines
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            let get = |i: usize| f.get(i).copied().unwrap_or("").to_string();
            let expected = get(c_expected)
                .split(';')
                .filter(|s| !s.is_empty())
                .map(|e| {
                    let mut p = e.splitn(3, '|');
                    let code = p.next().unwrap_or("").to_string();
                    let name = p.next().unwrap_or("").to_string();
                    let res = p.next().unwrap_or("").to_string();
                    (code, name, res)
                })
                .collect();
            Case {
                name: get(c_name),
                inputs: get(c_inputs)
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect(),
                expected,
                analyzer: get(c_analyzer),
                mesh_config: get(c_mesh),
                mesh_networks: get(c_networks),
            }
        })
        .collect()
}

fn strip_testdata(p: &str) -> &str {
    p.strip_prefix("testdata/").unwrap_or(p)
}

fn run_case(dir: &Path, case: &Case) -> Result<(), String> {
    let testdata = dir.join("testdata");
    let mut paths: Vec<PathBuf> = case
        .inputs
        .iter()
        .map(|i| testdata.join(strip_testdata(i)))
        .collect();
    paths.push(dir.join("default-resources.yaml"));
    let loaded = Loader::default().load_paths(&paths);
    let snapshot: Snapshot = loaded.resources.into_iter().collect();
    let mesh = if case.mesh_config.is_empty() {
        MeshConfig::default()
    } else {
        let t = std::fs::read_to_string(testdata.join(strip_testdata(&case.mesh_config)))
            .map_err(|e| e.to_string())?;
        serde_saphyr::from_str(&t).map_err(|e| format!("mesh config: {e}"))?
    };
    let mesh_networks = if case.mesh_networks.is_empty() {
        None
    } else {
        let t = std::fs::read_to_string(testdata.join(strip_testdata(&case.mesh_networks)))
            .map_err(|e| e.to_string())?;
        Some(
            serde_saphyr::from_str::<MeshNetworks>(&t)
                .map_err(|e| format!("mesh networks: {e}"))?,
        )
    };
    let input = Input {
        snapshot,
        mesh,
        mesh_networks,
        domain: "cluster.local".into(),
    };
    let analyzers = all();
    let analyzer = analyzers
        .iter()
        .find(|(a, _)| a.name() == case.analyzer)
        .map(|(a, _)| a.as_ref())
        .ok_or("analyzer not implemented")?;
    let got = run(&input, &[analyzer]);
    let mut want: BTreeMap<(String, String, String), i64> = BTreeMap::new();
    for e in &case.expected {
        *want.entry(e.clone()).or_default() += 1;
    }
    for m in &got {
        let key = (
            m.code().to_string(),
            m.message_type.name.clone(),
            m.origin(),
        );
        *want.entry(key).or_default() -= 1;
    }
    let diff: Vec<String> = want
        .into_iter()
        .filter(|(_, n)| *n != 0)
        .map(|((c, n, r), d)| {
            if d > 0 {
                format!("missing {d}x {c} {n} ({r})")
            } else {
                format!("unexpected {}x {c} {n} ({r})", -d)
            }
        })
        .collect();
    if diff.is_empty() {
        Ok(())
    } else {
        let shown: Vec<String> = got.iter().map(|m| m.to_string()).collect();
        Err(format!(
            "{}\n      got:\n        {}",
            diff.join("\n      "),
            shown.join("\n        ")
        ))
    }
}

#[test]
fn istio_analyzer_cases() {
    let dir = conformance_dir();
    let implemented: Vec<String> = all().iter().map(|(a, _)| a.name()).collect();
    let (mut passed, mut failed) = (0, 0);
    let mut missing = std::collections::BTreeSet::new();
    for case in cases(&dir) {
        if !implemented.contains(&case.analyzer) {
            missing.insert(case.analyzer.clone());
            continue;
        }
        match run_case(&dir, &case) {
            Ok(()) => passed += 1,
            Err(e) => {
                failed += 1;
                eprintln!("FAIL {} [{}]\n      {e}", case.name, case.analyzer);
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    if !missing.is_empty() {
        println!(
            "analyzers not implemented: {}",
            missing.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
    assert_eq!(failed, 0, "{failed} conformance cases failed");
}
