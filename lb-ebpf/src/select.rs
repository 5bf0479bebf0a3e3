//! Backend selection: a flow hash indexes the service's slot table, which the
//! agent fills in proportion to backend weights.

use lb_common::{Backend, Flow, Service, service::BACKEND_F_ACTIVE};

use crate::maps::{XLB_BACKENDS, XLB_SELECT};

/// The backend for a new flow with hash `hash`, if the service has one.
#[inline(always)]
pub fn backend_for(service: &Service, hash: u32) -> Option<(u32, Backend)> {
    if service.table_size == 0 {
        return None;
    }
    let slot = service.table_offset.wrapping_add(hash % service.table_size);
    let id = *XLB_SELECT.get(slot)?;
    let backend = *XLB_BACKENDS.get(id)?;
    if backend.flags & BACKEND_F_ACTIVE == 0 {
        return None;
    }
    Some((id, backend))
}

/// Whether the backend a flow was sent to is still there, so the flow's
/// packets never go to a removed backend or one whose id was reused.
#[inline(always)]
pub fn backend_still_serves(flow: &Flow) -> bool {
    match XLB_BACKENDS.get(flow.backend_id) {
        Some(backend) => {
            backend.flags & BACKEND_F_ACTIVE != 0
                && backend.addr_be == flow.new_dst_addr_be
                && backend.port_be == flow.new_dst_port_be
        }
        None => false,
    }
}
