//! What a previous agent's configuration maps say about ids, read from
//! their pins before a load recreates them at other sizes (the maps grew):
//! `reconcile::KeptIds` and the flow hash's secret.

use std::net::Ipv4Addr;

use aya::maps::{Array, HashMap, Map, MapData, MapInfo};
use lb_common::maps as names;
use lb_common::service::BACKEND_F_ACTIVE;
use lb_common::{Backend, GlobalConfig, Service, ServiceKey};

use super::maps::{frontend_of, settings_of};
use super::{MapSizes, PinDir};
use crate::model::BackendAddr;
use crate::reconcile::KeptIds;

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
