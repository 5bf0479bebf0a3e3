//! `xlb flows`: the conntrack table, one line per flow: the tuple the
//! client sent, the tuple after DNAT and masquerade, the service and
//! backend, how old and how idle it is, and its state.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use lb_common::flow::{
    FLOW_S_ASSURED, FLOW_S_CONFIRMED, FLOW_S_FIN_ORIGINAL, FLOW_S_FIN_REPLY, FLOW_S_RST,
    FLOW_S_SEEN_REPLY,
};
use lb_common::{GlobalConfig, IPPROTO_TCP, IPPROTO_UDP};
use serde::Serialize;

use super::table::{self, Align, Table};
use super::{CliError, Report, Session};
use crate::kernel::host;
use crate::observe::catalog::Catalog;
use crate::observe::datapath::FlowEntry;

/// Longest `xlb flows` spends walking conntrack.
const WALK_BUDGET: Duration = Duration::from_secs(10);

#[derive(Debug, Serialize)]
pub struct FlowsReport {
    /// Flows that matched (`--service`), including any past `--limit`.
    pub matched: u64,
    /// Conntrack entries visited (two per flow).
    pub entries: u64,
    /// False when the walk stopped at its time budget.
    pub complete: bool,
    pub flows: Vec<FlowReport>,
}

#[derive(Debug, Serialize)]
pub struct FlowReport {
    /// `TCP` or `UDP`.
    pub protocol: &'static str,
    /// As the client sent it: client -> frontend.
    pub original: Tuple,
    /// As the backend sees it: masquerade address -> backend.
    pub translated: Tuple,
    pub service: Named,
    pub backend: Named,
    pub age_seconds: u64,
    pub idle_seconds: u64,
    /// TCP: `syn_sent`, `syn_received` (the backend answered, the client
    /// has not acknowledged yet), `established`, `closing` (one side sent
    /// FIN), `closed` (both did), `reset`. UDP: `unreplied`, `replied`
    /// (one datagram from the client so far, answered or not), `assured`
    /// (the client sent more: `FLOW_S_ASSURED`).
    pub state: &'static str,
    /// Idle past its timeout: the next sweep deletes it, a new packet
    /// starts a new flow.
    pub expired: bool,
}

#[derive(Debug, Serialize)]
pub struct Tuple {
    pub source: SocketAddr,
    pub destination: SocketAddr,
}

/// An id and what the catalog calls it (`null` if it does not know it).
#[derive(Debug, Serialize)]
pub struct Named {
    pub id: u32,
    pub name: Option<String>,
}

/// Which flows `xlb flows` shows (conntrack-tool style filters; all must
/// hold).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct Filter {
    /// Only flows of this service (`name` or `namespace/name`).
    #[arg(long, value_name = "NAME")]
    pub service: Option<String>,
    /// Only flows to this backend: ADDRESS or ADDRESS:PORT.
    #[arg(long, value_name = "ADDR[:PORT]")]
    pub backend: Option<Endpoint>,
    /// Only flows from this client: ADDRESS or ADDRESS:PORT.
    #[arg(long = "src", value_name = "ADDR[:PORT]")]
    pub source: Option<Endpoint>,
    /// Only flows in this state: TCP syn_sent, syn_received (both
    /// half-open), established, closing, closed, reset; UDP unreplied,
    /// replied, assured; or expired.
    #[arg(long, value_name = "STATE", value_parser = clap::builder::PossibleValuesParser::new(STATES))]
    pub state: Option<String>,
}

/// Every value `--state` takes.
pub const STATES: [&str; 10] = [
    "syn_sent",
    "syn_received",
    "established",
    "closing",
    "closed",
    "reset",
    "unreplied",
    "replied",
    "assured",
    "expired",
];

/// An address with an optional port, as `--backend` and `--src` take them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub address: IpAddr,
    pub port: Option<u16>,
}

impl std::str::FromStr for Endpoint {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if let Ok(socket) = text.parse::<SocketAddr>() {
            return Ok(Endpoint {
                address: socket.ip(),
                port: Some(socket.port()),
            });
        }
        text.parse::<IpAddr>()
            .map(|address| Endpoint {
                address,
                port: None,
            })
            .map_err(|_| {
                format!(
                    "{text:?} is neither ADDRESS nor ADDRESS:PORT (198.18.1.2:3333, [2001:db8::2]:3333)"
                )
            })
    }
}

impl Endpoint {
    fn matches(&self, socket: SocketAddr) -> bool {
        socket.ip() == self.address && self.port.is_none_or(|port| port == socket.port())
    }
}

