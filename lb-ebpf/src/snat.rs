//! Masquerade ports: a new flow's reply tuple is taken by inserting its
//! REPLY entry with BPF_NOEXIST at pseudo-random ports of the range until
//! one is free (or reclaimed from a dead or idle holder).

use aya_ebpf::bindings::BPF_NOEXIST;
use lb_common::{FlowKeyOf, FlowOf, GlobalConfig, IPPROTO_TCP, Reason, hash::flow_hash};

use crate::{conntrack::free_or_reclaimed, family::Ip};

/// Masquerade ports tried per new flow before giving up: with the range
/// half full, 16 tries fail once in 65,536 new flows.
const SNAT_PORT_TRIES: u32 = 16;
/// `-EEXIST` from a map update with BPF_NOEXIST: the key is taken.
const EEXIST: i32 = -17;

/// Takes a masquerade source port for `original`: inserts `reply` under the
/// tuple the backend's replies will carry with BPF_NOEXIST, so two CPUs can
/// never give two clients the same reply tuple; on EEXIST, another port.
#[inline(always)]
pub(crate) fn take_port<F: Ip>(
    key: &FlowKeyOf<F>,
    reply_key: &mut FlowKeyOf<F>,
    reply: &FlowOf<F>,
    cfg: &GlobalConfig,
    now: u64,
) -> Result<(), Reason> {
    let (min, max) = (u32::from(cfg.snat_port_min), u32::from(cfg.snat_port_max));
    let span = if max >= min { max - min + 1 } else { 1 };
    let start = flow_hash(key, cfg.hash_key().derived(0x9e37_79b9));
    for attempt in 0..SNAT_PORT_TRIES {
        // Each try lands on a pseudo-random port of its own: with one fixed
        // stride for every flow, taken ports line up in runs (linear
        // probing's clustering) and a flood exhausts far more often than
        // the range's fill says (0.3% of a SYN flood's flows, measured).
        let mixed = (start ^ attempt.wrapping_mul(0x9e37_79b9)).wrapping_mul(0x85eb_ca6b);
        let offset = (mixed ^ (mixed >> 15)) % span;
        let port_be = ((min + offset) as u16).to_be();
        reply_key.dst_port_be = port_be;
        let tried = if F::OUTLINE {
            unpack_try(try_port_outlined(key, reply_key, reply, cfg, now))
        } else {
            try_port(key, reply_key, reply, cfg, now)
        };
        match tried {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(reason) => return Err(reason),
        }
    }
    Err(Reason::DropSnatExhausted)
}

/// One try of `take_port` at the port in `reply_key`: `Ok(true)` once the
/// reply entry is in under it, `Ok(false)` when the port is taken.
#[inline(always)]
fn try_port<F: Ip>(
    key: &FlowKeyOf<F>,
    reply_key: &FlowKeyOf<F>,
    reply: &FlowOf<F>,
    cfg: &GlobalConfig,
    now: u64,
) -> Result<bool, Reason> {
    let (flows, flows_new) = (F::flows(), F::flows_new());
    if !free_or_reclaimed(flows, reply_key, key, cfg, now) {
        return Ok(false);
    }
    if key.proto == IPPROTO_TCP {
        if !free_or_reclaimed(flows_new, reply_key, key, cfg, now) {
            return Ok(false);
        }
        match flows_new.insert(reply_key, reply, u64::from(BPF_NOEXIST)) {
            Ok(()) => {}
            Err(EEXIST) => return Ok(false),
            Err(_) => return Err(Reason::DropFlowInsert),
        }
        // A flow confirmed meanwhile on another CPU may have moved this
        // tuple to XLB_FLOWS between the check and the insert.
        if flows.get_ptr(reply_key).is_some() {
            let _ = flows_new.remove(reply_key);
            return Ok(false);
        }
        return Ok(true);
    }
    match flows.insert(reply_key, reply, u64::from(BPF_NOEXIST)) {
        Ok(()) => Ok(true),
        Err(EEXIST) => Ok(false),
        Err(_) => Err(Reason::DropFlowInsert),
    }
}

/// `try_port` as a BPF function of its own (`Ip::OUTLINE`), verified once
/// per try rather than with every path of the tries before it: 0 taken,
/// 1 free, else 2 and the reason.
#[inline(never)]
fn try_port_outlined<F: Ip>(
    key: &FlowKeyOf<F>,
    reply_key: &FlowKeyOf<F>,
    reply: &FlowOf<F>,
    cfg: &GlobalConfig,
    now: u64,
) -> u64 {
    match try_port(key, reply_key, reply, cfg, now) {
        Ok(false) => 0,
        Ok(true) => 1,
        Err(reason) => 2 | (reason as u64) << 8,
    }
}

#[inline(always)]
fn unpack_try(packed: u64) -> Result<bool, Reason> {
    match packed {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(Reason::from_index((packed >> 8) as u32).unwrap_or(Reason::DropFlowInsert)),
    }
}
