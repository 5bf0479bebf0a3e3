//! The one reader of the datapath's counters and conntrack: through the
//! pins under `--bpffs` (the CLI, from any process) or through the agent's
//! own map file descriptors (its /metrics and its exit log, which must not
//! depend on where or whether the maps are pinned). Never writes a map.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use aya::maps::{Array, HashMap, Map, MapData, MapError, MapInfo, PerCpuArray};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::loaded_programs;
use lb_common::Traffic;
use lb_common::maps::{self as names, kernel_name};
use lb_common::{
    Affinity, AffinityKey, Flow, Flow6, FlowKey, FlowKey6, GlobalConfig, Paths, Reason, Service,
    ServiceKey,
};

use crate::kernel::maps::{add_count, per_cpu_sum};

mod flows;

pub use flows::{FlowEntry, FlowWalk};

// The pin layout (`BPFFS/maps/<NAME>`, `BPFFS/links/<ifname>`) is the
// kernel layer's; this module only reads it.
pub use crate::kernel::pin::{LINKS_DIR, MAPS_DIR};

/// `enum bpf_prog_type`: BPF_PROG_TYPE_XDP.
const BPF_PROG_TYPE_XDP: u32 = 6;

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("no xlb maps are pinned in {dir}")]
    NotPinned { dir: PathBuf },
    #[error("cannot open the pinned map {path}{hint}")]
    OpenPin {
        path: PathBuf,
        hint: &'static str,
        #[source]
        source: MapError,
    },
    #[error("map {name} is not what this xlb expects (pinned by another version?)")]
    Kind {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("the datapath has no {name}; it is not loaded yet, or not this xlb's")]
    NotLoaded { name: &'static str },
    #[error("no XDP program with id {id} is loaded")]
    NoProgram { id: u32 },
    #[error("cannot read map {map}")]
    Read {
        map: &'static str,
        #[source]
        source: MapError,
    },
}

/// The maps the CLI and /metrics read.
pub struct DatapathMaps {
    stats: PerCpuArray<MapData, u64>,
    service_stats: PerCpuArray<MapData, Traffic>,
    backend_stats: PerCpuArray<MapData, Traffic>,
    backend_paths: PerCpuArray<MapData, Paths>,
    flows: HashMap<MapData, FlowKey, Flow>,
    /// `XLB_FLOWS_NEW` (half-open TCP flows); `None` for a datapath older
    /// than that table.
    half_open: Option<HashMap<MapData, FlowKey, Flow>>,
    /// `XLB_FLOWS6` and `XLB_FLOWS_NEW6`; `None` for a datapath without
    /// IPv6, or read through `xlb`'s own maps (`of_program`: they are
    /// `xlb6`'s).
    flows6: Option<HashMap<MapData, FlowKey6, Flow6>>,
    half_open6: Option<HashMap<MapData, FlowKey6, Flow6>>,
    services: HashMap<MapData, ServiceKey, Service>,
    affinity: HashMap<MapData, AffinityKey, Affinity>,
    config: Array<MapData, GlobalConfig>,
    /// `max_entries` by map name.
    capacity: BTreeMap<&'static str, u32>,
}

/// A count that may have been cut short to bound the time it takes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Count {
    pub entries: u64,
    /// False when the walk stopped at the deadline: `entries` is a lower bound.
    pub complete: bool,
}

const READ_NAMES: [&str; 11] = [
    names::STATS,
    names::SERVICE_STATS,
    names::BACKEND_STATS,
    names::BACKEND_PATHS,
    names::FLOWS,
    names::FLOWS_NEW,
    names::FLOWS6,
    names::FLOWS_NEW6,
    names::SERVICES,
    names::AFFINITY,
    names::CONFIG,
];

/// Of `READ_NAMES`, those a datapath may lack (an older version's pins).
const OPTIONAL_NAMES: [&str; 3] = [names::FLOWS_NEW, names::FLOWS6, names::FLOWS_NEW6];

/// Maps only measured (capacity), not read.
const MEASURED_NAMES: [&str; 1] = [names::BACKENDS];

/// Every map this module opens: what the agent hands its /metrics
/// ([`DatapathMaps::from_maps`]).
pub const OBSERVED: [&str; READ_NAMES.len() + MEASURED_NAMES.len()] = {
    let mut all = [""; READ_NAMES.len() + MEASURED_NAMES.len()];
    let mut at = 0;
    while at < all.len() {
        all[at] = if at < READ_NAMES.len() {
            READ_NAMES[at]
        } else {
            MEASURED_NAMES[at - READ_NAMES.len()]
        };
        at += 1;
    }
    all
};

