//! Loading the embedded object: load-time map sizes, pinned maps reused
//! (or recreated, with a warning), programs verified, the maps handed out
//! to their owners; and the datapath's own log.

use std::collections::BTreeMap;
use std::os::fd::AsFd as _;
use std::path::PathBuf;

use aya::maps::{Array, Map, MapData, ProgramArray};
use aya::programs::Xdp;
use aya::{Ebpf, EbpfLoader};
use lb_common::maps::Sizing;

use super::kept;
use super::{
    Datapath, FlowTable, KernelError, KernelMaps, Loaded, MapSizes, OBJECT, OpenError, PinDir,
    TcRole, pin, sys,
};
use crate::error_chain;

impl Datapath {
    /// Loads the embedded object with the given map sizes and loads (verifies)
    /// its XDP program. Nothing is attached yet, nothing is pinned.
    pub fn load(sizes: MapSizes) -> Result<Loaded, KernelError> {
        Self::load_pinned(sizes, None)
    }

    /// As `load`, with every map pinned under `pins` (`DIR/maps/NAME`):
    /// a pinned map that fits is reused, with its content (the running
    /// datapath's conntrack and configuration); one that does not is
    /// recreated with a warning.
    pub fn load_pinned(sizes: MapSizes, pins: Option<&PinDir>) -> Result<Loaded, KernelError> {
        Self::load_with(sizes, pins, false, &[])
    }

