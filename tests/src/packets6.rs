//! IPv6 frames built and checked with etherparse (which shares no code
//! with the datapath): TCP/UDP with any chain of extension headers, their
//! L4 checksums computed from scratch over the IPv6 pseudo-header.

use std::net::Ipv6Addr;

use etherparse::{
    EtherType, Ethernet2Header, Icmpv6Type, IpFragOffset, IpNumber, Ipv6FlowLabel,
    Ipv6FragmentHeader, Ipv6Header, Ipv6RawExtHeader, NetHeaders, PacketBuilder, PacketHeaders,
    TcpHeader, TransportHeader, UdpHeader, icmpv6::DestUnreachableCode,
};

use crate::{
    packets::{ACK, FIN, L4, PSH, RST, SYN},
    testrun::*,
    testrun6::*,
};

/// An IPv6 extension header, in the order the frame carries them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ext {
    /// Hop-by-hop options (padding only), `len` 8-byte units after the first.
    HopByHop(u8),
    /// Destination options (padding only).
    DestOpts(u8),
    /// A routing header (type 0 layout) with this many segments left.
    Routing(u8),
    /// A fragment header: offset (8-byte units), more fragments, id.
    Fragment(u16, bool, u32),
}

const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_DEST: u8 = 60;

impl Ext {
    fn number(&self) -> u8 {
        match self {
            Ext::HopByHop(_) => NEXTHDR_HOP,
            Ext::DestOpts(_) => NEXTHDR_DEST,
            Ext::Routing(_) => NEXTHDR_ROUTING,
            Ext::Fragment(..) => NEXTHDR_FRAGMENT,
        }
    }

    fn bytes(&self, next: u8) -> Vec<u8> {
        let options = |units: u8| {
            // PadN filling the header: 6 bytes, then 8 per unit.
            let len = 6 + 8 * usize::from(units);
            let mut payload = vec![0u8; len];
            payload[0] = 1;
            payload[1] = (len - 2) as u8;
            payload
        };
        let raw = |payload: &[u8]| {
            Ipv6RawExtHeader::new_raw(IpNumber(next), payload)
                .expect("extension header")
                .to_bytes()
                .to_vec()
        };
        match *self {
            Ext::HopByHop(units) | Ext::DestOpts(units) => raw(&options(units)),
            Ext::Routing(segments_left) => raw(&[0, segments_left, 0, 0, 0, 0]),
            Ext::Fragment(offset, more, id) => {
                let offset = IpFragOffset::try_new(offset).expect("offset");
                Ipv6FragmentHeader::new(IpNumber(next), offset, more, id)
                    .to_bytes()
                    .to_vec()
            }
        }
    }
}

/// One IPv6 TCP/UDP frame, field by field.
#[derive(Clone, Debug)]
pub struct Spec6 {
    pub eth_src: [u8; 6],
    pub eth_dst: [u8; 6],
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub sport: u16,
    pub dport: u16,
    pub l4: L4,
    pub hop_limit: u8,
    pub exts: Vec<Ext>,
    pub payload: Vec<u8>,
    pub tcp_seq: u32,
    pub tcp_ack: u32,
}

impl Spec6 {
    /// A client -> IPv6 NodePort frame as it arrives at the node.
    pub fn from_client(sport: u16, dport: u16, l4: L4) -> Spec6 {
        Spec6 {
            eth_src: CLIENT_MAC,
            eth_dst: NODE_MAC,
            src: CLIENT6,
            dst: NODE6,
            sport,
            dport,
            l4,
            hop_limit: 64,
            exts: Vec::new(),
            payload: b"hello xlb6".to_vec(),
            tcp_seq: 1000,
            tcp_ack: 2000,
        }
    }

    pub fn proto(&self) -> u8 {
        match self.l4 {
            L4::Udp => IPPROTO_UDP,
            L4::Tcp(_) => IPPROTO_TCP,
        }
    }

    pub fn key(&self) -> lb_common::FlowKey6 {
        key6(self.src, self.sport, self.dst, self.dport, self.proto())
    }

    fn tcp(&self, flags: u8) -> TcpHeader {
        let mut tcp = TcpHeader::new(self.sport, self.dport, self.tcp_seq, 64_240);
        tcp.fin = flags & FIN != 0;
        tcp.syn = flags & SYN != 0;
        tcp.rst = flags & RST != 0;
        tcp.psh = flags & PSH != 0;
        tcp.ack = flags & ACK != 0;
        if tcp.ack {
            tcp.acknowledgment_number = self.tcp_ack;
        }
        tcp
    }

