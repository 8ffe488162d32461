//! Types shared by Istio's API groups: objects, selectors, durations, port keys.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;

/// An Istio custom resource: Kubernetes metadata around a typed `spec`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct IstioObject<S> {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub api_version: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: S,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<Value>,
}

/// `selector` / `workloadSelector`: Kubernetes label equality.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct WorkloadSelector {
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
}

/// A Gateway API style reference (`targetRef` / `targetRefs`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PolicyTargetReference {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub group: String,
    pub kind: String,
    pub name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub namespace: String,
}

pub(crate) fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// A protobuf `Duration` as Istio YAML writes it: Go duration syntax (`1h2m3.5s`, `300ms`).
///
/// The text is kept so that a resource serializes back as it was written.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Duration {
    text: String,
    value: std::time::Duration,
}

impl Duration {
    pub fn as_std(&self) -> std::time::Duration {
        self.value
    }
    pub fn as_str(&self) -> &str {
        &self.text
    }
    pub fn from_std(d: std::time::Duration) -> Self {
        Duration {
            text: format_duration(d),
            value: d,
        }
    }
}

impl fmt::Debug for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Duration({})", self.text)
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::str::FromStr for Duration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(Duration {
            text: s.to_string(),
            value: parse_go_duration(s)?,
        })
    }
}

/// Parses Go's `time.ParseDuration` syntax, which is what Istio accepts in YAML.
/// Negative durations are rejected: no Istio field accepts them.
pub fn parse_go_duration(s: &str) -> Result<std::time::Duration, String> {
    let err = || {
        format!(
            "invalid duration {s:?}: expected a number with a unit (ns, us, ms, s, m, h), e.g. \"1.5s\""
        )
    };
    let t = s.trim();
    let t = t.strip_prefix('+').unwrap_or(t);
    if t.is_empty() || t.starts_with('-') {
        return Err(err());
    }
    if t == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    let mut total: f64 = 0.0;
    let mut rest = t;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(err)?;
        if num_end == 0 {
            return Err(err());
        }
        let num: f64 = rest[..num_end].parse().map_err(|_| err())?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = &rest[..unit_end];
        rest = &rest[unit_end..];
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(err()),
        };
        total += num * scale;
    }
    if !total.is_finite() || total > 1e12 {
        return Err(err());
    }
    Ok(std::time::Duration::from_secs_f64(total))
}

/// Formats a duration the way protobuf JSON does (`"1.500s"`, `"0s"`).
pub fn format_duration(d: std::time::Duration) -> String {
    let nanos = d.subsec_nanos();
    if nanos == 0 {
        format!("{}s", d.as_secs())
    } else {
        let frac = format!("{nanos:09}");
        format!("{}.{}s", d.as_secs(), frac.trim_end_matches('0'))
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"5s\" or \"100ms\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
                // A bare integer is read as seconds (protobuf JSON allows no unit only as "Ns").
                Ok(Duration::from_std(std::time::Duration::from_secs(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
                u64::try_from(v)
                    .map(|v| Duration::from_std(std::time::Duration::from_secs(v)))
                    .map_err(|_| E::custom(format!("invalid duration {v}: negative")))
            }
        }
        d.deserialize_any(V)
    }
}

/// A map key that is a port number, written either as an integer or as a string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortKey(pub u32);

impl Serialize for PortKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0.to_string())
    }
}

impl<'de> Deserialize<'de> for PortKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = PortKey;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PortKey, E> {
                u32::try_from(v)
                    .map(PortKey)
                    .map_err(|_| E::custom(format!("port {v} out of range")))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PortKey, E> {
                u32::try_from(v)
                    .map(PortKey)
                    .map_err(|_| E::custom(format!("port {v} out of range")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PortKey, E> {
                v.trim()
                    .parse()
                    .map(PortKey)
                    .map_err(|_| E::custom(format!("invalid port {v:?}")))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        let ms = |s: &str| parse_go_duration(s).map(|d| d.as_millis());
        assert_eq!(ms("1s"), Ok(1000));
        assert_eq!(ms("1.5s"), Ok(1500));
        assert_eq!(ms("300ms"), Ok(300));
        assert_eq!(ms("1m30s"), Ok(90_000));
        assert_eq!(ms("2h"), Ok(7_200_000));
        assert_eq!(ms("0"), Ok(0));
        assert!(parse_go_duration("5").is_err());
        assert!(parse_go_duration("-1s").is_err());
        assert!(parse_go_duration("1x").is_err());
        assert!(parse_go_duration("").is_err());
        assert!(parse_go_duration("s").is_err());
    }

    #[test]
    fn formats_like_protobuf_json() {
        assert_eq!(
            format_duration(std::time::Duration::from_millis(1500)),
            "1.5s"
        );
        assert_eq!(format_duration(std::time::Duration::from_secs(10)), "10s");
    }
}
