//! Runs an XDP object with BPF_PROG_TEST_RUN inside a namespace whose
//! routes and neighbours give the FIB lookup known answers, and sets and
//! reads its maps through aya with the lb-common types (the contract), never
//! through datapath code.

use std::net::Ipv4Addr;

use crate::{
    Netns,
    netns::{mac_str, unique_stem},
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, ArrayOfMaps, HashMap, MapData, PerCpuArray,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{TestRun as _, Xdp},
};
use aya::{TestRunOptions, TestRunResult};
use lb_common::{
    Backend, Flow, FlowKey, GlobalConfig, NodeAddr, Peer, Reason, Service, ServiceKey, SourceRange,
    maps as names,
    service::{
        ADDR_ANY_NODE, BACKEND_F_ACTIVE, BACKEND_F_TERMINATING, CONFIG_F_READY, SERVICE_F_AFFINITY,
        SERVICE_F_DROP_IF_EMPTY, SERVICE_F_MASQUERADE, SERVICE_F_SOURCE_RANGES,
    },
};

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
/// The node's address on the client side: where NodePorts answer.
pub const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// The node's address on the backend side: the masquerade source.
pub const NODE_B: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
pub const NODE_B_MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 0x01];
pub const BACKEND_1: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
pub const BACKEND_1_MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 0x02];
pub const BACKEND_2: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 3);
pub const BACKEND_2_MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 0x03];
/// On the backend subnet but with no neighbour entry: the FIB says NO_NEIGH.
pub const BACKEND_UNRESOLVED: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 9);

pub const TCP_NODE_PORT: u16 = 30999;
pub const UDP_NODE_PORT: u16 = 30998;
/// A UDP service with no backends.
pub const EMPTY_NODE_PORT: u16 = 30997;
/// A TCP service whose only backend's MAC is unknown.
pub const UNRESOLVED_NODE_PORT: u16 = 30996;
/// A TCP service with no backends (rejected with RST).
pub const EMPTY_TCP_NODE_PORT: u16 = 30991;
/// externalTrafficPolicy=Local with no local backend: dropped, not rejected.
pub const LOCAL_EMPTY_NODE_PORT: u16 = 30995;
/// UDP backends 1,2, open only to 198.18.0.0/24 (loadBalancerSourceRanges).
pub const RANGED_NODE_PORT: u16 = 30994;
/// UDP backends 1,2 with sessionAffinity ClientIP.
pub const AFFINITY_NODE_PORT: u16 = 30993;
/// UDP backends 1,2 with externalTrafficPolicy=Local: no masquerade.
pub const LOCAL_NODE_PORT: u16 = 30992;
pub const RANGED_SERVICE_ID: u32 = 7;
/// What the agent lists in `XLB_PORTS` for the base state: every frontend
/// port (30991-30999) and every backend's target port.
pub const BASE_PORTS: [u16; 11] = [
    30991, 30992, 30993, 30994, 30995, 30996, 30997, 30998, 30999, 3333, 4444,
];
pub const TCP_TARGET_PORT: u16 = 3333;
pub const UDP_TARGET_PORT: u16 = 4444;
pub const SNAT_MIN: u16 = 61_000;
pub const SNAT_MAX: u16 = 65_535;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Backend ids used by the base state.
pub const BACKEND_1_ID: u32 = 1;
pub const BACKEND_2_ID: u32 = 2;
const BACKEND_UNRESOLVED_ID: u32 = 3;
/// Slots per service in the base state's selection table.
const TABLE_SIZE: u32 = 7;

/// CLOCK_MONOTONIC now, the clock conntrack timestamps use (coarse there).
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

