//! xlb's Kubernetes source against a real wire protocol: the kube client
//! (built from a kubeconfig, as `xlb run --kubernetes --kubeconfig` does)
//! lists and watches the in-process test API server, and the desired state
//! follows what the tests create, change and delete, through dropped
//! connections and 410 Gone. No root needed.

use std::future::Future;
use std::net::Ipv4Addr;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use xlb::model::desired_backends;
use xlb::model::{DesiredState, Protocol};
use xlb::source::kube::{
    ClusterSource, ClusterView, NodeInfo, SourceOptions, Watch, client, desired_state,
};
use xlb_tests::ScratchDir;
use xlb_tests::apiserver::ApiServer;
use xlb_tests::apiserver::objects::{EndpointState, endpoint_slice, node, node_port_service};

const NODE: &str = "node-a";
const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const POD_1: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
const POD_2: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 2);
/// Longest a test waits for the state to follow one change. The watcher's
/// retry backoff starts at 0.8 s and doubles, so a few outages fit.
const FOLLOW: Duration = Duration::from_secs(30);
/// Bound of a whole test.
const TEST: Duration = Duration::from_secs(120);

fn base() -> DesiredState {
    DesiredState {
        interfaces: vec![String::from("xlb-c")],
        ..DesiredState::default()
    }
}

/// A test API server with this node in it, and a kubeconfig pointing at it.
struct Cluster {
    server: ApiServer,
    dir: ScratchDir,
}

impl Cluster {
    fn new() -> anyhow::Result<Cluster> {
        let server = ApiServer::start()?;
        server.apply(&node(NODE, NODE_ADDR));
        let dir = ScratchDir::new()?;
        server.write_kubeconfig(&dir.path().join("kubeconfig"))?;
        Ok(Cluster { server, dir })
    }

    fn kubeconfig(&self) -> std::path::PathBuf {
        self.dir.path().join("kubeconfig")
    }

    async fn watch(&self) -> anyhow::Result<Watch> {
        let client = client(Some(&self.kubeconfig())).await?;
        Ok(Watch::start(client, NODE.to_owned()))
    }

    fn tcp_echo(&self, endpoints: &[EndpointState]) {
        self.server.apply(&node_port_service(
            "default", "tcp-echo", "TCP", 3333, 3333, 30999,
        ));
        self.server.apply(&tcp_echo_slice(endpoints));
    }
}

fn tcp_echo_slice(endpoints: &[EndpointState]) -> EndpointSlice {
    endpoint_slice("default", "tcp-echo-1", "tcp-echo", "TCP", 3333, endpoints)
}

/// Runs `test` on a fresh single-threaded runtime (as the agent's), bounded
/// by [`TEST`].
fn run<F: Future<Output = anyhow::Result<()>>>(test: F) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        tokio::time::timeout(TEST, test)
            .await
            .map_err(|_| anyhow::anyhow!("the test took longer than {TEST:?}"))?
    })
}

/// Waits until the translated state satisfies `wanted`; returns it.
async fn state_where(
    watch: &mut Watch,
    what: &str,
    wanted: impl Fn(&DesiredState) -> bool,
) -> anyhow::Result<DesiredState> {
    let mut last = None;
    let waited = tokio::time::timeout(FOLLOW, async {
        let mut view = watch.next().await;
        loop {
            let state = desired_state(&view.snapshot, &view.node, &base());
            if wanted(&state) {
                return state;
            }
            last = Some(state);
            view = watch.changed().await;
        }
    })
    .await;
    waited.map_err(|_| anyhow::anyhow!("no state where {what} within {FOLLOW:?}; last: {last:#?}"))
}

/// Waits until new flows to tcp-echo go to `pod` only.
async fn tcp_echo_on(watch: &mut Watch, what: &str, pod: Ipv4Addr) -> anyhow::Result<DesiredState> {
    state_where(watch, what, |state| {
        backends(state, 30999) == Some(vec![(pod, 3333)])
    })
    .await
}

/// Waits until tcp-echo has two backends.
async fn tcp_echo_on_two(watch: &mut Watch, what: &str) -> anyhow::Result<DesiredState> {
    state_where(watch, what, |state| {
        backends(state, 30999).is_some_and(|backends| backends.len() == 2)
    })
    .await
}

