//! Pins on a BPF filesystem, so the datapath keeps forwarding (with its
//! conntrack) while the agent restarts or is upgraded.
//!
//! Layout, shared with the CLI (`observe::datapath`) and kept exactly:
//! `DIR/maps/<MAP_NAME>` for every map `lb_common::maps::MAPS` declares
//! pinned,
//! `DIR/links/<ifname>` for the XDP link of every interface,
//! `DIR/cgroup/<hook>` for the socket hooks' cgroup links (connect4, ...).

use std::io;
use std::path::{Path, PathBuf};

use aya::maps::{MapInfo, MapType};
use lb_common::maps::{MAPS, MapDecl, MapKind, Pin};

use super::MapSizes;
use super::sys::fs_magic;

/// `--bpffs`'s default.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/xlb";
pub const MAPS_DIR: &str = "maps";
pub const LINKS_DIR: &str = "links";
pub const CGROUP_LINKS_DIR: &str = "cgroup";
/// tc (tcx) links: `tc/uplink-<interface>`, `tc/pod-<interface>`.
pub const TC_LINKS_DIR: &str = "tc";

/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: u64 = 0xcafe_4a11;

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
        if entries != self.max_entries {
            return Some(format!(
                "max_entries {entries}, expected {}",
                self.max_entries
            ));
        }
        None
    }
}

/// aya's name for a declared map kind.
pub fn map_type(kind: MapKind) -> MapType {
    match kind {
        MapKind::Hash => MapType::Hash,
        MapKind::Array => MapType::Array,
        MapKind::ProgArray => MapType::ProgramArray,
        MapKind::PerCpuArray => MapType::PerCpuArray,
        MapKind::LruHash => MapType::LruHash,
        MapKind::LpmTrie => MapType::LpmTrie,
        MapKind::ArrayOfMaps => MapType::ArrayOfMaps,
    }
}

impl MapSpec {
    /// `map` as the loader creates it with `sizes`.
    pub fn of(map: &MapDecl, sizes: &MapSizes) -> Self {
        Self {
            name: map.name,
            kind: map_type(map.kind),
            key_size: map.key_size,
            value_size: map.value_size,
            max_entries: sizes.max_entries(map),
        }
    }
}

/// Every pinned map of the datapath (`Pin::Config` and `Pin::Alone` in
/// `lb_common::maps::MAPS`), as the loader will create it with `sizes`.
pub fn map_specs(sizes: &MapSizes) -> Vec<MapSpec> {
    MAPS.iter()
        .filter(|map| map.pin != Pin::No)
        .map(|map| MapSpec::of(map, sizes))
        .collect()
}

/// The configuration maps (`Pin::Config`): adopted or recreated together.
fn config_maps() -> impl Iterator<Item = &'static str> {
    MAPS.iter()
        .filter(|map| map.pin == Pin::Config)
        .map(|map| map.name)
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
        let is_config = config_maps().any(|name| name == spec.name);
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
    let complete = config_present == config_maps().count();
    if complete {
        check.adopted = true;
        return Ok(check);
    }
    if config_present > 0 || !config_broken.is_empty() {
        for name in config_maps() {
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
    use lb_common::maps as names;

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
    fn every_pinned_map_has_a_spec_and_config_maps_are_among_them() {
        let specs = map_specs(&MapSizes::default());
        // 18 for IPv4 and the shared ones, 11 more for IPv6.
        assert_eq!(specs.len(), 30);
        for name in config_maps() {
            assert!(specs.iter().any(|spec| spec.name == name), "{name}");
        }
        let unpinned = [
            names::BACKEND_HOPS,
            names::REDIRECT_OK,
            names::BACKEND_HOPS6,
            names::PEERS6,
        ];
        assert!(specs.iter().all(|spec| !unpinned.contains(&spec.name)));
        let select = specs.iter().find(|spec| spec.name == names::SELECT);
        assert!(select.is_some_and(|spec| spec.kind == MapType::ArrayOfMaps));
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
