//! The malformed-packet sweep's IPv6 part: IPv6 frames towards the IPv6
//! NodePorts with random chains of extension headers, replies from the
//! backends, NDP, ICMPv6 errors about forwarded frames, then maybe mutated
//! or cut short; and the invariants an IPv6 frame's verdict must keep.

use xlb_tests::{
    packets::{ACK, FIN, L4, PSH, RST, SYN, check_checksums},
    packets6::*,
    testrun::*,
    testrun6::*,
};

use crate::sweep::{Rng, mutate};

/// Whether `frame` is an (untagged) IPv6 frame: its verdict is checked here.
pub fn is_ipv6(frame: &[u8]) -> bool {
    frame.len() >= 14 && frame[12..14] == [0x86, 0xdd]
}

/// An IPv6 frame to send and the interface it arrives on.
pub fn frame(
    rng: &mut Rng,
    dp: &Datapath,
    replies: &[Vec<u8>],
    related: &mut Vec<(Vec<u8>, u32)>,
) -> (Vec<u8>, u32) {
    let sport = 1024 + rng.below(60_000) as u16;
    let mut ifindex = dp.client_ifindex;
    let mut frame = match rng.below(9) {
        8 if !related.is_empty() => {
            let (frame, on) = related.swap_remove(rng.below(related.len() as u64) as usize);
            ifindex = on;
            frame
        }
        0..=2 => with_random_exts(rng, Spec6::from_client(sport, UDP_NODE_PORT, L4::Udp)),
        3..=4 => {
            let flags = [SYN, SYN, ACK, ACK | PSH, FIN | ACK, RST][rng.below(6) as usize];
            let spec = Spec6::from_client(sport, TCP_NODE_PORT, L4::Tcp(flags));
            with_random_exts(rng, spec)
        }
        5 if !replies.is_empty() => {
            ifindex = dp.backend_ifindex;
            replies[rng.below(replies.len() as u64) as usize].clone()
        }
        6 => neighbour_solicitation(),
        _ => {
            let port = [
                EMPTY_NODE_PORT,
                LOCAL_EMPTY_NODE_PORT,
                LOCAL_NODE_PORT,
                30_000,
            ];
            let port = port[rng.below(4) as usize];
            let mut spec = Spec6::from_client(sport, port, L4::Udp);
            spec.payload = (0..rng.below(64)).map(|_| rng.byte()).collect();
            spec.build()
        }
    };
    // The bytes the IPv6 parser decides on: version, payload length, next
    // header, hop limit, the first extension header's next header, length
    // and segments left; for an ICMPv6 error its type, the quote's version
    // and next header.
    mutate(rng, &mut frame, &[14, 18, 19, 20, 21, 54, 55, 57, 62, 68]);
    (frame, ifindex)
}

fn with_random_exts(rng: &mut Rng, mut spec: Spec6) -> Vec<u8> {
    for _ in 0..rng.below(4) {
        let ext = match rng.below(5) {
            0 => Ext::HopByHop(rng.below(3) as u8),
            1 => Ext::DestOpts(rng.below(3) as u8),
            2 => Ext::Routing(0),
            3 => Ext::Routing(1 + rng.below(3) as u8),
            _ => Ext::Fragment(rng.below(4) as u16, rng.below(2) == 0, rng.next() as u32),
        };
        spec.exts.push(ext);
    }
    spec.build()
}

/// Checks an IPv6 frame's verdict; returns the backend's reply to a frame
/// forwarded to it, for later frames.
pub fn check(
    dp: &mut Datapath,
    verdict: u32,
    input: &[u8],
    output: &[u8],
    ifindex: u32,
) -> Result<Option<Vec<u8>>, String> {
    match verdict {
        XDP_PASS if output != input => Err("XDP_PASS but the frame was modified".into()),
        XDP_PASS | XDP_DROP => Ok(None),
        XDP_TX if is_answer(input, output) => check_rejected(input, output).map(|()| None),
        XDP_TX | XDP_REDIRECT if is_icmp6(input) => {
            check_icmp6_translated(dp, input, output).map(|()| None)
        }
        XDP_TX | XDP_REDIRECT => {
            check_forwarded(dp, input, output)?;
            Ok((ifindex == dp.client_ifindex)
                .then(|| reply_to(output))
                .flatten())
        }
        other => Err(format!("verdict {other} for an IPv6 frame")),
    }
}

