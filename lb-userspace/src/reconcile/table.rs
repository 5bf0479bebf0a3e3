//! The selection table builder: a pure function from weighted backends to the
//! slots of one service's region in `XLB_SELECT`. v1 spreads slots in
//! proportion to weights and interleaves them; issue 4 replaces the body with
//! Maglev, keeping the signature.

use std::cmp::Ordering;

/// Builds a table of `size` slots, each holding a backend id, from
/// `(backend_id, weight)` pairs. Backend `i` gets `size * w_i / Σw` slots,
/// rounded by largest remainder (ties to the earlier backend), spread evenly
/// over the table. Deterministic for a given input. Returns an empty table
/// when there is no weight to share (the service then has no backend).
pub fn build_table(backends: &[(u32, u32)], size: u32) -> Vec<u32> {
    let total: u64 = backends.iter().map(|&(_, weight)| u64::from(weight)).sum();
    if total == 0 || size == 0 {
        return Vec::new();
    }
    let counts = apportion(backends, size, total);
    // Backend i's k-th slot ideally sits at (k + 1/2) / count_i of the way
    // through the table; taking slots in that order interleaves backends.
    let mut picks: Vec<(u64, u64, usize)> = Vec::with_capacity(size as usize);
    for (index, &count) in counts.iter().enumerate() {
        for k in 0..count {
            picks.push((2 * k + 1, 2 * count, index));
        }
    }
    picks.sort_by(|a, b| {
        let left = u128::from(a.0) * u128::from(b.1);
        let right = u128::from(b.0) * u128::from(a.1);
        left.cmp(&right).then(a.2.cmp(&b.2))
    });
    picks
        .into_iter()
        .map(|(_, _, index)| backends[index].0)
        .collect()
}

/// Slots per backend: floors of the exact shares, then the leftover slots to
/// the largest remainders.
fn apportion(backends: &[(u32, u32)], size: u32, total: u64) -> Vec<u64> {
    let size = u64::from(size);
    let mut counts = Vec::with_capacity(backends.len());
    let mut remainders = Vec::with_capacity(backends.len());
    for (index, &(_, weight)) in backends.iter().enumerate() {
        let exact = size * u64::from(weight);
        counts.push(exact / total);
        remainders.push((exact % total, index));
    }
    let given: u64 = counts.iter().sum();
    remainders.sort_by(|a, b| match b.0.cmp(&a.0) {
        Ordering::Equal => a.1.cmp(&b.1),
        other => other,
    });
    for &(_, index) in remainders.iter().take((size - given) as usize) {
        counts[index] += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(table: &[u32], id: u32) -> usize {
        table.iter().filter(|&&slot| slot == id).count()
    }

    #[test]
    fn weights_three_to_one() {
        let table = build_table(&[(7, 3), (9, 1)], 1021);
        assert_eq!(table.len(), 1021);
        assert_eq!(share(&table, 7), 766);
        assert_eq!(share(&table, 9), 255);
        // Interleaved: no run of the minority backend, and the majority never
        // holds more than 3 slots in a row (plus rounding).
        let longest_run = table
            .chunk_by(|a, b| a == b)
            .filter(|run| run[0] == 7)
            .map(<[u32]>::len)
            .max();
        assert!(longest_run <= Some(4), "{longest_run:?}");
        assert!(
            table
                .chunk_by(|a, b| a == b)
                .all(|run| run[0] == 7 || run.len() == 1)
        );
    }

    #[test]
    fn equal_weights_alternate() {
        let table = build_table(&[(1, 1), (2, 1)], 7);
        assert_eq!(table, [1, 2, 1, 2, 1, 2, 1]);
    }

    #[test]
    fn zero_weight_gets_no_slot() {
        let table = build_table(&[(1, 1), (2, 0), (3, 1)], 11);
        assert_eq!(share(&table, 2), 0);
        assert_eq!(share(&table, 1) + share(&table, 3), 11);
    }

    #[test]
    fn nothing_to_share() {
        assert!(build_table(&[], 1021).is_empty());
        assert!(build_table(&[(1, 0)], 1021).is_empty());
        assert!(build_table(&[(1, 1)], 0).is_empty());
    }

    #[test]
    fn every_slot_filled_and_shares_within_one() {
        let backends: Vec<(u32, u32)> = (1..=13).map(|id| (id, id % 5 + 1)).collect();
        let total: u32 = backends.iter().map(|b| b.1).sum();
        let table = build_table(&backends, 1021);
        assert_eq!(table.len(), 1021);
        for &(id, weight) in &backends {
            let exact = 1021.0 * f64::from(weight) / f64::from(total);
            let got = share(&table, id) as f64;
            assert!((got - exact).abs() < 1.0, "backend {id}: {got} vs {exact}");
        }
    }

    #[test]
    fn deterministic() {
        let backends = [(4, 2), (8, 5), (15, 1)];
        assert_eq!(build_table(&backends, 1021), build_table(&backends, 1021));
    }
}
