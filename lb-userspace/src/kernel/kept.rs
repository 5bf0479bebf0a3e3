//! What a previous agent's configuration maps say about ids, read from
//! their pins before a load recreates them at other sizes (the maps grew):
//! `reconcile::KeptIds` and the flow hash's secret. An agent that grows
//! its maps also leaves them in a file in its run directory
//! ([`KEPT_FILE`]; a bpffs holds pins only): when the agent it starts grows
//! again before its first apply, that one's maps hold nothing yet, while
//! the datapath still runs with the ids of the maps before.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::Path;

use aya::Pod;
use aya::maps::{Array, HashMap, Map, MapData, MapInfo};
use lb_common::maps as names;
use lb_common::{BackendOf, GlobalConfig, Service, ServiceKeyOf, V4, V6};

use super::maps::{MapFamily, active_backend, frontend_of, settings_of};
use super::{MapSizes, PinDir};
use crate::model::{BackendAddr, IpFamily, Protocol};
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
    let config: Array<MapData, GlobalConfig> =
        Array::try_from(Map::Array(open(names::CONFIG)?)).ok()?;
    let mut kept = KeptIds::default();
    pinned_family_ids::<V4>(pins, names::BACKENDS, names::SERVICES, &mut kept)?;
    // Pins of an agent from before IPv6 have no IPv6 maps: nothing to keep.
    if MapInfo::from_pin(pins.map(names::SERVICES6)).is_ok() {
        pinned_family_ids::<V6>(pins, names::BACKENDS6, names::SERVICES6, &mut kept)?;
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

/// [`pinned_ids`] of one family's backends and services maps.
fn pinned_family_ids<F: MapFamily>(
    pins: &PinDir,
    backends: &str,
    services: &str,
    kept: &mut KeptIds,
) -> Option<()>
where
    F::Addr: Pod,
{
    let open = |name: &str| MapData::from_pin(pins.map(name)).ok();
    let backends: Array<MapData, BackendOf<F>> =
        Array::try_from(Map::Array(open(backends)?)).ok()?;
    let services: HashMap<MapData, ServiceKeyOf<F>, Service> =
        HashMap::try_from(Map::HashMap(open(services)?)).ok()?;
    for (id, backend) in backends.iter().enumerate() {
        if let Some(active) = active_backend(&backend.ok()?) {
            kept.backends
                .insert(active.address, u32::try_from(id).ok()?);
        }
    }
    for entry in services.iter() {
        let (key, value) = entry.ok()?;
        if let Some(frontend) = frontend_of(&key) {
            kept.services.insert(frontend, value.id);
        }
    }
    Some(())
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
        let address = match (frontend.address, frontend.family) {
            (Some(address), _) => address.to_string(),
            (None, IpFamily::V4) => String::from("-"),
            (None, IpFamily::V6) => String::from("-6"),
        };
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
                    "-" => Some((IpFamily::V4, None)),
                    "-6" => Some((IpFamily::V6, None)),
                    text => (text.parse::<IpAddr>().ok())
                        .map(|address| (IpFamily::of(address), Some(address))),
                };
                if let (Some(protocol), Some((family, address)), Ok(port), Ok(id)) = (
                    Protocol::from_name(protocol),
                    address,
                    port.parse(),
                    id.parse(),
                ) {
                    let frontend = Frontend {
                        protocol,
                        family,
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
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn the_kept_file_reads_back_as_written() {
        let dir = std::env::temp_dir().join(format!("xlb-kept-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let mut kept = Kept {
            hash_seed: Some(0x0123_4567_89ab_cdef),
            ..Kept::default()
        };
        let backend = |address: &str| BackendAddr {
            address: address.parse().unwrap_or_else(|e| panic!("{e}")),
            port: 8080,
        };
        kept.ids.backends.insert(backend("198.18.1.2"), 7);
        kept.ids.backends.insert(backend("2001:db8:1::2"), 8);
        kept.ids
            .services
            .insert(Frontend::node_port(Protocol::Udp, 30053), 3);
        kept.ids.services.insert(
            Frontend::node_port_in(IpFamily::V6, Protocol::Udp, 30053),
            5,
        );
        kept.ids.services.insert(
            Frontend::exact(Protocol::Tcp, Ipv4Addr::new(198, 18, 0, 9), 443),
            4,
        );
        let v6: IpAddr = "2001:db8::9".parse().unwrap_or_else(|e| panic!("{e}"));
        kept.ids
            .services
            .insert(Frontend::exact(Protocol::Tcp, v6, 443), 6);
        assert_eq!(read_file(&dir), None, "nothing written yet");
        let written = write_file(&dir, &kept).map_err(|e| e.to_string());
        assert_eq!(written, Ok(()));
        assert_eq!(read_file(&dir), Some(kept));
        remove_file(&dir);
        assert_eq!(read_file(&dir), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
