//! The port filter (`XLB_PORTS`): which ports the datapath may have business
//! with. A packet with neither port listed passes before any lookup, so the
//! list must cover every port a service key or a live flow can carry: the
//! frontends' ports (original tuples' destinations) and the backends' ports
//! (reply tuples' sources). A reconcile only adds ports; one whose service
//! is gone leaves only once a scan of the conntrack tables finds no flow on
//! it ([`prune`]), so an established flow of a removed service is handled
//! as it was without the filter (replies from a removed backend included).

use std::fmt;

use super::applied::Applied;
use super::desired::Desired;
use super::ops::MapOp;

/// Words of the bitmap (`lb_common::maps::PORTS_ON`).
pub const PORT_WORDS: usize = lb_common::maps::PORTS_ON as usize;

/// A set of ports, as the bitmap `XLB_PORTS` holds them.
#[derive(Clone, PartialEq, Eq)]
pub struct PortSet {
    words: Box<[u64; PORT_WORDS]>,
}

impl Default for PortSet {
    fn default() -> Self {
        Self {
            words: Box::new([0; PORT_WORDS]),
        }
    }
}

impl fmt::Debug for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

impl FromIterator<u16> for PortSet {
    fn from_iter<I: IntoIterator<Item = u16>>(ports: I) -> Self {
        let mut set = Self::default();
        for port in ports {
            set.insert(port);
        }
        set
    }
}

impl PortSet {
    pub fn insert(&mut self, port: u16) {
        let (word, bit) = lb_common::maps::port_bit(port);
        self.words[word as usize] |= bit;
    }

    pub fn contains(&self, port: u16) -> bool {
        let (word, bit) = lb_common::maps::port_bit(port);
        self.words[word as usize] & bit != 0
    }

    pub fn word(&self, index: usize) -> u64 {
        self.words[index]
    }

    pub fn set_word(&mut self, index: usize, bits: u64) {
        self.words[index] = bits;
    }

    pub fn iter(&self) -> impl Iterator<Item = u16> + '_ {
        (0..=u16::MAX).filter(|&port| self.contains(port))
    }

    /// Whether some port here is not in `other`.
    pub fn exceeds(&self, other: &PortSet) -> bool {
        self.words
            .iter()
            .zip(other.words.iter())
            .any(|(mine, theirs)| mine & !theirs != 0)
    }

    /// The ports the written maps need listed: every service entry's
    /// frontend port and every active backend's port.
    pub fn in_maps(applied: &Applied) -> Self {
        let frontends = applied.services.keys().map(|frontend| frontend.port);
        let backends = applied
            .backends
            .values()
            .map(|backend| backend.address.port);
        frontends.chain(backends).collect()
    }

    /// The ports `desired` needs listed: its frontends' and its backends'.
    pub fn wanted(desired: &Desired) -> Self {
        let mut set = Self::default();
        for service in &desired.services {
            for (frontend, _) in &service.frontends {
                set.insert(frontend.port);
            }
            for backend in &service.backends {
                set.insert(backend.address.port);
            }
        }
        set
    }
}

/// The ops that list what `desired` needs on top of what is listed (a
/// reconcile never unlists a port), then turn the filter on.
pub(super) fn grow(applied: &Applied, desired: &Desired, ops: &mut Vec<MapOp>) {
    let wanted = PortSet::wanted(desired);
    let mut target = applied.ports.clone();
    for index in 0..PORT_WORDS {
        target.set_word(index, applied.ports.word(index) | wanted.word(index));
    }
    write(applied, &target, ops);
}

/// After a scan of the conntrack tables found flows on `in_use` (every
/// port of every key): the ops that unlist ports that neither a flow nor
/// what the maps hold (services' frontends, active backends; see
/// [`PortSet::in_maps`]) needs. Ports only: the filter's flag stays as is.
pub fn prune(applied: &Applied, in_use: &PortSet) -> Vec<MapOp> {
    let needed = PortSet::in_maps(applied);
    let mut ops = Vec::new();
    for index in 0..PORT_WORDS {
        let listed = applied.ports.word(index);
        let kept = listed & (needed.word(index) | in_use.word(index));
        if kept != listed {
            ops.push(MapOp::WritePorts {
                word: index as u16,
                bits: kept,
            });
        }
    }
    ops
}

/// Whether some listed port is needed by nothing the maps hold (a scan of
/// the conntrack tables may unlist it).
pub fn lingering(applied: &Applied) -> bool {
    applied.ports.exceeds(&PortSet::in_maps(applied))
}

fn write(applied: &Applied, target: &PortSet, ops: &mut Vec<MapOp>) {
    // `applied` was read back from the map after a restart, so only the
    // words that differ are written (whatever a previous agent left listed
    // is a superset of what it needed, and stays until a scan).
    for index in 0..PORT_WORDS {
        if target.word(index) != applied.ports.word(index) {
            ops.push(MapOp::WritePorts {
                word: index as u16,
                bits: target.word(index),
            });
        }
    }
    if !applied.port_filter {
        ops.push(MapOp::PortFilterOn);
    }
}
