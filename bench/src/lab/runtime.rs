//! Where a system's CPU goes, in BPF: the kernel's run-time statistics
//! (`BPF_ENABLE_STATS`, `run_time_ns` and `run_cnt` of each loaded
//! program), read around a measured window. Beside the delivered pps they
//! give the nanoseconds of BPF per delivered packet, so xlb's cost over the
//! stateless limit has a figure of its own, not only a ratio of rates
//! (which also carries the generator's and the veths' share of the two
//! cores). Systems without BPF (kube-proxy's rules, nginx) have none.

use std::os::fd::OwnedFd;

use anyhow::Context as _;
use aya::programs::loaded_programs;
use aya::sys::{Stats, enable_stats};

use super::System;

/// Run-time statistics are counted while this lives (the kernel stops
/// when the last such descriptor closes).
pub struct RunTimeStats {
    _enabled: OwnedFd,
}

impl RunTimeStats {
    pub fn enable() -> anyhow::Result<RunTimeStats> {
        let enabled = enable_stats(Stats::RunTime).context("BPF_ENABLE_STATS(run time)")?;
        Ok(RunTimeStats { _enabled: enabled })
    }
}

/// Kernel names (15 characters at most) of the programs that run for a
/// system's packets: the limit's redirect, or xlb's XDP program and its tc
/// programs (hand-off, pod replies). The lab's generator and sinks are
/// nobody's.
pub fn programs_of(system: System) -> &'static [&'static str] {
    match system {
        System::Limit => &["xlb_limit"],
        System::LimitNat => &["xlb_limit_nat"],
        System::LimitLru => &["xlb_limit_lru"],
        System::Xlb => &["xlb", "xlb_tc_uplink", "xlb_tc_pod"],
        _ => &[],
    }
}

/// The highest id of a loaded BPF program (0 when none): programs loaded
/// later have higher ids.
pub fn newest_id() -> anyhow::Result<u32> {
    let mut newest = 0;
    for info in loaded_programs() {
        newest = newest.max(info.context("reading loaded BPF programs")?.id());
    }
    Ok(newest)
}

/// One system's programs, by id: those named in `programs_of` that were
/// loaded while the system was configured (so a test or another agent on
/// the machine with programs of the same names is not counted).
#[derive(Clone, Debug, Default)]
pub struct Programs {
    ids: Vec<u32>,
}

impl Programs {
    /// The programs named `names` with an id above `newest_before`.
    pub fn loaded_since(newest_before: u32, names: &[&str]) -> anyhow::Result<Programs> {
        let mut ids = Vec::new();
        for info in loaded_programs() {
            let info = info.context("reading loaded BPF programs")?;
            let name = info.name_as_str().unwrap_or_default();
            if info.id() > newest_before && names.contains(&name) {
                ids.push(info.id());
            }
        }
        Ok(Programs { ids })
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Summed `(run_time_ns, run_cnt)` of these programs now.
    pub fn snapshot(&self) -> anyhow::Result<(u64, u64)> {
        let mut total = (0u64, 0u64);
        for info in loaded_programs() {
            let info = info.context("reading loaded BPF programs")?;
            if self.ids.contains(&info.id()) {
                total.0 += u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX);
                total.1 += info.run_count();
            }
        }
        Ok(total)
    }
}

/// BPF time over a window: nanoseconds per delivered packet and per run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BpfTime {
    pub ns_per_delivered: f64,
    pub ns_per_run: f64,
}

impl BpfTime {
    /// From snapshots before and after a window that delivered `delivered`
    /// packets; `None` when nothing ran or nothing arrived.
    pub fn between(before: (u64, u64), after: (u64, u64), delivered: u64) -> Option<BpfTime> {
        let ns = after.0.checked_sub(before.0)?;
        let runs = after.1.checked_sub(before.1)?;
        (runs > 0 && delivered > 0).then(|| BpfTime {
            ns_per_delivered: ns as f64 / delivered as f64,
            ns_per_run: ns as f64 / runs as f64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_packet_and_per_run() {
        let time = BpfTime::between((1_000, 10), (101_000, 1_010), 500);
        assert_eq!(
            time,
            Some(BpfTime {
                ns_per_delivered: 200.0,
                ns_per_run: 100.0
            })
        );
        assert_eq!(BpfTime::between((5, 5), (5, 5), 100), None);
        assert_eq!(BpfTime::between((0, 0), (10, 1), 0), None);
    }
}
