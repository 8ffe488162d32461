//! `isthmus analyze`: istioctl's analyzer over local files.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::{Args, ValueEnum};
use isthmus_analyze::{Analyzer, Input, Level, Message, defaults};
use isthmus_config::mesh::{MeshConfig, MeshNetworks};
use isthmus_config::{Loader, Severity, Snapshot};
use serde::Serialize;

use crate::cmd::read_yaml;
use crate::exit;

#[derive(Debug, Args)]
pub struct AnalyzeArgs {
    /// Files or directories (recursively) of Kubernetes and Istio YAML or JSON; `-` reads stdin.
    pub paths: Vec<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Log)]
    pub output: Format,
    /// Lowest level of message to print.
    #[arg(long = "output-threshold", default_value = "Info", value_parser = parse_level)]
    pub output_threshold: Level,
    /// Lowest level of message that makes the command fail (exit code 79).
    #[arg(long = "failure-threshold", default_value = "Error", value_parser = parse_level)]
    pub failure_threshold: Level,
    /// Suppress a message code on a resource: `CODE=Kind name`, `*` as wildcard. Repeatable.
    #[arg(short = 'S', long = "suppress")]
    pub suppress: Vec<String>,
    /// MeshConfig to analyze with (Istio's defaults otherwise).
    #[arg(long = "meshConfigFile")]
    pub mesh_config_file: Option<PathBuf>,
    /// MeshNetworks to analyze with.
    #[arg(long = "meshNetworksFile")]
    pub mesh_networks_file: Option<PathBuf>,
    /// List the analyzers and exit.
    #[arg(short = 'L', long = "list-analyzers")]
    pub list_analyzers: bool,
    /// Run only this analyzer (Istio's name, e.g. `virtualservice.DestinationHostAnalyzer`).
    /// Repeatable.
    #[arg(long = "analyzer")]
    pub analyzer: Vec<String>,
    /// Namespace for namespaced resources that name none.
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    /// Colourize levels (`auto` when standard output is a terminal).
    #[arg(long, value_enum, default_value_t = Color::Auto)]
    pub color: Color,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Log,
    Json,
    Yaml,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Color {
    Auto,
    Always,
    Never,
}

fn parse_level(s: &str) -> Result<Level, String> {
    Level::parse(s).ok_or_else(|| format!("invalid level {s:?}: expected Info, Warning or Error"))
}

/// One message as `-o json|yaml` prints it (istioctl's field names).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct MessageOut {
    code: String,
    documentation_url: String,
    level: String,
    message: String,
    origin: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    reference: Option<String>,
}

impl From<&Message> for MessageOut {
    fn from(m: &Message) -> Self {
        MessageOut {
            code: m.code().to_string(),
            documentation_url: m.documentation_url(),
            level: m.level().to_string(),
            message: m.text(),
            origin: m.origin(),
            reference: m.resource.as_ref().and_then(|r| r.reference()),
        }
    }
}

/// A `--suppress CODE=Kind name` rule.
struct Suppression {
    code: String,
    resource: String,
}

impl Suppression {
    fn parse(s: &str) -> Result<Suppression> {
        let (code, resource) = s
            .split_once('=')
            .with_context(|| format!("--suppress {s:?}: expected CODE=\"Kind name\""))?;
        Ok(Suppression {
            code: code.trim().to_string(),
            resource: resource.trim().to_string(),
        })
    }

    fn matches(&self, m: &Message) -> bool {
        if !glob(&self.code, m.code()) {
            return false;
        }
        let Some(r) = &m.resource else { return false };
        // Accept `Kind ns/name` and the older `Kind name.ns` spelling.
        let legacy = if r.namespace.is_empty() {
            format!("{} {}", r.kind, r.name)
        } else {
            format!("{} {}.{}", r.kind, r.name, r.namespace)
        };
        glob(&self.resource, &r.friendly_name()) || glob(&self.resource, &legacy)
    }
}

/// `*` matches any run of characters.
fn glob(pattern: &str, s: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == s,
        Some((head, tail)) => {
            s.starts_with(head)
                && (0..=s.len() - head.len()).any(|i| glob(tail, &s[head.len() + i..]))
        }
    }
}

