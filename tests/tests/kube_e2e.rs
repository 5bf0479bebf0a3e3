//! End to end, with real sockets: the agent runs in the lab's node
//! namespace with `--kubernetes --kubeconfig FILE`, FILE pointing at the
//! test API server listening on 127.0.0.1 *inside that namespace*; Services
//! and EndpointSlices created through the server become reachable NodePorts
//! for the client namespace, and follow updates and deletes. The same with
//! `--manifests FILE`. Needs root (namespaces, XDP) and `cargo xtask test`'s
//! XLB_BIN / XLB_ECHO_BIN.

#[path = "semantics/stream.rs"]
#[allow(dead_code)]
mod stream;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use xlb_tests::apiserver::ApiServer;
use xlb_tests::apiserver::objects::{
    EndpointState, dual_stack, dual_stack_node, endpoint_slice, node, node_port_service,
};
use xlb_tests::client::{tcp_who_echo_timeout, udp_socket_for, udp_who};
use xlb_tests::lab::{
    ECHO_TCP_PORT, ECHO_UDP_PORT, NODE_ADDR, NODE_ADDR6, NODE_CLIENT_IF, TCP_ECHO_NODE_PORT,
    UDP_ECHO_NODE_PORT, tcp_echo_service, tcp_echo_service6, udp_echo_service, udp_echo_service6,
};
use xlb_tests::{Agent, Bpffs, Lab, XLB_BIN_ENV, bin_from_env, poll_until};

const NODE: &str = "lab-node";
/// How long the datapath may take to follow one API change.
const FOLLOW: Duration = Duration::from_secs(30);
/// Per-attempt timeout while polling for reachability.
const ATTEMPT: Duration = Duration::from_millis(500);

/// The backend names that answered `tries` new TCP connections (failures
/// are skipped).
fn tcp_backends(lab: &Lab, tries: usize) -> BTreeSet<String> {
    tcp_backends_at(lab, tcp_echo_service(), tries)
}

fn tcp_backends_at(lab: &Lab, service: SocketAddr, tries: usize) -> BTreeSet<String> {
    lab.client
        .run(|| {
            (0..tries)
                .filter_map(|_| tcp_who_echo_timeout(service, b"ping", ATTEMPT).ok())
                .map(|who| who.name)
                .collect()
        })
        .unwrap_or_default()
}

fn udp_backends(lab: &Lab, tries: usize) -> BTreeSet<String> {
    udp_backends_at(lab, udp_echo_service(), tries)
}

fn udp_backends_at(lab: &Lab, service: SocketAddr, tries: usize) -> BTreeSet<String> {
    lab.client
        .run(|| {
            (0..tries)
                .filter_map(|_| {
                    let socket = udp_socket_for(service).ok()?;
                    socket.set_read_timeout(Some(ATTEMPT)).ok()?;
                    udp_who(&socket, service).ok().map(|(who, _)| who.name)
                })
                .collect()
        })
        .unwrap_or_default()
}

fn names(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|name| (*name).to_owned()).collect()
}

/// Waits, for an agent in a lab, until new TCP or UDP flows (`tries` of
/// them per look) reach exactly the `wanted` backends.
struct Follow<'a> {
    lab: &'a Lab,
    agent: &'a Agent<'a>,
}

impl Follow<'_> {
    fn tcp(&self, what: &str, tries: usize, wanted: &BTreeSet<String>) -> anyhow::Result<()> {
        self.until(what, |lab| tcp_backends(lab, tries), wanted)
    }

    fn udp(&self, what: &str, tries: usize, wanted: &BTreeSet<String>) -> anyhow::Result<()> {
        self.until(what, |lab| udp_backends(lab, tries), wanted)
    }

    /// New TCP connections and UDP flows to `tcp` and `udp` (of one family)
    /// reach exactly `wanted`.
    fn both(
        &self,
        what: &str,
        (tcp, udp): (SocketAddr, SocketAddr),
        wanted: &BTreeSet<String>,
    ) -> anyhow::Result<()> {
        self.until(
            &format!("TCP {what}"),
            |lab| tcp_backends_at(lab, tcp, 12),
            wanted,
        )?;
        self.until(
            &format!("UDP {what}"),
            |lab| udp_backends_at(lab, udp, 12),
            wanted,
        )
    }

    fn until(
        &self,
        what: &str,
        seen: impl Fn(&Lab) -> BTreeSet<String>,
        wanted: &BTreeSet<String>,
    ) -> anyhow::Result<()> {
        let mut last = BTreeSet::new();
        let outcome = poll_until(what, FOLLOW, || {
            last = seen(self.lab);
            (last == *wanted).then_some(())
        });
        if let Err(error) = outcome {
            return Err(self
                .agent
                .failure(format!("{error}: wanted {wanted:?}, last saw {last:?}"))
                .into());
        }
        Ok(())
    }
}

