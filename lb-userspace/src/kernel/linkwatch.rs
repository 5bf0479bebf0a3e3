//! Link events from the kernel: a NETLINK_ROUTE socket subscribed to
//! RTMGRP_LINK, so the agent hears of a pod's veth (or a tunnel) the moment
//! it is made or removed, and attaches or forgets its tc program then
//! rather than at the next periodic scan. Only "something changed" is
//! taken from the messages; the agent then lists the devices again.
//! `kernel/peers.rs` opens the same kind of watch on neighbour events.

use std::io;
use std::os::fd::{AsFd as _, OwnedFd};

use tokio::io::unix::AsyncFd;

use crate::kernel::sys;

/// rtnetlink message types (linux/rtnetlink.h).
pub const RTM_NEWLINK: u16 = 16;
pub const RTM_DELLINK: u16 = 17;
/// Neighbour (and bridge FDB) messages.
pub const RTM_NEWNEIGH: u16 = 28;
pub const RTM_DELNEIGH: u16 = 29;
/// `struct nlmsghdr`: len (u32), type (u16), flags (u16), seq, pid.
const NLMSG_HDRLEN: usize = 16;

/// A subscription to link events in this network namespace.
pub struct LinkWatch {
    socket: AsyncFd<OwnedFd>,
    /// The message types that count as a change.
    kinds: &'static [u16],
}

impl LinkWatch {
    /// Opens and binds the socket. Call inside the tokio runtime.
    pub fn open() -> io::Result<LinkWatch> {
        Self::open_for(libc::RTMGRP_LINK as u32, &[RTM_NEWLINK, RTM_DELLINK])
    }

    /// A watch of the rtnetlink multicast `groups` that reports messages of
    /// the types `kinds`.
    pub fn open_for(groups: u32, kinds: &'static [u16]) -> io::Result<LinkWatch> {
        let socket = sys::netlink_socket(libc::NETLINK_ROUTE, groups, true)?;
        let socket = sys::async_readable(socket)?;
        Ok(LinkWatch { socket, kinds })
    }

    /// Waits until a link was added, changed or removed, and drains every
    /// message queued by then (a pod's creation sends several). A queue
    /// that overflowed (ENOBUFS: events were lost) counts as a change.
    pub async fn changed(&self) -> io::Result<()> {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let mut guard = self.socket.readable().await?;
            let mut changed = false;
            loop {
                let received = sys::recv(self.socket.get_ref().as_fd(), &mut buffer);
                let error = match received {
                    Ok(received) => {
                        changed |= has_message(&buffer[..received], self.kinds);
                        continue;
                    }
                    Err(error) => error,
                };
                match error.raw_os_error() {
                    Some(libc::EAGAIN) => {
                        guard.clear_ready();
                        break;
                    }
                    Some(libc::ENOBUFS) => changed = true,
                    Some(libc::EINTR) => {}
                    _ => return Err(error),
                }
            }
            if changed {
                return Ok(());
            }
        }
    }
}

/// Whether a datagram of netlink messages holds a RTM_NEWLINK or
/// RTM_DELLINK.
#[cfg(test)]
fn has_link_message(messages: &[u8]) -> bool {
    has_message(messages, &[RTM_NEWLINK, RTM_DELLINK])
}

/// Whether a datagram of netlink messages holds one of type `kinds`.
fn has_message(mut messages: &[u8], kinds: &[u16]) -> bool {
    while messages.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes([messages[0], messages[1], messages[2], messages[3]]) as usize;
        let kind = u16::from_ne_bytes([messages[4], messages[5]]);
        if kinds.contains(&kind) {
            return true;
        }
        // Messages are 4-byte aligned (NLMSG_ALIGN).
        let next = len.div_ceil(4) * 4;
        if len < NLMSG_HDRLEN || next > messages.len() {
            break;
        }
        messages = &messages[next..];
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u16, payload: usize) -> Vec<u8> {
        let len = (NLMSG_HDRLEN + payload) as u32;
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&len.to_ne_bytes());
        bytes.extend_from_slice(&kind.to_ne_bytes());
        bytes.extend_from_slice(&[0; 10]);
        bytes.resize(bytes.len() + payload.div_ceil(4) * 4, 0);
        bytes
    }

    #[test]
    fn finds_link_messages_among_others() {
        const RTM_NEWADDR: u16 = 20;
        assert!(has_link_message(&message(RTM_NEWLINK, 32)));
        assert!(has_link_message(&message(RTM_DELLINK, 0)));
        assert!(!has_link_message(&message(RTM_NEWADDR, 8)));
        let mut both = message(RTM_NEWADDR, 5);
        both.extend(message(RTM_DELLINK, 3));
        assert!(has_link_message(&both));
        assert!(!has_link_message(&[]));
        assert!(!has_link_message(&[0; 8]));
        // A length shorter than a header stops the walk.
        let mut broken = message(RTM_NEWADDR, 0);
        broken[0..4].copy_from_slice(&4u32.to_ne_bytes());
        broken.extend(message(RTM_NEWLINK, 0));
        assert!(!has_link_message(&broken));
    }
}
