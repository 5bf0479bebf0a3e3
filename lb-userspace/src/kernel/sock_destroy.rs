//! Connected UDP sockets whose backend was removed: destroyed with
//! sock_diag's `SOCK_DESTROY` (CONFIG_INET_DIAG_DESTROY), as Cilium's
//! socket-LB does, so that the application notices and reconnects (and the
//! connect4 hook balances it again) instead of sending into a backend that
//! is gone. Only sockets the socket hooks balanced are touched: a socket is
//! destroyed only if its cookie and peer are a record of `XLB_SOCK_REVNAT`
//! or `XLB_SOCK_REV6`. Both families' sockets are read; a dual-stack
//! AF_INET6 socket connected to an IPv4-mapped backend is matched by the
//! IPv4 address, as the hooks recorded it.
//!
//! sock_diag answers for the network namespace its netlink socket lives in.
//! Pods' sockets live in theirs, so every network namespace of the node is
//! visited: the agent's own, every `/run/netns/*` (where `ip netns` and the
//! container runtimes' CNI plugins bind-mount pods' namespaces) and every
//! process's `/proc/PID/ns/net`; entering one takes CAP_SYS_ADMIN.

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd as _, OwnedFd};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use crate::kernel::sys;

/// `SOCK_DIAG_BY_FAMILY` and `SOCK_DESTROY` from linux/sock_diag.h.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
/// A connected UDP socket's `sk_state` is `TCP_ESTABLISHED`.
const TCPF_ESTABLISHED: u32 = 1 << 1;
/// `struct nlmsghdr`.
const NLMSG_HDR_LEN: usize = 16;
/// `struct inet_diag_req_v2`.
const REQ_LEN: usize = 56;
/// `struct inet_diag_msg` (the part read here).
const MSG_LEN: usize = 72;
/// `struct inet_diag_sockid`: sport, dport, src[4], dst[4], if, cookie[2].
const SOCKID_LEN: usize = 48;

/// Sockets to destroy: (socket cookie, the backend it was balanced to).
pub type Stale = BTreeSet<(u64, SocketAddr)>;

/// What one pass did.
#[derive(Debug, Default)]
pub struct DestroyPass {
    /// Network namespaces whose UDP sockets were read.
    pub namespaces: usize,
    /// Sockets destroyed.
    pub destroyed: usize,
    /// One message per namespace or socket that could not be handled.
    pub failures: Vec<String>,
}

/// Destroys every connected UDP socket (in any network namespace of the
/// node) whose cookie is in `stale` and whose peer is that backend. Runs on
/// a thread of its own: entering a namespace changes the calling thread.
pub fn destroy_connected_udp(stale: &Stale) -> DestroyPass {
    if stale.is_empty() {
        return DestroyPass::default();
    }
    let namespaces = network_namespaces();
    let stale = stale.clone();
    std::thread::spawn(move || destroy_in(&namespaces, &stale))
        .join()
        .unwrap_or_else(|_| DestroyPass {
            failures: vec![String::from("the socket destroy thread panicked")],
            ..DestroyPass::default()
        })
}

fn destroy_in(namespaces: &[PathBuf], stale: &Stale) -> DestroyPass {
    let mut pass = DestroyPass::default();
    let own = own_namespace();
    // The agent's own namespace first, before the thread leaves it.
    let mut order: Vec<Option<&Path>> = vec![None];
    order.extend(
        namespaces
            .iter()
            .filter(|path| namespace_id(path) != own)
            .map(|path| Some(path.as_path())),
    );
    for namespace in order {
        let shown = namespace.map_or_else(
            || String::from("the agent's network namespace"),
            |path| format!("network namespace {}", path.display()),
        );
        if let Some(path) = namespace
            && let Err(error) = enter(path)
        {
            pass.failures.push(format!(
                "{shown}: cannot enter it (needs CAP_SYS_ADMIN): {error}"
            ));
            continue;
        }
        match destroy_here(stale) {
            Ok((destroyed, failures)) => {
                pass.namespaces += 1;
                pass.destroyed += destroyed;
                pass.failures
                    .extend(failures.into_iter().map(|f| format!("{shown}: {f}")));
            }
            Err(error) => pass.failures.push(format!(
                "{shown}: cannot read its UDP sockets (sock_diag): {error}"
            )),
        }
    }
    pass
}

