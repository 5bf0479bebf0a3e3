//! Local pods for `bpf_redirect_peer` (`XLB_PEERS`, `XLB_PEERS6`): for each
//! address (IPv4 or IPv6) of a
//! pod on this node, the host side of its veth and the MACs its frames need,
//! so XDP on the uplink hands its frames to tc for a redirect straight into
//! the pod's namespace (README "Hooks").
//!
//! Read from the kernel's own tables with iproute2, as the FIB sees them:
//! a neighbour (pod address -> pod MAC) on a veth whose peer is in another
//! namespace is a routed CNI's pod (Calico: /32 route via the veth); one on
//! a bridge is a bridge CNI's pod, whose port is the bridge FDB's entry for
//! the pod's MAC (`bridge fdb`), when that port is such a veth. Pods whose
//! neighbour is not resolved yet are left out: XDP then hands their frames
//! to `bpf_redirect_neigh` (which resolves it), and the next event adds
//! them. Kept current at every neighbour, FDB or link event (a pod's veth
//! going flushes its neighbours and FDB entries), at most every
//! `MIN_GAP`, and every `SCAN` as a safety net.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::IpAddr;
use std::time::Duration;

use aya::maps::{HashMap as BpfHashMap, MapData};
use lb_common::{Peer, family::addr6};
use serde::Deserialize;
use tokio::time::{Instant, sleep_until};

use super::Datapath;
use super::linkwatch::{LinkWatch, RTM_DELLINK, RTM_DELNEIGH, RTM_NEWLINK, RTM_NEWNEIGH};

/// Least time between two reads of the host's tables: a busy node's
/// neighbours change state often.
const MIN_GAP: Duration = Duration::from_millis(200);
/// Read them at least this often, events or not.
const SCAN: Duration = Duration::from_secs(10);

/// rtnetlink messages that may change a peer: neighbours and FDB entries
/// (RTMGRP_NEIGH), and links (a veth going, a port leaving its bridge).
const KINDS: &[u16] = &[RTM_NEWNEIGH, RTM_DELNEIGH, RTM_NEWLINK, RTM_DELLINK];

/// A local pod as found: where the peer path sends its frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalPod {
    pub veth: u32,
    pub route: u32,
    pub pod_mac: [u8; 6],
    pub gateway_mac: [u8; 6],
}

impl LocalPod {
    fn entry(self) -> Peer {
        Peer {
            ifindex: self.veth,
            route_ifindex: self.route,
            dst_mac: self.pod_mac,
            src_mac: self.gateway_mac,
        }
    }
}

/// Keeps `XLB_PEERS` and `XLB_PEERS6` equal to the local pods the host's
/// tables show.
pub struct PeerWatch {
    watch: Option<LinkWatch>,
    /// What the maps hold.
    written: BTreeMap<IpAddr, LocalPod>,
    /// An event was seen (or nothing was read yet) and not acted on.
    pending: bool,
    next_read: Instant,
}

impl PeerWatch {
    /// Subscribes to neighbour and link events (without them, reads every
    /// `SCAN`). Call inside the tokio runtime.
    pub fn open() -> PeerWatch {
        let groups = (libc::RTMGRP_NEIGH | libc::RTMGRP_LINK) as u32;
        let watch = LinkWatch::open_for(groups, KINDS)
            .inspect_err(|error| {
                log::warn!(
                    "cannot watch neighbour events (rtnetlink): {error}; local pods for \
                     bpf_redirect_peer are looked up every {} s",
                    SCAN.as_secs()
                );
            })
            .ok();
        PeerWatch {
            watch,
            written: BTreeMap::new(),
            pending: true,
            next_read: Instant::now(),
        }
    }

    /// Waits until the tables should be read again. Cancel-safe: an event
    /// seen by a call that is dropped is acted on by the next.
    pub async fn due(&mut self) {
        if !self.pending {
            let scan = sleep_until(self.next_read + SCAN);
            let failed = match &self.watch {
                Some(watch) => tokio::select! {
                    changed = watch.changed() => changed.err(),
                    () = scan => None,
                },
                None => {
                    scan.await;
                    None
                }
            };
            if let Some(error) = failed {
                log::warn!(
                    "neighbour watch failed: {error}; local pods are looked up every {} s",
                    SCAN.as_secs()
                );
                self.watch = None;
            }
            self.pending = true;
        }
        sleep_until(self.next_read).await;
    }