pub fn report(session: &Session, filter: &Filter, limit: usize) -> Result<FlowsReport, CliError> {
    let wanted = match &filter.service {
        Some(name) => {
            let ids = session.catalog.services_matching(name);
            if ids.is_empty() {
                return Err(CliError::UnknownService {
                    name: name.clone(),
                    catalog: session.catalog_path(),
                });
            }
            Some(ids)
        }
        None => None,
    };
    let limit = if limit == 0 { usize::MAX } else { limit };
    let config = session.maps.global_config().unwrap_or_default();
    let now = host::monotonic_ns();
    let walk = session
        .maps
        .flows(limit, Instant::now() + WALK_BUDGET, |entry| {
            wanted
                .as_ref()
                .is_none_or(|ids| ids.contains(&entry.service_id))
                && filter.backend.is_none_or(|b| b.matches(entry.translated.1))
                && filter.source.is_none_or(|s| s.matches(entry.original.0))
                && filter.state.as_deref().is_none_or(|state| {
                    if state == "expired" {
                        // The ORIGINAL entry's idle time: a lower bound on
                        // the flow's (its reply may be more recent); the
                        // report below says per flow.
                        entry.expired(&config, now)
                    } else {
                        state_name(entry.proto, entry.state) == state
                    }
                })
        });
    let mut flows: Vec<FlowReport> = walk
        .flows
        .iter()
        .map(|entry| describe(entry, &session.catalog, &config, now))
        .collect();
    if filter.state.as_deref() == Some("expired") {
        flows.retain(|flow| flow.expired);
    }
    Ok(FlowsReport {
        matched: walk.matched,
        entries: walk.entries,
        complete: walk.complete,
        flows,
    })
}

fn describe(
    entry: &FlowEntry,
    catalog: &Catalog,
    config: &GlobalConfig,
    now_ns: u64,
) -> FlowReport {
    let seconds = |since: u64| now_ns.saturating_sub(since) / 1_000_000_000;
    FlowReport {
        protocol: protocol_name(entry.proto),
        original: Tuple {
            source: entry.original.0,
            destination: entry.original.1,
        },
        translated: Tuple {
            source: entry.translated.0,
            destination: entry.translated.1,
        },
        service: Named {
            id: entry.service_id,
            name: catalog
                .services
                .get(&entry.service_id)
                .map(|s| s.qualified_name()),
        },
        backend: Named {
            id: entry.backend_id,
            name: catalog
                .backends
                .get(&entry.backend_id)
                .map(|b| b.endpoint()),
        },
        age_seconds: seconds(entry.created_ns),
        idle_seconds: seconds(entry.last_seen_ns),
        state: state_name(entry.proto, entry.state),
        expired: entry.expired(config, now_ns),
    }
}

fn protocol_name(proto: u8) -> &'static str {
    match proto {
        IPPROTO_TCP => "TCP",
        IPPROTO_UDP => "UDP",
        _ => "?",
    }
}

fn state_name(proto: u8, state: u8) -> &'static str {
    if proto != IPPROTO_TCP {
        return if state & FLOW_S_ASSURED != 0 {
            "assured"
        } else if state & FLOW_S_SEEN_REPLY != 0 {
            "replied"
        } else {
            "unreplied"
        };
    }
    let fins = state & (FLOW_S_FIN_ORIGINAL | FLOW_S_FIN_REPLY);
    if state & FLOW_S_RST != 0 {
        "reset"
    } else if fins == FLOW_S_FIN_ORIGINAL | FLOW_S_FIN_REPLY {
        "closed"
    } else if fins != 0 {
        "closing"
    } else if state & FLOW_S_CONFIRMED != 0 {
        "established"
    } else if state & FLOW_S_SEEN_REPLY != 0 {
        "syn_received"
    } else {
        "syn_sent"
    }
}

