//! The reconciler: turns "what the maps hold" and "what they should hold"
//! into an ordered list of map operations. Pure; the kernel layer executes
//! the operations and `Applied::record` keeps the mirror in step. Also the
//! service flags the datapath acts on (which backends new flows may use is
//! the model's rule) and the Maglev table builder.
//!
//! Safe order (a packet never sees a service whose table or backends are not
//! written yet): node addresses, backends, selection tables (a new table
//! swapped whole into the service's index of `XLB_SELECT`, or into a free
//! index when its size changes) and newly allowed source ranges, service
//! entries, then deletions in reverse (services, then backends, which the
//! datapath re-balances flows away from on their next packet, tables and
//! source ranges no entry uses any more, then addresses), and the global
//! settings with the ready flag last. Ports join the port filter first and
//! leave it only after a conntrack scan (`ports`).
//! One file per part: `ops` (the map vocabulary), `desired` (what the
//! maps should hold), `applied` (what they hold), `plan` (the diff),
//! `writer` (`MapWriter` and `apply`), `maglev` (the tables), `ports` (the
//! port filter's bitmap).

mod applied;
mod desired;
pub mod maglev;
mod ops;
mod plan;
mod ports;
mod writer;

pub use applied::{Applied, AppliedService, KeptIds, TableSummary};
pub use desired::{Desired, DesiredService, NodeFacts, RefusedFrontend};
pub use ops::{ActiveBackend, Frontend, MapOp, RunKind, ServiceEntry, Settings, SourceRangeKey};
pub use plan::{Capacity, Fitted, PlanError, diff, diff_fitting};
pub use ports::{PortSet, lingering as ports_lingering, prune as prune_ports};
pub use writer::{ApplyError, MapWriter, apply};

#[cfg(test)]
mod tests;
