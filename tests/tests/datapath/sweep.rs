//! The malformed-packet sweep: seeded random and mutated frames through the
//! program, checking invariants rather than exact outputs.

use std::fmt::Write as _;

use etherparse::{NetHeaders, PacketHeaders, TransportHeader};

use xlb_tests::{packets::*, testrun::*};

/// SplitMix64: tiny, seedable, good enough to drive mutations reproducibly.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

/// A frame to send: a valid template (often towards a service, so flows get
/// created and replies matched), then maybe mutated.
fn frame(
    rng: &mut Rng,
    dp: &Datapath,
    replies: &[Vec<u8>],
    related: &mut Vec<(Vec<u8>, u32)>,
) -> (Vec<u8>, u32) {
    let sport = 1024 + rng.below(60_000) as u16;
    let mut ifindex = dp.client_ifindex;
    let mut frame = match rng.below(12) {
        10 if !related.is_empty() => {
            let (frame, on) = related.swap_remove(rng.below(related.len() as u64) as usize);
            ifindex = on;
            frame
        }
        11 => {
            // A fragmented datagram: the first fragment now, the others
            // later, in any order (some before their first is forwarded).
            let mut spec = Spec::from_client(sport, UDP_NODE_PORT, L4::Udp);
            spec.ident = rng.next() as u16;
            spec.payload = (0..8 + rng.below(80)).map(|_| rng.byte()).collect();
            let len = 8 + spec.payload.len();
            let mut cuts: Vec<usize> = (1..len.div_ceil(8)).map(|i| i * 8).collect();
            cuts.retain(|_| rng.below(3) == 0);
            let mut pieces = fragments(&spec, &cuts);
            let first = pieces.remove(0);
            if related.len() < 256 {
                related.extend(pieces.into_iter().map(|piece| (piece, dp.client_ifindex)));
            }
            first
        }
        0..=2 => Spec::from_client(sport, UDP_NODE_PORT, L4::Udp).build(),
        3..=4 => {
            let flags = [SYN, SYN, ACK, ACK | PSH, FIN | ACK, RST][rng.below(6) as usize];
            Spec::from_client(sport, TCP_NODE_PORT, L4::Tcp(flags)).build()
        }
        5 if rng.below(3) == 0 => {
            let l4 = if rng.below(2) == 0 {
                L4::Udp
            } else {
                L4::Tcp(SYN)
            };
            let port = if l4 == L4::Udp {
                EMPTY_NODE_PORT
            } else {
                EMPTY_TCP_NODE_PORT
            };
            Spec::from_client(sport, port, l4).build()
        }
        5 if !replies.is_empty() => {
            ifindex = dp.backend_ifindex;
            replies[rng.below(replies.len() as u64) as usize].clone()
        }
        6 => [icmp_echo(), arp_request(), ipv6_udp(), vlan_udp()][rng.below(4) as usize].clone(),
        7 => {
            let len = 14 + rng.below(120) as usize;
            (0..len).map(|_| rng.byte()).collect()
        }
        _ => {
            let mut spec = Spec::from_client(sport, UDP_NODE_PORT, L4::Udp);
            spec.ip_options = vec![1; 4 * rng.below(4) as usize];
            spec.payload = (0..rng.below(64)).map(|_| rng.byte()).collect();
            spec.build()
        }
    };
    // The header bytes the IPv4 parser decides on.
    mutate(rng, &mut frame, &[12, 13, 14, 16, 17, 20, 21, 22, 23, 46]);
    (frame, ifindex)
}

/// Leaves `frame` as it is, or rewrites random bytes, or one of the
/// `decisive` header bytes, or cuts it short (after the Ethernet header),
/// each a quarter of the time.
pub fn mutate(rng: &mut Rng, frame: &mut Vec<u8>, decisive: &[usize]) {
    match rng.below(4) {
        0 => {}
        1 => {
            for _ in 0..1 + rng.below(6) {
                let at = rng.below(frame.len() as u64) as usize;
                frame[at] = rng.byte();
            }
        }
        2 => {
            let at = decisive[rng.below(decisive.len() as u64) as usize];
            if at < frame.len() {
                frame[at] = rng.byte();
            }
        }
        _ => {
            let len = 14 + rng.below(frame.len() as u64 - 13) as usize;
            frame.truncate(len);
        }
    }
}

