//! Envoy's RBAC filter (HTTP and network): policies of permissions (what is asked) and
//! principals (who asks). A policy matches when one of its permissions and one of its
//! principals match; ALLOW lets through only what a policy matches, DENY stops it, LOG lets
//! everything through.

use std::net::{IpAddr, SocketAddr};

use envoy_types::pb::envoy::config::core::v3::CidrRange;
use envoy_types::pb::envoy::config::rbac::v3::{
    Permission, Principal, Rbac as PbRbac, permission, principal, rbac,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    MetadataMatcher, ValueMatcher, list_matcher, metadata_matcher, path_matcher, value_matcher,
};
use http::request::Parts;
use ipnet::IpNet;
use serde_json::Value;

use super::DynamicMetadata;
use super::route::{HeaderMatch, Text, header_match, text};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
    Log,
}

#[derive(Debug)]
pub struct Rbac {
    pub action: Action,
    /// Sorted by name, so the policy reported as matching is stable.
    policies: Vec<(String, Vec<Perm>, Vec<Princ>)>,
}

#[derive(Debug)]
enum Perm {
    Any,
    And(Vec<Perm>),
    Or(Vec<Perm>),
    Not(Box<Perm>),
    Header(HeaderMatch),
    Path(Text),
    DestinationIp(IpNet),
    DestinationPort(u16),
    ServerName(Text),
}

#[derive(Debug)]
enum Princ {
    Any,
    And(Vec<Princ>),
    Or(Vec<Princ>),
    Not(Box<Princ>),
    /// An mTLS peer, whose URI SAN matches when a name is given.
    Authenticated(Option<Text>),
    /// The connection's peer address (`direct_remote_ip`, `source_ip`).
    DirectRemoteIp(IpNet),
    /// The client's address as forwarded; without trusted hops, the peer address.
    RemoteIp(IpNet),
    Header(HeaderMatch),
    Path(Text),
    Metadata(Meta),
}

/// Envoy's `MetadataMatcher`: a value in the request's dynamic metadata (a verified JWT's
/// payload, for Istio's request principals and claims).
#[derive(Debug)]
struct Meta {
    filter: String,
    path: Vec<String>,
    value: ValueTest,
    invert: bool,
}

#[derive(Debug)]
enum ValueTest {
    Null,
    Text(Text),
    Bool(bool),
    Present(bool),
    /// A list with an element that matches.
    OneOf(Box<ValueTest>),
    Or(Vec<ValueTest>),
}

/// What a decision is made on.
pub struct Input<'a> {
    /// The peer's SPIFFE URI, when the connection is mTLS.
    pub principal: Option<&'a str>,
    pub source: SocketAddr,
    pub destination: SocketAddr,
    pub server_name: Option<&'a str>,
    /// The request, for HTTP filters; None at the connection level.
    pub request: Option<&'a Parts>,
    /// What earlier HTTP filters found out about the request.
    pub metadata: Option<&'a DynamicMetadata>,
}

fn cidr(c: &CidrRange) -> Result<IpNet, String> {
    let len = c.prefix_len.as_ref().map_or(0, |l| l.value);
    format!("{}/{len}", c.address_prefix)
        .parse()
        .map_err(|_| format!("bad CIDR {}/{len}", c.address_prefix))
}

fn value_test(v: &ValueMatcher) -> Result<ValueTest, String> {
    use value_matcher::MatchPattern as M;
    Ok(
        match v.match_pattern.as_ref().ok_or("empty value matcher")? {
            M::NullMatch(_) => ValueTest::Null,
            M::StringMatch(s) => ValueTest::Text(text(s)?),
            M::BoolMatch(b) => ValueTest::Bool(*b),
            M::PresentMatch(p) => ValueTest::Present(*p),
            M::ListMatch(l) => match &l.match_pattern {
                Some(list_matcher::MatchPattern::OneOf(v)) => {
                    ValueTest::OneOf(Box::new(value_test(v)?))
                }
                None => return Err("list matcher without one_of".into()),
            },
            M::OrMatch(o) => ValueTest::Or(
                o.value_matchers
                    .iter()
                    .map(value_test)
                    .collect::<Result<_, _>>()?,
            ),
            M::DoubleMatch(_) => return Err("metadata double matchers are not supported".into()),
        },
    )
}

