//! Network namespaces owned by this process: created with `ip netns add`,
//! removed (with every process inside) on drop, and entered by threads with
//! `setns(CLONE_NEWNET)` so tests use real `std::net` sockets inside them.
//!
//! Names are `xlblab-PID-SEQ-ROLE`: unique across parallel tests and
//! processes, and a leftover whose PID is dead can be recognised and swept.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::LabError;
use crate::cmd::{run, run_args};

/// Prefix of every namespace and scratch directory the lab creates.
pub const PREFIX: &str = "xlblab";
/// Where `ip netns` keeps its namespace handles.
pub const NETNS_DIR: &str = "/var/run/netns";

static NEXT_ID: AtomicU32 = AtomicU32::new(0);
static SWEEP: Once = Once::new();

/// A new `xlblab-PID-SEQ` stem for one lab's namespaces and scratch files.
pub fn unique_stem() -> String {
    format!(
        "{PREFIX}-{}-{}",
        std::process::id(),
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

/// A network namespace, deleted on drop after killing what runs inside.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// `ip netns add NAME`. The first call in a process first sweeps
    /// leftovers of dead processes.
    pub fn create(name: impl Into<String>) -> Result<Netns, LabError> {
        crate::require_root()?;
        SWEEP.call_once(|| {
            for swept in sweep_stale() {
                eprintln!("xlb lab: removed leftover {swept}");
            }
        });
        let name = name.into();
        run_args("ip", &["netns", "add", &name])?;
        let netns = Netns { name };
        // Loopback up, and no IPv6 chatter (router solicitations, DAD) so
        // the datapath's counters show only the lab's traffic.
        run_args("ip", &["-n", &netns.name, "link", "set", "lo", "up"])?;
        netns.sysctl("net/ipv6/conf/all/disable_ipv6", "1")?;
        netns.sysctl("net/ipv6/conf/default/disable_ipv6", "1")?;
        Ok(netns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Run `f` on a thread inside this namespace (see [`in_netns`]).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, LabError> {
        in_netns(&self.name, f)
    }

    /// A command that runs `program` inside this namespace
    /// (`ip netns exec NAME program`, which execs, so the child's pid is the
    /// program's own).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }

    /// Run `program args...` inside this namespace to completion.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String, LabError> {
        run(self.command(program).args(args))
    }

    /// `ip -n NAME args...`.
    pub fn ip(&self, args: &[&str]) -> Result<String, LabError> {
        run(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// `ip -n NAME ARGS`, with `ARGS` one string split at whitespace (for
    /// arguments that contain none, like the lab's names and addresses).
    pub fn ip_line(&self, args: &str) -> Result<String, LabError> {
        self.ip(&args.split_whitespace().collect::<Vec<_>>())
    }

    /// A permanent neighbour entry in this namespace: `addr` is at `mac` on
    /// `dev`.
    pub fn neighbour(
        &self,
        addr: std::net::Ipv4Addr,
        mac: [u8; 6],
        dev: &str,
    ) -> Result<String, LabError> {
        self.ip(&[
            "neigh",
            "replace",
            &addr.to_string(),
            "lladdr",
            &mac_str(mac),
            "dev",
            dev,
            "nud",
            "permanent",
        ])
    }

    /// `ping` `addr` from inside this namespace: Ok if an echo reply came
    /// back within a few seconds.
    pub fn ping(&self, addr: impl Into<std::net::IpAddr>) -> Result<(), LabError> {
        let addr = addr.into();
        // Up to 3 requests 0.2 s apart; ping exits 0 at the first reply.
        self.exec(
            "ping",
            &[
                "-n",
                "-q",
                "-c",
                "1",
                "-w",
                "3",
                "-i",
                "0.2",
                &addr.to_string(),
            ],
        )
        .map(drop)
    }

    /// Write `/proc/sys/KEY` as seen from inside this namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<(), LabError> {
        let path = Path::new("/proc/sys").join(key);
        self.run(|| std::fs::write(&path, value))?
            .map_err(|source| {
                LabError::io(
                    format!("writing {value} to {} in {}", path.display(), self.name),
                    source,
                )
            })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(error) = remove(&self.name) {
            eprintln!(
                "xlb lab: could not remove network namespace {}: {error}",
                self.name
            );
        }
    }
}

/// Run `f` on a new thread that entered network namespace `name` with
/// `setns(CLONE_NEWNET)`. Sockets made there belong to that namespace for
/// their whole life, whichever thread uses them later; threads `f` spawns
/// start in it too. A panic in `f` is resumed in the caller.
pub fn in_netns<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> Result<T, LabError> {
    let path = netns_path(name);
    let handle = File::open(&path).map_err(|source| {
        LabError::io(
            format!(
                "opening network namespace {} (does it exist?)",
                path.display()
            ),
            source,
        )
    })?;
    std::thread::scope(|scope| {
        let thread = scope.spawn(|| {
            // SAFETY: setns on an open namespace fd; it changes the
            // namespace of this thread only, which exists just for `f`.
            if unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(LabError::io(
                    format!("entering network namespace {name} (setns)"),
                    std::io::Error::last_os_error(),
                ));
            }
            Ok(f())
        });
        match thread.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Kill every process inside namespace `name`, then delete it.
pub fn remove(name: &str) -> Result<(), LabError> {
    if !netns_path(name).exists() {
        return Ok(());
    }
    if let Ok(pids) = run_args("ip", &["netns", "pids", name]) {
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<libc::pid_t>().ok())
        {
            // SAFETY: kill has no memory preconditions; these pids were
            // listed as living in a namespace only the lab uses.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    run_args("ip", &["netns", "delete", name]).map(drop)
}

/// Every lab namespace on the machine, with the pid that created it.
fn lab_namespaces() -> Vec<(String, u32)> {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter_map(|name| Some((owner_pid(&name)?, name)))
        .map(|(pid, name)| (name, pid))
        .collect()
}

/// The pid in `xlblab-PID-...`.
pub(crate) fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?.strip_prefix('-')?;
    rest.split('-').next()?.parse().ok()
}

pub(crate) fn pid_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// Remove lab namespaces and scratch directories whose creating process is
/// gone (a test run that was killed). Returns what was removed.
pub fn sweep_stale() -> Vec<String> {
    let mut removed = Vec::new();
    for (name, pid) in lab_namespaces() {
        if !pid_alive(pid) && remove(&name).is_ok() {
            removed.push(format!("network namespace {name}"));
        }
    }
    for (dir, pid) in scratch_dirs() {
        if !pid_alive(pid) && std::fs::remove_dir_all(&dir).is_ok() {
            removed.push(format!("directory {}", dir.display()));
        }
    }
    removed
}

/// Remove everything the lab made for process `pid` (used by a signal
/// handler to tear down on Ctrl-C).
pub fn remove_owned_by(pid: u32) {
    for (name, owner) in lab_namespaces() {
        if owner == pid {
            let _ = remove(&name);
        }
    }
    for (dir, owner) in scratch_dirs() {
        if owner == pid {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn scratch_dirs() -> Vec<(PathBuf, u32)> {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let pid = owner_pid(entry.file_name().to_str()?)?;
            Some((entry.path(), pid))
        })
        .collect()
}

/// A MAC address as `ip` writes it (`02:78:6c:ee:00:01`).
pub fn mac_str(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|byte| format!("{byte:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_parses_only_lab_names() {
        assert_eq!(owner_pid("xlblab-123-4-node"), Some(123));
        assert_eq!(owner_pid("xlblab-123"), Some(123));
        assert_eq!(owner_pid("xlblab-x-4-node"), None);
        assert_eq!(owner_pid("xlb-node"), None);
        assert_eq!(owner_pid("xlblabz-1"), None);
    }

    #[test]
    fn unique_stems_differ() {
        assert_ne!(unique_stem(), unique_stem());
        assert_eq!(owner_pid(&unique_stem()), Some(std::process::id()));
    }
}