    /// As `load_pinned`. With `debug` (`--datapath-debug`) the datapath's
    /// aya-log statements are switched on (`XLB_DEBUG`) and
    /// `Loaded::logger` reads them; without, aya-log is not set up at all.
    /// `observed` names the maps a reader needs second descriptors of
    /// (`Loaded::observed`; the agent's: `observe::datapath::OBSERVED`).
    pub fn load_with(
        sizes: MapSizes,
        pins: Option<&PinDir>,
        debug: bool,
        observed: &[&'static str],
    ) -> Result<Loaded, KernelError> {
        raise_memlock_limit();
        let (map_paths, adopted, kept) = match pins {
            Some(pins) => pinned_maps(pins, &sizes)?,
            None => (Vec::new(), false, None),
        };
        let mut ebpf = load_object(&sizes, &map_paths, debug)?;
        let logger = if debug {
            aya_log::EbpfLogger::init(&mut ebpf)
                .inspect_err(|error| {
                    log::warn!("--datapath-debug: cannot read the datapath's logs: {error}");
                })
                .ok()
        } else {
            None
        };
        load_programs(&mut ebpf)?;
        let observed = duplicate_maps(&ebpf, observed);
        let name = lb_common::maps::REDIRECT_OK;
        let redirect_ok = ebpf
            .take_map(name)
            .ok_or(OpenError::Missing { name })
            .and_then(|map| {
                Array::try_from(map).map_err(|source| OpenError::Kind { name, source })
            })?;
        let maps = KernelMaps::open(&mut ebpf)?;
        let flows = FlowTable::open(&mut ebpf)?;
        Ok(Loaded {
            datapath: Datapath {
                ebpf,
                attached: Vec::new(),
                tc: Vec::new(),
                redirect_ok,
                pins: pins.cloned(),
                sockets: None,
            },
            maps,
            flows,
            logger,
            adopted,
            kept,
            observed,
        })
    }
}

/// Each map's name and pin path.
type MapPins = Vec<(&'static str, PathBuf)>;

/// Where each map is pinned under `pins`, whether the configuration maps
/// a previous agent pinned are reused, and if they are recreated at other
/// sizes, the ids they gave. Pinned maps that do not fit this datapath are
/// removed (recreated by the load), with a warning.
fn pinned_maps(
    pins: &PinDir,
    sizes: &MapSizes,
) -> Result<(MapPins, bool, Option<kept::Kept>), KernelError> {
    let kept = kept::resized(pins, sizes)
        .then(|| kept::pinned_ids(pins))
        .flatten();
    let check = pin::prepare_map_pins(pins, sizes)?;
    let kept = kept.filter(|_| !check.adopted);
    for (name, why) in &check.recreated {
        let consequence = match &kept {
            Some(_) if is_config_map(name) => {
                "; the configuration is written anew with the same backend and service ids, \
                 so flows keep their backends"
            }
            _ => consequence(name),
        };
        log::warn!("pinned map {name} does not fit this datapath ({why}): recreated{consequence}");
    }
    let paths = pin::map_specs(sizes)
        .iter()
        .map(|spec| (spec.name, pins.map(spec.name)))
        .collect();
    Ok((paths, check.adopted, kept))
}

/// The object with its load-time map sizes, its maps pinned at
/// `map_paths`, and `XLB_DEBUG` set from `debug`.
fn load_object(sizes: &MapSizes, map_paths: &MapPins, debug: bool) -> Result<Ebpf, KernelError> {
    let debug_flag = u32::from(debug);
    let mut loader = EbpfLoader::new();
    loader.override_global("XLB_DEBUG", &debug_flag, false);
    for map in lb_common::maps::MAPS {
        if map.sizing != Sizing::Fixed {
            loader.map_max_entries(map.name, sizes.max_entries(map));
        }
    }
    for (name, path) in map_paths {
        loader.map_pin_path(name, path.as_path());
    }
    loader
        .load(OBJECT)
        .map_err(|source| KernelError::Load { source })
}

/// Loads (verifies) the XDP programs (`xlb`; `xlb6`, into the array `xlb`
/// tail-calls for IPv6, with `xlb6_frag` and `xlb6_icmp`, which `xlb6`
/// tail-calls for later fragments and ICMPv6) and both tc programs. The kernel verifies
/// one program per `BPF_PROG_LOAD`, on the caller's CPU: `xlb6` is
/// verified on a thread of its own while `xlb` and the tc programs are
/// (together most of the datapath's load time, which a cluster start waits
/// for).
fn load_programs(ebpf: &mut Ebpf) -> Result<(), KernelError> {
    let ipv6 = lb_common::maps::PROGRAM6;
    let names = [
        lb_common::maps::PROGRAM,
        lb_common::maps::PROGRAM6_FRAG,
        lb_common::maps::PROGRAM6_ICMP,
        TcRole::Uplink.program(),
        TcRole::Pod.program(),
    ];
    let mut xlb6 = None;
    let mut others = Vec::new();
    for (name, program) in ebpf.programs_mut() {
        if name == ipv6 {
            xlb6 = Some(program);
        } else if let Some(&name) = names.iter().find(|&&wanted| wanted == name) {
            others.push((name, program));
        }
    }
    if let Some(&name) = names
        .iter()
        .find(|&&name| !others.iter().any(|(found, _)| *found == name))
    {
        return Err(KernelError::MissingProgram { name });
    }
    let xlb6 = xlb6.ok_or(KernelError::MissingProgram { name: ipv6 })?;
    std::thread::scope(|scope| {
        let ipv6_load = scope.spawn(move || load_one(ipv6, xlb6));
        let loaded = others
            .into_iter()
            .try_for_each(|(name, program)| load_one(name, program));
        let ipv6_loaded = match ipv6_load.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        loaded.and(ipv6_loaded)
    })?;
    register_ipv6(ebpf)
}

/// Loads XDP program or tc program `name`, the object's `program`, and
/// logs how long the kernel took (`xlb::timing`).
fn load_one(name: &'static str, program: &mut aya::programs::Program) -> Result<(), KernelError> {
    let started = std::time::Instant::now();
    let loaded = verify_one(name, program);
    log::debug!(
        target: "xlb::timing",
        "{name} loaded (verified) in {:.1} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
    loaded
}

/// [`load_one`] without the timing.
fn verify_one(name: &'static str, program: &mut aya::programs::Program) -> Result<(), KernelError> {
    use lb_common::maps::{PROGRAM, PROGRAM6, PROGRAM6_FRAG, PROGRAM6_ICMP};
    if [PROGRAM, PROGRAM6, PROGRAM6_FRAG, PROGRAM6_ICMP].contains(&name) {
        let program: &mut Xdp = program
            .try_into()
            .map_err(|source| KernelError::NotXdp { name, source })?;
        return program
            .load()
            .map_err(|source| KernelError::Verify { source });
    }
    let program: &mut aya::programs::SchedClassifier = program
        .try_into()
        .map_err(|source| KernelError::NotTc { name, source })?;
    program
        .load()
        .map_err(|source| KernelError::VerifyTc { name, source })
}

/// Puts the loaded `xlb6`, `xlb6_frag` and `xlb6_icmp` in `XLB_PROGS6`
/// (pinned, so it stays filled while no agent runs).
pub(super) fn register_ipv6(ebpf: &mut Ebpf) -> Result<(), KernelError> {
    use lb_common::maps::{
        PROGRAM6, PROGRAM6_FRAG, PROGRAM6_ICMP, PROGS6_FRAG, PROGS6_ICMP, PROGS6_IPV6,
    };
    [
        (PROGS6_IPV6, PROGRAM6),
        (PROGS6_FRAG, PROGRAM6_FRAG),
        (PROGS6_ICMP, PROGRAM6_ICMP),
    ]
    .into_iter()
    .try_for_each(|(index, name)| register_tail(ebpf, index, name))
}

/// Puts the loaded XDP program `name` at `index` of `XLB_PROGS6`.
fn register_tail(ebpf: &mut Ebpf, index: u32, name: &'static str) -> Result<(), KernelError> {
    let not_xdp = |name, source| KernelError::NotXdp { name, source };
    let program: &mut Xdp = super::program(ebpf, name, not_xdp)?;
    let verify = |source| KernelError::Verify { source };
    let fd = program.fd().map_err(verify)?.try_clone();
    let fd = fd.map_err(|error| verify(error.into()))?;
    let map = lb_common::maps::PROGS6;
    let mut progs = ebpf
        .map_mut(map)
        .ok_or(OpenError::Missing { name: map })
        .and_then(|found| {
            ProgramArray::try_from(found).map_err(|source| OpenError::Kind { name: map, source })
        })?;
    progs
        .set(index, &fd, 0)
        .map_err(|source| KernelError::RedirectMap {
            map,
            interface: name.to_owned(),
            source: Box::new(source),
        })
}

/// Whether `name` is one of the configuration group's maps.
fn is_config_map(name: &str) -> bool {
    lb_common::maps::MAPS
        .iter()
        .any(|map| map.name == name && map.pin == lb_common::maps::Pin::Config)
}

/// What recreating a pinned map costs, for the warning.
fn consequence(name: &str) -> &'static str {
    match name {
        lb_common::maps::FLOWS | lb_common::maps::FLOWS_NEW => "; existing flows are forgotten",
        lb_common::maps::STATS
        | lb_common::maps::SERVICE_STATS
        | lb_common::maps::BACKEND_STATS
        | lb_common::maps::BACKEND_PATHS => "; its counters restart from zero",
        _ => "; the configuration is written anew and flows are re-balanced",
    }
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it so large
/// flow tables load there too. Failure is harmless on newer kernels.
fn raise_memlock_limit() {
    if let Err(error) = sys::remove_memlock_limit() {
        log::debug!("cannot remove the memlock limit: {error}");
    }
}

/// Forwards the datapath's aya-log records to the agent's log as they come.
/// Needs a tokio runtime.
pub fn spawn_log_reader(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    let mut fd = match sys::async_readable(logger) {
        Ok(fd) => fd,
        Err(error) => {
            log::warn!("cannot read the datapath's log: {error}");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

/// Second descriptors for the maps `names` of a loaded object, for readers
/// that must not take them from their owners (the agent's /metrics). Taken
/// from this process's own descriptors because opening a map by id
/// (`BPF_MAP_GET_FD_BY_ID`) needs CAP_SYS_ADMIN, which the agent is not
/// given. A map that cannot be duplicated is left out (and logged).
fn duplicate_maps(ebpf: &Ebpf, names: &[&'static str]) -> BTreeMap<&'static str, MapData> {
    let mut found = BTreeMap::new();
    for &name in names {
        let Some(data) = ebpf.map(name).and_then(map_data) else {
            log::warn!("the datapath has no map {name}: /metrics will not report it");
            continue;
        };
        let duplicate = data
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|error| error.to_string())
            .and_then(|fd| MapData::from_fd(fd).map_err(|error| error_chain(&error)));
        match duplicate {
            Ok(data) => {
                found.insert(name, data);
            }
            Err(error) => log::warn!("cannot duplicate map {name} for /metrics: {error}"),
        }
    }
    found
}

/// The map behind any kind of `Map` xlb's object declares.
pub(super) fn map_data(map: &Map) -> Option<&MapData> {
    match map {
        Map::Array(data)
        | Map::HashMap(data)
        | Map::LruHashMap(data)
        | Map::PerCpuArray(data)
        | Map::PerCpuHashMap(data)
        | Map::PerCpuLruHashMap(data)
        | Map::LpmTrie(data)
        | Map::DevMap(data)
        | Map::DevMapHash(data)
        | Map::ArrayOfMaps(data)
        | Map::HashOfMaps(data)
        | Map::RingBuf(data)
        | Map::PerfEventArray(data)
        | Map::ProgramArray(data) => Some(data),
        _ => None,
    }
}
