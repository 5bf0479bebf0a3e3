//! The run directory (`--run-dir`, default /run/xlb): `status.json` (what
//! the agent is doing) and `catalog.json` (what the datapath's ids mean),
//! rewritten atomically by the agent after every successful apply and read
//! by the CLI. Also how a reader tells whether the agent that wrote them
//! still runs.

use std::collections::BTreeMap;
use std::io::{self, Write as _};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// `--run-dir`'s default.
pub const DEFAULT_RUN_DIR: &str = "/run/xlb";
pub const STATUS_FILE: &str = "status.json";
pub const CATALOG_FILE: &str = "catalog.json";

/// `status.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The agent's process; with `process_start_ticks` it names the process
    /// even after its pid is reused.
    pub pid: u32,
    /// Field 22 of /proc/PID/stat (clock ticks after boot).
    pub process_start_ticks: u64,
    /// Unix seconds.
    pub started_at: u64,
    pub version: String,
    /// Where the datapath's maps and links are pinned (`--bpffs`).
    pub bpffs: String,
    /// Whether the maps are pinned there (`--bpffs` on a BPF filesystem).
    pub pinned: bool,
    /// Where the config comes from, e.g. `file config/demo.yaml`.
    pub config_source: String,
    /// The config generation the maps hold (0 until the first apply).
    pub generation: u64,
    /// XDP attached and the first config applied (as /readyz).
    pub ready: bool,
    pub last_reload: Option<Reload>,
    pub interfaces: Vec<Interface>,
    /// The socket hooks (`connect4`, ...) and the cgroup they are attached
    /// to; absent when socket-level balancing is off.
    #[serde(default)]
    pub socket_hooks: Option<SocketHooks>,
    /// The XDP program's kernel id.
    pub program_id: Option<u32>,
    /// `XLB_FLOWS` entries (two per flow).
    pub conntrack_capacity: u32,
    pub masquerade_ports: PortRange,
    /// Masquerade source address per egress interface, by ifindex.
    pub masquerade_addresses: BTreeMap<u32, Ipv4Addr>,
    /// The same for IPv6 (absent without IPv6 addresses).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub masquerade_addresses6: BTreeMap<u32, Ipv6Addr>,
    /// Where /metrics, /healthz and /readyz answer.
    pub metrics_addr: Option<String>,
    pub datapath_debug: bool,
    /// Cluster services left out because they do not fit the maps.
    #[serde(default)]
    pub skipped_services: Vec<String>,
    /// Unix seconds of this write.
    pub updated_at: u64,
}

/// Where the socket hooks are attached.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketHooks {
    pub cgroup: String,
    pub hooks: Vec<String>,
}

/// The outcome of the last config load or reload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reload {
    pub ok: bool,
    /// With `ok`, the generation applied; otherwise the one kept.
    pub generation: u64,
    /// Unix seconds.
    pub at: u64,
    /// Why it failed.
    pub error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    pub ifindex: u32,
    /// XDP: `native` or `generic` (or `adopted`); tc: `tcx ingress` or
    /// `clsact ingress`.
    pub mode: String,
    /// Why the agent attached here: "config node.interfaces", "--iface",
    /// "holds node address A", "default route", "pod veth (...)",
    /// "vxlan (...)".
    #[serde(default)]
    pub why: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