/// The EndpointSlice of the lab's `tcp-echo` or `udp-echo` service.
fn echo_slice(protocol: &str, endpoints: &[EndpointState]) -> EndpointSlice {
    let (service, port) = match protocol {
        "TCP" => ("tcp-echo", ECHO_TCP_PORT),
        _ => ("udp-echo", ECHO_UDP_PORT),
    };
    let name = format!("{service}-1");
    endpoint_slice("default", &name, service, protocol, port, endpoints)
}

fn addresses(lab: &Lab) -> (Ipv4Addr, Ipv4Addr) {
    (lab.backends[0].addr, lab.backends[1].addr)
}

/// A test API server listening where the agent (in the node namespace)
/// can reach it, on the node namespace's loopback, with this node's Node;
/// its kubeconfig and a node config without services.
fn cluster(lab: &Lab) -> anyhow::Result<(ApiServer, String, std::path::PathBuf)> {
    let listener = lab
        .node
        .run(|| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))??;
    let server = ApiServer::start_on(listener)?;
    server.apply(&node(NODE, NODE_ADDR));
    let kubeconfig = lab.dir().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig)?;
    let config = lab.write_file("node.yaml", &lab.config_yaml("  []\n"))?;
    Ok((server, kubeconfig.display().to_string(), config))
}

/// The agent with `--kubernetes` against `kubeconfig`, and `more` args.
fn kube_agent<'lab>(
    lab: &'lab Lab,
    config: &std::path::Path,
    kubeconfig: &str,
    more: &[&str],
) -> anyhow::Result<Agent<'lab>> {
    let mut args = vec![
        "--kubernetes",
        "--kubeconfig",
        kubeconfig,
        "--node-name",
        NODE,
    ];
    args.extend_from_slice(more);
    Ok(Agent::start_with(
        &bin_from_env(XLB_BIN_ENV)?,
        lab,
        config,
        &args,
    )?)
}

/// The lab's `tcp-echo` or `udp-echo` Service with its EndpointSlice.
fn apply_echo(server: &ApiServer, protocol: &str, endpoints: &[EndpointState]) {
    let service = match protocol {
        "TCP" => node_port_service(
            "default",
            "tcp-echo",
            "TCP",
            3333,
            ECHO_TCP_PORT,
            TCP_ECHO_NODE_PORT,
        ),
        _ => node_port_service(
            "default",
            "udp-echo",
            "UDP",
            4444,
            ECHO_UDP_PORT,
            UDP_ECHO_NODE_PORT,
        ),
    };
    server.apply(&service);
    server.apply(&echo_slice(protocol, endpoints));
}

