//! Managed neighbours: the kernel keeps the next hop of every backend
//! (IPv4 and IPv6) resolved, so the datapath's FIB lookup finds a MAC address instead of
//! dropping with `drop_no_neighbour`. Done with iproute2 (`ip route get`,
//! `ip neigh replace ... managed`), which every node has, in batch mode: one
//! `ip` for all new backends' routes and one for their distinct next hops,
//! however many backends a reconcile brings (spawning two per backend made
//! 100,000 backends take five minutes). `NeighbourWorker` runs all of it on
//! a thread of its own, so a reconcile never waits for iproute2: managed
//! neighbours resolve in the background anyway, and until one does the
//! datapath counts `drop_no_neighbour` for that backend alone.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write as _;
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, Receiver, Sender};

/// Backends per `ip -batch` run: bounds one run's time and memory, and lets
/// a newer request be noticed between chunks.
const CHUNK: usize = 2_000;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum NeighbourError {
    #[error("cannot run `{command}`: {source}; is iproute2 installed?")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed: {stderr}")]
    Failed { command: String, stderr: String },
    #[error("cannot read the output of `{command}`: {reason}")]
    Output { command: String, reason: String },
}

/// Where packets to a backend go next.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct NextHop {
    pub address: IpAddr,
    pub device: String,
}

/// Remembers which backends already have a managed neighbour so that a
/// reconcile runs iproute2 only for new ones.
#[derive(Debug, Default)]
pub struct Neighbours {
    done: BTreeSet<IpAddr>,
    /// Backends whose failure was already reported (retried quietly).
    failed: BTreeSet<IpAddr>,
}

impl Neighbours {
    /// Makes the next hop of every backend in `backends` a managed
    /// neighbour. Failures come back as warnings, and are retried next time.
    pub fn ensure(&mut self, backends: &BTreeSet<IpAddr>) -> Vec<String> {
        let mut warnings = Vec::new();
        let new: Vec<IpAddr> = backends.difference(&self.done).copied().collect();
        for chunk in new.chunks(CHUNK) {
            match resolve(chunk) {
                Ok(outcomes) => {
                    for (backend, outcome) in outcomes {
                        self.record(backend, outcome, &mut warnings);
                    }
                }
                Err(error) => {
                    for &backend in chunk {
                        self.record(backend, Err(error.to_string()), &mut warnings);
                    }
                }
            }
        }
        // Backends that left are forgotten, so they are redone if they return.
        self.done.retain(|address| backends.contains(address));
        self.failed.retain(|address| backends.contains(address));
        warnings
    }

    fn record(&mut self, backend: IpAddr, outcome: Outcome, warnings: &mut Vec<String>) {
        match outcome {
            Ok(Some(hop)) => {
                log::debug!(
                    "backend {backend}: next hop {} on {} is a managed neighbour",
                    hop.address,
                    hop.device
                );
                self.done.insert(backend);
                self.failed.remove(&backend);
            }
            Ok(None) => {
                log::debug!("backend {backend} is local; no neighbour to manage");
                self.done.insert(backend);
                self.failed.remove(&backend);
            }
            Err(error) => {
                let message = format!(
                    "backend {backend}: cannot keep its next hop resolved ({error}); packets \
                     to it may be dropped as drop_no_neighbour until the kernel resolves it"
                );
                if self.failed.insert(backend) {
                    warnings.push(message);
                } else {
                    log::debug!("{message}");
                }
            }
        }
    }

    /// Redo every backend on the next `ensure` (routes may have moved).
    pub fn forget(&mut self) {
        self.done.clear();
        self.failed.clear();
    }
}

/// What the agent asks of the neighbour thread.
enum Request {
    /// Make these backends' next hops managed neighbours.
    Ensure(BTreeSet<IpAddr>),
    /// Redo every backend on the next `Ensure` (routes may have moved).
    Forget,
}

/// `Neighbours` on a thread of its own. Requests queue up; the thread
/// coalesces them (only the newest backend set matters) and reports
/// failures in the log. While it works, `steps` shows it as running, so a
/// stuck `ip` shows in `/readyz`.
pub struct NeighbourWorker {
    requests: Sender<Request>,
}

impl NeighbourWorker {
    /// Starts the thread; `busy` is told when a pass starts and ends.
    pub fn start(busy: impl Fn(bool) + Send + 'static) -> Self {
        let (requests, queue) = mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name(String::from("xlb-neighbours"))
            .spawn(move || serve(&queue, &busy));
        if let Err(error) = spawned {
            log::warn!("cannot start the neighbour thread ({error}); next hops resolve on demand");
        }
        Self { requests }
    }

    /// Queues `backends` (the whole current set); returns at once.
    pub fn ensure(&self, backends: BTreeSet<IpAddr>) {
        let _ = self.requests.send(Request::Ensure(backends));
    }

