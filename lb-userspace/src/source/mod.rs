//! Config sources. Each produces a whole `DesiredState`, never deltas.

pub mod cluster;
pub mod file;
pub mod kube;
pub mod locate;
pub mod manifests;
pub mod problem;
pub mod yaml;
