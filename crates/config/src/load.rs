//! Loading resources from files, directories and standard input.
//!
//! Multi-document YAML and JSON, `kind: List`, recursive directories. A document that cannot be
//! read is reported with file, document index, line, column and field path, and the documents
//! beside it still load. Unknown kinds are reported and skipped; unknown fields are warnings, as
//! kubectl's strict decoding reports them.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::resource::{Kind, Origin, Resource, decode_object, split_api_version};

/// Largest input read from one file or from standard input.
pub const MAX_INPUT_BYTES: u64 = 256 << 20;

/// Streams with fewer documents than this per core are parsed on one thread.
const PARALLEL_MIN_DOCUMENTS: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    Error,
    Warning,
}

/// A problem found while loading, located as precisely as the input allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    pub file: String,
    /// 1-based document index within the file (0 when the whole file is concerned).
    pub document: usize,
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// `Kind namespace/name` of the resource, when known.
    pub resource: Option<String>,
    /// Field path such as `spec.http[0].timeout`.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.severity {
            Severity::Error => "error: ",
            Severity::Warning => "warning: ",
        })?;
        f.write_str(&self.file)?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
            if let Some(c) = self.column {
                write!(f, ":{c}")?;
            }
        }
        if self.document > 0 {
            write!(f, ": document {}", self.document)?;
        }
        if let Some(r) = &self.resource {
            write!(f, " ({r})")?;
        }
        if let Some(p) = &self.field {
            write!(f, ": field {p}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// What a load produced: every resource that could be read, and every problem.
#[derive(Debug, Default)]
pub struct Loaded {
    pub resources: Vec<Resource>,
    pub diagnostics: Vec<Diagnostic>,
}

impl Loaded {
    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Error)
    }
    pub fn has_errors(&self) -> bool {
        self.errors().next().is_some()
    }
    fn extend(&mut self, other: Loaded) {
        self.resources.extend(other.resources);
        self.diagnostics.extend(other.diagnostics);
    }
}

/// Loading options.
#[derive(Debug, Clone, Default)]
pub struct Loader {
    /// Namespace given to namespaced resources that name none (`kubectl apply` uses the
    /// context's namespace, usually `default`). `None` leaves them without one.
    pub default_namespace: Option<String>,
}

impl Loader {
    /// Loads every path: a file, a directory (recursively: `.yaml`, `.yml`, `.json`), or `-`
    /// for standard input.
    pub fn load_paths<P: AsRef<Path>>(&self, paths: &[P]) -> Loaded {
        let mut out = Loaded::default();
        for p in paths {
            let p = p.as_ref();
            if p == Path::new("-") {
                let mut text = String::new();
                let res = std::io::stdin()
                    .take(MAX_INPUT_BYTES + 1)
                    .read_to_string(&mut text);
                match res {
                    Ok(n) if n as u64 > MAX_INPUT_BYTES => out.diagnostics.push(file_error(
                        "-",
                        format!("input larger than {MAX_INPUT_BYTES} bytes"),
                    )),
                    Ok(_) => out.extend(self.load_str("-", &text)),
                    Err(e) => out.diagnostics.push(file_error("-", e.to_string())),
                }
                continue;
            }
            match collect_files(p) {
                Ok(files) => {
                    for f in files {
                        out.extend(self.load_file(&f));
                    }
                }
                Err(e) => out
                    .diagnostics
                    .push(file_error(&p.display().to_string(), e)),
            }
        }
        out
    }

    pub fn load_file(&self, path: &Path) -> Loaded {
        let name = path.display().to_string();
        match read_bounded(path) {
            Ok(text) => self.load_str(&name, &text),
            Err(e) => Loaded {
                resources: vec![],
                diagnostics: vec![file_error(&name, e)],
            },
        }
    }

