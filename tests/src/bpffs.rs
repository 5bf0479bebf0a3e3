//! A bpffs mounted in a lab's scratch directory for an agent's pins
//! (LAB-NOTES pitfall 6: `ip netns exec` remounts /sys, so /sys/fs/bpf is no
//! bpffs inside it). Unmounted on drop, which also releases whatever is
//! still pinned there.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::LabError;
use crate::agent::AgentLab;

pub struct Bpffs {
    path: PathBuf,
}

impl Bpffs {
    /// `mount -t bpf bpf LAB_DIR/bpffs`.
    pub fn mount(lab: &impl AgentLab) -> Result<Bpffs, LabError> {
        let path = lab.scratch_dir().join("bpffs");
        std::fs::create_dir_all(&path)
            .map_err(|source| LabError::io(format!("creating {}", path.display()), source))?;
        let status = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&path)
            .status()
            .map_err(|source| LabError::io("running mount -t bpf", source))?;
        if !status.success() {
            return Err(LabError::io(
                format!("mount -t bpf bpf {} ({status})", path.display()),
                std::io::Error::other("mount failed"),
            ));
        }
        Ok(Bpffs { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path as an argument for `--bpffs`.
    pub fn arg(&self) -> String {
        self.path.display().to_string()
    }

    /// Names pinned under `maps/`, `links/`, `tc/` or `cgroup/`, sorted.
    pub fn pins(&self, dir: &str) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.path.join(dir)) else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .collect();
        names.sort();
        names
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}
