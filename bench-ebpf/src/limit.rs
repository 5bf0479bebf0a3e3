//! The lab benchmark's ceiling (`cargo xtask bench`): the least an XDP load
//! balancer must do on this path. UDP to the benchmark port gets new MACs and
//! is redirected to one of the backend links, chosen by source port; no NAT,
//! no lookups, no state. Everything else is passed.
//!
//! The map layouts are the library's (lib.rs), shared with the bench.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod prog {
    use aya_ebpf::{
        bindings::xdp_action,
        helpers::bpf_redirect,
        macros::{map, xdp},
        maps::Array,
        programs::XdpContext,
    };

    use xlb_bench_ebpf::{LIMIT_CFG_PORT, LIMIT_CFG_TARGETS, LIMIT_TARGETS_MAX, LimitTarget};

    #[map]
    static LIMIT_TARGETS: Array<LimitTarget> = Array::with_max_entries(LIMIT_TARGETS_MAX, 0);
    /// `[LIMIT_CFG_TARGETS]`: targets in use; `[LIMIT_CFG_PORT]`: the UDP
    /// destination port (host order) that is forwarded.
    #[map]
    static LIMIT_CONFIG: Array<u32> = Array::with_max_entries(2, 0);

    #[xdp]
    pub fn xlb_limit(ctx: XdpContext) -> u32 {
        let start = ctx.data();
        if start + 42 > ctx.data_end() {
            return xdp_action::XDP_PASS;
        }
        let frame = start as *mut u8;
        // SAFETY: the 42 bytes read below are inside the frame.
        let (ether_type, version_ihl, proto, src_port, dst_port) = unsafe {
            (
                (frame.add(12) as *const [u8; 2]).read_unaligned(),
                *frame.add(14),
                *frame.add(23),
                u16::from_be_bytes((frame.add(34) as *const [u8; 2]).read_unaligned()),
                u16::from_be_bytes((frame.add(36) as *const [u8; 2]).read_unaligned()),
            )
        };
        if ether_type != [0x08, 0x00] || version_ihl != 0x45 || proto != 17 {
            return xdp_action::XDP_PASS;
        }
        let (Some(targets), Some(port)) = (
            LIMIT_CONFIG.get(LIMIT_CFG_TARGETS),
            LIMIT_CONFIG.get(LIMIT_CFG_PORT),
        ) else {
            return xdp_action::XDP_PASS;
        };
        if *targets == 0 || *port != u32::from(dst_port) {
            return xdp_action::XDP_PASS;
        }
        let Some(target) = LIMIT_TARGETS.get(u32::from(src_port) % *targets) else {
            return xdp_action::XDP_PASS;
        };
        // SAFETY: the 12 MAC bytes are inside the frame (checked above).
        unsafe {
            (frame as *mut [u8; 6]).write_unaligned(target.dst_mac);
            (frame.add(6) as *mut [u8; 6]).write_unaligned(target.src_mac);
        }
        // SAFETY: plain helper call; it only records the target interface.
        unsafe { bpf_redirect(target.ifindex, 0) as u32 }
    }

    xlb_bench_ebpf::program_boilerplate!();
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
