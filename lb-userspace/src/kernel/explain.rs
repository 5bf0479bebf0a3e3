//! `xlb explain`'s engine: the datapath's own XDP program, loaded a second
//! time next to the running one and run with BPF_PROG_TEST_RUN on one
//! packet (Katran's simulator does the same), so the answer comes from the
//! code that handles real packets.
//!
//! A test run of the real program writes: it creates flows, refreshes
//! affinity records, caches next hops and counts. So the simulation shares
//! with the live datapath only the maps the datapath never writes (the
//! configuration: `Explain::Shared` in `lb_common::maps::MAPS`, opened from
//! the agent's pins) and gets fresh, private copies of every map it does
//! write (both conntrack tables, `XLB_FLOWS` and `XLB_FLOWS_NEW`, are
//! `Explain::Seeded`). The keyed flow hash's secret is in the shared
//! `XLB_CONFIG`, so the simulation hashes as the live datapath does. Before
//! each run the private conntrack is seeded with the live entries of this
//! tuple (and its peer)
//! and the private affinity table with the client's live record, so the
//! program sees what the live one would; what it creates stays private and
//! is read back as the answer. Nothing is written to a live map, and no
//! frame is sent (a test run's XDP_TX/REDIRECT only sets the return value).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, Map, MapData, MapError, MapInfo, PerCpuArray};
use aya::programs::{ProgramError, TestRun as _, Xdp};
use aya::{Ebpf, EbpfError, EbpfLoader, Pod, TestRunOptions};
use lb_common::maps::{self as names, Explain, Hook, MapDecl, Sizing};
use lb_common::service::SERVICE_F_AFFINITY;
use lb_common::{
    AffinityKeyOf, AffinityOf, BackendHopOf, FlowKeyOf, FlowOf, GlobalConfig, NodeAddr, Reason,
    Service, ServiceKeyOf, V4, V6,
};

use super::maps::{MapFamily, add_count, per_cpu_sum};
use super::pin::MAPS_DIR;
use super::{KernelError, OBJECT};

/// The maps the simulation takes from the live datapath as `how` says
/// (`tests` checks the datapath's source never writes a shared one).
fn maps_shared_as(how: Explain) -> impl Iterator<Item = &'static MapDecl> {
    names::MAPS.iter().filter(move |map| map.explain == how)
}

/// Private conntrack and affinity tables hold one tuple's entries.
const PRIVATE_ENTRIES: u32 = 64;

/// A family's maps the simulation reads or seeds, by name.
pub trait ExplainFamily: MapFamily
where
    Self::Addr: Pod,
{
    const FLOWS: &'static str;
    const FLOWS_NEW: &'static str;
    const AFFINITY: &'static str;
    const SERVICES: &'static str;
    const NODE_ADDRS: &'static str;
    const BACKEND_HOPS: &'static str;
}

impl ExplainFamily for V4 {
    const FLOWS: &'static str = names::FLOWS;
    const FLOWS_NEW: &'static str = names::FLOWS_NEW;
    const AFFINITY: &'static str = names::AFFINITY;
    const SERVICES: &'static str = names::SERVICES;
    const NODE_ADDRS: &'static str = names::NODE_ADDRS;
    const BACKEND_HOPS: &'static str = names::BACKEND_HOPS;
}

