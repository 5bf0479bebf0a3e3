//! End to end, with real sockets: the agent runs in the lab's node
//! namespace with `--kubernetes --kubeconfig FILE`, FILE pointing at the
//! test API server listening on 127.0.0.1 *inside that namespace*; Services
//! and EndpointSlices created through the server become reachable NodePorts
//! for the client namespace, and follow updates and deletes. The same with
//! `--manifests FILE`. Needs root (namespaces, XDP) and `cargo xtask test`'s
//! XLB_BIN / XLB_ECHO_BIN.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, TcpListener};
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use xlb_tests::apiserver::ApiServer;
use xlb_tests::apiserver::objects::{EndpointState, endpoint_slice, node, node_port_service};
use xlb_tests::client::{tcp_who_echo_timeout, udp_socket, udp_who};
use xlb_tests::lab::{
    ECHO_TCP_PORT, ECHO_UDP_PORT, NODE_ADDR, TCP_ECHO_NODE_PORT, UDP_ECHO_NODE_PORT,
    tcp_echo_service, udp_echo_service,
};
use xlb_tests::{Agent, Lab, XLB_BIN_ENV, bin_from_env, poll_until};

const NODE: &str = "lab-node";
/// How long the datapath may take to follow one API change.
const FOLLOW: Duration = Duration::from_secs(30);
/// Per-attempt timeout while polling for reachability.
const ATTEMPT: Duration = Duration::from_millis(500);

