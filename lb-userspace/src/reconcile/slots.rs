//! A written selection table as the mirror keeps it: the table's distinct
//! backend ids and, per slot, a byte saying which of them. A table of 251
//! slots over 10 backends is then 291 bytes instead of 1,004 (10,000 such
//! tables: 3 MB instead of 10 MB); a table with more than 256 distinct
//! backends is kept as plain ids.

/// The slots of one written table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TableSlots {
    /// `ids` sorted and distinct; each slot an index into them.
    Indexed { ids: Box<[u32]>, slots: Box<[u8]> },
    /// More distinct ids than a byte can tell apart.
    Plain(Box<[u32]>),
}

impl TableSlots {
    /// The table whose slots hold `backend_ids`.
    pub fn new(backend_ids: &[u32]) -> Self {
        let mut ids = backend_ids.to_vec();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() > usize::from(u8::MAX) + 1 {
            return TableSlots::Plain(backend_ids.into());
        }
        let slots = backend_ids
            .iter()
            .map(|id| {
                let index = ids.binary_search(id).unwrap_or_default();
                u8::try_from(index).unwrap_or(u8::MAX)
            })
            .collect();
        TableSlots::Indexed {
            ids: ids.into_boxed_slice(),
            slots,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            TableSlots::Indexed { slots, .. } => slots.len(),
            TableSlots::Plain(ids) => ids.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The backend id of each slot, in order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        let (indexed, plain) = match self {
            TableSlots::Indexed { ids, slots } => {
                (Some(slots.iter().map(|&slot| ids[usize::from(slot)])), None)
            }
            TableSlots::Plain(ids) => (None, Some(ids.iter().copied())),
        };
        indexed
            .into_iter()
            .flatten()
            .chain(plain.into_iter().flatten())
    }

    /// Every backend id the table holds (each once when indexed).
    pub fn backend_ids(&self) -> &[u32] {
        match self {
            TableSlots::Indexed { ids, .. } => ids,
            TableSlots::Plain(ids) => ids,
        }
    }

    /// Whether the slots hold exactly `backend_ids`, in order.
    pub fn holds(&self, backend_ids: &[u32]) -> bool {
        self.len() == backend_ids.len() && self.iter().eq(backend_ids.iter().copied())
    }

    pub fn to_vec(&self) -> Vec<u32> {
        self.iter().collect()
    }
}

impl From<Vec<u32>> for TableSlots {
    fn from(backend_ids: Vec<u32>) -> Self {
        TableSlots::new(&backend_ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_read_back_as_written() {
        let maglev: Vec<u32> = (0..251u32).map(|slot| 40 + (slot * 7) % 10).collect();
        let table = TableSlots::new(&maglev);
        assert!(matches!(&table, TableSlots::Indexed { ids, .. } if ids.len() == 10));
        assert_eq!(table.to_vec(), maglev);
        assert!(table.holds(&maglev));
        assert!(!table.holds(&maglev[1..]));
        let mut other = maglev.clone();
        other[250] = 41;
        assert!(!table.holds(&other));
        assert_eq!(table.backend_ids(), (40..50).collect::<Vec<u32>>());

        let wide: Vec<u32> = (0..1021u32).map(|slot| slot % 300).collect();
        let table = TableSlots::from(wide.clone());
        assert!(matches!(table, TableSlots::Plain(_)));
        assert_eq!((table.len(), table.to_vec()), (1021, wide));
        assert!(TableSlots::new(&[]).is_empty());
        // One representation per content: equal tables compare equal.
        assert_eq!(TableSlots::new(&[3, 1, 3]), TableSlots::from(vec![3, 1, 3]));
    }
}
