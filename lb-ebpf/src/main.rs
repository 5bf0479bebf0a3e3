//! xlb's XDP entry point: parse, find the flow or the service, choose a
//! backend, rewrite, forward; count every packet under one reason.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod conntrack;
#[cfg(target_arch = "bpf")]
mod fib;
#[cfg(target_arch = "bpf")]
mod frag;
#[cfg(target_arch = "bpf")]
mod icmp;
#[cfg(target_arch = "bpf")]
mod lookup;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod mtu;
#[cfg(target_arch = "bpf")]
mod nat;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod reject;
#[cfg(target_arch = "bpf")]
mod related;
#[cfg(target_arch = "bpf")]
mod select;
#[cfg(target_arch = "bpf")]
mod sock;
#[cfg(target_arch = "bpf")]
mod tc;

#[cfg(target_arch = "bpf")]
mod prog {
    use aya_ebpf::{
        Global, bindings::xdp_action, helpers::bpf_ktime_get_coarse_ns, macros::xdp,
        programs::XdpContext,
    };
    use aya_log_ebpf::debug;
    use lb_common::{
        Flow, FlowKey, IPPROTO_TCP, Reason,
        flow::FLOW_DIR_REPLY,
        hash::flow_hash,
        reason::Verdict,
        service::{CONFIG_F_READY, SERVICE_F_DROP_IF_EMPTY, SERVICE_F_MASQUERADE},
    };

    use crate::{
        conntrack::{self, NewFlow},
        fib, frag, icmp, lookup,
        maps::{XLB_CONFIG, count, count_path, count_traffic},
        mtu, nat,
        parse::{self, Packet, TCP_ACK, TCP_SYN},
        reject, select,
    };

    /// 1 when the agent runs with `--datapath-debug` (set at load with
    /// `EbpfLoader::override_global`). It lives in read-only data, so with 0
    /// the verifier removes the logging branches: no cost when off.
    #[unsafe(no_mangle)]
    static XLB_DEBUG: Global<u32> = Global::new(0);

    #[inline(always)]
    fn debug_logs() -> bool {
        XLB_DEBUG.load() != 0
    }

    #[xdp]
    pub fn xlb(ctx: XdpContext) -> u32 {
        let (action, reason) = match try_xlb(&ctx) {
            Ok(done) => done,
            Err(reason) => (action_for(reason), reason),
        };
        count(reason);
        if debug_logs() {
            debug!(&ctx, "verdict {} action {}", reason as u32, action);
        }
        action
    }

    #[inline(always)]
    fn action_for(reason: Reason) -> u32 {
        match reason.verdict() {
            Verdict::Drop => xdp_action::XDP_DROP,
            // A Forward reason only reaches here with its action already set.
            Verdict::Pass | Verdict::Forward | Verdict::Reject => xdp_action::XDP_PASS,
        }
    }

    #[inline(always)]
    fn try_xlb(ctx: &XdpContext) -> Result<(u32, Reason), Reason> {
        let cfg = match XLB_CONFIG.get(0) {
            Some(cfg) if cfg.flags & CONFIG_F_READY != 0 => *cfg,
            _ => return Err(Reason::PassNotReady),
        };
        // SAFETY: no preconditions. The coarse clock (tick resolution) is
        // plenty for idle timeouts and costs a fraction of the precise one.
        let now = unsafe { bpf_ktime_get_coarse_ns() };
        let packet = match parse::parse(ctx) {
            Ok(packet) => packet,
            // ICMP errors and later fragments of flows are related packets.
            Err(Reason::PassNotTcpUdp) => return icmp::translate(ctx, &cfg, now),
            Err(Reason::PassFragment) => return frag::follow(ctx, &cfg, now),
            Err(reason) => return Err(reason),
        };
        let key = flow_key(&packet);
        if packet.ip.first_fragment() {
            frag::remember(&packet, &key, now);
        }
        let syn = packet.l4.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;

        if let Some(flow) = conntrack::lookup(&key, &cfg, now) {
            // SAFETY: valid map value pointer for this run.
            let current = unsafe { *flow };
            let reply = current.direction == FLOW_DIR_REPLY;
            let restart = syn && conntrack::is_closed(&current);
            if reply || (!restart && select::backend_still_serves(&current)) {
                let recheck = conntrack::track(flow, key.proto, packet.l4.tcp_flags, now);
                let reason = if reply {
                    Reason::FwdReply
                } else {
                    Reason::FwdEstablished
                };
                return forward(ctx, &packet, flow, &current, recheck, reason);
            }
            // A closed flow's tuple reused by a new SYN, or a flow whose
            // backend is gone: choose again, as for a new flow.
        }

        let service = lookup::service_for(key.dst_addr_be, key.dst_port_be, key.proto)
            .ok_or(Reason::PassNotService)?;
        if !lookup::source_allowed(&service, key.src_addr_be) {
            return Err(Reason::DropSourceRange);
        }
        if key.proto == IPPROTO_TCP && !syn {
            return Err(Reason::PassTcpNoFlow);
        }
        let hash = flow_hash(&key, cfg.hash_seed);
        let Some((backend_id, backend)) =
            select::backend_for_client(&service, key.src_addr_be, hash, now)
        else {
            if service.flags & SERVICE_F_DROP_IF_EMPTY != 0 {
                return Err(Reason::DropNoBackend);
            }
            return reject::reject(ctx, &packet);
        };
        check_ttl(&packet)?;
        let (hop, masquerade_addr) = fib::hop_to_backend(
            ctx,
            backend_id,
            &backend,
            key.src_addr_be,
            key.proto,
            tot_len(&packet),
            now,
        )?;
        let masquerade_addr_be = if service.flags & SERVICE_F_MASQUERADE == 0 {
            None
        } else if masquerade_addr != 0 {
            Some(masquerade_addr)
        } else {
            // No address on the way to the backend: nothing to masquerade as.
            return Err(Reason::PassFibFailed);
        };
        let new = NewFlow {
            service_id: service.id,
            backend_id,
            backend,
            masquerade_addr_be,
            syn,
            hop,
        };
        let flow = conntrack::create(&key, &new, &cfg, now)?;
        if debug_logs() {
            debug!(
                ctx,
                "new flow proto {} {:i}:{} -> {:i}:{} to backend {} {:i}:{}",
                key.proto,
                u32::from_be(key.src_addr_be),
                u16::from_be(key.src_port_be),
                u32::from_be(key.dst_addr_be),
                u16::from_be(key.dst_port_be),
                backend_id,
                u32::from_be(flow.new_dst_addr_be),
                u16::from_be(flow.new_dst_port_be)
            );
        }
        if let Err(verdict) = mtu::check(ctx, &packet, &hop) {
            return verdict;
        }
        nat::rewrite(&packet, &flow);
        count_traffic(service.id, backend_id, false, frame_len(ctx));
        let (action, path) = fib::send(ctx, packet.eth, &hop)?;
        count_path(backend_id, false, path);
        Ok((action, Reason::FwdNewFlow))
    }

