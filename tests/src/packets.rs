//! Frames built and checked with etherparse, which shares no code with the
//! datapath: expected outputs are rebuilt from scratch with full checksums,
//! so an incremental-update bug shows up as a byte difference.

use std::net::Ipv4Addr;

use etherparse::{
    EtherType, Ethernet2Header, IpFragOffset, IpNumber, Ipv4Header, Ipv4Options, NetHeaders,
    PacketBuilder, PacketHeaders, TcpHeader, TransportHeader, UdpHeader,
};

use crate::testrun::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    Udp,
    /// TCP with these flags: `SYN`, `ACK`, ... ORed.
    Tcp(u8),
}

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

/// One IPv4 TCP/UDP frame, field by field.
#[derive(Clone, Debug)]
pub struct Spec {
    pub eth_src: [u8; 6],
    pub eth_dst: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub l4: L4,
    pub ttl: u8,
    pub ident: u16,
    pub ip_options: Vec<u8>,
    pub more_fragments: bool,
    pub fragment_offset: u16,
    /// Send UDP with checksum 0 ("none").
    pub udp_no_checksum: bool,
    pub payload: Vec<u8>,
    /// TCP sequence number, and acknowledgement number (used with ACK).
    pub tcp_seq: u32,
    pub tcp_ack: u32,
}

