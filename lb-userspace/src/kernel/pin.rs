//! Pins on a BPF filesystem, so the datapath keeps forwarding (with its
//! conntrack) while the agent restarts or is upgraded.
//!
//! Layout, shared with the CLI (`observe::datapath`) and kept exactly:
//! `DIR/maps/<MAP_NAME>` for every map in `lb_common::maps`,
//! `DIR/links/<ifname>` for the XDP link of every interface,
//! `DIR/cgroup/<hook>` for the socket hooks' cgroup links (connect4, ...).

use std::io;
use std::path::{Path, PathBuf};

use aya::maps::{MapInfo, MapType};
use lb_common::maps as names;
use lb_common::reason::REASON_COUNT;
use lb_common::{
    Affinity, AffinityKey, Backend, Flow, FlowKey, FragKey, FragPorts, GlobalConfig, IcmpLimit,
    NodeAddr, Service, ServiceKey, SockRevNat, SockRevNatKey, SourceRange, Traffic,
};

use super::MapSizes;

/// `--bpffs`'s default.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/xlb";
pub const MAPS_DIR: &str = "maps";
pub const LINKS_DIR: &str = "links";
pub const CGROUP_LINKS_DIR: &str = "cgroup";
/// tc (tcx) links: `tc/uplink-<interface>`, `tc/pod-<interface>`.
pub const TC_LINKS_DIR: &str = "tc";

/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: u64 = 0xcafe_4a11;

