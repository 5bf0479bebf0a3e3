//! The frame `xlb explain` hands the datapath (as a client would send it)
//! and the tuple of the frame that comes out.

use std::net::{Ipv4Addr, SocketAddrV4};

use lb_common::{IPPROTO_TCP, IPPROTO_UDP};

use super::{Protocol, Question, Tuple};

pub(super) const TCP_SYN: u8 = 0x02;
pub(super) const TCP_ACK: u8 = 0x10;

/// The addresses and ports of an IPv4 TCP/UDP frame.
pub(super) fn output_tuple(frame: &[u8]) -> Option<Tuple> {
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
pub(super) fn build_frame(question: &Question, dst_mac: [u8; 6], tcp_flags: u8) -> Vec<u8> {
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
