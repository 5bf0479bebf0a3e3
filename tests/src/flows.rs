//! Many new flows from the lab's client, and which backends answered them:
//! how the end-to-end tests see Maglev, weights, affinity and endpoint
//! conditions at work.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use anyhow::ensure;

use crate::Lab;
use crate::client::{Who, tcp_who_echo, udp_socket_for, udp_who};

/// New UDP flows (a fresh socket each) to `target`: backends by name.
pub fn udp_flows(
    lab: &Lab,
    target: SocketAddr,
    flows: usize,
) -> anyhow::Result<BTreeMap<String, usize>> {
    count_flows(lab, flows, |_| {
        let (who, from) = udp_who(&udp_socket_for(target)?, target)?;
        ensure!(from == target, "reply from {from}, expected {target}");
        Ok(who)
    })
}

/// New TCP connections to `target`: backends by name.
pub fn tcp_flows(
    lab: &Lab,
    target: SocketAddr,
    flows: usize,
) -> anyhow::Result<BTreeMap<String, usize>> {
    count_flows(lab, flows, |flow| {
        tcp_who_echo(target, format!("flow {flow}").as_bytes())
    })
}

/// `flows` flows from the client, each made by `flow`: backends by name.
pub fn count_flows(
    lab: &Lab,
    flows: usize,
    flow: impl Fn(usize) -> anyhow::Result<Who> + Send,
) -> anyhow::Result<BTreeMap<String, usize>> {
    lab.client.run(move || {
        let mut counts = BTreeMap::new();
        for index in 0..flows {
            *counts.entry(flow(index)?.name).or_default() += 1;
        }
        Ok(counts)
    })?
}

/// The backends' names in `counts`, in order.
pub fn names(counts: &BTreeMap<String, usize>) -> Vec<&str> {
    counts.keys().map(String::as_str).collect()
}
