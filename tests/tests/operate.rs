//! Operating xlb: `xlb status/services/flows/stats --json`, /metrics and
//! the probes report exactly the traffic the lab sent, the run directory
//! follows reloads, healthCheckNodePorts answer as kube-proxy's do, and the
//! CLI says clearly when no agent runs.
//!
//! The agent runs in the node namespace with its own bpffs mount and run
//! directory (LAB-NOTES pitfall 6: `ip netns exec` remounts /sys); the CLI
//! runs there too, and /metrics is reached from inside it.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use serde_json::Value;
use xlb_tests::client::{pattern, tcp_who_echo, udp_exchange, udp_socket, udp_socket6};
use xlb_tests::lab::{
    CLIENT_ADDR, CLIENT_ADDR6, ECHO_TCP_PORT, ECHO_UDP_PORT, NODE_ADDR, TCP_ECHO_NODE_PORT,
    UDP_ECHO_NODE_PORT, tcp_echo_service, udp_echo_service, udp_echo_service6,
};
use xlb_tests::{Agent, Bpffs, Lab, XLB_BIN_ENV, bin_from_env, poll_until};

/// Where the agent answers /metrics inside the node namespace (the default).
const METRICS: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9090));
/// UDP datagrams and TCP connections the counting test sends.
const DATAGRAMS: u64 = 100;
const CONNECTIONS: u64 = 10;
/// Payload of each datagram: frames are 14 + 20 + 8 + 64 = 106 bytes.
const DATAGRAM_PAYLOAD: usize = 64;
const DATAGRAM_FRAME: u64 = 106;

/// An agent with its pins and run directory, and the CLI pointed at them.
struct Operated<'lab> {
    agent: Agent<'lab>,
    // Dropped after the agent (fields drop in order).
    bpffs: Bpffs,
    run_dir: PathBuf,
    xlb: PathBuf,
}

impl<'lab> Operated<'lab> {
    fn start(lab: &'lab Lab, config: &Path) -> anyhow::Result<Operated<'lab>> {
        let xlb = bin_from_env(XLB_BIN_ENV)?;
        let bpffs = Bpffs::mount(lab)?;
        let run_dir = lab.dir().join("run");
        let args = [
            "--bpffs",
            path_str(bpffs.path())?,
            "--run-dir",
            path_str(&run_dir)?,
        ];
        let agent = Agent::start_with(&xlb, lab, config, &args)?;
        Ok(Operated {
            agent,
            bpffs,
            run_dir,
            xlb,
        })
    }

    /// `xlb ARGS --json --bpffs .. --run-dir ..` in the node namespace.
    fn cli_output(&self, args: &[&str]) -> anyhow::Result<Output> {
        cli_in(
            self.agent.lab(),
            &self.xlb,
            args,
            self.bpffs.path(),
            &self.run_dir,
        )
    }

    /// As `cli_output`, parsed; fails (with the agent's log) on exit != 0.
    fn cli(&self, args: &[&str]) -> anyhow::Result<Value> {
        let output = self.cli_output(args)?;
        if !output.status.success() {
            return Err(self
                .agent
                .failure(format!(
                    "xlb {} failed ({}): {}",
                    args.join(" "),
                    output.status,
                    String::from_utf8_lossy(&output.stderr)
                ))
                .into());
        }
        serde_json::from_slice(&output.stdout)
            .with_context(|| format!("xlb {} printed no JSON", args.join(" ")))
    }
}

fn path_str(path: &Path) -> anyhow::Result<&str> {
    path.to_str().context("non-UTF-8 path")
}

fn cli_in(
    lab: &Lab,
    xlb: &Path,
    args: &[&str],
    bpffs: &Path,
    run_dir: &Path,
) -> anyhow::Result<Output> {
    let mut command = lab.node.command(xlb);
    command
        .args(args)
        .arg("--json")
        .arg("--bpffs")
        .arg(bpffs)
        .arg("--run-dir")
        .arg(run_dir);
    command
        .output()
        .with_context(|| format!("running xlb {}", args.join(" ")))
}

/// GET `path` on the agent's metrics listener, from inside the node
/// namespace.
fn http_get(lab: &Lab, address: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let path = path.to_owned();
    Ok(lab
        .node
        .run(move || xlb::observe::http::get(address, &path))??)
}

/// The value of one series (`name{labels}` exactly as exposed).
fn sample(metrics: &str, series: &str) -> anyhow::Result<f64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .with_context(|| format!("no {series} in /metrics:\n{metrics}"))?
        .parse()
        .with_context(|| format!("{series} is not a number"))
}