    /// Sends a packet of a known flow on, rewritten as the flow says, to the
    /// next hop cached in its entry (asking the FIB when it is due).
    #[inline(always)]
    fn forward(
        ctx: &XdpContext,
        packet: &Packet,
        entry: *mut Flow,
        flow: &Flow,
        recheck: bool,
        reason: Reason,
    ) -> Result<(u32, Reason), Reason> {
        check_ttl(packet)?;
        let hop = match conntrack::cached_hop(flow) {
            Some(hop) if !recheck => hop,
            _ => {
                let hop = fib::next_hop(
                    ctx.ctx.cast(),
                    ctx.ingress_ifindex() as u32,
                    flow.new_src_addr_be,
                    flow.new_dst_addr_be,
                    packet.ip.proto,
                    tot_len(packet),
                    false,
                )?;
                conntrack::remember_hop(entry, &hop);
                hop
            }
        };
        if let Err(verdict) = mtu::check(ctx, packet, &hop) {
            return verdict;
        }
        nat::rewrite(packet, flow);
        let to_client = flow.direction == FLOW_DIR_REPLY;
        count_traffic(flow.service_id, flow.backend_id, to_client, frame_len(ctx));
        let (action, path) = fib::send(ctx, packet.eth, &hop)?;
        count_path(flow.backend_id, to_client, path);
        Ok((action, reason))
    }

    #[inline(always)]
    pub(crate) fn flow_key(packet: &Packet) -> FlowKey {
        let (src_port_be, dst_port_be) = packet.l4.ports_be();
        // SAFETY: the parser checked the IPv4 header is inside the packet.
        let (src, dst) = unsafe { ((*packet.ip.hdr).src_addr, (*packet.ip.hdr).dst_addr) };
        FlowKey {
            src_addr_be: u32::from_ne_bytes(src),
            dst_addr_be: u32::from_ne_bytes(dst),
            src_port_be,
            dst_port_be,
            proto: packet.ip.proto,
            _pad: [0; 3],
        }
    }

    /// We forward like a router: a packet that would leave with TTL 0 is
    /// dropped here rather than sent.
    #[inline(always)]
    pub(crate) fn check_ttl(packet: &Packet) -> Result<(), Reason> {
        // SAFETY: the parser checked the IPv4 header is inside the packet.
        if unsafe { (*packet.ip.hdr).ttl } <= 1 {
            return Err(Reason::DropTtlExpired);
        }
        Ok(())
    }

    #[inline(always)]
    fn frame_len(ctx: &XdpContext) -> u64 {
        (ctx.data_end() - ctx.data()) as u64
    }

    #[inline(always)]
    fn tot_len(packet: &Packet) -> u16 {
        // SAFETY: the parser checked the IPv4 header is inside the packet.
        u16::from_be_bytes(unsafe { (*packet.ip.hdr).tot_len })
    }

    #[cfg(not(test))]
    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 4] = *b"GPL\0";
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