fn hex(frame: &[u8]) -> String {
    let mut out = String::new();
    for byte in frame {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

/// Runs `count` frames from `seed`; returns the first broken invariant.
pub fn sweep(dp: &mut Datapath, seed: u64, count: u64) -> Result<(), String> {
    let mut rng = Rng::new(seed);
    let mut replies: Vec<Vec<u8>> = Vec::new();
    let mut related: Vec<(Vec<u8>, u32)> = Vec::new();
    let mut replies6: Vec<Vec<u8>> = Vec::new();
    let mut related6: Vec<(Vec<u8>, u32)> = Vec::new();
    let before: u64 = dp.stats().iter().sum();
    for index in 0..count {
        let (input, ifindex) = if rng.below(4) == 0 {
            crate::sweep6::frame(&mut rng, dp, &replies6, &mut related6)
        } else {
            frame(&mut rng, dp, &replies, &mut related)
        };
        let (verdict, output) = dp.run(&input, ifindex);
        let fail = |what: String| {
            format!(
                "frame {index} (seed {seed}): {what}\n  in:  {}\n  out: {}",
                hex(&input),
                hex(&output)
            )
        };
        if crate::sweep6::is_ipv6(&input) {
            let reply =
                crate::sweep6::check(dp, verdict, &input, &output, ifindex).map_err(fail)?;
            if let Some(reply) = reply.filter(|_| replies6.len() < 256) {
                replies6.push(reply);
            }
            if matches!(verdict, XDP_TX | XDP_REDIRECT) && related6.len() < 256 {
                // The far side answers what the node sent on with an ICMPv6
                // error, sent back the way it came (an error about a
                // translated error too: never sent, RFC 4443 2.4 (e), must
                // not confuse the datapath either).
                let back = if ifindex == dp.client_ifindex {
                    dp.backend_ifindex
                } else {
                    dp.client_ifindex
                };
                if let Some(error) = crate::sweep6::error_about(&mut rng, &output) {
                    related6.push((error, back));
                }
            }
            continue;
        }
        match verdict {
            XDP_PASS => {
                if output != input {
                    return Err(fail("XDP_PASS but the frame was modified".into()));
                }
            }
            XDP_DROP => {}
            XDP_TX | XDP_REDIRECT if is_icmp(&input) => {
                check_icmp_translated(dp, &input, &output).map_err(fail)?;
                if related.len() < 256 {
                    // An error about an error: never sent (RFC 1122), must
                    // not confuse the datapath either.
                    related.push((icmp_error_about(&output, &mut rng), ifindex));
                }
            }
            XDP_TX if is_reject(&output) => {
                check_rejected(&input, &output).map_err(fail)?;
            }
            XDP_TX | XDP_REDIRECT if is_fragment(&input) => {
                check_fragment_forwarded(dp, &input, &output).map_err(fail)?;
            }
            XDP_TX | XDP_REDIRECT => {
                check_forwarded(dp, &input, &output).map_err(fail)?;
                if replies.len() < 256
                    && ifindex == dp.client_ifindex
                    && let Some(reply) = reply_to(&output)
                {
                    replies.push(reply);
                }
                if related.len() < 256 {
                    // The far side answers the forwarded packet with an
                    // ICMP error, sent back the way the packet came.
                    let back = if ifindex == dp.client_ifindex {
                        dp.backend_ifindex
                    } else {
                        dp.client_ifindex
                    };
                    related.push((icmp_error_about(&output, &mut rng), back));
                }
            }
            XDP_ABORTED => return Err(fail("XDP_ABORTED".into())),
            other => return Err(fail(format!("unknown verdict {other}"))),
        }
    }
    let after: u64 = dp.stats().iter().sum();
    if after - before != count {
        return Err(format!(
            "seed {seed}: counters grew by {} for {count} frames",
            after - before
        ));
    }
    Ok(())
}

/// A forwarded frame must be a valid IPv4 TCP/UDP packet of the same
/// length, TTL one lower, its tuple exactly the rewrite conntrack holds for
/// the input's tuple, and its checksums correct if the input's were.
fn check_forwarded(dp: &mut Datapath, input: &[u8], output: &[u8]) -> Result<(), String> {
    let (src, sport, dst, dport) =
        tuple_of(input).ok_or("forwarded a frame an independent parser rejects")?;
    let proto = proto_of(input).ok_or("forwarded a non-TCP/UDP frame")?;
    let out_tuple = tuple_of(output).ok_or("forwarded output does not parse")?;
    if output.len() != input.len() {
        return Err(format!("length {} -> {}", input.len(), output.len()));
    }
    let flow = dp
        .flow(&key(src, sport, dst, dport, proto))
        .ok_or("forwarded without a conntrack entry")?;
    let want = (
        std::net::Ipv4Addr::from(flow.new_src_addr_be.to_ne_bytes()),
        u16::from_be(flow.new_src_port_be),
        std::net::Ipv4Addr::from(flow.new_dst_addr_be.to_ne_bytes()),
        u16::from_be(flow.new_dst_port_be),
    );
    if out_tuple != want {
        return Err(format!(
            "rewritten to {out_tuple:?}, conntrack says {want:?}"
        ));
    }
    if ttl_of(output) + 1 != ttl_of(input) {
        return Err("TTL not decremented by one".into());
    }
    if check_checksums(input).is_ok() {
        check_checksums(output)?;
    }
    Ok(())
}

/// Whether an XDP_TX output is a rejection (ICMP error or TCP RST) rather
/// than a forwarded packet.
fn is_reject(output: &[u8]) -> bool {
    let Ok(headers) = PacketHeaders::from_ethernet_slice(output) else {
        return false;
    };
    match headers.transport {
        Some(TransportHeader::Icmpv4(_)) => true,
        Some(TransportHeader::Tcp(tcp)) => tcp.rst,
        _ => false,
    }
}

/// A rejection goes back to the sender from the address it wrote to, with
/// valid checksums: ICMP port unreachable quoting the datagram's IPv4 header
/// and 8 bytes, or RST|ACK acknowledging the SYN.
fn check_rejected(input: &[u8], output: &[u8]) -> Result<(), String> {
    let (src, sport, dst, dport) = tuple_of(input)
        .or_else(|| raw_tuple(input))
        .ok_or("rejected a frame that does not parse")?;
    let headers = PacketHeaders::from_ethernet_slice(output).map_err(|e| e.to_string())?;
    let Some(NetHeaders::Ipv4(ip, _)) = &headers.net else {
        return Err("rejection is not IPv4".into());
    };
    if (ip.source, ip.destination) != (dst.octets(), src.octets()) {
        return Err("rejection not addressed back to the sender".into());
    }
    if ip.header_checksum != ip.calc_header_checksum() {
        return Err("rejection has a bad IPv4 checksum".into());
    }
    if output[0..6] != input[6..12] {
        return Err("rejection not sent to the sender's MAC".into());
    }
    let payload = headers.payload.slice();
    match &headers.transport {
        Some(TransportHeader::Icmpv4(icmp)) => {
            let port_unreachable = etherparse::Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::Port,
            );
            if icmp.icmp_type != port_unreachable {
                return Err(format!(
                    "ICMP {:?}, expected port unreachable",
                    icmp.icmp_type
                ));
            }
            if icmp.checksum != icmp.icmp_type.calc_checksum(payload) {
                return Err("ICMP checksum wrong".into());
            }
            if payload != &input[14..14 + 28] {
                return Err("ICMP does not quote the datagram's header and 8 bytes".into());
            }
        }
        Some(TransportHeader::Tcp(tcp)) => {
            if !(tcp.rst && tcp.ack) || (tcp.source_port, tcp.destination_port) != (dport, sport) {
                return Err("RST flags or ports wrong".into());
            }
            let want = tcp
                .calc_checksum_ipv4(ip, payload)
                .map_err(|e| e.to_string())?;
            if tcp.checksum != want {
                return Err("RST checksum wrong".into());
            }
        }
        _ => return Err("XDP_TX of something that is neither ICMP nor RST".into()),
    }
    Ok(())
}

fn proto_of(frame: &[u8]) -> Option<u8> {
    let headers = PacketHeaders::from_ethernet_slice(frame).ok()?;
    match headers.net {
        Some(NetHeaders::Ipv4(ip, _)) => Some(ip.protocol.0),
        _ => None,
    }
}

fn ttl_of(frame: &[u8]) -> u8 {
    frame[14 + 8]
}

/// The backend's answer to a frame forwarded to it.
fn reply_to(at_backend: &[u8]) -> Option<Vec<u8>> {
    let (src, sport, dst, dport) = tuple_of(at_backend)?;
    let l4 = match proto_of(at_backend)? {
        IPPROTO_UDP => L4::Udp,
        _ => L4::Tcp(SYN | ACK),
    };
    let mut spec = Spec::from_client(dport, sport, l4);
    spec.eth_src = at_backend[0..6].try_into().ok()?;
    spec.eth_dst = NODE_B_MAC;
    spec.src = dst;
    spec.dst = src;
    Some(spec.build())
}

fn is_icmp(frame: &[u8]) -> bool {
    frame.len() >= 34 && frame[12..14] == [0x08, 0x00] && frame[23] == 1
}

/// (src, sport, dst, dport) read from the bytes, for frames etherparse does
/// not take apart (first fragments).
fn raw_tuple(frame: &[u8]) -> Option<(std::net::Ipv4Addr, u16, std::net::Ipv4Addr, u16)> {
    let l4 = 14 + usize::from(*frame.get(14)? & 0x0f) * 4;
    let ports = frame.get(l4..l4 + 4)?;
    let (src, dst) = outer_addrs(frame);
    Some((
        src,
        u16::from_be_bytes([ports[0], ports[1]]),
        dst,
        u16::from_be_bytes([ports[2], ports[3]]),
    ))
}

fn is_fragment(frame: &[u8]) -> bool {
    frame.len() >= 22 && u16::from_be_bytes([frame[20], frame[21]]) & 0x3fff != 0
}

/// An ICMP error (a random unreachable code or time exceeded) from the
/// receiver of `frame` back to its sender, quoting its IPv4 header and a
/// random number of the bytes after it.
fn icmp_error_about(frame: &[u8], rng: &mut Rng) -> Vec<u8> {
    let kind = match rng.below(4) {
        0 => frag_needed(576 + rng.below(1000) as u16),
        1 => port_unreachable(),
        2 => ttl_exceeded(),
        _ => etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::Host,
        ),
    };
    let l4_bytes = match rng.below(3) {
        0 => Some(8),
        1 => Some(rng.below(40) as usize),
        _ => None,
    };
    let quoted = quote(frame, l4_bytes);
    let src = std::net::Ipv4Addr::new(frame[30], frame[31], frame[32], frame[33]);
    let dst = std::net::Ipv4Addr::new(frame[26], frame[27], frame[28], frame[29]);
    let (eth_src, eth_dst) = (frame[0..6].try_into(), frame[6..12].try_into());
    icmp_error(
        eth_src.unwrap_or([2; 6]),
        eth_dst.unwrap_or([2; 6]),
        src,
        dst,
        64,
        kind,
        &quoted,
    )
}

