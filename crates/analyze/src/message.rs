//! Istio's analysis message catalogue (codes, names, levels, templates) and formatted messages.

use std::fmt;
use std::sync::OnceLock;

use isthmus_config::Origin;
use serde::Deserialize;

/// Message severity, ordered from least to most severe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
pub enum Level {
    Info,
    Warning,
    Error,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Info => "Info",
            Level::Warning => "Warning",
            Level::Error => "Error",
        }
    }
    /// Parses a level as the CLI accepts it (`Info`, `warning`, `ERROR`).
    pub fn parse(s: &str) -> Option<Level> {
        match s.to_ascii_lowercase().as_str() {
            "info" => Some(Level::Info),
            "warning" | "warn" => Some(Level::Warning),
            "error" => Some(Level::Error),
            _ => None,
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One entry of the catalogue.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct MessageType {
    pub name: String,
    pub code: String,
    pub level: Level,
    #[serde(default)]
    pub description: String,
    pub template: String,
}

#[derive(Deserialize)]
struct Catalogue {
    messages: Vec<MessageType>,
}

/// The catalogue, parsed once from Istio's `messages.yaml`.
pub fn catalogue() -> &'static [MessageType] {
    static CAT: OnceLock<Vec<MessageType>> = OnceLock::new();
    CAT.get_or_init(|| {
        // The file is compiled in; a parse failure is a build defect caught by the unit test.
        serde_saphyr::from_str::<Catalogue>(include_str!("../data/messages.yaml"))
            .map(|c| c.messages)
            .unwrap_or_default()
    })
}

/// Looks a message type up by its name (`ReferencedResourceNotFound`).
pub fn message_type(name: &str) -> &'static MessageType {
    static UNKNOWN: OnceLock<MessageType> = OnceLock::new();
    catalogue()
        .iter()
        .find(|m| m.name == name)
        .unwrap_or_else(|| {
            UNKNOWN.get_or_init(|| MessageType {
                name: "InternalError".into(),
                code: "IST0001".into(),
                level: Level::Error,
                description: String::new(),
                template: "Internal error: %v".into(),
            })
        })
}

/// A template argument, formatted the way Go's `fmt` formats the value Istio passes.
#[derive(Debug, Clone, PartialEq)]
pub enum Arg {
    Str(String),
    Int(i64),
    /// A Go `[]string`, printed `[a b c]`.
    StrList(Vec<String>),
    IntList(Vec<i64>),
}

impl From<&str> for Arg {
    fn from(s: &str) -> Arg {
        Arg::Str(s.to_string())
    }
}
impl From<String> for Arg {
    fn from(s: String) -> Arg {
        Arg::Str(s)
    }
}
impl From<&String> for Arg {
    fn from(s: &String) -> Arg {
        Arg::Str(s.clone())
    }
}
impl From<i64> for Arg {
    fn from(n: i64) -> Arg {
        Arg::Int(n)
    }
}
impl From<u32> for Arg {
    fn from(n: u32) -> Arg {
        Arg::Int(n.into())
    }
}
impl From<usize> for Arg {
    fn from(n: usize) -> Arg {
        Arg::Int(n as i64)
    }
}
impl From<Vec<String>> for Arg {
    fn from(v: Vec<String>) -> Arg {
        Arg::StrList(v)
    }
}
impl From<Vec<i64>> for Arg {
    fn from(v: Vec<i64>) -> Arg {
        Arg::IntList(v)
    }
}

impl Arg {
    fn plain(&self) -> String {
        match self {
            Arg::Str(s) => s.clone(),
            Arg::Int(n) => n.to_string(),
            Arg::StrList(v) => format!("[{}]", v.join(" ")),
            Arg::IntList(v) => format!(
                "[{}]",
                v.iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        }
    }
    fn quoted(&self) -> String {
        match self {
            Arg::Str(s) => format!("{s:?}"),
            Arg::StrList(v) => format!(
                "[{}]",
                v.iter()
                    .map(|s| format!("{s:?}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
            other => other.plain(),
        }
    }
}

/// Renders a Go format template (`%s`, `%v`, `%d`, `%q`, `%%`) with arguments.
pub fn render(template: &str, args: &[Arg]) -> String {
    let mut out = String::with_capacity(template.len() + 32);
    let mut args = args.iter();
    let mut chars = template.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('%') => out.push('%'),
            Some(verb @ ('s' | 'v' | 'd' | 'q')) => match args.next() {
                Some(a) if verb == 'q' => out.push_str(&a.quoted()),
                Some(a) => out.push_str(&a.plain()),
                None => out.push_str(&format!("%!{verb}(MISSING)")),
            },
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// The resource a message is about: `Kind namespace/name`, and where it was read.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceRef {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub origin: Origin,
}

impl ResourceRef {
    /// Istio's friendly name: `Kind namespace/name`, or `Kind name` without a namespace.
    pub fn friendly_name(&self) -> String {
        if self.namespace.is_empty() {
            format!("{} {}", self.kind, self.name)
        } else {
            format!("{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
    /// `file:line`, when the resource came from a file.
    pub fn reference(&self) -> Option<String> {
        (!self.origin.file.is_empty()).then(|| format!("{}:{}", self.origin.file, self.origin.line))
    }
}

/// One analysis finding.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub message_type: &'static MessageType,
    pub resource: Option<ResourceRef>,
    pub args: Vec<Arg>,
}

impl Message {
    pub fn new(name: &str, resource: Option<ResourceRef>, args: Vec<Arg>) -> Message {
        Message {
            message_type: message_type(name),
            resource,
            args,
        }
    }
    pub fn code(&self) -> &str {
        &self.message_type.code
    }
    pub fn level(&self) -> Level {
        self.message_type.level
    }
    /// The rendered template.
    pub fn text(&self) -> String {
        render(&self.message_type.template, &self.args)
    }
    pub fn origin(&self) -> String {
        self.resource
            .as_ref()
            .map(ResourceRef::friendly_name)
            .unwrap_or_default()
    }
    /// Istio's documentation page for the code.
    pub fn documentation_url(&self) -> String {
        format!(
            "https://istio.io/latest/docs/reference/config/analysis/{}/?ref=isthmus",
            self.code().to_ascii_lowercase()
        )
    }
}

/// `Error [IST0101] (VirtualService default/reviews vs.yaml:3) Referenced host not found: "x"`.
impl fmt::Display for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} [{}]", self.level(), self.code())?;
        if let Some(r) = &self.resource {
            match r.reference() {
                Some(loc) => write!(f, " ({} {loc})", r.friendly_name())?,
                None => write!(f, " ({})", r.friendly_name())?,
            }
        }
        write!(f, " {}", self.text())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalogue_parses_every_message() {
        let cat = catalogue();
        assert!(cat.len() > 60, "{} messages", cat.len());
        let m = message_type("ReferencedResourceNotFound");
        assert_eq!(m.code, "IST0101");
        assert_eq!(m.level, Level::Error);
        assert_eq!(message_type("LocalhostListener").code, "IST0143");
    }

    #[test]
    fn go_verbs() {
        assert_eq!(
            render(
                "Referenced %s not found: %q",
                &["host".into(), "reviews2".into()]
            ),
            "Referenced host not found: \"reviews2\""
        );
        assert_eq!(
            render(
                "ports %v and %d%%",
                &[Arg::IntList(vec![80, 443]), 5i64.into()]
            ),
            "ports [80 443] and 5%"
        );
        assert_eq!(
            render("%v", &[Arg::StrList(vec!["a".into(), "b".into()])]),
            "[a b]"
        );
    }
}