#[test]
fn services_created_through_the_api_are_reachable() -> anyhow::Result<()> {
    let lab = Lab::new(2)?;
    let (server, kubeconfig, config) = cluster(&lab)?;
    let agent = kube_agent(&lab, &config, &kubeconfig, &[])?;
    let (pod_1, pod_2) = addresses(&lab);
    let follow = Follow {
        lab: &lab,
        agent: &agent,
    };

    // Create: both services, both pods.
    let both = [EndpointState::ready(pod_1), EndpointState::ready(pod_2)];
    apply_echo(&server, "TCP", &both);
    apply_echo(&server, "UDP", &both);
    let all = names(&["backend-1", "backend-2"]);
    follow.tcp("TCP to reach both pods", 12, &all)?;
    follow.udp("UDP to reach both pods", 12, &all)?;

    // A Service that claims tcp-echo's nodePort is not served; its owner
    // reads why in an Event, and tcp-echo goes on.
    server.apply(&node_port_service(
        "default",
        "tcp-echo-copy",
        "TCP",
        3334,
        ECHO_TCP_PORT,
        TCP_ECHO_NODE_PORT,
    ));
    let event = poll_until("an Event about tcp-echo-copy", FOLLOW, || {
        server.events().into_iter().find(|event| {
            event
                .pointer("/regarding/name")
                .and_then(|name| name.as_str())
                == Some("tcp-echo-copy")
        })
    })
    .map_err(|error| agent.failure(error.to_string()))?;
    let field = |pointer: &str| event.pointer(pointer).and_then(|value| value.as_str());
    assert_eq!(field("/type"), Some("Warning"), "{event}");
    assert_eq!(field("/reason"), Some("NotServed"), "{event}");
    assert_eq!(field("/reportingController"), Some("xlb"), "{event}");
    assert_eq!(field("/reportingInstance"), Some(NODE), "{event}");
    assert_eq!(field("/regarding/kind"), Some("Service"), "{event}");
    assert!(
        field("/regarding/uid").is_some_and(|uid| !uid.is_empty()),
        "{event}"
    );
    assert!(
        field("/note").is_some_and(|note| note.contains("already used by")),
        "{event}"
    );
    follow.tcp("TCP to go on reaching both pods", 12, &all)?;
    assert!(server.delete::<Service>("default", "tcp-echo-copy"));

    // Update: backend-2 is terminating, so new flows go to backend-1 only.
    let draining = [
        EndpointState::ready(pod_1),
        EndpointState::terminating(pod_2),
    ];
    server.apply(&echo_slice("TCP", &draining));
    follow.tcp(
        "TCP to avoid the terminating pod",
        12,
        &names(&["backend-1"]),
    )?;

    // Delete: the NodePort stops answering (nothing listens on the node).
    assert!(server.delete::<Service>("default", "tcp-echo"));
    follow.tcp("TCP to stop answering", 3, &BTreeSet::new())?;
    follow.udp("UDP to keep answering", 6, &all)?;

    // The API goes away: the last state keeps serving.
    server.go_away();
    std::thread::sleep(Duration::from_secs(2));
    follow.udp("UDP to serve while the API is away", 6, &all)?;
    server.come_back();
    server.apply(&echo_slice("UDP", &[EndpointState::ready(pod_2)]));
    follow.udp(
        "UDP to follow a change after the API is back",
        8,
        &names(&["backend-2"]),
    )?;

    agent.stop_cleanly()?;
    Ok(())
}

#[test]
fn manifests_drive_a_node_without_a_cluster() -> anyhow::Result<()> {
    let lab = Lab::new(2)?;
    let (pod_1, pod_2) = addresses(&lab);
    let manifests = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: tcp-echo}}\nspec:\n  type: NodePort\n  ports:\n    \
         - {{protocol: TCP, port: 3333, targetPort: {ECHO_TCP_PORT}, nodePort: {TCP_ECHO_NODE_PORT}}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: tcp-echo-1\n  \
         labels: {{kubernetes.io/service-name: tcp-echo}}\naddressType: IPv4\nports: [{{protocol: TCP, port: {ECHO_TCP_PORT}}}]\n\
         endpoints:\n  - addresses: [{pod_1}]\n  - addresses: [{pod_2}]\n"
    );
    let manifests_file = lab.write_file("app.yaml", &manifests)?;
    let config = lab.write_file("node.yaml", &lab.config_yaml("  []\n"))?;
    let manifests_arg = manifests_file.display().to_string();
    let agent = Agent::start_with(
        &bin_from_env(XLB_BIN_ENV)?,
        &lab,
        &config,
        &["--manifests", &manifests_arg],
    )?;
    let all = names(&["backend-1", "backend-2"]);
    let follow = Follow {
        lab: &lab,
        agent: &agent,
    };
    follow.tcp("TCP to reach both pods", 12, &all)?;

    // The file changes: the agent follows.
    let one = manifests.replace(&format!("  - addresses: [{pod_2}]\n"), "");
    lab.write_file("app.yaml", &one)?;
    follow.tcp(
        "TCP to follow the edited manifest",
        12,
        &names(&["backend-1"]),
    )?;

    // A broken edit is reported and the last good manifests keep serving.
    lab.write_file("app.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: tcp-echo}\nspec: {type: NodePort, ports: [{port: 3333}]}\n")?;
    agent.wait_for_log(0, "manifests rejected", FOLLOW)?;
    follow.tcp(
        "TCP to keep the last good manifests",
        6,
        &names(&["backend-1"]),
    )?;
    agent.stop_cleanly()?;
    Ok(())
}