impl ExplainFamily for V6 {
    const FLOWS: &'static str = names::FLOWS6;
    const FLOWS_NEW: &'static str = names::FLOWS_NEW6;
    const AFFINITY: &'static str = names::AFFINITY6;
    const SERVICES: &'static str = names::SERVICES6;
    const NODE_ADDRS: &'static str = names::NODE_ADDRS6;
    const BACKEND_HOPS: &'static str = names::BACKEND_HOPS6;
}

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error(
        "no xlb datapath is pinned in {dir} (missing {name}); explain needs a running agent's pins: pass the --bpffs it runs with"
    )]
    NotPinned { dir: PathBuf, name: &'static str },
    #[error("cannot open the pinned map {path}")]
    OpenPin {
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error(
        "cannot load the datapath program for the simulation (explain needs root, or CAP_BPF and CAP_PERFMON)"
    )]
    Load {
        #[source]
        source: EbpfError,
    },
    #[error("the kernel rejected the datapath program for the simulation")]
    Verify {
        #[source]
        source: ProgramError,
    },
    #[error("the simulation's IPv6 program")]
    Ipv6 {
        #[source]
        source: Box<KernelError>,
    },
    #[error("the simulation's map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("which interface the packet arrives on: {detail}")]
    Interface { detail: String },
    #[error(
        "SRC {source_addr} and DST {destination} are of different address families; give two IPv4 or two IPv6 addresses"
    )]
    Families {
        source_addr: std::net::IpAddr,
        destination: std::net::IpAddr,
    },
    #[error("BPF_PROG_TEST_RUN failed")]
    TestRun {
        #[source]
        source: ProgramError,
    },
}

fn map_error(name: &'static str) -> impl Fn(MapError) -> ExplainError {
    move |source| ExplainError::Map { name, source }
}

/// What one simulated packet of family `F` did.
#[derive(Clone, Debug)]
pub struct Simulated<F: lb_common::Family> {
    /// The XDP action the program returned.
    pub action: u32,
    /// The reason it counted (exactly one per packet).
    pub reason: Option<Reason>,
    /// The frame as the program left it (rewritten when forwarded).
    pub output: Vec<u8>,
    /// The live conntrack entry of this tuple, if there is one.
    pub live_flow: Option<FlowOf<F>>,
    /// The tuple's entry after the run (the live one, updated, or the one
    /// the program created).
    pub flow: Option<FlowOf<F>>,
    /// The service the tuple's destination names, if any.
    pub service: Option<Service>,
    /// The client's live affinity record for that service.
    pub live_affinity: Option<AffinityOf<F>>,
    /// The next hop the program resolved for a new flow's backend.
    pub hop: Option<BackendHopOf<F>>,
    /// The datapath's settings (hash seed, masquerade ports, timeouts).
    pub config: GlobalConfig,
}

/// The datapath program loaded for simulations, with its private maps.
pub struct Simulator {
    ebpf: Ebpf,
    /// The live conntrack (both tables) and affinity maps of both
    /// families, opened from their pins: read, never written.
    live: BTreeMap<&'static str, Map>,
}

impl Simulator {
    /// Loads the datapath object sharing the configuration maps pinned
    /// under `bpffs`.
    pub fn open(bpffs: &Path) -> Result<Self, ExplainError> {
        let dir = bpffs.join(MAPS_DIR);
        let live = maps_shared_as(Explain::Shared).chain(maps_shared_as(Explain::Seeded));
        for map in live {
            if !dir.join(map.name).exists() {
                return Err(ExplainError::NotPinned {
                    dir: dir.clone(),
                    name: map.name,
                });
            }
        }
        let mut live = BTreeMap::new();
        for map in maps_shared_as(Explain::Seeded) {
            let path = dir.join(map.name);
            let data = MapData::from_pin(&path)
                .map_err(|source| ExplainError::OpenPin { path, source })?;
            let map_of = Map::from_map_data(data).map_err(map_error(map.name))?;
            live.insert(map.name, map_of);
        }
        let mut loader = EbpfLoader::new();
        loader.override_global("XLB_DEBUG", &0u32, false);
        for map in maps_shared_as(Explain::Shared) {
            let path = dir.join(map.name);
            if map.sizing != Sizing::Fixed {
                // The live map's size, as the agent chose it at load.
                let capacity = MapInfo::from_pin(&path)
                    .map(|info| info.max_entries())
                    .map_err(|source| ExplainError::OpenPin {
                        path: path.clone(),
                        source,
                    })?;
                loader.map_max_entries(map.name, capacity);
            }
            loader.map_pin_path(map.name, path);
        }
        for map in maps_shared_as(Explain::Seeded) {
            loader.map_max_entries(map.name, PRIVATE_ENTRIES);
        }
        let mut ebpf = loader
            .load(OBJECT)
            .map_err(|source| ExplainError::Load { source })?;
        // The programs `xlb` tail-calls, in the simulation's own program
        // array, so an IPv6 frame takes the path a live one does.
        for tail in names::PROGRAMS.iter().filter(|p| p.hook == Hook::XdpTail) {
            xdp(&mut ebpf, tail.name)?
                .load()
                .map_err(|source| ExplainError::Verify { source })?;
        }
        super::load::register_ipv6(&mut ebpf).map_err(|source| ExplainError::Ipv6 {
            source: Box::new(source),
        })?;
        xdp(&mut ebpf, names::PROGRAM)?
            .load()
            .map_err(|source| ExplainError::Verify { source })?;
        Ok(Self { ebpf, live })
    }

