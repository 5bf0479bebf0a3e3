//! Backend selection: a flow hash indexes the service's slot table, which the
//! agent fills in proportion to backend weights (Maglev); sessionAffinity
//! ClientIP pins a client's new flows to the backend of its last one.

use aya_ebpf::bindings::BPF_ANY;
use lb_common::{
    AffinityKeyOf, AffinityOf, BackendOf, FlowOf, Service,
    service::{BACKEND_F_ACTIVE, BACKEND_F_TERMINATING, SERVICE_F_AFFINITY},
};

use crate::{family::Ip, maps::XLB_SELECT};

/// The backend for a new flow with hash `hash`, if the service has one.
/// The table's ids index the service's family's backends.
#[inline(always)]
pub fn backend_for<F: Ip>(service: &Service, hash: u32) -> Option<(u32, BackendOf<F>)> {
    if service.table_size == 0 {
        return None;
    }
    // Two lookups: the service's table, then its slot. A table and the
    // entries pointing at it change size together only by moving to a new
    // `table_id` (the agent never resizes a table in place), so the slot is
    // always inside the table this lookup finds.
    let id = *XLB_SELECT.get_value(service.table_id, &(hash % service.table_size))?;
    let backend = *F::backends().get(id)?;
    if backend.flags & BACKEND_F_ACTIVE == 0 {
        return None;
    }
    Some((id, backend))
}

/// The backend for a new flow from `client`: with ClientIP affinity, the
/// one the client's last flow went to while that is recent and the backend
/// still takes new flows; otherwise `backend_for`, remembered.
#[inline(always)]
pub fn backend_for_client<F: Ip>(
    service: &Service,
    client: &F::Addr,
    hash: u32,
    now: u64,
) -> Option<(u32, BackendOf<F>)> {
    if service.flags & SERVICE_F_AFFINITY == 0 {
        return backend_for::<F>(service, hash);
    }
    let key = AffinityKeyOf::<F> {
        service_id: service.id,
        client_addr_be: *client,
    };
    if let Some(entry) = F::affinity().get_ptr_mut(&key) {
        // SAFETY: valid LRU value pointer for this run; plain integers.
        let entry = unsafe { &mut *entry };
        let timeout_ns = u64::from(service.affinity_timeout_s) * 1_000_000_000;
        if now.saturating_sub(entry.last_seen_ns) <= timeout_ns {
            if let Some(backend) = F::backends().get(entry.backend_id) {
                let usable = BACKEND_F_ACTIVE | BACKEND_F_TERMINATING;
                let same = backend.addr_be == entry.backend_addr_be
                    && backend.port_be == entry.backend_port_be;
                if same && backend.flags & usable == BACKEND_F_ACTIVE {
                    entry.last_seen_ns = now;
                    return Some((entry.backend_id, *backend));
                }
            }
        }
    }
    let (id, backend) = backend_for::<F>(service, hash)?;
    let affinity = AffinityOf::<F> {
        backend_id: id,
        backend_addr_be: backend.addr_be,
        _pad_addr: Default::default(),
        last_seen_ns: now,
        backend_port_be: backend.port_be,
        _pad: [0; 6],
    };
    // Losing the record only costs the client its stickiness once.
    let _ = F::affinity().insert(&key, &affinity, u64::from(BPF_ANY));
    Some((id, backend))
}

/// Whether the backend a flow was sent to is still there, so the flow's
/// packets never go to a removed backend or one whose id was reused.
/// Terminating backends keep their flows.
#[inline(always)]
pub fn backend_still_serves<F: Ip>(flow: &FlowOf<F>) -> bool {
    match F::backends().get(flow.backend_id) {
        Some(backend) => {
            backend.flags & BACKEND_F_ACTIVE != 0
                && backend.addr_be == flow.new_dst_addr_be
                && backend.port_be == flow.new_dst_port_be
        }
        None => false,
    }
}