/// Every distinct network namespace reachable through `/run/netns` and
/// `/proc/*/ns/net` (the agent's own included), by path.
fn network_namespaces() -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        paths.extend(entries.flatten().map(|entry| entry.path()));
    }
    if let Ok(entries) = std::fs::read_dir("/proc") {
        paths.extend(
            entries
                .flatten()
                .filter(|entry| entry.file_name().to_string_lossy().parse::<u32>().is_ok())
                .map(|entry| entry.path().join("ns/net")),
        );
    }
    let mut seen = BTreeSet::new();
    paths
        .into_iter()
        .filter(|path| namespace_id(path).is_some_and(|id| seen.insert(id)))
        .collect()
}

/// A namespace's identity: the device and inode of its nsfs file.
fn namespace_id(path: &Path) -> Option<(u64, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.dev(), meta.ino()))
}

fn own_namespace() -> Option<(u64, u64)> {
    namespace_id(Path::new("/proc/thread-self/ns/net"))
}

fn enter(path: &Path) -> io::Result<()> {
    let file = File::open(path)?;
    // Changes only this thread, which exists for this pass alone.
    sys::setns_net(file.as_fd())
}

/// In the current thread's namespace: the sockets destroyed, and a message
/// per socket that could not be.
fn destroy_here(stale: &Stale) -> io::Result<(usize, Vec<String>)> {
    let netlink = diag_socket()?;
    let mut destroyed = 0;
    let mut failures = Vec::new();
    let mut sockets = dump_connected_udp(&netlink, libc::AF_INET as u8)?;
    sockets.extend(dump_connected_udp(&netlink, libc::AF_INET6 as u8)?);
    for socket in sockets {
        if !stale.contains(&(socket.cookie, socket.peer)) {
            continue;
        }
        let destroy = diag_request(
            SOCK_DESTROY,
            libc::NLM_F_ACK as u16,
            socket.family,
            0,
            &socket.id,
        );
        match request(&netlink, &destroy) {
            Ok(()) => {
                log::debug!(
                    "destroyed the UDP socket {} -> {} (cookie {}): its backend was removed",
                    socket.local,
                    socket.peer,
                    socket.cookie
                );
                destroyed += 1;
            }
            // Closed meanwhile.
            Err(error) if error.raw_os_error() == Some(libc::ENOENT) => {}
            Err(error) => failures.push(format!(
                "cannot destroy the UDP socket {} -> {}: {error}",
                socket.local, socket.peer
            )),
        }
    }
    Ok((destroyed, failures))
}

/// A connected UDP socket as sock_diag reports it.
struct DiagSocket {
    /// `AF_INET` or `AF_INET6`.
    family: u8,
    /// `inet_diag_sockid` as the kernel gave it, to name it back.
    id: [u8; SOCKID_LEN],
    local: SocketAddr,
    /// An IPv4-mapped peer as the IPv4 address it stands for.
    peer: SocketAddr,
    cookie: u64,
}

fn diag_socket() -> io::Result<OwnedFd> {
    sys::netlink_socket(libc::NETLINK_SOCK_DIAG, 0, false)
}

/// An `inet_diag_req_v2` for UDP sockets of `family` in `states`, naming
/// `id`.
fn diag_request(kind: u16, flags: u16, family: u8, states: u32, id: &[u8; SOCKID_LEN]) -> Vec<u8> {
    let len = NLMSG_HDR_LEN + REQ_LEN;
    let mut message = Vec::with_capacity(len);
    message.extend_from_slice(&(len as u32).to_ne_bytes());
    message.extend_from_slice(&kind.to_ne_bytes());
    message.extend_from_slice(&(libc::NLM_F_REQUEST as u16 | flags).to_ne_bytes());
    message.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    message.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    message.push(family);
    message.push(libc::IPPROTO_UDP as u8);
    message.push(0); // extensions
    message.push(0);
    message.extend_from_slice(&states.to_ne_bytes());
    message.extend_from_slice(id);
    message
}

fn send(netlink: &OwnedFd, message: &[u8]) -> io::Result<()> {
    sys::send(netlink.as_fd(), message).map(drop)
}

/// One datagram of netlink messages.
fn receive(netlink: &OwnedFd, buffer: &mut [u8]) -> io::Result<usize> {
    sys::recv(netlink.as_fd(), buffer)
}