/// A run-directory file that cannot be written or read.
#[derive(Debug, thiserror::Error)]
pub enum RunDirError {
    #[error("cannot create the run directory {path}; pass a writable --run-dir")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not what this xlb writes (another version?): {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Creates `dir` (and its parents) if needed.
pub fn create(dir: &Path) -> Result<(), RunDirError> {
    std::fs::create_dir_all(dir).map_err(|source| RunDirError::Create {
        path: dir.to_owned(),
        source,
    })
}

/// Writes `value` as compact JSON to `dir/name` through a temporary file
/// and a rename, so a reader sees the old file or the new one, never half.
/// Compact: the catalog of 10,000 services took 40% longer pretty, inside
/// every apply (`jq .` or `xlb status` and `xlb services` show them).
pub fn write_json<T: Serialize>(dir: &Path, name: &str, value: &T) -> Result<(), RunDirError> {
    let path = dir.join(name);
    let temporary = dir.join(format!(".{name}.tmp"));
    // Streamed to the file: catalog.json of a big config is tens of MB.
    let written = std::fs::File::create(&temporary).and_then(|file| {
        let mut writer = io::BufWriter::new(file);
        serde_json::to_writer(&mut writer, value).map_err(io::Error::other)?;
        writer.write_all(b"\n")?;
        writer
            .into_inner()
            .map_err(io::IntoInnerError::into_error)?;
        std::fs::rename(&temporary, &path)
    });
    written.map_err(|source| RunDirError::Write { path, source })
}

/// Reads `dir/name`; `None` if it does not exist.
pub fn read_json<T: for<'de> Deserialize<'de>>(
    dir: &Path,
    name: &str,
) -> Result<Option<T>, RunDirError> {
    let path = dir.join(name);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(RunDirError::Read { path, source }),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| RunDirError::Parse { path, source })
}

/// This process's (pid, start ticks).
pub fn this_process() -> (u32, u64) {
    let pid = std::process::id();
    (pid, start_ticks(pid).unwrap_or(0))
}

/// Whether the process that wrote `status` is still running.
pub fn is_alive(status: &Status) -> bool {
    match start_ticks(status.pid) {
        Some(ticks) => status.process_start_ticks == 0 || ticks == status.process_start_ticks,
        None => false,
    }
}

/// Field 22 (starttime) of /proc/PID/stat.
fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_ticks(&stat)
}

fn parse_start_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may hold spaces and
    // parentheses itself: count fields after the last ')'.
    let after_name = &stat[stat.rfind(')')? + 1..];
    // Fields 3.. follow; starttime is field 22, the 20th of them.
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_ticks_survive_odd_process_names() {
        let stat = "1234 (x) y) (z) S 1 1234 1234 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 1 0 \
                    987654 1000 200 18446744073709551615";
        assert_eq!(parse_start_ticks(stat), Some(987_654));
        assert_eq!(parse_start_ticks("garbage"), None);
    }

    #[test]
    fn this_process_is_alive_and_a_stale_one_is_not() {
        let (pid, ticks) = this_process();
        assert!(ticks > 0);
        let status = Status {
            pid,
            process_start_ticks: ticks,
            ..Status::default()
        };
        assert!(is_alive(&status));
        assert!(!is_alive(&Status {
            process_start_ticks: ticks + 1,
            ..status.clone()
        }));
        assert!(!is_alive(&Status {
            pid: u32::MAX,
            ..status
        }));
    }

    #[test]
    fn json_round_trip_is_atomic() {
        let dir = std::env::temp_dir().join(format!("xlb-rundir-test-{}", std::process::id()));
        create(&dir).unwrap();
        assert_eq!(read_json::<Status>(&dir, STATUS_FILE).unwrap(), None);
        let status = Status {
            pid: 7,
            generation: 3,
            masquerade_addresses: [(2, Ipv4Addr::new(198, 18, 0, 1))].into_iter().collect(),
            ..Status::default()
        };
        write_json(&dir, STATUS_FILE, &status).unwrap();
        assert_eq!(
            read_json::<Status>(&dir, STATUS_FILE).unwrap(),
            Some(status)
        );
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .collect();
        assert_eq!(leftovers, [STATUS_FILE]);
        std::fs::write(dir.join(CATALOG_FILE), "{").unwrap();
        let error = read_json::<Status>(&dir, CATALOG_FILE).map_err(|e| e.to_string());
        assert!(
            error
                .as_ref()
                .is_err_and(|e| e.contains("catalog.json is not what this xlb writes")),
            "{error:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