/// From the Kubernetes API too, maps too small for the cluster's Services
/// grow: the agent starts again in place with larger ones (no Service is
/// left out for long), a connection made before keeps its backend, and
/// the new Services answer.
#[test]
fn maps_grow_for_a_cluster_that_outgrows_them() -> anyhow::Result<()> {
    let lab = Lab::new(2)?;
    let bpffs = Bpffs::mount(&lab)?;
    let (server, kubeconfig, config) = cluster(&lab)?;
    let (pod_1, pod_2) = addresses(&lab);
    let both = [EndpointState::ready(pod_1), EndpointState::ready(pod_2)];
    apply_echo(&server, "TCP", &both);
    // One frontend and two backends (ids 1 and 2): full.
    let dir = bpffs.arg();
    let more = ["--bpffs", dir.as_str(), "--map-capacity", "2,3"];
    let agent = kube_agent(&lab, &config, &kubeconfig, &more)?;
    let follow = Follow {
        lab: &lab,
        agent: &agent,
    };
    let all = names(&["backend-1", "backend-2"]);
    follow.tcp("TCP to reach both pods", 12, &all)?;
    let target = std::net::SocketAddr::from((NODE_ADDR, TCP_ECHO_NODE_PORT));
    let mut connection = stream::Connection::open(&lab.client, target)?;
    connection.exchange()?;

    // udp-echo (two more backends) makes the backend map grow; two more
    // Services right after make the frontend map grow too, most often
    // before the agent started by the first growth has applied anything:
    // it then passes on the ids it kept (`kernel::kept`).
    let since = agent.log().len();
    apply_echo(&server, "UDP", &both);
    let first = agent.wait_for_log(since, "growing the maps from 2,3 to 2,8", FOLLOW)?;
    for index in 0..2 {
        let name = format!("more-{index}");
        server.apply(&node_port_service(
            "default",
            &name,
            "UDP",
            4444,
            ECHO_UDP_PORT,
            30970 + index,
        ));
        server.apply(&endpoint_slice(
            "default",
            &format!("{name}-1"),
            &name,
            "UDP",
            ECHO_UDP_PORT,
            &both,
        ));
    }
    let second = agent.wait_for_log(since, "growing the maps from 2,8 to", FOLLOW)?;
    println!("{first}\n{second}");
    follow.udp("UDP to reach both pods after the maps grew", 12, &all)?;
    for port in [30970, 30971] {
        let target = SocketAddr::from((NODE_ADDR, port));
        lab.client
            .run(|| udp_socket_for(target).and_then(|socket| udp_who(&socket, target)))??;
    }
    connection.exchange()?;
    poll_until("the second agent to apply", FOLLOW, || {
        let log = agent.log();
        let after = log.get(since..).unwrap_or_default();
        let recreated = after.matches("configuration maps recreated at").count();
        (recreated == 2 && after.matches("applied config generation 1 (").count() >= 1)
            .then_some(())
    })
    .map_err(|error| agent.failure(error.to_string()))?;
    let log = agent.log();
    for line in log.get(since..).unwrap_or_default().lines() {
        if ["growing", "recreated at", "applied config"]
            .iter()
            .any(|step| line.contains(step))
        {
            println!("{line}");
        }
    }
    agent.stop_cleanly()?;
    Ok(())
}