/// The maps that describe the configuration. They refer to each other
/// (service entries to table regions, slots and affinity records to
/// backend ids), so they are adopted or recreated together: never a fresh
/// `XLB_SELECT` under adopted service entries.
const CONFIG_MAPS: [&str; 8] = [
    names::SERVICES,
    names::SELECT,
    names::BACKENDS,
    names::NODE_ADDRS,
    names::IFACE_ADDRS,
    names::SOURCE_RANGES,
    names::CONFIG,
    names::AFFINITY,
];

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error(
        "{dir} is not on a BPF filesystem ({found}); mount one there with `mount -t bpf bpf {dir}` \
         (inside `ip netns exec`, /sys is remounted without /sys/fs/bpf), or pass --bpffs a \
         directory on one"
    )]
    NotBpffs { dir: String, found: String },
    #[error("cannot create {path}")]
    Create {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove the pin {path}")]
    Remove {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot list {path}")]
    List {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// A directory on a bpffs holding xlb's pins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinDir {
    root: PathBuf,
}

impl PinDir {
    /// `dir`, which must be on a bpffs (created if its nearest existing
    /// ancestor is one), with its `maps/` and `links/` directories.
    pub fn open(dir: &Path) -> Result<Self, PinError> {
        let not_bpffs = |found: String| PinError::NotBpffs {
            dir: dir.display().to_string(),
            found,
        };
        let existing = dir.ancestors().find(|path| path.exists()).unwrap_or(dir);
        match fs_magic(existing) {
            Ok(BPF_FS_MAGIC) => {}
            Ok(magic) => return Err(not_bpffs(describe_fs(existing, magic))),
            Err(error) => return Err(not_bpffs(format!("{}: {error}", existing.display()))),
        }
        let pins = Self {
            root: dir.to_owned(),
        };
        for path in [
            pins.root.clone(),
            pins.maps_dir(),
            pins.links_dir(),
            pins.cgroup_links_dir(),
            pins.tc_links_dir(),
        ] {
            std::fs::create_dir_all(&path).map_err(|source| PinError::Create {
                path: path.display().to_string(),
                source,
            })?;
        }
        Ok(pins)
    }

    /// The pin directory at `dir` without checking or creating anything
    /// (for removing pins).
    pub fn at(dir: &Path) -> Self {
        Self {
            root: dir.to_owned(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn maps_dir(&self) -> PathBuf {
        self.root.join(MAPS_DIR)
    }

    pub fn links_dir(&self) -> PathBuf {
        self.root.join(LINKS_DIR)
    }

    /// `DIR/maps/<name>`.
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    /// `DIR/links/<interface>`.
    pub fn link(&self, interface: &str) -> PathBuf {
        self.links_dir().join(interface)
    }

    /// Interfaces with a pinned link, sorted.
    pub fn pinned_links(&self) -> Result<Vec<String>, PinError> {
        list(&self.links_dir())
    }

    pub fn cgroup_links_dir(&self) -> PathBuf {
        self.root.join(CGROUP_LINKS_DIR)
    }

    /// `DIR/cgroup/<hook>`: the cgroup link of a socket hook (`connect4`, ...).
    pub fn cgroup_link(&self, hook: &str) -> PathBuf {
        self.cgroup_links_dir().join(hook)
    }

    pub fn tc_links_dir(&self) -> PathBuf {
        self.root.join(TC_LINKS_DIR)
    }

    /// `DIR/tc/<role>-<interface>`: a tcx link (`role` is `uplink` or `pod`).
    pub fn tc_link(&self, role: &str, interface: &str) -> PathBuf {
        self.tc_links_dir().join(format!("{role}-{interface}"))
    }

    /// Names (`<role>-<interface>`) of the pinned tc links, sorted.
    pub fn pinned_tc_links(&self) -> Result<Vec<String>, PinError> {
        list(&self.tc_links_dir())
    }

    /// Socket hooks with a pinned cgroup link, sorted.
    pub fn pinned_cgroup_links(&self) -> Result<Vec<String>, PinError> {
        list(&self.cgroup_links_dir())
    }

    /// Unpins every link (the kernel detaches a link when its last
    /// reference goes) and every map, then removes the directories this
    /// layout made (the root too when it is not a mount point). Returns the
    /// interfaces whose links were unpinned, the socket hooks likewise
    /// detached, and the number of maps.
    pub fn remove_all(&self) -> Result<(Vec<String>, Vec<String>, usize), PinError> {
        let links = self.pinned_links()?;
        for interface in &links {
            remove_pin(&self.link(interface))?;
        }
        let hooks = self.pinned_cgroup_links()?;
        for hook in &hooks {
            remove_pin(&self.cgroup_link(hook))?;
        }
        for name in self.pinned_tc_links()? {
            remove_pin(&self.tc_links_dir().join(name))?;
        }
        let maps = list(&self.maps_dir())?;
        for name in &maps {
            remove_pin(&self.map(name))?;
        }
        for dir in [
            self.links_dir(),
            self.cgroup_links_dir(),
            self.tc_links_dir(),
            self.maps_dir(),
            self.root.clone(),
        ] {
            // Busy (a mount point) or not empty (not ours): leave it.
            let _ = std::fs::remove_dir(dir);
        }
        Ok((links, hooks, maps.len()))
    }
}

/// Removes a pin; a pin already gone is fine.
pub fn remove_pin(path: &Path) -> Result<(), PinError> {
    match std::fs::remove_file(path) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => Err(PinError::Remove {
            path: path.display().to_string(),
            source: error,
        }),
        _ => Ok(()),
    }
}

/// Names in `dir`, sorted; none when it does not exist.
fn list(dir: &Path) -> Result<Vec<String>, PinError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(PinError::List {
                path: dir.display().to_string(),
                source,
            });
        }
    };
    let mut names: Vec<String> = entries
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    Ok(names)
}

pub(crate) fn fs_magic(path: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt as _;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|error| io::Error::new(io::ErrorKind::InvalidInput, error))?;
    // SAFETY: all-zero is a valid statfs; statfs writes into it.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `stat` a valid out-pointer; both
    // outlive the call.
    if unsafe { libc::statfs(path.as_ptr(), &mut stat) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // f_type's width and sign vary by architecture; the magic is 32 bits.
    #[allow(clippy::unnecessary_cast)]
    Ok(stat.f_type as u64 & 0xffff_ffff)
}

fn describe_fs(path: &Path, magic: u64) -> String {
    let kind = match magic {
        0x6265_6572 => String::from("sysfs"),
        0x0102_1994 => String::from("tmpfs"),
        0xef53 => String::from("ext4"),
        0x794c_7630 => String::from("overlayfs"),
        0x5846_5342 => String::from("xfs"),
        0x9123_683e => String::from("btrfs"),
        other => format!("filesystem type {other:#x}"),
    };
    format!("{} is on {kind}", path.display())
}

/// What a map must look like for the datapath this agent loads.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MapSpec {
    pub name: &'static str,
    pub kind: MapType,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    /// A larger pinned map is fine too (`XLB_SELECT`: a config that needs
    /// fewer slots than a previous one keeps the map, and its tables).
    pub or_larger: bool,
}