fn meta(m: &MetadataMatcher) -> Result<Meta, String> {
    let path = m
        .path
        .iter()
        .map(|s| match &s.segment {
            Some(metadata_matcher::path_segment::Segment::Key(k)) => Ok(k.clone()),
            None => Err("metadata path segment without a key".to_string()),
        })
        .collect::<Result<_, _>>()?;
    Ok(Meta {
        filter: m.filter.clone(),
        path,
        value: value_test(m.value.as_ref().ok_or("metadata matcher without a value")?)?,
        invert: m.invert,
    })
}

impl ValueTest {
    fn matches(&self, v: Option<&Value>) -> bool {
        match (self, v) {
            (ValueTest::Present(p), v) => v.is_some() == *p,
            (ValueTest::Or(list), v) => list.iter().any(|t| t.matches(v)),
            (_, None) => false,
            (ValueTest::Null, Some(v)) => v.is_null(),
            (ValueTest::Text(t), Some(Value::String(s))) => t.matches(s),
            (ValueTest::Bool(b), Some(Value::Bool(v))) => b == v,
            (ValueTest::OneOf(t), Some(Value::Array(items))) => {
                items.iter().any(|i| t.matches(Some(i)))
            }
            _ => false,
        }
    }
}

impl Meta {
    fn matches(&self, metadata: Option<&DynamicMetadata>) -> bool {
        let mut v = metadata.and_then(|m| m.get(&self.filter));
        for key in &self.path {
            v = v.and_then(|v| v.as_object()).and_then(|o| o.get(key));
        }
        self.value.matches(v) != self.invert
    }
}

fn perm(p: &Permission) -> Result<Perm, String> {
    use permission::Rule as R;
    Ok(match p.rule.as_ref().ok_or("empty permission")? {
        R::Any(true) => Perm::Any,
        R::Any(false) => Perm::Not(Box::new(Perm::Any)),
        R::AndRules(s) => Perm::And(s.rules.iter().map(perm).collect::<Result<_, _>>()?),
        R::OrRules(s) => Perm::Or(s.rules.iter().map(perm).collect::<Result<_, _>>()?),
        R::NotRule(p) => Perm::Not(Box::new(perm(p)?)),
        R::Header(h) => Perm::Header(header_match(h)?),
        R::UrlPath(m) => match &m.rule {
            Some(path_matcher::Rule::Path(s)) => Perm::Path(text(s)?),
            None => return Err("url_path without a matcher".into()),
        },
        R::DestinationIp(c) => Perm::DestinationIp(cidr(c)?),
        R::DestinationPort(p) => Perm::DestinationPort(
            u16::try_from(*p).map_err(|_| format!("destination port {p} out of range"))?,
        ),
        R::RequestedServerName(s) => Perm::ServerName(text(s)?),
        _ => return Err("permission kind is not supported".into()),
    })
}

fn princ(p: &Principal) -> Result<Princ, String> {
    use principal::Identifier as I;
    #[allow(deprecated)]
    Ok(match p.identifier.as_ref().ok_or("empty principal")? {
        I::Any(true) => Princ::Any,
        I::Any(false) => Princ::Not(Box::new(Princ::Any)),
        I::AndIds(s) => Princ::And(s.ids.iter().map(princ).collect::<Result<_, _>>()?),
        I::OrIds(s) => Princ::Or(s.ids.iter().map(princ).collect::<Result<_, _>>()?),
        I::NotId(p) => Princ::Not(Box::new(princ(p)?)),
        I::Authenticated(a) => {
            Princ::Authenticated(a.principal_name.as_ref().map(text).transpose()?)
        }
        I::SourceIp(c) | I::DirectRemoteIp(c) => Princ::DirectRemoteIp(cidr(c)?),
        I::RemoteIp(c) => Princ::RemoteIp(cidr(c)?),
        I::Header(h) => Princ::Header(header_match(h)?),
        I::UrlPath(m) => match &m.rule {
            Some(path_matcher::Rule::Path(s)) => Princ::Path(text(s)?),
            None => return Err("url_path without a matcher".into()),
        },
        I::Metadata(m) => Princ::Metadata(meta(m)?),
        I::SourcedMetadata(m) => {
            if m.metadata_source != 0 {
                return Err("only dynamic metadata sources are supported".into());
            }
            Princ::Metadata(meta(
                m.metadata_matcher
                    .as_ref()
                    .ok_or("sourced_metadata without a matcher")?,
            )?)
        }
        _ => return Err("principal kind is not supported".into()),
    })
}

