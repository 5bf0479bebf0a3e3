//! What the agent reads from the host outside BPF: interface addresses,
//! interface indexes, the monotonic clock, the ephemeral port range.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::IpAddr;
use std::ops::RangeInclusive;

use super::sys;
use crate::model::IpFamily;
use crate::reconcile::NodeFacts;

/// One address of one interface, in the kernel's order (an interface's
/// primary IPv4 address comes first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceAddress {
    pub interface: String,
    pub ifindex: u32,
    pub address: IpAddr,
}

/// Every IPv4 address and every IPv6 address but link-local ones on the
/// node (in this network namespace). Link-local addresses never answer a
/// NodePort and never masquerade: they mean nothing past their link.
pub fn addresses() -> io::Result<Vec<InterfaceAddress>> {
    let mut found = Vec::new();
    for (name, address, scope) in sys::interface_addresses()? {
        if scope != 0 || is_link_local(address) {
            continue;
        }
        // Labelled aliases ("eth0:1") belong to the interface before the colon.
        let device = name.split(':').next().unwrap_or(&name).to_owned();
        let Some(ifindex) = ifindex(&device) else {
            continue;
        };
        found.push(InterfaceAddress {
            interface: device,
            ifindex,
            address,
        });
    }
    Ok(found)
}

/// fe80::/10.
fn is_link_local(address: IpAddr) -> bool {
    match address {
        IpAddr::V4(_) => false,
        IpAddr::V6(address) => address.segments()[0] & 0xffc0 == 0xfe80,
    }
}

/// Index of interface `name`, if it exists.
pub fn ifindex(name: &str) -> Option<u32> {
    sys::if_nametoindex(name)
}

/// Name of the interface with index `ifindex`, if it exists.
pub fn interface_name(ifindex: u32) -> Option<String> {
    sys::if_indextoname(ifindex)
}

/// The node facts the reconciler needs, from the current addresses.
pub fn node_facts() -> io::Result<NodeFacts> {
    Ok(facts_from(&addresses()?))
}

fn facts_from(addresses: &[InterfaceAddress]) -> NodeFacts {
    let local_addresses: BTreeSet<IpAddr> = addresses
        .iter()
        .map(|entry| entry.address)
        .filter(|address| !address.is_loopback())
        .collect();
    let mut interface_addresses = BTreeMap::new();
    for entry in addresses {
        interface_addresses
            .entry((entry.ifindex, IpFamily::of(entry.address)))
            .or_insert(entry.address);
    }
    NodeFacts {
        local_addresses,
        interface_addresses,
    }
}

/// What kind of device a link is, as far as choosing a hook goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkKind {
    /// One end of a veth pair: in a node's namespace, a pod's host side.
    Veth,
    /// An overlay tunnel (`vxlan`, `geneve`): replies of remote pods come
    /// out of it.
    Tunnel(String),
    /// Anything else (a NIC, a bridge, loopback, ...).
    Other,
}

/// One network device of the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    pub ifindex: u32,
    pub kind: LinkKind,
}