pub fn be(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

pub fn port_be(port: u16) -> u16 {
    port.to_be()
}

/// The loaded program with its maps, inside its own namespace.
pub struct Datapath {
    bpf: Ebpf,
    pub client_ifindex: u32,
    pub backend_ifindex: u32,
}

/// Builds the namespace (client-side and backend-side veths with fixed MACs,
/// addresses and permanent neighbours, forwarding on), then runs `body` on a
/// thread inside it with `object`'s `xlb` program loaded and the base state
/// written.
pub fn with_datapath<T: Send>(
    object: &'static [u8],
    body: impl FnOnce(&mut Datapath) -> T + Send,
) -> T {
    with_namespace(move || {
        let mut datapath = Datapath::load(object);
        datapath.write_base_state();
        body(&mut datapath)
    })
}

/// Builds the namespace `with_datapath` uses and runs `body` on a thread in it.
pub fn with_namespace<T: Send>(body: impl FnOnce() -> T + Send) -> T {
    let ns = Netns::create(format!("{}-fx", unique_stem())).expect("create namespace");
    for (dev, peer, mac, cidr) in [
        ("xc", "xcp", NODE_MAC, "198.18.0.1/24"),
        ("xb", "xbp", NODE_B_MAC, "198.18.1.1/24"),
    ] {
        let mac = mac_str(mac);
        ns.ip(&["link", "add", dev, "type", "veth", "peer", "name", peer])
            .expect("veth");
        ns.ip(&["link", "set", dev, "address", &mac]).expect("mac");
        ns.ip(&["addr", "add", cidr, "dev", dev]).expect("address");
        ns.ip(&["link", "set", dev, "up"]).expect("up");
        ns.ip(&["link", "set", peer, "up"]).expect("peer up");
    }
    for (addr, mac, dev) in [
        (CLIENT, CLIENT_MAC, "xc"),
        (BACKEND_1, BACKEND_1_MAC, "xb"),
        (BACKEND_2, BACKEND_2_MAC, "xb"),
    ] {
        ns.neighbour(addr, mac, dev).expect("neighbour");
    }
    ns.sysctl("net/ipv4/ip_forward", "1").expect("forwarding");
    crate::testrun6::configure_namespace(&ns);
    ns.run(body).expect("run in namespace")
}

pub fn ifindex(name: &str) -> u32 {
    let name = std::ffi::CString::new(name).expect("interface name");
    // SAFETY: `name` is a valid NUL-terminated string for the call's duration.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert_ne!(index, 0, "interface {name:?} not found");
    index
}

impl Datapath {
    pub fn load(object: &[u8]) -> Datapath {
        Self::load_with(object, EbpfLoader::new())
    }

    /// `load` with `XLB_FLOWS6` as large as `XLB_FLOWS`, as the agent sizes
    /// it on a node with an IPv6 address (the object's own size is for a
    /// node without one): for a working set of IPv6 flows.
    pub fn load_dual_stack(object: &[u8]) -> Datapath {
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(names::FLOWS6, lb_common::maps::FLOWS_MAX);
        Self::load_with(object, loader)
    }

    fn load_with(object: &[u8], mut loader: EbpfLoader) -> Datapath {
        let mut bpf = loader.load(object).expect("load the XDP object");
        let program: &mut Xdp = bpf
            .program_mut(names::PROGRAM)
            .expect("program")
            .try_into()
            .expect("an XDP program");
        program.load().expect("verifier accepts the program");
        crate::testrun6::load_ipv6(&mut bpf);
        Datapath {
            bpf,
            client_ifindex: ifindex("xc"),
            backend_ifindex: ifindex("xb"),
        }
    }

    pub(crate) fn bpf(&self) -> &Ebpf {
        &self.bpf
    }

    /// Runs `xlb_tc_pod` (loaded on first use, sharing the maps) once on
    /// `frame` as an skb arriving on `ifindex`: (tc action, output frame).
    /// The skb is not CHECKSUM_PARTIAL (a test run cannot make one): its
    /// L4 checksum is complete, and must stay right through the rewrite.
    pub fn run_tc_pod(&mut self, frame: &[u8], ifindex: u32) -> (i32, Vec<u8>) {
        use aya::programs::SchedClassifier;
        let program: &mut SchedClassifier = self
            .bpf
            .program_mut("xlb_tc_pod")
            .expect("xlb_tc_pod")
            .try_into()
            .expect("a tc program");
        if program.fd().is_err() {
            program.load().expect("verifier accepts xlb_tc_pod");
        }
        // struct __sk_buff: `ifindex` (offset 40) names the device the skb
        // arrives on; every other field the kernel takes stays 0.
        let mut ctx = [0u8; 44];
        ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
        let mut out = vec![0u8; frame.len() + 256];
        let TestRunResult {
            return_value,
            data_size_out,
            ..
        } = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..TestRunOptions::default()
            })
            .expect("BPF_PROG_TEST_RUN of xlb_tc_pod");
        out.truncate(data_size_out as usize);
        (return_value as i32, out)
    }

    pub(crate) fn map_mut(&mut self, name: &str) -> &mut aya::maps::Map {
        self.bpf
            .map_mut(name)
            .unwrap_or_else(|| panic!("map {name}"))
    }

    pub fn services(&mut self) -> HashMap<&mut MapData, ServiceKey, Service> {
        HashMap::try_from(self.map_mut(names::SERVICES)).expect("services map")
    }

    pub fn backends(&mut self) -> Array<&mut MapData, Backend> {
        Array::try_from(self.map_mut(names::BACKENDS)).expect("backends map")
    }

    /// `XLB_FLOWS`: established TCP flows and UDP flows.
    pub fn flows(&mut self) -> HashMap<&mut MapData, FlowKey, Flow> {
        HashMap::try_from(self.map_mut(names::FLOWS)).expect("flows map")
    }

    /// `XLB_FLOWS_NEW`: half-open TCP flows.
    pub fn new_flows(&mut self) -> HashMap<&mut MapData, FlowKey, Flow> {
        HashMap::try_from(self.map_mut(names::FLOWS_NEW)).expect("half-open flows map")
    }

    pub fn set_config(&mut self, cfg: GlobalConfig) {
        let mut map: Array<_, GlobalConfig> =
            Array::try_from(self.map_mut(names::CONFIG)).expect("config map");
        map.set(0, cfg, 0).expect("write config");
    }

    pub fn base_config() -> GlobalConfig {
        GlobalConfig {
            snat_port_min: SNAT_MIN,
            snat_port_max: SNAT_MAX,
            flags: CONFIG_F_READY,
            ..GlobalConfig::DEFAULT
        }
    }

    /// tcp 30999 -> backends 1,2:3333; udp 30998 -> 1,2:4444; udp 30997 ->
    /// no backends; tcp 30996 -> an unresolved backend. NodePorts answer on
    /// 198.18.0.1; masquerade addresses are each veth's own.
    pub fn write_base_state(&mut self) {
        self.write_base_backends();
        self.write_base_services();
        self.write_base_addresses();
        self.write_base_state6();
        self.set_config(Self::base_config());
    }

    /// The backends and their selection slots: ids 1-3 serve TCP (port
    /// 3333), ids 11-12 the same pods for UDP.
    fn write_base_backends(&mut self) {
        let backends = [
            (BACKEND_1_ID, BACKEND_1),
            (BACKEND_2_ID, BACKEND_2),
            (BACKEND_UNRESOLVED_ID, BACKEND_UNRESOLVED),
        ];
        let mut table = self.backends();
        for (id, addr) in backends {
            table
                .set(id, backend(addr, TCP_TARGET_PORT), 0)
                .expect("backend");
            table
                .set(id + 10, backend(addr, UDP_TARGET_PORT), 0)
                .expect("backend");
        }
        // Tables 0 (TCP) and 1 (UDP) alternate the two backends, table 3
        // holds the unresolved one; the empty services name table 2, which
        // is never written.
        let alternate = |first: u32, second: u32| -> Vec<u32> {
            (0..TABLE_SIZE)
                .map(|slot| if slot % 2 == 0 { first } else { second })
                .collect()
        };
        self.set_table(0, &alternate(BACKEND_1_ID, BACKEND_2_ID));
        self.set_table(1, &alternate(BACKEND_1_ID + 10, BACKEND_2_ID + 10));
        self.set_table(3, &alternate(BACKEND_UNRESOLVED_ID, BACKEND_UNRESOLVED_ID));
    }

    /// `XLB_SELECT[table]` = a new table holding `ids`, as the agent writes
    /// one.
    pub fn set_table(&mut self, table: u32, ids: &[u32]) {
        let len = u32::try_from(ids.len()).expect("table size");
        let mut new: Array<MapData, u32> =
            Array::create(len, names::SELECT_TABLE_FLAGS).expect("create a table");
        for (slot, id) in ids.iter().enumerate() {
            new.set(slot as u32, id, 0).expect("slot");
        }
        let mut select: ArrayOfMaps<_, Array<MapData, u32>> =
            ArrayOfMaps::try_from(self.map_mut(names::SELECT)).expect("select map");
        select.set(table, &new, 0).expect("swap the table in");
    }

    /// The slots of `XLB_SELECT[table]`.
    pub fn table(&mut self, table: u32) -> Vec<u32> {
        let select: ArrayOfMaps<_, Array<MapData, u32>> =
            ArrayOfMaps::try_from(self.map_mut(names::SELECT)).expect("select map");
        let slots = select.get(&table, 0).expect("table");
        slots.iter().map(|slot| slot.expect("slot")).collect()
    }

    /// The NodePort services, each naming its selection table.
    fn write_base_services(&mut self) {
        let mut services = self.services();
        let masq = SERVICE_F_MASQUERADE;
        let table = TABLE_SIZE;
        for (id, port, proto, table_id, size, flags) in [
            (1, TCP_NODE_PORT, IPPROTO_TCP, 0, table, masq),
            (2, UDP_NODE_PORT, IPPROTO_UDP, 1, table, masq),
            (3, EMPTY_NODE_PORT, IPPROTO_UDP, 2, 0, masq),
            (4, UNRESOLVED_NODE_PORT, IPPROTO_TCP, 3, table, masq),
            (5, EMPTY_TCP_NODE_PORT, IPPROTO_TCP, 2, 0, masq),
            (
                6,
                LOCAL_EMPTY_NODE_PORT,
                IPPROTO_UDP,
                2,
                0,
                SERVICE_F_DROP_IF_EMPTY,
            ),
            (
                RANGED_SERVICE_ID,
                RANGED_NODE_PORT,
                IPPROTO_UDP,
                1,
                table,
                masq | SERVICE_F_SOURCE_RANGES,
            ),
            (
                8,
                AFFINITY_NODE_PORT,
                IPPROTO_UDP,
                1,
                table,
                masq | SERVICE_F_AFFINITY,
            ),
            (9, LOCAL_NODE_PORT, IPPROTO_UDP, 1, table, 0),
        ] {
            let key = ServiceKey {
                addr_be: ADDR_ANY_NODE,
                port_be: port_be(port),
                proto,
                _pad: 0,
            };
            let service = Service {
                id,
                table_id,
                table_size: size,
                flags,
                affinity_timeout_s: 10_800,
                _pad: 0,
            };
            services.insert(key, service, 0).expect("service");
        }
    }

    /// The allowed source range, the node's addresses and the interfaces
    /// XDP may redirect into.
    fn write_base_addresses(&mut self) {
        let mut ranges: LpmTrie<_, SourceRange, u32> =
            LpmTrie::try_from(self.map_mut(names::SOURCE_RANGES)).expect("source ranges");
        let allowed = SourceRange {
            service_id: RANGED_SERVICE_ID,
            addr_be: be(Ipv4Addr::new(198, 18, 0, 0)),
        };
        ranges
            .insert(&Key::new(32 + 24, allowed), 1, 0)
            .expect("source range");
        let mut nodes: HashMap<_, u32, NodeAddr> =
            HashMap::try_from(self.map_mut(names::NODE_ADDRS)).expect("node addrs");
        nodes
            .insert(be(NODE), NodeAddr::default(), 0)
            .expect("node addr");
        let (client_if, backend_if) = (self.client_ifindex, self.backend_ifindex);
        let mut ifaces: HashMap<_, u32, u32> =
            HashMap::try_from(self.map_mut(names::IFACE_ADDRS)).expect("iface addrs");
        ifaces.insert(client_if, be(NODE), 0).expect("iface addr");
        ifaces
            .insert(backend_if, be(NODE_B), 0)
            .expect("iface addr");
        // The agent attaches XDP to both: XDP may redirect into them.
        for ifindex in [client_if, backend_if] {
            self.set_redirect_ok(ifindex, true);
        }
    }

    /// Sets `ifindex`'s `XLB_REDIRECT_OK` slot (an older object's: a hash).
    fn set_redirect_ok(&mut self, ifindex: u32, ok: bool) {
        let map = self.map_mut(names::REDIRECT_OK);
        if let Ok(mut array) = Array::<_, u32>::try_from(&mut *map) {
            array.set(ifindex, u32::from(ok), 0).expect("redirect ok");
        } else if let Ok(mut hash) = HashMap::<_, u32, u32>::try_from(map) {
            let _ = hash.remove(&ifindex);
            let _ = ok && hash.insert(ifindex, 0, 0).is_ok();
        }
    }

    /// Turns the port filter (`XLB_PORTS`) on with exactly `ports` listed
    /// (the words, then the flag, as the agent writes it), or off with
    /// `None`. False for an object without the map (an older build).
    pub fn filter_ports(&mut self, ports: Option<&[u16]>) -> bool {
        let Some(map) = self.bpf.map_mut(names::PORTS) else {
            return false;
        };
        let mut words: Array<_, u64> = Array::try_from(map).expect("ports map");
        for index in (0..names::PORTS_ON).filter(|_| ports.is_some()) {
            let listed = ports
                .unwrap_or_default()
                .iter()
                .map(|&p| names::port_bit(p));
            let bits = listed.fold(0, |bits, (word, bit)| {
                bits | (bit * u64::from(word == index))
            });
            words.set(index, bits, 0).expect("ports word");
        }
        let on = u64::from(ports.is_some());
        words.set(names::PORTS_ON, on, 0).expect("ports flag");
        true
    }

    /// Removes a backend the way the agent does: first every selection slot
    /// that named it names `survivor` instead, then the backend is marked
    /// inactive.
    pub fn remove_backend(&mut self, id: u32, survivor: u32) {
        for table in [0, 1, 3] {
            let slots: Vec<u32> = self
                .table(table)
                .into_iter()
                .map(|slot| if slot == id { survivor } else { slot })
                .collect();
            self.set_table(table, &slots);
        }
        let mut table = self.backends();
        let mut entry = table.get(&id, 0).expect("backend");
        entry.flags &= !BACKEND_F_ACTIVE;
        table.set(id, entry, 0).expect("backend");
    }

    /// Marks a backend terminating (it keeps its flows, affinity skips it).
    pub fn set_terminating(&mut self, id: u32) {
        let mut table = self.backends();
        let mut entry = table.get(&id, 0).expect("backend");
        entry.flags |= BACKEND_F_TERMINATING;
        table.set(id, entry, 0).expect("backend");
    }

    /// Takes `ifindex` out of `XLB_REDIRECT_OK`, as for an interface XDP
    /// does not run on (a pod's veth, a bridge, a tunnel): frames for it are
    /// handed to tc. `write_base_state` puts it back.
    pub fn forbid_redirect(&mut self, ifindex: u32) {
        self.set_redirect_ok(ifindex, false);
    }

    /// Makes `addr` a local pod behind the veth `peer.ifindex`
    /// (`XLB_PEERS`); `clear_peers` forgets every one.
    pub fn set_peer(&mut self, addr: Ipv4Addr, peer: Peer) {
        let mut peers: HashMap<_, u32, Peer> =
            HashMap::try_from(self.map_mut(names::PEERS)).expect("peers map");
        peers.insert(be(addr), peer, 0).expect("peer");
    }

    pub fn clear_peers(&mut self) {
        let mut peers: HashMap<_, u32, Peer> =
            HashMap::try_from(self.map_mut(names::PEERS)).expect("peers map");
        let keys: Vec<u32> = peers.keys().filter_map(Result::ok).collect();
        for key in keys {
            peers.remove(&key).expect("peer");
        }
        self.clear_peers6();
    }

    /// Deletes every conntrack, affinity, fragment and ICMP rate-limit
    /// entry, so rows do not see each other's state.
    pub fn clear_flows(&mut self) {
        for name in [names::FLOWS, names::FLOWS_NEW] {
            let mut flows: HashMap<_, FlowKey, Flow> =
                HashMap::try_from(self.map_mut(name)).expect("flows map");
            let keys: Vec<FlowKey> = flows.keys().filter_map(Result::ok).collect();
            for key in keys {
                let _ = flows.remove(&key);
            }
        }
        let mut affinity: HashMap<_, lb_common::AffinityKey, lb_common::Affinity> =
            HashMap::try_from(self.map_mut(names::AFFINITY)).expect("affinity map");
        let keys: Vec<_> = affinity.keys().filter_map(Result::ok).collect();
        for key in keys {
            let _ = affinity.remove(&key);
        }
        let mut frags: HashMap<_, lb_common::FragKey, lb_common::FragPorts> =
            HashMap::try_from(self.map_mut(names::FRAGS)).expect("frags map");
        let keys: Vec<_> = frags.keys().filter_map(Result::ok).collect();
        for key in keys {
            let _ = frags.remove(&key);
        }
        self.clear_flows6();
        let mut limits: HashMap<_, u32, lb_common::IcmpLimit> =
            HashMap::try_from(self.map_mut(names::ICMP_LIMIT)).expect("ICMP limit map");
        let keys: Vec<_> = limits.keys().filter_map(Result::ok).collect();
        for key in keys {
            let _ = limits.remove(&key);
        }
    }

    /// The entry for `key` in either conntrack table.
    pub fn flow(&mut self, key: &FlowKey) -> Option<Flow> {
        self.flows()
            .get(key, 0)
            .ok()
            .or_else(|| self.new_flows().get(key, 0).ok())
    }

    /// The ports `XLB_FRAGS` recorded for a datagram's first fragment
    /// (host order), if any.
    pub fn frag_ports(
        &mut self,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        id: u16,
        proto: u8,
    ) -> Option<(u16, u16)> {
        let frags: HashMap<_, lb_common::FragKey, lb_common::FragPorts> =
            HashMap::try_from(self.map_mut(names::FRAGS)).expect("frags map");
        let key = lb_common::FragKey {
            src_addr_be: be(src),
            dst_addr_be: be(dst),
            id_be: id.to_be(),
            proto,
            _pad: 0,
        };
        let ports = frags.get(&key, 0).ok()?;
        Some((
            u16::from_be(ports.src_port_be),
            u16::from_be(ports.dst_port_be),
        ))
    }

    /// Traffic counters of a service (`XLB_SERVICE_STATS`) or backend
    /// (`XLB_BACKEND_STATS`), summed over CPUs.
    pub fn traffic(&mut self, map: &str, id: u32) -> lb_common::Traffic {
        let map: PerCpuArray<_, lb_common::Traffic> =
            PerCpuArray::try_from(self.map_mut(map)).expect("traffic map");
        let mut total = lb_common::Traffic::default();
        for per_cpu in map.get(&id, 0).expect("traffic entry").iter() {
            total.add(per_cpu);
        }
        total
    }

    /// Per-reason packet counters summed over CPUs.
    pub fn stats(&mut self) -> Vec<u64> {
        let map: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.map_mut(names::STATS)).expect("stats map");
        Reason::ALL
            .iter()
            .map(|reason| {
                map.get(&(*reason as u32), 0)
                    .map(|per_cpu| per_cpu.iter().sum())
                    .unwrap_or(0)
            })
            .collect()
    }

    /// The loaded XDP program, e.g. to run it from several threads at once.
    pub fn program(&self) -> &Xdp {
        self.bpf
            .program(names::PROGRAM)
            .expect("program")
            .try_into()
            .expect("an XDP program")
    }

    /// Runs the program once on `frame` as if it arrived on `ifindex`.
    pub fn run(&mut self, frame: &[u8], ifindex: u32) -> (u32, Vec<u8>) {
        self.run_repeat(frame, ifindex, 1).0
    }

    /// Runs the program `repeat` times on `frame`; returns the last verdict
    /// and output, and the kernel's average duration per run.
    pub fn run_repeat(
        &mut self,
        frame: &[u8],
        ifindex: u32,
        repeat: u32,
    ) -> ((u32, Vec<u8>), std::time::Duration) {
        let program: &mut Xdp = self
            .bpf
            .program_mut(names::PROGRAM)
            .expect("program")
            .try_into()
            .expect("an XDP program");
        test_run(program, frame, ifindex, repeat)
    }
}