pub fn compile(r: &PbRbac) -> Result<Rbac, String> {
    let action = match rbac::Action::try_from(r.action) {
        Ok(rbac::Action::Allow) => Action::Allow,
        Ok(rbac::Action::Deny) => Action::Deny,
        Ok(rbac::Action::Log) => Action::Log,
        _ => return Err(format!("RBAC action {} is not supported", r.action)),
    };
    let mut policies = r
        .policies
        .iter()
        .map(|(name, p)| {
            if p.condition.is_some() || p.checked_condition.is_some() {
                return Err(format!(
                    "RBAC policy {name:?}: CEL conditions are not supported"
                ));
            }
            let perms = p
                .permissions
                .iter()
                .map(perm)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("RBAC policy {name:?}: {e}"))?;
            let princs = p
                .principals
                .iter()
                .map(princ)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("RBAC policy {name:?}: {e}"))?;
            Ok((name.clone(), perms, princs))
        })
        .collect::<Result<Vec<_>, String>>()?;
    policies.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(Rbac { action, policies })
}

fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl Perm {
    fn matches(&self, i: &Input<'_>) -> bool {
        match self {
            Perm::Any => true,
            Perm::And(v) => v.iter().all(|p| p.matches(i)),
            Perm::Or(v) => v.iter().any(|p| p.matches(i)),
            Perm::Not(p) => !p.matches(i),
            Perm::Header(h) => i.request.is_some_and(|r| h.matches(r)),
            Perm::Path(t) => i.request.is_some_and(|r| t.matches(r.uri.path())),
            Perm::DestinationIp(n) => n.contains(&unmap(i.destination.ip())),
            Perm::DestinationPort(p) => i.destination.port() == *p,
            Perm::ServerName(t) => i.server_name.is_some_and(|s| t.matches(s)),
        }
    }
}

impl Princ {
    fn matches(&self, i: &Input<'_>) -> bool {
        match self {
            Princ::Any => true,
            Princ::And(v) => v.iter().all(|p| p.matches(i)),
            Princ::Or(v) => v.iter().any(|p| p.matches(i)),
            Princ::Not(p) => !p.matches(i),
            Princ::Authenticated(name) => match (i.principal, name) {
                (Some(p), Some(t)) => t.matches(p),
                (Some(_), None) => true,
                (None, _) => false,
            },
            Princ::DirectRemoteIp(n) | Princ::RemoteIp(n) => n.contains(&unmap(i.source.ip())),
            Princ::Header(h) => i.request.is_some_and(|r| h.matches(r)),
            Princ::Path(t) => i.request.is_some_and(|r| t.matches(r.uri.path())),
            Princ::Metadata(m) => m.matches(i.metadata),
        }
    }
}

impl Rbac {
    /// The policy that matches, if any.
    pub fn matching(&self, i: &Input<'_>) -> Option<&str> {
        self.policies
            .iter()
            .find(|(_, perms, princs)| {
                perms.iter().any(|p| p.matches(i)) && princs.iter().any(|p| p.matches(i))
            })
            .map(|(name, _, _)| name.as_str())
    }

    /// Whether this filter lets the request or connection through.
    pub fn allows(&self, i: &Input<'_>) -> bool {
        match self.action {
            Action::Allow => self.matching(i).is_some(),
            Action::Deny => self.matching(i).is_none(),
            Action::Log => true,
        }
    }
}

/// Every filter must let it through (DENY first, then ALLOW, as configured).
pub fn allowed(filters: &[Rbac], i: &Input<'_>) -> bool {
    filters.iter().all(|f| f.allows(i))
}
