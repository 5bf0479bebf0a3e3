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

use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, MapData, MapError, MapInfo, PerCpuArray};
use aya::programs::{ProgramError, TestRun as _, Xdp};
use aya::{Ebpf, EbpfError, EbpfLoader, TestRunOptions};
use lb_common::maps::{self as names, Explain, MapDecl, Sizing};
use lb_common::service::{ADDR_ANY_NODE, SERVICE_F_AFFINITY};
use lb_common::{
    Affinity, AffinityKey, BackendHop, Flow, FlowKey, GlobalConfig, NodeAddr, Reason, Service,
    ServiceKey,
};

use super::OBJECT;
use super::maps::{add_count, per_cpu_sum};
use super::pin::MAPS_DIR;

/// The maps the simulation takes from the live datapath as `how` says
/// (`tests` checks the datapath's source never writes a shared one).
fn maps_shared_as(how: Explain) -> impl Iterator<Item = &'static MapDecl> {
    names::MAPS.iter().filter(move |map| map.explain == how)
}

/// Private conntrack and affinity tables hold one tuple's entries.
const PRIVATE_ENTRIES: u32 = 64;

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
    #[error("the simulation's map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("which interface the packet arrives on: {detail}")]
    Interface { detail: String },
    #[error("BPF_PROG_TEST_RUN failed")]
    TestRun {
        #[source]
        source: ProgramError,
    },
}

fn map_error(name: &'static str) -> impl Fn(MapError) -> ExplainError {
    move |source| ExplainError::Map { name, source }
}

/// What one simulated packet did.
#[derive(Clone, Debug)]
pub struct Simulated {
    /// The XDP action the program returned.
    pub action: u32,
    /// The reason it counted (exactly one per packet).
    pub reason: Option<Reason>,
    /// The frame as the program left it (rewritten when forwarded).
    pub output: Vec<u8>,
    /// The live conntrack entry of this tuple, if there is one.
    pub live_flow: Option<Flow>,
    /// The tuple's entry after the run (the live one, updated, or the one
    /// the program created).
    pub flow: Option<Flow>,
    /// The service the tuple's destination names, if any.
    pub service: Option<Service>,
    /// The client's live affinity record for that service.
    pub live_affinity: Option<Affinity>,
    /// The next hop the program resolved for a new flow's backend.
    pub hop: Option<BackendHop>,
    /// The datapath's settings (hash seed, masquerade ports, timeouts).
    pub config: GlobalConfig,
}

