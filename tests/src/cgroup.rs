//! A cgroup v2 child of the test's own under /sys/fs/cgroup/unified (never
//! the root cgroup: LAB-NOTES pitfall 10) for the agent's socket hooks. The
//! test process moves itself in, so its sockets (in any namespace) pass the
//! hooks; dropping the guard moves it back and removes the cgroup.
//!
//! `ip netns exec` remounts /sys without its cgroup mounts, so the agent
//! (run in the node namespace) is given the same cgroup through a cgroup2
//! mount of the test's own in /tmp ([`TestCgroup::arg`]).
//!
//! A process is in one cgroup at a time: tests that enter one must not run
//! in parallel with each other in the same test binary ([`TestCgroup::enter`]
//! serializes them).

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::LabError;

/// Where the v2 hierarchy is mounted on these hybrid hosts.
pub const CGROUP2_ROOT: &str = "/sys/fs/cgroup/unified";

static ENTERED: Mutex<()> = Mutex::new(());

#[derive(Debug)]
pub struct TestCgroup {
    path: PathBuf,
    /// The v2 hierarchy mounted again at `/tmp/xlbcg-PID-SEQ`.
    mount: PathBuf,
    /// The cgroup this process came from, to return to.
    original: PathBuf,
    _serial: MutexGuard<'static, ()>,
}

impl TestCgroup {
    /// Creates `CGROUP2_ROOT/xlblab-PID-SEQ-sock` and moves this process
    /// (every thread) into it. Waits for any other test of this binary that
    /// holds one.
    pub fn enter() -> Result<TestCgroup, LabError> {
        let serial = ENTERED.lock().unwrap_or_else(PoisonError::into_inner);
        let root = Path::new(CGROUP2_ROOT);
        sweep_stale(root);
        let stem = crate::netns::unique_stem();
        let name = format!("{stem}-sock");
        let path = root.join(&name);
        std::fs::create_dir(&path)
            .map_err(|source| LabError::io(format!("creating {}", path.display()), source))?;
        let mount = std::env::temp_dir().join(stem.replacen(crate::netns::PREFIX, MOUNT_PREFIX, 1));
        if let Err(error) = mount_cgroup2(&mount) {
            let _ = std::fs::remove_dir(&path);
            return Err(error);
        }
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|source| LabError::io("reading /proc/self/cgroup", source))?;
        let relative = own
            .lines()
            .find_map(|line| line.strip_prefix("0::"))
            .unwrap_or("/")
            .trim_start_matches('/')
            .to_owned();
        let cgroup = TestCgroup {
            original: root.join(relative),
            path,
            mount,
            _serial: serial,
        };
        move_self(&cgroup.path)?;
        Ok(cgroup)
    }

    /// The cgroup's directory under /sys/fs/cgroup/unified.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cgroup's directory through the test's own cgroup2 mount, which
    /// `ip netns exec` leaves visible: for `xlb run --cgroup`.
    pub fn arg(&self) -> String {
        let name = self.path.file_name().unwrap_or_default();
        self.mount.join(name).display().to_string()
    }
}

/// Where the extra cgroup2 mounts go (`/tmp/xlbcg-PID-SEQ`): not a lab
/// scratch directory name, whose sweeper removes trees.
const MOUNT_PREFIX: &str = "xlbcg";

fn mount_cgroup2(mount: &Path) -> Result<(), LabError> {
    std::fs::create_dir_all(mount)
        .map_err(|source| LabError::io(format!("creating {}", mount.display()), source))?;
    let status = std::process::Command::new("mount")
        .args(["-t", "cgroup2", "none"])
        .arg(mount)
        .status()
        .map_err(|source| LabError::io("running mount -t cgroup2", source))?;
    if !status.success() {
        let _ = std::fs::remove_dir(mount);
        return Err(LabError::io(
            format!("mount -t cgroup2 none {} ({status})", mount.display()),
            std::io::Error::other("mount failed"),
        ));
    }
    Ok(())
}

fn unmount(mount: &Path) {
    let _ = std::process::Command::new("umount")
        .arg("-l")
        .arg(mount)
        .status();
    let _ = std::fs::remove_dir(mount);
}

/// Removes the (empty) test cgroups and the cgroup2 mounts of test
/// processes that died.
fn sweep_stale(root: &Path) {
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let lab_name = name.replacen(MOUNT_PREFIX, crate::netns::PREFIX, 1);
            if name.starts_with(MOUNT_PREFIX)
                && let Some(pid) = crate::netns::owner_pid(&lab_name)
                && !crate::netns::pid_alive(pid)
            {
                unmount(&entry.path());
            }
        }
    }
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(pid) = crate::netns::owner_pid(&name)
            && !crate::netns::pid_alive(pid)
            && std::fs::remove_dir(entry.path()).is_ok()
        {
            eprintln!("xlb lab: removed leftover cgroup {name}");
        }
    }
}

fn move_self(cgroup: &Path) -> Result<(), LabError> {
    let procs = cgroup.join("cgroup.procs");
    std::fs::write(&procs, std::process::id().to_string())
        .map_err(|source| LabError::io(format!("writing {}", procs.display()), source))
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Err(error) = move_self(&self.original) {
            eprintln!("cannot leave the test cgroup: {error}");
        }
        unmount(&self.mount);
        // Children (an agent being reaped) may need a moment to leave.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("cannot remove the test cgroup {}", self.path.display());
    }
}
