//! Service lookup: which frontend, if any, a packet is addressed to, and
//! whether its source may open a flow there.

use aya_ebpf::maps::lpm_trie::Key;
use lb_common::{
    NodeAddr, Service, ServiceKeyOf, SourceRangeOf,
    maps::{PORTS_ON, port_bit},
    service::SERVICE_F_SOURCE_RANGES,
};

use crate::{family::Ip, maps::XLB_PORTS};

/// Whether a packet between these ports cannot be xlb's (`XLB_PORTS`, once
/// the agent has written it): every flow's original tuple has a frontend
/// port as destination and its reply tuple a backend's port as source, and
/// every service key a frontend port, so with neither port listed no lookup
/// can find anything. Array lookups only (the verifier inlines them).
#[inline(always)]
pub fn not_ours(src_port_be: u16, dst_port_be: u16) -> bool {
    match XLB_PORTS.get(PORTS_ON) {
        Some(&on) if on != 0 => !listed(dst_port_be) && !listed(src_port_be),
        _ => false,
    }
}

#[inline(always)]
fn listed(port_be: u16) -> bool {
    let (word, bit) = port_bit(u16::from_be(port_be));
    match XLB_PORTS.get(word) {
        Some(&bits) => bits & bit != 0,
        None => true,
    }
}

/// The service for (destination address, port, protocol): an exact frontend
/// first (LoadBalancer / external IPs), then a NodePort on a node address
/// (service key address all zeros: `ADDR_ANY_NODE` for IPv4).
#[inline(always)]
pub fn service_for<F: Ip>(dst_addr_be: F::Addr, dst_port_be: u16, proto: u8) -> Option<Service> {
    let key = ServiceKeyOf::<F> {
        addr_be: dst_addr_be,
        port_be: dst_port_be,
        proto,
        _pad: 0,
    };
    if let Some(service) = F::services().get_ptr(key) {
        // SAFETY: map values are plain integers; a torn read picks a valid service.
        return Some(unsafe { *service });
    }
    F::node_addrs()
        .get_ptr(dst_addr_be)
        .map(|_: *const NodeAddr| ())?;
    let mut node_port = key;
    F::clear_addr(&mut node_port.addr_be);
    // SAFETY: as above.
    F::services()
        .get_ptr(&node_port)
        .map(|service| unsafe { *service })
}

/// loadBalancerSourceRanges: with the flag set, only sources inside one of
/// the service's prefixes may open flows.
#[inline(always)]
pub fn source_allowed<F: Ip>(service: &Service, src_addr_be: F::Addr) -> bool {
    if service.flags & SERVICE_F_SOURCE_RANGES == 0 {
        return true;
    }
    // The whole key: the service id's 32 bits and every address bit.
    let key = Key::new(
        32 + 32 * F::WORDS as u32,
        SourceRangeOf::<F> {
            service_id: service.id,
            addr_be: src_addr_be,
        },
    );
    F::source_ranges().get(&key).is_some()
}