/// Sends one request and waits for its acknowledgement.
fn request(netlink: &OwnedFd, message: &[u8]) -> io::Result<()> {
    send(netlink, message)?;
    let mut buffer = vec![0u8; 8192];
    let len = receive(netlink, &mut buffer)?;
    for (kind, payload) in messages(&buffer[..len]) {
        if kind == libc::NLMSG_ERROR as u16 {
            return netlink_error(payload);
        }
    }
    Ok(())
}

/// Every connected UDP socket of `family` (`AF_INET`, `AF_INET6`) in the
/// namespace.
fn dump_connected_udp(netlink: &OwnedFd, family: u8) -> io::Result<Vec<DiagSocket>> {
    let flags = libc::NLM_F_DUMP as u16;
    send(
        netlink,
        &diag_request(
            SOCK_DIAG_BY_FAMILY,
            flags,
            family,
            TCPF_ESTABLISHED,
            &[0; SOCKID_LEN],
        ),
    )?;
    let mut sockets = Vec::new();
    let mut buffer = vec![0u8; 32 * 1024];
    loop {
        let len = receive(netlink, &mut buffer)?;
        if len == 0 {
            return Ok(sockets);
        }
        for (kind, payload) in messages(&buffer[..len]) {
            match kind {
                kind if kind == libc::NLMSG_DONE as u16 => return Ok(sockets),
                kind if kind == libc::NLMSG_ERROR as u16 => {
                    netlink_error(payload)?;
                    return Ok(sockets);
                }
                SOCK_DIAG_BY_FAMILY => sockets.extend(diag_socket_of(payload, family)),
                _ => {}
            }
        }
    }
}

/// The messages of one datagram: (type, payload).
fn messages(mut datagram: &[u8]) -> Vec<(u16, &[u8])> {
    let mut found = Vec::new();
    while datagram.len() >= NLMSG_HDR_LEN {
        let len = u32::from_ne_bytes([datagram[0], datagram[1], datagram[2], datagram[3]]) as usize;
        if len < NLMSG_HDR_LEN || len > datagram.len() {
            break;
        }
        let kind = u16::from_ne_bytes([datagram[4], datagram[5]]);
        found.push((kind, &datagram[NLMSG_HDR_LEN..len]));
        let aligned = (len + 3) & !3;
        datagram = datagram.get(aligned..).unwrap_or_default();
    }
    found
}

/// An `NLMSG_ERROR` payload: 0 is an acknowledgement.
fn netlink_error(payload: &[u8]) -> io::Result<()> {
    let code = payload
        .get(..4)
        .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
    if code == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(-code))
    }
}