/// Waits (polling) until `done` holds.
async fn eventually(what: &str, done: impl Fn() -> bool) -> anyhow::Result<()> {
    let waited = tokio::time::timeout(FOLLOW, async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    waited.map_err(|_| anyhow::anyhow!("{what}: not within {FOLLOW:?}"))
}

/// `(address, port)` of each backend new flows to the service on
/// `node_port` may go to, as the reconciler picks them.
fn backends(state: &DesiredState, node_port: u16) -> Option<Vec<(Ipv4Addr, u16)>> {
    let service = state
        .services
        .iter()
        .find(|service| service.node_port == node_port)?;
    Some(
        desired_backends(service)
            .into_iter()
            .filter(|backend| backend.selectable)
            .map(|backend| (ipv4(backend.address.address), backend.address.port))
            .collect(),
    )
}

#[test]
fn state_follows_services_and_slices() -> anyhow::Result<()> {
    let cluster = Cluster::new()?;
    run(async {
        let mut watch = cluster.watch().await?;
        let state = state_where(&mut watch, "the node is known", |state| {
            state.node_addresses.is_some()
        })
        .await?;
        assert_eq!(state.services, []);
        assert_eq!(state.node_addresses, Some(vec![NODE_ADDR.into()]));
        assert_eq!(state.interfaces, ["xlb-c"], "the base's settings are kept");

        cluster.tcp_echo(&[EndpointState::ready(POD_1), EndpointState::ready(POD_2)]);
        let state = tcp_echo_on_two(&mut watch, "tcp-echo has two backends").await?;
        let service = &state.services[0];
        assert_eq!(service.qualified_name(), "default/tcp-echo");
        assert_eq!(service.protocol, Protocol::Tcp);
        assert_eq!(
            backends(&state, 30999),
            Some(vec![(POD_1, 3333), (POD_2, 3333)])
        );

        // A UDP service next to it.
        cluster.server.apply(&node_port_service(
            "default", "udp-echo", "UDP", 4444, 4444, 30998,
        ));
        cluster.server.apply(&endpoint_slice(
            "default",
            "udp-echo-1",
            "udp-echo",
            "UDP",
            4444,
            &[EndpointState::ready(POD_2)],
        ));
        let state = state_where(&mut watch, "udp-echo has its backend", |state| {
            backends(state, 30998) == Some(vec![(POD_2, 4444)])
        })
        .await?;
        assert_eq!(state.services.len(), 2);

        // A pod goes away.
        cluster
            .server
            .apply(&tcp_echo_slice(&[EndpointState::ready(POD_1)]));
        tcp_echo_on(&mut watch, "tcp-echo has one backend", POD_1).await?;

        // The NodePort moves.
        cluster.server.apply(&node_port_service(
            "default", "tcp-echo", "TCP", 3333, 3333, 31999,
        ));
        state_where(&mut watch, "tcp-echo moved to 31999", |state| {
            backends(state, 31999) == Some(vec![(POD_1, 3333)]) && backends(state, 30999).is_none()
        })
        .await?;

        // The slice, then the service, are deleted.
        assert!(
            cluster
                .server
                .delete::<EndpointSlice>("default", "tcp-echo-1")
        );
        state_where(&mut watch, "tcp-echo has no backend", |state| {
            backends(state, 31999) == Some(Vec::new())
        })
        .await?;
        assert!(cluster.server.delete::<Service>("default", "tcp-echo"));
        let state = state_where(&mut watch, "only udp-echo is left", |state| {
            state.services.len() == 1
        })
        .await?;
        assert_eq!(state.services[0].name, "udp-echo");
        Ok(())
    })
}

#[test]
fn terminating_endpoints_drain() -> anyhow::Result<()> {
    let cluster = Cluster::new()?;
    run(async {
        let mut watch = cluster.watch().await?;
        cluster.tcp_echo(&[EndpointState::ready(POD_1), EndpointState::ready(POD_2)]);
        tcp_echo_on_two(&mut watch, "two backends").await?;

        // POD_2 is shutting down: no new flows while POD_1 is ready.
        cluster.tcp_echo(&[
            EndpointState::ready(POD_1),
            EndpointState::terminating(POD_2),
        ]);
        tcp_echo_on(&mut watch, "only the ready backend", POD_1).await?;

        // Nothing ready: the serving, terminating pod is better than none.
        cluster.tcp_echo(&[EndpointState::terminating(POD_2)]);
        tcp_echo_on(
            &mut watch,
            "the terminating backend as a last resort",
            POD_2,
        )
        .await?;
        Ok(())
    })
}

#[test]
fn last_state_serves_while_the_api_is_away() -> anyhow::Result<()> {
    let cluster = Cluster::new()?;
    run(async {
        let mut watch = cluster.watch().await?;
        cluster.tcp_echo(&[EndpointState::ready(POD_1), EndpointState::ready(POD_2)]);
        let serving = tcp_echo_on_two(&mut watch, "two backends").await?;

        cluster.server.go_away();
        // Changes made meanwhile reach nobody yet.
        cluster.tcp_echo(&[EndpointState::ready(POD_1)]);
        let away = tokio::time::timeout(Duration::from_secs(3), watch.changed()).await;
        assert!(away.is_err(), "no new view while the API is away: {away:?}");
        let current = watch
            .current()
            .ok_or_else(|| anyhow::anyhow!("the view was dropped"))?;
        assert_eq!(
            desired_state(&current.snapshot, &current.node, &base()),
            serving,
            "the last good state keeps serving"
        );

        cluster.server.come_back();
        tcp_echo_on(&mut watch, "the change made while away arrives", POD_1).await?;
        Ok(())
    })
}

#[test]
fn nothing_is_published_before_every_kind_is_listed() -> anyhow::Result<()> {
    let cluster = Cluster::new()?;
    cluster.tcp_echo(&[EndpointState::ready(POD_1)]);
    cluster.server.go_away();
    run(async {
        let mut watch = cluster.watch().await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(watch.current().is_none(), "a partial view was published");
        cluster.server.come_back();
        let state = state_where(&mut watch, "the first complete view", |_| true).await?;
        assert_eq!(backends(&state, 30999), Some(vec![(POD_1, 3333)]));
        Ok(())
    })
}

/// A change only a relist can see: made quietly (no watch event).
fn quiet_change(cluster: &Cluster) {
    cluster
        .server
        .apply_quietly(&tcp_echo_slice(&[EndpointState::ready(POD_2)]));
}

#[test]
fn gone_event_on_an_open_watch_forces_a_relist() -> anyhow::Result<()> {
    let cluster = Cluster::new()?;
    run(async {
        let mut watch = cluster.watch().await?;
        cluster.tcp_echo(&[EndpointState::ready(POD_1)]);
        tcp_echo_on(&mut watch, "POD_1", POD_1).await?;
        let lists = cluster.server.count("endpointslices", false);
        // The watch must be open for its end to force anything.
        eventually("the endpoint slice watch to start", || {
            cluster.server.count("endpointslices", true) > 0
        })
        .await?;

        quiet_change(&cluster);
        cluster.server.expire_watches();
        tcp_echo_on(&mut watch, "the quiet change, seen by a relist", POD_2).await?;
        assert!(cluster.server.count("endpointslices", false) > lists);
        Ok(())
    })
}

/// The watch resumes from a resourceVersion the server has compacted away.
async fn resume_after_compaction(cluster: &Cluster, watch: &mut Watch) -> anyhow::Result<()> {
    cluster.tcp_echo(&[EndpointState::ready(POD_1)]);
    tcp_echo_on(watch, "POD_1", POD_1).await?;
    let lists = cluster.server.count("endpointslices", false);
    cluster.server.go_away();
    quiet_change(cluster);
    cluster.server.compact();
    cluster.server.come_back();
    tcp_echo_on(watch, "the quiet change, seen by a relist", POD_2).await?;
    assert!(cluster.server.count("endpointslices", false) > lists);
    Ok(())
}

#[test]
fn too_old_resource_version_forces_a_relist() -> anyhow::Result<()> {
    let cluster = Cluster::new()?;
    run(async {
        let mut watch = cluster.watch().await?;
        resume_after_compaction(&cluster, &mut watch).await
    })
}

#[test]
fn http_410_on_watch_start_forces_a_relist() -> anyhow::Result<()> {
    let cluster = Cluster::new()?;
    cluster.server.set_gone_as_http(true);
    run(async {
        let mut watch = cluster.watch().await?;
        resume_after_compaction(&cluster, &mut watch).await?;
        let refused = cluster
            .server
            .requests()
            .iter()
            .any(|request| request.watch && request.status == 410);
        assert!(refused, "the server never answered a watch with HTTP 410");
        Ok(())
    })
}

#[test]
fn bookmarks_let_watches_resume_without_a_relist() -> anyhow::Result<()> {
    let cluster = Cluster::new()?;
    cluster
        .server
        .set_bookmark_interval(Duration::from_millis(100));
    run(async {
        let mut watch = cluster.watch().await?;
        cluster.tcp_echo(&[EndpointState::ready(POD_1)]);
        tcp_echo_on(&mut watch, "POD_1", POD_1).await?;
        // Other kinds move the resourceVersion on; bookmarks carry it to
        // the endpoint slice watch.
        cluster.server.apply(&node(NODE, NODE_ADDR));
        tokio::time::sleep(Duration::from_secs(1)).await;
        let lists = cluster.server.count("endpointslices", false);
        let watches = cluster.server.count("endpointslices", true);
        cluster.server.compact();
        cluster.server.drop_connections();
        eventually("the endpoint slice watch to be resumed", || {
            cluster.server.count("endpointslices", true) > watches
        })
        .await?;
        cluster.tcp_echo(&[EndpointState::ready(POD_2)]);
        tcp_echo_on(&mut watch, "POD_2", POD_2).await?;
        assert!(
            cluster.server.count("endpointslices", true) > watches,
            "the watch was resumed"
        );
        assert_eq!(
            cluster.server.count("endpointslices", false),
            lists,
            "no relist was needed"
        );
        Ok(())
    })
}

/// `GET path` on the test API server: (status, JSON body).
fn get(cluster: &Cluster, path: &str) -> anyhow::Result<(u16, serde_json::Value)> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(cluster.server.addr())?;
    stream.set_read_timeout(Some(FOLLOW))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("no end of head in {response:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no status in {head:?}"))?;
    Ok((status, serde_json::from_str(body)?))
}

