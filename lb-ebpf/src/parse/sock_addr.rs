//! The socket hooks' context (`struct bpf_sock_addr`): the address a
//! connect(), sendmsg(), recvmsg() or getpeername() carries. Every field is
//! read and written whole (4 bytes): the verifier refuses narrower access
//! to some of them, and the compiler would narrow a plain read.

use aya_ebpf::programs::SockAddrContext;
use lb_common::{IPPROTO_TCP, IPPROTO_UDP};

const AF_INET: u32 = 2;

/// The (protocol, address, port) of an IPv4 TCP or UDP socket address, in
/// network byte order as every `_be` field; `None` for anything else.
#[inline(always)]
pub fn ipv4_address(ctx: &SockAddrContext) -> Option<(u8, u32, u16)> {
    let addr = ctx.sock_addr;
    // SAFETY: the kernel passes a valid context for the program's run; these
    // fields are readable in every sock_addr hook, as whole words.
    let (family, protocol, ip4, port) = unsafe {
        (
            core::ptr::read_volatile(&(*addr).user_family),
            core::ptr::read_volatile(&(*addr).protocol),
            core::ptr::read_volatile(&(*addr).user_ip4),
            core::ptr::read_volatile(&(*addr).user_port),
        )
    };
    let proto = protocol as u8;
    if family != AF_INET || (proto != IPPROTO_TCP && proto != IPPROTO_UDP) {
        return None;
    }
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