    /// Reads the host's tables and writes the differences into `XLB_PEERS`
    /// and `XLB_PEERS6` of `datapath` (the veths it runs XDP on are
    /// uplinks, not pods).
    pub fn sync(&mut self, datapath: &mut Datapath) {
        self.pending = false;
        self.next_read = Instant::now() + MIN_GAP;
        let uplinks: BTreeSet<String> = datapath.interfaces().into_iter().collect();
        let found = match local_pods(&uplinks) {
            Ok(found) => found,
            Err(error) => {
                log::warn!("cannot list local pods for bpf_redirect_peer: {error}");
                return;
            }
        };
        let written = &mut self.written;
        sync_family(
            datapath,
            lb_common::maps::PEERS,
            &found,
            written,
            |address| match address {
                IpAddr::V4(address) => Some(u32::from_ne_bytes(address.octets())),
                IpAddr::V6(_) => None,
            },
        );
        sync_family(
            datapath,
            lb_common::maps::PEERS6,
            &found,
            written,
            |address| match address {
                IpAddr::V6(address) => Some(addr6(address.octets())),
                IpAddr::V4(_) => None,
            },
        );
    }
}

/// `PeerWatch::sync` for the map `name`, which holds the addresses `key`
/// turns into its keys (the others are the other family's).
fn sync_family<K: aya::Pod>(
    datapath: &mut Datapath,
    name: &str,
    found: &BTreeMap<IpAddr, (LocalPod, String)>,
    written: &mut BTreeMap<IpAddr, LocalPod>,
    key: impl Fn(&IpAddr) -> Option<K>,
) {
    let Some(map) = datapath.ebpf.map_mut(name) else {
        return;
    };
    let mut map: BpfHashMap<&mut MapData, K, Peer> = match BpfHashMap::try_from(map) {
        Ok(map) => map,
        Err(error) => {
            log::warn!("{name}: {error}");
            return;
        }
    };
    for (address, (pod, how)) in found {
        let Some(map_key) = key(address) else {
            continue;
        };
        if written.get(address) == Some(pod) {
            continue;
        }
        match map.insert(map_key, pod.entry(), 0) {
            Ok(()) => {
                log::info!("local pod {address}: bpf_redirect_peer via {how}");
                written.insert(*address, *pod);
            }
            Err(error) => log::warn!(
                "local pod {address}: cannot add it to {name} ({error}); its packets go \
                 through bpf_redirect_neigh"
            ),
        }
    }
    let gone: Vec<(IpAddr, K)> = written
        .keys()
        .filter(|address| !found.contains_key(address))
        .filter_map(|address| Some((*address, key(address)?)))
        .collect();
    for (address, map_key) in gone {
        match map.remove(&map_key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {
                log::info!("local pod {address}: gone from this node's tables");
                written.remove(&address);
            }
            Err(error) => log::warn!("local pod {address}: cannot remove it: {error}"),
        }
    }
}

/// The local pods, with how each was found (for the log), from the host's
/// links, IPv4 and IPv6 neighbours and bridge FDB.
fn local_pods(uplinks: &BTreeSet<String>) -> io::Result<BTreeMap<IpAddr, (LocalPod, String)>> {
    let links = run(&["ip", "-json", "-details", "link", "show"])?;
    let neighbours = run(&["ip", "-json", "neigh", "show"])?;
    let fdb = run(&["bridge", "-json", "fdb", "show"])?;
    pods_from(&links, &neighbours, &fdb, uplinks).map_err(io::Error::other)
}

