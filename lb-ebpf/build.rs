//! Rebuild the object when the linker changes (it is not a cargo dependency).
use which::which;

fn main() {
    let bpf_linker = which("bpf-linker").expect(
        "bpf-linker not found on PATH: run `cargo xtask setup` (it installs it with the LLVM this machine has)",
    );
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
}
