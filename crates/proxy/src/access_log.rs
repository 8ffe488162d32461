//! Access logs: Envoy's file access logger with its format strings (`%START_TIME%`,
//! `%REQ(:METHOD)%`, `%RESPONSE_FLAGS%`, …) in text or JSON, as Istio configures it from
//! MeshConfig `accessLogFile`/`accessLogEncoding` and Telemetry `accessLogging`, and Envoy's
//! filters of what is logged (status code, duration, and/or).

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::SystemTime;

use envoy_types::pb::envoy::config::accesslog::v3::{
    AccessLog as PbAccessLog, AccessLogFilter, ComparisonFilter, access_log, access_log_filter,
    comparison_filter,
};
use envoy_types::pb::envoy::config::core::v3::{data_source, substitution_format_string};
use envoy_types::pb::envoy::extensions::access_loggers::file::v3::{
    FileAccessLog, file_access_log,
};
use envoy_types::pb::google::protobuf::value;
use prost::Message;

/// Envoy's default format, used when the configuration gives none.
const DEFAULT_FORMAT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\"\n";

#[derive(Debug, Clone)]
enum Token {
    Text(String),
    /// An operator with its optional argument: `REQ`, `X-REQUEST-ID`.
    Op(String, Option<String>),
}

#[derive(Debug)]
enum Format {
    Text(Vec<Token>),
    Json(Vec<(String, Vec<Token>)>),
}

/// One request or connection, as a log line can describe it.
#[derive(Debug, Clone, Default)]
pub struct Entry {
    pub start: Option<SystemTime>,
    pub method: String,
    pub path: String,
    pub protocol: String,
    pub authority: String,
    pub user_agent: String,
    pub request_id: String,
    pub forwarded_for: String,
    pub status: u16,
    pub flags: String,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub duration_ms: u64,
    pub upstream_host: String,
    pub upstream_cluster: String,
    pub downstream_local: Option<SocketAddr>,
    pub downstream_remote: Option<SocketAddr>,
    pub server_name: String,
    pub route_name: String,
    /// `x-envoy-upstream-service-time` of the response, when the router set it.
    pub upstream_service_time: Option<u64>,
}

pub struct AccessLog {
    format: Format,
    filter: Option<Filter>,
    out: Mutex<Box<dyn Write + Send>>,
}

/// Which requests are logged.
#[derive(Debug)]
enum Filter {
    Status(comparison_filter::Op, u32),
    /// Milliseconds.
    Duration(comparison_filter::Op, u32),
    All(Vec<Filter>),
    Any(Vec<Filter>),
    /// Not a health check: every request here (the proxy answers no health checks inline).
    NotHealthCheck,
}

impl Filter {
    fn compile(f: &AccessLogFilter) -> Result<Filter, String> {
        use access_log_filter::FilterSpecifier as F;
        let cmp = |c: Option<&ComparisonFilter>| -> Result<(comparison_filter::Op, u32), String> {
            let c = c.ok_or("access log filter: comparison missing")?;
            let op = comparison_filter::Op::try_from(c.op)
                .map_err(|_| format!("access log filter: comparison op {} is unknown", c.op))?;
            Ok((op, c.value.as_ref().map_or(0, |v| v.default_value)))
        };
        let list = |fs: &[AccessLogFilter]| -> Result<Vec<Filter>, String> {
            fs.iter().map(Filter::compile).collect()
        };
        Ok(match &f.filter_specifier {
            Some(F::StatusCodeFilter(s)) => {
                let (op, v) = cmp(s.comparison.as_ref())?;
                Filter::Status(op, v)
            }
            Some(F::DurationFilter(d)) => {
                let (op, v) = cmp(d.comparison.as_ref())?;
                Filter::Duration(op, v)
            }
            Some(F::AndFilter(a)) => Filter::All(list(&a.filters)?),
            Some(F::OrFilter(o)) => Filter::Any(list(&o.filters)?),
            Some(F::NotHealthCheckFilter(_)) => Filter::NotHealthCheck,
            Some(other) => {
                let kind = match other {
                    F::TraceableFilter(_) => "TraceableFilter",
                    F::RuntimeFilter(_) => "RuntimeFilter",
                    F::HeaderFilter(_) => "HeaderFilter",
                    F::ResponseFlagFilter(_) => "ResponseFlagFilter",
                    F::GrpcStatusFilter(_) => "GrpcStatusFilter",
                    F::ExtensionFilter(e) => e.name.as_str(),
                    F::MetadataFilter(_) => "MetadataFilter",
                    F::LogTypeFilter(_) => "LogTypeFilter",
                    _ => "filter",
                };
                return Err(format!("access log filter {kind} is not supported"));
            }
            None => return Err("access log filter has no filter".into()),
        })
    }