    pub fn build(&self) -> Vec<u8> {
        let mut exts = Vec::new();
        for (index, ext) in self.exts.iter().enumerate() {
            let next = self.exts.get(index + 1).map_or(self.proto(), Ext::number);
            exts.extend(ext.bytes(next));
        }
        let mut ip = Ipv6Header {
            traffic_class: 0,
            flow_label: Ipv6FlowLabel::ZERO,
            payload_length: 0,
            next_header: IpNumber(self.exts.first().map_or(self.proto(), Ext::number)),
            hop_limit: self.hop_limit,
            source: self.src.octets(),
            destination: self.dst.octets(),
        };
        let l4 = match self.l4 {
            L4::Udp => UdpHeader::with_ipv6_checksum(self.sport, self.dport, &ip, &self.payload)
                .expect("udp")
                .to_bytes()
                .to_vec(),
            L4::Tcp(flags) => {
                let mut tcp = self.tcp(flags);
                tcp.checksum = tcp
                    .calc_checksum_ipv6(&ip, &self.payload)
                    .expect("tcp checksum");
                tcp.to_bytes().to_vec()
            }
        };
        ip.payload_length = (exts.len() + l4.len() + self.payload.len()) as u16;
        let eth = Ethernet2Header {
            source: self.eth_src,
            destination: self.eth_dst,
            ether_type: EtherType::IPV6,
        };
        let mut frame = Vec::new();
        eth.write(&mut frame).expect("eth");
        ip.write(&mut frame).expect("ipv6");
        frame.extend(exts);
        frame.extend(l4);
        frame.extend_from_slice(&self.payload);
        frame
    }

    /// The same frame after the node forwarded it: new MACs and tuple, hop
    /// limit one lower, checksum recomputed from scratch.
    pub fn forwarded(
        &self,
        eth: ([u8; 6], [u8; 6]),
        (src, sport): (Ipv6Addr, u16),
        (dst, dport): (Ipv6Addr, u16),
    ) -> Spec6 {
        Spec6 {
            eth_src: eth.0,
            eth_dst: eth.1,
            src,
            dst,
            sport,
            dport,
            hop_limit: self.hop_limit - 1,
            ..self.clone()
        }
    }

    /// What the backend sends back for this frame, addressed as the backend
    /// saw it (`self` is the forwarded frame).
    pub fn reply(&self, l4: L4, payload: &[u8]) -> Spec6 {
        Spec6 {
            eth_src: self.eth_dst,
            eth_dst: self.eth_src,
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            l4,
            hop_limit: 64,
            exts: Vec::new(),
            payload: payload.to_vec(),
            ..self.clone()
        }
    }
}

/// Checks the TCP/UDP checksum of an IPv6 frame by recomputing it
/// (`packets::check_checksums` sends IPv6 frames here).
pub fn check_checksums6(frame: &[u8]) -> Result<(), String> {
    let headers = PacketHeaders::from_ethernet_slice(frame).map_err(|e| e.to_string())?;
    let Some(NetHeaders::Ipv6(ip, exts)) = &headers.net else {
        return Err("neither IPv4 nor IPv6".into());
    };
    if exts.is_fragmenting_payload() {
        // A fragment's L4 checksum is the whole datagram's: the rows check
        // fragments byte for byte against ones cut from a whole datagram.
        return Ok(());
    }
    let payload = headers.payload.slice();
    let (found, want) = match &headers.transport {
        Some(TransportHeader::Udp(udp)) => (udp.checksum, udp.calc_checksum_ipv6(ip, payload)),
        Some(TransportHeader::Tcp(tcp)) => (tcp.checksum, tcp.calc_checksum_ipv6(ip, payload)),
        Some(TransportHeader::Icmpv6(icmp)) => (
            icmp.checksum,
            icmp.icmp_type
                .calc_checksum(ip.source, ip.destination, payload),
        ),
        _ => return Err("not TCP/UDP/ICMPv6".into()),
    };
    let want = want.map_err(|e| e.to_string())?;
    if found != want {
        return Err(format!("L4 checksum {found:#06x}, expected {want:#06x}"));
    }
    Ok(())
}

/// The most of a packet an ICMPv6 error quotes (RFC 4443 2.4 (c): the
/// error stays within the minimum MTU of 1280 bytes).
pub const QUOTE6_MAX: usize = 1280 - 40 - 8;

/// What the node sends back for `datagram` to an IPv6 service with no
/// endpoints: ICMPv6 port unreachable from the address it was sent to,
/// quoting the datagram from its IPv6 header on, at most `QUOTE6_MAX`
/// bytes; built by etherparse, checksum included.
pub fn port_unreachable6_for(datagram: &Spec6) -> Vec<u8> {
    let frame = datagram.build();
    let packet = &frame[Ethernet2Header::LEN..];
    let quoted = &packet[..packet.len().min(QUOTE6_MAX)];
    let mut out = Vec::new();
    PacketBuilder::ethernet2(datagram.eth_dst, datagram.eth_src)
        .ipv6(datagram.dst.octets(), datagram.src.octets(), 64)
        .icmpv6(Icmpv6Type::DestinationUnreachable(
            DestUnreachableCode::Port,
        ))
        .write(&mut out, quoted)
        .expect("icmpv6");
    out
}