impl MapSpec {
    /// Why the pinned map described by `info` does not fit, if it does not.
    fn mismatch(&self, info: &MapInfo) -> Option<String> {
        let kind = info.map_type().ok();
        if kind != Some(self.kind) {
            return Some(format!("type {kind:?}, expected {:?}", self.kind));
        }
        if (info.key_size(), info.value_size()) != (self.key_size, self.value_size) {
            return Some(format!(
                "key/value sizes {}/{}, expected {}/{}",
                info.key_size(),
                info.value_size(),
                self.key_size,
                self.value_size
            ));
        }
        let entries = info.max_entries();
        let fits = if self.or_larger {
            entries >= self.max_entries
        } else {
            entries == self.max_entries
        };
        if !fits {
            return Some(format!(
                "max_entries {entries}, expected {}{}",
                if self.or_larger { "at least " } else { "" },
                self.max_entries
            ));
        }
        None
    }
}

fn size_of<T>() -> u32 {
    u32::try_from(std::mem::size_of::<T>()).unwrap_or(u32::MAX)
}

/// Every map of the datapath, as the loader will create it with `sizes`.
pub fn map_specs(sizes: &MapSizes) -> Vec<MapSpec> {
    let spec = |name, kind, key_size, value_size, max_entries| MapSpec {
        name,
        kind,
        key_size,
        value_size,
        max_entries,
        or_larger: false,
    };
    let u32_size = size_of::<u32>();
    vec![
        spec(
            names::SERVICES,
            MapType::Hash,
            size_of::<ServiceKey>(),
            size_of::<Service>(),
            names::SERVICES_MAX,
        ),
        MapSpec {
            or_larger: true,
            ..spec(
                names::SELECT,
                MapType::Array,
                u32_size,
                u32_size,
                sizes.select_slots,
            )
        },
        spec(
            names::BACKENDS,
            MapType::Array,
            u32_size,
            size_of::<Backend>(),
            sizes.backends,
        ),
        spec(
            names::FLOWS,
            MapType::LruHash,
            size_of::<FlowKey>(),
            size_of::<Flow>(),
            sizes.flows,
        ),
        spec(
            names::FLOWS_NEW,
            MapType::LruHash,
            size_of::<FlowKey>(),
            size_of::<Flow>(),
            names::FLOWS_NEW_MAX,
        ),
        spec(
            names::NODE_ADDRS,
            MapType::Hash,
            u32_size,
            size_of::<NodeAddr>(),
            names::NODE_ADDRS_MAX,
        ),
        spec(
            names::IFACE_ADDRS,
            MapType::Hash,
            u32_size,
            u32_size,
            names::IFACE_ADDRS_MAX,
        ),
        spec(
            names::AFFINITY,
            MapType::LruHash,
            size_of::<AffinityKey>(),
            size_of::<Affinity>(),
            names::AFFINITY_MAX,
        ),
        spec(
            names::SOURCE_RANGES,
            MapType::LpmTrie,
            u32_size + size_of::<SourceRange>(),
            u32_size,
            names::SOURCE_RANGES_MAX,
        ),
        spec(
            names::CONFIG,
            MapType::Array,
            u32_size,
            size_of::<GlobalConfig>(),
            1,
        ),
        spec(
            names::STATS,
            MapType::PerCpuArray,
            u32_size,
            size_of::<u64>(),
            REASON_COUNT,
        ),
        spec(
            names::SERVICE_STATS,
            MapType::PerCpuArray,
            u32_size,
            size_of::<Traffic>(),
            names::SERVICE_IDS_MAX,
        ),
        spec(
            names::BACKEND_STATS,
            MapType::PerCpuArray,
            u32_size,
            size_of::<Traffic>(),
            names::BACKENDS_MAX,
        ),
        spec(
            names::FRAGS,
            MapType::LruHash,
            size_of::<FragKey>(),
            size_of::<FragPorts>(),
            names::FRAGS_MAX,
        ),
        spec(
            names::ICMP_LIMIT,
            MapType::LruHash,
            u32_size,
            size_of::<IcmpLimit>(),
            names::ICMP_LIMIT_MAX,
        ),
        spec(
            names::SOCK_REVNAT,
            MapType::LruHash,
            size_of::<SockRevNatKey>(),
            size_of::<SockRevNat>(),
            names::SOCK_REVNAT_MAX,
        ),
        spec(
            names::BACKEND_PATHS,
            MapType::PerCpuArray,
            u32_size,
            size_of::<lb_common::Paths>(),
            names::BACKENDS_MAX,
        ),
    ]
}

