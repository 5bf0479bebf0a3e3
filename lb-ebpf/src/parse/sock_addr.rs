//! The socket hooks' context (`struct bpf_sock_addr`): the address a
//! connect(), sendmsg(), recvmsg() or getpeername() carries. Every field is
//! read and written whole (4 bytes): the verifier refuses narrower access
//! to some of them, and the compiler would narrow a plain read.

use aya_ebpf::programs::SockAddrContext;
use lb_common::{Addr6, IPPROTO_TCP, IPPROTO_UDP};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// The protocol of a TCP or UDP socket address of `family`, or `None`.
#[inline(always)]
fn tcp_or_udp(ctx: &SockAddrContext, family: u32) -> Option<u8> {
    let addr = ctx.sock_addr;
    // SAFETY: the kernel passes a valid context for the program's run; these
    // fields are readable in every sock_addr hook, as whole words.
    let (user_family, protocol) = unsafe {
        (
            core::ptr::read_volatile(&(*addr).user_family),
            core::ptr::read_volatile(&(*addr).protocol),
        )
    };
    let proto = protocol as u8;
    if user_family != family || (proto != IPPROTO_TCP && proto != IPPROTO_UDP) {
        return None;
    }
    Some(proto)
}

/// The (protocol, address, port) of an IPv4 TCP or UDP socket address, in
/// network byte order as every `_be` field; `None` for anything else.
#[inline(always)]
pub fn ipv4_address(ctx: &SockAddrContext) -> Option<(u8, u32, u16)> {
    let proto = tcp_or_udp(ctx, AF_INET)?;
    let addr = ctx.sock_addr;
    // SAFETY: as in `tcp_or_udp`.
    let (ip4, port) = unsafe {
        (
            core::ptr::read_volatile(&(*addr).user_ip4),
            core::ptr::read_volatile(&(*addr).user_port),
        )
    };
    Some((proto, ip4, port as u16))
}

/// Replaces the address the call carries (network byte order).
#[inline(always)]
pub fn set_ipv4_address(ctx: &SockAddrContext, addr_be: u32, port_be: u16) {
    let addr = ctx.sock_addr;
    // SAFETY: as above; user_ip4 and user_port are writable, as whole words,
    // in the connect, sendmsg, recvmsg and getpeername hooks.
    unsafe {
        core::ptr::write_volatile(&mut (*addr).user_ip4, addr_be);
        core::ptr::write_volatile(&mut (*addr).user_port, u32::from(port_be));
    }
}

/// The (protocol, address, port) of an IPv6 TCP or UDP socket address
/// (`user_ip6`'s four words are the address in wire order, as an `Addr6`);
/// `None` for anything else.
#[inline(always)]
pub fn ipv6_address(ctx: &SockAddrContext) -> Option<(u8, Addr6, u16)> {
    let proto = tcp_or_udp(ctx, AF_INET6)?;
    let addr = ctx.sock_addr;
    // SAFETY: as in `tcp_or_udp`; user_ip6 is read a word at a time.
    let (ip6, port) = unsafe {
        (
            [
                core::ptr::read_volatile(&(*addr).user_ip6[0]),
                core::ptr::read_volatile(&(*addr).user_ip6[1]),
                core::ptr::read_volatile(&(*addr).user_ip6[2]),
                core::ptr::read_volatile(&(*addr).user_ip6[3]),
            ],
            core::ptr::read_volatile(&(*addr).user_port),
        )
    };
    Some((proto, ip6, port as u16))
}

/// Replaces the IPv6 address the call carries (network byte order).
#[inline(always)]
pub fn set_ipv6_address(ctx: &SockAddrContext, addr_be: &Addr6, port_be: u16) {
    let addr = ctx.sock_addr;
    // SAFETY: as above; user_ip6's words and user_port are writable, as
    // whole words, in the connect, sendmsg, recvmsg and getpeername hooks.
    unsafe {
        core::ptr::write_volatile(&mut (*addr).user_ip6[0], addr_be[0]);
        core::ptr::write_volatile(&mut (*addr).user_ip6[1], addr_be[1]);
        core::ptr::write_volatile(&mut (*addr).user_ip6[2], addr_be[2]);
        core::ptr::write_volatile(&mut (*addr).user_ip6[3], addr_be[3]);
        core::ptr::write_volatile(&mut (*addr).user_port, u32::from(port_be));
    }
}
