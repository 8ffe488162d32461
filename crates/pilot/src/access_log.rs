//! Access logs of a sidecar's listeners, as istiod configures them: Telemetry
//! `accessLogging` (providers, `match.mode`, `disabled`, `filter`) applied from the root
//! namespace to the workload, MeshConfig `defaultProviders.accessLogging` when no Telemetry
//! says, else MeshConfig `accessLogFile` (with `accessLogFormat` and `accessLogEncoding`).
//! Providers: the built-in `envoy` (stdout, Istio's format) and `envoyFileAccessLog`
//! extension providers (a path and a text or `labels` format).

use envoy_types::pb::envoy::config::accesslog::v3::{
    AccessLog, AccessLogFilter, AndFilter, ComparisonFilter, DurationFilter, OrFilter,
    StatusCodeFilter, access_log, access_log_filter, comparison_filter,
};
use envoy_types::pb::envoy::config::core::v3::{
    DataSource, RuntimeUInt32, SubstitutionFormatString, data_source, substitution_format_string,
};
use envoy_types::pb::envoy::extensions::access_loggers::file::v3::{
    FileAccessLog, file_access_log,
};
use envoy_types::util::pack_any;
use serde_json::Value;

use crate::context::PushContext;
use crate::proxy::Proxy;
use crate::telemetry::Side;

/// Istio's default access log format (`EnvoyTextLogFormat`).
const ISTIO_TEXT_LOG_FORMAT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% \"%UPSTREAM_TRANSPORT_FAILURE_REASON%\" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\" %UPSTREAM_CLUSTER% %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% %REQUESTED_SERVER_NAME% %ROUTE_NAME%\n";

/// Istio's default JSON access log fields.
const ISTIO_JSON_LOG_FIELDS: &[(&str, &str)] = &[
    ("start_time", "%START_TIME%"),
    ("method", "%REQ(:METHOD)%"),
    ("path", "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"),
    ("protocol", "%PROTOCOL%"),
    ("response_code", "%RESPONSE_CODE%"),
    ("response_flags", "%RESPONSE_FLAGS%"),
    ("bytes_received", "%BYTES_RECEIVED%"),
    ("bytes_sent", "%BYTES_SENT%"),
    ("duration", "%DURATION%"),
    ("x_forwarded_for", "%REQ(X-FORWARDED-FOR)%"),
    ("user_agent", "%REQ(USER-AGENT)%"),
    ("request_id", "%REQ(X-REQUEST-ID)%"),
    ("authority", "%REQ(:AUTHORITY)%"),
    ("upstream_host", "%UPSTREAM_HOST%"),
    ("upstream_cluster", "%UPSTREAM_CLUSTER%"),
    ("downstream_local_address", "%DOWNSTREAM_LOCAL_ADDRESS%"),
    ("downstream_remote_address", "%DOWNSTREAM_REMOTE_ADDRESS%"),
    ("requested_server_name", "%REQUESTED_SERVER_NAME%"),
    ("route_name", "%ROUTE_NAME%"),
];

/// A file access log: its path, and its format (Istio's text format when none is given).
enum Format {
    Text(String),
    Json(Vec<(String, String)>),
}

fn file_log(path: &str, format: Format, filter: Option<AccessLogFilter>) -> AccessLog {
    let format = match format {
        Format::Json(fields) => {
            substitution_format_string::Format::JsonFormat(crate::cluster::strukt(
                fields
                    .iter()
                    .map(|(k, v)| (k.as_str(), crate::cluster::string(v))),
            ))
        }
        Format::Text(text) => substitution_format_string::Format::TextFormatSource(DataSource {
            specifier: Some(data_source::Specifier::InlineString(text)),
            ..Default::default()
        }),
    };
    AccessLog {
        name: "envoy.access_loggers.file".into(),
        filter,
        config_type: Some(access_log::ConfigType::TypedConfig(pack_any(
            FileAccessLog {
                path: path.into(),
                access_log_format: Some(file_access_log::AccessLogFormat::LogFormat(
                    SubstitutionFormatString {
                        format: Some(format),
                        ..Default::default()
                    },
                )),
            },
        ))),
    }
}

