//! Config sources. Each produces a whole `DesiredState`, never deltas.

pub mod locate;
pub mod yaml;
