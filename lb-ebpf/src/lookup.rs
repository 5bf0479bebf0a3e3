//! Service lookup: which frontend, if any, a packet is addressed to, and
//! whether its source may open a flow there.

use aya_ebpf::maps::lpm_trie::Key;
use lb_common::{
    NodeAddr, Service, ServiceKey, SourceRange,
    service::{ADDR_ANY_NODE, SERVICE_F_SOURCE_RANGES},
};

use crate::maps::{XLB_NODE_ADDRS, XLB_SERVICES, XLB_SOURCE_RANGES};

/// The service for (destination address, port, protocol): an exact frontend
/// first (LoadBalancer / external IPs), then a NodePort on a node address.
#[inline(always)]
pub fn service_for(dst_addr_be: u32, dst_port_be: u16, proto: u8) -> Option<Service> {
    let key = ServiceKey {
        addr_be: dst_addr_be,
        port_be: dst_port_be,
        proto,
        _pad: 0,
    };
    if let Some(service) = XLB_SERVICES.get_ptr(key) {
        // SAFETY: map values are plain integers; a torn read picks a valid service.
        return Some(unsafe { *service });
    }
    XLB_NODE_ADDRS
        .get_ptr(dst_addr_be)
        .map(|_: *const NodeAddr| ())?;
    let node_port = ServiceKey {
        addr_be: ADDR_ANY_NODE,
        ..key
    };
    // SAFETY: as above.
    XLB_SERVICES
        .get_ptr(node_port)
        .map(|service| unsafe { *service })
}

/// loadBalancerSourceRanges: with the flag set, only sources inside one of
/// the service's prefixes may open flows.
#[inline(always)]
pub fn source_allowed(service: &Service, src_addr_be: u32) -> bool {
    if service.flags & SERVICE_F_SOURCE_RANGES == 0 {
        return true;
    }
    let key = Key::new(
        64,
        SourceRange {
            service_id: service.id,
            addr_be: src_addr_be,
        },
    );
    XLB_SOURCE_RANGES.get(&key).is_some()
}