/// A forwarded IPv6 frame must be a valid TCP/UDP packet of the same
/// length, hop limit one lower, its tuple exactly the rewrite conntrack
/// holds for the input's tuple, and its checksum correct if the input's was.
fn check_forwarded(dp: &mut Datapath, input: &[u8], output: &[u8]) -> Result<(), String> {
    if let Some((offset, _, id, next)) = fragment6_of(input)
        && offset != 0
    {
        return check_forwarded_fragment(dp, input, output, id, next);
    }
    let (src, sport, dst, dport) =
        tuple_of6(input).ok_or("forwarded an IPv6 frame etherparse rejects")?;
    let out_tuple = tuple_of6(output).ok_or("forwarded output does not parse")?;
    if output.len() != input.len() {
        return Err(format!("length {} -> {}", input.len(), output.len()));
    }
    let proto = l4_proto6(input).ok_or("forwarded a frame of no L4 protocol")?;
    let flow = dp
        .flow6(&key6(src, sport, dst, dport, proto))
        .ok_or("forwarded without a conntrack entry")?;
    let addr = |addr| std::net::Ipv6Addr::from(lb_common::family::octets6(addr));
    let want = (
        addr(flow.new_src_addr_be),
        u16::from_be(flow.new_src_port_be),
        addr(flow.new_dst_addr_be),
        u16::from_be(flow.new_dst_port_be),
    );
    if out_tuple != want {
        return Err(format!(
            "rewritten to {out_tuple:?}, conntrack says {want:?}"
        ));
    }
    if output[21] + 1 != input[21] {
        return Err("hop limit not decremented by one".into());
    }
    if check_checksums(input).is_ok() {
        check_checksums(output)?;
    }
    Ok(())
}

/// A forwarded later fragment must be its datagram's first fragment's
/// (`XLB_FRAGS6` holds its ports) and leave with the IPv6 header that
/// flow's conntrack entry says, hop limit one lower, everything after the
/// IPv6 header (fragment header and payload) as it came.
fn check_forwarded_fragment(
    dp: &mut Datapath,
    input: &[u8],
    output: &[u8],
    id: u32,
    proto: u8,
) -> Result<(), String> {
    let addr_at = |frame: &[u8], at: usize| {
        let octets: [u8; 16] = frame[at..at + 16].try_into().expect("16 bytes");
        std::net::Ipv6Addr::from(octets)
    };
    let (src, dst) = (addr_at(input, 22), addr_at(input, 38));
    let (sport, dport) = dp
        .frag6_ports(src, dst, id, proto)
        .ok_or("forwarded a later fragment of no remembered first fragment")?;
    let flow = dp
        .flow6(&key6(src, sport, dst, dport, proto))
        .ok_or("forwarded a later fragment without a conntrack entry")?;
    let want = (
        lb_common::family::octets6(flow.new_src_addr_be),
        lb_common::family::octets6(flow.new_dst_addr_be),
    );
    let got = (addr_at(output, 22).octets(), addr_at(output, 38).octets());
    if got != want || output.len() != input.len() || output[54..] != input[54..] {
        return Err("later fragment not rewritten as its flow says".into());
    }
    if output[21] + 1 != input[21] {
        return Err("hop limit not decremented by one".into());
    }
    Ok(())
}

/// Whether `output` goes back to `input`'s sender (a rejection) rather
/// than on (a forwarded frame).
fn is_answer(input: &[u8], output: &[u8]) -> bool {
    output.len() >= 54 && input.len() >= 54 && output[38..54] == input[22..38]
}

/// A rejection is ICMPv6 port unreachable quoting the input from its IPv6
/// header on (as much as fits 1280 bytes) or a RST|ACK, from the address
/// the input went to, back to its sender, checksum correct.
fn check_rejected(input: &[u8], output: &[u8]) -> Result<(), String> {
    use etherparse::{NetHeaders, PacketHeaders, TransportHeader};
    let headers = PacketHeaders::from_ethernet_slice(output).map_err(|e| e.to_string())?;
    let Some(NetHeaders::Ipv6(ip, _)) = &headers.net else {
        return Err("rejection is not IPv6".into());
    };
    if ip.source[..] != input[38..54] || output[0..6] != input[6..12] {
        return Err("rejection not from the address and to the MAC of the sender".into());
    }
    check_checksums(output)?;
    let payload = headers.payload.slice();
    match &headers.transport {
        Some(TransportHeader::Icmpv6(icmp)) => {
            let port_unreachable = etherparse::Icmpv6Type::DestinationUnreachable(
                etherparse::icmpv6::DestUnreachableCode::Port,
            );
            if icmp.icmp_type != port_unreachable {
                return Err(format!("ICMPv6 {:?}", icmp.icmp_type));
            }
            let ip_len = 40 + usize::from(u16::from_be_bytes([input[18], input[19]]));
            if payload.len() != ip_len.min(QUOTE6_MAX) || payload != &input[14..14 + payload.len()]
            {
                return Err("ICMPv6 does not quote the datagram as RFC 4443 says".into());
            }
            Ok(())
        }
        Some(TransportHeader::Tcp(tcp)) if tcp.rst && tcp.ack && payload.is_empty() => Ok(()),
        _ => Err("rejection neither port unreachable nor RST|ACK".into()),
    }
}

