//! Builds the bench's own eBPF programs (bench-ebpf) for `main.rs` to embed.
fn main() -> anyhow::Result<()> {
    let bench_ebpf = concat!(env!("CARGO_MANIFEST_DIR"), "/../bench-ebpf");
    let package = aya_build::Package {
        name: "xlb-bench-ebpf",
        root_dir: bench_ebpf,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}
