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

/// The traffic generator's object with `xlb_trafficgen` loaded into the
/// kernel (not attached: `send_generated` runs it); `GEN_CONFIG` still to
/// be written.
pub fn load_trafficgen() -> anyhow::Result<aya::Ebpf> {
    use anyhow::{Context as _, anyhow};
    let mut ebpf = aya::EbpfLoader::new()
        .load(TRAFFICGEN_OBJECT)
        .context("loading the trafficgen object")?;
    let program: &mut aya::programs::SchedClassifier = ebpf
        .program_mut("xlb_trafficgen")
        .ok_or_else(|| anyhow!("xlb_trafficgen missing"))?
        .try_into()?;
    program.load().context("loading xlb_trafficgen")?;
    Ok(ebpf)
}

/// Sends `repeat` frames from the loaded `xlb_trafficgen` (configured
/// through its `GEN_CONFIG`, whose `ifindex` names the wire): one
/// BPF_PROG_TEST_RUN with `repeat`, each run cloning the test skb out of the
/// wire. Call it from a thread inside the generator's namespace (the
/// ifindex is looked up there).
pub fn send_generated(program: &aya::programs::SchedClassifier, repeat: u32) -> anyhow::Result<()> {
    send_generated_of(program, repeat, xlb_bench_ebpf::FRAME_LEN)
}

/// [`send_generated`] for frames of `len` bytes (`FRAME6_LEN` for the IPv6
/// template).
pub fn send_generated_of(
    program: &aya::programs::SchedClassifier,
    repeat: u32,
    len: usize,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use aya::programs::TestRun as _;
    let frame = vec![0u8; len];
    program
        .test_run(aya::TestRunOptions {
            data_in: Some(&frame),
            repeat,
            ..aya::TestRunOptions::default()
        })
        .context("BPF_PROG_TEST_RUN of xlb_trafficgen")?;
    Ok(())
}
