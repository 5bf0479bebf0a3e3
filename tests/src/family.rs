//! The address family an end-to-end case runs in, so one test body serves
//! IPv4 and, on the dual-stack lab, IPv6 (each test file names its IPv6
//! twin `...6`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;

use crate::client::{udp_socket, udp_socket6};
use crate::lab::{
    Backend, CLIENT_ADDR, CLIENT_ADDR6, NODE_ADDR, NODE_ADDR6, backend_addr6, tcp_echo_service,
    tcp_echo_service6, udp_echo_service, udp_echo_service6,
};
use crate::{Lab, demo_config, dual_stack_config};

/// IPv4, or IPv6 through the dual-stack lab's 2001:db8::1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The demo services' config: config/demo.yaml, or its dual-stack twin.
    pub fn demo_config(self) -> PathBuf {
        match self {
            Family::V4 => demo_config(),
            Family::V6 => dual_stack_config(),
        }
    }

    /// The lab's config with `services`: NodePorts on the node's IPv4
    /// address, or on both (a dual-stack node) for IPv6.
    pub fn config(self, lab: &Lab, services: &str) -> String {
        match self {
            Family::V4 => lab.config_yaml(services),
            Family::V6 => lab.dual_stack_config_yaml(services),
        }
    }

    /// `udp-echo`'s NodePort in this family.
    pub fn udp_echo_service(self) -> SocketAddr {
        match self {
            Family::V4 => udp_echo_service(),
            Family::V6 => udp_echo_service6(),
        }
    }

    /// `tcp-echo`'s NodePort in this family.
    pub fn tcp_echo_service(self) -> SocketAddr {
        match self {
            Family::V4 => tcp_echo_service(),
            Family::V6 => tcp_echo_service6(),
        }
    }

    /// The NodePort `port` on the node's address of this family.
    pub fn node_port(self, port: u16) -> SocketAddr {
        match self {
            Family::V4 => SocketAddr::from((NODE_ADDR, port)),
            Family::V6 => SocketAddr::from((NODE_ADDR6, port)),
        }
    }

    /// The client's address.
    pub fn client(self) -> IpAddr {
        match self {
            Family::V4 => CLIENT_ADDR.into(),
            Family::V6 => CLIENT_ADDR6.into(),
        }
    }

    pub fn unspecified(self) -> IpAddr {
        match self {
            Family::V4 => Ipv4Addr::UNSPECIFIED.into(),
            Family::V6 => Ipv6Addr::UNSPECIFIED.into(),
        }
    }

    /// A UDP socket on an ephemeral port of this family.
    pub fn udp_socket(self) -> anyhow::Result<UdpSocket> {
        match self {
            Family::V4 => udp_socket(),
            Family::V6 => udp_socket6(),
        }
    }

    /// Pod `index`'s address in a config's `backends:` list.
    pub fn backend_addr(self, index: u8) -> IpAddr {
        match self {
            Family::V4 => Ipv4Addr::new(198, 18, index, 2).into(),
            Family::V6 => backend_addr6(index).into(),
        }
    }

    /// `backend`'s pod address and the node's address on its link (what a
    /// masqueraded flow shows the pod) in this family.
    pub fn pod_and_node(self, backend: &Backend) -> (IpAddr, IpAddr) {
        match self {
            Family::V4 => (backend.addr.into(), backend.node_addr.into()),
            Family::V6 => (backend.addr6.into(), backend.node_addr6.into()),
        }
    }

    /// The largest UDP payload one 1500-byte frame carries.
    pub fn max_udp_payload(self) -> usize {
        match self {
            Family::V4 => 1500 - 20 - 8,
            Family::V6 => 1500 - 40 - 8,
        }
    }

    /// How printed figures name the family ("" for IPv4).
    pub fn over(self) -> &'static str {
        match self {
            Family::V4 => "",
            Family::V6 => " over IPv6",
        }
    }
}
