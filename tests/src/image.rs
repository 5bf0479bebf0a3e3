//! The agent image, built offline: `FROM scratch` with the binaries this
//! workspace built, `ip` and `bridge` (the agent runs them for backends' next
//! hops and to find local pods) and
//! exactly the shared libraries `ldd` says they load, copied from this
//! machine. Nothing is pulled, so it builds where no registry is reachable
//! (`cargo xtask image`, and the container test). The Containerfile at the
//! repository root is the registry build of the same image.
//!
//! Podman is run as LAB-NOTES point 11 says works here: Debian's runc (crun
//! refuses hybrid cgroups), the cgroupfs manager, rlimits under the hard
//! limits.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail, ensure};

/// Where the development overlay says the image is; read from there so the
/// two never disagree.
pub const DEVELOPMENT_KUSTOMIZATION: &str = "deploy/overlays/development/kustomization.yaml";

/// The image reference (`newName:newTag`) the overlay at `kustomization`
/// (a path under the repository root) gives the logical image `xlb`.
pub fn overlay_image(kustomization: &str) -> anyhow::Result<String> {
    let path = crate::repo_root().join(kustomization);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let field = |name: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|line| line.strip_prefix(name))
            .map(|value| value.trim().trim_matches('"').to_owned())
    };
    match (field("newName:"), field("newTag:")) {
        (Some(name), Some(tag)) => Ok(format!("{name}:{tag}")),
        _ => bail!(
            "{}: images[0] needs newName and newTag for the image `xlb`",
            path.display()
        ),
    }
}

/// The files of the image: binary paths on this machine and where they go.
#[derive(Debug, Clone)]
pub struct Contents {
    /// `xlb` (the agent with its XDP object built in).
    pub xlb: PathBuf,
    /// `xlb-echo` (the demo backend examples/apps run).
    pub echo: PathBuf,
}

/// The podman every image operation here runs: Debian's runc, cgroupfs.
pub fn podman() -> Command {
    let mut command = Command::new("podman");
    command.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"]);
    command
}

/// Why podman cannot run containers here, or `None` if it can: checked by
/// running `podman info` (so a missing binary, storage or runtime shows).
pub fn podman_unavailable() -> Option<String> {
    match podman()
        .arg("info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
    {
        Err(error) => Some(format!(
            "podman cannot be started ({error}); `cargo xtask setup` installs it"
        )),
        Ok(output) if !output.status.success() => Some(format!(
            "`podman info` failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )),
        Ok(_) => None,
    }
}

/// Builds the image `tag` from `contents` in `scratch` (a directory this
/// function fills; the caller removes it). Returns the image id.
pub fn build(contents: &Contents, tag: &str, scratch: &Path) -> anyhow::Result<String> {
    let root = scratch.join("rootfs");
    if root.exists() {
        std::fs::remove_dir_all(&root).with_context(|| format!("clearing {}", root.display()))?;
    }
    let ip = which("ip").context("iproute2's `ip` must be installed (cargo xtask setup)")?;
    // `bridge -json fdb show` finds bridge CNIs' pods for bpf_redirect_peer
    // (kernel/peers.rs).
    let bridge =
        which("bridge").context("iproute2's `bridge` must be installed (cargo xtask setup)")?;
    let binaries = [
        (contents.xlb.clone(), PathBuf::from("/usr/local/bin/xlb")),
        (
            contents.echo.clone(),
            PathBuf::from("/usr/local/bin/xlb-echo"),
        ),
        (ip.clone(), PathBuf::from("/usr/sbin/ip")),
        (bridge, PathBuf::from("/usr/sbin/bridge")),
    ];
    for (from, to) in &binaries {
        copy_into(&root, from, to)?;
        for library in shared_libraries(from)? {
            copy_into(&root, &library, &library)?;
        }
    }
    copy_into(
        &root,
        &crate::repo_root().join("config/example.yaml"),
        Path::new("/etc/xlb/example.yaml"),
    )?;
    // Mount points the runtime needs on a read-only root.
    for dir in ["proc", "sys", "dev", "run/xlb", "tmp", "etc/xlb"] {
        std::fs::create_dir_all(root.join(dir))
            .with_context(|| format!("creating {dir} in the image"))?;
    }
    let containerfile = scratch.join("Containerfile");
    std::fs::write(&containerfile, CONTAINERFILE)
        .with_context(|| format!("writing {}", containerfile.display()))?;
    let iidfile = scratch.join("image.id");
    let output = podman()
        .args(["build", "--pull=never", "--network=none", "--timestamp=0"])
        .arg("--iidfile")
        .arg(&iidfile)
        .arg("--tag")
        .arg(tag)
        .arg("--file")
        .arg(&containerfile)
        .arg(scratch)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .context("running podman build (is podman installed? cargo xtask setup)")?;
    ensure!(
        output.status.success(),
        "podman build of {tag} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let id = std::fs::read_to_string(&iidfile)
        .with_context(|| format!("reading {}", iidfile.display()))?;
    Ok(id.trim().to_owned())
}

/// The image's Containerfile: the staged root and how the agent starts
/// (the same entrypoint and defaults as the registry Containerfile).
const CONTAINERFILE: &str = "\
FROM scratch
COPY rootfs/ /
ENV PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
LABEL org.opencontainers.image.title=xlb \\
      org.opencontainers.image.description=\"xlb agent (XDP L4 load balancer) and xlb-echo, built offline by cargo xtask image\"
USER 0
ENTRYPOINT [\"/usr/local/bin/xlb\"]
CMD [\"run\", \"--config=/etc/xlb/config.yaml\", \"--kubernetes\"]
";

fn which(program: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
        .with_context(|| format!("no `{program}` in PATH"))
}

/// The shared libraries (and the ELF interpreter) `binary` loads, as `ldd`
/// resolves them on this machine.
fn shared_libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let output = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        // A static binary: nothing to copy.
        ensure!(
            text.contains("not a dynamic executable")
                || String::from_utf8_lossy(&output.stderr).contains("not a dynamic executable"),
            "ldd {} failed: {}",
            binary.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        return Ok(Vec::new());
    }
    let mut libraries = Vec::new();
    for line in text.lines() {
        ensure!(
            !line.contains("not found"),
            "{} needs a library this machine lacks: {}",
            binary.display(),
            line.trim()
        );
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"; linux-vdso has no file.
        let path = line
            .split("=>")
            .last()
            .and_then(|rest| rest.split_whitespace().next())
            .filter(|path| path.starts_with('/'));
        if let Some(path) = path {
            libraries.push(PathBuf::from(path));
        }
    }
    Ok(libraries)
}

/// Copies `from` (following symlinks) to `root`/`to`, keeping its mode.
fn copy_into(root: &Path, from: &Path, to: &Path) -> anyhow::Result<()> {
    let target = root.join(to.strip_prefix("/").unwrap_or(to));
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::copy(from, &target)
        .with_context(|| format!("copying {} to {}", from.display(), target.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_development_overlay_names_the_image() {
        assert_eq!(
            overlay_image(DEVELOPMENT_KUSTOMIZATION).unwrap(),
            "localhost:5000/xlb:dev"
        );
    }

    #[test]
    fn ldd_lists_libc_for_a_dynamic_binary() {
        let libraries = shared_libraries(Path::new("/bin/ls")).unwrap();
        assert!(
            libraries
                .iter()
                .any(|l| l.to_string_lossy().contains("libc.so")),
            "{libraries:?}"
        );
        assert!(
            libraries
                .iter()
                .any(|l| l.to_string_lossy().contains("ld-linux")),
            "{libraries:?}"
        );
    }
}
