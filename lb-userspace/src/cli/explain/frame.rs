//! The frame `xlb explain` hands the datapath (as a client would send it)
//! and the tuple of the frame that comes out.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use lb_common::{IPPROTO_TCP, IPPROTO_UDP};

use super::{Protocol, Question, Tuple};

pub(super) const TCP_SYN: u8 = 0x02;
pub(super) const TCP_ACK: u8 = 0x10;

/// The addresses and ports of an IPv4 or IPv6 TCP/UDP frame (an IPv6 one
/// without extension headers: the datapath adds none).
pub(super) fn output_tuple(frame: &[u8]) -> Option<Tuple> {
    let ip = frame.get(14..)?;
    let (source, destination, l4) = match (frame.get(12..14)?, ip.first()? >> 4) {
        ([0x08, 0x00], 4) => {
            let header_len = usize::from(ip[0] & 0x0f) * 4;
            let addr = |at: usize| -> Option<IpAddr> {
                let bytes: [u8; 4] = ip.get(at..at + 4)?.try_into().ok()?;
                Some(Ipv4Addr::from(bytes).into())
            };
            (addr(12)?, addr(16)?, ip.get(header_len..header_len + 4)?)
        }
        ([0x86, 0xdd], 6) => {
            if !matches!(*ip.get(6)?, IPPROTO_TCP | IPPROTO_UDP) {
                return None;
            }
            let addr = |at: usize| -> Option<IpAddr> {
                let bytes: [u8; 16] = ip.get(at..at + 16)?.try_into().ok()?;
                Some(Ipv6Addr::from(bytes).into())
            };
            (addr(8)?, addr(24)?, ip.get(40..44)?)
        }
        _ => return None,
    };
    let port = |at: usize| u16::from_be_bytes([l4[at], l4[at + 1]]);
    Some(Tuple {
        source: SocketAddr::new(source, port(0)),
        destination: SocketAddr::new(destination, port(2)),
    })
}

/// An Ethernet + IPv4 or IPv6 + TCP (no payload) or UDP (a short payload)
/// frame with valid checksums, as a client would send it; the family is
/// the question's.
pub(super) fn build_frame(question: &Question, dst_mac: [u8; 6], tcp_flags: u8) -> Vec<u8> {
    let (l4, proto) = l4_segment(question, tcp_flags);
    let length = u16::try_from(l4.len()).unwrap_or(u16::MAX);
    let (ether_type, ip, pseudo) = match (question.source.ip(), question.destination.ip()) {
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            let mut ip = vec![0x60, 0, 0, 0];
            ip.extend_from_slice(&length.to_be_bytes());
            ip.extend_from_slice(&[proto, 64]);
            ip.extend_from_slice(&src.octets());
            ip.extend_from_slice(&dst.octets());
            let pseudo = [
                &src.octets()[..],
                &dst.octets()[..],
                &u32::from(length).to_be_bytes()[..],
                &[0, 0, 0, proto],
            ]
            .concat();
            ([0x86, 0xdd], ip, pseudo)
        }
        (src, dst) => {
            let octets = |addr: IpAddr| match addr {
                IpAddr::V4(addr) => addr.octets(),
                IpAddr::V6(_) => [0; 4],
            };
            let (src, dst) = (octets(src), octets(dst));
            let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, proto, 0, 0];
            ip[2..4].copy_from_slice(&(length.saturating_add(20)).to_be_bytes());
            ip.extend_from_slice(&src);
            ip.extend_from_slice(&dst);
            let ip_sum = checksum(&[&ip]);
            ip[10..12].copy_from_slice(&ip_sum.to_be_bytes());
            let pseudo = [&src[..], &dst[..], &[0, proto], &length.to_be_bytes()[..]].concat();
            ([0x08, 0x00], ip, pseudo)
        }
    };
    let mut l4 = l4;
    let sum_at = if proto == IPPROTO_TCP { 16 } else { 6 };
    let mut sum = checksum(&[&pseudo, &l4]);
    if sum == 0 && proto == IPPROTO_UDP {
        sum = 0xffff;
    }
    l4[sum_at..sum_at + 2].copy_from_slice(&sum.to_be_bytes());
    let mut frame = Vec::with_capacity(14 + ip.len() + l4.len());
    frame.extend_from_slice(&dst_mac);
    frame.extend_from_slice(&[0x02, 0x78, 0x6c, 0xee, 0x00, 0x01]);
    frame.extend_from_slice(&ether_type);
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&l4);
    frame
}