/// A dual-stack Service (`ipFamilies: [IPv4, IPv6]`) with an EndpointSlice
/// of each address type, on a Node with an InternalIP of each family and no
/// `node.addresses`: IPv4 and IPv6 clients reach the same pods through the
/// NodePort on the Node's addresses, each family's slice changes its
/// family's flows only, and a Service made single-stack stops answering
/// IPv6.
#[test]
fn dual_stack_services_from_the_api_serve_both_families() -> anyhow::Result<()> {
    let lab = Lab::new(2)?;
    let (server, kubeconfig, _) = cluster(&lab)?;
    server.apply(&dual_stack_node(
        NODE,
        &[IpAddr::from(NODE_ADDR), IpAddr::from(NODE_ADDR6)],
    ));
    let interfaces: Vec<&str> = std::iter::once(NODE_CLIENT_IF)
        .chain(lab.backends.iter().map(|backend| backend.node_if.as_str()))
        .collect();
    let text = format!(
        "node:\n  interfaces: [{}]\nservices: []\n",
        interfaces.join(", ")
    );
    let config = lab.write_file("node-dual.yaml", &text)?;
    let agent = kube_agent(&lab, &config, &kubeconfig, &[])?;
    let follow = Follow {
        lab: &lab,
        agent: &agent,
    };
    let pods6 = [lab.backends[0].addr6, lab.backends[1].addr6];
    let (pod_1, pod_2) = addresses(&lab);
    let v4 = (tcp_echo_service(), udp_echo_service());
    let v6 = (tcp_echo_service6(), udp_echo_service6());
    let slice6 = |protocol: &str, endpoints: &[EndpointState]| {
        let (service, port) = match protocol {
            "TCP" => ("tcp-echo", ECHO_TCP_PORT),
            _ => ("udp-echo", ECHO_UDP_PORT),
        };
        let name = format!("{service}-v6");
        endpoint_slice("default", &name, service, protocol, port, endpoints)
    };
    let all6 = [
        EndpointState::ready(pods6[0]),
        EndpointState::ready(pods6[1]),
    ];
    for (protocol, service, port, node_port) in [
        ("TCP", "tcp-echo", ECHO_TCP_PORT, TCP_ECHO_NODE_PORT),
        ("UDP", "udp-echo", ECHO_UDP_PORT, UDP_ECHO_NODE_PORT),
    ] {
        let listed_port = if protocol == "TCP" { 3333 } else { 4444 };
        server.apply(&dual_stack(node_port_service(
            "default",
            service,
            protocol,
            listed_port,
            port,
            node_port,
        )));
        let both = [EndpointState::ready(pod_1), EndpointState::ready(pod_2)];
        server.apply(&echo_slice(protocol, &both));
        server.apply(&slice6(protocol, &all6));
    }
    let all = names(&["backend-1", "backend-2"]);
    follow.both("IPv4 clients to reach both pods", v4, &all)?;
    follow.both("IPv6 clients to reach both pods", v6, &all)?;

    // The IPv6 slice drains backend-2: IPv6 flows follow, IPv4 ones not.
    for protocol in ["TCP", "UDP"] {
        server.apply(&slice6(protocol, &[EndpointState::ready(pods6[0])]));
    }
    follow.both(
        "IPv6 clients to reach backend-1 only",
        v6,
        &names(&["backend-1"]),
    )?;
    follow.both("IPv4 clients to go on reaching both pods", v4, &all)?;

    // Single-stack IPv4 again: IPv6 clients reach nothing, IPv4 ones go on.
    server.apply(&node_port_service(
        "default",
        "tcp-echo",
        "TCP",
        3333,
        ECHO_TCP_PORT,
        TCP_ECHO_NODE_PORT,
    ));
    follow.until(
        "IPv6 TCP clients to reach nothing",
        |lab| tcp_backends_at(lab, tcp_echo_service6(), 4),
        &BTreeSet::new(),
    )?;
    follow.tcp("IPv4 TCP clients to reach both pods", 12, &all)?;
    follow.until(
        "IPv6 UDP clients to go on reaching backend-1",
        |lab| udp_backends_at(lab, udp_echo_service6(), 12),
        &names(&["backend-1"]),
    )?;
    agent.stop_cleanly()?;
    Ok(())
}
