//! Free-space bookkeeping for `XLB_SELECT`: which slot ranges a plan may
//! write without touching a table a service entry points at.

use std::collections::BTreeMap;

pub struct Regions {
    capacity: u32,
    /// Offset -> size of every region in use.
    used: BTreeMap<u32, u32>,
    /// (size, offset) of the smallest allocation so far: no gap before the
    /// offset fits that size (regions are only added, so gaps only shrink),
    /// and every region before it ends there or earlier. A request at
    /// least as big starts looking there, which keeps filling a big map
    /// linear rather than quadratic.
    resume: Option<(u32, u32)>,
}

impl Regions {
    /// `in_use`: (offset, size) of the regions service entries point at.
    pub fn new(capacity: u32, in_use: impl IntoIterator<Item = (u32, u32)>) -> Self {
        let mut used = BTreeMap::new();
        for (offset, size) in in_use {
            if size > 0 {
                let entry = used.entry(offset).or_insert(0);
                *entry = size.max(*entry);
            }
        }
        Self {
            capacity,
            used,
            resume: None,
        }
    }

    /// First free range of `size` slots; it stays in use until this
    /// `Regions` is dropped.
    pub fn allocate(&mut self, size: u32) -> Option<u32> {
        let start = match self.resume {
            Some((smallest, offset)) if size >= smallest => offset,
            _ => 0,
        };
        let mut candidate = u64::from(start);
        for (&offset, &len) in self.used.range(start..) {
            if u64::from(offset) >= candidate + u64::from(size) {
                break;
            }
            candidate = candidate.max(u64::from(offset) + u64::from(len));
        }
        if candidate + u64::from(size) > u64::from(self.capacity) {
            return None;
        }
        let offset = u32::try_from(candidate).ok()?;
        self.used.insert(offset, size);
        if self.resume.is_none_or(|(smallest, _)| size <= smallest) {
            self.resume = Some((size, offset));
        }
        Some(offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_fit_around_used_regions() {
        let mut regions = Regions::new(100, [(10, 10), (40, 20)]);
        assert_eq!(regions.allocate(10), Some(0));
        assert_eq!(regions.allocate(10), Some(20));
        assert_eq!(regions.allocate(15), Some(60));
        assert_eq!(regions.allocate(10), Some(30));
        assert_eq!(regions.allocate(26), None);
        assert_eq!(regions.allocate(25), Some(75));
        assert_eq!(regions.allocate(1), None);
    }

    /// The resume point changes nothing about where tables go: first fit,
    /// as a scan from the start would find.
    #[test]
    fn resuming_is_first_fit() {
        let in_use = [(3, 2), (9, 1), (12, 4), (30, 7)];
        let sizes = [2, 2, 1, 5, 3, 1, 2, 4, 1, 1, 6, 2, 3];
        let mut regions = Regions::new(60, in_use);
        let mut slow = Regions::new(60, in_use);
        for size in sizes {
            let expected = {
                slow.resume = None;
                slow.allocate(size)
            };
            assert_eq!(regions.allocate(size), expected, "size {size}");
        }
    }

    #[test]
    fn overlapping_regions_are_both_avoided() {
        let mut regions = Regions::new(30, [(0, 10), (5, 10)]);
        assert_eq!(regions.allocate(10), Some(15));
    }
}
