//! `xlb status`: is an agent running, where is XDP attached and in which
//! mode, which program, which config generation, how full are the maps.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use lb_common::maps as names;
use serde::Serialize;

use super::table::{self, Align, Table};
use super::{CliError, Report, Session};
use crate::observe::datapath::{self, Count};
use crate::observe::rundir::{self, PortRange, Reload};

/// Longest `xlb status` spends counting map entries.
const COUNT_BUDGET: Duration = Duration::from_secs(5);

#[derive(Debug, Serialize)]
pub struct StatusReport {
    pub agent: AgentReport,
    pub interfaces: Vec<InterfaceReport>,
    /// Socket hooks: as the agent reported them, or pinned under
    /// `bpffs/cgroup/`.
    pub socket_hooks: SocketHooksReport,
    /// The XDP program's kernel id (from a pinned link if there is one,
    /// else as the agent reported it).
    pub program_id: Option<u32>,
    pub conntrack: Fill,
    pub maps: Vec<Fill>,
    pub masquerade: Masquerade,
    pub bpffs: String,
    pub run_dir: String,
}

#[derive(Debug, Serialize)]
pub struct AgentReport {
    pub running: bool,
    pub pid: Option<u32>,
    pub version: Option<String>,
    /// Unix seconds.
    pub started_at: Option<u64>,
    pub uptime_seconds: Option<u64>,
    pub ready: bool,
    pub config_source: Option<String>,
    pub generation: Option<u64>,
    pub last_reload: Option<Reload>,
    pub metrics_addr: Option<String>,
    pub datapath_debug: bool,
}

#[derive(Debug, Serialize)]
pub struct InterfaceReport {
    pub name: String,
    pub ifindex: Option<u32>,
    /// `native` or `generic`, as attached; `tcx ingress` / `clsact ingress`
    /// for tc attach points.
    pub mode: Option<String>,
    /// Why the agent attached there (empty when unknown).
    pub why: String,
    /// A link is pinned for it under `bpffs/links/`.
    pub link_pinned: bool,
    /// The program that link runs.
    pub program_id: Option<u32>,
}

#[derive(Debug, Serialize)]
pub struct SocketHooksReport {
    /// The cgroup v2 directory they are attached to (from status.json).
    pub cgroup: Option<String>,
    /// Attached hooks (`connect4`, ...).
    pub hooks: Vec<String>,
    /// Hooks with a link pinned under `bpffs/cgroup/`.
    pub pinned: Vec<String>,
}

/// How full one map is.
#[derive(Debug, Serialize)]
pub struct Fill {
    pub map: &'static str,
    pub entries: u64,
    pub capacity: u32,
    /// False when counting stopped at the time budget (`entries` is then a
    /// lower bound).
    pub complete: bool,
}

#[derive(Debug, Serialize)]
pub struct Masquerade {
    pub ports: Option<PortRange>,
    /// Source address per egress interface.
    pub addresses: Vec<MasqueradeAddress>,
}

#[derive(Debug, Serialize)]
pub struct MasqueradeAddress {
    pub ifindex: u32,
    /// The interface's name, if this namespace has it.
    pub interface: Option<String>,
    pub address: IpAddr,
}

pub fn report(session: &Session) -> Result<StatusReport, CliError> {
    let status = session.status.as_ref();
    let links = datapath::pinned_links(&session.bpffs);
    let program_id = links
        .iter()
        .find_map(|(_, id)| *id)
        .or_else(|| status.and_then(|s| s.program_id));
    let (conntrack, maps) = fills(session);
    let interface_names = interface_names();
    Ok(StatusReport {
        agent: agent_report(session),
        interfaces: interfaces_report(session, &links),
        socket_hooks: SocketHooksReport {
            cgroup: status
                .and_then(|s| s.socket_hooks.as_ref())
                .map(|h| h.cgroup.clone()),
            hooks: status
                .and_then(|s| s.socket_hooks.as_ref())
                .map(|h| h.hooks.clone())
                .unwrap_or_default(),
            pinned: crate::kernel::PinDir::at(&session.bpffs)
                .pinned_cgroup_links()
                .unwrap_or_default(),
        },
        program_id,
        conntrack,
        maps,
        masquerade: Masquerade {
            ports: status.map(|s| s.masquerade_ports),
            addresses: status
                .into_iter()
                .flat_map(|s| {
                    let v4 = s.masquerade_addresses.iter();
                    let v4 = v4.map(|(&ifindex, &address)| (ifindex, IpAddr::V4(address)));
                    let v6 = s.masquerade_addresses6.iter();
                    v4.chain(v6.map(|(&ifindex, &address)| (ifindex, IpAddr::V6(address))))
                })
                .map(|(ifindex, address)| MasqueradeAddress {
                    ifindex,
                    interface: interface_names.get(&ifindex).cloned(),
                    address,
                })
                .collect(),
        },
        bpffs: session.bpffs.display().to_string(),
        run_dir: session.run_dir.display().to_string(),
    })
}

