//! IPv6 for the datapath fixture (`testrun`): the namespace's IPv6
//! addresses and neighbours, loading `xlb6` into `XLB_PROGS6`, and the IPv6
//! base state written through the lb-common types (never datapath code).
//! Backend ids and selection tables are shared with IPv4's; IPv6's use
//! their own numbers.

use std::net::Ipv6Addr;

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, ProgramArray},
    programs::Xdp,
};
use lb_common::{
    Addr6, Affinity6, AffinityKey6, Backend6, Flow6, FlowKey6, NodeAddr, Peer, Service,
    ServiceKey6,
    family::addr6,
    maps as names,
    service::{
        BACKEND_F_ACTIVE, BACKEND_F_TERMINATING, SERVICE_F_AFFINITY, SERVICE_F_DROP_IF_EMPTY,
        SERVICE_F_MASQUERADE,
    },
};

use crate::{Netns, netns::mac_str, testrun::*};

/// The client, on the client-side veth (`xc`, `NODE6` the node's end).
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
/// The node's address on the client side: where IPv6 NodePorts answer.
pub const NODE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
/// The node's address on the backend side: the IPv6 masquerade source.
pub const NODE6_B: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
pub const BACKEND6_1: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
pub const BACKEND6_2: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 3);

/// IPv6 backend ids: TCP (port 3333) and UDP (port 4444) for both pods.
pub const BACKEND6_1_ID: u32 = 21;
pub const BACKEND6_2_ID: u32 = 22;
const UDP_OFFSET: u32 = 10;
/// Selection tables of the IPv6 TCP and UDP NodePorts.
const TCP6_TABLE: u32 = 4;
const UDP6_TABLE: u32 = 5;
const TABLE_SIZE: u32 = 7;
/// Service id of the IPv6 sessionAffinity NodePort (`AFFINITY_NODE_PORT`).
pub const AFFINITY6_SERVICE_ID: u32 = 27;
/// Its sessionAffinity timeout, seconds.
pub const AFFINITY6_TIMEOUT_S: u32 = 60;

pub fn be6(addr: Ipv6Addr) -> Addr6 {
    addr6(addr.octets())
}

/// The conntrack key of an IPv6 packet as it is on the wire.
pub fn key6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, proto: u8) -> FlowKey6 {
    FlowKey6 {
        src_addr_be: be6(src),
        dst_addr_be: be6(dst),
        src_port_be: port_be(sport),
        dst_port_be: port_be(dport),
        proto,
        _pad: [0; 3],
    }
}

/// Gives the fixture namespace's veths their IPv6 addresses and the
/// client's and backends' permanent neighbours; IPv6 forwarding on.
pub fn configure_namespace(ns: &Netns) {
    // A new namespace may inherit a host that has IPv6 off.
    for conf in ["all", "default", "xc", "xb"] {
        ns.sysctl(&format!("net/ipv6/conf/{conf}/disable_ipv6"), "0")
            .expect("IPv6 on");
    }
    for (cidr, dev) in [("2001:db8::1/64", "xc"), ("2001:db8:1::1/64", "xb")] {
        ns.ip(&["-6", "addr", "add", cidr, "dev", dev, "nodad"])
            .expect("IPv6 address");
    }
    for (addr, mac, dev) in [
        (CLIENT6, CLIENT_MAC, "xc"),
        (BACKEND6_1, BACKEND_1_MAC, "xb"),
        (BACKEND6_2, BACKEND_2_MAC, "xb"),
    ] {
        let (addr, mac) = (addr.to_string(), mac_str(mac));
        ns.ip(&[
            "-6",
            "neigh",
            "replace",
            &addr,
            "lladdr",
            &mac,
            "dev",
            dev,
            "nud",
            "permanent",
        ])
        .expect("IPv6 neighbour");
    }
    ns.sysctl("net/ipv6/conf/all/forwarding", "1")
        .expect("IPv6 forwarding");
}