/// The lists of a big cluster come in pages (kube-runtime asks for 500
/// objects at a time), so neither side holds one giant response.
#[test]
fn big_lists_come_in_pages() -> anyhow::Result<()> {
    const SERVICES: u16 = 1_100;
    let cluster = Cluster::new()?;
    for index in 0..SERVICES {
        let name = format!("web-{index}");
        let node_port = 30_000 + index;
        cluster.server.apply_quietly(&node_port_service(
            "default", &name, "TCP", 80, 8080, node_port,
        ));
        let pod = Ipv4Addr::from(u32::from(POD_1) + u32::from(index));
        cluster.server.apply_quietly(&endpoint_slice(
            "default",
            &format!("{name}-1"),
            &name,
            "TCP",
            8080,
            &[EndpointState::ready(pod)],
        ));
    }
    run(async {
        let mut watch = cluster.watch().await?;
        let state = state_where(&mut watch, "every service", |state| {
            state.services.len() == usize::from(SERVICES)
        })
        .await?;
        let last = SERVICES - 1;
        let pod = Ipv4Addr::from(u32::from(POD_1) + u32::from(last));
        assert_eq!(backends(&state, 30_000 + last), Some(vec![(pod, 8080)]));
        let lists: Vec<_> = cluster
            .server
            .requests()
            .into_iter()
            .filter(|request| request.plural == Some("endpointslices") && !request.watch)
            .collect();
        assert!(
            lists.iter().all(|list| list.query.contains("limit=500")),
            "{lists:#?}"
        );
        let continued = lists
            .iter()
            .filter(|list| list.query.contains("continue="))
            .count();
        assert_eq!(continued, 2, "{lists:#?}");
        Ok(())
    })
}