impl DatapathMaps {
    /// Opens the maps pinned under `bpffs/maps/`.
    pub fn from_pins(bpffs: &Path) -> Result<Self, DatapathError> {
        let dir = bpffs.join(MAPS_DIR);
        if !dir.join(names::STATS).exists() {
            return Err(DatapathError::NotPinned { dir });
        }
        let mut found = BTreeMap::new();
        for name in READ_NAMES {
            let path = dir.join(name);
            if OPTIONAL_NAMES.contains(&name) && !path.exists() {
                continue;
            }
            let data = MapData::from_pin(&path).map_err(|source| DatapathError::OpenPin {
                hint: permission_hint(&source),
                path,
                source,
            })?;
            found.insert(name, data);
        }
        let mut maps = Self::from_data(found)?;
        for name in MEASURED_NAMES {
            if let Ok(info) = MapInfo::from_pin(dir.join(name)) {
                maps.capacity.insert(name, info.max_entries());
            }
        }
        Ok(maps)
    }

    /// Opens the maps of the loaded XDP program `program_id` (the agent's,
    /// pinned or not), matched by name.
    pub fn of_program(program_id: u32) -> Result<Self, DatapathError> {
        let program = loaded_programs()
            .filter_map(Result::ok)
            .find(|program| program.id() == program_id)
            .ok_or(DatapathError::NoProgram { id: program_id })?;
        let map_ids = program
            .map_ids()
            .ok()
            .flatten()
            .ok_or(DatapathError::NoProgram { id: program_id })?;
        let mut found = BTreeMap::new();
        let mut measured = BTreeMap::new();
        for id in map_ids {
            let Ok(data) = MapData::from_id(id) else {
                continue;
            };
            let Ok(info) = data.info() else { continue };
            let Some(name) = info.name_as_str() else {
                continue;
            };
            if let Some(&wanted) = READ_NAMES.iter().find(|n| kernel_name(n) == name) {
                found.insert(wanted, data);
            } else if let Some(&wanted) = MEASURED_NAMES.iter().find(|n| kernel_name(n) == name) {
                measured.insert(wanted, info.max_entries());
            }
        }
        let mut maps = Self::from_data(found)?;
        maps.capacity.extend(measured);
        Ok(maps)
    }

    /// Reads the maps given (descriptors the caller holds, by name: every
    /// name in [`OBSERVED`]). Needs no capability beyond using them; the
    /// agent's /metrics reads its own maps this way, never by id.
    pub fn from_maps(mut maps: BTreeMap<&'static str, MapData>) -> Result<Self, DatapathError> {
        let mut measured = BTreeMap::new();
        for name in MEASURED_NAMES {
            if let Some(data) = maps.remove(name)
                && let Ok(info) = data.info()
            {
                measured.insert(name, info.max_entries());
            }
        }
        let mut opened = Self::from_data(maps)?;
        opened.capacity.extend(measured);
        Ok(opened)
    }