    /// Loads a YAML or JSON stream; `name` is used in origins and diagnostics.
    pub fn load_str(&self, name: &str, text: &str) -> Loaded {
        let docs = split_documents(text);
        // YAML parsing dominates loading; large streams are parsed on every core, in order.
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let chunk = docs.len().div_ceil(threads).max(PARALLEL_MIN_DOCUMENTS);
        let parts: Vec<Loaded> = std::thread::scope(|scope| {
            let handles: Vec<_> = docs
                .chunks(chunk)
                .map(|docs| {
                    scope.spawn(move || {
                        let mut out = Loaded::default();
                        for doc in docs {
                            self.load_document(name, doc, &mut out);
                        }
                        out
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
        let mut out = Loaded::default();
        for part in parts {
            out.resources.extend(part.resources);
            out.diagnostics.extend(part.diagnostics);
        }
        out
    }

    fn load_document(&self, file: &str, doc: &Document<'_>, out: &mut Loaded) {
        let diag = |severity, line: Option<usize>, column, resource, field, message| Diagnostic {
            severity,
            file: file.to_string(),
            document: doc.index,
            line,
            column,
            resource,
            field,
            message,
        };
        // Like kubectl, YAML becomes a JSON value first and objects decode from that: one parse
        // per document, and the same typing rules as the API server (a plain `1.10` is a number).
        let value: Value = match serde_saphyr::from_str_with_options(doc.text, options()) {
            Ok(Some(v)) => v,
            Ok(None) => return, // an empty or null document
            Err(e) => {
                let (line, col) = doc.locate(&e);
                out.diagnostics.push(diag(
                    Severity::Error,
                    line,
                    col,
                    None,
                    None,
                    format!("invalid YAML: {}", error_text(&e)),
                ));
                return;
            }
        };
        if value.is_null() {
            return;
        }
        let header = match Header::deserialize(&value) {
            Ok(h) => h,
            Err(e) => {
                out.diagnostics.push(diag(
                    Severity::Error,
                    Some(doc.first_line),
                    None,
                    None,
                    None,
                    format!("not a Kubernetes object: {e}"),
                ));
                return;
            }
        };
        let origin = Origin {
            file: file.to_string(),
            document: doc.index,
            line: doc.first_line,
        };
        if header.kind.ends_with("List")
            && let Some(Value::Array(items)) = value.get("items")
        {
            self.load_list(file, doc, &origin, items, out);
            return;
        }
        match self.decode(&header, &origin, &value) {
            Ok((resource, warnings)) => {
                let label = resource_label(&resource);
                for (path, msg) in warnings {
                    out.diagnostics.push(diag(
                        Severity::Warning,
                        Some(doc.line_of_key(&path)),
                        None,
                        Some(label.clone()),
                        Some(path),
                        msg,
                    ));
                }
                out.resources.push(resource);
            }
            Err(e) => {
                let (line, column) = match (&e.field, header.known_kind()) {
                    (Some(field), Some(kind)) => doc
                        .locate_decode_error(kind)
                        .unwrap_or((Some(doc.line_of_key(field)), None)),
                    _ => (Some(doc.first_line), None),
                };
                out.diagnostics.push(diag(
                    e.severity,
                    line,
                    column,
                    (!header.kind.is_empty()).then(|| header.label()),
                    e.field,
                    e.message,
                ))
            }
        }
    }

    fn load_list(
        &self,
        file: &str,
        doc: &Document<'_>,
        origin: &Origin,
        items: &[Value],
        out: &mut Loaded,
    ) {
        for (i, item) in items.iter().enumerate() {
            let prefix = format!("items[{i}]");
            let header = Header::deserialize(item).unwrap_or_default();
            let d = |severity, resource, field: Option<String>, message| Diagnostic {
                severity,
                file: file.to_string(),
                document: doc.index,
                line: Some(doc.first_line),
                column: None,
                resource,
                field: Some(match field {
                    Some(f) => format!("{prefix}.{f}"),
                    None => prefix.clone(),
                }),
                message,
            };
            match self.decode(&header, origin, item) {
                Ok((resource, warnings)) => {
                    let label = resource_label(&resource);
                    for (path, msg) in warnings {
                        out.diagnostics.push(d(
                            Severity::Warning,
                            Some(label.clone()),
                            Some(path),
                            msg,
                        ));
                    }
                    out.resources.push(resource);
                }
                Err(e) => {
                    out.diagnostics
                        .push(d(e.severity, Some(header.label()), e.field, e.message))
                }
            }
        }
    }

    /// Decodes one object whose header has been read.
    fn decode(
        &self,
        header: &Header,
        origin: &Origin,
        value: &Value,
    ) -> Result<(Resource, Vec<(String, String)>), DecodeError> {
        if header.kind.is_empty() {
            return Err(DecodeError::error(None, "missing field `kind`".into()));
        }
        if header.api_version.is_empty() {
            return Err(DecodeError::error(
                None,
                "missing field `apiVersion`".into(),
            ));
        }
        let version = split_api_version(&header.api_version).1;
        let Some(kind) = header.known_kind() else {
            return Err(DecodeError {
                severity: Severity::Warning,
                field: None,
                message: format!(
                    "unknown kind {:?} in {:?}: skipped",
                    header.kind, header.api_version
                ),
            });
        };
        if !kind.versions().contains(&version) {
            return Err(DecodeError::error(
                Some("apiVersion".into()),
                format!(
                    "{} is not served in version {version:?} (served: {})",
                    kind.name(),
                    kind.versions().join(", ")
                ),
            ));
        }
        let mut unknown: Vec<String> = Vec::new();
        let mut track = serde_path_to_error::Track::new();
        let decoded = {
            let de = serde_path_to_error::Deserializer::new(value, &mut track);
            let mut on_unknown = |p: serde_ignored::Path<'_>| unknown.push(p.to_string());
            let de = serde_ignored::Deserializer::new(de, &mut on_unknown);
            decode_object(kind, de).map_err(|e| {
                DecodeError::error(field_path(&track.path().to_string()), e.to_string())
            })
        };
        let mut object = decoded?;
        if kind.namespaced() {
            let meta = object.metadata_mut();
            if meta.namespace.as_deref().unwrap_or("").is_empty() {
                meta.namespace = self.default_namespace.clone();
            }
        }
        let warnings = unknown
            .into_iter()
            .map(|p| (ignored_path(&p), "unknown field (ignored)".to_string()))
            .collect();
        Ok((
            Resource {
                origin: origin.clone(),
                api_version: header.api_version.clone(),
                object,
            },
            warnings,
        ))
    }
}

struct DecodeError {
    severity: Severity,
    field: Option<String>,
    message: String,
}

impl DecodeError {
    fn error(field: Option<String>, message: String) -> Self {
        DecodeError {
            severity: Severity::Error,
            field,
            message,
        }
    }
}

/// The fields every object has, read before its kind is known.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct Header {
    api_version: String,
    kind: String,
    metadata: HeaderMeta,
}

/// Lenient: a malformed name is reported by the typed decode, with its field path.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct HeaderMeta {
    name: Value,
    namespace: Value,
}

impl Header {
    fn known_kind(&self) -> Option<Kind> {
        Kind::lookup(split_api_version(&self.api_version).0, &self.kind)
    }

    fn label(&self) -> String {
        let name = self.metadata.name.as_str().unwrap_or("<unnamed>");
        match self.metadata.namespace.as_str() {
            Some(ns) if !ns.is_empty() => format!("{} {ns}/{name}", self.kind),
            _ => format!("{} {name}", self.kind),
        }
    }
}

fn resource_label(r: &Resource) -> String {
    if r.namespace().is_empty() {
        format!("{} {}", r.kind(), r.name())
    } else {
        format!("{} {}/{}", r.kind(), r.namespace(), r.name())
    }
}

fn options() -> serde_saphyr::Options {
    serde_saphyr::options! { with_snippet: false }
}

/// serde-saphyr's message without its own location suffix (we report locations ourselves).
fn error_text(e: &serde_saphyr::Error) -> String {
    let s = e.to_string();
    let s = match s.find(" at line ") {
        Some(i) => &s[..i],
        None => &s,
    };
    s.trim().to_string()
}

/// serde_ignored writes `spec.?.x.0.y` (`?` for an `Option`); we write `spec.x[0].y`.
fn ignored_path(p: &str) -> String {
    let mut out = String::new();
    for seg in p.split('.').filter(|s| !s.is_empty() && *s != "?") {
        if seg.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{seg}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(seg);
        }
    }
    out
}

/// `.` (the root) means "no particular field".
fn field_path(p: &str) -> Option<String> {
    (!p.is_empty() && p != ".").then(|| p.to_string())
}

fn file_error(file: &str, message: impl fmt::Display) -> Diagnostic {
    Diagnostic {
        severity: Severity::Error,
        file: file.to_string(),
        document: 0,
        line: None,
        column: None,
        resource: None,
        field: None,
        message: message.to_string(),
    }
}

fn read_bounded(path: &Path) -> Result<String, String> {
    let f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut text = String::new();
    let n = f
        .take(MAX_INPUT_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    if n as u64 > MAX_INPUT_BYTES {
        return Err(format!("file larger than {MAX_INPUT_BYTES} bytes"));
    }
    Ok(text)
}

/// The files below `p` that hold resources, sorted so loads are deterministic.
pub fn collect_files(p: &Path) -> Result<Vec<PathBuf>, String> {
    let meta = std::fs::metadata(p).map_err(|e| e.to_string())?;
    if meta.is_file() {
        return Ok(vec![p.to_path_buf()]);
    }
    let mut out = Vec::new();
    let mut stack = vec![p.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let rd = std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for entry in rd.flatten() {
            let path = entry.path();
            let hidden = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'));
            if hidden {
                continue;
            }
            let Ok(ft) = entry.file_type() else { continue };
            if ft.is_dir() {
                stack.push(path);
            } else if is_manifest(&path) {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Whether a file holds resources, by its extension.
pub fn is_manifest(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

/// One document of a YAML stream.
#[derive(Debug)]
struct Document<'a> {
    index: usize,
    /// 1-based line of the document's first line in the file.
    first_line: usize,
    text: &'a str,
}

impl Document<'_> {
    /// Best-effort line of the last key of `path` (for unknown-field warnings, which serde
    /// reports without a position): the first line that declares that key.
    fn line_of_key(&self, path: &str) -> usize {
        let key = path.rsplit('.').next().unwrap_or(path);
        let key = key.split('[').next().unwrap_or(key);
        let found = self.text.lines().position(|l| {
            let t = l.trim_start().trim_start_matches("- ");
            t.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with(':'))
        });
        self.first_line + found.unwrap_or(0)
    }

    /// Where decoding `kind` from this document's YAML fails, when the YAML decoder (which knows
    /// positions) fails too.
    fn locate_decode_error(&self, kind: Kind) -> Option<(Option<usize>, Option<usize>)> {
        serde_saphyr::with_deserializer_from_str_with_options(self.text, options(), |de| {
            decode_object(kind, de)
        })
        .err()
        .map(|e| self.locate(&e))
    }

    /// The absolute line and column of a parse error.
    fn locate(&self, e: &serde_saphyr::Error) -> (Option<usize>, Option<usize>) {
        match e.location() {
            Some(l) if l.line() > 0 => (
                Some(self.first_line + l.line() as usize - 1),
                Some(l.column() as usize),
            ),
            _ => (None, None),
        }
    }
}

/// Splits a stream at `---` lines. A `---` at column 0 always starts a new document in YAML,
/// even inside a block scalar, so a textual split is exact. The marker line itself is kept blank
/// in the new document so that line numbers inside it stay those of the file.
fn split_documents(text: &str) -> Vec<Document<'_>> {
    let mut docs = Vec::new();
    let mut start = 0usize;
    let mut start_line = 1usize;
    let mut offset = 0usize;
    for (line_no, line) in (1usize..).zip(text.split_inclusive('\n')) {
        let is_marker =
            line.starts_with("---") && line[3..].chars().next().is_none_or(|c| c.is_whitespace());
        let is_end =
            line.starts_with("...") && line[3..].chars().next().is_none_or(|c| c.is_whitespace());
        if is_marker || is_end {
            push_doc(&mut docs, &text[start..offset], start_line);
            // Content after `--- ` on the marker line belongs to the new document.
            start = if is_marker {
                offset + 3
            } else {
                offset + line.len()
            };
            start_line = if is_marker { line_no } else { line_no + 1 };
        }
        offset += line.len();
    }
    push_doc(&mut docs, &text[start..], start_line);
    for (i, d) in docs.iter_mut().enumerate() {
        d.index = i + 1;
    }
    docs
}

fn push_doc<'a>(docs: &mut Vec<Document<'a>>, text: &'a str, first_line: usize) {
    let blank = text
        .lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'));
    // Leading directives (`%YAML`) and comments alone are no document.
    if blank {
        return;
    }
    docs.push(Document {
        index: 0,
        first_line,
        text,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_documents_keeping_line_numbers() {
        let docs = split_documents("a: 1\n---\nb: 2\n--- \n# only a comment\n---\nc: 3\n");
        let v: Vec<_> = docs.iter().map(|d| (d.index, d.first_line)).collect();
        assert_eq!(v, vec![(1, 1), (2, 2), (3, 6)]);
        assert_eq!(docs[1].text.trim(), "b: 2");
    }

    #[test]
    fn dashes_inside_a_value_do_not_split() {
        let docs = split_documents("a: |\n  ---x\nb: ---\n");
        assert_eq!(docs.len(), 1);
    }
}
