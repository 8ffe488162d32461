//! The config source of the embedded default: a directory of YAML, reloaded on change. A file
//! that does not load or validate is rejected with its error while the last good version of that
//! file keeps being served; the files beside it are not affected.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use isthmus_config::load::collect_files;
use isthmus_config::validate::validate;
use isthmus_config::{Diagnostic, Loader, Severity, Snapshot};

/// A file's problem, as reported to the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub file: PathBuf,
    pub errors: Vec<String>,
}

/// The directory and the last good resources of each file in it.
pub struct DirSource {
    dir: PathBuf,
    loader: Loader,
    good: BTreeMap<PathBuf, Arc<Snapshot>>,
    /// Per file: what it was when last read (modification time and size) and what that gave, so
    /// a change re-reads only the files that changed.
    seen: BTreeMap<PathBuf, (Stamp, FileRead)>,
}

type Stamp = Option<(std::time::SystemTime, u64)>;

/// A file's resources, or every error found in it. Snapshots share the resources (`Arc`), so
/// the files' last good resources and the snapshot being served are one copy.
type FileRead = Result<Arc<Snapshot>, Vec<String>>;

fn stamp(file: &Path) -> Stamp {
    let md = std::fs::metadata(file).ok()?;
    Some((md.modified().ok()?, md.len()))
}

impl DirSource {
    pub fn new(dir: &Path) -> Self {
        DirSource {
            dir: dir.to_path_buf(),
            loader: Loader::default(),
            good: BTreeMap::new(),
            seen: BTreeMap::new(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads the directory again. Returns the snapshot to serve and the files rejected this time.
    pub fn reload(&mut self) -> (Snapshot, Vec<Rejected>) {
        // A directory that cannot be read (yet) serves nothing rather than failing.
        let files = collect_files(&self.dir).unwrap_or_default();
        let mut rejected = Vec::new();
        let mut next = BTreeMap::new();
        let mut seen = BTreeMap::new();
        for file in files {
            let now = stamp(&file);
            let read = match self.seen.remove(&file) {
                Some((was, read)) if now.is_some() && was == now => read,
                _ => self.read(&file),
            };
            match &read {
                Ok(resources) => {
                    next.insert(file.clone(), resources.clone());
                }
                Err(errors) => {
                    if let Some(last) = self.good.get(&file) {
                        next.insert(file.clone(), last.clone());
                    }
                    rejected.push(Rejected {
                        file: file.clone(),
                        errors: errors.clone(),
                    });
                }
            }
            seen.insert(file, (now, read));
        }
        self.seen = seen;
        self.good = next;
        let mut snapshot = Snapshot::default();
        for file in self.good.values() {
            snapshot.extend_shared(file);
        }
        (snapshot, rejected)
    }

    /// Loads and validates one file: its resources, or every error found in it.
    fn read(&self, file: &Path) -> FileRead {
        let loaded = self.loader.load_paths(&[file.to_path_buf()]);
        let mut errors: Vec<String> = loaded
            .diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Error)
            .map(Diagnostic::to_string)
            .collect();
        for r in &loaded.resources {
            for e in validate(&r.object).errors {
                errors.push(format!(
                    "error: {}:{}: {} {}/{}: {e}",
                    r.origin.file,
                    r.origin.line,
                    r.kind().name(),
                    r.namespace(),
                    r.name()
                ));
            }
        }
        if errors.is_empty() {
            Ok(Arc::new(loaded.resources.into_iter().collect()))
        } else {
            Err(errors)
        }
    }
}