/// (src, sport, dst, dport, proto) of the packet an ICMP error quotes, read
/// from the quote's bytes (etherparse parses the outer headers).
fn quoted_tuple(frame: &[u8]) -> Option<(std::net::Ipv4Addr, u16, std::net::Ipv4Addr, u16, u8)> {
    let headers = PacketHeaders::from_ethernet_slice(frame).ok()?;
    let quote = headers.payload.slice();
    let inner = etherparse::Ipv4HeaderSlice::from_slice(quote).ok()?;
    let l4 = quote.get(inner.slice().len()..inner.slice().len() + 4)?;
    Some((
        inner.source_addr(),
        u16::from_be_bytes([l4[0], l4[1]]),
        inner.destination_addr(),
        u16::from_be_bytes([l4[2], l4[3]]),
        inner.protocol().0,
    ))
}

fn outer_addrs(frame: &[u8]) -> (std::net::Ipv4Addr, std::net::Ipv4Addr) {
    (
        std::net::Ipv4Addr::new(frame[26], frame[27], frame[28], frame[29]),
        std::net::Ipv4Addr::new(frame[30], frame[31], frame[32], frame[33]),
    )
}

fn as_addr(addr_be: u32) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(addr_be.to_ne_bytes())
}

/// A forwarded ICMP error must quote a TCP/UDP packet of a flow going the
/// other way, and come out addressed and quoting exactly as that flow's
/// entry says, same length, TTL one lower, checksums valid if they were.
fn check_icmp_translated(dp: &mut Datapath, input: &[u8], output: &[u8]) -> Result<(), String> {
    let (src, sport, dst, dport, proto) =
        quoted_tuple(input).ok_or("forwarded an ICMP error whose quote does not parse")?;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Err(format!("forwarded an ICMP error quoting protocol {proto}"));
    }
    if output.len() != input.len() {
        return Err(format!("length {} -> {}", input.len(), output.len()));
    }
    let flow = dp
        .flow(&key(dst, dport, src, sport, proto))
        .ok_or("forwarded an ICMP error no flow entry matches")?;
    if outer_addrs(output) != (as_addr(flow.new_src_addr_be), as_addr(flow.new_dst_addr_be)) {
        return Err("outer addresses are not the flow entry's rewrite".into());
    }
    let want = (
        as_addr(flow.new_dst_addr_be),
        u16::from_be(flow.new_dst_port_be),
        as_addr(flow.new_src_addr_be),
        u16::from_be(flow.new_src_port_be),
        proto,
    );
    if quoted_tuple(output) != Some(want) {
        return Err(format!(
            "quote rewritten to {:?}, flow says {want:?}",
            quoted_tuple(output)
        ));
    }
    if ttl_of(output) + 1 != ttl_of(input) {
        return Err("TTL not decremented by one".into());
    }
    if check_checksums(input).is_ok() {
        check_checksums(output)?;
    }
    let quoted_ip = |frame: &[u8]| {
        let headers = PacketHeaders::from_ethernet_slice(frame).ok()?;
        let inner = etherparse::Ipv4HeaderSlice::from_slice(headers.payload.slice()).ok()?;
        let header = inner.to_header();
        Some(header.header_checksum == header.calc_header_checksum())
    };
    if quoted_ip(input) == Some(true) && quoted_ip(output) != Some(true) {
        return Err("quoted IPv4 checksum broken by the rewrite".into());
    }
    Ok(())
}

