//! What a previous agent's configuration maps say about ids, read from
//! their pins before a load recreates them at other sizes (the maps grew):
//! `reconcile::KeptIds` and the flow hash's secret. An agent that grows
//! its maps also leaves them in a file in its run directory
//! ([`KEPT_FILE`]; a bpffs holds pins only): when the agent it starts grows
//! again before its first apply, that one's maps hold nothing yet, while
//! the datapath still runs with the ids of the maps before.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::Path;

use aya::maps::{Array, HashMap, Map, MapData, MapInfo};
use lb_common::maps as names;
use lb_common::service::BACKEND_F_ACTIVE;
use lb_common::{Backend, GlobalConfig, Service, ServiceKey};

use super::maps::{frontend_of, settings_of};
use super::{MapSizes, PinDir};
use crate::model::{BackendAddr, Protocol};
use crate::reconcile::{Frontend, KeptIds};

/// The file, in the run directory, of the ids an agent that grew its maps
/// was using (see the module docs).
pub const KEPT_FILE: &str = "kept-ids";

/// What a load that recreated the configuration maps keeps of them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Kept {
    pub ids: KeptIds,
    /// The flow hash's secret, if the previous agent had written one.
    pub hash_seed: Option<u64>,
}

/// Whether the configuration maps pinned under `pins` have other sizes
/// than `sizes` gives them (only then is [`pinned_ids`] worth reading).
pub fn resized(pins: &PinDir, sizes: &MapSizes) -> bool {
    [names::decl::SERVICES, names::decl::BACKENDS]
        .iter()
        .any(|decl| {
            MapInfo::from_pin(pins.map(decl.name))
                .is_ok_and(|info| info.max_entries() != sizes.max_entries(decl))
        })
}

/// The frontends and backend ids of the configuration maps pinned under
/// `pins`, if there are any.
pub fn pinned_capacity(pins: &PinDir) -> Option<(u32, u32)> {
    let entries = |name: &str| {
        MapInfo::from_pin(pins.map(name))
            .ok()
            .map(|info| info.max_entries())
    };
    Some((entries(names::SERVICES)?, entries(names::BACKENDS)?))
}

/// The ids in the configuration maps pinned under `pins`; `None` when they
/// are not there or not readable as this version's maps.
pub fn pinned_ids(pins: &PinDir) -> Option<Kept> {
    let open = |name: &str| MapData::from_pin(pins.map(name)).ok();
    let backends: Array<MapData, Backend> =
        Array::try_from(Map::Array(open(names::BACKENDS)?)).ok()?;
    let services: HashMap<MapData, ServiceKey, Service> =
        HashMap::try_from(Map::HashMap(open(names::SERVICES)?)).ok()?;
    let config: Array<MapData, GlobalConfig> =
        Array::try_from(Map::Array(open(names::CONFIG)?)).ok()?;
    let mut kept = KeptIds::default();
    for (id, backend) in backends.iter().enumerate() {
        let backend = backend.ok()?;
        if backend.flags & BACKEND_F_ACTIVE == 0 {
            continue;
        }
        let address = BackendAddr {
            address: Ipv4Addr::from(backend.addr_be.to_ne_bytes()),
            port: u16::from_be(backend.port_be),
        };
        kept.backends.insert(address, u32::try_from(id).ok()?);
    }
    for entry in services.iter() {
        let (key, value) = entry.ok()?;
        if let Some(frontend) = frontend_of(&key) {
            kept.services.insert(frontend, value.id);
        }
    }
    let seed = config
        .get(&0, 0)
        .ok()
        .filter(|config| config.flags != 0)
        .map(|config| settings_of(&config).hash_seed);
    Some(Kept {
        ids: kept,
        hash_seed: seed,
    })
}

/// Writes `kept` to [`KEPT_FILE`] in `dir` (one line per id).
pub fn write_file(dir: &Path, kept: &Kept) -> std::io::Result<()> {
    let mut text = String::new();
    if let Some(seed) = kept.hash_seed {
        let _ = writeln!(text, "seed {seed:016x}");
    }
    for (backend, id) in &kept.ids.backends {
        let _ = writeln!(text, "backend {} {} {id}", backend.address, backend.port);
    }
    for (frontend, id) in &kept.ids.services {
        let address = frontend
            .address
            .map_or_else(|| String::from("-"), |a| a.to_string());
        let _ = writeln!(
            text,
            "service {} {address} {} {id}",
            frontend.protocol, frontend.port
        );
    }
    let path = dir.join(KEPT_FILE);
    let temporary = dir.join(format!(".{KEPT_FILE}.tmp"));
    std::fs::write(&temporary, text)?;
    std::fs::rename(&temporary, &path)
}

/// What [`write_file`] left in `dir`, if anything (lines it cannot read
/// are skipped).
pub fn read_file(dir: &Path) -> Option<Kept> {
    let text = std::fs::read_to_string(dir.join(KEPT_FILE)).ok()?;
    let mut kept = Kept::default();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            ["seed", seed] => kept.hash_seed = u64::from_str_radix(seed, 16).ok(),
            ["backend", address, port, id] => {
                if let (Ok(address), Ok(port), Ok(id)) = (address.parse(), port.parse(), id.parse())
                {
                    kept.ids.backends.insert(BackendAddr { address, port }, id);
                }
            }
            ["service", protocol, address, port, id] => {
                let address = match *address {
                    "-" => Some(None),
                    text => text.parse::<Ipv4Addr>().ok().map(Some),
                };
                if let (Some(protocol), Some(address), Ok(port), Ok(id)) = (
                    Protocol::from_name(protocol),
                    address,
                    port.parse(),
                    id.parse(),
                ) {
                    let frontend = Frontend {
                        protocol,
                        address,
                        port,
                    };
                    kept.ids.services.insert(frontend, id);
                }
            }
            _ => {}
        }
    }
    Some(kept)
}

/// Removes [`KEPT_FILE`] from `dir` (its ids are written in the maps).
pub fn remove_file(dir: &Path) {
    let _ = std::fs::remove_file(dir.join(KEPT_FILE));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kept_file_reads_back_as_written() {
        let dir = std::env::temp_dir().join(format!("xlb-kept-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let mut kept = Kept {
            hash_seed: Some(0x0123_4567_89ab_cdef),
            ..Kept::default()
        };
        let backend = BackendAddr {
            address: Ipv4Addr::new(198, 18, 1, 2),
            port: 8080,
        };
        kept.ids.backends.insert(backend, 7);
        kept.ids
            .services
            .insert(Frontend::node_port(Protocol::Udp, 30053), 3);
        kept.ids.services.insert(
            Frontend::exact(Protocol::Tcp, Ipv4Addr::new(198, 18, 0, 9), 443),
            4,
        );
        assert_eq!(read_file(&dir), None, "nothing written yet");
        let written = write_file(&dir, &kept).map_err(|e| e.to_string());
        assert_eq!(written, Ok(()));
        assert_eq!(read_file(&dir), Some(kept));
        remove_file(&dir);
        assert_eq!(read_file(&dir), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