    /// Queues a redo of every backend with the next `ensure`.
    pub fn forget(&self) {
        let _ = self.requests.send(Request::Forget);
    }
}

fn serve(queue: &Receiver<Request>, busy: &dyn Fn(bool)) {
    let mut neighbours = Neighbours::default();
    while let Ok(first) = queue.recv() {
        let mut wanted = None;
        for request in std::iter::once(first).chain(queue.try_iter()) {
            match request {
                Request::Ensure(backends) => wanted = Some(backends),
                Request::Forget => neighbours.forget(),
            }
        }
        let Some(backends) = wanted else {
            continue;
        };
        busy(true);
        for warning in neighbours.ensure(&backends) {
            log::warn!("{warning}");
        }
        busy(false);
    }
}

/// A backend's next hop (`None`: local, nothing to manage) or why not.
type Outcome = Result<Option<NextHop>, String>;

/// Finds every backend's next hop (one `ip -batch` of `route get`s) and
/// makes each distinct one a managed neighbour (one `ip -batch` of `neigh
/// replace`s). Per-backend outcomes; `Err` only if `ip` cannot run at all.
fn resolve(backends: &[IpAddr]) -> Result<Vec<(IpAddr, Outcome)>, NeighbourError> {
    let lookups: String = backends
        .iter()
        .map(|backend| format!("route get {backend}\n"))
        .collect();
    let (stdout, _) = batch(&["-force", "-j", "-batch", "-"], &lookups)?;
    let routes = routes_by_destination(&stdout);
    let mut outcomes = Vec::with_capacity(backends.len());
    let mut hops: BTreeMap<NextHop, Vec<IpAddr>> = BTreeMap::new();
    for &backend in backends {
        match routes.get(&backend) {
            None => outcomes.push((backend, Err(String::from("ip route get found no route")))),
            Some(route) => match hop_of(backend, route) {
                Ok(Some(hop)) => hops.entry(hop).or_default().push(backend),
                other => outcomes.push((backend, other.map_err(|e| e.to_string()))),
            },
        }
    }
    // A static (permanent) entry is resolved for good already; replacing
    // it with a managed one would drop its address where the kernel cannot
    // resolve one (no link-local address for IPv6's solicitations).
    let permanent = permanent_neighbours();
    let (kept, hops): (Vec<_>, Vec<_>) = hops
        .into_iter()
        .partition(|(hop, _)| permanent.contains(&(hop.address, hop.device.clone())));
    for (hop, users) in kept {
        for backend in users {
            outcomes.push((backend, Ok(Some(hop.clone()))));
        }
    }
    if hops.is_empty() {
        return Ok(outcomes);
    }
    let replaces: String = hops
        .iter()
        .map(|(hop, _)| format!("neigh replace {} dev {} managed\n", hop.address, hop.device))
        .collect();
    let (_, stderr) = batch(&["-force", "-batch", "-"], &replaces)?;
    let failed = failed_lines(&stderr);
    for (line, (hop, users)) in (1..).zip(hops) {
        let outcome = if failed.contains(&line) {
            Err(format!(
                "ip neigh replace {} dev {} managed failed: {}",
                hop.address,
                hop.device,
                stderr.trim()
            ))
        } else {
            Ok(Some(hop))
        };
        for backend in users {
            outcomes.push((backend, outcome.clone()));
        }
    }
    Ok(outcomes)
}

/// Runs `ip ARGS` with `input` on standard input; returns stdout and stderr
/// whatever the exit status (with -force, failed lines are named on stderr).
/// Standard input is written by a thread of its own while this one drains
/// stdout and stderr: writing all of it first deadlocks once `ip`'s output
/// fills its pipe (about 4,000 route lookups) while it waits for us to read.
fn batch(args: &[&str], input: &str) -> Result<(String, String), NeighbourError> {
    run_with_input("ip", args, input)
}

