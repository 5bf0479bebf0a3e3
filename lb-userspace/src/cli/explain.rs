//! `xlb explain PROTO SRC:PORT DST:PORT`: what the datapath would do with
//! that packet, and why: the service it matches, an existing flow, the
//! backend and its Maglev slot, affinity, the masquerade address and port,
//! the next hop and the verdict. Computed by the datapath's own program on
//! a built packet (`kernel::explain`), against the live configuration,
//! without writing a live map.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::Command;

use lb_common::flow::FLOW_DIR_REPLY;
use lb_common::hash::flow_hash;
use lb_common::service::SERVICE_F_AFFINITY;
use lb_common::{Flow, FlowKey, IPPROTO_TCP, IPPROTO_UDP};
use serde::Serialize;

use super::{CliError, Report, Session};
use crate::kernel::explain::{ExplainError, Simulated, Simulator};
use crate::kernel::host;
use crate::observe::catalog::Catalog;
use crate::observe::metrics::verdict_name;

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

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// One packet to explain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Question {
    pub protocol: Protocol,
    pub source: SocketAddrV4,
    pub destination: SocketAddrV4,
}

impl Question {
    pub fn key(&self) -> FlowKey {
        FlowKey {
            src_addr_be: u32::from_ne_bytes(self.source.ip().octets()),
            dst_addr_be: u32::from_ne_bytes(self.destination.ip().octets()),
            src_port_be: self.source.port().to_be(),
            dst_port_be: self.destination.port().to_be(),
            proto: self.protocol.number(),
            _pad: [0; 3],
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Explanation {
    pub protocol: &'static str,
    pub source: SocketAddrV4,
    pub destination: SocketAddrV4,
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
    pub masquerade: Option<SocketAddrV4>,
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
    pub address: SocketAddrV4,
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
    /// Index of that slot in XLB_SELECT.
    pub select_index: u32,
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
    pub source: SocketAddrV4,
    pub destination: SocketAddrV4,
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
    let interface = match iface {
        Some(name) => name.to_owned(),
        None => route_interface(*question.source.ip()).ok_or_else(|| {
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
    let key = question.key();
    // A client's packet of a known flow carries ACK; a new one is a SYN.
    let tcp_flags = (question.protocol == Protocol::Tcp).then(|| {
        if simulator.live_flow(&key).is_some() {
            TCP_ACK
        } else {
            TCP_SYN
        }
    });
    let frame = build_frame(question, interface_mac(&interface), tcp_flags.unwrap_or(0));
    let simulated = simulator.run(&key, &frame, ifindex)?;
    Ok(describe(
        question, &key, interface, ifindex, tcp_flags, &simulated, catalog,
    ))
}

fn describe(
    question: &Question,
    key: &FlowKey,
    interface: String,
    ifindex: u32,
    tcp_flags: Option<u8>,
    simulated: &Simulated,
    catalog: &Catalog,
) -> Explanation {
    let mut notes = Vec::new();
    let reason = simulated.reason;
    let verdict = match reason {
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
    };
    let service = simulated.service.map(|service| ServiceMatch {
        id: service.id,
        name: catalog
            .services
            .get(&service.id)
            .map(|s| s.qualified_name()),
        affinity_timeout_seconds: (service.flags & SERVICE_F_AFFINITY != 0)
            .then_some(service.affinity_timeout_s),
    });
    let existing_flow = simulated.live_flow.map(|flow| ExistingFlow {
        direction: if flow.direction == FLOW_DIR_REPLY {
            "reply"
        } else {
            "original"
        },
        backend_id: flow.backend_id,
        translated: translated(&flow),
    });
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
    let maglev = simulated
        .service
        .filter(|service| service.table_size > 0)
        .map(|service| {
            let hash = flow_hash(key, simulated.config.hash_key());
            let slot = hash % service.table_size;
            Maglev {
                hash,
                slot,
                table_size: service.table_size,
                select_index: service.table_offset.wrapping_add(slot),
            }
        });
    let affinity = simulated
        .service
        .filter(|service| service.flags & SERVICE_F_AFFINITY != 0)
        .map(|_| AffinityUse {
            record_backend_id: simulated.live_affinity.map(|a| a.backend_id),
            used: new_flow
                && simulated
                    .live_affinity
                    .zip(flow)
                    .is_some_and(|(record, flow)| record.backend_id == flow.backend_id),
        });
    let backend = flow.map(|flow| {
        let by = if !new_flow {
            "existing flow"
        } else if affinity.as_ref().is_some_and(|a| a.used) {
            "affinity"
        } else {
            "maglev"
        };
        let (address, id) = if flow.direction == FLOW_DIR_REPLY {
            // A reply's entry rewrites towards the client; its backend is
            // where it came from.
            (endpoint(key.src_addr_be, key.src_port_be), flow.backend_id)
        } else {
            (
                endpoint(flow.new_dst_addr_be, flow.new_dst_port_be),
                flow.backend_id,
            )
        };
        Chosen {
            id,
            address,
            name: catalog.backends.get(&id).map(|b| b.endpoint()),
            by,
        }
    });
    let masquerade = flow
        .filter(|flow| flow.direction != FLOW_DIR_REPLY && flow.new_src_addr_be != key.src_addr_be)
        .map(|flow| endpoint(flow.new_src_addr_be, flow.new_src_port_be));
    let next_hop = match (flow, simulated.hop) {
        (Some(flow), _) if flow.hop_ifindex != 0 => Some(NextHop {
            ifindex: flow.hop_ifindex,
            interface: host::interface_name(flow.hop_ifindex),
            source_mac: mac(&flow.hop_src_mac),
            destination_mac: mac(&flow.hop_dst_mac),
        }),
        (_, Some(hop)) if hop.ifindex != 0 => Some(NextHop {
            ifindex: hop.ifindex,
            interface: host::interface_name(hop.ifindex),
            source_mac: mac(&hop.src_mac),
            destination_mac: mac(&hop.dst_mac),
        }),
        _ => None,
    };
    let output = output_tuple(&simulated.output).filter(|_| {
        reason.is_some_and(|r| {
            matches!(
                r.verdict(),
                lb_common::reason::Verdict::Forward | lb_common::reason::Verdict::Reject
            )
        })
    });
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
        verdict,
        service,
        existing_flow,
        backend,
        maglev: maglev.filter(|_| new_flow),
        affinity,
        masquerade,
        next_hop,
        output,
        notes,
    }
}

fn translated(flow: &Flow) -> Tuple {
    Tuple {
        source: endpoint(flow.new_src_addr_be, flow.new_src_port_be),
        destination: endpoint(flow.new_dst_addr_be, flow.new_dst_port_be),
    }
}

fn endpoint(addr_be: u32, port_be: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(addr_be.to_ne_bytes()), u16::from_be(port_be))
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
fn route_interface(addr: Ipv4Addr) -> Option<String> {
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

/// The addresses and ports of an IPv4 TCP/UDP frame.
fn output_tuple(frame: &[u8]) -> Option<Tuple> {
    let ip = frame.get(14..)?;
    if frame.get(12..14)? != [0x08, 0x00] || ip.first()? >> 4 != 4 {
        return None;
    }
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    let addr = |at: usize| Some(Ipv4Addr::new(ip[at], ip[at + 1], ip[at + 2], ip[at + 3]));
    let l4 = ip.get(header_len..header_len + 4)?;
    let port = |at: usize| u16::from_be_bytes([l4[at], l4[at + 1]]);
    Some(Tuple {
        source: SocketAddrV4::new(addr(12)?, port(0)),
        destination: SocketAddrV4::new(addr(16)?, port(2)),
    })
}

/// An Ethernet + IPv4 + TCP (no payload) or UDP (a short payload) frame
/// with valid checksums, as a client would send it.
fn build_frame(question: &Question, dst_mac: [u8; 6], tcp_flags: u8) -> Vec<u8> {
    const PAYLOAD: &[u8] = b"xlb explain\n";
    let (l4_len, proto) = match question.protocol {
        Protocol::Tcp => (20usize, IPPROTO_TCP),
        Protocol::Udp => (8 + PAYLOAD.len(), IPPROTO_UDP),
    };
    let total = 20 + l4_len;
    let mut frame = Vec::with_capacity(14 + total);
    frame.extend_from_slice(&dst_mac);
    frame.extend_from_slice(&[0x02, 0x78, 0x6c, 0xee, 0x00, 0x01]);
    frame.extend_from_slice(&[0x08, 0x00]);
    let src = question.source.ip().octets();
    let dst = question.destination.ip().octets();
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, proto, 0, 0];
    ip[2..4].copy_from_slice(&u16::try_from(total).unwrap_or(u16::MAX).to_be_bytes());
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    let ip_sum = checksum(&[&ip]);
    ip[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    frame.extend_from_slice(&ip);

    let mut l4 = Vec::with_capacity(l4_len);
    l4.extend_from_slice(&question.source.port().to_be_bytes());
    l4.extend_from_slice(&question.destination.port().to_be_bytes());
    let sum_at = match question.protocol {
        Protocol::Tcp => {
            l4.extend_from_slice(&1u32.to_be_bytes()); // sequence
            let ack = if tcp_flags & TCP_ACK != 0 { 1u32 } else { 0 };
            l4.extend_from_slice(&ack.to_be_bytes());
            l4.extend_from_slice(&[5 << 4, tcp_flags, 0xfa, 0xf0, 0, 0, 0, 0]);
            16
        }
        Protocol::Udp => {
            l4.extend_from_slice(&u16::try_from(l4_len).unwrap_or(0).to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
            l4.extend_from_slice(PAYLOAD);
            6
        }
    };
    let length = u16::try_from(l4_len).unwrap_or(0).to_be_bytes();
    let pseudo = [&src[..], &dst[..], &[0, proto], &length[..]].concat();
    let mut sum = checksum(&[&pseudo, &l4]);
    if sum == 0 && proto == IPPROTO_UDP {
        sum = 0xffff;
    }
    l4[sum_at..sum_at + 2].copy_from_slice(&sum.to_be_bytes());
    frame.extend_from_slice(&l4);
    frame
}

/// The Internet checksum of the concatenation of `parts` (each of even
/// length but the last).
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    let bytes: Vec<u8> = parts.concat();
    for chunk in bytes.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

impl Report for Explanation {
    fn render(&self) -> String {
        let mut lines: Vec<(String, String)> = Vec::new();
        let mut line = |label: &str, text: String| lines.push((label.to_owned(), text));
        line(
            "packet",
            format!(
                "{} {} -> {}{} arriving on {} (ifindex {})",
                self.protocol,
                self.source,
                self.destination,
                self.tcp_flags.map(|f| format!(" {f}")).unwrap_or_default(),
                self.interface,
                self.ifindex
            ),
        );
        line(
            "service",
            match &self.service {
                Some(service) => format!(
                    "{} (id {}){}",
                    service.name.clone().unwrap_or_else(|| String::from("?")),
                    service.id,
                    service
                        .affinity_timeout_seconds
                        .map(|t| format!(", sessionAffinity ClientIP for {t}s"))
                        .unwrap_or_default()
                ),
                None => String::from("none on this address and port"),
            },
        );
        line(
            "flow",
            match &self.existing_flow {
                Some(flow) => format!(
                    "existing ({} direction): {} -> {}, backend id {}",
                    flow.direction,
                    flow.translated.source,
                    flow.translated.destination,
                    flow.backend_id
                ),
                None => String::from("none in conntrack"),
            },
        );
        if let Some(affinity) = &self.affinity {
            line(
                "affinity",
                match (affinity.record_backend_id, affinity.used) {
                    (Some(id), true) => format!("the client's record names backend id {id}: used"),
                    (Some(id), false) => format!(
                        "the client's record names backend id {id}: not used (expired, gone or not taking new flows)"
                    ),
                    (None, _) => {
                        String::from("no record for this client: Maglev chooses, and is remembered")
                    }
                },
            );
        }
        if let Some(backend) = &self.backend {
            line(
                "backend",
                format!("{} (id {}), by {}", backend.address, backend.id, backend.by),
            );
        }
        if let Some(maglev) = &self.maglev {
            line(
                "maglev",
                format!(
                    "hash {:#010x}: slot {} of {} (XLB_SELECT[{}])",
                    maglev.hash, maglev.slot, maglev.table_size, maglev.select_index
                ),
            );
        }
        if let Some(masquerade) = &self.masquerade {
            line("masquerade", format!("as {masquerade}"));
        }
        if let Some(hop) = &self.next_hop {
            line(
                "next hop",
                format!(
                    "{} (ifindex {}) {} -> {}",
                    hop.interface.clone().unwrap_or_else(|| String::from("?")),
                    hop.ifindex,
                    hop.source_mac,
                    hop.destination_mac
                ),
            );
        }
        line(
            "verdict",
            format!(
                "{} ({}, {}): {}",
                self.verdict.reason,
                self.verdict.verdict,
                self.verdict.action,
                self.verdict.description
            ),
        );
        if let Some(output) = &self.output {
            line(
                "leaves as",
                format!("{} -> {}", output.source, output.destination),
            );
        }
        let width = lines
            .iter()
            .map(|(label, _)| label.len())
            .max()
            .unwrap_or(0);
        let mut out = String::new();
        for (label, text) in &lines {
            out.push_str(&format!("{label:<width$}  {text}\n"));
        }
        for note in &self.notes {
            out.push_str(&format!("note: {note}\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_valid_checksums() {
        let question = Question {
            protocol: Protocol::Udp,
            source: "198.18.0.2:40000".parse().unwrap(),
            destination: "198.18.0.1:30998".parse().unwrap(),
        };
        let frame = build_frame(&question, [2, 0, 0, 0, 0, 1], 0);
        // Summing a header with its checksum gives 0.
        assert_eq!(checksum(&[&frame[14..34]]), 0);
        let udp = &frame[34..];
        let pseudo = [
            &frame[26..34],
            &[0, IPPROTO_UDP],
            &u16::try_from(udp.len()).unwrap().to_be_bytes()[..],
        ]
        .concat();
        assert_eq!(checksum(&[&pseudo, udp]), 0);
        let tuple = output_tuple(&frame).unwrap();
        assert_eq!(tuple.source, question.source);
        assert_eq!(tuple.destination, question.destination);

        let tcp = build_frame(
            &Question {
                protocol: Protocol::Tcp,
                ..question
            },
            [0; 6],
            TCP_SYN,
        );
        assert_eq!(tcp.len(), 14 + 20 + 20);
        assert_eq!(tcp[34 + 13], TCP_SYN);
        let pseudo = [&tcp[26..34], &[0, IPPROTO_TCP], &20u16.to_be_bytes()[..]].concat();
        assert_eq!(checksum(&[&pseudo, &tcp[34..]]), 0);
    }
}