    fn matches(&self, e: &Entry) -> bool {
        use comparison_filter::Op;
        let compare = |op: &Op, have: u64, want: u32| {
            let want = u64::from(want);
            match op {
                Op::Eq => have == want,
                Op::Ge => have >= want,
                Op::Le => have <= want,
                Op::Ne => have != want,
            }
        };
        match self {
            Filter::Status(op, v) => compare(op, u64::from(e.status), *v),
            Filter::Duration(op, v) => compare(op, e.duration_ms, *v),
            Filter::All(fs) => fs.iter().all(|f| f.matches(e)),
            Filter::Any(fs) => fs.iter().any(|f| f.matches(e)),
            Filter::NotHealthCheck => true,
        }
    }
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("format", &self.format)
            .finish()
    }
}

fn parse(format: &str) -> Vec<Token> {
    let mut out = Vec::new();
    let mut rest = format;
    while let Some(i) = rest.find('%') {
        let after = &rest[i + 1..];
        let Some(end) = after.find('%') else { break };
        let op = &after[..end];
        let valid = !op.is_empty()
            && op
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_():?-".contains(c));
        if !valid {
            out.push(Token::Text(rest[..i + 1].to_string()));
            rest = after;
            continue;
        }
        if i > 0 {
            out.push(Token::Text(rest[..i].to_string()));
        }
        match op.split_once('(') {
            Some((name, arg)) => out.push(Token::Op(
                name.to_string(),
                Some(arg.trim_end_matches(')').to_string()),
            )),
            None => out.push(Token::Op(op.to_string(), None)),
        }
        rest = &after[end + 1..];
    }
    if !rest.is_empty() {
        out.push(Token::Text(rest.to_string()));
    }
    out
}

