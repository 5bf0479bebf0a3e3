//! Which devices are the node's uplinks (XDP and the tc hand-off go there),
//! and why: the config's `node.interfaces` / `--iface` when given, else the
//! devices holding the node's addresses (Kubernetes: the Node's InternalIP)
//! and the default route's device. The choice is a pure function of what
//! the host says, so it is tested without a kernel.

use std::io;
use std::net::IpAddr;

use super::host::InterfaceAddress;

/// An uplink and why it was chosen, as `xlb status` and `/metrics` show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uplink {
    pub name: String,
    pub why: String,
}

/// Why an uplink named by the config was chosen.
pub const WHY_CONFIG: &str = "config node.interfaces";
pub const WHY_FLAG: &str = "--iface";
pub const WHY_DEFAULT_ROUTE: &str = "default route";

/// The uplinks when the config names none: every device (but loopback)
/// holding one of `node_addresses`, then the devices of `default_routes`,
/// each once, with every reason it has.
pub fn detect(
    node_addresses: &[IpAddr],
    addresses: &[InterfaceAddress],
    default_routes: &[String],
) -> Vec<Uplink> {
    let mut uplinks: Vec<Uplink> = Vec::new();
    let mut add = |name: &str, why: String| {
        if name == "lo" {
            return;
        }
        match uplinks.iter_mut().find(|uplink| uplink.name == name) {
            Some(uplink) if !uplink.why.split(", ").any(|known| known == why) => {
                uplink.why = format!("{}, {why}", uplink.why);
            }
            Some(_) => {}
            None => uplinks.push(Uplink {
                name: name.to_owned(),
                why,
            }),
        }
    };
    for address in node_addresses {
        for entry in addresses.iter().filter(|entry| entry.address == *address) {
            add(&entry.interface, format!("holds node address {address}"));
        }
    }
    for device in default_routes {
        add(device, WHY_DEFAULT_ROUTE.to_owned());
    }
    uplinks
}

/// The devices of the IPv4 default routes in the main table
/// (`/proc/net/route`, this network namespace's).
pub fn default_route_devices() -> io::Result<Vec<String>> {
    Ok(parse_default_routes(&std::fs::read_to_string(
        "/proc/net/route",
    )?))
}

/// `/proc/net/route`: a header line, then `Iface Destination Gateway Flags
/// RefCnt Use Metric Mask ...` with hex fields; a default route has
/// destination and mask 0 and the RTF_UP flag.
fn parse_default_routes(text: &str) -> Vec<String> {
    const RTF_UP: u32 = 0x1;
    let mut devices: Vec<String> = Vec::new();
    for line in text.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [device, destination, _gateway, flags, _, _, _, mask, ..] = fields.as_slice() else {
            continue;
        };
        let hex = |field: &str| u32::from_str_radix(field, 16).ok();
        if hex(destination) == Some(0)
            && hex(mask) == Some(0)
            && hex(flags).is_some_and(|flags| flags & RTF_UP != 0)
            && !devices.iter().any(|known| known == device)
        {
            devices.push((*device).to_owned());
        }
    }
    devices
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn entry(interface: &str, ifindex: u32, address: [u8; 4]) -> InterfaceAddress {
        InterfaceAddress {
            interface: interface.to_owned(),
            ifindex,
            address: Ipv4Addr::from(address).into(),
        }
    }

    /// A node as the real-node lab makes it: the uplink, a bridge CNI, a
    /// VXLAN device, loopback.
    fn node() -> Vec<InterfaceAddress> {
        vec![
            entry("lo", 1, [127, 0, 0, 1]),
            entry("xlb-up", 2, [198, 18, 0, 1]),
            entry("cni0", 3, [198, 18, 10, 1]),
            entry("xlb-vx", 4, [198, 18, 30, 1]),
        ]
    }

    fn names(uplinks: &[Uplink]) -> Vec<(&str, &str)> {
        uplinks
            .iter()
            .map(|uplink| (uplink.name.as_str(), uplink.why.as_str()))
            .collect()
    }

    #[test]
    fn the_device_holding_the_node_address_and_the_default_route() {
        let uplinks = detect(
            &[Ipv4Addr::new(198, 18, 0, 1).into()],
            &node(),
            &[String::from("xlb-up")],
        );
        assert_eq!(
            names(&uplinks),
            [("xlb-up", "holds node address 198.18.0.1, default route")]
        );
    }

    #[test]
    fn pod_bridges_and_tunnels_are_not_uplinks_without_a_node_address() {
        // No node address given (a config file without node.addresses):
        // only the default route counts, not every device with an address.
        let uplinks = detect(&[], &node(), &[String::from("xlb-up")]);
        assert_eq!(names(&uplinks), [("xlb-up", "default route")]);
    }

    #[test]
    fn two_nics_one_with_the_internal_ip_one_with_the_default_route() {
        let mut addresses = node();
        addresses.push(entry("eth1", 5, [198, 18, 99, 1]));
        let uplinks = detect(
            &[
                Ipv4Addr::new(198, 18, 0, 1).into(),
                Ipv4Addr::new(198, 18, 0, 9).into(),
            ],
            &addresses,
            &[String::from("eth1")],
        );
        assert_eq!(
            names(&uplinks),
            [
                ("xlb-up", "holds node address 198.18.0.1"),
                ("eth1", "default route")
            ]
        );
    }

    #[test]
    fn loopback_never_and_each_device_once() {
        let mut addresses = node();
        addresses.push(entry("xlb-up", 2, [198, 18, 0, 5]));
        let uplinks = detect(
            &[
                Ipv4Addr::LOCALHOST.into(),
                Ipv4Addr::new(198, 18, 0, 1).into(),
                Ipv4Addr::new(198, 18, 0, 5).into(),
            ],
            &addresses,
            &[String::from("lo"), String::from("xlb-up")],
        );
        assert_eq!(
            names(&uplinks),
            [(
                "xlb-up",
                "holds node address 198.18.0.1, holds node address 198.18.0.5, default route"
            )]
        );
        assert!(detect(&[], &addresses, &[]).is_empty());
    }

    #[test]
    fn default_routes_from_proc_net_route() {
        let text = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                    xlb-up\t00000000\tFE0012C6\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                    xlb-up\t000012C6\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                    xlb-vx\t001512C6\t031E12C6\t0003\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                    eth9\t00000000\t00000000\t0000\t0\t0\t0\t00000000\t0\t0\t0\n\
                    bond0\t00000000\t010012C6\t0003\t0\t0\t100\t00000000\t0\t0\t0\n";
        assert_eq!(parse_default_routes(text), ["xlb-up", "bond0"]);
        assert!(parse_default_routes("Iface\tDestination\n").is_empty());
    }
}
