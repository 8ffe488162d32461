//! Istio's name table (NDS, `istio.networking.nds.v1`): the hostnames a proxy's agent answers
//! DNS queries for, and their addresses. Not one of Envoy's types, so defined here.

use std::collections::BTreeMap;

pub const NAME_TABLE: &str = "type.googleapis.com/istio.networking.nds.v1.NameTable";

/// Hostnames and how to answer for them. A `BTreeMap` so that equal tables encode alike (the
/// server versions resources by their bytes).
#[derive(Clone, PartialEq, prost::Message)]
pub struct NameTable {
    #[prost(btree_map = "string, message", tag = "1")]
    pub table: BTreeMap<String, NameInfo>,
    #[prost(message, optional, tag = "2")]
    pub name_info: Option<NameInfo>,
}

#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct NameInfo {
    #[prost(string, repeated, tag = "1")]
    pub ips: Vec<String>,
    /// `Kubernetes` or `External` (ServiceEntry).
    #[prost(string, tag = "2")]
    pub registry: String,
    /// A Kubernetes service's name and namespace, from which the agent makes its short names.
    #[prost(string, tag = "3")]
    pub shortname: String,
    #[prost(string, tag = "4")]
    pub namespace: String,
    #[prost(string, repeated, tag = "5")]
    pub alt_hosts: Vec<String>,
}

impl prost::Name for NameTable {
    const NAME: &'static str = "NameTable";
    const PACKAGE: &'static str = "istio.networking.nds.v1";

    fn type_url() -> String {
        NAME_TABLE.to_string()
    }
}
