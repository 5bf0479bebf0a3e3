//! The generated frame's template, built on the host (the bench and
//! tests/tests/flood.rs) into a `GenConfig`: headers with the source address,
//! source port and checksums left 0, and the checksum sums of everything
//! else, which `GenConfig::fields` finishes per frame.

use crate::{FRAME_LEN, FRAME6_LEN, GenConfig};

/// The UDP template's payload.
pub const UDP_PAYLOAD: &[u8; 18] = b"xlb-bench-payload!";

const ETH_LEN: usize = 14;
const IPV4_LEN: usize = 20;
const UDP_LEN: usize = 8;
const TCP_LEN: usize = 20;
const L4_AT: usize = ETH_LEN + IPV4_LEN;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// What follows the IPv4 header.
#[derive(Clone, Copy, Debug)]
pub enum Segment {
    /// A UDP datagram carrying `UDP_PAYLOAD`.
    Udp,
    /// A TCP SYN (no options) with this sequence number and window; the
    /// frame ends in 6 bytes of Ethernet padding.
    TcpSyn { seq: u32, window: u16 },
}

/// Who sends what to whom; the source address and port come from `Sources`.
#[derive(Clone, Copy, Debug)]
pub struct Template {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub dst_addr: [u8; 4],
    pub dst_port: u16,
    pub segment: Segment,
}

/// Which source addresses and ports the generator walks through.
#[derive(Clone, Copy, Debug)]
pub struct Sources {
    /// Source address of flow 0, host order.
    pub addr_base: u32,
    /// Distinct flows to cycle through; 0: every frame is a new flow.
    pub flows: u32,
    /// Source port of flow 0.
    pub port_base: u16,
    /// Source ports per source address before the address moves on.
    pub port_span: u16,
}

impl Template {
    /// The generator's configuration for this template and `sources`.
    pub fn config(&self, sources: Sources) -> GenConfig {
        let (proto, l4_len) = match self.segment {
            Segment::Udp => (IPPROTO_UDP, UDP_LEN + UDP_PAYLOAD.len()),
            Segment::TcpSyn { .. } => (IPPROTO_TCP, TCP_LEN),
        };
        let mut frame = [0u8; 64];
        self.write_eth_ipv4(&mut frame, proto, l4_len);
        let l4 = &mut frame[L4_AT..L4_AT + l4_len];
        l4[2..4].copy_from_slice(&self.dst_port.to_be_bytes());
        match self.segment {
            Segment::Udp => {
                l4[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
                l4[UDP_LEN..].copy_from_slice(UDP_PAYLOAD);
            }
            Segment::TcpSyn { seq, window } => {
                l4[4..8].copy_from_slice(&seq.to_be_bytes());
                l4[12] = 5 << 4; // data offset: no options
                l4[13] = 0x02; // SYN
                l4[14..16].copy_from_slice(&window.to_be_bytes());
            }
        }
        // Pseudo-header (destination, protocol, length) + segment; the
        // source address and port are added per frame.
        let l4_csum_base = word_sum(&self.dst_addr)
            + u32::from(proto)
            + l4_len as u32
            + word_sum(&frame[L4_AT..L4_AT + l4_len]);
        let words = words_of(&frame);
        GenConfig {
            frame: words,
            src_addr_base: sources.addr_base,
            flows: sources.flows,
            ip_csum_base: word_sum(&frame[ETH_LEN..L4_AT]),
            udp_csum_base: l4_csum_base,
            src_port_base: sources.port_base,
            port_span: sources.port_span,
            tcp: u32::from(proto == IPPROTO_TCP),
            ifindex: 0,
            ipv6: 0,
        }
    }

    /// Ethernet and IPv4 headers (DF, TTL 64, source address 0).
    fn write_eth_ipv4(&self, frame: &mut [u8; 64], proto: u8, l4_len: usize) {
        frame[0..6].copy_from_slice(&self.dst_mac);
        frame[6..12].copy_from_slice(&self.src_mac);
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
        let ip = &mut frame[ETH_LEN..L4_AT];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((IPV4_LEN + l4_len) as u16).to_be_bytes());
        ip[6] = 0x40; // DF
        ip[8] = 64; // TTL
        ip[9] = proto;
        ip[16..20].copy_from_slice(&self.dst_addr);
    }
}

/// The IPv6 UDP template's payload.
pub const UDP6_PAYLOAD: &[u8; 2] = b"x6";
const IPV6_LEN: usize = 40;
const L4_AT6: usize = ETH_LEN + IPV6_LEN;

/// An IPv6 UDP datagram to `dst_addr`:`dst_port`; the generator varies the
/// source port and the last 32 bits of the source address (`Sources`'
/// `addr_base` and on), the first 96 are `src_prefix`.
#[derive(Clone, Copy, Debug)]
pub struct Template6 {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub src_prefix: [u8; 12],
    pub dst_addr: [u8; 16],
    pub dst_port: u16,
}

impl Template6 {
    /// The generator's configuration for this template and `sources`.
    pub fn config(&self, sources: Sources) -> GenConfig {
        let l4_len = UDP_LEN + UDP6_PAYLOAD.len();
        let mut frame = [0u8; 64];
        frame[0..6].copy_from_slice(&self.dst_mac);
        frame[6..12].copy_from_slice(&self.src_mac);
        frame[12..14].copy_from_slice(&[0x86, 0xdd]);
        let ip = &mut frame[ETH_LEN..L4_AT6];
        ip[0] = 0x60;
        ip[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
        ip[6] = IPPROTO_UDP;
        ip[7] = 64; // hop limit
        ip[8..20].copy_from_slice(&self.src_prefix);
        ip[24..40].copy_from_slice(&self.dst_addr);
        let l4 = &mut frame[L4_AT6..L4_AT6 + l4_len];
        l4[2..4].copy_from_slice(&self.dst_port.to_be_bytes());
        l4[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
        l4[UDP_LEN..].copy_from_slice(UDP6_PAYLOAD);
        // Pseudo-header (source prefix, destination, length, next header)
        // + datagram; the source address's last 32 bits and the port are
        // added per frame.
        let udp_csum_base = word_sum(&self.src_prefix)
            + word_sum(&self.dst_addr)
            + l4_len as u32
            + u32::from(IPPROTO_UDP)
            + word_sum(&frame[L4_AT6..L4_AT6 + l4_len]);
        let words = words_of(&frame);
        GenConfig {
            frame: words,
            src_addr_base: sources.addr_base,
            flows: sources.flows,
            ip_csum_base: 0,
            udp_csum_base,
            src_port_base: sources.port_base,
            port_span: sources.port_span,
            tcp: 0,
            ifindex: 0,
            ipv6: 1,
        }
    }
}

const _: () = assert!(L4_AT6 + UDP_LEN + UDP6_PAYLOAD.len() == FRAME6_LEN);
const _: () = assert!(L4_AT + UDP_LEN + UDP_PAYLOAD.len() == FRAME_LEN);
const _: () = assert!(L4_AT + TCP_LEN <= FRAME_LEN);

/// The frame as `GenConfig::frame` holds it: 8-byte words in memory order.
fn words_of(frame: &[u8; 64]) -> [u64; 8] {
    let mut words = [0u64; 8];
    for (word, chunk) in words.iter_mut().zip(frame.chunks_exact(8)) {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(chunk);
        *word = u64::from_ne_bytes(bytes);
    }
    words
}

/// Sum of big-endian 16-bit words (even length), unfolded.
fn word_sum(bytes: &[u8]) -> u32 {
    bytes
        .chunks_exact(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], pair[1]])))
        .sum()
}