/// Pages carry the first page's resourceVersion and a token to the next;
/// a token from before a compaction is refused with 410 Expired, as
/// kube-apiserver refuses it.
#[test]
fn list_pages_and_expired_continue_tokens() -> anyhow::Result<()> {
    let cluster = Cluster::new()?;
    for name in ["a", "b", "c"] {
        cluster
            .server
            .apply(&node_port_service("default", name, "TCP", 80, 8080, 0));
    }
    let path = "/api/v1/services";
    let (status, first) = get(&cluster, &format!("{path}?limit=2"))?;
    assert_eq!(status, 200, "{first}");
    let names = |list: &serde_json::Value| -> Vec<String> {
        list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|item| item["metadata"]["name"].as_str().map(String::from))
            .collect()
    };
    assert_eq!(names(&first), ["a", "b"]);
    assert_eq!(first["metadata"]["remainingItemCount"], 1);
    let version = first["metadata"]["resourceVersion"].clone();
    let token = first["metadata"]["continue"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no continue token in {first}"))?
        .to_owned();
    cluster
        .server
        .apply(&node_port_service("default", "d", "TCP", 80, 8080, 0));
    let next = format!("{path}?limit=2&continue={token}");
    let (status, second) = get(&cluster, &next)?;
    assert_eq!(status, 200, "{second}");
    assert_eq!(names(&second), ["c", "d"]);
    assert_eq!(second["metadata"]["resourceVersion"], version);
    assert!(second["metadata"].get("continue").is_none(), "{second}");

    cluster.server.compact();
    let (status, expired) = get(&cluster, &next)?;
    assert_eq!(status, 410, "{expired}");
    assert_eq!(expired["reason"], "Expired");
    Ok(())
}