/// The agent as status.json and its process say.
fn agent_report(session: &Session) -> AgentReport {
    let status = session.status.as_ref();
    let now = rundir::unix_now();
    AgentReport {
        running: session.alive,
        pid: status.map(|s| s.pid),
        version: status.map(|s| s.version.clone()),
        started_at: status.map(|s| s.started_at),
        uptime_seconds: status
            .filter(|_| session.alive)
            .map(|s| now.saturating_sub(s.started_at)),
        ready: session.alive && status.is_some_and(|s| s.ready),
        config_source: status.map(|s| s.config_source.clone()),
        generation: status.map(|s| s.generation),
        last_reload: status.and_then(|s| s.last_reload.clone()),
        metrics_addr: status.and_then(|s| s.metrics_addr.clone()),
        datapath_debug: status.is_some_and(|s| s.datapath_debug),
    }
}

/// The interfaces status.json names, and those with a pinned link the
/// agent no longer reports.
fn interfaces_report(session: &Session, links: &[(String, Option<u32>)]) -> Vec<InterfaceReport> {
    let status = session.status.as_ref();
    let mut interfaces: Vec<InterfaceReport> = status
        .map(|s| s.interfaces.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|interface| InterfaceReport {
            name: interface.name.clone(),
            ifindex: Some(interface.ifindex),
            mode: Some(interface.mode.clone()),
            why: interface.why.clone(),
            link_pinned: false,
            program_id: None,
        })
        .collect();
    for (name, program_id) in links {
        match interfaces.iter_mut().find(|i| &i.name == name) {
            Some(interface) => {
                interface.link_pinned = true;
                interface.program_id = *program_id;
            }
            None => interfaces.push(InterfaceReport {
                name: name.clone(),
                ifindex: None,
                mode: None,
                why: String::new(),
                link_pinned: true,
                program_id: *program_id,
            }),
        }
    }
    // tc attach points: their tcx links are pinned under tc/<role>-<name>.
    let pins = crate::kernel::PinDir::at(&session.bpffs);
    for interface in interfaces.iter_mut().filter(|i| !i.link_pinned) {
        let is_tc = interface
            .mode
            .as_deref()
            .is_some_and(|mode| mode.starts_with("tcx"));
        if is_tc && pins.tc_link("pod", &interface.name).exists() {
            interface.link_pinned = true;
        }
    }
    interfaces
}

/// How full conntrack and the other maps are (counted within
/// `COUNT_BUDGET`).
fn fills(session: &Session) -> (Fill, Vec<Fill>) {
    let maps = &session.maps;
    let deadline = Instant::now() + COUNT_BUDGET;
    let fill = |map: &'static str, count: Count| Fill {
        map,
        entries: count.entries,
        capacity: maps.capacity(map),
        complete: count.complete,
    };
    let conntrack = fill(names::FLOWS, maps.count_flows(deadline));
    let backends = Count {
        entries: session.catalog.backends.len() as u64,
        complete: session.has_catalog,
    };
    let fills = vec![
        fill(names::SERVICES, maps.count_services(deadline)),
        fill(names::BACKENDS, backends),
        fill(names::AFFINITY, maps.count_affinity(deadline)),
    ];
    (conntrack, fills)
}

impl Report for StatusReport {
    fn render(&self) -> String {
        let mut out = String::new();
        self.summary(&mut out);
        out.push('\n');
        out.push_str(&self.interface_table());
        out.push('\n');
        out.push_str(&self.map_table());
        out
    }
}

impl StatusReport {
    /// One line each: the agent, its config, program, masquerade, metrics,
    /// pins and socket hooks.
    fn summary(&self, out: &mut String) {
        let agent = &self.agent;
        let mut line = |key: &str, value: String| {
            let _ = writeln!(out, "{key:<11} {value}");
        };
        let who = match (agent.pid, &agent.version) {
            (Some(pid), Some(version)) => format!("pid {pid}, xlb {version}"),
            (Some(pid), None) => format!("pid {pid}"),
            _ => String::from("no status.json"),
        };
        line(
            "agent",
            if agent.running {
                format!(
                    "running ({who}), up {}, {}",
                    table::duration(agent.uptime_seconds.unwrap_or(0)),
                    if agent.ready { "ready" } else { "not ready" }
                )
            } else {
                format!("not running ({who}); the pinned maps outlived it")
            },
        );
        if let Some(config) = self.config_line() {
            line("config", config);
        }
        line(
            "program",
            match self.program_id {
                Some(id) => format!(
                    "XDP program id {id}{}",
                    if agent.datapath_debug {
                        ", datapath debug logs on"
                    } else {
                        ""
                    }
                ),
                None => String::from("unknown"),
            },
        );
        if let Some(masquerade) = self.masquerade_line() {
            line("masquerade", masquerade);
        }
        if let Some(address) = &agent.metrics_addr {
            line("metrics", format!("http://{address}/metrics"));
        }
        line("pins", format!("{} (run dir {})", self.bpffs, self.run_dir));
        line("sockets", self.sockets_line());
    }