impl AccessLog {
    /// The file logger of an Envoy `AccessLog`; other loggers are not supported. The
    /// deprecated format fields are what older control planes send.
    #[allow(deprecated)]
    pub fn compile(a: &PbAccessLog) -> Result<AccessLog, String> {
        let any = match &a.config_type {
            Some(access_log::ConfigType::TypedConfig(any)) => any,
            None => return Err(format!("access log {:?} has no config", a.name)),
        };
        if !any.type_url.ends_with(".FileAccessLog") {
            return Err(format!("access logger {} is not supported", any.type_url));
        }
        let f =
            FileAccessLog::decode(any.value.as_slice()).map_err(|e| format!("access log: {e}"))?;
        let format = match f.access_log_format {
            None => Format::Text(parse(DEFAULT_FORMAT)),
            Some(file_access_log::AccessLogFormat::Format(s)) => Format::Text(parse(&s)),
            Some(file_access_log::AccessLogFormat::LogFormat(sfs)) => match sfs.format {
                Some(substitution_format_string::Format::TextFormat(s)) => Format::Text(parse(&s)),
                Some(substitution_format_string::Format::TextFormatSource(ds)) => {
                    match ds.specifier {
                        Some(data_source::Specifier::InlineString(s)) => Format::Text(parse(&s)),
                        _ => return Err("access log formats from files are not supported".into()),
                    }
                }
                Some(substitution_format_string::Format::JsonFormat(st)) => {
                    let mut fields: Vec<(String, Vec<Token>)> = st
                        .fields
                        .iter()
                        .filter_map(|(k, v)| match &v.kind {
                            Some(value::Kind::StringValue(s)) => Some((k.clone(), parse(s))),
                            _ => None,
                        })
                        .collect();
                    fields.sort_by(|a, b| a.0.cmp(&b.0));
                    Format::Json(fields)
                }
                _ => Format::Text(parse(DEFAULT_FORMAT)),
            },
            Some(_) => return Err("access log format is not supported".into()),
        };
        let out: Box<dyn Write + Send> = match f.path.as_str() {
            "/dev/stdout" => Box::new(std::io::stdout()),
            "/dev/stderr" => Box::new(std::io::stderr()),
            path => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| format!("access log {path}: {e}"))?,
            ),
        };
        Ok(AccessLog {
            format,
            filter: a.filter.as_ref().map(Filter::compile).transpose()?,
            out: Mutex::new(out),
        })
    }

    fn value(op: &str, arg: Option<&str>, e: &Entry) -> Option<String> {
        let s = |v: &str| (!v.is_empty()).then(|| v.to_string());
        let addr = |a: Option<SocketAddr>| a.map(|a| a.to_string());
        match op {
            "START_TIME" => e.start.map(crate::admin::rfc3339),
            "PROTOCOL" => s(&e.protocol),
            "RESPONSE_CODE" => Some(e.status.to_string()),
            "RESPONSE_FLAGS" => s(&e.flags),
            "BYTES_RECEIVED" => Some(e.bytes_received.to_string()),
            "BYTES_SENT" => Some(e.bytes_sent.to_string()),
            "DURATION" => Some(e.duration_ms.to_string()),
            "UPSTREAM_HOST" => s(&e.upstream_host),
            "UPSTREAM_CLUSTER" => s(&e.upstream_cluster),
            "DOWNSTREAM_LOCAL_ADDRESS" => addr(e.downstream_local),
            "DOWNSTREAM_REMOTE_ADDRESS" => addr(e.downstream_remote),
            "REQUESTED_SERVER_NAME" => s(&e.server_name),
            "ROUTE_NAME" => s(&e.route_name),
            "REQ" => {
                let arg = arg?.to_ascii_lowercase();
                // `A?B`: A, else B.
                arg.split('?').find_map(|h| match h {
                    ":method" => s(&e.method),
                    ":path" => s(&e.path),
                    ":authority" | "host" => s(&e.authority),
                    "user-agent" => s(&e.user_agent),
                    "x-request-id" => s(&e.request_id),
                    "x-forwarded-for" => s(&e.forwarded_for),
                    _ => None,
                })
            }
            "RESP" => match arg?.to_ascii_lowercase().as_str() {
                "x-envoy-upstream-service-time" => e.upstream_service_time.map(|t| t.to_string()),
                _ => None,
            },
            _ => None,
        }
    }

    fn render(tokens: &[Token], e: &Entry) -> String {
        tokens
            .iter()
            .map(|t| match t {
                Token::Text(s) => s.clone(),
                Token::Op(op, arg) => {
                    Self::value(op, arg.as_deref(), e).unwrap_or_else(|| "-".to_string())
                }
            })
            .collect()
    }

    pub fn write(&self, e: &Entry) {
        if self.filter.as_ref().is_some_and(|f| !f.matches(e)) {
            return;
        }
        let line = match &self.format {
            Format::Text(t) => Self::render(t, e),
            Format::Json(fields) => {
                let map: serde_json::Map<String, serde_json::Value> = fields
                    .iter()
                    .map(|(k, t)| (k.clone(), serde_json::Value::String(Self::render(t, e))))
                    .collect();
                format!("{}\n", serde_json::Value::Object(map))
            }
        };
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let _ = out.write_all(line.as_bytes());
        let _ = out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_keep_what_their_comparisons_say() {
        use access_log_filter::FilterSpecifier as F;
        use comparison_filter::Op;
        use envoy_types::pb::envoy::config::accesslog::v3::{
            AndFilter, DurationFilter, OrFilter, StatusCodeFilter,
        };
        use envoy_types::pb::envoy::config::core::v3::RuntimeUInt32;
        let cmp = |op: Op, v: u32| {
            Some(ComparisonFilter {
                op: op as i32,
                value: Some(RuntimeUInt32 {
                    default_value: v,
                    ..Default::default()
                }),
            })
        };
        let status = |op, v| AccessLogFilter {
            filter_specifier: Some(F::StatusCodeFilter(StatusCodeFilter {
                comparison: cmp(op, v),
            })),
        };
        // response.code >= 500 || (response.code == 404 && response.duration >= 100ms)
        let slow = AccessLogFilter {
            filter_specifier: Some(F::DurationFilter(DurationFilter {
                comparison: cmp(Op::Ge, 100),
            })),
        };
        let f = Filter::compile(&AccessLogFilter {
            filter_specifier: Some(F::OrFilter(OrFilter {
                filters: vec![
                    status(Op::Ge, 500),
                    AccessLogFilter {
                        filter_specifier: Some(F::AndFilter(AndFilter {
                            filters: vec![status(Op::Eq, 404), slow],
                        })),
                    },
                ],
            })),
        })
        .unwrap();
        let e = |status, duration_ms| Entry {
            status,
            duration_ms,
            ..Default::default()
        };
        assert!(f.matches(&e(503, 1)));
        assert!(f.matches(&e(404, 150)));
        assert!(!f.matches(&e(404, 5)));
        assert!(!f.matches(&e(200, 900)));
        let header = AccessLogFilter {
            filter_specifier: Some(F::HeaderFilter(Default::default())),
        };
        let err = Filter::compile(&header).unwrap_err();
        assert_eq!(err, "access log filter HeaderFilter is not supported");
    }

    #[test]
    fn renders_envoys_default_format() {
        let e = Entry {
            start: Some(SystemTime::UNIX_EPOCH),
            method: "GET".into(),
            path: "/hello".into(),
            protocol: "HTTP/1.1".into(),
            authority: "server:8080".into(),
            status: 200,
            flags: "-".into(),
            bytes_sent: 12,
            duration_ms: 3,
            upstream_host: "10.200.0.11:8080".into(),
            ..Default::default()
        };
        let line = AccessLog::render(&parse(DEFAULT_FORMAT), &e);
        assert_eq!(
            line,
            "[1970-01-01T00:00:00Z] \"GET /hello HTTP/1.1\" 200 - 0 12 3 - \"-\" \"-\" \"-\" \"server:8080\" \"10.200.0.11:8080\"\n"
        );
        let timed = Entry {
            upstream_service_time: Some(2),
            ..e
        };
        let line = AccessLog::render(&parse(DEFAULT_FORMAT), &timed);
        assert!(line.contains(" 200 - 0 12 3 2 \""), "{line}");
    }
}