/// The backend's answer to a frame forwarded to it.
fn reply_to(at_backend: &[u8]) -> Option<Vec<u8>> {
    let (src, sport, dst, dport) = tuple_of6(at_backend)?;
    let l4 = if l4_proto6(at_backend) == Some(IPPROTO_UDP) {
        L4::Udp
    } else {
        L4::Tcp(SYN | ACK)
    };
    let mut spec = Spec6::from_client(dport, sport, l4);
    spec.eth_src = at_backend[0..6].try_into().ok()?;
    spec.eth_dst = NODE_B_MAC;
    spec.src = dst;
    spec.dst = src;
    Some(spec.build())
}

fn is_icmp6(frame: &[u8]) -> bool {
    frame.len() > 20 && frame[20] == 58
}

/// An ICMPv6 error about `forwarded` (a frame the node sent on), from its
/// destination back to its source: what the far side, or a router on the
/// way, sends. `None` for a frame that is not IPv6.
pub fn error_about(rng: &mut Rng, forwarded: &[u8]) -> Option<Vec<u8>> {
    if !is_ipv6(forwarded) || forwarded.len() < 54 {
        return None;
    }
    let kind = match rng.below(4) {
        0 => too_big6(1_280 + rng.below(200) as u32),
        1 => port_unreachable6(),
        2 => hop_limit_exceeded6(),
        _ => parameter_problem6(rng.below(40) as u32),
    };
    let l4_bytes = match rng.below(3) {
        0 => Some(8),
        1 => Some(rng.below(40) as usize),
        _ => None,
    };
    let addr = |at: usize| {
        let octets: [u8; 16] = forwarded[at..at + 16].try_into().ok()?;
        Some(std::net::Ipv6Addr::from(octets))
    };
    let eth = (
        forwarded[0..6].try_into().ok()?,
        forwarded[6..12].try_into().ok()?,
    );
    Some(icmp6_error(
        eth,
        (addr(38)?, addr(22)?),
        64,
        kind,
        &quote6(forwarded, l4_bytes),
    ))
}

/// (src, sport, dst, dport, proto) of the packet an ICMPv6 error quotes.
fn quoted_tuple6(frame: &[u8]) -> Option<(std::net::Ipv6Addr, u16, std::net::Ipv6Addr, u16, u8)> {
    let quote = frame.get(62..62 + 48)?;
    let addr = |at: usize| -> Option<std::net::Ipv6Addr> {
        let octets: [u8; 16] = quote[at..at + 16].try_into().ok()?;
        Some(octets.into())
    };
    let port = |at: usize| u16::from_be_bytes([quote[at], quote[at + 1]]);
    Some((addr(8)?, port(40), addr(24)?, port(42), quote[6]))
}

/// A forwarded ICMPv6 error must quote a TCP/UDP packet of a flow, keep
/// its length, go where the entry of the opposite direction sends, hop
/// limit one lower, its quote rewritten to that entry's tuple reversed,
/// and its checksum (over the new pseudo-header) correct if the input's
/// was.
fn check_icmp6_translated(dp: &mut Datapath, input: &[u8], output: &[u8]) -> Result<(), String> {
    let (src, sport, dst, dport, proto) =
        quoted_tuple6(input).ok_or("forwarded an ICMPv6 error whose quote is short")?;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Err(format!(
            "forwarded an ICMPv6 error quoting protocol {proto}"
        ));
    }
    if output.len() != input.len() {
        return Err(format!("length {} -> {}", input.len(), output.len()));
    }
    let flow = dp
        .flow6(&key6(dst, dport, src, sport, proto))
        .ok_or("forwarded an ICMPv6 error no flow entry matches")?;
    let addr = |addr| std::net::Ipv6Addr::from(lb_common::family::octets6(addr));
    let outer = |frame: &[u8]| tuple_at(frame, 22);
    if outer(output) != Some((addr(flow.new_src_addr_be), addr(flow.new_dst_addr_be))) {
        return Err("outer addresses are not the flow entry's rewrite".into());
    }
    let want = (
        addr(flow.new_dst_addr_be),
        u16::from_be(flow.new_dst_port_be),
        addr(flow.new_src_addr_be),
        u16::from_be(flow.new_src_port_be),
        proto,
    );
    if quoted_tuple6(output) != Some(want) {
        return Err(format!(
            "quote rewritten to {:?}, flow says {want:?}",
            quoted_tuple6(output)
        ));
    }
    if output[21] + 1 != input[21] {
        return Err("hop limit not decremented by one".into());
    }
    if check_checksums(input).is_ok() {
        check_checksums(output)?;
    }
    Ok(())
}

/// The (source, destination) addresses of the IPv6 header at `at`.
fn tuple_at(frame: &[u8], at: usize) -> Option<(std::net::Ipv6Addr, std::net::Ipv6Addr)> {
    let src: [u8; 16] = frame.get(at..at + 16)?.try_into().ok()?;
    let dst: [u8; 16] = frame.get(at + 16..at + 32)?.try_into().ok()?;
    Some((src.into(), dst.into()))
}
