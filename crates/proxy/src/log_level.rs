//! Envoy's loggers (`admin`, `config`, `http`, `rbac`, …) over this proxy's `tracing` targets:
//! what `POST /logging` sets, per logger or for all, and lists, as Envoy's admin does and
//! `istioctl proxy-config log --level http:debug,rbac:warning` expects.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

/// Applies a `tracing` filter directive (`warn,isthmus_proxy::http=debug`).
pub type SetFilter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Envoy's logger names and the modules whose events each covers. `main` covers the rest. A
/// module inside another's (`config::rbac` in `config`) follows its own logger: the longer
/// target wins in a `tracing` filter.
const LOGGERS: &[(&str, &[&str])] = &[
    ("admin", &["isthmus_proxy::admin"]),
    (
        "config",
        &[
            "isthmus_proxy::config",
            "isthmus_proxy::agent",
            "isthmus_xds",
        ],
    ),
    (
        "connection",
        &[
            "isthmus_proxy::serve",
            "isthmus_proxy::inspect",
            "isthmus_proxy::idle",
        ],
    ),
    ("filter", &["isthmus_proxy::tcp"]),
    ("http", &["isthmus_proxy::http"]),
    ("jwt", &["isthmus_proxy::config::jwt"]),
    ("main", &[]),
    ("pool", &["isthmus_proxy::pool"]),
    ("rbac", &["isthmus_proxy::config::rbac"]),
    ("secret", &["isthmus_proxy::identity", "isthmus_ca"]),
    ("tracing", &["isthmus_proxy::trace"]),
    ("upstream", &["isthmus_proxy::upstream"]),
];

/// Envoy's level names as `tracing` levels.
fn tracing_level(level: &str) -> Result<&'static str, String> {
    Ok(match level {
        "trace" => "trace",
        "debug" => "debug",
        "info" => "info",
        "warning" | "warn" => "warn",
        "error" | "critical" => "error",
        "off" => "off",
        other => return Err(format!("unknown log level {other:?}")),
    })
}

/// The level of each logger, changed at run time.
pub struct LogLevels {
    /// Per logger, the level as it was given (Envoy's name).
    levels: Mutex<BTreeMap<&'static str, String>>,
    set: SetFilter,
}

impl std::fmt::Debug for LogLevels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogLevels")
            .field("levels", &self.levels)
            .finish_non_exhaustive()
    }
}

/// What `POST /logging` asked for that cannot be done.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LoggingError {
    #[error("{0}")]
    Level(String),
    #[error("unknown logger {0:?}; loggers: {1}")]
    Logger(String, String),
    #[error("{0:?} is not <logger>:<level>")]
    Path(String),
    #[error("could not change the log filter: {0}")]
    Filter(String),
}

impl LogLevels {
    /// Every logger at `initial` (an Envoy level name; else the proxy was started with a
    /// filter of its own, shown as it is until a level is set).
    pub fn new(initial: &str, set: SetFilter) -> LogLevels {
        LogLevels {
            levels: Mutex::new(
                LOGGERS
                    .iter()
                    .map(|(l, _)| (*l, initial.to_string()))
                    .collect(),
            ),
            set,
        }
    }

    /// `POST /logging` with its query: `level=` for every logger, `<logger>=<level>` for one,
    /// `paths=<logger>:<level>,…` for several; none lists the levels. Answers Envoy's list.
    pub fn post(&self, q: &HashMap<String, String>) -> Result<String, LoggingError> {
        let mut levels = self.levels.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = levels.clone();
        for (key, value) in q {
            if key == "level" {
                tracing_level(value).map_err(LoggingError::Level)?;
                for l in next.values_mut() {
                    value.clone_into(l);
                }
            } else if key == "paths" {
                for p in value.split(',').filter(|p| !p.is_empty()) {
                    let (logger, level) = p
                        .split_once(':')
                        .ok_or_else(|| LoggingError::Path(p.into()))?;
                    set_one(&mut next, logger, level)?;
                }
            } else {
                set_one(&mut next, key, value)?;
            }
        }
        if next != *levels {
            (self.set)(&directive(&next)).map_err(LoggingError::Filter)?;
            *levels = next;
        }
        let mut out = "active loggers:\n".to_string();
        for (logger, level) in levels.iter() {
            out.push_str(&format!("  {logger}: {level}\n"));
        }
        Ok(out)
    }
}

fn set_one(
    levels: &mut BTreeMap<&'static str, String>,
    logger: &str,
    level: &str,
) -> Result<(), LoggingError> {
    tracing_level(level).map_err(LoggingError::Level)?;
    let Some(slot) = levels.get_mut(logger) else {
        let names: Vec<&str> = LOGGERS.iter().map(|(l, _)| *l).collect();
        return Err(LoggingError::Logger(logger.into(), names.join(", ")));
    };
    level.clone_into(slot);
    Ok(())
}

/// The filter for these levels: `main`'s for everything, then each other logger's modules
/// where its level differs.
fn directive(levels: &BTreeMap<&'static str, String>) -> String {
    let level = |l: &str| {
        levels
            .get(l)
            .and_then(|v| tracing_level(v).ok())
            .unwrap_or("info")
    };
    let base = level("main");
    let mut out = base.to_string();
    for (logger, targets) in LOGGERS {
        let l = level(logger);
        if l != base {
            for t in *targets {
                out.push_str(&format!(",{t}={l}"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn levels() -> (LogLevels, Arc<Mutex<Vec<String>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let set: SetFilter = Box::new(move |d: &str| {
            s.lock().unwrap().push(d.to_string());
            Ok(())
        });
        (LogLevels::new("info", set), seen)
    }

    fn query(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn one_logger_all_loggers_and_several_set_the_filter_of_their_modules() {
        let (l, seen) = levels();
        let out = l.post(&query(&[("rbac", "debug")])).unwrap();
        assert!(out.starts_with("active loggers:\n  admin: info\n"), "{out}");
        assert!(out.contains("\n  rbac: debug\n"), "{out}");
        assert_eq!(
            seen.lock().unwrap().last().unwrap(),
            "info,isthmus_proxy::config::rbac=debug"
        );
        l.post(&query(&[("paths", "http:trace,main:warning")]))
            .unwrap();
        let d = seen.lock().unwrap().last().unwrap().clone();
        assert!(d.starts_with("warn,"), "{d}");
        assert!(d.contains(",isthmus_proxy::http=trace"), "{d}");
        assert!(d.contains(",isthmus_proxy::admin=info"), "{d}");
        let out = l.post(&query(&[("level", "error")])).unwrap();
        assert!(out.lines().skip(1).all(|x| x.ends_with(": error")), "{out}");
        assert_eq!(seen.lock().unwrap().last().unwrap(), "error");
        // Listing changes nothing.
        let n = seen.lock().unwrap().len();
        l.post(&HashMap::new()).unwrap();
        assert_eq!(seen.lock().unwrap().len(), n);
    }

    #[test]
    fn unknown_loggers_and_levels_change_nothing() {
        let (l, seen) = levels();
        assert!(matches!(
            l.post(&query(&[("router2", "debug")])),
            Err(LoggingError::Logger(..))
        ));
        assert!(matches!(
            l.post(&query(&[("paths", "http:debug,rbac:loud")])),
            Err(LoggingError::Level(_))
        ));
        assert!(matches!(
            l.post(&query(&[("paths", "http")])),
            Err(LoggingError::Path(_))
        ));
        assert!(seen.lock().unwrap().is_empty());
        let out = l.post(&HashMap::new()).unwrap();
        assert!(!out.contains("debug"), "{out}");
    }
}