/// BPF_PROG_TEST_RUN of `program` on `frame` arriving on `ifindex`, `repeat`
/// times: (verdict, output frame) of the last run and the kernel's average
/// time per run. The frame is not reset between repeats.
pub fn test_run(
    program: &Xdp,
    frame: &[u8],
    ifindex: u32,
    repeat: u32,
) -> ((u32, Vec<u8>), std::time::Duration) {
    // struct xdp_md { data, data_end, data_meta, ingress_ifindex,
    // rx_queue_index, egress_ifindex }: the kernel wants data_end = length.
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    let mut out = vec![0u8; frame.len() + 256];
    let TestRunResult {
        return_value,
        duration,
        data_size_out,
        ..
    } = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            repeat,
            ..TestRunOptions::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(data_size_out as usize);
    ((return_value, out), duration)
}

fn backend(addr: Ipv4Addr, port: u16) -> Backend {
    Backend {
        addr_be: be(addr),
        port_be: port_be(port),
        _pad: 0,
        flags: BACKEND_F_ACTIVE,
    }
}

/// The conntrack key of a packet as it is on the wire.
pub fn key(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, proto: u8) -> FlowKey {
    FlowKey {
        src_addr_be: be(src),
        dst_addr_be: be(dst),
        src_port_be: port_be(sport),
        dst_port_be: port_be(dport),
        proto,
        _pad: [0; 3],
    }
}