/// Packets of one reason in `xlb stats --json`.
fn reason(stats: &Value, name: &str) -> anyhow::Result<u64> {
    stats["reasons"]
        .as_array()
        .context("stats has no reasons")?
        .iter()
        .find(|r| r["reason"] == name)
        .and_then(|r| r["packets"].as_u64())
        .with_context(|| format!("no reason {name} in {stats}"))
}

fn u64_at(value: &Value, pointer: &str) -> anyhow::Result<u64> {
    value
        .pointer(pointer)
        .and_then(Value::as_u64)
        .with_context(|| format!("no number at {pointer} in {value}"))
}

/// The service called `name` in `xlb services --json`.
fn service<'a>(services: &'a Value, name: &str) -> anyhow::Result<&'a Value> {
    services["services"]
        .as_array()
        .context("no services array")?
        .iter()
        .find(|s| s["name"] == name)
        .with_context(|| format!("no service {name} in {services}"))
}

/// The demo services, with conntrack timeouts long enough that no flow
/// is swept while the test looks at it.
fn config(lab: &Lab) -> String {
    let services = format!(
        "  - name: tcp-echo\n    protocol: TCP\n    nodePort: {TCP_ECHO_NODE_PORT}\n    targetPort: {ECHO_TCP_PORT}\n    backends:\n{b}\
         \x20 - name: udp-echo\n    protocol: UDP\n    nodePort: {UDP_ECHO_NODE_PORT}\n    targetPort: {ECHO_UDP_PORT}\n    backends:\n{b}",
        b = lab
            .backends
            .iter()
            .map(|backend| format!("      - address: {}\n", backend.addr))
            .collect::<String>()
    );
    format!(
        "{}conntrack:\n  udpTimeoutSeconds: 600\n  tcpClosingTimeoutSeconds: 600\n",
        lab.config_yaml(&services)
    )
}

