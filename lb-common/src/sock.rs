//! Socket-level balancing (cgroup v2 connect4/sendmsg4/recvmsg4/getpeername4
//! hooks): the reverse translation record and how socket clients are keyed
//! for session affinity.

use crate::assert_size;

/// Set in `AffinityKey::service_id` for a socket-level client: the key's
/// `client_addr_be` then holds a fold of the client's network namespace
/// cookie (a pod, or the node itself), not an IPv4 address. Service ids stay
/// below `maps::SERVICE_IDS_MAX`, so the two kinds of key never meet.
pub const AFFINITY_SOCKET_CLIENT: u32 = 1 << 31;
const _: () = assert!(crate::maps::SERVICE_IDS_MAX <= AFFINITY_SOCKET_CLIENT);

/// The affinity client id of a network namespace cookie.
#[inline(always)]
pub const fn netns_client(netns_cookie: u64) -> u32 {
    (netns_cookie ^ (netns_cookie >> 32)) as u32
}

/// `XLB_SOCK_REVNAT` key: one socket (its cookie, unique for the kernel's
/// uptime) talking to one backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevNatKey {
    pub socket_cookie: u64,
    pub backend_addr_be: u32,
    pub backend_port_be: u16,
    pub _pad: u16,
}
assert_size!(SockRevNatKey, 16);

/// `XLB_SOCK_REVNAT` value: the frontend the socket asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRevNat {
    pub service_addr_be: u32,
    pub service_port_be: u16,
    pub _pad: u16,
    /// `Service::id` of the frontend.
    pub service_id: u32,
}
assert_size!(SockRevNat, 12);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)], Copy, integers only, no implicit padding (asserted).
    unsafe impl aya::Pod for super::SockRevNatKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SockRevNat {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_cookies_fold_both_halves() {
        assert_ne!(netns_client(1), netns_client(1 << 33));
    }
}
