//! The flow hash: picks the backend slot and the first masquerade port to try.
//! Shared so the agent and tests can predict the datapath's choice.

use crate::FlowKey;

#[inline(always)]
const fn mix(mut h: u32, word: u32) -> u32 {
    // One round of murmur3's body: cheap, branch-free, good avalanche.
    let mut k = word.wrapping_mul(0xcc9e_2d51);
    k = k.rotate_left(15).wrapping_mul(0x1b87_3593);
    h ^= k;
    h.rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64)
}

#[inline(always)]
const fn finish(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Hash of a flow's 5-tuple (fields as stored, i.e. network byte order).
#[inline(always)]
pub const fn flow_hash(key: &FlowKey, seed: u32) -> u32 {
    let mut h = seed;
    h = mix(h, key.src_addr_be);
    h = mix(h, key.dst_addr_be);
    h = mix(h, (key.src_port_be as u32) << 16 | key.dst_port_be as u32);
    h = mix(h, key.proto as u32);
    finish(h ^ 13)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let base = flow_hash(&key, 1);
        assert_ne!(base, flow_hash(&key, 2));
        assert_ne!(
            base,
            flow_hash(
                &FlowKey {
                    src_addr_be: 1,
                    ..key
                },
                1
            )
        );
        assert_ne!(
            base,
            flow_hash(
                &FlowKey {
                    dst_addr_be: 1,
                    ..key
                },
                1
            )
        );
        assert_ne!(
            base,
            flow_hash(
                &FlowKey {
                    src_port_be: 1,
                    ..key
                },
                1
            )
        );
        assert_ne!(
            base,
            flow_hash(
                &FlowKey {
                    dst_port_be: 1,
                    ..key
                },
                1
            )
        );
        assert_ne!(base, flow_hash(&FlowKey { proto: 17, ..key }, 1));
        assert_eq!(base, flow_hash(&key, 1), "deterministic");
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
            buckets[(flow_hash(&key, 7) % 4) as usize] += 1;
        }
        for count in buckets {
            assert!((9_000..11_000).contains(&count), "{buckets:?}");
        }
    }
}