/// A forwarded fragment must keep its length and bytes after the IPv4
/// header (apart from a first fragment's ports and checksum), go where its
/// datagram's flow entry says, TTL one lower, IPv4 checksum valid if it was.
fn check_fragment_forwarded(dp: &mut Datapath, input: &[u8], output: &[u8]) -> Result<(), String> {
    if output.len() != input.len() {
        return Err(format!("length {} -> {}", input.len(), output.len()));
    }
    let ip = etherparse::Ipv4HeaderSlice::from_slice(&input[14..])
        .map_err(|e| format!("forwarded a fragment etherparse rejects: {e}"))?;
    let (src, dst, proto) = (ip.source_addr(), ip.destination_addr(), ip.protocol().0);
    let l4 = ip.slice().len() + 14;
    let ports = if ip.fragments_offset().value() == 0 {
        let at = input
            .get(l4..l4 + 4)
            .ok_or("first fragment without ports")?;
        (
            u16::from_be_bytes([at[0], at[1]]),
            u16::from_be_bytes([at[2], at[3]]),
        )
    } else {
        dp.frag_ports(src, dst, ip.identification(), proto)
            .ok_or("forwarded a later fragment with no first fragment recorded")?
    };
    let flow = dp
        .flow(&key(src, ports.0, dst, ports.1, proto))
        .ok_or("forwarded a fragment without a conntrack entry")?;
    if outer_addrs(output) != (as_addr(flow.new_src_addr_be), as_addr(flow.new_dst_addr_be)) {
        return Err("fragment's addresses are not the flow entry's rewrite".into());
    }
    if ttl_of(output) + 1 != ttl_of(input) {
        return Err("TTL not decremented by one".into());
    }
    let valid = |frame: &[u8]| {
        etherparse::Ipv4HeaderSlice::from_slice(&frame[14..])
            .map(|ip| ip.to_header().header_checksum == ip.to_header().calc_header_checksum())
            .unwrap_or(false)
    };
    if valid(input) && !valid(output) {
        return Err("fragment's IPv4 checksum broken".into());
    }
    let unchanged_from = match (ip.fragments_offset().value(), proto) {
        (0, IPPROTO_TCP) => l4 + 20,
        (0, _) => l4 + 8,
        _ => l4,
    };
    if input[unchanged_from..] != output[unchanged_from..] {
        return Err("fragment payload changed".into());
    }
    Ok(())
}