/// `program ARGS < input`: stdout and stderr, whatever the exit status.
fn run_with_input(
    program: &str,
    args: &[&str],
    input: &str,
) -> Result<(String, String), NeighbourError> {
    let command = format!("{program} {}", args.join(" "));
    let spawn_failed = |source| NeighbourError::Spawn {
        command: command.clone(),
        source,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_failed)?;
    let writer = child.stdin.take().map(|mut stdin| {
        let input = input.to_owned();
        // Dropping stdin at the end closes it: `ip` sees end of input.
        std::thread::spawn(move || stdin.write_all(input.as_bytes()))
    });
    let output = child.wait_with_output().map_err(spawn_failed)?;
    if let Some(writer) = writer {
        match writer.join() {
            Ok(written) => written.map_err(spawn_failed)?,
            Err(_) => return Err(spawn_failed(std::io::Error::other("stdin writer panicked"))),
        }
    }
    Ok((
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

/// `ip -j -batch` prints one JSON array per successful `route get`; each
/// route names its destination.
fn routes_by_destination(stdout: &str) -> HashMap<IpAddr, RouteJson> {
    serde_json::Deserializer::from_str(stdout)
        .into_iter::<Vec<RouteJson>>()
        .filter_map(Result::ok)
        .filter_map(|routes| routes.into_iter().next())
        .filter_map(|route| Some((route.dst.as_deref()?.parse().ok()?, route)))
        .collect()
}

/// The permanent neighbour entries, as (address, device); none if `ip`
/// cannot list them.
fn permanent_neighbours() -> BTreeSet<(IpAddr, String)> {
    #[derive(Deserialize)]
    struct NeighbourJson {
        dst: String,
        dev: Option<String>,
    }
    let listed = run_with_input("ip", &["-j", "neigh", "show", "nud", "permanent"], "");
    let Ok((stdout, _)) = listed else {
        return BTreeSet::new();
    };
    serde_json::from_str::<Vec<NeighbourJson>>(&stdout)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|entry| Some((entry.dst.parse().ok()?, entry.dev?)))
        .collect()
}

/// Line numbers of `Command failed -:N` in `ip -force -batch -`'s stderr.
fn failed_lines(stderr: &str) -> BTreeSet<usize> {
    stderr
        .lines()
        .filter_map(|line| line.trim().strip_prefix("Command failed -:"))
        .filter_map(|number| number.trim().parse().ok())
        .collect()
}

#[derive(Deserialize)]
struct RouteJson {
    dst: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    dev: Option<String>,
    gateway: Option<String>,
}

/// Parses `ip -j route get BACKEND` (one command's output).
#[cfg(test)]
fn next_hop(backend: IpAddr, json: &str) -> Result<Option<NextHop>, NeighbourError> {
    let routes: Vec<RouteJson> =
        serde_json::from_str(json).map_err(|e| output_error(backend, e.to_string()))?;
    let Some(route) = routes.first() else {
        return Err(output_error(backend, String::from("no route")));
    };
    hop_of(backend, route)
}

fn output_error(backend: IpAddr, reason: String) -> NeighbourError {
    NeighbourError::Output {
        command: format!("ip -j route get {backend}"),
        reason,
    }
}

/// A backend's next hop from its route: the gateway if there is one, else
/// the backend itself on the route's device; `None` for local addresses.
fn hop_of(backend: IpAddr, route: &RouteJson) -> Result<Option<NextHop>, NeighbourError> {
    if matches!(
        route.kind.as_deref(),
        Some("local" | "blackhole" | "unreachable" | "prohibit")
    ) {
        return Ok(None);
    }
    let Some(device) = route.dev.clone().filter(|dev| dev != "lo") else {
        return Ok(None);
    };
    let address = match &route.gateway {
        Some(gateway) => gateway
            .parse()
            .map_err(|_| output_error(backend, format!("gateway {gateway} is not an address")))?,
        None => backend,
    };
    Ok(Some(NextHop { address, device }))
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::net::Ipv4Addr;

    const BACKEND: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 1, 2));

    fn hop(json: &str) -> Option<NextHop> {
        match next_hop(BACKEND, json) {
            Ok(hop) => hop,
            Err(error) => panic!("{error}"),
        }
    }

    #[test]
    fn directly_connected_backend_is_its_own_next_hop() {
        let json = r#"[{"dst":"198.18.1.2","dev":"xlb-b1","prefsrc":"198.18.1.1","flags":[],"uid":0,"cache":[]}]"#;
        assert_eq!(
            hop(json),
            Some(NextHop {
                address: BACKEND,
                device: String::from("xlb-b1")
            })
        );
    }

    #[test]
    fn routed_backend_uses_the_gateway() {
        let json = r#"[{"dst":"198.18.1.2","gateway":"198.18.0.254","dev":"eth0","prefsrc":"198.18.0.1","flags":[],"uid":0,"cache":[]}]"#;
        assert_eq!(
            hop(json),
            Some(NextHop {
                address: IpAddr::from([198, 18, 0, 254]),
                device: String::from("eth0")
            })
        );
    }

    #[test]
    fn local_backend_has_no_neighbour() {
        let json = r#"[{"type":"local","dst":"198.18.1.2","dev":"lo","prefsrc":"198.18.1.2","flags":[],"uid":0,"cache":["local"]}]"#;
        assert_eq!(hop(json), None);
    }

    #[test]
    fn batch_output_is_read_by_destination_and_failed_lines() {
        let stdout = "[{\"dst\":\"198.18.5.7\",\"dev\":\"va\",\"flags\":[]}]\n\
                      [{\"dst\":\"198.19.3.4\",\"gateway\":\"198.18.5.254\",\"dev\":\"va\"}]\n";
        let routes = routes_by_destination(stdout);
        assert_eq!(routes.len(), 2);
        let routed = IpAddr::from([198, 19, 3, 4]);
        let hop = routes.get(&routed).map(|route| hop_of(routed, route));
        assert!(matches!(
            hop,
            Some(Ok(Some(NextHop { address, .. }))) if address == IpAddr::from([198, 18, 5, 254])
        ));
        let stderr = "RTNETLINK answers: Network is unreachable\nCommand failed -:2\n\
                      Cannot find device \"x\"\nCommand failed -:5\n";
        assert_eq!(failed_lines(stderr), BTreeSet::from([2, 5]));
    }

    /// Against the real kernel, in a namespace of its own: a thread enters
    /// it, so the `ip` processes it spawns run there too.
    #[test]
    fn batch_makes_next_hops_managed_neighbours() {
        if !crate::kernel::is_root() {
            eprintln!("skipped: network namespaces need root");
            return;
        }
        let ns = format!("xlbneigh-{}", std::process::id());
        let ip = |args: &[&str]| {
            let status = Command::new("ip").args(["-n", &ns]).args(args).status();
            assert!(status.is_ok_and(|s| s.success()), "ip {args:?}");
        };
        assert!(
            Command::new("ip")
                .args(["netns", "add", &ns])
                .status()
                .is_ok_and(|s| s.success())
        );
        ip(&["link", "add", "va", "type", "veth", "peer", "name", "vb"]);
        ip(&["addr", "add", "198.18.5.1/24", "dev", "va"]);
        ip(&["link", "set", "va", "up"]);
        ip(&["link", "set", "vb", "up"]);
        ip(&[
            "neigh",
            "add",
            "198.18.5.9",
            "lladdr",
            "02:00:00:00:00:09",
            "dev",
            "va",
            "nud",
            "permanent",
        ]);
        ip(&[
            "route",
            "add",
            "198.19.0.0/16",
            "via",
            "198.18.5.254",
            "dev",
            "va",
        ]);
        let path = format!("/var/run/netns/{ns}");
        let outcome = std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("netns handle");
            use std::os::fd::AsFd as _;
            // Only this thread changes namespace.
            crate::kernel::sys::setns_net(file.as_fd()).expect("setns");
            let mut neighbours = Neighbours::default();
            let backends: BTreeSet<IpAddr> = [
                Ipv4Addr::new(198, 18, 5, 7),
                Ipv4Addr::new(198, 19, 1, 1),
                Ipv4Addr::new(198, 19, 2, 2),
                Ipv4Addr::new(198, 18, 5, 1),
                Ipv4Addr::new(198, 18, 5, 9),
            ]
            .map(IpAddr::from)
            .into();
            let warnings = neighbours.ensure(&backends);
            (warnings, neighbours.done.len())
        })
        .join();
        let table = Command::new("ip")
            .args(["-n", &ns, "neigh", "show"])
            .output();
        let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        let Ok((warnings, done)) = outcome else {
            panic!("thread panicked")
        };
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(done, 5, "every backend handled (one is local)");
        let table = String::from_utf8_lossy(&table.expect("ip neigh").stdout).into_owned();
        assert!(table.contains("198.18.5.7 dev va managed"), "{table}");
        assert!(table.contains("198.18.5.254 dev va managed"), "{table}");
        // A static entry stays as it is.
        assert!(
            table.contains("198.18.5.9 dev va lladdr 02:00:00:00:00:09 PERMANENT"),
            "{table}"
        );
        assert_eq!(
            table.matches("198.18.5.254").count(),
            1,
            "one entry per next hop"
        );
    }

    /// More output than a pipe holds, while input is still being written:
    /// writing all input before reading deadlocked here.
    #[test]
    fn big_batches_do_not_deadlock_on_full_pipes() {
        let line = "route get 198.18.1.2 with some padding to fill the pipes\n";
        let input = line.repeat(200_000);
        let (stdout, stderr) = run_with_input("cat", &[], &input).expect("cat runs");
        assert_eq!(stdout.len(), input.len());
        assert!(stderr.is_empty());
    }

    #[test]
    fn the_worker_coalesces_and_reports_busy() {
        let (tx, rx) = mpsc::channel();
        let worker = NeighbourWorker::start(move |busy| {
            let _ = tx.send(busy);
        });
        // Loopback addresses are local: no iproute2 change is made.
        worker.ensure(BTreeSet::from([IpAddr::from(Ipv4Addr::LOCALHOST)]));
        let timeout = std::time::Duration::from_secs(30);
        assert_eq!(rx.recv_timeout(timeout), Ok(true));
        assert_eq!(rx.recv_timeout(timeout), Ok(false));
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(next_hop(BACKEND, "[]").is_err());
        assert!(next_hop(BACKEND, "not json").is_err());
    }
}