#[test]
fn only_this_node_is_watched() -> anyhow::Result<()> {
    let cluster = Cluster::new()?;
    cluster
        .server
        .apply(&node("node-b", Ipv4Addr::new(198, 18, 9, 1)));
    run(async {
        let mut watch = cluster.watch().await?;
        let view: std::sync::Arc<ClusterView> = watch.next().await;
        assert_eq!(
            view.node,
            NodeInfo {
                name: Some(NODE.to_owned()),
                addresses: vec![NODE_ADDR.into()],
            }
        );
        let node_watches = cluster
            .server
            .requests()
            .into_iter()
            .filter(|request| request.plural == Some("nodes"))
            .all(|request| {
                request
                    .query
                    .contains("fieldSelector=metadata.name%3Dnode-a")
            });
        assert!(node_watches, "{:#?}", cluster.server.requests());

        // This node's addresses change.
        cluster
            .server
            .apply(&node(NODE, Ipv4Addr::new(198, 18, 0, 9)));
        let view = watch.changed().await;
        assert_eq!(view.node.addresses, [Ipv4Addr::new(198, 18, 0, 9)]);
        assert!(cluster.server.delete::<Node>("", NODE));
        let view = watch.changed().await;
        assert_eq!(view.node.addresses, Vec::<Ipv4Addr>::new());
        Ok(())
    })
}

#[test]
fn cluster_source_gives_the_agent_whole_states() -> anyhow::Result<()> {
    let cluster = Cluster::new()?;
    cluster.tcp_echo(&[EndpointState::ready(POD_1)]);
    run(async {
        let mut source = ClusterSource::start(SourceOptions::Kubernetes {
            kubeconfig: Some(cluster.kubeconfig()),
            node_name: Some(NODE.to_owned()),
        })
        .await?;
        let mut base = base();
        base.node_addresses = Some(vec![Ipv4Addr::new(198, 18, 0, 7).into()]);
        let state = source.desired(&base);
        assert_eq!(backends(&state, 30999), Some(vec![(POD_1, 3333)]));
        assert_eq!(
            state.node_addresses, base.node_addresses,
            "the config's node addresses win"
        );

        cluster.tcp_echo(&[EndpointState::ready(POD_1), EndpointState::ready(POD_2)]);
        loop {
            source.changed().await;
            let state = source.desired(&base);
            if backends(&state, 30999).is_some_and(|backends| backends.len() == 2) {
                break;
            }
        }
        Ok(())
    })
}

#[test]
fn kubernetes_source_needs_a_node_name() {
    let outcome = run(async {
        let options = SourceOptions::Kubernetes {
            kubeconfig: Some(std::path::PathBuf::from("/nonexistent/kubeconfig")),
            node_name: None,
        };
        // Without NODE_NAME in the environment the node name is missing;
        // with it (a developer's shell), the kubeconfig is.
        match ClusterSource::start(options).await {
            Ok(_) => anyhow::bail!("started without a node name or kubeconfig"),
            Err(error) => {
                let text = error.to_string();
                assert!(
                    text.contains("--node-name") || text.contains("--kubeconfig"),
                    "{text}"
                );
                Ok(())
            }
        }
    });
    assert!(outcome.is_ok(), "{outcome:?}");
}

#[test]
fn a_rejected_config_does_not_become_the_base() -> anyhow::Result<()> {
    let dir = ScratchDir::new()?;
    let manifests = dir.write(
        "app.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {type: NodePort, ports: [{port: 80, nodePort: 30080}]}\n",
    )?;
    run(async {
        let mut source = ClusterSource::start(SourceOptions::Manifests {
            path: manifests,
            node_name: None,
        })
        .await?;
        let applied = base();
        let state = source.desired(&applied);
        assert_eq!(state.services.len(), 1);
        assert_eq!(state.interfaces, applied.interfaces);

        // The agent rejects the next file config (it does not fit the maps)
        // and keeps the previous one as the base: the source remembers no
        // base of its own, so cluster changes apply over the agent's.
        let mut too_big = base();
        too_big.interfaces = vec![String::from("eth9")];
        assert_eq!(source.desired(&too_big).interfaces, ["eth9"]);
        assert_eq!(source.desired(&applied).interfaces, applied.interfaces);
        Ok(())
    })
}

/// `address`, which these IPv4 clusters' backends all are.
fn ipv4(address: std::net::IpAddr) -> Ipv4Addr {
    match address {
        std::net::IpAddr::V4(address) => address,
        std::net::IpAddr::V6(address) => panic!("an IPv6 backend {address} in an IPv4 cluster"),
    }
}
