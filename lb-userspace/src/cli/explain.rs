//! `xlb explain PROTO SRC:PORT DST:PORT`: what the datapath would do with
//! that packet, and why: the service it matches, an existing flow, the
//! backend and its Maglev slot, affinity, the masquerade address and port,
//! the next hop and the verdict. Computed by the datapath's own program on
//! a built packet (`kernel::explain`), against the live configuration,
//! without writing a live map.

use std::net::{IpAddr, SocketAddr};
use std::process::Command;

use aya::Pod;
use lb_common::flow::FLOW_DIR_REPLY;
use lb_common::hash::flow_hash;
use lb_common::service::SERVICE_F_AFFINITY;
use lb_common::{FlowKeyOf, FlowOf, IPPROTO_TCP, IPPROTO_UDP, V4, V6};
use serde::Serialize;

mod frame;
mod render;

use super::{CliError, Session};
use crate::kernel::explain::{ExplainError, ExplainFamily, Simulated, Simulator};
use crate::kernel::host;
use crate::observe::catalog::Catalog;
use crate::observe::metrics::verdict_name;
use frame::{TCP_ACK, TCP_SYN, build_frame, output_tuple};

/// `xlb explain`'s protocol argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    fn number(self) -> u8 {
        match self {
            Protocol::Tcp => IPPROTO_TCP,
            Protocol::Udp => IPPROTO_UDP,
        }
    }
}

/// One packet to explain: both addresses of one family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Question {
    pub protocol: Protocol,
    pub source: SocketAddr,
    pub destination: SocketAddr,
}

impl Question {
    /// The packet's 5-tuple as family `F`'s maps hold it; `None` if an
    /// address is of the other family.
    pub fn key<F: ExplainFamily>(&self) -> Option<FlowKeyOf<F>>
    where
        F::Addr: Pod,
    {
        Some(FlowKeyOf::<F> {
            src_addr_be: F::to_map(self.source.ip())?,
            dst_addr_be: F::to_map(self.destination.ip())?,
            src_port_be: self.source.port().to_be(),
            dst_port_be: self.destination.port().to_be(),
            proto: self.protocol.number(),
            _pad: [0; 3],
        })
    }
}