/// Every network device in this namespace (`ip -json -details link show`).
pub fn links() -> io::Result<Vec<Link>> {
    let output = std::process::Command::new("ip")
        .args(["-json", "-details", "link", "show"])
        .stdin(std::process::Stdio::null())
        .output()?;
    if !output.status.success() {
        return Err(io::Error::other(format!(
            "`ip -json -details link show` failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    parse_links(&output.stdout)
        .map_err(|error| io::Error::other(format!("`ip -json -details link show`: {error}")))
}

fn parse_links(json: &[u8]) -> Result<Vec<Link>, serde_json::Error> {
    #[derive(serde::Deserialize)]
    struct RawInfo {
        info_kind: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct RawLink {
        ifname: String,
        ifindex: u32,
        linkinfo: Option<RawInfo>,
    }
    let raw: Vec<RawLink> = serde_json::from_slice(json)?;
    Ok(raw
        .into_iter()
        .map(|link| {
            let kind = match link.linkinfo.and_then(|info| info.info_kind).as_deref() {
                Some("veth") => LinkKind::Veth,
                Some(tunnel @ ("vxlan" | "geneve")) => LinkKind::Tunnel(tunnel.to_owned()),
                _ => LinkKind::Other,
            };
            Link {
                name: link.ifname,
                ifindex: link.ifindex,
                kind,
            }
        })
        .collect())
}

/// CLOCK_MONOTONIC_COARSE in nanoseconds: the clock of `bpf_ktime_get_coarse_ns()`, which
/// the datapath stamps flows with.
pub fn monotonic_ns() -> u64 {
    sys::monotonic_coarse_ns()
}

/// `net.ipv4.ip_local_port_range`, if readable.
pub fn ephemeral_ports() -> Option<RangeInclusive<u16>> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    parse_port_range(&text)
}

fn parse_port_range(text: &str) -> Option<RangeInclusive<u16>> {
    let mut ports = text.split_whitespace().map(str::parse::<u16>);
    let low = ports.next()?.ok()?;
    let high = ports.next()?.ok()?;
    Some(low..=high)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn loopback_is_listed_and_indexed() {
        let addresses = super::addresses().map_err(|e| e.to_string());
        let Ok(addresses) = addresses else {
            panic!("{addresses:?}");
        };
        let lo = addresses
            .iter()
            .find(|a| a.interface == "lo" && a.address.is_ipv4());
        assert_eq!(lo.map(|a| a.address), Some(Ipv4Addr::LOCALHOST.into()));
        assert_eq!(lo.map(|a| a.ifindex), ifindex("lo"));
        assert_eq!(ifindex("no-such-if0"), None);
    }

    #[test]
    fn facts_keep_first_address_per_interface_and_family_and_drop_loopback() {
        let entry = |interface: &str, ifindex, address: &str| InterfaceAddress {
            interface: interface.to_owned(),
            ifindex,
            address: address.parse().unwrap_or_else(|e| panic!("{address}: {e}")),
        };
        let ip = |text: &str| -> IpAddr { text.parse().unwrap_or_else(|e| panic!("{e}")) };
        let facts = facts_from(&[
            entry("lo", 1, "127.0.0.1"),
            entry("lo", 1, "::1"),
            entry("eth0", 2, "198.18.0.1"),
            entry("eth0", 2, "2001:db8::1"),
            entry("eth0", 2, "198.18.0.2"),
            entry("eth0", 2, "2001:db8::2"),
        ]);
        assert_eq!(
            facts.local_addresses.into_iter().collect::<Vec<_>>(),
            [
                ip("198.18.0.1"),
                ip("198.18.0.2"),
                ip("2001:db8::1"),
                ip("2001:db8::2")
            ]
        );
        assert_eq!(
            facts.interface_addresses.into_iter().collect::<Vec<_>>(),
            [
                ((1, IpFamily::V4), ip("127.0.0.1")),
                ((1, IpFamily::V6), ip("::1")),
                ((2, IpFamily::V4), ip("198.18.0.1")),
                ((2, IpFamily::V6), ip("2001:db8::1")),
            ]
        );
        assert!(is_link_local(ip("fe80::1")) && !is_link_local(ip("2001:db8::1")));
    }

    #[test]
    fn links_from_ip_json() {
        let json = br#"[{"ifindex":1,"ifname":"lo","flags":["LOOPBACK"]},
            {"ifindex":5,"ifname":"xlb-vb1","linkinfo":{"info_kind":"veth"}},
            {"ifindex":6,"ifname":"flannel.1","linkinfo":{"info_kind":"vxlan","info_data":{"id":1}}},
            {"ifindex":7,"ifname":"cni0","linkinfo":{"info_kind":"bridge"}}]"#;
        let links = parse_links(json).map_err(|e| e.to_string());
        let kinds: Vec<(String, u32, LinkKind)> = links
            .unwrap_or_default()
            .into_iter()
            .map(|l| (l.name, l.ifindex, l.kind))
            .collect();
        assert_eq!(
            kinds,
            [
                (String::from("lo"), 1, LinkKind::Other),
                (String::from("xlb-vb1"), 5, LinkKind::Veth),
                (
                    String::from("flannel.1"),
                    6,
                    LinkKind::Tunnel(String::from("vxlan"))
                ),
                (String::from("cni0"), 7, LinkKind::Other),
            ]
        );
    }

    #[test]
    fn port_range_file_format() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some(32_768..=60_999));
        assert_eq!(parse_port_range("garbage"), None);
    }

    #[test]
    fn clock_moves_forward() {
        let before = monotonic_ns();
        assert!(before > 0);
        assert!(monotonic_ns() >= before);
    }
}