/// Loads `xlb6`, `xlb6_frag` and `xlb6_icmp` and puts them in
/// `XLB_PROGS6`, as the agent does. A program the object does not have (an
/// older build) is left out.
pub fn load_ipv6(bpf: &mut Ebpf) {
    for (index, name) in [
        (names::PROGS6_IPV6, names::PROGRAM6),
        (names::PROGS6_FRAG, names::PROGRAM6_FRAG),
        (names::PROGS6_ICMP, names::PROGRAM6_ICMP),
    ] {
        let Some(program) = bpf.program_mut(name) else {
            continue;
        };
        let program: &mut Xdp = program.try_into().expect("an XDP program");
        if let Err(error) = program.load() {
            panic!("the verifier refuses {name}: {error:?}");
        }
        let fd = program.fd().expect("program fd").try_clone().expect("fd");
        let mut progs: ProgramArray<_> =
            ProgramArray::try_from(bpf.map_mut(names::PROGS6).expect("XLB_PROGS6"))
                .expect("prog array");
        progs.set(index, &fd, 0).expect("a program into XLB_PROGS6");
    }
}

impl Datapath {
    /// A loaded XDP program of the object by name (`xlb`, `xlb6`).
    pub fn program_named(&self, name: &str) -> &Xdp {
        self.bpf()
            .program(name)
            .unwrap_or_else(|| panic!("program {name}"))
            .try_into()
            .expect("an XDP program")
    }