pub fn run(args: AnalyzeArgs) -> Result<i32> {
    let analyzers = isthmus_analyze::all();
    if args.list_analyzers {
        let mut out = std::io::stdout().lock();
        writeln!(out, "Available analyzers:")?;
        for (a, default) in &analyzers {
            let note = if *default {
                ""
            } else {
                " (not run by default)"
            };
            writeln!(out, "* {}:{note}\n    {}", a.name(), a.description())?;
        }
        return Ok(exit::OK);
    }
    if args.paths.is_empty() {
        eprintln!(
            "error: no files or directories to analyze (give paths, or - for standard input)"
        );
        return Ok(exit::USAGE);
    }
    let selected: Vec<&dyn Analyzer> = if args.analyzer.is_empty() {
        analyzers
            .iter()
            .filter(|(_, d)| *d)
            .map(|(a, _)| a.as_ref())
            .collect()
    } else {
        let mut v = Vec::new();
        for name in &args.analyzer {
            match analyzers.iter().find(|(a, _)| &a.name() == name) {
                Some((a, _)) => v.push(a.as_ref()),
                None => {
                    eprintln!("error: unknown analyzer {name:?} (see --list-analyzers)");
                    return Ok(exit::USAGE);
                }
            }
        }
        v
    };
    let suppressions = args
        .suppress
        .iter()
        .map(|s| Suppression::parse(s))
        .collect::<Result<Vec<_>>>()?;

    let loader = Loader {
        default_namespace: Some(args.namespace.clone()),
    };
    let loaded = loader.load_paths(&args.paths);
    let mut parse_failed = false;
    for d in &loaded.diagnostics {
        eprintln!("{d}");
        parse_failed |= d.severity == Severity::Error;
    }
    let mut snapshot: Snapshot = loaded.resources.into_iter().collect();
    for r in defaults::default_resources() {
        snapshot.push(r);
    }
    let mesh = match &args.mesh_config_file {
        Some(p) => read_yaml::<MeshConfig>(p)?,
        None => mesh_from_configmap(&snapshot)?.unwrap_or_default(),
    };
    let mesh_networks = args
        .mesh_networks_file
        .as_ref()
        .map(|p| read_yaml::<MeshNetworks>(p))
        .transpose()?;
    let input = Input {
        snapshot,
        mesh,
        mesh_networks,
        domain: isthmus_registry::DEFAULT_DOMAIN.to_string(),
    };
    let messages: Vec<Message> = isthmus_analyze::run(&input, &selected)
        .into_iter()
        .filter(|m| !suppressions.iter().any(|s| s.matches(m)))
        .collect();
    let shown: Vec<&Message> = messages
        .iter()
        .filter(|m| m.level() >= args.output_threshold)
        .collect();
    print(&args, &shown)?;
    if parse_failed {
        return Ok(exit::DATA_ERROR);
    }
    if messages.iter().any(|m| m.level() >= args.failure_threshold) {
        return Ok(exit::ANALYZER_FOUND_ISSUES);
    }
    Ok(exit::OK)
}

fn print(args: &AnalyzeArgs, shown: &[&Message]) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match args.output {
        Format::Log => {
            if shown.is_empty() {
                let targets: Vec<String> =
                    args.paths.iter().map(|p| p.display().to_string()).collect();
                eprintln!(
                    "\u{2714} No validation issues found when analyzing {}.",
                    targets.join(", ")
                );
            }
            let color = match args.color {
                Color::Always => true,
                Color::Never => false,
                Color::Auto => std::io::IsTerminal::is_terminal(&std::io::stdout()),
            };
            for m in shown {
                let line = m.to_string();
                if color {
                    let level = m.level().as_str();
                    let code = match m.level() {
                        Level::Error => "31",
                        Level::Warning => "33",
                        Level::Info => "36",
                    };
                    writeln!(out, "\x1b[{code}m{level}\x1b[0m{}", &line[level.len()..])?;
                } else {
                    writeln!(out, "{line}")?;
                }
            }
        }
        Format::Json | Format::Yaml => {
            let items: Vec<MessageOut> = shown.iter().map(|m| MessageOut::from(*m)).collect();
            if args.output == Format::Json {
                serde_json::to_writer_pretty(&mut out, &items)?;
                writeln!(out)?;
            } else {
                write!(out, "{}", serde_saphyr::to_string(&items)?)?;
            }
        }
    }
    Ok(())
}

/// MeshConfig from the `istio` ConfigMap's `mesh` key, as istiod reads it.
fn mesh_from_configmap(snap: &Snapshot) -> Result<Option<MeshConfig>> {
    let Some(cm) = snap.config_maps.iter().find(|c| {
        c.name() == "istio" && c.namespace() == isthmus_config::mesh::DEFAULT_ROOT_NAMESPACE
    }) else {
        return Ok(None);
    };
    let Some(mesh) = cm.object.data.as_ref().and_then(|d| d.get("mesh")) else {
        return Ok(None);
    };
    serde_saphyr::from_str(mesh).map(Some).with_context(|| {
        format!(
            "parsing the mesh key of ConfigMap istio-system/istio ({})",
            cm.origin
        )
    })
}

#[cfg(test)]
mod tests {
    use super::glob;

    #[test]
    fn globs() {
        assert!(glob("IST01*", "IST0101"));
        assert!(glob("Pod *.baz", "Pod foo.baz"));
        assert!(glob("*", "anything"));
        assert!(!glob("Pod fr*", "Service frod"));
    }
}