/// The TCP or UDP header (and UDP's payload), its checksum left zero, and
/// its protocol number.
fn l4_segment(question: &Question, tcp_flags: u8) -> (Vec<u8>, u8) {
    const PAYLOAD: &[u8] = b"xlb explain\n";
    let mut l4 = Vec::with_capacity(20);
    l4.extend_from_slice(&question.source.port().to_be_bytes());
    l4.extend_from_slice(&question.destination.port().to_be_bytes());
    match question.protocol {
        Protocol::Tcp => {
            l4.extend_from_slice(&1u32.to_be_bytes()); // sequence
            let ack = if tcp_flags & TCP_ACK != 0 { 1u32 } else { 0 };
            l4.extend_from_slice(&ack.to_be_bytes());
            l4.extend_from_slice(&[5 << 4, tcp_flags, 0xfa, 0xf0, 0, 0, 0, 0]);
            (l4, IPPROTO_TCP)
        }
        Protocol::Udp => {
            let length = u16::try_from(8 + PAYLOAD.len()).unwrap_or(0);
            l4.extend_from_slice(&length.to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
            l4.extend_from_slice(PAYLOAD);
            (l4, IPPROTO_UDP)
        }
    }
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

#[cfg(test)]
mod tests {
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};

    use super::*;

    /// Each family and protocol: etherparse reads the frame, its IPv4
    /// header and L4 checksums are right, and `output_tuple` reads back
    /// the question's tuple.
    #[test]
    fn frames_carry_valid_checksums() {
        let v4 = ("198.18.0.2:40000", "198.18.0.1:30998");
        let v6 = ("[2001:db8::2]:40000", "[2001:db8::1]:30998");
        for ((source, destination), protocol, flags) in [
            (v4, Protocol::Udp, 0),
            (v4, Protocol::Tcp, TCP_SYN),
            (v6, Protocol::Udp, 0),
            (v6, Protocol::Tcp, TCP_ACK),
        ] {
            let question = Question {
                protocol,
                source: source.parse().unwrap(),
                destination: destination.parse().unwrap(),
            };
            let frame = build_frame(&question, [2, 0, 0, 0, 0, 1], flags);
            let packet = SlicedPacket::from_ethernet(&frame).unwrap();
            let transport = packet.transport.unwrap();
            match (packet.net.unwrap(), transport) {
                (NetSlice::Ipv4(ip), TransportSlice::Udp(udp)) => {
                    let ip = ip.header().to_header();
                    assert_eq!(ip.header_checksum, ip.calc_header_checksum());
                    let sum = udp.to_header().calc_checksum_ipv4(&ip, udp.payload());
                    assert_eq!(sum.unwrap(), udp.checksum());
                }
                (NetSlice::Ipv4(ip), TransportSlice::Tcp(tcp)) => {
                    let ip = ip.header().to_header();
                    assert_eq!(ip.header_checksum, ip.calc_header_checksum());
                    let sum = tcp.to_header().calc_checksum_ipv4(&ip, tcp.payload());
                    assert_eq!(sum.unwrap(), tcp.checksum());
                    assert!(tcp.syn() && !tcp.ack());
                }
                (NetSlice::Ipv6(ip), TransportSlice::Udp(udp)) => {
                    let ip = ip.header().to_header();
                    let sum = udp.to_header().calc_checksum_ipv6(&ip, udp.payload());
                    assert_eq!(sum.unwrap(), udp.checksum());
                }
                (NetSlice::Ipv6(ip), TransportSlice::Tcp(tcp)) => {
                    let ip = ip.header().to_header();
                    let sum = tcp.to_header().calc_checksum_ipv6(&ip, tcp.payload());
                    assert_eq!(sum.unwrap(), tcp.checksum());
                    assert!(tcp.ack() && !tcp.syn());
                }
                other => panic!("{question:?}: {other:?}"),
            }
            let tuple = output_tuple(&frame).unwrap();
            assert_eq!(tuple.source, question.source);
            assert_eq!(tuple.destination, question.destination);
        }
    }
}
