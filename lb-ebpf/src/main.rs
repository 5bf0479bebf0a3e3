//! xlb's XDP entry point: parse, find the flow or the service, choose a
//! backend, rewrite, forward; count every packet under one reason.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

#[cfg(target_arch = "bpf")]
mod answer;
#[cfg(target_arch = "bpf")]
mod answer6;
#[cfg(target_arch = "bpf")]
mod conntrack;
#[cfg(target_arch = "bpf")]
mod family;
#[cfg(target_arch = "bpf")]
mod fib;
#[cfg(target_arch = "bpf")]
mod flat;
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
mod snat;
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
        BackendOf, FlowKeyOf, FlowOf, GlobalConfig, IPPROTO_TCP, Reason, V4,
        flow::FLOW_DIR_REPLY,
        hash::flow_hash,
        maps::{PROGS6_FRAG, PROGS6_ICMP, PROGS6_IPV6},
        reason::Verdict,
        service::{CONFIG_F_READY, SERVICE_F_DROP_IF_EMPTY, SERVICE_F_MASQUERADE},
    };
    use network_types::eth::{EthHdr, EtherType};

    use crate::{
        conntrack::{self, NewFlow, Segment},
        family::{Ip, Verdict as Answer},
        fib, frag, icmp, lookup,
        maps::{XLB_CONFIG, XLB_PROGS6, count, count_path, count_traffic, forget},
        nat,
        parse::{self, IpHeader, Packet, TCP_ACK, TCP_SYN},
        select,
    };

    /// 1 when the agent runs with `--datapath-debug` (set at load with
    /// `EbpfLoader::override_global`). It lives in read-only data, so with 0
    /// the verifier removes the logging branches: no cost when off.
    #[unsafe(no_mangle)]
    static XLB_DEBUG: Global<u32> = Global::new(0);

    #[inline(always)]
    pub(crate) fn debug_logs() -> bool {
        XLB_DEBUG.load() != 0
    }

    /// The entry point only parses and dispatches; each path (new flow,
    /// known flow, ICMP error, later fragment) is a BPF function of its own
    /// (`#[inline(never)]`), so only one path's locals are on the stack at a
    /// time: the verifier allows 512 bytes for the whole call chain.
    #[xdp]
    pub fn xlb(ctx: XdpContext) -> u32 {
        let (action, reason) = unpack(dispatch(&ctx));
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

    /// A path's outcome in one register (a BPF function returns one):
    /// the XDP action in the high half, the reason in the low half.
    #[inline(always)]
    pub(crate) fn pack(result: Result<(u32, Reason), Reason>) -> u64 {
        let (action, reason) = match result {
            Ok(done) => done,
            Err(reason) => (action_for(reason), reason),
        };
        (u64::from(action) << 32) | reason as u64
    }

    #[inline(always)]
    pub(crate) fn unpack(packed: u64) -> (u32, Reason) {
        let reason = Reason::from_index(packed as u32).unwrap_or(Reason::PassMalformed);
        ((packed >> 32) as u32, reason)
    }

    /// The configuration the agent wrote, by reference into its map (never
    /// copied onto the stack).
    #[inline(always)]
    pub(crate) fn config() -> Result<&'static GlobalConfig, Reason> {
        match XLB_CONFIG.get(0) {
            Some(cfg) if cfg.flags & CONFIG_F_READY != 0 => Ok(cfg),
            _ => Err(Reason::PassNotReady),
        }
    }

    #[inline(always)]
    pub(crate) fn clock() -> u64 {
        // SAFETY: no preconditions. The coarse clock (tick resolution) is
        // plenty for idle timeouts and costs a fraction of the precise one.
        unsafe { bpf_ktime_get_coarse_ns() }
    }

    /// `known_flow_path`'s answer for a packet of no live flow.
    pub(crate) const NO_FLOW: u64 = u64::MAX;
    /// `open_flow_path`'s answer once the new flow is recorded.
    pub(crate) const OPENED: u64 = u64::MAX - 1;

    #[inline(always)]
    fn dispatch(ctx: &XdpContext) -> u64 {
        if let Err(reason) = config() {
            return pack(Err(reason));
        }
        let packet = match parse::parse(ctx) {
            Ok(packet) => packet,
            // ICMP errors and later fragments of flows are related packets.
            Err(Reason::PassNotTcpUdp) => return icmp_path(ctx, clock()),
            Err(Reason::PassFragment) => return frag_path(ctx, clock()),
            Err(Reason::PassNotIpv4) => return to_ipv6(ctx),
            Err(reason) => return pack(Err(reason)),
        };
        balance(ctx, &packet)
    }

    /// IPv6 frames go to `xlb6` (a tail call: it does not return);
    /// frames of neither family, or IPv6 while `XLB_PROGS6` is empty, are
    /// `pass_not_ipv4`.
    #[inline(always)]
    fn to_ipv6(ctx: &XdpContext) -> u64 {
        let ipv6 = match parse::ptr_at::<EthHdr, _>(ctx, 0) {
            // SAFETY: ptr_at checked the header is inside the packet.
            Ok(eth) => unsafe { (*eth).ether_type == EtherType::Ipv6 as u16 },
            Err(_) => false,
        };
        if ipv6 {
            // SAFETY: `ctx` is this program's context; on success the call
            // does not return.
            let _ = unsafe { XLB_PROGS6.tail_call(ctx, PROGS6_IPV6) };
        }
        pack(Err(Reason::PassNotIpv4))
    }

    /// IPv6's entry point (`XLB_PROGS6`), the same pipeline as IPv4's in
    /// its IPv6 instance.
    #[xdp]
    pub fn xlb6(ctx: XdpContext) -> u32 {
        let (action, reason) = unpack(dispatch6(&ctx));
        count(reason);
        if debug_logs() {
            log_verdict6(&ctx, reason as u32, action);
        }
        action
    }

    /// `--datapath-debug`'s line about an IPv6 packet's verdict: a BPF
    /// function of its own, walked by the verifier once for every way to
    /// it rather than inline after each.
    #[inline(never)]
    fn log_verdict6(ctx: &XdpContext, reason: u32, action: u32) {
        debug!(ctx, "ipv6 verdict {} action {}", reason, action);
    }

    #[inline(always)]
    fn dispatch6(ctx: &XdpContext) -> u64 {
        if let Err(reason) = config() {
            return pack(Err(reason));
        }
        match parse::parse6(ctx, forget) {
            Ok(packet) => balance(ctx, &packet),
            Err(Reason::PassNotTcpUdp) => to_icmp6(ctx),
            Err(Reason::PassFragment) => to_fragments(ctx),
            Err(reason) => pack(Err(reason)),
        }
    }

    /// ICMPv6 (and any other upper layer but TCP and UDP) goes to
    /// `xlb6_icmp` (a tail call: it does not return), which translates
    /// errors about flows and passes the rest; while `XLB_PROGS6` has no
    /// such program, it passes here as before, `pass_not_tcp_udp`.
    #[inline(always)]
    fn to_icmp6(ctx: &XdpContext) -> u64 {
        // SAFETY: `ctx` is this program's context; on success the call
        // does not return.
        let _ = unsafe { XLB_PROGS6.tail_call(ctx, PROGS6_ICMP) };
        pack(Err(Reason::PassNotTcpUdp))
    }

    /// A later fragment goes to `xlb6_frag` (a tail call: it does not
    /// return), whose frame is its own: `xlb6`'s new-flow stages leave no
    /// room for one more beside them. While `XLB_PROGS6` has no such
    /// program (an older agent's array), it passes as `pass_ipv6_fragment`.
    #[inline(always)]
    fn to_fragments(ctx: &XdpContext) -> u64 {
        // SAFETY: `ctx` is this program's context; on success the call
        // does not return.
        let _ = unsafe { XLB_PROGS6.tail_call(ctx, PROGS6_FRAG) };
        pack(Err(Reason::PassIpv6Fragment))
    }

    /// IPv6 later fragments of balanced datagrams (`XLB_PROGS6`, from
    /// `xlb6`): they follow their first fragment's flow (`frag::follow6`).
    #[xdp]
    pub fn xlb6_frag(ctx: XdpContext) -> u32 {
        let verdict = config().and_then(|cfg| frag::follow6(&ctx, cfg, clock()));
        let (action, reason) = unpack(pack(verdict));
        count(reason);
        if debug_logs() {
            log_verdict6(&ctx, reason as u32, action);
        }
        action
    }

    /// A TCP/UDP packet of either family: its flow, or a new one.
    #[inline(always)]
    fn balance<F: Ip>(ctx: &XdpContext, packet: &Packet<F>) -> u64 {
        // Most of a node's traffic is not xlb's: it leaves here, before the
        // clock and any hash lookup. A first fragment goes on (its ports are
        // remembered for the fragments that follow).
        let (src_port_be, dst_port_be) = packet.l4.ports_be();
        if !packet.ip.first_fragment() && lookup::not_ours(src_port_be, dst_port_be) {
            return pack(Err(Reason::PassNotService));
        }
        let now = clock();
        if F::OUTLINE {
            return crate::flat::balance(ctx, packet, now);
        }
        let known = known_flow_path(ctx, packet, now);
        if known != NO_FLOW {
            return known;
        }
        let opened = open_flow_path(ctx, packet, now);
        if opened != OPENED {
            return opened;
        }
        new_flow_send_path(ctx, packet)
    }

    /// A packet of a live flow goes on as the flow says; otherwise
    /// `NO_FLOW` (also for a closed flow's tuple reused by a new SYN, or a
    /// flow whose backend is gone: those choose again, as a new flow).
    #[inline(never)]
    fn known_flow_path<F: Ip>(ctx: &XdpContext, packet: &Packet<F>, now: u64) -> u64 {
        let cfg = match config() {
            Ok(cfg) => cfg,
            Err(reason) => return pack(Err(reason)),
        };
        let key = flow_key(packet);
        if packet.ip.first_fragment() {
            F::remember_fragment(packet, &key, now);
        }
        let Some(entry) = conntrack::lookup(&key, cfg, now) else {
            return NO_FLOW;
        };
        let Some((entry, recheck, reason)) = follow(ctx, packet, &key, entry, cfg, now) else {
            return NO_FLOW;
        };
        // SAFETY: valid map value pointer for this run.
        let flow = unsafe { &*entry };
        pack(forward(ctx, packet, entry, flow, recheck, reason))
    }

    /// What a live flow's packet does to it: `None` if it starts a new
    /// flow instead, else the entry to forward it by (a flow just confirmed
    /// has moved to `XLB_FLOWS`: only this entry may be used from here on),
    /// whether its next hop is due for a re-check, and the reason.
    #[inline(always)]
    pub(crate) fn follow<F: Ip>(
        ctx: &XdpContext,
        packet: &Packet<F>,
        key: &FlowKeyOf<F>,
        entry: *mut FlowOf<F>,
        cfg: &GlobalConfig,
        now: u64,
    ) -> Option<(*mut FlowOf<F>, bool, Reason)> {
        // SAFETY: valid map value pointer for this run.
        let flow = unsafe { &*entry };
        let syn = packet.l4.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        let reply = flow.direction == FLOW_DIR_REPLY;
        let restart = syn && conntrack::is_closed(flow);
        if !reply && (restart || !select::backend_still_serves(flow)) {
            return None;
        }
        let segment = Segment::of(ctx, packet);
        let tracked = conntrack::track(entry, key, &segment, cfg, now);
        let reason = if tracked.rst_ignored {
            Reason::FwdRstOutsideWindow
        } else if reply {
            Reason::FwdReply
        } else {
            Reason::FwdEstablished
        };
        Some((tracked.entry, tracked.recheck, reason))
    }

    /// `forward`'s `recheck` and `reason` in one register.
    #[inline(always)]
    pub(crate) fn pack_forward(recheck: bool, reason: Reason) -> u64 {
        (u64::from(recheck) << 32) | reason as u64
    }

    /// `forward` as a BPF function of its own (`Ip::OUTLINE`).
    #[inline(never)]
    pub(crate) fn forward_outlined<F: Ip>(
        ctx: &XdpContext,
        packet: &Packet<F>,
        entry: *mut FlowOf<F>,
        recheck_reason: u64,
    ) -> u64 {
        let (recheck, reason) = unpack(recheck_reason);
        // SAFETY: valid map value pointer for this run.
        let flow = unsafe { &*entry };
        pack(forward(ctx, packet, entry, flow, recheck != 0, reason))
    }

    #[inline(never)]
    fn icmp_path(ctx: &XdpContext, now: u64) -> u64 {
        pack(config().and_then(|cfg| icmp::translate::<V4>(ctx, cfg, now)))
    }

    #[inline(never)]
    fn frag_path(ctx: &XdpContext, now: u64) -> u64 {
        pack(config().and_then(|cfg| frag::follow(ctx, cfg, now)))
    }

    /// The first packet of a flow, part one: find its service, choose a
    /// backend and record the flow (its next hop cached in the entry), or
    /// answer with the verdict. Part two (`new_flow_send_path`) is a BPF
    /// function of its own so that the MTU check's frame is not stacked on
    /// this one's.
    #[inline(never)]
    fn open_flow_path<F: Ip>(ctx: &XdpContext, packet: &Packet<F>, now: u64) -> u64 {
        let key = flow_key(packet);
        let syn = packet.l4.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        let opened = match config() {
            Ok(cfg) => open_flow(ctx, packet, &key, cfg, syn, now),
            Err(reason) => Err(Err(reason)),
        };
        match opened {
            Ok(()) => OPENED,
            Err(verdict) => pack(verdict),
        }
    }

    /// The first packet of a flow, part two: sent as the entry just
    /// recorded says, to the next hop cached in it.
    #[inline(never)]
    fn new_flow_send_path<F: Ip>(ctx: &XdpContext, packet: &Packet<F>) -> u64 {
        let key = flow_key(packet);
        let Some(entry) = conntrack::created(&key) else {
            return pack(Err(Reason::DropFlowInsert));
        };
        // SAFETY: valid map value pointer for this run.
        let flow = unsafe { &*entry };
        pack(forward(ctx, packet, entry, flow, false, Reason::FwdNewFlow))
    }

    /// Service, backend, masquerade address and next hop of a new flow,
    /// recorded in conntrack; `Err` carries the packet's verdict.
    #[inline(always)]
    fn open_flow<F: Ip>(
        ctx: &XdpContext,
        packet: &Packet<F>,
        key: &FlowKeyOf<F>,
        cfg: &GlobalConfig,
        syn: bool,
        now: u64,
    ) -> Result<(), Answer> {
        let new = select_new_flow(ctx, packet, key, cfg, syn, now)?;
        let segment = Segment::of(ctx, packet);
        conntrack::create(key, &new, &segment, cfg, now).map_err(Err)?;
        if debug_logs() {
            F::log_new_flow(ctx, key, new.backend_id, &new.backend);
        }
        Ok(())
    }

    /// Service, backend, masquerade address and next hop of a new flow;
    /// `Err` carries the packet's verdict.
    #[inline(always)]
    pub(crate) fn select_new_flow<F: Ip>(
        ctx: &XdpContext,
        packet: &Packet<F>,
        key: &FlowKeyOf<F>,
        cfg: &GlobalConfig,
        syn: bool,
        now: u64,
    ) -> Result<NewFlow<F>, Answer> {
        let Some(chosen) = choose_backend(key, cfg, syn, now)? else {
            return Err(F::reject(ctx, packet));
        };
        route_new_flow(ctx, packet, key, &chosen, now)
    }

    /// A new flow's service and backend, before its next hop is known.
    pub(crate) struct Chosen<F: Ip> {
        pub service_id: u32,
        pub backend_id: u32,
        pub backend: BackendOf<F>,
        pub syn: bool,
        /// The service masquerades (`SERVICE_F_MASQUERADE`).
        pub masquerade: bool,
    }

    /// Service and backend of a new flow (`select_new_flow`'s first half);
    /// `None` for a service with no backend whose packets are rejected
    /// (`Ip::reject`), `Err` carries the packet's verdict.
    #[inline(always)]
    pub(crate) fn choose_backend<F: Ip>(
        key: &FlowKeyOf<F>,
        cfg: &GlobalConfig,
        syn: bool,
        now: u64,
    ) -> Result<Option<Chosen<F>>, Answer> {
        let service = lookup::service_for::<F>(key.dst_addr_be, key.dst_port_be, key.proto)
            .ok_or(Err(Reason::PassNotService))?;
        if !lookup::source_allowed::<F>(&service, key.src_addr_be) {
            return Err(Err(Reason::DropSourceRange));
        }
        if key.proto == IPPROTO_TCP && !syn {
            return Err(Err(Reason::PassTcpNoFlow));
        }
        let hash = flow_hash(key, cfg.hash_key());
        let Some((backend_id, backend)) =
            select::backend_for_client::<F>(&service, &key.src_addr_be, hash, now)
        else {
            if service.flags & SERVICE_F_DROP_IF_EMPTY != 0 {
                return Err(Err(Reason::DropNoBackend));
            }
            return Ok(None);
        };
        Ok(Some(Chosen {
            service_id: service.id,
            backend_id,
            backend,
            syn,
            masquerade: service.flags & SERVICE_F_MASQUERADE != 0,
        }))
    }

    /// Masquerade address and next hop of a new flow to the backend
    /// `chosen` names (`select_new_flow`'s second half); `Err` carries the
    /// packet's verdict.
    #[inline(always)]
    pub(crate) fn route_new_flow<F: Ip>(
        ctx: &XdpContext,
        packet: &Packet<F>,
        key: &FlowKeyOf<F>,
        chosen: &Chosen<F>,
        now: u64,
    ) -> Result<NewFlow<F>, Answer> {
        check_ttl(packet).map_err(Err)?;
        let (hop, masquerade_addr) = fib::hop_to_backend::<F>(
            ctx,
            chosen.backend_id,
            &chosen.backend,
            key.src_addr_be,
            key.proto,
            F::ip_len(&packet.ip),
            now,
        )
        .map_err(Err)?;
        let masquerade_addr_be = if !chosen.masquerade {
            F::Addr::default()
        } else if masquerade_addr != F::Addr::default() {
            masquerade_addr
        } else {
            // No address on the way to the backend: nothing to masquerade as.
            return Err(Err(Reason::PassFibFailed));
        };
        Ok(NewFlow {
            service_id: chosen.service_id,
            backend_id: chosen.backend_id,
            backend: chosen.backend,
            masquerade_addr_be,
            syn: chosen.syn,
            hop,
        })
    }

    /// Sends a packet of a known flow on, rewritten as the flow says, to the
    /// next hop cached in its entry (asking the FIB when it is due).
    #[inline(always)]
    pub(crate) fn forward<F: Ip>(
        ctx: &XdpContext,
        packet: &Packet<F>,
        entry: *mut FlowOf<F>,
        flow: &FlowOf<F>,
        recheck: bool,
        reason: Reason,
    ) -> Result<(u32, Reason), Reason> {
        check_ttl(packet)?;
        let hop = match conntrack::cached_hop(flow) {
            Some(hop) if !recheck => hop,
            _ => {
                let hop = fib::next_hop::<F>(
                    ctx.ctx.cast(),
                    ctx.ingress_ifindex() as u32,
                    flow.new_src_addr_be,
                    flow.new_dst_addr_be,
                    packet.ip.proto(),
                    F::ip_len(&packet.ip),
                    false,
                )?;
                conntrack::remember_hop(entry, &hop);
                hop
            }
        };
        if let Err(verdict) = F::check_mtu(ctx, packet, &hop) {
            return verdict;
        }
        nat::rewrite(packet, flow);
        let to_client = flow.direction == FLOW_DIR_REPLY;
        count_traffic(flow.service_id, flow.backend_id, to_client, frame_len(ctx));
        let (action, path) = fib::send::<F>(ctx, packet.eth, &hop, flow.new_dst_addr_be)?;
        count_path(flow.backend_id, to_client, path);
        Ok((action, reason))
    }

    #[inline(always)]
    pub(crate) fn flow_key<F: Ip>(packet: &Packet<F>) -> FlowKeyOf<F> {
        let (src_port_be, dst_port_be) = packet.l4.ports_be();
        let (src_addr_be, dst_addr_be) = F::addrs(&packet.ip);
        conntrack::key(
            (src_addr_be, src_port_be),
            (dst_addr_be, dst_port_be),
            packet.ip.proto(),
        )
    }

    /// We forward like a router: a packet that would leave with TTL (hop
    /// limit) 0 is dropped here rather than sent.
    #[inline(always)]
    pub(crate) fn check_ttl<F: Ip>(packet: &Packet<F>) -> Result<(), Reason> {
        if F::hop_limit(&packet.ip) <= 1 {
            return Err(Reason::DropTtlExpired);
        }
        Ok(())
    }

    #[inline(always)]
    fn frame_len(ctx: &XdpContext) -> u64 {
        (ctx.data_end() - ctx.data()) as u64
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
