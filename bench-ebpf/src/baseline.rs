//! Yardsticks for `cargo xtask bench --micro`, measured in the same run as
//! the datapath: the least a forwarding XDP program can do (swap MACs,
//! XDP_TX) and the harness floor (XDP_PASS, nothing read).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod prog {
    use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

    #[xdp]
    pub fn baseline_swap_macs(ctx: XdpContext) -> u32 {
        let start = ctx.data();
        if start + 12 > ctx.data_end() {
            return xdp_action::XDP_PASS;
        }
        let macs = start as *mut [u8; 6];
        // SAFETY: the 12 bytes of the two MAC addresses are inside the frame.
        unsafe {
            let dst = *macs;
            *macs = *macs.add(1);
            *macs.add(1) = dst;
        }
        xdp_action::XDP_TX
    }

    #[xdp]
    pub fn baseline_pass(_ctx: XdpContext) -> u32 {
        xdp_action::XDP_PASS
    }

    xlb_bench_ebpf::program_boilerplate!();
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