#[test]
fn counters_flows_and_metrics_report_exactly_the_traffic_sent() -> anyhow::Result<()> {
    let lab = Lab::new(2)?;
    let config = lab.write_file("xlb.yaml", &config(&lab))?;
    let operated = Operated::start(&lab, &config)?;

    let before = operated.cli(&["stats"])?;
    for name in ["fwd_new_flow", "fwd_established", "fwd_reply"] {
        assert_eq!(reason(&before, name)?, 0, "{name} before any traffic");
    }

    // Exactly 100 datagrams (each answered) on one flow, then exactly 10
    // TCP connections, each opened, used and closed by both sides.
    let udp_client = lab.client.run(|| -> anyhow::Result<SocketAddr> {
        let socket = udp_socket()?;
        for index in 0..DATAGRAMS {
            let payload = pattern(DATAGRAM_PAYLOAD, index as u32);
            let (reply, from) = udp_exchange(&socket, udp_echo_service(), &payload)?;
            ensure!(
                reply == payload && from == udp_echo_service(),
                "datagram {index}"
            );
        }
        Ok(socket.local_addr()?)
    })??;
    lab.client.run(|| -> anyhow::Result<()> {
        for connection in 0..CONNECTIONS {
            tcp_who_echo(tcp_echo_service(), &pattern(1000, connection as u32))
                .with_context(|| format!("connection {connection}"))?;
        }
        Ok(())
    })??;

    // Last ACKs may still be on their way: wait until the counters settle.
    let mut previous = Value::Null;
    let stats = poll_until(
        "the datapath's counters to settle",
        Duration::from_secs(10),
        || {
            std::thread::sleep(Duration::from_millis(200));
            let now = operated.cli(&["stats"]).ok()?;
            let settled = now == previous;
            previous = now.clone();
            settled.then_some(now)
        },
    )?;

    // xlb stats: one new flow per UDP flow and TCP connection.
    let new_flows = reason(&stats, "fwd_new_flow")?;
    let established = reason(&stats, "fwd_established")?;
    let replies = reason(&stats, "fwd_reply")?;
    assert_eq!(new_flows, 1 + CONNECTIONS, "{stats:#}");
    assert_eq!(
        u64_at(&stats, "/verdicts/forward")?,
        new_flows + established + replies
    );
    for name in ["drop_no_backend", "drop_flow_insert", "drop_snat_exhausted"] {
        assert_eq!(reason(&stats, name)?, 0, "{name}");
    }

    // xlb services: UDP exactly; TCP consistent with the verdicts.
    let services = operated.cli(&["services"])?;
    let udp = service(&services, "udp-echo")?;
    assert_eq!(udp["namespace"], "default");
    assert_eq!(udp["frontends"][0]["address"], NODE_ADDR.to_string());
    assert_eq!(udp["frontends"][0]["port"], UDP_ECHO_NODE_PORT);
    let udp_traffic = &udp["traffic"];
    assert_eq!(u64_at(udp_traffic, "/to_backend_packets")?, DATAGRAMS);
    assert_eq!(u64_at(udp_traffic, "/to_client_packets")?, DATAGRAMS);
    assert_eq!(
        u64_at(udp_traffic, "/to_backend_bytes")?,
        DATAGRAMS * DATAGRAM_FRAME
    );
    assert_eq!(
        u64_at(udp_traffic, "/to_client_bytes")?,
        DATAGRAMS * DATAGRAM_FRAME
    );
    // One flow: one backend got all of it, the other nothing.
    let mut per_backend: Vec<u64> = udp["backends"]
        .as_array()
        .context("udp-echo backends")?
        .iter()
        .map(|b| u64_at(b, "/traffic/to_backend_packets"))
        .collect::<anyhow::Result<_>>()?;
    per_backend.sort_unstable();
    assert_eq!(per_backend, [0, DATAGRAMS]);

    let tcp = service(&services, "tcp-echo")?;
    let tcp_to_backend = u64_at(tcp, "/traffic/to_backend_packets")?;
    let tcp_to_client = u64_at(tcp, "/traffic/to_client_packets")?;
    assert!(
        tcp_to_backend >= 4 * CONNECTIONS && tcp_to_client >= 4 * CONNECTIONS,
        "{tcp:#}"
    );
    assert_eq!(tcp_to_backend + DATAGRAMS, new_flows + established);
    assert_eq!(tcp_to_client + DATAGRAMS, replies);
    for (field, total) in [
        ("to_backend_packets", tcp_to_backend),
        ("to_client_packets", tcp_to_client),
    ] {
        let sum: u64 = tcp["backends"]
            .as_array()
            .context("tcp-echo backends")?
            .iter()
            .map(|b| u64_at(b, &format!("/traffic/{field}")))
            .sum::<anyhow::Result<u64>>()?;
        assert_eq!(sum, total, "tcp-echo backends' {field}");
    }

    // xlb flows: 11 flows; the UDP one with its exact tuples.
    let flows = operated.cli(&["flows"])?;
    assert_eq!(u64_at(&flows, "/matched")?, 1 + CONNECTIONS, "{flows:#}");
    assert_eq!(u64_at(&flows, "/entries")?, 2 * (1 + CONNECTIONS));
    let udp_flows = operated.cli(&["flows", "--service", "udp-echo"])?;
    let [udp_flow] = udp_flows["flows"].as_array().context("flows")?.as_slice() else {
        bail!("expected one UDP flow: {udp_flows:#}");
    };
    assert_eq!(udp_flow["protocol"], "UDP");
    // The client sent more than one datagram: the flow is assured.
    assert_eq!(udp_flow["state"], "assured");
    let client = SocketAddr::from((CLIENT_ADDR, udp_client.port()));
    assert_eq!(udp_flow["original"]["source"], client.to_string());
    assert_eq!(
        udp_flow["original"]["destination"],
        udp_echo_service().to_string()
    );
    let backend = udp_flow["backend"]["name"]
        .as_str()
        .context("backend name")?;
    let backend = lab
        .backends
        .iter()
        .find(|b| SocketAddr::from((b.addr, ECHO_UDP_PORT)).to_string() == backend)
        .with_context(|| format!("flow to unknown backend {backend}"))?;
    assert_eq!(
        udp_flow["translated"]["destination"],
        SocketAddr::from((backend.addr, ECHO_UDP_PORT)).to_string()
    );
    let masquerade: SocketAddr = udp_flow["translated"]["source"]
        .as_str()
        .context("translated source")?
        .parse()?;
    assert_eq!(masquerade.ip(), backend.node_addr);
    assert_eq!(udp_flow["service"]["name"], "default/udp-echo");
    let tcp_flows = operated.cli(&["flows", "--service", "default/tcp-echo"])?;
    let tcp_flows = tcp_flows["flows"].as_array().context("flows")?;
    assert_eq!(tcp_flows.len() as u64, CONNECTIONS);
    for flow in tcp_flows {
        assert_eq!(flow["state"], "closed", "{flow:#}");
    }
    let limited = operated.cli(&["flows", "--limit", "3"])?;
    assert_eq!(limited["flows"].as_array().map(Vec::len), Some(3));
    assert_eq!(u64_at(&limited, "/matched")?, 1 + CONNECTIONS);

    // Filters: by client, by backend, by state; all must hold.
    let by_source = operated.cli(&["flows", "--src", &client.to_string()])?;
    assert_eq!(u64_at(&by_source, "/matched")?, 1, "{by_source:#}");
    let by_address = operated.cli(&["flows", "--src", &CLIENT_ADDR.to_string()])?;
    assert_eq!(u64_at(&by_address, "/matched")?, 1 + CONNECTIONS);
    let udp_backend = SocketAddr::from((backend.addr, ECHO_UDP_PORT)).to_string();
    let by_backend = operated.cli(&["flows", "--backend", &udp_backend])?;
    assert_eq!(u64_at(&by_backend, "/matched")?, 1, "{by_backend:#}");
    let by_state = operated.cli(&["flows", "--state", "closed"])?;
    assert_eq!(u64_at(&by_state, "/matched")?, CONNECTIONS, "{by_state:#}");
    let none = operated.cli(&["flows", "--state", "replied", "--service", "tcp-echo"])?;
    assert_eq!(u64_at(&none, "/matched")?, 0, "{none:#}");

    // xlb status: running, ready, attached, conntrack filled as counted.
    let status = operated.cli(&["status"])?;
    assert_eq!(status["agent"]["running"], true, "{status:#}");
    assert_eq!(status["agent"]["ready"], true);
    assert_eq!(status["agent"]["generation"], 1);
    assert_eq!(
        u64_at(&status, "/conntrack/entries")?,
        2 * (1 + CONNECTIONS)
    );
    assert!(status["program_id"].as_u64().is_some(), "{status:#}");
    let interfaces = status["interfaces"].as_array().context("interfaces")?;
    assert_eq!(interfaces.len(), 1 + lab.backends.len(), "{status:#}");
    for interface in interfaces {
        let mode = interface["mode"].as_str().unwrap_or_default();
        assert!(mode == "native" || mode == "generic", "{interface}");
    }

    // /metrics says the same.
    let (code, metrics) = http_get(&lab, METRICS, "/metrics")?;
    assert_eq!(code, 200, "{metrics}");
    let udp_series = |name: &str, direction: &str| {
        format!(
            "{name}{{namespace=\"default\",service=\"udp-echo\",protocol=\"UDP\",direction=\"{direction}\"}}"
        )
    };
    for direction in ["to_backend", "to_client"] {
        let packets = sample(
            &metrics,
            &udp_series("xlb_service_packets_total", direction),
        )?;
        assert_eq!(packets, DATAGRAMS as f64);
        let bytes = sample(&metrics, &udp_series("xlb_service_bytes_total", direction))?;
        assert_eq!(bytes, (DATAGRAMS * DATAGRAM_FRAME) as f64);
    }
    let tcp_series = "xlb_service_packets_total{namespace=\"default\",service=\"tcp-echo\",protocol=\"TCP\",direction=\"to_backend\"}";
    assert_eq!(sample(&metrics, tcp_series)?, tcp_to_backend as f64);
    let verdict = |reason: &str| {
        format!("xlb_datapath_packets_total{{reason=\"{reason}\",verdict=\"forward\"}}")
    };
    assert_eq!(
        sample(&metrics, &verdict("fwd_new_flow"))?,
        new_flows as f64
    );
    assert_eq!(sample(&metrics, &verdict("fwd_reply"))?, replies as f64);
    let backend_series = format!(
        "xlb_backend_packets_total{{backend=\"{}:{ECHO_UDP_PORT}\",direction=\"to_client\"}}",
        backend.addr
    );
    assert_eq!(sample(&metrics, &backend_series)?, DATAGRAMS as f64);
    assert_eq!(
        sample(&metrics, "xlb_conntrack_entries")?,
        (2 * (1 + CONNECTIONS)) as f64
    );
    assert_eq!(sample(&metrics, "xlb_ready")?, 1.0);
    assert_eq!(sample(&metrics, "xlb_config_generation")?, 1.0);
    assert!(sample(&metrics, "xlb_reconcile_duration_seconds_count")? >= 1.0);
    for probe in ["/healthz", "/readyz"] {
        assert_eq!(http_get(&lab, METRICS, probe)?.0, 200, "{probe}");
    }

    // Once the agent has stopped, the CLI says so.
    let Operated {
        agent,
        bpffs,
        run_dir,
        xlb,
    } = operated;
    agent.stop_cleanly()?;
    let output = cli_in(&lab, &xlb, &["stats"], bpffs.path(), &run_dir)?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("no xlb agent is running"),
        "after stop: {} {stderr}",
        output.status
    );
    Ok(())
}

