//! The bench's eBPF objects (bench-ebpf, built by build.rs), for the
//! `xlb-bench` binary and for tests that need the traffic generator
//! (tests/tests/flood.rs sends its SYN flood with `xlb_trafficgen`). Their
//! map layouts and frame arithmetic are `xlb_bench_ebpf`'s.

/// Yardstick XDP programs for `--micro`: `baseline_swap_macs` and
/// `baseline_pass` (bench-ebpf/src/baseline.rs).
pub const BASELINE_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xlb-baseline"));

/// The lab's traffic generator (`xlb_trafficgen`) and backend sinks
/// (`xlb_bench_sink`, `xlb_bench_tc_sink`).
pub const TRAFFICGEN_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xlb-trafficgen"));

/// The lab's ceiling: rewrite MACs and redirect (`xlb_limit`).
pub const LIMIT_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xlb-limit"));

/// Sends `repeat` frames of the loaded `xlb_trafficgen` out of `ifindex`
/// (an interface of the calling thread's namespace): one BPF_PROG_TEST_RUN
/// in live-frames mode, `batch` frames per batch (the kernel's default is
/// 64, at most 256).
pub fn send_generated(
    program: &aya::programs::Xdp,
    ifindex: u32,
    repeat: u32,
    batch: u32,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use aya::programs::TestRun as _;
    let frame = [0u8; xlb_bench_ebpf::FRAME_LEN];
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex,
    // rx_queue_index, egress_ifindex.
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(xlb_bench_ebpf::FRAME_LEN as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    program
        .test_run(aya::TestRunOptions {
            data_in: Some(&frame),
            ctx_in: Some(&ctx),
            repeat,
            attrs: aya::TestRunAttrs::new().xdp_live_frames(batch),
            ..aya::TestRunOptions::default()
        })
        .context("BPF_PROG_TEST_RUN (live frames) of xlb_trafficgen")?;
    Ok(())
}