impl Spec {
    /// A client -> NodePort frame as it arrives at the node.
    pub fn from_client(sport: u16, dport: u16, l4: L4) -> Spec {
        Spec {
            eth_src: CLIENT_MAC,
            eth_dst: NODE_MAC,
            src: CLIENT,
            dst: NODE,
            sport,
            dport,
            l4,
            ttl: 64,
            ident: 0x1234,
            ip_options: Vec::new(),
            more_fragments: false,
            fragment_offset: 0,
            udp_no_checksum: false,
            payload: b"hello xlb".to_vec(),
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

    pub fn key(&self) -> lb_common::FlowKey {
        key(self.src, self.sport, self.dst, self.dport, self.proto())
    }

    pub fn build(&self) -> Vec<u8> {
        let eth = Ethernet2Header {
            source: self.eth_src,
            destination: self.eth_dst,
            ether_type: EtherType::IPV4,
        };
        let (transport, transport_len) = match self.l4 {
            L4::Udp => (None, UdpHeader::LEN),
            L4::Tcp(flags) => {
                let mut tcp = TcpHeader::new(self.sport, self.dport, self.tcp_seq, 64_240);
                tcp.fin = flags & FIN != 0;
                tcp.syn = flags & SYN != 0;
                tcp.rst = flags & RST != 0;
                tcp.psh = flags & PSH != 0;
                tcp.ack = flags & ACK != 0;
                if tcp.ack {
                    tcp.acknowledgment_number = self.tcp_ack;
                }
                let len = tcp.header_len();
                (Some(tcp), len)
            }
        };
        let mut ip = Ipv4Header::new(
            (transport_len + self.payload.len()) as u16,
            self.ttl,
            IpNumber(self.proto()),
            self.src.octets(),
            self.dst.octets(),
        )
        .expect("ipv4 header");
        ip.identification = self.ident;
        ip.dont_fragment = !self.more_fragments && self.fragment_offset == 0;
        ip.more_fragments = self.more_fragments;
        ip.fragment_offset = IpFragOffset::try_new(self.fragment_offset).expect("offset");
        ip.options = Ipv4Options::try_from(&self.ip_options[..]).expect("options");
        ip.total_len = (ip.header_len() + transport_len + self.payload.len()) as u16;
        ip.header_checksum = ip.calc_header_checksum();

        let mut frame = Vec::new();
        eth.write(&mut frame).expect("eth");
        ip.write(&mut frame).expect("ip");
        match transport {
            None => {
                let mut udp =
                    UdpHeader::with_ipv4_checksum(self.sport, self.dport, &ip, &self.payload)
                        .expect("udp");
                if self.udp_no_checksum {
                    udp.checksum = 0;
                }
                udp.write(&mut frame).expect("udp");
            }
            Some(mut tcp) => {
                tcp.checksum = tcp
                    .calc_checksum_ipv4(&ip, &self.payload)
                    .expect("tcp checksum");
                tcp.write(&mut frame).expect("tcp");
            }
        }
        frame.extend_from_slice(&self.payload);
        frame
    }

    /// The same frame after the node forwarded it: new MACs and tuple, TTL
    /// one lower, checksums recomputed from scratch.
    #[allow(clippy::too_many_arguments)]
    pub fn forwarded(
        &self,
        eth_src: [u8; 6],
        eth_dst: [u8; 6],
        src: Ipv4Addr,
        sport: u16,
        dst: Ipv4Addr,
        dport: u16,
    ) -> Spec {
        Spec {
            eth_src,
            eth_dst,
            src,
            dst,
            sport,
            dport,
            ttl: self.ttl - 1,
            ..self.clone()
        }
    }

    /// What the backend sends back for this frame, addressed as the backend
    /// saw it (`self` is the forwarded frame).
    pub fn reply(&self, l4: L4, payload: &[u8]) -> Spec {
        Spec {
            eth_src: self.eth_dst,
            eth_dst: self.eth_src,
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            l4,
            ttl: 64,
            payload: payload.to_vec(),
            ..self.clone()
        }
    }
}

/// Checks the IPv4 header checksum and the TCP/UDP checksum of `frame` by
/// recomputing them. UDP checksum 0 means "none" and is accepted.
pub fn check_checksums(frame: &[u8]) -> Result<(), String> {
    let headers = PacketHeaders::from_ethernet_slice(frame).map_err(|e| e.to_string())?;
    let Some(NetHeaders::Ipv4(ip, _)) = &headers.net else {
        return crate::packets6::check_checksums6(frame);
    };
    if ip.header_checksum != ip.calc_header_checksum() {
        return Err(format!(
            "IPv4 checksum {:#06x}, expected {:#06x}",
            ip.header_checksum,
            ip.calc_header_checksum()
        ));
    }
    let payload = headers.payload.slice();
    match &headers.transport {
        Some(TransportHeader::Udp(udp)) if udp.checksum != 0 => {
            let want = udp
                .calc_checksum_ipv4(ip, payload)
                .map_err(|e| e.to_string())?;
            if udp.checksum != want {
                return Err(format!(
                    "UDP checksum {:#06x}, expected {want:#06x}",
                    udp.checksum
                ));
            }
        }
        Some(TransportHeader::Tcp(tcp)) => {
            let want = tcp
                .calc_checksum_ipv4(ip, payload)
                .map_err(|e| e.to_string())?;
            if tcp.checksum != want {
                return Err(format!(
                    "TCP checksum {:#06x}, expected {want:#06x}",
                    tcp.checksum
                ));
            }
        }
        Some(TransportHeader::Icmpv4(icmp)) => {
            let want = icmp.icmp_type.calc_checksum(payload);
            if icmp.checksum != want {
                return Err(format!(
                    "ICMP checksum {:#06x}, expected {want:#06x}",
                    icmp.checksum
                ));
            }
        }
        _ => {}
    }
    Ok(())
}

/// The (source, destination) ports of a TCP or UDP frame, either family.
pub fn ports_of(headers: &PacketHeaders) -> Option<(u16, u16)> {
    match &headers.transport {
        Some(TransportHeader::Udp(udp)) => Some((udp.source_port, udp.destination_port)),
        Some(TransportHeader::Tcp(tcp)) => Some((tcp.source_port, tcp.destination_port)),
        _ => None,
    }
}

/// The (src, sport, dst, dport) of an IPv4 TCP/UDP frame.
pub fn tuple_of(frame: &[u8]) -> Option<(Ipv4Addr, u16, Ipv4Addr, u16)> {
    let headers = PacketHeaders::from_ethernet_slice(frame).ok()?;
    let Some(NetHeaders::Ipv4(ip, _)) = &headers.net else {
        return None;
    };
    let (sport, dport) = ports_of(&headers)?;
    Some((
        Ipv4Addr::from(ip.source),
        sport,
        Ipv4Addr::from(ip.destination),
        dport,
    ))
}

pub fn arp_request() -> Vec<u8> {
    let mut frame = Vec::new();
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&CLIENT_MAC);
    frame.extend_from_slice(&[0x08, 0x06]);
    frame.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
    frame.extend_from_slice(&CLIENT_MAC);
    frame.extend_from_slice(&CLIENT.octets());
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&NODE.octets());
    frame
}

pub fn icmp_echo() -> Vec<u8> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv4(CLIENT.octets(), NODE.octets(), 64)
        .icmpv4_echo_request(7, 1)
        .write(&mut frame, b"ping")
        .expect("icmp");
    frame
}

pub fn ipv6_udp() -> Vec<u8> {
    let mut frame = Vec::new();
    let src = "2001:db8::2".parse::<std::net::Ipv6Addr>().expect("addr");
    let dst = "2001:db8::1".parse::<std::net::Ipv6Addr>().expect("addr");
    PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv6(src.octets(), dst.octets(), 64)
        .udp(40_000, UDP_NODE_PORT)
        .write(&mut frame, b"v6")
        .expect("ipv6");
    frame
}