#[test]
fn status_and_metrics_follow_reloads() -> anyhow::Result<()> {
    let lab = Lab::new(1)?;
    let config = lab.write_file("xlb.yaml", &config(&lab))?;
    let mut operated = Operated::start(&lab, &config)?;
    let services = operated.cli(&["services"])?;
    assert_eq!(services["services"].as_array().map(Vec::len), Some(2));

    // A config with a mistake is rejected: generation 1 stays, and the
    // status, the metrics and the catalog say so.
    let since = operated.agent.log().len();
    lab.write_file("xlb.yaml", "services:\n  - name: x\n    nodePort: 99999\n")?;
    operated.agent.reload()?;
    operated
        .agent
        .wait_for_log(since, "config rejected", Duration::from_secs(15))?;
    let status = poll_until(
        "status.json to record the failure",
        Duration::from_secs(5),
        || {
            let status = operated.cli(&["status"]).ok()?;
            (status["agent"]["last_reload"]["ok"] == false).then_some(status)
        },
    )?;
    assert_eq!(status["agent"]["generation"], 1);
    let error = status["agent"]["last_reload"]["error"]
        .as_str()
        .unwrap_or_default();
    assert!(error.contains("99999"), "{status:#}");
    let (_, metrics) = http_get(&lab, METRICS, "/metrics")?;
    assert_eq!(sample(&metrics, "xlb_config_last_reload_successful")?, 0.0);
    assert_eq!(
        sample(&metrics, "xlb_config_reloads_total{result=\"failure\"}")?,
        1.0
    );
    assert_eq!(
        sample(&metrics, "xlb_source_errors_total{source=\"file\"}")?,
        1.0
    );

    // A good config: generation 2, one service left.
    let backend = &lab.backends[0];
    let one_service = lab.config_yaml(&format!(
        "  - name: udp-echo\n    protocol: UDP\n    nodePort: {UDP_ECHO_NODE_PORT}\n    targetPort: {ECHO_UDP_PORT}\n    backends:\n      - address: {}\n",
        backend.addr
    ));
    lab.write_file("xlb.yaml", &one_service)?;
    assert_eq!(operated.agent.reload_and_wait()?, 2);
    let status = operated.cli(&["status"])?;
    assert_eq!(status["agent"]["generation"], 2);
    assert_eq!(status["agent"]["last_reload"]["ok"], true);
    let services = operated.cli(&["services"])?;
    let [only] = services["services"]
        .as_array()
        .context("services")?
        .as_slice()
    else {
        bail!("expected one service: {services:#}");
    };
    assert_eq!(only["name"], "udp-echo");
    let (_, metrics) = http_get(&lab, METRICS, "/metrics")?;
    assert_eq!(sample(&metrics, "xlb_config_generation")?, 2.0);
    assert_eq!(sample(&metrics, "xlb_config_last_reload_successful")?, 1.0);
    assert_eq!(sample(&metrics, "xlb_services")?, 1.0);
    Ok(())
}