#[derive(Debug, Serialize)]
pub struct Explanation {
    pub protocol: &'static str,
    pub source: SocketAddr,
    pub destination: SocketAddr,
    /// Where the packet is taken to arrive, and the TCP flags it carried.
    pub interface: String,
    pub ifindex: u32,
    pub tcp_flags: Option<&'static str>,
    pub verdict: Verdict,
    pub service: Option<ServiceMatch>,
    /// The live conntrack entry of this tuple, if any.
    pub existing_flow: Option<ExistingFlow>,
    pub backend: Option<Chosen>,
    pub maglev: Option<Maglev>,
    pub affinity: Option<AffinityUse>,
    pub masquerade: Option<SocketAddr>,
    pub next_hop: Option<NextHop>,
    /// The packet as it would leave (forwarded or rejected).
    pub output: Option<Tuple>,
    pub notes: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Verdict {
    pub reason: &'static str,
    pub verdict: &'static str,
    pub action: &'static str,
    pub description: &'static str,
}

#[derive(Debug, Serialize)]
pub struct ServiceMatch {
    pub id: u32,
    pub name: Option<String>,
    pub affinity_timeout_seconds: Option<u32>,
}

#[derive(Debug, Serialize)]
pub struct ExistingFlow {
    /// `original` (client -> backend) or `reply`.
    pub direction: &'static str,
    pub backend_id: u32,
    pub translated: Tuple,
}

#[derive(Debug, Serialize)]
pub struct Chosen {
    pub id: u32,
    pub address: SocketAddr,
    pub name: Option<String>,
    /// `maglev`, `affinity` or `existing flow`.
    pub by: &'static str,
}

#[derive(Debug, Serialize)]
pub struct Maglev {
    pub hash: u32,
    /// The slot in the service's table (hash mod table size).
    pub slot: u32,
    pub table_size: u32,
    /// The service's table: its index in XLB_SELECT.
    pub table_id: u32,
}

#[derive(Debug, Serialize)]
pub struct AffinityUse {
    /// The backend the client's live record names, if it has one.
    pub record_backend_id: Option<u32>,
    pub used: bool,
}

#[derive(Debug, Serialize)]
pub struct NextHop {
    pub ifindex: u32,
    pub interface: Option<String>,
    pub source_mac: String,
    pub destination_mac: String,
}

#[derive(Debug, Serialize)]
pub struct Tuple {
    pub source: SocketAddr,
    pub destination: SocketAddr,
}

/// Explains `question`, arriving on `iface` (default: the interface this
/// node routes the source address through).
pub fn report(
    session: &Session,
    question: &Question,
    iface: Option<&str>,
) -> Result<Explanation, CliError> {
    let mut simulator = Simulator::open(&session.bpffs)?;
    explain(&mut simulator, &session.catalog, question, iface)
}

/// As [`report`], with a simulator opened once for many questions.
pub fn explain(
    simulator: &mut Simulator,
    catalog: &Catalog,
    question: &Question,
    iface: Option<&str>,
) -> Result<Explanation, CliError> {
    match (question.source.ip(), question.destination.ip()) {
        (IpAddr::V4(_), IpAddr::V4(_)) => explain_in::<V4>(simulator, catalog, question, iface),
        (IpAddr::V6(_), IpAddr::V6(_)) => explain_in::<V6>(simulator, catalog, question, iface),
        (source_addr, destination) => Err(CliError::Explain(ExplainError::Families {
            source_addr,
            destination,
        })),
    }
}

/// [`explain`] for a question of family `F`.
fn explain_in<F: ExplainFamily>(
    simulator: &mut Simulator,
    catalog: &Catalog,
    question: &Question,
    iface: Option<&str>,
) -> Result<Explanation, CliError>
where
    F::Addr: Pod,
{
    let interface = match iface {
        Some(name) => name.to_owned(),
        None => route_interface(question.source.ip()).ok_or_else(|| {
            CliError::Explain(ExplainError::Interface {
                detail: format!(
                    "this node has no route to {}; pass --iface IF",
                    question.source.ip()
                ),
            })
        })?,
    };
    let ifindex = host::ifindex(&interface).ok_or_else(|| {
        CliError::Explain(ExplainError::Interface {
            detail: format!("no interface {interface} here; pass --iface with one `ip link` lists"),
        })
    })?;
    let Some(key) = question.key::<F>() else {
        unreachable!("explain_in is called with the question's family")
    };
    // A client's packet of a known flow carries ACK; a new one is a SYN.
    let tcp_flags = match question.protocol {
        Protocol::Tcp if simulator.live_flow(&key)?.is_some() => Some(TCP_ACK),
        Protocol::Tcp => Some(TCP_SYN),
        Protocol::Udp => None,
    };
    let frame = build_frame(question, interface_mac(&interface), tcp_flags.unwrap_or(0));
    let simulated = simulator.run(&key, &frame, ifindex)?;
    Ok(describe(
        question, &key, interface, ifindex, tcp_flags, &simulated, catalog,
    ))
}

fn describe<F: ExplainFamily>(
    question: &Question,
    key: &FlowKeyOf<F>,
    interface: String,
    ifindex: u32,
    tcp_flags: Option<u8>,
    simulated: &Simulated<F>,
    catalog: &Catalog,
) -> Explanation
where
    F::Addr: Pod,
{
    let reason = simulated.reason;
    let new_flow = reason == Some(lb_common::Reason::FwdNewFlow);
    let flow = simulated.flow.filter(|_| {
        matches!(
            reason,
            Some(
                lb_common::Reason::FwdNewFlow
                    | lb_common::Reason::FwdEstablished
                    | lb_common::Reason::FwdReply
            )
        )
    });
    let affinity = affinity_use(simulated, flow, new_flow);
    let masquerade = flow
        .filter(|flow| flow.direction != FLOW_DIR_REPLY && flow.new_src_addr_be != key.src_addr_be)
        .map(|flow| endpoint::<F>(&flow.new_src_addr_be, flow.new_src_port_be));
    let output = output_tuple(&simulated.output).filter(|_| {
        reason.is_some_and(|r| {
            matches!(
                r.verdict(),
                lb_common::reason::Verdict::Forward | lb_common::reason::Verdict::Reject
            )
        })
    });
    let mut notes = Vec::new();
    if new_flow && masquerade.is_some() {
        notes.push(String::from(
            "the masquerade port is the first free candidate in the simulation's conntrack; the live datapath skips candidates its conntrack already uses",
        ));
    }
    notes.push(String::from(
        "simulated with the datapath's own program (BPF_PROG_TEST_RUN) on the live configuration; no live map was written, no packet sent",
    ));
    Explanation {
        protocol: if question.protocol == Protocol::Tcp {
            "TCP"
        } else {
            "UDP"
        },
        source: question.source,
        destination: question.destination,
        interface,
        ifindex,
        tcp_flags: tcp_flags.map(|flags| if flags == TCP_SYN { "SYN" } else { "ACK" }),
        verdict: verdict(simulated),
        service: service_match(simulated, catalog),
        existing_flow: simulated.live_flow.map(|flow| ExistingFlow {
            direction: if flow.direction == FLOW_DIR_REPLY {
                "reply"
            } else {
                "original"
            },
            backend_id: flow.backend_id,
            translated: translated::<F>(&flow),
        }),
        backend: flow.map(|flow| chosen(key, &flow, new_flow, affinity.as_ref(), catalog)),
        maglev: maglev(key, simulated).filter(|_| new_flow),
        affinity,
        masquerade,
        next_hop: next_hop(flow, simulated),
        output,
        notes,
    }
}

/// The reason the program counted, with its verdict and action.
fn verdict<F: lb_common::Family>(simulated: &Simulated<F>) -> Verdict {
    match simulated.reason {
        Some(reason) => Verdict {
            reason: reason.name(),
            verdict: verdict_name(reason.verdict()),
            action: action_name(simulated.action),
            description: reason.description(),
        },
        None => Verdict {
            reason: "?",
            verdict: "?",
            action: action_name(simulated.action),
            description: "the program counted no reason (not this xlb's datapath?)",
        },
    }
}

fn service_match<F: lb_common::Family>(
    simulated: &Simulated<F>,
    catalog: &Catalog,
) -> Option<ServiceMatch> {
    simulated.service.map(|service| ServiceMatch {
        id: service.id,
        name: catalog
            .services
            .get(&service.id)
            .map(|s| s.qualified_name()),
        affinity_timeout_seconds: (service.flags & SERVICE_F_AFFINITY != 0)
            .then_some(service.affinity_timeout_s),
    })
}

/// Where the tuple falls in its service's Maglev table.
fn maglev<F: lb_common::Family>(key: &FlowKeyOf<F>, simulated: &Simulated<F>) -> Option<Maglev> {
    simulated
        .service
        .filter(|service| service.table_size > 0)
        .map(|service| {
            let hash = flow_hash(key, simulated.config.hash_key());
            let slot = hash % service.table_size;
            Maglev {
                hash,
                slot,
                table_size: service.table_size,
                table_id: service.table_id,
            }
        })
}

/// For a service with session affinity: the client's record, and whether
/// the new `flow` followed it.
fn affinity_use<F: lb_common::Family>(
    simulated: &Simulated<F>,
    flow: Option<FlowOf<F>>,
    new_flow: bool,
) -> Option<AffinityUse> {
    simulated
        .service
        .filter(|service| service.flags & SERVICE_F_AFFINITY != 0)
        .map(|_| AffinityUse {
            record_backend_id: simulated.live_affinity.map(|a| a.backend_id),
            used: new_flow
                && simulated
                    .live_affinity
                    .zip(flow)
                    .is_some_and(|(record, flow)| record.backend_id == flow.backend_id),
        })
}

/// The backend of `flow`, and what chose it.
fn chosen<F: ExplainFamily>(
    key: &FlowKeyOf<F>,
    flow: &FlowOf<F>,
    new_flow: bool,
    affinity: Option<&AffinityUse>,
    catalog: &Catalog,
) -> Chosen
where
    F::Addr: Pod,
{
    let by = if !new_flow {
        "existing flow"
    } else if affinity.is_some_and(|a| a.used) {
        "affinity"
    } else {
        "maglev"
    };
    let address = if flow.direction == FLOW_DIR_REPLY {
        // A reply's entry rewrites towards the client; its backend is
        // where it came from.
        endpoint::<F>(&key.src_addr_be, key.src_port_be)
    } else {
        endpoint::<F>(&flow.new_dst_addr_be, flow.new_dst_port_be)
    };
    Chosen {
        id: flow.backend_id,
        address,
        name: catalog.backends.get(&flow.backend_id).map(|b| b.endpoint()),
        by,
    }
}

/// The hop the flow caches, else the one the program looked up.
fn next_hop<F: lb_common::Family>(
    flow: Option<FlowOf<F>>,
    simulated: &Simulated<F>,
) -> Option<NextHop> {
    let (ifindex, src_mac, dst_mac) = match (flow, simulated.hop) {
        (Some(flow), _) if flow.hop_ifindex != 0 => {
            (flow.hop_ifindex, flow.hop_src_mac, flow.hop_dst_mac)
        }
        (_, Some(hop)) if hop.ifindex != 0 => (hop.ifindex, hop.src_mac, hop.dst_mac),
        _ => return None,
    };
    Some(NextHop {
        ifindex,
        interface: host::interface_name(ifindex),
        source_mac: mac(&src_mac),
        destination_mac: mac(&dst_mac),
    })
}

fn translated<F: ExplainFamily>(flow: &FlowOf<F>) -> Tuple
where
    F::Addr: Pod,
{
    Tuple {
        source: endpoint::<F>(&flow.new_src_addr_be, flow.new_src_port_be),
        destination: endpoint::<F>(&flow.new_dst_addr_be, flow.new_dst_port_be),
    }
}

fn endpoint<F: ExplainFamily>(addr_be: &F::Addr, port_be: u16) -> SocketAddr
where
    F::Addr: Pod,
{
    SocketAddr::new(F::from_map(addr_be), u16::from_be(port_be))
}

fn mac(bytes: &[u8; 6]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn action_name(action: u32) -> &'static str {
    match action {
        0 => "XDP_ABORTED",
        1 => "XDP_DROP",
        2 => "XDP_PASS",
        3 => "XDP_TX",
        4 => "XDP_REDIRECT",
        _ => "?",
    }
}

/// The interface `ip route get ADDR` names: where this node's packets to
/// (and so, symmetrically, from) that address go.
fn route_interface(addr: IpAddr) -> Option<String> {
    let output = Command::new("ip")
        .args(["-o", "route", "get"])
        .arg(addr.to_string())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let mut words = text.split_whitespace();
    words.find(|w| *w == "dev")?;
    words.next().map(str::to_owned)
}

fn interface_mac(interface: &str) -> [u8; 6] {
    let text =
        std::fs::read_to_string(format!("/sys/class/net/{interface}/address")).unwrap_or_default();
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(text.trim().split(':')) {
        *byte = u8::from_str_radix(part, 16).unwrap_or(0);
    }
    mac
}