impl Report for FlowsReport {
    fn render(&self) -> String {
        let mut table = Table::new(&[
            ("PROTO", Align::Left),
            ("CLIENT", Align::Left),
            ("FRONTEND", Align::Left),
            ("MASQUERADED AS", Align::Left),
            ("BACKEND", Align::Left),
            ("SERVICE", Align::Left),
            ("STATE", Align::Left),
            ("AGE", Align::Right),
            ("IDLE", Align::Right),
        ]);
        for flow in &self.flows {
            let mut state = flow.state.to_owned();
            if flow.expired {
                state.push_str(" (expired)");
            }
            table.row(vec![
                flow.protocol.to_owned(),
                flow.original.source.to_string(),
                flow.original.destination.to_string(),
                flow.translated.source.to_string(),
                flow.translated.destination.to_string(),
                flow.service
                    .name
                    .clone()
                    .unwrap_or_else(|| format!("#{}", flow.service.id)),
                state,
                table::duration(flow.age_seconds),
                table::duration(flow.idle_seconds),
            ]);
        }
        let mut out = if self.flows.is_empty() {
            String::from("no flows\n")
        } else {
            table.render()
        };
        let shown = self.flows.len() as u64;
        let mut summary = if shown < self.matched {
            format!(
                "showing {shown} of {} flows (--limit N to see more, 0 for all)",
                self.matched
            )
        } else {
            format!("{} flows", self.matched)
        };
        summary.push_str(&format!(" in {} conntrack entries", self.entries));
        if !self.complete {
            summary.push_str("; the walk stopped at its time budget, there are more");
        }
        out.push_str(&summary);
        out.push('\n');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::catalog::{BackendInfo, BackendState};

    const SECOND: u64 = 1_000_000_000;

    fn socket(text: &str) -> SocketAddr {
        text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn entry(proto: u8, state: u8) -> FlowEntry {
        FlowEntry {
            proto,
            original: (socket("198.18.0.2:40000"), socket("198.18.0.1:30999")),
            translated: (socket("198.18.1.1:61234"), socket("198.18.1.2:3333")),
            backend_id: 1,
            service_id: 7,
            state,
            created_ns: 100 * SECOND,
            last_seen_ns: 160 * SECOND,
        }
    }

    #[test]
    fn tuples_names_and_times() {
        let mut catalog = Catalog::default();
        catalog.backends.insert(
            1,
            BackendInfo {
                address: IpAddr::from([198, 18, 1, 2]),
                port: 3333,
                weight: 1,
                state: BackendState::Ready,
                local: false,
                services: vec![7],
            },
        );
        let config = GlobalConfig::DEFAULT;
        let report = describe(
            &entry(IPPROTO_TCP, FLOW_S_SEEN_REPLY | FLOW_S_CONFIRMED),
            &catalog,
            &config,
            165 * SECOND,
        );
        assert_eq!(report.original.source.to_string(), "198.18.0.2:40000");
        assert_eq!(report.original.destination.to_string(), "198.18.0.1:30999");
        assert_eq!(report.translated.source.to_string(), "198.18.1.1:61234");
        assert_eq!(report.translated.destination.to_string(), "198.18.1.2:3333");
        assert_eq!(report.backend.name.as_deref(), Some("198.18.1.2:3333"));
        assert_eq!(report.service.name, None, "not in the catalog");
        assert_eq!((report.age_seconds, report.idle_seconds), (65, 5));
        assert_eq!(report.state, "established");
        assert!(!report.expired);

        let udp = describe(&entry(IPPROTO_UDP, 0), &catalog, &config, 1000 * SECOND);
        assert_eq!((udp.state, udp.expired), ("unreplied", true));
        let text = FlowsReport {
            matched: 3,
            entries: 6,
            complete: true,
            flows: vec![report, udp],
        }
        .render();
        assert_eq!(
            text,
            "PROTO  CLIENT            FRONTEND          MASQUERADED AS    BACKEND          SERVICE  STATE                    AGE     IDLE\n\
             TCP    198.18.0.2:40000  198.18.0.1:30999  198.18.1.1:61234  198.18.1.2:3333  #7       established           1m 05s       5s\n\
             UDP    198.18.0.2:40000  198.18.0.1:30999  198.18.1.1:61234  198.18.1.2:3333  #7       unreplied (expired)  15m 00s  14m 00s\n\
             showing 2 of 3 flows (--limit N to see more, 0 for all) in 6 conntrack entries\n"
        );
    }

    #[test]
    fn endpoints_take_an_optional_port() {
        let with_port: Endpoint = "198.18.1.2:3333".parse().unwrap();
        assert!(with_port.matches(socket("198.18.1.2:3333")));
        assert!(!with_port.matches(socket("198.18.1.2:3334")));
        let any_port: Endpoint = "198.18.1.2".parse().unwrap();
        assert!(any_port.matches(socket("198.18.1.2:1")));
        assert!(!any_port.matches(socket("198.18.1.3:1")));
        let v6: Endpoint = "[2001:db8:1::2]:3333".parse().unwrap();
        assert!(v6.matches(socket("[2001:db8:1::2]:3333")));
        assert!(!v6.matches(socket("198.18.1.2:3333")));
        let v6_any: Endpoint = "2001:db8:1::2".parse().unwrap();
        assert!(v6_any.matches(socket("[2001:db8:1::2]:9")));
        assert!("backend-1".parse::<Endpoint>().is_err());
    }

    #[test]
    fn tcp_states() {
        let name = |state| state_name(IPPROTO_TCP, state);
        assert_eq!(name(0), "syn_sent");
        assert_eq!(name(FLOW_S_SEEN_REPLY), "syn_received");
        assert_eq!(name(FLOW_S_SEEN_REPLY | FLOW_S_CONFIRMED), "established");
        assert_eq!(name(FLOW_S_SEEN_REPLY | FLOW_S_FIN_REPLY), "closing");
        assert_eq!(
            name(FLOW_S_SEEN_REPLY | FLOW_S_FIN_REPLY | FLOW_S_FIN_ORIGINAL),
            "closed"
        );
        assert_eq!(name(FLOW_S_SEEN_REPLY | FLOW_S_RST), "reset");
    }

    #[test]
    fn udp_states() {
        let name = |state| state_name(IPPROTO_UDP, state);
        assert_eq!(name(FLOW_S_CONFIRMED), "unreplied");
        assert_eq!(name(FLOW_S_CONFIRMED | FLOW_S_SEEN_REPLY), "replied");
        assert_eq!(name(FLOW_S_CONFIRMED | FLOW_S_ASSURED), "assured");
        assert_eq!(
            name(FLOW_S_CONFIRMED | FLOW_S_SEEN_REPLY | FLOW_S_ASSURED),
            "assured"
        );
    }
}
