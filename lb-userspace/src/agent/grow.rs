//! Growing the service and backend maps. They are made at load with
//! `--map-capacity` entries (or what pinned maps already have); a plan that
//! needs more makes the agent start itself again in place (`execve`, same
//! pid and arguments) with a larger capacity. That is the restart path the
//! DaemonSet's rolling updates take: pinned links keep forwarding meanwhile,
//! conntrack is adopted, and the configuration maps are made anew at the
//! new size with the ids the old ones gave (`kernel::kept`), so flows keep
//! their backends. Without a bpffs there is nothing to carry flows over:
//! the maps do not grow, and what does not fit is reported as before.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fmt;
use std::str::FromStr;

use log::{info, warn};

use crate::kernel::{MapSizes, PinDir, kept};
use crate::reconcile::{Applied, Desired, PlanError};

/// How an agent growing its maps tells the next one the capacity it
/// asked for (`FRONTENDS,BACKENDS`).
pub(super) const GROWN_ENV: &str = "XLB_GROWN_MAP_CAPACITY";

/// The most frontends the maps grow to.
const FRONTENDS_MAX: u32 = 1 << 20;
/// The most backend ids the maps grow to (per-CPU counters are kept per
/// backend id: 32 bytes a CPU each).
const BACKENDS_MAX: u32 = 1 << 21;

/// Frontends (`XLB_SERVICES`, and `XLB_SELECT`'s tables) and backend ids
/// (`XLB_BACKENDS` and the arrays indexed like it) the maps hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapCapacity {
    pub frontends: u32,
    pub backends: u32,
}

impl Default for MapCapacity {
    fn default() -> Self {
        Self {
            frontends: lb_common::maps::SERVICES_MAX,
            backends: lb_common::maps::BACKENDS_MAX,
        }
    }
}

impl fmt::Display for MapCapacity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{},{}", self.frontends, self.backends)
    }
}

impl FromStr for MapCapacity {
    type Err = String;

    /// `FRONTENDS,BACKENDS`, each at least 1 and at most the growth limit.
    fn from_str(text: &str) -> Result<Self, String> {
        let usage = || {
            format!(
                "expected FRONTENDS,BACKENDS (e.g. {}), each 1 to {FRONTENDS_MAX} and 2 to \
                 {BACKENDS_MAX}",
                MapCapacity::default()
            )
        };
        let (frontends, backends) = text.split_once(',').ok_or_else(usage)?;
        let number = |text: &str| text.trim().parse::<u32>().map_err(|_| usage());
        let capacity = Self {
            frontends: number(frontends)?,
            backends: number(backends)?,
        };
        let fits = (1..=FRONTENDS_MAX).contains(&capacity.frontends)
            && (2..=BACKENDS_MAX).contains(&capacity.backends);
        if fits { Ok(capacity) } else { Err(usage()) }
    }
}

impl MapCapacity {
    /// The capacity of a datapath loaded with `sizes`.
    pub fn of(sizes: &MapSizes) -> Self {
        Self {
            frontends: sizes.services,
            backends: sizes.backends,
        }
    }

    /// At least `self`, at least what the maps pinned under `pins` have (a
    /// grown map stays grown across restarts) and at least what the agent
    /// that started this one asked for ([`GROWN_ENV`]).
    pub fn at_least_grown(self, pins: Option<&PinDir>) -> Self {
        let mut capacity = self;
        if let Some(pinned) = pins.and_then(kept::pinned_capacity) {
            capacity = capacity.max(Self {
                frontends: pinned.0,
                backends: pinned.1,
            });
        }
        let grown = std::env::var(GROWN_ENV).ok();
        if let Some(grown) = grown.and_then(|text| text.parse::<Self>().ok()) {
            capacity = capacity.max(grown);
        }
        capacity
    }

    fn max(self, other: Self) -> Self {
        Self {
            frontends: self.frontends.max(other.frontends),
            backends: self.backends.max(other.backends),
        }
    }

    /// The capacity to grow to from `self` for `needed`: at least double
    /// what is short, with a quarter to spare; `None` when nothing is short
    /// or the limits are reached.
    fn grown_for(self, needed: Self) -> Option<Self> {
        let grow = |have: u32, need: u32, max: u32| {
            if need <= have {
                return have;
            }
            let spare = need.saturating_add(need / 4);
            have.saturating_mul(2)
                .max(spare.checked_next_power_of_two().unwrap_or(u32::MAX))
                .min(max)
        };
        let grown = Self {
            frontends: grow(self.frontends, needed.frontends, FRONTENDS_MAX),
            backends: grow(self.backends, needed.backends, BACKENDS_MAX),
        };
        (grown != self && grown.frontends >= needed.frontends && grown.backends >= needed.backends)
            .then_some(grown)
    }
}

