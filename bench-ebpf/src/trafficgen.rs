//! The lab benchmark's traffic generator and sink (`cargo xtask bench`), not
//! part of the datapath.
//!
//! `xlb_trafficgen` is a tc program run with BPF_PROG_TEST_RUN (`repeat` in
//! the hundreds of thousands): every run writes the frame's header from a
//! template, picks the flow from a sequence number and sends a clone of the
//! test skb out of the generator's veth with `bpf_clone_redirect`. (XDP's
//! live-frames test mode did this faster, but this lab's kernel refuses
//! it with EPERM; the kernel copies the skb's head before a write while an
//! earlier clone still shares it, so every clone keeps its own flow.) `xlb_bench_sink` sits on the backends' veths
//! and counts and drops the benchmark's UDP datagrams, passing everything
//! else (ARP, TCP, the latency echo) to the stack. `xlb_bench_tc_sink` does
//! the same at tc ingress, for pods whose veth ends keep the kernel's
//! defaults (no XDP program): it counts where the pod's stack would take
//! the datagram.
//!
//! The map layouts and the frame arithmetic are the library's (lib.rs),
//! shared with the bench.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod prog {
    use aya_ebpf::{
        bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action},
        helpers::bpf_clone_redirect,
        macros::{classifier, map, xdp},
        maps::{Array, PerCpuArray},
        programs::{TcContext, XdpContext},
    };

    use xlb_bench_ebpf::{FRAME_LEN, GenConfig, IP_CSUM_AT, SINK_PORTS, SRC_ADDR_AT, SRC_PORT_AT};

    #[map]
    static GEN_CONFIG: Array<GenConfig> = Array::with_max_entries(1, 0);
    /// `[0]`: frames generated so far (also the next frame's sequence
    /// number). One generator thread writes it, so no atomics.
    #[map]
    static GEN_SENT: Array<u64> = Array::with_max_entries(1, 0);

    #[map]
    static SINK_CONFIG: Array<u32> = Array::with_max_entries(SINK_PORTS, 0);
    /// `[0]`: benchmark datagrams counted and dropped.
    #[map]
    static SINK_COUNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

    #[classifier]
    pub fn xlb_trafficgen(ctx: TcContext) -> i32 {
        let start = ctx.data();
        if start + FRAME_LEN > ctx.data_end() {
            return TC_ACT_SHOT;
        }
        let (Some(cfg), Some(sent)) = (GEN_CONFIG.get_ptr(0), GEN_SENT.get_ptr_mut(0)) else {
            return TC_ACT_SHOT;
        };
        // SAFETY: map value pointers are valid for this run; one writer.
        let (cfg, seq) = unsafe {
            let seq = *sent;
            *sent = seq + 1;
            (&*cfg, seq)
        };
        let fields = cfg.fields(seq);

        let frame = start as *mut u8;
        // SAFETY: the first FRAME_LEN bytes are inside the frame (checked
        // above); the template holds 64 bytes, of which 60 are copied.
        unsafe {
            let words = frame as *mut u64;
            for index in 0..7 {
                words.add(index).write_unaligned(cfg.frame[index]);
            }
            (frame.add(56) as *mut u32).write_unaligned(cfg.frame[7] as u32);
            (frame.add(IP_CSUM_AT) as *mut [u8; 2]).write_unaligned(fields.ip_csum.to_be_bytes());
            (frame.add(SRC_ADDR_AT) as *mut [u8; 4]).write_unaligned(fields.src_addr.to_be_bytes());
            (frame.add(SRC_PORT_AT) as *mut [u8; 2]).write_unaligned(fields.src_port.to_be_bytes());
            (frame.add(cfg.l4_csum_at()) as *mut [u8; 2])
                .write_unaligned(fields.udp_csum.to_be_bytes());
        }
        // SAFETY: plain helper call on this run's skb; it transmits a clone.
        let sent = unsafe { bpf_clone_redirect(ctx.skb.skb, cfg.ifindex, 0) };
        if sent == 0 { TC_ACT_OK } else { TC_ACT_SHOT }
    }

    #[xdp]
    pub fn xlb_bench_sink(ctx: XdpContext) -> u32 {
        let start = ctx.data();
        // Ethernet + option-less IPv4 + UDP header.
        if start + 42 > ctx.data_end() {
            return xdp_action::XDP_PASS;
        }
        let frame = start as *const u8;
        // SAFETY: the 42 bytes read below are inside the frame.
        let (ether_type, version_ihl, proto, dst_port) = unsafe {
            (
                (frame.add(12) as *const [u8; 2]).read_unaligned(),
                *frame.add(14),
                *frame.add(23),
                u16::from_be_bytes((frame.add(36) as *const [u8; 2]).read_unaligned()),
            )
        };
        if count_ours(ether_type, version_ihl, proto, dst_port) {
            xdp_action::XDP_DROP
        } else {
            xdp_action::XDP_PASS
        }
    }

    #[classifier]
    pub fn xlb_bench_tc_sink(ctx: TcContext) -> i32 {
        // Ethernet + option-less IPv4 + UDP destination port, copied out of
        // the skb (its linear part may be shorter).
        let Ok(head) = ctx.load::<[u8; 38]>(0) else {
            return TC_ACT_OK;
        };
        let dst_port = u16::from_be_bytes([head[36], head[37]]);
        if count_ours([head[12], head[13]], head[14], head[23], dst_port) {
            TC_ACT_SHOT
        } else {
            TC_ACT_OK
        }
    }

    /// Whether the frame is a benchmark datagram (UDP to a `SINK_CONFIG`
    /// port); counts it if so.
    #[inline(always)]
    fn count_ours(ether_type: [u8; 2], version_ihl: u8, proto: u8, dst_port: u16) -> bool {
        if ether_type != [0x08, 0x00] || version_ihl != 0x45 || proto != 17 {
            return false;
        }
        let mut ours = false;
        for index in 0..SINK_PORTS {
            if let Some(port) = SINK_CONFIG.get(index)
                && *port != 0
                && *port == u32::from(dst_port)
            {
                ours = true;
            }
        }
        if ours && let Some(count) = SINK_COUNT.get_ptr_mut(0) {
            // SAFETY: per-CPU slot; nothing else runs on this CPU meanwhile.
            unsafe { *count += 1 };
        }
        ours
    }

    xlb_bench_ebpf::program_boilerplate!();
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