/// The backend names that answered `tries` new TCP connections (failures
/// are skipped).
fn tcp_backends(lab: &Lab, tries: usize) -> BTreeSet<String> {
    let service = tcp_echo_service();
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
    let service = udp_echo_service();
    lab.client
        .run(|| {
            (0..tries)
                .filter_map(|_| {
                    let socket = udp_socket().ok()?;
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

/// Waits until new flows reach exactly `wanted` backends.
fn until_backends(
    lab: &Lab,
    agent: &Agent<'_>,
    what: &str,
    seen: impl Fn(&Lab) -> BTreeSet<String>,
    wanted: &BTreeSet<String>,
) -> anyhow::Result<()> {
    let mut last = BTreeSet::new();
    let outcome = poll_until(what, FOLLOW, || {
        last = seen(lab);
        (last == *wanted).then_some(())
    });
    if let Err(error) = outcome {
        return Err(agent
            .failure(format!("{error}: wanted {wanted:?}, last saw {last:?}"))
            .into());
    }
    Ok(())
}

fn addresses(lab: &Lab) -> (Ipv4Addr, Ipv4Addr) {
    (lab.backends[0].addr, lab.backends[1].addr)
}

#[test]
fn services_created_through_the_api_are_reachable() -> anyhow::Result<()> {
    let lab = Lab::new(2)?;
    // The server listens where the agent (in the node namespace) can reach
    // it: on the node namespace's loopback.
    let listener = lab
        .node
        .run(|| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))??;
    let server = ApiServer::start_on(listener)?;
    server.apply(&node(NODE, NODE_ADDR));
    let kubeconfig = lab.dir().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig)?;
    let config = lab.write_file("node.yaml", &lab.config_yaml("  []\n"))?;
    let kubeconfig_arg = kubeconfig.display().to_string();
    let agent = Agent::start_with(
        &bin_from_env(XLB_BIN_ENV)?,
        &lab,
        &config,
        &[
            "--kubernetes",
            "--kubeconfig",
            &kubeconfig_arg,
            "--node-name",
            NODE,
        ],
    )?;
    let (pod_1, pod_2) = addresses(&lab);

    // Create: both services, both pods.
    let both = [EndpointState::ready(pod_1), EndpointState::ready(pod_2)];
    server.apply(&node_port_service(
        "default",
        "tcp-echo",
        "TCP",
        3333,
        ECHO_TCP_PORT,
        TCP_ECHO_NODE_PORT,
    ));
    server.apply(&endpoint_slice(
        "default",
        "tcp-echo-1",
        "tcp-echo",
        "TCP",
        ECHO_TCP_PORT,
        &both,
    ));
    server.apply(&node_port_service(
        "default",
        "udp-echo",
        "UDP",
        4444,
        ECHO_UDP_PORT,
        UDP_ECHO_NODE_PORT,
    ));
    server.apply(&endpoint_slice(
        "default",
        "udp-echo-1",
        "udp-echo",
        "UDP",
        ECHO_UDP_PORT,
        &both,
    ));
    let all = names(&["backend-1", "backend-2"]);
    until_backends(
        &lab,
        &agent,
        "TCP to reach both pods",
        |lab| tcp_backends(lab, 12),
        &all,
    )?;
    until_backends(
        &lab,
        &agent,
        "UDP to reach both pods",
        |lab| udp_backends(lab, 12),
        &all,
    )?;

    // Update: backend-2 is terminating, so new flows go to backend-1 only.
    let draining = [
        EndpointState::ready(pod_1),
        EndpointState::terminating(pod_2),
    ];
    server.apply(&endpoint_slice(
        "default",
        "tcp-echo-1",
        "tcp-echo",
        "TCP",
        ECHO_TCP_PORT,
        &draining,
    ));
    until_backends(
        &lab,
        &agent,
        "TCP to avoid the terminating pod",
        |lab| tcp_backends(lab, 12),
        &names(&["backend-1"]),
    )?;

    // Delete: the NodePort stops answering (nothing listens on the node).
    assert!(server.delete::<Service>("default", "tcp-echo"));
    until_backends(
        &lab,
        &agent,
        "TCP to stop answering",
        |lab| tcp_backends(lab, 3),
        &BTreeSet::new(),
    )?;
    until_backends(
        &lab,
        &agent,
        "UDP to keep answering",
        |lab| udp_backends(lab, 6),
        &all,
    )?;

    // The API goes away: the last state keeps serving.
    server.go_away();
    std::thread::sleep(Duration::from_secs(2));
    until_backends(
        &lab,
        &agent,
        "UDP to serve while the API is away",
        |lab| udp_backends(lab, 6),
        &all,
    )?;
    server.come_back();
    server.apply(&endpoint_slice(
        "default",
        "udp-echo-1",
        "udp-echo",
        "UDP",
        ECHO_UDP_PORT,
        &[EndpointState::ready(pod_2)],
    ));
    until_backends(
        &lab,
        &agent,
        "UDP to follow a change after the API is back",
        |lab| udp_backends(lab, 8),
        &names(&["backend-2"]),
    )?;

    let exit = agent.stop()?;
    assert!(
        exit.status.success(),
        "agent exit {}:\n{}",
        exit.status,
        exit.log
    );
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
    until_backends(
        &lab,
        &agent,
        "TCP to reach both pods",
        |lab| tcp_backends(lab, 12),
        &all,
    )?;

    // The file changes: the agent follows.
    let one = manifests.replace(&format!("  - addresses: [{pod_2}]\n"), "");
    lab.write_file("app.yaml", &one)?;
    until_backends(
        &lab,
        &agent,
        "TCP to follow the edited manifest",
        |lab| tcp_backends(lab, 12),
        &names(&["backend-1"]),
    )?;

    // A broken edit is reported and the last good manifests keep serving.
    lab.write_file("app.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: tcp-echo}\nspec: {type: NodePort, ports: [{port: 3333}]}\n")?;
    agent.wait_for_log(0, "manifests rejected", FOLLOW)?;
    until_backends(
        &lab,
        &agent,
        "TCP to keep the last good manifests",
        |lab| tcp_backends(lab, 6),
        &names(&["backend-1"]),
    )?;
    let exit = agent.stop()?;
    assert!(
        exit.status.success(),
        "agent exit {}:\n{}",
        exit.status,
        exit.log
    );
    Ok(())
}