    fn from_data(mut found: BTreeMap<&'static str, MapData>) -> Result<Self, DatapathError> {
        let mut capacity = BTreeMap::new();
        for (&name, data) in &found {
            if let Ok(info) = data.info() {
                capacity.insert(name, info.max_entries());
            }
        }
        let mut take = |name: &'static str| -> Result<Map, DatapathError> {
            let data = found
                .remove(name)
                .ok_or(DatapathError::NotLoaded { name })?;
            Map::from_map_data(data).map_err(|source| DatapathError::Kind { name, source })
        };
        fn typed<T: TryFrom<Map, Error = MapError>>(
            name: &'static str,
            map: Map,
        ) -> Result<T, DatapathError> {
            T::try_from(map).map_err(|source| DatapathError::Kind { name, source })
        }
        Ok(Self {
            stats: typed(names::STATS, take(names::STATS)?)?,
            service_stats: typed(names::SERVICE_STATS, take(names::SERVICE_STATS)?)?,
            backend_stats: typed(names::BACKEND_STATS, take(names::BACKEND_STATS)?)?,
            backend_paths: typed(names::BACKEND_PATHS, take(names::BACKEND_PATHS)?)?,
            flows: typed(names::FLOWS, take(names::FLOWS)?)?,
            half_open: match take(names::FLOWS_NEW) {
                Ok(map) => Some(typed(names::FLOWS_NEW, map)?),
                Err(_) => None,
            },
            flows6: match take(names::FLOWS6) {
                Ok(map) => Some(typed(names::FLOWS6, map)?),
                Err(_) => None,
            },
            half_open6: match take(names::FLOWS_NEW6) {
                Ok(map) => Some(typed(names::FLOWS_NEW6, map)?),
                Err(_) => None,
            },
            services: typed(names::SERVICES, take(names::SERVICES)?)?,
            affinity: typed(names::AFFINITY, take(names::AFFINITY)?)?,
            config: typed(names::CONFIG, take(names::CONFIG)?)?,
            capacity,
        })
    }

    /// `max_entries` of a map, as the kernel created it.
    pub fn capacity(&self, name: &str) -> u32 {
        self.capacity.get(name).copied().unwrap_or(0)
    }

    /// Packets per verdict reason, summed over CPUs, every reason in
    /// counter order (zeros included).
    pub fn verdicts(&self) -> Result<Vec<(Reason, u64)>, DatapathError> {
        Reason::ALL
            .iter()
            .map(|&reason| {
                per_cpu_sum(&self.stats, reason as u32, add_count)
                    .map(|total| (reason, total))
                    .map_err(read_error(names::STATS))
            })
            .collect()
    }

    /// A service's forwarded traffic, summed over CPUs.
    pub fn service_traffic(&self, service_id: u32) -> Result<Traffic, DatapathError> {
        per_cpu_sum(&self.service_stats, service_id, Traffic::add)
            .map_err(read_error(names::SERVICE_STATS))
    }

    /// A backend's forwarded traffic, summed over CPUs.
    pub fn backend_traffic(&self, backend_id: u32) -> Result<Traffic, DatapathError> {
        per_cpu_sum(&self.backend_stats, backend_id, Traffic::add)
            .map_err(read_error(names::BACKEND_STATS))
    }

    /// Which hooks carried a backend's packets, summed over CPUs.
    pub fn backend_paths(&self, backend_id: u32) -> Result<Paths, DatapathError> {
        per_cpu_sum(&self.backend_paths, backend_id, Paths::add)
            .map_err(read_error(names::BACKEND_PATHS))
    }

    /// The datapath's global settings (timeouts), if written.
    pub fn global_config(&self) -> Result<GlobalConfig, DatapathError> {
        self.config.get(&0, 0).map_err(read_error(names::CONFIG))
    }

    /// Entries in `XLB_FLOWS` (two per flow), walking at most until
    /// `deadline`.
    pub fn count_flows(&self, deadline: Instant) -> Count {
        count_keys(self.flows.keys(), self.capacity(names::FLOWS), deadline)
    }

    /// Entries in `XLB_FLOWS_NEW` (half-open TCP flows, two per flow),
    /// walking at most until `deadline`.
    pub fn count_half_open(&self, deadline: Instant) -> Count {
        match &self.half_open {
            Some(map) => count_keys(map.keys(), self.capacity(names::FLOWS_NEW), deadline),
            None => Count {
                entries: 0,
                complete: true,
            },
        }
    }

    /// Entries in `XLB_FLOWS6` and in `XLB_FLOWS_NEW6` (two per flow);
    /// `None` without IPv6 tables.
    pub fn count_flows6(&self, deadline: Instant) -> Option<(Count, Count)> {
        let flows = self.flows6.as_ref()?;
        let established = count_keys(flows.keys(), self.capacity(names::FLOWS6), deadline);
        let half_open = match &self.half_open6 {
            Some(map) => count_keys(map.keys(), self.capacity(names::FLOWS_NEW6), deadline),
            None => Count {
                entries: 0,
                complete: true,
            },
        };
        Some((established, half_open))
    }

    /// Entries in `XLB_SERVICES`.
    pub fn count_services(&self, deadline: Instant) -> Count {
        count_keys(
            self.services.keys(),
            self.capacity(names::SERVICES),
            deadline,
        )
    }

    /// Entries in `XLB_AFFINITY`.
    pub fn count_affinity(&self, deadline: Instant) -> Count {
        count_keys(
            self.affinity.keys(),
            self.capacity(names::AFFINITY),
            deadline,
        )
    }
}

fn count_keys<K>(
    keys: impl Iterator<Item = Result<K, MapError>>,
    capacity: u32,
    deadline: Instant,
) -> Count {
    let mut count = Count {
        entries: 0,
        complete: true,
    };
    // A walk can revisit keys when entries go meanwhile; never report more
    // than the map can hold.
    let cap = u64::from(capacity);
    for key in keys {
        if key.is_err() {
            break;
        }
        if count.entries >= cap {
            break;
        }
        if Instant::now() >= deadline {
            count.complete = false;
            break;
        }
        count.entries += 1;
    }
    count
}

fn read_error(map: &'static str) -> impl Fn(MapError) -> DatapathError {
    move |source| DatapathError::Read { map, source }
}

/// What to say when a pin cannot be opened.
fn permission_hint(error: &MapError) -> &'static str {
    let denied = match error {
        MapError::SyscallError(error) => matches!(
            error.io_error.raw_os_error(),
            Some(libc::EPERM | libc::EACCES)
        ),
        _ => false,
    };
    if denied {
        "; reading BPF maps needs root (or CAP_BPF): run with sudo"
    } else {
        ""
    }
}

