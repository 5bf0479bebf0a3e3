//! This node as the translation sees it: its name (endpoints on it are
//! local) and its primary addresses, from its Node object.

use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::Node;

/// What the translation needs to know about the node xlb runs on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// The Node's name: endpoints whose `nodeName` equals it are local.
    pub name: Option<String>,
    /// The Node's primary IPv4 addresses (see [`NodeInfo::new`]), in status
    /// order.
    pub addresses: Vec<Ipv4Addr>,
}

impl NodeInfo {
    /// `name`, with the primary addresses of `node` if the API has it: its
    /// IPv4 InternalIPs, or its ExternalIPs when it has no InternalIP (an
    /// ExternalIP is often a cloud NAT address no packet arrives with).
    pub fn new(name: Option<String>, node: Option<&Node>) -> Self {
        let listed: Vec<(&str, Ipv4Addr)> = node
            .and_then(|node| node.status.as_ref())
            .and_then(|status| status.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|address| {
                let ip = address.address.parse::<Ipv4Addr>().ok()?;
                Some((address.type_.as_str(), ip))
            })
            .collect();
        let of_type = |wanted: &str| -> Vec<Ipv4Addr> {
            let mut addresses = Vec::new();
            for (kind, ip) in &listed {
                if *kind == wanted && !addresses.contains(ip) {
                    addresses.push(*ip);
                }
            }
            addresses
        };
        let mut addresses = of_type("InternalIP");
        if addresses.is_empty() {
            addresses = of_type("ExternalIP");
        }
        Self { name, addresses }
    }
}