    /// The kernel's `memlock` of map `name` (its memory, bytes), from the
    /// map fd's fdinfo.
    pub fn map_memlock(&mut self, name: &str) -> Option<u64> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let fd = match self.map_mut(name) {
            aya::maps::Map::LruHashMap(data) | aya::maps::Map::HashMap(data) => {
                data.fd().as_fd().as_raw_fd()
            }
            _ => return None,
        };
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
        let line = info.lines().find(|line| line.starts_with("memlock:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    pub fn flows6(&mut self) -> HashMap<&mut MapData, FlowKey6, Flow6> {
        HashMap::try_from(self.map_mut(names::FLOWS6)).expect("flows6 map")
    }

    pub fn new_flows6(&mut self) -> HashMap<&mut MapData, FlowKey6, Flow6> {
        HashMap::try_from(self.map_mut(names::FLOWS_NEW6)).expect("flows_new6 map")
    }

    /// The entry for `key` in either IPv6 conntrack table.
    pub fn flow6(&mut self, key: &FlowKey6) -> Option<Flow6> {
        self.flows6()
            .get(key, 0)
            .ok()
            .or_else(|| self.new_flows6().get(key, 0).ok())
    }

    /// The ports `XLB_FRAGS6` recorded for an IPv6 datagram's first
    /// fragment (host order), if any.
    pub fn frag6_ports(
        &mut self,
        src: Ipv6Addr,
        dst: Ipv6Addr,
        id: u32,
        proto: u8,
    ) -> Option<(u16, u16)> {
        let frags: HashMap<_, lb_common::FragKey6, lb_common::FragPorts> =
            HashMap::try_from(self.map_mut(names::FRAGS6)).expect("frags6 map");
        let key = lb_common::FragKey6 {
            src_addr_be: be6(src),
            dst_addr_be: be6(dst),
            id_be: id.to_be(),
            proto,
            _pad: [0; 3],
        };
        let ports = frags.get(&key, 0).ok()?;
        Some((
            u16::from_be(ports.src_port_be),
            u16::from_be(ports.dst_port_be),
        ))
    }

    /// Makes `addr` a local pod behind the veth `peer.ifindex`
    /// (`XLB_PEERS6`); `clear_peers` forgets every one.
    pub fn set_peer6(&mut self, addr: Ipv6Addr, peer: Peer) {
        let mut peers: HashMap<_, Addr6, Peer> =
            HashMap::try_from(self.map_mut(names::PEERS6)).expect("peers6 map");
        peers.insert(be6(addr), peer, 0).expect("peer6");
    }

    pub(crate) fn clear_peers6(&mut self) {
        if !self.has_ipv6() {
            return;
        }
        let mut peers: HashMap<_, Addr6, Peer> =
            HashMap::try_from(self.map_mut(names::PEERS6)).expect("peers6 map");
        let keys: Vec<Addr6> = peers.keys().filter_map(Result::ok).collect();
        for key in keys {
            let _ = peers.remove(&key);
        }
    }

    /// Whether the object has the IPv6 maps (an older build, as the bench's
    /// `--object` may load, has not).
    pub fn has_ipv6(&self) -> bool {
        self.bpf().map(names::FLOWS6).is_some()
    }

    /// Deletes every IPv6 conntrack, affinity and ICMP rate-limit entry.
    pub fn clear_flows6(&mut self) {
        if !self.has_ipv6() {
            return;
        }
        for name in [names::FLOWS6, names::FLOWS_NEW6] {
            let mut flows: HashMap<_, FlowKey6, Flow6> =
                HashMap::try_from(self.map_mut(name)).expect("flows6 map");
            let keys: Vec<FlowKey6> = flows.keys().filter_map(Result::ok).collect();
            for key in keys {
                let _ = flows.remove(&key);
            }
        }
        if self.bpf().map(names::ICMP_LIMIT6).is_some() {
            let mut limits: HashMap<_, Addr6, lb_common::IcmpLimit> =
                HashMap::try_from(self.map_mut(names::ICMP_LIMIT6)).expect("ICMP limit6 map");
            let keys: Vec<Addr6> = limits.keys().filter_map(Result::ok).collect();
            for key in keys {
                let _ = limits.remove(&key);
            }
        }
        if self.bpf().map(names::AFFINITY6).is_some() {
            let mut affinity = self.affinity6();
            let keys: Vec<AffinityKey6> = affinity.keys().filter_map(Result::ok).collect();
            for key in keys {
                let _ = affinity.remove(&key);
            }
        }
    }

    pub fn affinity6(&mut self) -> HashMap<&mut MapData, AffinityKey6, Affinity6> {
        HashMap::try_from(self.map_mut(names::AFFINITY6)).expect("affinity6 map")
    }

    /// tcp 30999 -> backends 1,2 (IPv6):3333; udp 30998 -> 1,2:4444;
    /// udp 30997 -> no backends; udp 30995 -> none, dropped; udp 30992 ->
    /// 1,2:4444 without masquerade; udp 30993 -> 1,2:4444 with
    /// sessionAffinity ClientIP. NodePorts answer on `NODE6`;
    /// masquerade addresses are each veth's own.
    pub fn write_base_state6(&mut self) {
        if !self.has_ipv6() {
            return;
        }
        let mut backends: Array<_, Backend6> =
            Array::try_from(self.map_mut(names::BACKENDS6)).expect("backends6 map");
        for (id, addr) in [(BACKEND6_1_ID, BACKEND6_1), (BACKEND6_2_ID, BACKEND6_2)] {
            backends
                .set(id, backend6(addr, TCP_TARGET_PORT), 0)
                .expect("backend6");
            backends
                .set(id + UDP_OFFSET, backend6(addr, UDP_TARGET_PORT), 0)
                .expect("backend6");
        }
        let alternate = |first: u32, second: u32| -> Vec<u32> {
            (0..TABLE_SIZE)
                .map(|slot| if slot % 2 == 0 { first } else { second })
                .collect()
        };
        self.set_table(TCP6_TABLE, &alternate(BACKEND6_1_ID, BACKEND6_2_ID));
        let udp = alternate(BACKEND6_1_ID + UDP_OFFSET, BACKEND6_2_ID + UDP_OFFSET);
        self.set_table(UDP6_TABLE, &udp);
        self.write_services6();
        let mut nodes: HashMap<_, Addr6, NodeAddr> =
            HashMap::try_from(self.map_mut(names::NODE_ADDRS6)).expect("node addrs6");
        nodes
            .insert(be6(NODE6), NodeAddr::default(), 0)
            .expect("node addr6");
        let (client_if, backend_if) = (self.client_ifindex, self.backend_ifindex);
        let mut ifaces: HashMap<_, u32, Addr6> =
            HashMap::try_from(self.map_mut(names::IFACE_ADDRS6)).expect("iface addrs6");
        ifaces
            .insert(client_if, be6(NODE6), 0)
            .expect("iface addr6");
        ifaces
            .insert(backend_if, be6(NODE6_B), 0)
            .expect("iface addr6");
    }

    /// Takes IPv6 backend `id` out (inactive, as the agent clears it) and
    /// gives its slots to `survivor`.
    pub fn remove_backend6(&mut self, id: u32, survivor: u32) {
        self.retable6(id, survivor);
        let mut backends: Array<_, Backend6> =
            Array::try_from(self.map_mut(names::BACKENDS6)).expect("backends6 map");
        backends.set(id, Backend6::default(), 0).expect("backend6");
    }

    /// Gives IPv6 backend `id`'s selection slots to `survivor`; `id` stays
    /// active (for its flows, and for affinity records naming it).
    pub fn retable6(&mut self, id: u32, survivor: u32) {
        for table in [TCP6_TABLE, UDP6_TABLE] {
            let slots: Vec<u32> = self
                .table(table)
                .into_iter()
                .map(|slot| if slot == id { survivor } else { slot })
                .collect();
            self.set_table(table, &slots);
        }
    }

    /// Marks IPv6 backend `id` terminating (it keeps its flows, affinity
    /// skips it).
    pub fn set_terminating6(&mut self, id: u32) {
        let mut backends: Array<_, Backend6> =
            Array::try_from(self.map_mut(names::BACKENDS6)).expect("backends6 map");
        let mut entry = backends.get(&id, 0).expect("backend6");
        entry.flags |= BACKEND_F_TERMINATING;
        backends.set(id, entry, 0).expect("backend6");
    }

    fn write_services6(&mut self) {
        let mut services: HashMap<_, ServiceKey6, Service> =
            HashMap::try_from(self.map_mut(names::SERVICES6)).expect("services6 map");
        let masq = SERVICE_F_MASQUERADE;
        let size = TABLE_SIZE;
        let affinity = masq | SERVICE_F_AFFINITY;
        for (id, port, proto, table_id, table_size, flags) in [
            (21, TCP_NODE_PORT, IPPROTO_TCP, TCP6_TABLE, size, masq),
            (22, UDP_NODE_PORT, IPPROTO_UDP, UDP6_TABLE, size, masq),
            (23, EMPTY_NODE_PORT, IPPROTO_UDP, 2, 0, masq),
            (
                24,
                LOCAL_EMPTY_NODE_PORT,
                IPPROTO_UDP,
                2,
                0,
                SERVICE_F_DROP_IF_EMPTY,
            ),
            (25, LOCAL_NODE_PORT, IPPROTO_UDP, UDP6_TABLE, size, 0),
            (26, EMPTY_TCP_NODE_PORT, IPPROTO_TCP, 2, 0, masq),
            (
                AFFINITY6_SERVICE_ID,
                AFFINITY_NODE_PORT,
                IPPROTO_UDP,
                UDP6_TABLE,
                size,
                affinity,
            ),
        ] {
            let key = ServiceKey6 {
                addr_be: [0; 4],
                port_be: port_be(port),
                proto,
                _pad: 0,
            };
            let service = Service {
                id,
                table_id,
                table_size,
                flags,
                affinity_timeout_s: AFFINITY6_TIMEOUT_S,
                _pad: 0,
            };
            services.insert(key, service, 0).expect("service6");
        }
    }
}

fn backend6(addr: Ipv6Addr, port: u16) -> Backend6 {
    Backend6 {
        addr_be: be6(addr),
        port_be: port_be(port),
        _pad: 0,
        flags: BACKEND_F_ACTIVE,
    }
}
