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

    use xlb_bench_ebpf::{
        FRAME_LEN, FRAME6_LEN, GenConfig, IP_CSUM_AT, SINK_PORTS, SRC_ADDR_AT, SRC_ADDR6_AT,
        SRC_PORT_AT, SRC_PORT6_AT, TCP_CSUM_AT, UDP_CSUM_AT, UDP_CSUM6_AT, udp_dst_port,
    };

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
        // The test skb holds the frame's own length: FRAME_LEN for IPv4,
        // FRAME6_LEN for IPv6, each checked on its own path.
        if cfg.ipv6 != 0 {
            if start + FRAME6_LEN > ctx.data_end() {
                return TC_ACT_SHOT;
            }
            let frame = start as *mut u8;
            // SAFETY: the template's 8 words and the fields (offsets below
            // FRAME6_LEN - 2) are inside the frame (checked above).
            unsafe {
                let words = frame as *mut u64;
                for index in 0..8 {
                    words.add(index).write_unaligned(cfg.frame[index]);
                }
                (frame.add(SRC_ADDR6_AT) as *mut [u8; 4])
                    .write_unaligned(fields.src_addr.to_be_bytes());
                (frame.add(SRC_PORT6_AT) as *mut [u8; 2])
                    .write_unaligned(fields.src_port.to_be_bytes());
                (frame.add(UDP_CSUM6_AT) as *mut [u8; 2])
                    .write_unaligned(fields.udp_csum.to_be_bytes());
            }
        } else {
            if start + FRAME_LEN > ctx.data_end() {
                return TC_ACT_SHOT;
            }
            let frame = start as *mut u8;
            // SAFETY: the first FRAME_LEN bytes are inside the frame
            // (checked above); the template holds 64 bytes, of which 60 are
            // copied, and the fields lie below FRAME_LEN - 2.
            unsafe {
                let words = frame as *mut u64;
                for index in 0..7 {
                    words.add(index).write_unaligned(cfg.frame[index]);
                }
                (frame.add(56) as *mut u32).write_unaligned(cfg.frame[7] as u32);
                (frame.add(IP_CSUM_AT) as *mut [u8; 2])
                    .write_unaligned(fields.ip_csum.to_be_bytes());
                (frame.add(SRC_ADDR_AT) as *mut [u8; 4])
                    .write_unaligned(fields.src_addr.to_be_bytes());
                (frame.add(SRC_PORT_AT) as *mut [u8; 2])
                    .write_unaligned(fields.src_port.to_be_bytes());
                let at = if cfg.tcp != 0 {
                    TCP_CSUM_AT
                } else {
                    UDP_CSUM_AT
                };
                (frame.add(at) as *mut [u8; 2]).write_unaligned(fields.udp_csum.to_be_bytes());
            }
        }
        // SAFETY: plain helper call on this run's skb; it transmits a clone.
        let sent = unsafe { bpf_clone_redirect(ctx.skb.skb, cfg.ifindex, 0) };
        if sent == 0 { TC_ACT_OK } else { TC_ACT_SHOT }
    }

    #[xdp]
    pub fn xlb_bench_sink(ctx: XdpContext) -> u32 {
        let start = ctx.data();
        // An IPv4 datagram's port ends at byte 38, an IPv6 one's at 58; a
        // 58-byte read covers both (benchmark frames are longer).
        if start + 58 > ctx.data_end() {
            return xdp_action::XDP_PASS;
        }
        // SAFETY: the 58 bytes read are inside the frame.
        let head = unsafe { (start as *const [u8; 58]).read_unaligned() };
        if count_ours(udp_dst_port(&head)) {
            xdp_action::XDP_DROP
        } else {
            xdp_action::XDP_PASS
        }
    }

    #[classifier]
    pub fn xlb_bench_tc_sink(ctx: TcContext) -> i32 {
        // The headers copied out of the skb (its linear part may be
        // shorter); an IPv4 frame shorter than 58 bytes is read by its
        // first 38.
        let head = match ctx.load::<[u8; 58]>(0) {
            Ok(head) => head,
            Err(_) => match ctx.load::<[u8; 38]>(0) {
                Ok(short) => {
                    let mut head = [0u8; 58];
                    head[..38].copy_from_slice(&short);
                    head
                }
                Err(_) => return TC_ACT_OK,
            },
        };
        if count_ours(udp_dst_port(&head)) {
            TC_ACT_SHOT
        } else {
            TC_ACT_OK
        }
    }

    /// Whether the frame is a benchmark datagram (UDP to a `SINK_CONFIG`
    /// port); counts it if so.
    #[inline(always)]
    fn count_ours(dst_port: Option<u16>) -> bool {
        let Some(dst_port) = dst_port else {
            return false;
        };
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