#[test]
fn health_check_node_ports_answer_like_kube_proxy() -> anyhow::Result<()> {
    const HEALTH_PORT: u16 = 32_001;
    let lab = Lab::new(2)?;
    let (local, remote) = (&lab.backends[0], &lab.backends[1]);
    let services = |local_ready: bool, health_check: bool| {
        let mut text = format!(
            "  - name: web\n    namespace: shop\n    protocol: TCP\n    nodePort: {TCP_ECHO_NODE_PORT}\n    targetPort: {ECHO_TCP_PORT}\n    externalTrafficPolicy: Local\n"
        );
        if health_check {
            text.push_str(&format!("    healthCheckNodePort: {HEALTH_PORT}\n"));
        }
        text.push_str(&format!(
            "    backends:\n      - address: {}\n        local: true\n        ready: {local_ready}\n        serving: true\n        terminating: {}\n      - address: {}\n",
            local.addr, !local_ready, remote.addr
        ));
        lab.config_yaml(&text)
    };
    let config = lab.write_file("xlb.yaml", &services(true, true))?;
    let mut operated = Operated::start(&lab, &config)?;
    // Asked from outside, as a cloud load balancer does.
    let health = SocketAddr::from((NODE_ADDR, HEALTH_PORT));
    let ask = || -> anyhow::Result<(u16, Value)> {
        let (code, body) = lab
            .client
            .run(|| xlb::observe::http::get(health, "/healthz"))??;
        Ok((code, serde_json::from_str(&body)?))
    };

    let (code, body) = poll_until("the health check server", Duration::from_secs(5), || {
        ask().ok()
    })?;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body,
        serde_json::json!({
            "service": {"namespace": "shop", "name": "web"},
            "localEndpoints": 1,
            "serviceProxyHealthy": true
        })
    );

    // The local endpoint terminates (still serving): no ready local
    // endpoint, so the load balancer must stop sending here.
    lab.write_file("xlb.yaml", &services(false, true))?;
    operated.agent.reload_and_wait()?;
    let (code, body) = ask()?;
    assert_eq!((code, &body["localEndpoints"]), (503, &Value::from(0)));

    // Without a healthCheckNodePort the server goes away.
    lab.write_file("xlb.yaml", &services(true, false))?;
    operated.agent.reload_and_wait()?;
    let gone = poll_until(
        "the health check port to close",
        Duration::from_secs(5),
        || ask().is_err().then_some(()),
    );
    assert!(gone.is_ok(), "port {HEALTH_PORT} still answers");
    Ok(())
}

