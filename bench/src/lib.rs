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
