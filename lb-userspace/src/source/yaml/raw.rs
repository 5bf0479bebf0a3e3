//! The config file as written: serde's permissive shapes. Wide integers and
//! strings for addresses, so that range and format checks happen in
//! `check` with a helpful message, not in serde with a generic one.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawConfig {
    #[serde(default)]
    pub node: RawNode,
    pub masquerade: Option<RawMasquerade>,
    pub conntrack: Option<RawConntrack>,
    pub selection: Option<RawSelection>,
    #[serde(default)]
    pub services: Vec<RawService>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawNode {
    #[serde(default)]
    pub interfaces: Vec<String>,
    pub addresses: Option<Vec<String>>,
    #[serde(default)]
    pub allowed_frontend_addresses: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawMasquerade {
    pub port_range: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawConntrack {
    pub tcp_timeout_seconds: Option<Int>,
    pub tcp_syn_timeout_seconds: Option<Int>,
    pub tcp_closing_timeout_seconds: Option<Int>,
    pub udp_timeout_seconds: Option<Int>,
    pub udp_unassured_timeout_seconds: Option<Int>,
    pub max_flows: Option<Int>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawSelection {
    pub table_size: Option<Int>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawService {
    pub name: String,
    pub namespace: Option<String>,
    pub protocol: Option<String>,
    pub node_port: Option<Int>,
    pub port: Option<Int>,
    #[serde(default)]
    pub frontends: Vec<String>,
    #[serde(rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    /// `IPv4`, `IPv6` or both; left out: the families of the addresses.
    #[serde(default)]
    pub ip_families: Option<Vec<String>>,
    pub target_port: Option<Int>,
    pub external_traffic_policy: Option<String>,
    pub internal_traffic_policy: Option<String>,
    pub session_affinity: Option<String>,
    pub session_affinity_config: Option<RawAffinityConfig>,
    #[serde(default)]
    pub load_balancer_source_ranges: Vec<String>,
    pub health_check_node_port: Option<Int>,
    #[serde(default)]
    pub backends: Vec<RawBackend>,
}

/// `sessionAffinityConfig`, shaped as in a Kubernetes Service.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawAffinityConfig {
    #[serde(rename = "clientIP")]
    pub client_ip: Option<RawClientIp>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawClientIp {
    pub timeout_seconds: Option<Int>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawBackend {
    pub address: String,
    pub port: Option<Int>,
    pub weight: Option<Int>,
    pub name: Option<String>,
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
    pub local: Option<bool>,
}

/// Any YAML integer, kept wide so that `70000` reaches the range check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Int(pub i128);

impl<'de> Deserialize<'de> for Int {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct IntVisitor;
        impl Visitor<'_> for IntVisitor {
            type Value = Int;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer")
            }
            fn visit_i64<E: de::Error>(self, value: i64) -> Result<Int, E> {
                Ok(Int(value.into()))
            }
            fn visit_u64<E: de::Error>(self, value: u64) -> Result<Int, E> {
                Ok(Int(value.into()))
            }
            fn visit_i128<E: de::Error>(self, value: i128) -> Result<Int, E> {
                Ok(Int(value))
            }
            fn visit_u128<E: de::Error>(self, value: u128) -> Result<Int, E> {
                Ok(Int(i128::try_from(value).unwrap_or(i128::MAX)))
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<Int, E> {
                Err(E::custom(format_args!("\"{value}\" is not a number")))
            }
        }
        deserializer.deserialize_any(IntVisitor)
    }
}