fn run(command: &[&str]) -> io::Result<Vec<u8>> {
    let output = std::process::Command::new(command[0])
        .args(&command[1..])
        .stdin(std::process::Stdio::null())
        .output()?;
    if !output.status.success() {
        return Err(io::Error::other(format!(
            "`{}` failed: {}",
            command.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(output.stdout)
}

#[derive(Deserialize)]
struct RawInfo {
    info_kind: Option<String>,
}

#[derive(Deserialize)]
struct RawLink {
    ifname: String,
    ifindex: u32,
    address: Option<String>,
    link_netnsid: Option<i64>,
    linkinfo: Option<RawInfo>,
}

#[derive(Deserialize)]
struct RawNeighbour {
    dst: String,
    dev: String,
    lladdr: Option<String>,
    #[serde(default)]
    state: Vec<String>,
}

#[derive(Deserialize)]
struct RawFdb {
    mac: String,
    ifname: String,
    master: Option<String>,
    #[serde(default)]
    flags: Vec<String>,
    #[serde(default)]
    state: String,
}

fn mac(text: &str) -> Option<[u8; 6]> {
    let mut bytes = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut bytes {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(bytes)
}

/// `local_pods` on the commands' JSON.
fn pods_from(
    links: &[u8],
    neighbours: &[u8],
    fdb: &[u8],
    uplinks: &BTreeSet<String>,
) -> Result<BTreeMap<IpAddr, (LocalPod, String)>, serde_json::Error> {
    let links: Vec<RawLink> = serde_json::from_slice(links)?;
    let neighbours: Vec<RawNeighbour> = serde_json::from_slice(neighbours)?;
    let fdb: Vec<RawFdb> = serde_json::from_slice(fdb)?;
    let by_name: BTreeMap<&str, &RawLink> = links
        .iter()
        .map(|link| (link.ifname.as_str(), link))
        .collect();
    // A pod's host side: a veth whose other end is in another namespace
    // (`bpf_redirect_peer` refuses one in the same), not an uplink.
    let pod_veth = |name: &str| {
        by_name.get(name).copied().filter(|link| {
            link.linkinfo
                .as_ref()
                .and_then(|info| info.info_kind.as_deref())
                == Some("veth")
                && link.link_netnsid.is_some()
                && !uplinks.contains(&link.ifname)
        })
    };
    let mut pods = BTreeMap::new();
    for neighbour in &neighbours {
        let unusable = ["FAILED", "INCOMPLETE", "NOARP"];
        if neighbour
            .state
            .iter()
            .any(|state| unusable.contains(&state.as_str()))
        {
            continue;
        }
        let (Ok(address), Some(pod_mac)) = (
            neighbour.dst.parse::<IpAddr>(),
            neighbour.lladdr.as_deref().and_then(mac),
        ) else {
            continue;
        };
        // A pod's link-local address is no backend's.
        if let IpAddr::V6(v6) = address
            && v6.is_unicast_link_local()
        {
            continue;
        }
        let Some(device) = by_name.get(neighbour.dev.as_str()) else {
            continue;
        };
        let Some(gateway_mac) = device.address.as_deref().and_then(mac) else {
            continue;
        };
        let (veth, how) = if let Some(veth) = pod_veth(&device.ifname) {
            (veth, format!("{} (routed)", veth.ifname))
        } else {
            // A bridge's port for the pod's MAC: a learned entry, not the
            // port's own (permanent) nor the device's (self).
            let port = fdb.iter().find(|entry| {
                entry.master.as_deref() == Some(device.ifname.as_str())
                    && mac(&entry.mac) == Some(pod_mac)
                    && entry.state != "permanent"
                    && !entry.flags.iter().any(|flag| flag == "self")
            });
            let Some(veth) = port.and_then(|port| pod_veth(&port.ifname)) else {
                continue;
            };
            (veth, format!("{} (port of {})", veth.ifname, device.ifname))
        };
        let pod = LocalPod {
            veth: veth.ifindex,
            route: device.ifindex,
            pod_mac,
            gateway_mac,
        };
        pods.insert(address, (pod, how));
    }
    Ok(pods)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINKS: &[u8] = br#"[
        {"ifindex":2,"ifname":"xlb-up","address":"02:00:00:00:00:01","link_netnsid":0,"linkinfo":{"info_kind":"veth"}},
        {"ifindex":3,"ifname":"cni0","address":"02:00:00:00:00:03","linkinfo":{"info_kind":"bridge"}},
        {"ifindex":4,"ifname":"xlb-vb0","address":"02:00:00:00:00:04","master":"cni0","link_netnsid":1,"linkinfo":{"info_kind":"veth","info_slave_kind":"bridge"}},
        {"ifindex":5,"ifname":"xlb-vr0","address":"ee:ee:ee:ee:ee:ee","link_netnsid":2,"linkinfo":{"info_kind":"veth"}},
        {"ifindex":6,"ifname":"local-a","address":"02:00:00:00:00:06","linkinfo":{"info_kind":"veth"}}
    ]"#;
    const NEIGHBOURS: &[u8] = br#"[
        {"dst":"198.18.10.2","dev":"cni0","lladdr":"0a:00:00:00:10:02","state":["REACHABLE"]},
        {"dst":"198.18.10.3","dev":"cni0","lladdr":"0a:00:00:00:10:03","state":["STALE"]},
        {"dst":"198.18.11.2","dev":"xlb-vr0","lladdr":"0a:00:00:00:11:02","state":["DELAY"]},
        {"dst":"198.18.11.3","dev":"xlb-vr0","state":["FAILED"]},
        {"dst":"198.18.0.2","dev":"xlb-up","lladdr":"0a:00:00:00:00:02","state":["REACHABLE"]},
        {"dst":"198.18.12.2","dev":"local-a","lladdr":"0a:00:00:00:12:02","state":["REACHABLE"]},
        {"dst":"2001:db8:10::2","dev":"cni0","lladdr":"0a:00:00:00:10:02","state":["REACHABLE"]},
        {"dst":"2001:db8:11::2","dev":"xlb-vr0","lladdr":"0a:00:00:00:11:02","state":["STALE"]},
        {"dst":"fe80::800:ff:fe00:1102","dev":"xlb-vr0","lladdr":"0a:00:00:00:11:02","state":["STALE"]}
    ]"#;
    const FDB: &[u8] = br#"[
        {"mac":"33:33:00:00:00:01","ifname":"cni0","flags":["self"],"state":"permanent"},
        {"mac":"0a:00:00:00:10:02","ifname":"xlb-vb0","flags":[],"master":"cni0","state":""},
        {"mac":"02:00:00:00:00:04","ifname":"xlb-vb0","flags":[],"master":"cni0","state":"permanent"}
    ]"#;

    #[test]
    fn bridge_and_routed_pods_from_the_tables() {
        let uplinks = BTreeSet::from([String::from("xlb-up")]);
        let pods = pods_from(LINKS, NEIGHBOURS, FDB, &uplinks).map_err(|e| e.to_string());
        let pods: Vec<(IpAddr, LocalPod, String)> = pods
            .unwrap_or_default()
            .into_iter()
            .map(|(address, (pod, how))| (address, pod, how))
            .collect();
        let bridge = LocalPod {
            veth: 4,
            route: 3,
            pod_mac: [0x0a, 0, 0, 0, 0x10, 0x02],
            gateway_mac: [2, 0, 0, 0, 0, 3],
        };
        let routed = LocalPod {
            veth: 5,
            route: 5,
            pod_mac: [0x0a, 0, 0, 0, 0x11, 0x02],
            gateway_mac: [0xee; 6],
        };
        let (bridge_how, routed_how) = (
            String::from("xlb-vb0 (port of cni0)"),
            String::from("xlb-vr0 (routed)"),
        );
        let ip = |text: &str| text.parse::<IpAddr>().expect("an address");
        assert_eq!(
            pods,
            [
                (ip("198.18.10.2"), bridge, bridge_how.clone()),
                (ip("198.18.11.2"), routed, routed_how.clone()),
                (ip("2001:db8:10::2"), bridge, bridge_how),
                (ip("2001:db8:11::2"), routed, routed_how),
            ]
        );
        // Left out: a bridge neighbour without a learned port (10.3), an
        // unresolved neighbour (11.3), the uplink's (0.2), a veth whose
        // other end is in this namespace (12.2), a pod's link-local
        // address (fe80::).
    }

    #[test]
    fn macs_parse_strictly() {
        assert_eq!(mac("0a:0b:0c:0d:0e:ff"), Some([10, 11, 12, 13, 14, 255]));
        assert_eq!(mac("0a:0b:0c:0d:0e"), None);
        assert_eq!(mac("0a:0b:0c:0d:0e:0f:10"), None);
        assert_eq!(mac("zz:0b:0c:0d:0e:0f"), None);
    }
}
