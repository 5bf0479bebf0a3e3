//! Incremental Internet checksum updates (RFC 1624, eqn. 3). Every rewrite in
//! the datapath goes through these; nothing else touches a checksum.
//!
//! All values are taken in *memory order*: the bytes as they sit in the packet,
//! read as native integers. One's-complement sums are byte-order independent
//! (RFC 1071), so no swapping is needed and the result is stored the same way.

/// Folds a 32-bit one's-complement accumulator to 16 bits.
#[inline(always)]
const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Folds a 64-bit one's-complement accumulator to 16 bits.
#[inline(always)]
const fn fold64(mut sum: u64) -> u16 {
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Running difference between old and new field values, summed in 64 bits
/// and folded once, when applied: a 32-bit word's complement is the
/// complement of both its halves, so a 32-bit field costs one add of each
/// value, not two 16-bit steps with a fold after each (an IPv6 address
/// pair is 8 words). Each term is under 2^32, so any number of fields a
/// packet has cannot overflow the sum.
#[derive(Clone, Copy, Default)]
pub struct CsumDelta(u64);

impl CsumDelta {
    #[inline(always)]
    pub const fn new() -> Self {
        Self(0)
    }

    /// Accounts for a 16-bit field changing from `old` to `new`.
    #[inline(always)]
    pub const fn replace16(self, old: u16, new: u16) -> Self {
        Self(self.0 + (!old) as u64 + new as u64)
    }

    /// Accounts for a 32-bit field (an IPv4 address, a word of an IPv6
    /// one) changing.
    #[inline(always)]
    pub const fn replace32(self, old: u32, new: u32) -> Self {
        Self(self.0 + (!old) as u64 + new as u64)
    }

    /// Both differences: for a checksum covering the fields of each (an
    /// ICMPv6 error's covers its quote and its outer addresses).
    #[inline(always)]
    pub const fn and(self, other: Self) -> Self {
        Self(self.0 + other.0)
    }

    /// Applies the difference to a checksum field's current value.
    #[inline(always)]
    pub const fn apply(self, check: u16) -> u16 {
        !fold64((!check) as u64 + self.0)
    }

    /// Like `apply`, for a UDP checksum: 0 means "no checksum" and stays 0,
    /// and a computed 0 is sent as 0xffff (RFC 768).
    #[inline(always)]
    pub const fn apply_udp(self, check: u16) -> u16 {
        if check == 0 {
            return 0;
        }
        match self.apply(check) {
            0 => 0xffff,
            sum => sum,
        }
    }
}

/// Internet checksum of `data` (even length) plus `seed`, a partial sum such
/// as a pseudo-header's, for headers built from scratch.
#[inline(always)]
pub fn checksum(data: &[u8], seed: u32) -> u16 {
    let mut sum = seed;
    let mut at = 0;
    while at + 1 < data.len() {
        sum += u16::from_ne_bytes([data[at], data[at + 1]]) as u32;
        at += 2;
    }
    !fold(fold(sum) as u32)
}

/// Partial sum of a TCP/UDP pseudo-header (addresses in memory order).
#[inline(always)]
pub const fn pseudo_header(src_be: u32, dst_be: u32, proto: u8, l4_len: u16) -> u32 {
    (src_be & 0xffff)
        + (src_be >> 16)
        + (dst_be & 0xffff)
        + (dst_be >> 16)
        + u16::from_ne_bytes([0, proto]) as u32
        + u16::from_ne_bytes(l4_len.to_be_bytes()) as u32
}

/// Partial sum of an IPv6 pseudo-header (RFC 8200 8.1): both addresses,
/// the upper-layer length and the next header.
#[inline(always)]
pub fn pseudo_header6(src: &[u8; 16], dst: &[u8; 16], proto: u8, l4_len: u16) -> u32 {
    let mut sum =
        u16::from_ne_bytes([0, proto]) as u32 + u16::from_ne_bytes(l4_len.to_be_bytes()) as u32;
    let mut at = 0;
    while at < 16 {
        sum += u16::from_ne_bytes([src[at], src[at + 1]]) as u32;
        sum += u16::from_ne_bytes([dst[at], dst[at + 1]]) as u32;
        at += 2;
    }
    fold(sum) as u32
}

/// One's-complement sum of two partial sums, folded to 16 bits (a seed for
/// `checksum`).
#[inline(always)]
pub const fn add(a: u32, b: u32) -> u32 {
    fold((a & 0xffff) + (a >> 16) + (b & 0xffff) + (b >> 16)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Full RFC 1071 checksum over `data`, in memory order.
    fn full(data: &[u8]) -> u16 {
        let mut sum = 0u32;
        for chunk in data.chunks(2) {
            let word = [chunk[0], *chunk.get(1).unwrap_or(&0)];
            sum += u32::from(u16::from_ne_bytes(word));
        }
        !fold(fold(sum) as u32)
    }

    fn word(data: &[u8], at: usize) -> u16 {
        u16::from_ne_bytes([data[at], data[at + 1]])
    }

    #[test]
    fn incremental_equals_full_recompute() {
        // A 20-byte IPv4 header with the checksum at 10..12.
        let mut header = [
            0x45, 0, 0, 0x54, 0x12, 0x34, 0x40, 0, 64, 17, 0, 0, 198, 18, 0, 2, 198, 18, 0, 1,
        ];
        let check = full(&header);
        header[10..12].copy_from_slice(&check.to_ne_bytes());
        assert_eq!(full(&header), 0, "a valid header sums to zero");

        for new_dst in [
            [198u8, 18, 1, 2],
            [255, 255, 255, 255],
            [0, 0, 0, 0],
            [1, 2, 3, 4],
        ] {
            let mut rewritten = header;
            let old = u32::from_ne_bytes([header[16], header[17], header[18], header[19]]);
            rewritten[16..20].copy_from_slice(&new_dst);
            let new = u32::from_ne_bytes(new_dst);
            let updated = CsumDelta::new()
                .replace32(old, new)
                .apply(word(&header, 10));
            rewritten[10..12].copy_from_slice(&updated.to_ne_bytes());
            assert_eq!(full(&rewritten), 0, "dst {new_dst:?}");
        }
    }

    #[test]
    fn ttl_decrement_updates_checksum() {
        let mut header = [
            0x45, 0, 0, 0x54, 0, 0, 0, 0, 1, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        let check = full(&header);
        header[10..12].copy_from_slice(&check.to_ne_bytes());
        let old = word(&header, 8);
        header[8] -= 1;
        let updated = CsumDelta::new()
            .replace16(old, word(&header, 8))
            .apply(word(&header, 10));
        header[10..12].copy_from_slice(&updated.to_ne_bytes());
        assert_eq!(full(&header), 0);
    }

    #[test]
    fn checksum_of_a_valid_header_verifies() {
        let mut header = [
            0x45u8, 0, 0, 0x54, 0x12, 0x34, 0x40, 0, 64, 17, 0, 0, 198, 18, 0, 2, 198, 18, 0, 1,
        ];
        let check = checksum(&header, 0);
        header[10..12].copy_from_slice(&check.to_ne_bytes());
        assert_eq!(full(&header), 0);
        assert_eq!(checksum(&header, 0), 0);
    }

    #[test]
    fn two_deltas_together_are_one_delta_of_both_changes() {
        let one = CsumDelta::new().replace32(0xffff_0001, 0x1234_fffe);
        let other = CsumDelta::new().replace16(0xfffe, 0x0001);
        let both = CsumDelta::new()
            .replace32(0xffff_0001, 0x1234_fffe)
            .replace16(0xfffe, 0x0001);
        for check in [0u16, 1, 0x8000, 0xfffe, 0xffff] {
            assert_eq!(one.and(other).apply(check), both.apply(check));
        }
    }

    #[test]
    fn udp_zero_checksum_is_kept() {
        let delta = CsumDelta::new().replace32(1, 2);
        assert_eq!(delta.apply_udp(0), 0);
        assert_ne!(delta.apply_udp(0x1234), 0);
    }

    #[test]
    fn ipv6_pseudo_header_sums_its_40_bytes() {
        let src = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let dst = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&src);
        bytes.extend_from_slice(&dst);
        bytes.extend_from_slice(&1_300u32.to_be_bytes());
        bytes.extend_from_slice(&[0, 0, 0, 58]);
        let seed = pseudo_header6(&src, &dst, 58, 1_300);
        assert_eq!(!fold(seed), full(&bytes));
        assert_eq!(
            add(0xffff_0001, 0x0001_ffff),
            add(add(0xffff, 1), add(1, 0xffff))
        );
    }

    /// Every 32-bit word of a 40-byte block (an IPv6 address pair and the
    /// ports) rewritten in one delta, summed unfolded: the result is the one
    /// RFC 1624's equation gives folding after each 16-bit step, and the
    /// full recompute's, for values at the edges of one's-complement
    /// arithmetic (all ones, zero) as for ordinary ones. (Data that sums to
    /// zero is the equation's one exception, +0 for -0, in both ways of
    /// summing; a pseudo-header's protocol word rules it out.)
    #[test]
    fn many_words_in_one_delta_equal_full_recompute() {
        let mut seed = 0x9e37_79b9u32;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        for round in 0..2_000 {
            // 40 bytes, then the checksum field (its own word).
            let mut block = [0u8; 42];
            for word in block[..40].chunks_mut(4) {
                let value = match round % 4 {
                    0 => u32::MAX,
                    1 => 0,
                    _ => next(),
                };
                word.copy_from_slice(&value.to_ne_bytes());
            }
            let check = full(&block);
            block[40..42].copy_from_slice(&check.to_ne_bytes());
            assert_eq!(full(&block), 0);

            let mut rewritten = block;
            let mut delta = CsumDelta::new();
            let mut stepwise = 0u32;
            for at in (0..40).step_by(4) {
                let old = u32::from_ne_bytes(block[at..at + 4].try_into().unwrap());
                let new = match (round / 4) % 3 {
                    0 => u32::MAX,
                    1 => 0,
                    _ => next(),
                };
                rewritten[at..at + 4].copy_from_slice(&new.to_ne_bytes());
                delta = delta.replace32(old, new);
                for (old, new) in [
                    (old as u16, new as u16),
                    ((old >> 16) as u16, (new >> 16) as u16),
                ] {
                    stepwise = u32::from(fold(stepwise + u32::from(!old) + u32::from(new)));
                }
            }
            let updated = delta.apply(word(&block, 40));
            let reference = !fold(u32::from(!word(&block, 40)) + stepwise);
            assert_eq!(updated, reference, "round {round}");
            rewritten[40..42].copy_from_slice(&updated.to_ne_bytes());
            if rewritten[..40].iter().any(|byte| *byte != 0) {
                assert_eq!(full(&rewritten), 0, "round {round}");
            }
        }
    }
}
