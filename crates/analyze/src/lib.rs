//! Istio's configuration analyzers (`istioctl analyze`) and their IST messages.
//!
//! Each analyzer is named as Istio names it (`virtualservice.DestinationHostAnalyzer`), reads a
//! [`Context`] (the resources, MeshConfig and MeshNetworks) and reports [`Message`]s from Istio's
//! catalogue. [`run`] applies them, honours `galley.istio.io/analyze-suppress`, and orders the
//! result deterministically.

#![forbid(unsafe_code)]

pub mod analyzers;
pub mod defaults;
pub mod message;
pub mod util;
pub mod validation;

use isthmus_config::mesh::MeshNetworks;
use isthmus_config::{Entry, HasMetadata, Kind, MeshConfig, Snapshot};

pub use message::{Arg, Level, Message, ResourceRef};

/// Annotation listing message codes (or `*`) not to report for a resource.
pub const SUPPRESS_ANNOTATION: &str = "galley.istio.io/analyze-suppress";

/// An analyzer: a named rule set over the resources.
pub trait Analyzer: Sync {
    /// Istio's metadata name, e.g. `virtualservice.DestinationHostAnalyzer`.
    fn name(&self) -> String;
    fn description(&self) -> String;
    fn analyze(&self, ctx: &mut Context<'_>);
}

/// What analyzers read, and where they report.
pub struct Context<'a> {
    pub snapshot: &'a Snapshot,
    pub mesh: &'a MeshConfig,
    pub mesh_networks: Option<&'a MeshNetworks>,
    /// The cluster domain (`cluster.local`).
    pub domain: &'a str,
    messages: Vec<Message>,
}

impl<'a> Context<'a> {
    pub fn new(input: &'a Input) -> Context<'a> {
        Context {
            snapshot: &input.snapshot,
            mesh: &input.mesh,
            mesh_networks: input.mesh_networks.as_ref(),
            domain: &input.domain,
            messages: Vec::new(),
        }
    }

    /// Reports a message about a resource.
    pub fn report<T: HasMetadata>(
        &mut self,
        kind: Kind,
        e: &Entry<T>,
        message: &str,
        args: Vec<Arg>,
    ) {
        self.messages
            .push(Message::new(message, Some(resource_ref(kind, e)), args));
    }

    /// Reports a message about a resource given by reference.
    pub fn report_ref(&mut self, r: ResourceRef, message: &str, args: Vec<Arg>) {
        self.messages.push(Message::new(message, Some(r), args));
    }

    pub fn into_messages(self) -> Vec<Message> {
        self.messages
    }
}

/// The reference a message carries for a resource.
pub fn resource_ref<T: HasMetadata>(kind: Kind, e: &Entry<T>) -> ResourceRef {
    ResourceRef {
        kind: kind.name().to_string(),
        namespace: e.namespace().to_string(),
        name: e.name().to_string(),
        origin: e.origin.clone(),
    }
}

/// Everything an analysis run reads.
#[derive(Debug, Clone, Default)]
pub struct Input {
    pub snapshot: Snapshot,
    pub mesh: MeshConfig,
    pub mesh_networks: Option<MeshNetworks>,
    pub domain: String,
}

/// Runs analyzers and returns their messages, minus those suppressed by annotation and repeated
/// identical ones, in a stable order.
pub fn run(input: &Input, analyzers: &[&dyn Analyzer]) -> Vec<Message> {
    let mut messages = Vec::new();
    for a in analyzers {
        let mut ctx = Context::new(input);
        a.analyze(&mut ctx);
        messages.extend(ctx.into_messages());
    }
    let suppressed = suppressions(&input.snapshot);
    messages.retain(|m| {
        let Some(r) = &m.resource else { return true };
        !suppressed.iter().any(|(kind, ns, name, codes)| {
            kind == &r.kind
                && ns == &r.namespace
                && name == &r.name
                && codes.iter().any(|c| c == "*" || c == m.code())
        })
    });
    sort(&mut messages);
    dedup(&mut messages);
    messages
}

/// Orders messages as istioctl prints them: most severe first, then by code, resource and text.
pub fn sort(messages: &mut [Message]) {
    messages.sort_by(|a, b| {
        b.level()
            .cmp(&a.level())
            .then_with(|| a.code().cmp(b.code()))
            .then_with(|| a.origin().cmp(&b.origin()))
            .then_with(|| a.text().cmp(&b.text()))
    });
}

/// Drops repeated identical messages (same code, resource and text), keeping the first.
pub fn dedup(messages: &mut Vec<Message>) {
    let mut seen = std::collections::HashSet::new();
    messages.retain(|m| seen.insert((m.code().to_string(), m.origin(), m.text())));
}

type Suppression = (String, String, String, Vec<String>);

fn suppressions(snap: &Snapshot) -> Vec<Suppression> {
    snap.all_metadata()
        .into_iter()
        .filter_map(|(kind, _, meta)| {
            let v = meta.annotations.as_ref()?.get(SUPPRESS_ANNOTATION)?;
            Some((
                kind.name().to_string(),
                meta.namespace.clone().unwrap_or_default(),
                meta.name.clone().unwrap_or_default(),
                v.split(',').map(|s| s.trim().to_string()).collect(),
            ))
        })
        .collect()
}

/// Every analyzer isthmus implements, in Istio's order. `default` marks those that
/// `istioctl analyze` runs unless told otherwise.
pub fn all() -> Vec<(Box<dyn Analyzer>, bool)> {
    analyzers::all()
}