    /// The live map `name` (one of the seeded ones) as a hash map.
    fn live_map<K: Pod, V: Pod>(
        &self,
        name: &'static str,
    ) -> Result<HashMap<&MapData, K, V>, ExplainError> {
        let map = self.live.get(name).ok_or(ExplainError::Map {
            name,
            source: MapError::InvalidName {
                name: name.to_owned(),
            },
        })?;
        HashMap::try_from(map).map_err(map_error(name))
    }

    /// The live conntrack entry of `key`, if any, and the table it is in.
    fn live_entry<F: ExplainFamily>(
        &self,
        key: &FlowKeyOf<F>,
    ) -> Result<Option<(&'static str, FlowOf<F>)>, ExplainError>
    where
        F::Addr: Pod,
    {
        for table in [F::FLOWS, F::FLOWS_NEW] {
            let flows = self.live_map::<FlowKeyOf<F>, FlowOf<F>>(table)?;
            if let Ok(flow) = flows.get(key, 0) {
                return Ok(Some((table, flow)));
            }
        }
        Ok(None)
    }

    /// The live conntrack entry of `key`, if any (established or
    /// half-open).
    pub fn live_flow<F: ExplainFamily>(
        &self,
        key: &FlowKeyOf<F>,
    ) -> Result<Option<FlowOf<F>>, ExplainError>
    where
        F::Addr: Pod,
    {
        Ok(self.live_entry(key)?.map(|(_, flow)| flow))
    }

    /// Runs `frame` (whose 5-tuple is `key`) through the program as if it
    /// arrived on `ifindex`.
    pub fn run<F: ExplainFamily>(
        &mut self,
        key: &FlowKeyOf<F>,
        frame: &[u8],
        ifindex: u32,
    ) -> Result<Simulated<F>, ExplainError>
    where
        F::Addr: Pod,
    {
        let config = Array::<_, GlobalConfig>::try_from(self.map(names::CONFIG)?)
            .and_then(|config| config.get(&0, 0))
            .map_err(map_error(names::CONFIG))?;
        let service = self.service_for::<F>(key)?;
        self.clear_private()?;
        let (live_flow, live_affinity) = self.seed_private::<F>(key, service.as_ref())?;

        let before = self.counts()?;
        let (action, output) = test_run(xdp(&mut self.ebpf, names::PROGRAM)?, frame, ifindex)?;
        let after = self.counts()?;
        let reason = Reason::ALL
            .iter()
            .zip(before.iter().zip(&after))
            .find(|(_, (before, after))| after > before)
            .map(|(reason, _)| *reason);

        let (flow, hop) = self.flow_after::<F>(key, live_flow.is_some())?;
        Ok(Simulated {
            action,
            reason,
            output,
            live_flow,
            flow,
            service,
            live_affinity,
            hop,
            config,
        })
    }

    /// Copies what the live datapath knows about this tuple and client (its
    /// flow, the flow's peer, the client's affinity record) into the private
    /// maps; returns the live flow and affinity record.
    #[allow(clippy::type_complexity)]
    fn seed_private<F: ExplainFamily>(
        &mut self,
        key: &FlowKeyOf<F>,
        service: Option<&Service>,
    ) -> Result<(Option<FlowOf<F>>, Option<AffinityOf<F>>), ExplainError>
    where
        F::Addr: Pod,
    {
        let live = self.live_entry(key)?;
        let live_flow = live.map(|(_, flow)| flow);
        let mut seed = Vec::new();
        if let Some((table, flow)) = live {
            seed.push((table, *key, flow));
            let peer = FlowKeyOf::<F>::peer_of(&flow, key.proto);
            if let Some((table, reply)) = self.live_entry(&peer)? {
                seed.push((table, peer, reply));
            }
        }
        for (table, key, flow) in &seed {
            HashMap::<_, FlowKeyOf<F>, FlowOf<F>>::try_from(self.map(table)?)
                .and_then(|mut flows| flows.insert(key, flow, 0))
                .map_err(map_error(table))?;
        }
        let Some(service) = service.filter(|service| service.flags & SERVICE_F_AFFINITY != 0)
        else {
            return Ok((live_flow, None));
        };
        let affinity_key = AffinityKeyOf::<F> {
            service_id: service.id,
            client_addr_be: key.src_addr_be,
        };
        let live_affinity = self
            .live_map::<AffinityKeyOf<F>, AffinityOf<F>>(F::AFFINITY)?
            .get(&affinity_key, 0)
            .ok();
        if let Some(record) = live_affinity {
            HashMap::<_, AffinityKeyOf<F>, AffinityOf<F>>::try_from(self.map(F::AFFINITY)?)
                .and_then(|mut affinity| affinity.insert(affinity_key, record, 0))
                .map_err(map_error(F::AFFINITY))?;
        }
        Ok((live_flow, live_affinity))
    }

    /// The tuple's entry after the run, and for a flow the run created
    /// (`was_live` false), the next hop it resolved for the backend.
    #[allow(clippy::type_complexity)]
    fn flow_after<F: ExplainFamily>(
        &mut self,
        key: &FlowKeyOf<F>,
        was_live: bool,
    ) -> Result<(Option<FlowOf<F>>, Option<BackendHopOf<F>>), ExplainError>
    where
        F::Addr: Pod,
    {
        let mut flow = None;
        for table in [F::FLOWS, F::FLOWS_NEW] {
            flow = flow.or(
                HashMap::<_, FlowKeyOf<F>, FlowOf<F>>::try_from(self.map(table)?)
                    .map_err(map_error(table))?
                    .get(key, 0)
                    .ok(),
            );
        }
        let hop = match flow {
            Some(flow) if !was_live => {
                Array::<_, BackendHopOf<F>>::try_from(self.map(F::BACKEND_HOPS)?)
                    .and_then(|hops| hops.get(&flow.backend_id, 0))
                    .ok()
            }
            _ => None,
        };
        Ok((flow, hop))
    }

    fn map(&mut self, name: &'static str) -> Result<&mut Map, ExplainError> {
        self.ebpf.map_mut(name).ok_or(ExplainError::Map {
            name,
            source: MapError::InvalidName {
                name: name.to_owned(),
            },
        })
    }

    /// The service the datapath's lookup finds for the tuple's destination:
    /// the exact frontend, else a NodePort on a node address.
    fn service_for<F: ExplainFamily>(
        &mut self,
        key: &FlowKeyOf<F>,
    ) -> Result<Option<Service>, ExplainError>
    where
        F::Addr: Pod,
    {
        let exact = ServiceKeyOf::<F> {
            addr_be: key.dst_addr_be,
            port_be: key.dst_port_be,
            proto: key.proto,
            _pad: 0,
        };
        let services = HashMap::<_, ServiceKeyOf<F>, Service>::try_from(self.map(F::SERVICES)?)
            .map_err(map_error(F::SERVICES))?;
        if let Ok(service) = services.get(&exact, 0) {
            return Ok(Some(service));
        }
        let node_port = ServiceKeyOf::<F> {
            // A NodePort's key holds the zero address in both families.
            addr_be: F::Addr::default(),
            ..exact
        };
        let found = services.get(&node_port, 0).ok();
        let is_node_addr = HashMap::<_, F::Addr, NodeAddr>::try_from(self.map(F::NODE_ADDRS)?)
            .map_err(map_error(F::NODE_ADDRS))?
            .get(&key.dst_addr_be, 0)
            .is_ok();
        Ok(found.filter(|_| is_node_addr))
    }

    /// Empties the private conntrack and affinity tables of both families.
    fn clear_private(&mut self) -> Result<(), ExplainError> {
        self.clear_family::<V4>()?;
        self.clear_family::<V6>()
    }

    fn clear_family<F: ExplainFamily>(&mut self) -> Result<(), ExplainError>
    where
        F::Addr: Pod,
    {
        for table in [F::FLOWS, F::FLOWS_NEW] {
            clear::<FlowKeyOf<F>, FlowOf<F>>(self.map(table)?).map_err(map_error(table))?;
        }
        clear::<AffinityKeyOf<F>, AffinityOf<F>>(self.map(F::AFFINITY)?)
            .map_err(map_error(F::AFFINITY))
    }

    /// The private per-reason counters, summed over CPUs.
    fn counts(&mut self) -> Result<Vec<u64>, ExplainError> {
        let stats = PerCpuArray::<_, u64>::try_from(self.map(names::STATS)?)
            .map_err(map_error(names::STATS))?;
        Reason::ALL
            .iter()
            .map(|reason| {
                per_cpu_sum(&stats, *reason as u32, add_count).map_err(map_error(names::STATS))
            })
            .collect()
    }
}

/// Removes every entry of the hash map `map`.
fn clear<K: Pod, V: Pod>(map: &mut Map) -> Result<(), MapError> {
    let mut map = HashMap::<_, K, V>::try_from(map)?;
    let keys: Vec<K> = map.keys().filter_map(Result::ok).collect();
    for key in keys {
        let _ = map.remove(&key);
    }
    Ok(())
}

/// The object's XDP program `name`.
fn xdp<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, ExplainError> {
    ebpf.program_mut(name)
        .ok_or(ExplainError::Verify {
            source: ProgramError::NotLoaded,
        })?
        .try_into()
        .map_err(|source| ExplainError::Verify { source })
}

/// One BPF_PROG_TEST_RUN of `frame` arriving on `ifindex`.
fn test_run(program: &mut Xdp, frame: &[u8], ifindex: u32) -> Result<(u32, Vec<u8>), ExplainError> {
    // struct xdp_md { data, data_end, data_meta, ingress_ifindex,
    // rx_queue_index, egress_ifindex }: the kernel wants data_end = length.
    let mut ctx = [0u8; 24];
    let len = u32::try_from(frame.len()).unwrap_or(u32::MAX);
    ctx[4..8].copy_from_slice(&len.to_ne_bytes());
    ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    let mut out = vec![0u8; frame.len() + 256];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            repeat: 1,
            ..TestRunOptions::default()
        })
        .map_err(|source| ExplainError::TestRun { source })?;
    out.truncate(result.data_size_out as usize);
    Ok((result.return_value, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The simulation reads the live configuration maps, so the datapath
    /// must never write them: any write to a shared map in lb-ebpf's
    /// source fails here (give that map a private copy instead).
    #[test]
    fn the_datapath_never_writes_the_shared_maps() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../lb-ebpf/src");
        let mut sources = Vec::new();
        let mut stack = vec![dir];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    sources.push((path.clone(), std::fs::read_to_string(&path).unwrap()));
                }
            }
        }
        assert!(sources.len() > 5, "lb-ebpf sources not found");
        for name in maps_shared_as(Explain::Shared).map(|map| map.name) {
            for write in ["insert(", "remove(", "get_ptr_mut(", "set("] {
                let needle = format!("{name}.{write}");
                for (path, text) in &sources {
                    let squeezed: String = text.split_whitespace().collect();
                    assert!(
                        !squeezed.contains(&needle),
                        "{} writes {name} ({needle}): explain would write the live map",
                        path.display()
                    );
                }
            }
        }
    }
}
