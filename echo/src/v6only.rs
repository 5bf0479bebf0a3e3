//! Binding IPv6 addresses IPv6-only (`IPV6_V6ONLY`), so `--tcp 0.0.0.0:P`
//! and `--tcp [::]:P` are two listeners side by side, and an IPv4 client
//! is never reported as `::ffff:a.b.c.d`. IPv4 addresses bind as std does.

use std::io;
use std::mem;
use std::net::{SocketAddr, SocketAddrV6, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::pktinfo::set_int;

/// Backlog of a TCP listener, as std uses.
const BACKLOG: libc::c_int = 128;

/// A TCP listener on `addr`; IPv6-only for an IPv6 address.
pub fn tcp_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let SocketAddr::V6(addr6) = addr else {
        return TcpListener::bind(addr);
    };
    let fd = bound_socket(libc::SOCK_STREAM, addr6, true)?;
    // SAFETY: listen on a socket this function owns; no memory is passed.
    if unsafe { libc::listen(fd.as_raw_fd(), BACKLOG) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(TcpListener::from(fd))
}

/// A UDP socket on `addr`; IPv6-only for an IPv6 address.
pub fn udp_socket(addr: SocketAddr) -> io::Result<UdpSocket> {
    let SocketAddr::V6(addr6) = addr else {
        return UdpSocket::bind(addr);
    };
    Ok(UdpSocket::from(bound_socket(
        libc::SOCK_DGRAM,
        addr6,
        false,
    )?))
}

/// An `AF_INET6` socket of `kind`, `IPV6_V6ONLY` (and `SO_REUSEADDR` for a
/// listener, as std sets it), bound to `addr`.
fn bound_socket(kind: libc::c_int, addr: SocketAddrV6, reuse: bool) -> io::Result<OwnedFd> {
    // SAFETY: socket takes no pointers; a non-negative result is a new fd
    // that nothing else owns.
    let fd = unsafe { libc::socket(libc::AF_INET6, kind | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket and is owned only here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    set_int(fd.as_raw_fd(), libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)?;
    if reuse {
        set_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    }
    // SAFETY: all-zero is a valid sockaddr_in6; every field is set below.
    let mut sockaddr: libc::sockaddr_in6 = unsafe { mem::zeroed() };
    sockaddr.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    sockaddr.sin6_port = addr.port().to_be();
    sockaddr.sin6_flowinfo = addr.flowinfo();
    sockaddr.sin6_addr.s6_addr = addr.ip().octets();
    sockaddr.sin6_scope_id = addr.scope_id();
    // SAFETY: `sockaddr` is a sockaddr_in6 that outlives the call, and the
    // length passed is its size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sockaddr as *const libc::sockaddr_in6).cast(),
            mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}
