//! IPv6's pipeline (`Ip::OUTLINE`), the same stages as IPv4's but flat:
//! each stage is a BPF function called from the entry, never from another
//! stage, and a new flow waits between its stages in `XLB_SCRATCH6`. The
//! verifier allows 512 bytes of stack for a whole call chain, and IPv6's
//! keys and entries make a stage's frame several hundred bytes; nested as
//! IPv4's stages are, they would not fit. A live flow's packet, the common
//! case, takes one stage as in IPv4 (`known_stage`): each BPF call costs a
//! call and a return (through a return thunk on this kind of machine).

use aya_ebpf::programs::XdpContext;
use lb_common::{FlowKeyOf, Reason};

use crate::{
    conntrack::{self, NewFlow, Segment},
    family::Ip,
    maps::{SCRATCH_CHOSEN, SCRATCH_KEY, SCRATCH_NEW_FLOW, scratch},
    mtu,
    parse::{IpHeader as _, Packet, TCP_ACK, TCP_SYN},
    prog::{
        Chosen, NO_FLOW, OPENED, choose_backend, config, debug_logs, flow_key, follow, forward,
        forward_outlined, pack, pack_forward, route_new_flow,
    },
};

/// `choose_stage`'s answer for a service with no backend whose packets
/// are rejected: `reject_stage` answers.
const REJECT: u64 = u64::MAX - 2;

/// A TCP/UDP packet: its flow, or a new one.
#[inline(always)]
pub fn balance<F: Ip>(ctx: &XdpContext, packet: &Packet<F>, now: u64) -> u64 {
    let Some(key) = scratch::<FlowKeyOf<F>>(SCRATCH_KEY) else {
        return pack(Err(Reason::PassNotReady));
    };
    // SAFETY: this CPU's scratch slot, sized for a key; the stages only
    // read it.
    let key = unsafe {
        *key = flow_key(packet);
        &*key
    };
    let known = known_stage(ctx, packet, key, now);
    if known != NO_FLOW {
        return sent(ctx, known);
    }
    let chosen = choose_stage(packet, key, now);
    if chosen == REJECT {
        return reject_stage(ctx, packet);
    }
    if chosen != OPENED {
        return chosen;
    }
    let routed = route_stage(ctx, packet, key, now);
    if routed != OPENED {
        return routed;
    }
    let created = create_stage(ctx, packet, key, now);
    if created != OPENED {
        return created;
    }
    if debug_logs() {
        log_stage(ctx, key);
    }
    match conntrack::created(key) {
        Some(entry) => {
            let no_recheck = pack_forward(false, Reason::FwdNewFlow);
            sent(ctx, forward_outlined(ctx, packet, entry, no_recheck))
        }
        None => pack(Err(Reason::DropFlowInsert)),
    }
}

/// `forwarded`, the answer of `forward_outlined`, unless the packet did not
/// fit its next hop (`mtu::check6`): then `too_big_stage`'s.
#[inline(always)]
fn sent(ctx: &XdpContext, forwarded: u64) -> u64 {
    if forwarded == pack(Err(Reason::RejectFragNeeded)) {
        return too_big_stage(ctx);
    }
    forwarded
}

/// ICMPv6 packet too big for a packet over its next hop's MTU: a stage of
/// its own (the answer's headers do not fit beside forwarding's frame).
#[inline(never)]
fn too_big_stage(ctx: &XdpContext) -> u64 {
    pack(mtu::too_big6(ctx))
}

/// A packet of a live flow, forwarded as the flow says: lookup, `follow`
/// and `forward` in one BPF function, as IPv4's known-flow path (three
/// stages cost 10 ns more per packet); `NO_FLOW` for a packet of no live
/// flow (or one that starts a new flow instead). A first fragment's ports
/// are remembered here for the datagram's later fragments (`xlb6_frag`):
/// in the stage every packet takes, not behind a branch of the entry's,
/// which would leave the verifier two states to walk the pipeline from.
#[inline(never)]
fn known_stage<F: Ip>(ctx: &XdpContext, packet: &Packet<F>, key: &FlowKeyOf<F>, now: u64) -> u64 {
    let Ok(cfg) = config() else {
        return NO_FLOW;
    };
    if packet.ip.first_fragment() {
        F::remember_fragment(packet, key, now);
    }
    let Some(entry) = conntrack::lookup(key, cfg, now) else {
        return NO_FLOW;
    };
    let Some((entry, recheck, reason)) = follow(ctx, packet, key, entry, cfg, now) else {
        return NO_FLOW;
    };
    // SAFETY: valid map value pointer for this run.
    let flow = unsafe { &*entry };
    pack(forward(ctx, packet, entry, flow, recheck, reason))
}