/// What the node sends back for `packet`, which does not fit the next
/// hop's `mtu`: ICMPv6 packet too big from the address it was sent to,
/// quoting it as `port_unreachable6_for` does.
pub fn packet_too_big6_for(packet: &Spec6, mtu: u32) -> Vec<u8> {
    let frame = packet.build();
    let ip = &frame[Ethernet2Header::LEN..];
    let quoted = &ip[..ip.len().min(QUOTE6_MAX)];
    let mut out = Vec::new();
    PacketBuilder::ethernet2(packet.eth_dst, packet.eth_src)
        .ipv6(packet.dst.octets(), packet.src.octets(), 64)
        .icmpv6(Icmpv6Type::PacketTooBig { mtu })
        .write(&mut out, quoted)
        .expect("icmpv6");
    out
}

/// What the node sends back for an IPv6 SYN to a service with no
/// endpoints: RST|ACK, seq 0, ack = SYN's seq + 1 + payload, no
/// extension headers.
pub fn reset6_for(syn: &Spec6) -> Vec<u8> {
    let mut out = Vec::new();
    let ack = syn.tcp_seq + 1 + syn.payload.len() as u32;
    PacketBuilder::ethernet2(syn.eth_dst, syn.eth_src)
        .ipv6(syn.dst.octets(), syn.src.octets(), 64)
        .tcp(syn.dport, syn.sport, 0, 0)
        .rst()
        .ack(ack)
        .write(&mut out, &[])
        .expect("rst");
    out
}

/// The (src, sport, dst, dport) of an IPv6 TCP/UDP frame, or of the first
/// fragment of a TCP/UDP datagram (its L4 header read from the fragment).
pub fn tuple_of6(frame: &[u8]) -> Option<(Ipv6Addr, u16, Ipv6Addr, u16)> {
    let headers = PacketHeaders::from_ethernet_slice(frame).ok()?;
    let Some(NetHeaders::Ipv6(ip, exts)) = &headers.net else {
        return None;
    };
    let (sport, dport) = match (crate::packets::ports_of(&headers), &exts.fragment) {
        (Some(ports), _) => ports,
        (None, Some(fragment)) if fragment.fragment_offset.value() == 0 => {
            let etherparse::PayloadSlice::Ip(payload) = &headers.payload else {
                return None;
            };
            match payload.ip_number.0 {
                IPPROTO_UDP => {
                    let (udp, _) = UdpHeader::from_slice(payload.payload).ok()?;
                    (udp.source_port, udp.destination_port)
                }
                IPPROTO_TCP => {
                    let (tcp, _) = TcpHeader::from_slice(payload.payload).ok()?;
                    (tcp.source_port, tcp.destination_port)
                }
                _ => return None,
            }
        }
        (None, _) => return None,
    };
    Some((ip.source.into(), sport, ip.destination.into(), dport))
}

/// The upper-layer protocol of an IPv6 frame: its L4 header's, or for a
/// fragment the fragment header's next header.
pub fn l4_proto6(frame: &[u8]) -> Option<u8> {
    let headers = PacketHeaders::from_ethernet_slice(frame).ok()?;
    match &headers.payload {
        etherparse::PayloadSlice::Ip(payload) => Some(payload.ip_number.0),
        etherparse::PayloadSlice::Udp(_) => Some(IPPROTO_UDP),
        etherparse::PayloadSlice::Tcp(_) => Some(IPPROTO_TCP),
        _ => None,
    }
}

/// An IPv6 frame's fragment header: (offset in 8-byte units, more
/// fragments, identification, next header).
pub fn fragment6_of(frame: &[u8]) -> Option<(u16, bool, u32, u8)> {
    let headers = PacketHeaders::from_ethernet_slice(frame).ok()?;
    let Some(NetHeaders::Ipv6(_, exts)) = &headers.net else {
        return None;
    };
    let fragment = exts.fragment.as_ref()?;
    Some((
        fragment.fragment_offset.value(),
        fragment.more_fragments,
        fragment.identification,
        fragment.next_header.0,
    ))
}

/// An ICMPv6 neighbour solicitation from the client for `NODE6`.
pub fn neighbour_solicitation() -> Vec<u8> {
    let mut frame = Vec::new();
    let target = NODE6.octets();
    etherparse::PacketBuilder::ethernet2(CLIENT_MAC, [0x33, 0x33, 0xff, 0, 0, 1])
        .ipv6(CLIENT6.octets(), solicited_node(NODE6).octets(), 255)
        .icmpv6(etherparse::Icmpv6Type::Unknown {
            type_u8: 135,
            code_u8: 0,
            bytes5to8: [0; 4],
        })
        .write(&mut frame, &target)
        .expect("neighbour solicitation");
    frame
}

