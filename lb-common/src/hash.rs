//! The flow hash: picks the backend slot and the first masquerade port to try.
//! Shared so the agent and tests can predict the datapath's choice.
//!
//! HalfSipHash-1-3 (the keyed hash the Linux kernel uses for its own
//! network tables) under a 64-bit secret per cluster: nodes that share the
//! secret choose the same backend for a tuple, and nobody without it can
//! pick tuples that all land on one backend or one masquerade port.

use crate::{FlowKeyOf, family::Family};

/// The flow hash's secret (`GlobalConfig::hash_seed`, `hash_seed_hi`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HashKey {
    pub lo: u32,
    pub hi: u32,
}

impl HashKey {
    pub const fn new(lo: u32, hi: u32) -> Self {
        Self { lo, hi }
    }

    /// A second, independent-looking key from the same secret (the
    /// masquerade port's start must not follow the backend slot).
    pub const fn derived(self, tweak: u32) -> Self {
        Self {
            lo: self.lo ^ tweak,
            hi: self.hi,
        }
    }
}

struct State([u32; 4]);

impl State {
    #[inline(always)]
    const fn round(mut self) -> Self {
        let [mut v0, mut v1, mut v2, mut v3] = self.0;
        v0 = v0.wrapping_add(v1);
        v1 = v1.rotate_left(5) ^ v0;
        v0 = v0.rotate_left(16);
        v2 = v2.wrapping_add(v3);
        v3 = v3.rotate_left(8) ^ v2;
        v0 = v0.wrapping_add(v3);
        v3 = v3.rotate_left(7) ^ v0;
        v2 = v2.wrapping_add(v1);
        v1 = v1.rotate_left(13) ^ v2;
        v2 = v2.rotate_left(16);
        self.0 = [v0, v1, v2, v3];
        self
    }

    /// One compression round per message word (the "1" of 1-3).
    #[inline(always)]
    const fn absorb(mut self, word: u32) -> Self {
        self.0[3] ^= word;
        self = self.round();
        self.0[0] ^= word;
        self
    }
}

/// HalfSipHash-1-3 of a flow's 5-tuple (fields as stored, i.e. network
/// byte order) under `key`: each address word, the ports, the protocol.
#[inline(always)]
pub fn flow_hash<F: Family>(flow: &FlowKeyOf<F>, key: HashKey) -> u32 {
    let mut state = State([key.lo, key.hi, 0x6c79_6765 ^ key.lo, 0x7465_6462 ^ key.hi]);
    for word in 0..F::WORDS {
        state = state.absorb(F::word(&flow.src_addr_be, word));
    }
    for word in 0..F::WORDS {
        state = state.absorb(F::word(&flow.dst_addr_be, word));
    }
    state = state.absorb((flow.src_port_be as u32) << 16 | flow.dst_port_be as u32);
    state = state.absorb(flow.proto as u32);
    // 2 * WORDS + 2 words: 16 bytes for IPv4, 40 for IPv6.
    let length = (((2 * F::WORDS + 2) * 4) as u32) << 24;
    state.0[3] ^= length;
    state = state.round();
    state.0[0] ^= length;
    state.0[2] ^= 0xff;
    state = state.round().round().round();
    state.0[1] ^ state.0[3]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FlowKey;

    #[test]
    fn hash_depends_on_every_field_and_seed() {
        let key = FlowKey {
            src_addr_be: 0x0100_12c6,
            dst_addr_be: 0x0200_12c6,
            src_port_be: 1234,
            dst_port_be: 30999,
            proto: crate::IPPROTO_TCP,
            _pad: [0; 3],
        };
        let k1 = HashKey::new(1, 9);
        let base = flow_hash(&key, k1);
        assert_ne!(base, flow_hash(&key, HashKey::new(2, 9)));
        assert_ne!(base, flow_hash(&key, HashKey::new(1, 8)));
        assert_ne!(
            base,
            flow_hash(
                &FlowKey {
                    src_addr_be: 1,
                    ..key
                },
                k1
            )
        );
        assert_ne!(
            base,
            flow_hash(
                &FlowKey {
                    dst_addr_be: 1,
                    ..key
                },
                k1
            )
        );
        assert_ne!(
            base,
            flow_hash(
                &FlowKey {
                    src_port_be: 1,
                    ..key
                },
                k1
            )
        );
        assert_ne!(
            base,
            flow_hash(
                &FlowKey {
                    dst_port_be: 1,
                    ..key
                },
                k1
            )
        );
        assert_ne!(base, flow_hash(&FlowKey { proto: 17, ..key }, k1));
        assert_eq!(base, flow_hash(&key, k1), "deterministic");
    }

    #[test]
    fn ipv6_hash_depends_on_every_address_word() {
        let key = crate::FlowKey6 {
            src_addr_be: [1, 2, 3, 4],
            dst_addr_be: [5, 6, 7, 8],
            src_port_be: 1234,
            dst_port_be: 30999,
            proto: crate::IPPROTO_UDP,
            _pad: [0; 3],
        };
        let secret = HashKey::new(1, 9);
        let base = flow_hash(&key, secret);
        for word in 0..4 {
            let mut src = key;
            src.src_addr_be[word] ^= 1;
            assert_ne!(base, flow_hash(&src, secret), "source word {word}");
            let mut dst = key;
            dst.dst_addr_be[word] ^= 1;
            assert_ne!(base, flow_hash(&dst, secret), "destination word {word}");
        }
        // An IPv4 tuple and an IPv6 one with the same words hash apart.
        let v4 = FlowKey {
            src_addr_be: 1,
            dst_addr_be: 5,
            src_port_be: 1234,
            dst_port_be: 30999,
            proto: crate::IPPROTO_UDP,
            _pad: [0; 3],
        };
        assert_ne!(flow_hash(&v4, secret), base);
    }

    #[test]
    fn source_ports_spread_evenly() {
        let mut buckets = [0u32; 4];
        for port in 0..40_000u16 {
            let key = FlowKey {
                src_port_be: port,
                proto: crate::IPPROTO_UDP,
                ..FlowKey::default()
            };
            buckets[(flow_hash(&key, HashKey::new(7, 0x1234_5678)) % 4) as usize] += 1;
        }
        for count in buckets {
            assert!((9_000..11_000).contains(&count), "{buckets:?}");
        }
    }
}