/// Service and backend of a new flow, into the scratch space: `OPENED`,
/// or the packet's verdict.
#[inline(never)]
fn choose_stage<F: Ip>(packet: &Packet<F>, key: &FlowKeyOf<F>, now: u64) -> u64 {
    let (Ok(cfg), Some(slot)) = (config(), scratch::<Chosen<F>>(SCRATCH_CHOSEN)) else {
        return pack(Err(Reason::PassNotReady));
    };
    let syn = packet.l4.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    match choose_backend(key, cfg, syn, now) {
        Ok(Some(chosen)) => {
            // SAFETY: this CPU's scratch slot, sized for a `Chosen`.
            unsafe { *slot = chosen };
            OPENED
        }
        Ok(None) => REJECT,
        Err(verdict) => pack(verdict),
    }
}

/// The answer to a new flow's packet to a service with no backend (ICMPv6
/// port unreachable, TCP RST), built over the frame: a stage of its own,
/// as the headers it builds do not fit beside backend selection's frame.
#[inline(never)]
fn reject_stage<F: Ip>(ctx: &XdpContext, packet: &Packet<F>) -> u64 {
    pack(F::reject(ctx, packet))
}

/// Masquerade address and next hop of the new flow `choose_stage` left in
/// the scratch space, into the scratch space as the flow to record:
/// `OPENED`, or the packet's verdict. A stage of its own: the FIB lookup's
/// frame does not fit beside backend selection's (session affinity).
#[inline(never)]
fn route_stage<F: Ip>(ctx: &XdpContext, packet: &Packet<F>, key: &FlowKeyOf<F>, now: u64) -> u64 {
    let (Some(chosen), Some(slot)) = (
        scratch::<Chosen<F>>(SCRATCH_CHOSEN),
        scratch::<NewFlow<F>>(SCRATCH_NEW_FLOW),
    ) else {
        return pack(Err(Reason::PassNotReady));
    };
    // SAFETY: this CPU's scratch slot, written by `choose_stage` in this
    // run (nothing else runs on this CPU in between).
    match route_new_flow(ctx, packet, key, unsafe { &*chosen }, now) {
        Ok(new) => {
            // SAFETY: this CPU's scratch slot, sized for a `NewFlow`; apart
            // from the `Chosen` one.
            unsafe { *slot = new };
            OPENED
        }
        Err(verdict) => pack(verdict),
    }
}

/// Records the new flow `route_stage` left in the scratch space:
/// `OPENED`, or the packet's verdict.
#[inline(never)]
fn create_stage<F: Ip>(ctx: &XdpContext, packet: &Packet<F>, key: &FlowKeyOf<F>, now: u64) -> u64 {
    let (Ok(cfg), Some(slot)) = (config(), scratch::<NewFlow<F>>(SCRATCH_NEW_FLOW)) else {
        return pack(Err(Reason::PassNotReady));
    };
    // SAFETY: this CPU's scratch slot, written by `route_stage` in this
    // run (nothing else runs on this CPU in between).
    let new = unsafe { &*slot };
    let segment = Segment::of(ctx, packet);
    if let Err(reason) = conntrack::create(key, new, &segment, cfg, now) {
        return pack(Err(reason));
    }
    OPENED
}

/// `--datapath-debug`'s line about the new flow in the scratch space: a
/// stage of its own, as the log's record does not fit beside the others.
#[inline(never)]
fn log_stage<F: Ip>(ctx: &XdpContext, key: &FlowKeyOf<F>) {
    if let Some(slot) = scratch::<NewFlow<F>>(SCRATCH_NEW_FLOW) {
        // SAFETY: this CPU's scratch slot, written by `route_stage` in
        // this run.
        let new = unsafe { &*slot };
        F::log_new_flow(ctx, key, new.backend_id, &new.backend);
    }
}
