//! Socket-level balancing (cgroup v2 connect, sendmsg, recvmsg and
//! getpeername hooks of both families): the reverse translation record and
//! how socket clients are keyed for session affinity.

use crate::{Addr6, Family, V4, V6, assert_size};

/// Set in `AffinityKey::service_id` (`AffinityKey6::service_id`) for a
/// socket-level client: the key's `client_addr_be` then holds the client's
/// network namespace cookie (a pod, or the node itself), not an address.
/// Service ids stay below `maps::SERVICE_IDS_MAX`, so the two kinds of key
/// never meet.
pub const AFFINITY_SOCKET_CLIENT: u32 = 1 << 31;
const _: () = assert!(crate::maps::SERVICE_IDS_MAX <= AFFINITY_SOCKET_CLIENT);

/// The IPv4 affinity client id of a network namespace cookie: a fold of it.
#[inline(always)]
pub const fn netns_client(netns_cookie: u64) -> u32 {
    (netns_cookie ^ (netns_cookie >> 32)) as u32
}

/// The IPv6 affinity client id of a network namespace cookie: the whole
/// cookie, as an IPv6 address has room for it.
#[inline(always)]
pub const fn netns_client6(netns_cookie: u64) -> Addr6 {
    [netns_cookie as u32, (netns_cookie >> 32) as u32, 0, 0]
}

/// The IPv4 address (network byte order) an IPv4-mapped IPv6 address
/// (`::ffff:a.b.c.d`) stands for: what a dual-stack AF_INET6 socket
/// passes to reach an IPv4 peer.
#[inline(always)]
pub const fn v4_mapped(addr: &Addr6) -> Option<u32> {
    if addr[0] == 0 && addr[1] == 0 && addr[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff]) {
        Some(addr[3])
    } else {
        None
    }
}

/// `::ffff:a.b.c.d` for the IPv4 address `addr_be`.
#[inline(always)]
pub const fn map_v4(addr_be: u32) -> Addr6 {
    [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), addr_be]
}

/// `XLB_SOCK_REVNAT` (`XLB_SOCK_REVNAT6`) key: one socket (its cookie,
/// unique for the kernel's uptime) talking to one backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevNatKeyOf<F: Family> {
    pub socket_cookie: u64,
    pub backend_addr_be: F::Addr,
    pub backend_port_be: u16,
    pub _pad: u16,
    /// Nothing for IPv4 (its layout is the one the map always had).
    pub _pad_addr: F::Pad8,
}
pub type SockRevNatKey = SockRevNatKeyOf<V4>;
pub type SockRevNatKey6 = SockRevNatKeyOf<V6>;
assert_size!(SockRevNatKey, 16);
assert_size!(SockRevNatKey6, 32);

/// `XLB_SOCK_REVNAT` (`XLB_SOCK_REVNAT6`) value: the frontend the socket
/// asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRevNatOf<F: Family> {
    pub service_addr_be: F::Addr,
    pub service_port_be: u16,
    pub _pad: u16,
    /// `Service::id` of the frontend.
    pub service_id: u32,
}
pub type SockRevNat = SockRevNatOf<V4>;
pub type SockRevNat6 = SockRevNatOf<V6>;
assert_size!(SockRevNat, 12);
assert_size!(SockRevNat6, 24);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)], Copy, integers only, no implicit padding (sizes
    // asserted for both families).
    unsafe impl<F: crate::Family> aya::Pod for super::SockRevNatKeyOf<F> {}
    // SAFETY: as above.
    unsafe impl<F: crate::Family> aya::Pod for super::SockRevNatOf<F> {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_cookies_fold_both_halves() {
        assert_ne!(netns_client(1), netns_client(1 << 33));
    }

    #[test]
    fn ipv6_socket_clients_keep_the_whole_cookie() {
        // Cookies netns_client folds together stay apart.
        let (one, other) = (0x0000_0001_0000_0001, 0);
        assert_eq!(netns_client(one), netns_client(other));
        assert_ne!(netns_client6(one), netns_client6(other));
        assert_eq!(netns_client6(one), [1, 1, 0, 0]);
    }

    #[test]
    fn ipv4_mapped_addresses_are_the_ipv4_address() {
        let cluster_ip = u32::from_ne_bytes([198, 19, 0, 10]);
        let mapped =
            crate::family::addr6([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 19, 0, 10]);
        assert_eq!(map_v4(cluster_ip), mapped);
        assert_eq!(v4_mapped(&mapped), Some(cluster_ip));
        // IPv4-compatible (::a.b.c.d, deprecated) and real IPv6 addresses are not.
        let compatible = crate::family::addr6([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 198, 19, 0, 10]);
        assert_eq!(v4_mapped(&compatible), None);
        let documentation = crate::family::addr6([
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 19, 0, 10,
        ]);
        assert_eq!(v4_mapped(&documentation), None);
    }
}
