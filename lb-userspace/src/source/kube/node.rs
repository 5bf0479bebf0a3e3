//! This node as the translation sees it: its name (endpoints on it are
//! local) and its primary addresses, from its Node object.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Node;

/// What the translation needs to know about the node xlb runs on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// The Node's name: endpoints whose `nodeName` equals it are local.
    pub name: Option<String>,
    /// The Node's primary addresses of each family (see [`NodeInfo::new`]),
    /// IPv4 first, each family's in status order.
    pub addresses: Vec<IpAddr>,
}

impl NodeInfo {
    /// `name`, with the primary addresses of `node` if the API has it: for
    /// each family, its InternalIPs, or its ExternalIPs when it has no
    /// InternalIP of the family (an ExternalIP is often a cloud NAT address
    /// no packet arrives with).
    pub fn new(name: Option<String>, node: Option<&Node>) -> Self {
        let listed: Vec<(&str, IpAddr)> = node
            .and_then(|node| node.status.as_ref())
            .and_then(|status| status.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|address| {
                let ip = address.address.parse::<IpAddr>().ok()?;
                Some((address.type_.as_str(), ip))
            })
            .collect();
        let of_type = |wanted: &str, v4: bool| -> Vec<IpAddr> {
            let mut addresses = Vec::new();
            for (kind, ip) in &listed {
                if *kind == wanted && ip.is_ipv4() == v4 && !addresses.contains(ip) {
                    addresses.push(*ip);
                }
            }
            addresses
        };
        let mut addresses = Vec::new();
        for v4 in [true, false] {
            let mut family = of_type("InternalIP", v4);
            if family.is_empty() {
                family = of_type("ExternalIP", v4);
            }
            addresses.extend(family);
        }
        Self { name, addresses }
    }
}