/// The id of the XDP program this process loaded (the newest, if several),
/// found through its file descriptors: /proc/self/fd links to
/// `anon_inode:bpf-prog`, whose fdinfo gives type and id.
pub fn own_xdp_program_id() -> Option<u32> {
    let mut newest = None;
    for entry in std::fs::read_dir("/proc/self/fd").ok()?.flatten() {
        let is_program = std::fs::read_link(entry.path())
            .is_ok_and(|link| link.as_os_str() == "anon_inode:bpf-prog");
        if !is_program {
            continue;
        }
        let fdinfo = Path::new("/proc/self/fdinfo").join(entry.file_name());
        let Ok(info) = std::fs::read_to_string(fdinfo) else {
            continue;
        };
        let number = |field| fdinfo_field(&info, field).and_then(|v| v.parse::<u32>().ok());
        if number("prog_type") == Some(BPF_PROG_TYPE_XDP) {
            newest = newest.max(number("prog_id"));
        }
    }
    newest
}

fn fdinfo_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        (name.trim() == field).then(|| value.trim())
    })
}

/// The XDP links pinned under `bpffs/links/`: interface name and the id of
/// the program each runs (`None` if the pin cannot be read).
pub fn pinned_links(bpffs: &Path) -> Vec<(String, Option<u32>)> {
    let Ok(entries) = std::fs::read_dir(bpffs.join(LINKS_DIR)) else {
        return Vec::new();
    };
    let mut links: Vec<(String, Option<u32>)> = entries
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let name = entry.file_name().into_string().ok()?;
            let program = PinnedLink::from_pin(entry.path())
                .ok()
                .and_then(|pinned| FdLink::from(pinned).info().ok())
                .map(|info| info.program_id());
            Some((name, program))
        })
        .collect();
    links.sort();
    links
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error_chain;
    use crate::kernel::is_root;

    #[test]
    fn kernel_names_are_truncated_like_the_kernel_does() {
        assert_eq!(kernel_name(names::BACKEND_STATS), "XLB_BACKEND_STA");
        assert_eq!(kernel_name(names::STATS), "XLB_STATS");
        let mut truncated: Vec<&str> = READ_NAMES.iter().map(|n| kernel_name(n)).collect();
        truncated.sort_unstable();
        truncated.dedup();
        assert_eq!(truncated.len(), READ_NAMES.len(), "names collide");
    }

    #[test]
    fn fdinfo_fields() {
        let info = "pos:\t0\nflags:\t02000002\nprog_type:\t6\nprog_id:\t42\n";
        assert_eq!(fdinfo_field(info, "prog_id"), Some("42"));
        assert_eq!(fdinfo_field(info, "prog_type"), Some("6"));
        assert_eq!(fdinfo_field(info, "map_id"), None);
    }

    #[test]
    fn a_missing_pin_directory_says_not_pinned() {
        let error = DatapathMaps::from_pins(Path::new("/nonexistent/xlb")).err();
        assert!(
            matches!(error, Some(DatapathError::NotPinned { .. })),
            "{:?}",
            error.map(|e| e.to_string())
        );
    }

    #[test]
    fn opens_a_programs_maps_by_its_id() {
        if !is_root() {
            eprintln!("skipped: loading BPF needs root");
            return;
        }
        let mut ebpf = aya::EbpfLoader::new()
            .map_max_entries(names::FLOWS, 2048)
            .map_max_entries(names::BACKENDS, 64)
            .load(crate::DATAPATH_OBJECT)
            .unwrap_or_else(|e| panic!("{}", error_chain(&e)));
        let program: &mut aya::programs::Xdp = ebpf
            .program_mut(names::PROGRAM)
            .unwrap()
            .try_into()
            .unwrap();
        program
            .load()
            .unwrap_or_else(|e| panic!("{}", error_chain(&e)));
        let id = program.info().unwrap().id();
        assert!(own_xdp_program_id().is_some_and(|own| own >= id));

        let maps = DatapathMaps::of_program(id).unwrap_or_else(|e| panic!("{}", error_chain(&e)));
        assert_eq!(maps.capacity(names::FLOWS), 2048);
        assert_eq!(maps.capacity(names::BACKENDS), 64);
        let verdicts = maps
            .verdicts()
            .unwrap_or_else(|e| panic!("{}", error_chain(&e)));
        assert_eq!(verdicts.len(), Reason::ALL.len());
        assert!(verdicts.iter().all(|(_, count)| *count == 0));
        let far = Instant::now() + std::time::Duration::from_secs(5);
        assert_eq!(
            maps.count_flows(far),
            Count {
                entries: 0,
                complete: true
            }
        );
        assert_eq!(maps.service_traffic(1).ok(), Some(Traffic::default()));
        assert_eq!(
            maps.service_traffic(u32::MAX).ok(),
            Some(Traffic::default())
        );
        assert!(matches!(
            DatapathMaps::of_program(u32::MAX),
            Err(DatapathError::NoProgram { .. })
        ));
    }
}