#[test]
fn cli_says_what_to_do_when_no_agent_runs() -> anyhow::Result<()> {
    let xlb = bin_from_env(XLB_BIN_ENV)?;
    let scratch = xlb_tests::ScratchDir::new()?;
    let missing = scratch.path().join("nothing");
    for command in ["status", "services", "flows", "stats"] {
        let output = Command::new(&xlb)
            .arg(command)
            .arg("--bpffs")
            .arg(&missing)
            .arg("--run-dir")
            .arg(&missing)
            .output()?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{command}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "no xlb agent is running with --bpffs {}",
                missing.display()
            )) && stderr.contains("start one with `xlb run --config FILE`"),
            "{command}: {stderr}"
        );
        assert!(output.stdout.is_empty(), "{command} printed to stdout");
    }
    Ok(())
}

#[test]
fn datapath_debug_logs_reach_the_agent_log() -> anyhow::Result<()> {
    let lab = Lab::new(1)?;
    let config = lab.write_file("xlb.yaml", &config(&lab))?;
    let xlb = bin_from_env(XLB_BIN_ENV)?;
    let agent = Agent::start_with(&xlb, &lab, &config, &["--datapath-debug"])?;
    let since = agent.log().len();
    let client = lab.client.run(|| -> anyhow::Result<SocketAddr> {
        let socket = udp_socket()?;
        udp_exchange(&socket, udp_echo_service(), b"debug me")?;
        Ok(socket.local_addr()?)
    })??;
    // The datapath's own words (lb-ebpf's aya-log statement), with the
    // client's tuple.
    let line = agent.wait_for_log(
        since,
        &format!("new flow proto 17 {CLIENT_ADDR}:{}", client.port()),
        Duration::from_secs(10),
    )?;
    assert!(line.contains("DEBUG"), "{line}");
    Ok(())
}