fn istio_json() -> Format {
    Format::Json(
        ISTIO_JSON_LOG_FIELDS
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

/// MeshConfig `accessLogFile`; None when access logs are off.
fn mesh_log(ctx: &PushContext) -> Option<AccessLog> {
    let mesh = &ctx.mesh;
    if mesh.access_log_file.is_empty() {
        return None;
    }
    let format = if mesh.access_log_encoding.as_deref() == Some("JSON") {
        istio_json()
    } else if mesh.access_log_format.is_empty() {
        Format::Text(ISTIO_TEXT_LOG_FORMAT.into())
    } else {
        Format::Text(mesh.access_log_format.clone())
    };
    Some(file_log(&mesh.access_log_file, format, None))
}

/// A provider's access log: the built-in `envoy`, or an `envoyFileAccessLog` extension
/// provider; None (with a warning) for other kinds.
fn provider_log(
    ctx: &PushContext,
    name: &str,
    filter: Option<AccessLogFilter>,
) -> Option<AccessLog> {
    let Some(p) = ctx.mesh.extension_providers.iter().find(|p| p.name == name) else {
        if name == "envoy" {
            return Some(file_log(
                "/dev/stdout",
                Format::Text(ISTIO_TEXT_LOG_FORMAT.into()),
                filter,
            ));
        }
        tracing::warn!(provider = name, "access log provider not found; not logged");
        return None;
    };
    let Some(f) = p.provider.get("envoyFileAccessLog") else {
        tracing::warn!(provider = name, kind = ?p.kind(), "access log provider kind is not supported; not logged");
        return None;
    };
    let path = f
        .get("path")
        .and_then(Value::as_str)
        .unwrap_or("/dev/stdout");
    let format = match f.get("logFormat") {
        Some(lf) if lf.get("labels").is_some() => {
            let mut fields: Vec<(String, String)> = lf["labels"]
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect();
            fields.sort();
            if fields.is_empty() {
                istio_json()
            } else {
                Format::Json(fields)
            }
        }
        Some(lf) => Format::Text(
            lf.get("text")
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
                .map_or_else(
                    || ISTIO_TEXT_LOG_FORMAT.to_string(),
                    |t| format!("{}\n", t.trim_end_matches('\n')),
                ),
        ),
        None => Format::Text(ISTIO_TEXT_LOG_FORMAT.into()),
    };
    Some(file_log(path, format, filter))
}

/// The access logs of `proxy`'s listeners on `side`.
pub fn access_logs(ctx: &PushContext, proxy: &Proxy, side: Side) -> Vec<AccessLog> {
    let mut providers: Option<Vec<String>> = ctx
        .mesh
        .default_providers
        .as_ref()
        .map(|d| d.access_logging.clone())
        .filter(|p| !p.is_empty());
    let mut disabled = false;
    let mut expression: Option<String> = None;
    for t in crate::telemetry::applicable(ctx, proxy) {
        for l in &t.access_logging {
            if !crate::telemetry::applies(l.match_.as_ref(), side) {
                continue;
            }
            if !l.providers.is_empty() {
                providers = Some(l.providers.iter().map(|p| p.name.clone()).collect());
            }
            if let Some(d) = l.disabled {
                disabled = d;
            }
            if let Some(f) = &l.filter {
                expression = Some(f.expression.clone()).filter(|e| !e.is_empty());
            }
            // An entry without providers still turns logging on, with the default provider.
            providers.get_or_insert_with(|| vec!["envoy".to_string()]);
        }
    }
    let Some(providers) = providers else {
        return mesh_log(ctx).into_iter().collect();
    };
    if disabled {
        return Vec::new();
    }
    let filter = expression.as_deref().and_then(|e| {
        let f = cel_filter(e);
        if f.is_none() {
            tracing::warn!(
                expression = e,
                "access log filter is not supported; logging every request"
            );
        }
        f
    });
    providers
        .iter()
        .filter_map(|p| provider_log(ctx, p, filter.clone()))
        .collect()
}

/// A Telemetry filter's CEL expression as Envoy's own access log filters, for the forms they
/// express: comparisons of `response.code` with a number or of `response.duration` with a
/// `duration("…")`, joined by `&&` and `||` (`&&` first); None for anything else.
fn cel_filter(expression: &str) -> Option<AccessLogFilter> {
    let any_of: Vec<AccessLogFilter> = expression
        .split("||")
        .map(|conj| {
            let all: Vec<AccessLogFilter> =
                conj.split("&&").map(comparison).collect::<Option<_>>()?;
            Some(join(all, false))
        })
        .collect::<Option<_>>()?;
    Some(join(any_of, true))
}

/// CEL's `duration("1.5s")` or `duration("250ms")` in milliseconds.
fn millis(text: &str) -> Option<u32> {
    let inner = text
        .strip_prefix("duration(")?
        .strip_suffix(')')?
        .trim()
        .trim_matches('"');
    let ms = if let Some(n) = inner.strip_suffix("ms") {
        n.parse::<f64>().ok()?
    } else {
        inner.strip_suffix('s')?.parse::<f64>().ok()? * 1000.0
    };
    (ms >= 0.0 && ms <= f64::from(u32::MAX)).then(|| ms.round() as u32)
}

fn join(mut filters: Vec<AccessLogFilter>, any: bool) -> AccessLogFilter {
    if filters.len() == 1 {
        return filters.remove(0);
    }
    AccessLogFilter {
        filter_specifier: Some(if any {
            access_log_filter::FilterSpecifier::OrFilter(OrFilter { filters })
        } else {
            access_log_filter::FilterSpecifier::AndFilter(AndFilter { filters })
        }),
    }
}

/// `response.code >= 400` and the like.
fn comparison(text: &str) -> Option<AccessLogFilter> {
    use comparison_filter::Op;
    let text = text.trim();
    let (field, op, value) = ["==", "!=", ">=", "<=", ">", "<"].iter().find_map(|op| {
        let (l, r) = text.split_once(op)?;
        Some((l.trim(), *op, r.trim()))
    })?;
    let value = match field {
        "response.code" => value.parse::<u32>().ok()?,
        "response.duration" => millis(value)?,
        _ => return None,
    };
    let (op, value) = match op {
        "==" => (Op::Eq, value),
        "!=" => (Op::Ne, value),
        ">=" => (Op::Ge, value),
        "<=" => (Op::Le, value),
        ">" => (Op::Ge, value.checked_add(1)?),
        _ => (Op::Le, value.checked_sub(1)?),
    };
    let comparison = Some(ComparisonFilter {
        op: op as i32,
        value: Some(RuntimeUInt32 {
            default_value: value,
            runtime_key: String::new(),
        }),
    });
    let spec = match field {
        "response.code" => {
            access_log_filter::FilterSpecifier::StatusCodeFilter(StatusCodeFilter { comparison })
        }
        _ => access_log_filter::FilterSpecifier::DurationFilter(DurationFilter { comparison }),
    };
    Some(AccessLogFilter {
        filter_specifier: Some(spec),
    })
}