fn solicited_node(addr: Ipv6Addr) -> Ipv6Addr {
    let o = addr.octets();
    Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(o[13]),
        u16::from_be_bytes([o[14], o[15]]),
    )
}

/// The part of `frame` (an Ethernet frame) an ICMPv6 error quotes: its
/// IPv6 header, then `l4_bytes` bytes of what follows (everything when
/// `None`).
pub fn quote6(frame: &[u8], l4_bytes: Option<usize>) -> Vec<u8> {
    let ip = &frame[Ethernet2Header::LEN..];
    let end = match l4_bytes {
        Some(bytes) => (Ipv6Header::LEN + bytes).min(ip.len()),
        None => ip.len(),
    };
    ip[..end].to_vec()
}

/// An ICMPv6 message of `kind` from `src` to `dst` quoting `quoted`, built
/// by etherparse with its checksum computed from scratch over the IPv6
/// pseudo-header.
pub fn icmp6_error(
    (eth_src, eth_dst): ([u8; 6], [u8; 6]),
    (src, dst): (Ipv6Addr, Ipv6Addr),
    hop_limit: u8,
    kind: Icmpv6Type,
    quoted: &[u8],
) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(eth_src, eth_dst)
        .ipv6(src.octets(), dst.octets(), hop_limit)
        .icmpv6(kind)
        .write(&mut out, quoted)
        .expect("icmpv6 error");
    out
}

/// ICMPv6 packet too big with `mtu`.
pub fn too_big6(mtu: u32) -> Icmpv6Type {
    Icmpv6Type::PacketTooBig { mtu }
}

/// ICMPv6 destination unreachable, port unreachable.
pub fn port_unreachable6() -> Icmpv6Type {
    Icmpv6Type::DestinationUnreachable(DestUnreachableCode::Port)
}

/// ICMPv6 time exceeded, hop limit exceeded in transit.
pub fn hop_limit_exceeded6() -> Icmpv6Type {
    Icmpv6Type::TimeExceeded(etherparse::icmpv6::TimeExceededCode::HopLimitExceeded)
}

/// ICMPv6 parameter problem, erroneous header field at `pointer`.
pub fn parameter_problem6(pointer: u32) -> Icmpv6Type {
    Icmpv6Type::ParameterProblem(etherparse::icmpv6::ParameterProblemHeader {
        code: etherparse::icmpv6::ParameterProblemCode::ErroneousHeaderField,
        pointer,
    })
}

/// An ICMPv6 echo request from the client to `NODE6`.
pub fn echo_request6() -> Vec<u8> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv6(CLIENT6.octets(), NODE6.octets(), 64)
        .icmpv6_echo_request(7, 1)
        .write(&mut frame, b"ping6")
        .expect("echo request");
    frame
}

/// `spec` as the fragments a sender makes of it: its extension headers
/// (the unfragmentable part) in each, then a fragment header with `id`,
/// then the piece of the L4 header and payload between two of `cuts`
/// (multiples of 8). Cut from the whole datagram etherparse built, so the
/// first fragment's L4 checksum covers all of it.
pub fn fragments6(spec: &Spec6, cuts: &[usize], id: u32) -> Vec<Vec<u8>> {
    let whole = spec.build();
    let ip_at = Ethernet2Header::LEN;
    let (ip, _) = Ipv6Header::from_slice(&whole[ip_at..]).expect("whole datagram parses");
    let exts_len: usize = spec.exts.iter().map(|ext| ext.bytes(0).len()).sum();
    let l4 = &whole[ip_at + Ipv6Header::LEN + exts_len..];
    let mut bounds = vec![0];
    bounds.extend_from_slice(cuts);
    bounds.push(l4.len());
    bounds
        .windows(2)
        .map(|piece| {
            let (start, end) = (piece[0], piece[1]);
            assert_eq!(
                start % 8,
                0,
                "fragment offset {start} is not a multiple of 8"
            );
            let mut chain = spec.exts.clone();
            chain.push(Ext::Fragment((start / 8) as u16, end < l4.len(), id));
            let mut exts = Vec::new();
            for (index, ext) in chain.iter().enumerate() {
                let next = chain.get(index + 1).map_or(spec.proto(), Ext::number);
                exts.extend(ext.bytes(next));
            }
            let mut header = ip.clone();
            header.next_header = IpNumber(chain[0].number());
            header.payload_length = (exts.len() + end - start) as u16;
            let mut frame = whole[..ip_at].to_vec();
            header.write(&mut frame).expect("ipv6");
            frame.extend(exts);
            frame.extend_from_slice(&l4[start..end]);
            frame
        })
        .collect()
}