/// IPv6 flows are listed with their own tuples and filtered by IPv6
/// endpoints; a dual-stack service's IPv6 half is a service of its own
/// (`(IPv6)`) in `xlb services`, and /metrics counts IPv6 conntrack.
#[test]
fn ipv6_flows_services_and_metrics_are_reported() -> anyhow::Result<()> {
    let lab = Lab::new(2)?;
    let backends: String = lab
        .backends
        .iter()
        .map(|backend| {
            format!(
                "      - address: {}\n      - address: {}\n",
                backend.addr, backend.addr6
            )
        })
        .collect();
    let services = format!(
        "  - name: udp-echo\n    protocol: UDP\n    nodePort: {UDP_ECHO_NODE_PORT}\n    targetPort: {ECHO_UDP_PORT}\n    backends:\n{backends}"
    );
    let config = format!(
        "{}conntrack:\n  udpTimeoutSeconds: 600\n",
        lab.dual_stack_config_yaml(&services)
    );
    let config = lab.write_file("xlb.yaml", &config)?;
    let operated = Operated::start(&lab, &config)?;
    let client = lab.client.run(|| -> anyhow::Result<SocketAddr> {
        let socket = udp_socket6()?;
        for index in 0..3 {
            let payload = pattern(32, index);
            let (reply, from) = udp_exchange(&socket, udp_echo_service6(), &payload)?;
            ensure!(
                reply == payload && from == udp_echo_service6(),
                "echo from {from}"
            );
        }
        Ok(socket.local_addr()?)
    })??;
    let client = SocketAddr::new(CLIENT_ADDR6.into(), client.port());

    let flows = operated.cli(&["flows", "--src", &CLIENT_ADDR6.to_string()])?;
    let [flow] = flows["flows"].as_array().context("flows")?.as_slice() else {
        bail!("expected one IPv6 flow: {flows:#}");
    };
    assert_eq!(flow["original"]["source"], client.to_string());
    assert_eq!(
        flow["original"]["destination"],
        udp_echo_service6().to_string()
    );
    assert_eq!(flow["state"], "assured");
    assert_eq!(flow["service"]["name"], "default/udp-echo (IPv6)");
    let backend: SocketAddr = flow["translated"]["destination"]
        .as_str()
        .context("translated destination")?
        .parse()?;
    let pod = lab
        .backends
        .iter()
        .find(|b| std::net::IpAddr::from(b.addr6) == backend.ip())
        .with_context(|| format!("flow to unknown backend {backend}"))?;
    let masquerade: SocketAddr = flow["translated"]["source"]
        .as_str()
        .context("translated source")?
        .parse()?;
    assert_eq!(masquerade.ip(), std::net::IpAddr::from(pod.node_addr6));
    let by_backend = operated.cli(&["flows", "--backend", &backend.to_string()])?;
    assert_eq!(u64_at(&by_backend, "/matched")?, 1, "{by_backend:#}");

    let services = operated.cli(&["services"])?;
    service(&services, "udp-echo (IPv6)")?;
    service(&services, "udp-echo")?;
    let (_, metrics) = http_get(&lab, METRICS, "/metrics")?;
    assert_eq!(
        sample(&metrics, "xlb_conntrack6_entries")?,
        2.0,
        "{metrics}"
    );
    Ok(())
}