/// `inet_diag_sockid`: sport, dport, src[16], dst[16] (an IPv4 address in
/// the first 4 bytes), if, cookie[2].
fn diag_socket_of(payload: &[u8], family: u8) -> Option<DiagSocket> {
    if payload.len() < MSG_LEN {
        return None;
    }
    let id: [u8; SOCKID_LEN] = payload[4..4 + SOCKID_LEN].try_into().ok()?;
    let port = |at: usize| u16::from_be_bytes([id[at], id[at + 1]]);
    let address = |at: usize| -> Option<IpAddr> {
        Some(match family {
            family if family == libc::AF_INET as u8 => {
                IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(&id[at..at + 4]).ok()?))
            }
            _ => Ipv6Addr::from(<[u8; 16]>::try_from(&id[at..at + 16]).ok()?).to_canonical(),
        })
    };
    let word = |at: usize| u32::from_ne_bytes([id[at], id[at + 1], id[at + 2], id[at + 3]]);
    Some(DiagSocket {
        family,
        local: SocketAddr::new(address(4)?, port(0)),
        peer: SocketAddr::new(address(20)?, port(2)),
        cookie: u64::from(word(40)) | (u64::from(word(44)) << 32),
        id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;

    #[test]
    fn requests_have_the_kernel_layout() {
        let message = diag_request(
            SOCK_DESTROY,
            0,
            libc::AF_INET6 as u8,
            TCPF_ESTABLISHED,
            &[7; SOCKID_LEN],
        );
        assert_eq!(message.len(), 72);
        assert_eq!(&message[16..20], &[libc::AF_INET6 as u8, 17, 0, 0]);
        assert_eq!(&message[24..], &[7; SOCKID_LEN]);
    }

    #[test]
    fn messages_split_on_aligned_lengths() {
        let mut datagram = Vec::new();
        for (kind, payload) in [(20u16, &[1u8, 2, 3][..]), (3, &[][..])] {
            let len = NLMSG_HDR_LEN + payload.len();
            datagram.extend_from_slice(&(len as u32).to_ne_bytes());
            datagram.extend_from_slice(&kind.to_ne_bytes());
            datagram.extend_from_slice(&[0; 10]);
            datagram.extend_from_slice(payload);
            datagram.resize((datagram.len() + 3) & !3, 0);
        }
        let found = messages(&datagram);
        assert_eq!(found, [(20, &[1u8, 2, 3][..]), (3, &[][..])]);
    }

    /// Needs CAP_NET_ADMIN (sock_diag dumps work unprivileged; destroying
    /// does not), so it only runs as root. IPv4, IPv6 (where the host has
    /// ::1), and a dual-stack socket connected to an IPv4-mapped peer,
    /// which is named by its IPv4 address as the hooks record it.
    #[test]
    fn a_connected_udp_socket_in_the_stale_set_is_destroyed() {
        if !crate::kernel::is_root() {
            return;
        }
        destroys_connected("127.0.0.1:0", "127.0.0.1:0", |peer| peer);
        if UdpSocket::bind("[::1]:0").is_ok() {
            destroys_connected("[::1]:0", "[::1]:0", |peer| peer);
        }
        if UdpSocket::bind("[::]:0").is_ok() {
            let mapped = |peer: SocketAddr| match peer {
                SocketAddr::V4(v4) => SocketAddr::from((v4.ip().to_ipv6_mapped(), v4.port())),
                v6 => v6,
            };
            destroys_connected("[::]:0", "127.0.0.1:0", mapped);
        }
    }

    /// A socket on `local` connected to a peer on `peer` (named as
    /// `connect_to` makes it) is destroyed by its cookie and the peer's
    /// address, and only by those.
    fn destroys_connected(local: &str, peer: &str, connect_to: fn(SocketAddr) -> SocketAddr) {
        let socket = UdpSocket::bind(local).unwrap();
        let peer = UdpSocket::bind(peer).unwrap();
        let peer_addr = peer.local_addr().unwrap();
        socket.connect(connect_to(peer_addr)).unwrap();
        let netlink = diag_socket().unwrap();
        let family = match socket.local_addr().unwrap() {
            SocketAddr::V4(_) => libc::AF_INET as u8,
            SocketAddr::V6(_) => libc::AF_INET6 as u8,
        };
        let found = dump_connected_udp(&netlink, family).unwrap();
        let port = socket.local_addr().unwrap().port();
        let ours = found
            .iter()
            .find(|found| found.local.port() == port)
            .expect("the dump lists the connected socket");
        assert_eq!(ours.peer, peer_addr, "{local} -> {peer_addr}");
        // Another peer for the same cookie: left alone.
        let other = SocketAddr::new(peer_addr.ip(), 1);
        assert_eq!(
            destroy_here(&Stale::from([(ours.cookie, other)]))
                .unwrap()
                .0,
            0
        );
        assert_eq!(
            destroy_here(&Stale::from([(ours.cookie, peer_addr)])).unwrap(),
            (1, vec![]),
            "{local} -> {peer_addr}"
        );
        assert!(
            socket.peer_addr().is_err(),
            "destroyed: no longer connected"
        );
        // What the application sees (the README's words): send() has no
        // peer any more, a receive reports the abort once.
        socket.set_nonblocking(true).unwrap();
        let errno = |result: io::Result<usize>| result.map_err(|error| error.raw_os_error());
        assert_eq!(errno(socket.send(b"x")), Err(Some(libc::EDESTADDRREQ)));
        assert_eq!(
            errno(socket.recv(&mut [0; 4])),
            Err(Some(libc::ECONNABORTED))
        );
        assert_eq!(errno(socket.recv(&mut [0; 4])), Err(Some(libc::EAGAIN)));
        // A reconnect works.
        socket.connect(connect_to(peer_addr)).unwrap();
        assert_eq!(errno(socket.send(b"x")), Ok(1));
    }
}