/// What `desired` needs of the maps while `applied` is still written: a
/// slot per frontend, and an id per backend, old and new side by side
/// (backends go only after the services stop using them), id 0 aside.
fn needed(applied: &Applied, desired: &Desired) -> MapCapacity {
    let frontends: usize = desired.services.iter().map(|s| s.frontends.len()).sum();
    let backends: BTreeSet<_> = desired
        .services
        .iter()
        .flat_map(|service| service.backends.iter().map(|backend| backend.address))
        .chain(applied.backends.values().map(|active| active.address))
        .collect();
    MapCapacity {
        frontends: u32::try_from(frontends).unwrap_or(u32::MAX),
        backends: u32::try_from(backends.len() + 1).unwrap_or(u32::MAX),
    }
}

/// The capacity to restart with when `why` says a map is too small, if
/// the maps can grow: they are pinned (so flows survive the restart) and
/// below the limits.
pub(super) fn growth(
    why: &PlanError,
    sizes: &MapSizes,
    pinned: bool,
    applied: &Applied,
    desired: &Desired,
) -> Option<MapCapacity> {
    use lb_common::maps::{BACKENDS, SELECT, SERVICES};
    let PlanError::Full { map, .. } = why;
    if ![SERVICES, SELECT, BACKENDS].contains(map) {
        return None;
    }
    if !pinned {
        warn!(
            "{map} is full and cannot grow: the maps are not pinned (no bpffs), so a restart \
             would lose every flow; start xlb with --map-capacity large enough"
        );
        return None;
    }
    let grown = MapCapacity::of(sizes).grown_for(needed(applied, desired));
    if grown.is_none() {
        warn!(
            "{map} is full and at its limit ({FRONTENDS_MAX} frontends, {BACKENDS_MAX} backend \
             ids); what does not fit is not served"
        );
    }
    grown
}

/// The ids the running datapath's flows may name, for the next agent to
/// keep: those written (the mirror) and those not written yet that this
/// agent itself kept from the maps before (it may grow again before its
/// first apply), and the flow hash's secret.
pub(super) fn ids_in_use(applied: &Applied, hash_seed: u64) -> kept::Kept {
    let mut ids = applied.kept.clone();
    for (&id, active) in &applied.backends {
        ids.backends.insert(active.address, id);
    }
    for (&frontend, service) in &applied.services {
        ids.services.insert(frontend, service.entry.id);
    }
    kept::Kept {
        ids,
        hash_seed: Some(hash_seed),
    }
}

/// Starts this agent again in place with `capacity` (see the module
/// docs). Returns only if that fails.
pub(super) fn restart_with(capacity: MapCapacity, sizes: &MapSizes) -> std::io::Error {
    use std::os::unix::process::CommandExt as _;
    info!(
        "growing the maps from {} to {capacity} (frontends,backends): xlb starts again in place; \
         the pinned datapath forwards meanwhile and flows keep their backends",
        MapCapacity::of(sizes)
    );
    log::logger().flush();
    let mut args = std::env::args_os();
    let program = args.next().unwrap_or_else(|| OsString::from("xlb"));
    std::process::Command::new("/proc/self/exe")
        .arg0(program)
        .args(args)
        .env(GROWN_ENV, capacity.to_string())
        .exec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_reads_frontends_then_backends() {
        assert_eq!(
            "8,16".parse::<MapCapacity>(),
            Ok(MapCapacity {
                frontends: 8,
                backends: 16
            })
        );
        for bad in ["8", "0,16", "8,1", "8,x", "2000000,16"] {
            let error = bad.parse::<MapCapacity>().err().unwrap_or_default();
            assert!(error.contains("FRONTENDS,BACKENDS"), "{bad}: {error}");
        }
    }

    #[test]
    fn growth_doubles_at_least_and_spares_a_quarter() {
        let have = MapCapacity {
            frontends: 8,
            backends: 16,
        };
        let grow = |frontends, backends| {
            have.grown_for(MapCapacity {
                frontends,
                backends,
            })
        };
        assert_eq!(grow(8, 16), None, "nothing short");
        assert_eq!(
            grow(9, 10),
            Some(MapCapacity {
                frontends: 16,
                backends: 16
            })
        );
        assert_eq!(
            grow(4, 100),
            Some(MapCapacity {
                frontends: 8,
                backends: 128
            })
        );
        let at_limit = MapCapacity {
            frontends: FRONTENDS_MAX,
            backends: BACKENDS_MAX,
        };
        assert_eq!(
            at_limit.grown_for(MapCapacity {
                frontends: FRONTENDS_MAX + 1,
                backends: 2
            }),
            None
        );
    }
}