/// What `prepare_map_pins` found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PinCheck {
    /// Every configuration map was pinned and fits: the loader reuses them
    /// and the agent adopts what they hold.
    pub adopted: bool,
    /// Pins that did not fit and were removed (the loader creates and pins
    /// new maps there), each with why.
    pub recreated: Vec<(String, String)>,
}

/// Removes the pins the loader must not reuse: a map that differs from
/// what this datapath declares (another version, another size), and the
/// whole configuration group when any of it differs or is missing.
pub fn prepare_map_pins(pins: &PinDir, sizes: &MapSizes) -> Result<PinCheck, PinError> {
    let mut check = PinCheck::default();
    let mut config_present = 0;
    let mut config_broken = Vec::new();
    for spec in map_specs(sizes) {
        let path = pins.map(spec.name);
        if !path.exists() {
            continue;
        }
        let problem = match MapInfo::from_pin(&path) {
            Ok(info) => spec.mismatch(&info),
            Err(error) => Some(format!("unreadable: {error}")),
        };
        let is_config = CONFIG_MAPS.contains(&spec.name);
        match problem {
            Some(why) if is_config => config_broken.push((spec.name.to_owned(), why)),
            Some(why) => {
                remove_pin(&path)?;
                check.recreated.push((spec.name.to_owned(), why));
            }
            None if is_config => config_present += 1,
            None => {}
        }
    }
    let complete = config_present == CONFIG_MAPS.len();
    if complete {
        check.adopted = true;
        return Ok(check);
    }
    if config_present > 0 || !config_broken.is_empty() {
        for name in CONFIG_MAPS {
            let path = pins.map(name);
            if !path.exists() {
                continue;
            }
            remove_pin(&path)?;
            let why = config_broken
                .iter()
                .find(|(broken, _)| broken == name)
                .map_or_else(
                    || String::from("recreated with the rest of the configuration maps"),
                    |(_, why)| why.clone(),
                );
            check.recreated.push((name.to_owned(), why));
        }
    }
    Ok(check)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let pins = PinDir::at(Path::new("/sys/fs/bpf/xlb"));
        assert_eq!(
            pins.map(names::FLOWS),
            Path::new("/sys/fs/bpf/xlb/maps/XLB_FLOWS")
        );
        assert_eq!(pins.link("eth0"), Path::new("/sys/fs/bpf/xlb/links/eth0"));
    }

    #[test]
    fn every_map_has_a_spec_and_config_maps_are_among_them() {
        let specs = map_specs(&MapSizes::default());
        assert_eq!(specs.len(), 17);
        for name in CONFIG_MAPS {
            assert!(specs.iter().any(|spec| spec.name == name), "{name}");
        }
    }

    #[test]
    fn a_directory_off_bpffs_is_refused_with_the_fix() {
        let dir = std::env::temp_dir().join(format!("xlb-pin-test-{}", std::process::id()));
        let error = PinDir::open(&dir).map(|_| ()).map_err(|e| e.to_string());
        let Err(message) = error else {
            panic!("{} is on a bpffs?", dir.display());
        };
        assert!(
            message.contains(&format!("mount -t bpf bpf {}", dir.display())),
            "{message}"
        );
        assert!(!dir.exists(), "nothing is created off a bpffs");
    }

    #[test]
    fn removing_nothing_is_fine() {
        let pins = PinDir::at(Path::new("/nonexistent/xlb"));
        assert_eq!(
            pins.remove_all().map_err(|e| e.to_string()),
            Ok((vec![], vec![], 0))
        );
    }
}