    fn interface_table(&self) -> String {
        let mut interfaces = Table::new(&[
            ("INTERFACE", Align::Left),
            ("IFINDEX", Align::Right),
            ("MODE", Align::Left),
            ("LINK PIN", Align::Left),
            ("PROGRAM", Align::Right),
            ("WHY", Align::Left),
        ]);
        for interface in &self.interfaces {
            interfaces.row(vec![
                interface.name.clone(),
                optional(interface.ifindex),
                interface.mode.clone().unwrap_or_else(|| String::from("-")),
                String::from(if interface.link_pinned { "yes" } else { "no" }),
                optional(interface.program_id),
                if interface.why.is_empty() {
                    String::from("-")
                } else {
                    interface.why.clone()
                },
            ]);
        }
        if interfaces.is_empty() {
            String::from("XDP is attached to no interface\n")
        } else {
            interfaces.render()
        }
    }

    fn map_table(&self) -> String {
        let mut maps = Table::new(&[
            ("MAP", Align::Left),
            ("ENTRIES", Align::Right),
            ("CAPACITY", Align::Right),
            ("FILL", Align::Right),
            ("", Align::Left),
        ]);
        for fill in std::iter::once(&self.conntrack).chain(&self.maps) {
            let mut note = String::new();
            if fill.map == names::FLOWS {
                note = format!("conntrack, {} flows", fill.entries / 2);
            }
            if !fill.complete {
                note.push_str(if note.is_empty() { "" } else { "; " });
                note.push_str("counting stopped early: at least this many");
            }
            let entries = if fill.complete {
                fill.entries.to_string()
            } else {
                format!(">={}", fill.entries)
            };
            maps.row(vec![
                fill.map.to_owned(),
                entries,
                fill.capacity.to_string(),
                table::percent(fill.entries, u64::from(fill.capacity)),
                note,
            ]);
        }
        maps.render()
    }

    /// The config source and generation, and how the last reload went.
    fn config_line(&self) -> Option<String> {
        let agent = &self.agent;
        let source = agent.config_source.as_ref()?;
        let mut config = format!("{source}, generation {}", agent.generation.unwrap_or(0));
        if let Some(reload) = &agent.last_reload {
            let ago = table::duration(rundir::unix_now().saturating_sub(reload.at));
            match &reload.error {
                None if reload.ok => {
                    let _ = write!(config, "; last reload ok {ago} ago");
                }
                error => {
                    let _ = write!(
                        config,
                        "; last reload FAILED {ago} ago (kept generation {}): {}",
                        reload.generation,
                        error.as_deref().unwrap_or("unknown error")
                    );
                }
            }
        }
        Some(config)
    }

    /// The masquerade ports and the addresses per interface.
    fn masquerade_line(&self) -> Option<String> {
        let ports = self.masquerade.ports?;
        let mut masquerade = format!("ports {}-{}", ports.first, ports.last);
        let addresses: Vec<String> = self
            .masquerade
            .addresses
            .iter()
            .map(|masquerade| match &masquerade.interface {
                Some(name) => format!("{} on {name}", masquerade.address),
                // Key 0: the fallback for interfaces without an address.
                None if masquerade.ifindex == 0 => {
                    format!("{} elsewhere", masquerade.address)
                }
                None => format!("{} on ifindex {}", masquerade.address, masquerade.ifindex),
            })
            .collect();
        if !addresses.is_empty() {
            let _ = write!(masquerade, " from {}", addresses.join(", "));
        }
        Some(masquerade)
    }

    fn sockets_line(&self) -> String {
        let hooks = &self.socket_hooks;
        match (
            &hooks.cgroup,
            hooks.hooks.is_empty(),
            hooks.pinned.is_empty(),
        ) {
            (Some(cgroup), false, _) => format!(
                "{} attached to cgroup {cgroup}{}",
                hooks.hooks.join(", "),
                if hooks.pinned.is_empty() {
                    ""
                } else {
                    " (pinned)"
                }
            ),
            (_, _, false) => format!("{} pinned (cgroup unknown)", hooks.pinned.join(", ")),
            _ => String::from("off (no --cgroup): local clients are not balanced"),
        }
    }
}

/// Interface names by index, as /sys/class/net of this namespace says.
fn interface_names() -> BTreeMap<u32, String> {
    let Ok(entries) = std::fs::read_dir("/sys/class/net") else {
        return BTreeMap::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let index = std::fs::read_to_string(entry.path().join("ifindex")).ok()?;
            Some((index.trim().parse().ok()?, name))
        })
        .collect()
}

fn optional(value: Option<u32>) -> String {
    value.map_or_else(|| String::from("-"), |v| v.to_string())
}