/// The datapath program loaded for simulations, with its private maps.
pub struct Simulator {
    ebpf: Ebpf,
    live_flows: HashMap<MapData, FlowKey, Flow>,
    /// `XLB_FLOWS_NEW`: half-open TCP flows.
    live_new_flows: HashMap<MapData, FlowKey, Flow>,
    live_affinity: HashMap<MapData, AffinityKey, Affinity>,
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
        let open = |name: &str| {
            let path = dir.join(name);
            MapData::from_pin(&path).map_err(|source| ExplainError::OpenPin { path, source })
        };
        let live_flows = aya::maps::Map::from_map_data(open(names::FLOWS)?)
            .and_then(HashMap::try_from)
            .map_err(map_error(names::FLOWS))?;
        let live_new_flows = aya::maps::Map::from_map_data(open(names::FLOWS_NEW)?)
            .and_then(HashMap::try_from)
            .map_err(map_error(names::FLOWS_NEW))?;
        let live_affinity = aya::maps::Map::from_map_data(open(names::AFFINITY)?)
            .and_then(HashMap::try_from)
            .map_err(map_error(names::AFFINITY))?;
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
        let program = program(&mut ebpf)?;
        program
            .load()
            .map_err(|source| ExplainError::Verify { source })?;
        Ok(Self {
            ebpf,
            live_flows,
            live_new_flows,
            live_affinity,
        })
    }

    /// The live conntrack entry of `key`, if any, and the table it is in.
    fn live_entry(&self, key: &FlowKey) -> Option<(&'static str, Flow)> {
        if let Ok(flow) = self.live_flows.get(key, 0) {
            return Some((names::FLOWS, flow));
        }
        self.live_new_flows
            .get(key, 0)
            .ok()
            .map(|flow| (names::FLOWS_NEW, flow))
    }

    /// The live conntrack entry of `key`, if any (established or
    /// half-open).
    pub fn live_flow(&self, key: &FlowKey) -> Option<Flow> {
        self.live_entry(key).map(|(_, flow)| flow)
    }

    /// Runs `frame` (whose 5-tuple is `key`) through the program as if it
    /// arrived on `ifindex`.
    pub fn run(
        &mut self,
        key: &FlowKey,
        frame: &[u8],
        ifindex: u32,
    ) -> Result<Simulated, ExplainError> {
        let config = Array::<_, GlobalConfig>::try_from(self.map(names::CONFIG)?)
            .and_then(|config| config.get(&0, 0))
            .map_err(map_error(names::CONFIG))?;
        let service = self.service_for(key)?;
        self.clear_private()?;
        let (live_flow, live_affinity) = self.seed_private(key, service.as_ref())?;

        let before = self.counts()?;
        let (action, output) = test_run(program(&mut self.ebpf)?, frame, ifindex)?;
        let after = self.counts()?;
        let reason = Reason::ALL
            .iter()
            .zip(before.iter().zip(&after))
            .find(|(_, (before, after))| after > before)
            .map(|(reason, _)| *reason);

        let (flow, hop) = self.flow_after(key, live_flow.is_some())?;
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
    fn seed_private(
        &mut self,
        key: &FlowKey,
        service: Option<&Service>,
    ) -> Result<(Option<Flow>, Option<Affinity>), ExplainError> {
        let live = self.live_entry(key);
        let live_flow = live.map(|(_, flow)| flow);
        let mut seed = Vec::new();
        if let Some((table, flow)) = live {
            seed.push((table, *key, flow));
            let peer = FlowKey::peer_of(&flow, key.proto);
            if let Some((table, reply)) = self.live_entry(&peer) {
                seed.push((table, peer, reply));
            }
        }
        for (table, key, flow) in &seed {
            HashMap::<_, FlowKey, Flow>::try_from(self.map(table)?)
                .and_then(|mut flows| flows.insert(key, flow, 0))
                .map_err(map_error(table))?;
        }
        let Some(service) = service.filter(|service| service.flags & SERVICE_F_AFFINITY != 0)
        else {
            return Ok((live_flow, None));
        };
        let affinity_key = AffinityKey {
            service_id: service.id,
            client_addr_be: key.src_addr_be,
        };
        let live_affinity = self.live_affinity.get(&affinity_key, 0).ok();
        if let Some(record) = live_affinity {
            HashMap::<_, AffinityKey, Affinity>::try_from(self.map(names::AFFINITY)?)
                .and_then(|mut affinity| affinity.insert(affinity_key, record, 0))
                .map_err(map_error(names::AFFINITY))?;
        }
        Ok((live_flow, live_affinity))
    }

    /// The tuple's entry after the run, and for a flow the run created
    /// (`was_live` false), the next hop it resolved for the backend.
    fn flow_after(
        &mut self,
        key: &FlowKey,
        was_live: bool,
    ) -> Result<(Option<Flow>, Option<BackendHop>), ExplainError> {
        let mut flow = None;
        for table in [names::FLOWS, names::FLOWS_NEW] {
            flow = flow.or(HashMap::<_, FlowKey, Flow>::try_from(self.map(table)?)
                .map_err(map_error(table))?
                .get(key, 0)
                .ok());
        }
        let hop = match flow {
            Some(flow) if !was_live => {
                Array::<_, BackendHop>::try_from(self.map(names::BACKEND_HOPS)?)
                    .and_then(|hops| hops.get(&flow.backend_id, 0))
                    .ok()
            }
            _ => None,
        };
        Ok((flow, hop))
    }

    fn map(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, ExplainError> {
        self.ebpf.map_mut(name).ok_or(ExplainError::Map {
            name,
            source: MapError::InvalidName {
                name: name.to_owned(),
            },
        })
    }

    /// The service the datapath's lookup finds for the tuple's destination:
    /// the exact frontend, else a NodePort on a node address.
    fn service_for(&mut self, key: &FlowKey) -> Result<Option<Service>, ExplainError> {
        let exact = ServiceKey {
            addr_be: key.dst_addr_be,
            port_be: key.dst_port_be,
            proto: key.proto,
            _pad: 0,
        };
        let services = HashMap::<_, ServiceKey, Service>::try_from(self.map(names::SERVICES)?)
            .map_err(map_error(names::SERVICES))?;
        if let Ok(service) = services.get(&exact, 0) {
            return Ok(Some(service));
        }
        let node_port = ServiceKey {
            addr_be: ADDR_ANY_NODE,
            ..exact
        };
        let found = services.get(&node_port, 0).ok();
        let is_node_addr = HashMap::<_, u32, NodeAddr>::try_from(self.map(names::NODE_ADDRS)?)
            .map_err(map_error(names::NODE_ADDRS))?
            .get(&key.dst_addr_be, 0)
            .is_ok();
        Ok(found.filter(|_| is_node_addr))
    }

    /// Empties the private conntrack and affinity tables.
    fn clear_private(&mut self) -> Result<(), ExplainError> {
        for table in [names::FLOWS, names::FLOWS_NEW] {
            let mut flows = HashMap::<_, FlowKey, Flow>::try_from(self.map(table)?)
                .map_err(map_error(table))?;
            let keys: Vec<FlowKey> = flows.keys().filter_map(Result::ok).collect();
            for key in keys {
                let _ = flows.remove(&key);
            }
        }
        let mut affinity =
            HashMap::<_, AffinityKey, Affinity>::try_from(self.map(names::AFFINITY)?)
                .map_err(map_error(names::AFFINITY))?;
        let keys: Vec<AffinityKey> = affinity.keys().filter_map(Result::ok).collect();
        for key in keys {
            let _ = affinity.remove(&key);
        }
        Ok(())
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

fn program(ebpf: &mut Ebpf) -> Result<&mut Xdp, ExplainError> {
    let name = names::PROGRAM;
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
