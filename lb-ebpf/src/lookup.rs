//! Service lookup: which frontend, if any, a packet is addressed to.

use lb_common::{NodeAddr, Service, ServiceKey, service::ADDR_ANY_NODE};

use crate::maps::{XLB_NODE_ADDRS, XLB_SERVICES};

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