pub fn vlan_udp() -> Vec<u8> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .single_vlan(etherparse::VlanId::try_new(42).expect("vlan"))
        .ipv4(CLIENT.octets(), NODE.octets(), 64)
        .udp(40_000, UDP_NODE_PORT)
        .write(&mut frame, b"tagged")
        .expect("vlan");
    frame
}

/// What the node sends back for a UDP datagram to a service with no
/// endpoints: ICMP port unreachable quoting its IPv4 header and 8 bytes.
pub fn port_unreachable_for(datagram: &Spec) -> Vec<u8> {
    let frame = datagram.build();
    let quoted = &frame[Ethernet2Header::LEN..Ethernet2Header::LEN + 28];
    let mut out = Vec::new();
    PacketBuilder::ethernet2(datagram.eth_dst, datagram.eth_src)
        .ipv4(datagram.dst.octets(), datagram.src.octets(), 64)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::Port,
        ))
        .write(&mut out, quoted)
        .expect("icmp");
    out
}

/// What the node sends back for a SYN to a service with no endpoints:
/// RST|ACK, seq 0, ack = SYN's seq + 1 + payload.
pub fn reset_for(syn: &Spec) -> Vec<u8> {
    let mut out = Vec::new();
    let ack = syn.tcp_seq + 1 + syn.payload.len() as u32;
    PacketBuilder::ethernet2(syn.eth_dst, syn.eth_src)
        .ipv4(syn.dst.octets(), syn.src.octets(), 64)
        .tcp(syn.dport, syn.sport, 0, 0)
        .rst()
        .ack(ack)
        .write(&mut out, &[])
        .expect("rst");
    out
}

/// The part of `frame` (an Ethernet frame) an ICMP error quotes: its IPv4
/// header with options, then `l4_bytes` bytes of what follows (everything
/// when `None`).
pub fn quote(frame: &[u8], l4_bytes: Option<usize>) -> Vec<u8> {
    let ip = &frame[Ethernet2Header::LEN..];
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    let end = match l4_bytes {
        Some(bytes) => (header_len + bytes).min(ip.len()),
        None => ip.len(),
    };
    ip[..end].to_vec()
}

/// An ICMP error of `kind` from `src` to `dst` quoting `quoted`, built by
/// etherparse with its checksum computed from scratch.
#[allow(clippy::too_many_arguments)]
pub fn icmp_error(
    eth_src: [u8; 6],
    eth_dst: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ttl: u8,
    kind: etherparse::Icmpv4Type,
    quoted: &[u8],
) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(eth_src, eth_dst)
        .ipv4(src.octets(), dst.octets(), ttl)
        .icmpv4(kind)
        .write(&mut out, quoted)
        .expect("icmp error");
    out
}

/// ICMP destination unreachable, fragmentation needed, with `mtu`.
pub fn frag_needed(mtu: u16) -> etherparse::Icmpv4Type {
    etherparse::Icmpv4Type::DestinationUnreachable(
        etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: mtu },
    )
}

/// ICMP destination unreachable, port unreachable.
pub fn port_unreachable() -> etherparse::Icmpv4Type {
    etherparse::Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::Port)
}

/// ICMP time exceeded in transit.
pub fn ttl_exceeded() -> etherparse::Icmpv4Type {
    etherparse::Icmpv4Type::TimeExceeded(etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit)
}

/// `spec`'s datagram cut into IPv4 fragments: the L4 header and payload
/// split at each offset in `cuts` (multiples of 8, ascending). The L4
/// checksum is the whole datagram's, computed by etherparse.
pub fn fragments(spec: &Spec, cuts: &[usize]) -> Vec<Vec<u8>> {
    let whole = spec.build();
    let headers = PacketHeaders::from_ethernet_slice(&whole).expect("whole datagram parses");
    let Some(NetHeaders::Ipv4(ip, _)) = headers.net else {
        panic!("not IPv4");
    };
    let l4 = &whole[Ethernet2Header::LEN + ip.header_len()..];
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
            let mut header = ip.clone();
            header.dont_fragment = false;
            header.more_fragments = end < l4.len();
            header.fragment_offset = IpFragOffset::try_new((start / 8) as u16).expect("offset");
            header.total_len = (header.header_len() + end - start) as u16;
            header.header_checksum = header.calc_header_checksum();
            let mut frame = Vec::new();
            Ethernet2Header {
                source: spec.eth_src,
                destination: spec.eth_dst,
                ether_type: EtherType::IPV4,
            }
            .write(&mut frame)
            .expect("eth");
            header.write(&mut frame).expect("ip");
            frame.extend_from_slice(&l4[start..end]);
            frame
        })
        .collect()
}
