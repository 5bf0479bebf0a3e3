//! The agent image, run by podman in the lab's node namespace with exactly
//! what the development overlay's DaemonSet gives it: its capabilities
//! (nothing else, not privileged), no privilege escalation, the runtime's
//! default seccomp filter, a read-only root, its args and its volumes (xlb's
//! own bpffs directory, the config, an emptyDir run directory). The
//! DaemonSet is read from `kubectl kustomize deploy/overlays/development`,
//! not restated here, so the test follows deploy/ as it changes.
//!
//! It shows the container serving NodePort traffic, exporting datapath
//! counters on /metrics, and a second container (a rolling update) adopting
//! the first one's pins with no flow lost.
//!
//! Skips, saying why, only when podman cannot run at all.

#[path = "semantics/stream.rs"]
#[allow(dead_code, reason = "shared with restart.rs, which uses all of it")]
mod stream;

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Container, PodSpec};
use xlb_tests::image::{self, Contents};
use xlb_tests::lab::{NODE_ADDR, NODE_CLIENT_IF};
use xlb_tests::{Bpffs, Lab, XLB_BIN_ENV, XLB_ECHO_BIN_ENV, bin_from_env, poll_until};

use stream::{Connection, SocketDrops, Stream};

const UDP_PORT: u16 = 30970;
const TCP_PORT: u16 = 30971;
/// The agent's default --metrics-addr, inside the node namespace.
const METRICS: &str = "127.0.0.1:9090";
/// The host path the DaemonSet's bpffs volume names lives under this
/// prefix; the test's own bpffs stands for it.
const HOST_BPFFS: &str = "/sys/fs/bpf";
/// The host's cgroup hierarchy the socket hooks attach to. The test stands
/// in for it with a child cgroup of its own (never the machine's root).
const HOST_CGROUP: &str = "/sys/fs/cgroup";
/// Where this machine's cgroup v2 hierarchy is (hybrid mode).
const CGROUP2_ROOT: &str = "/sys/fs/cgroup/unified";

/// CAP_NET_ADMIN (12), CAP_PERFMON (38), CAP_BPF (39).
const NAMED_CAPS: u64 = (1 << 12) | (1 << 38) | (1 << 39);

fn services() -> String {
    let both = "      - address: 198.18.1.2\n      - address: 198.18.2.2\n";
    format!(
        "  - name: udp-echo\n    protocol: UDP\n    nodePort: {UDP_PORT}\n    targetPort: 4444\n    backends:\n{both}\
         \n  - name: tcp-echo\n    protocol: TCP\n    nodePort: {TCP_PORT}\n    targetPort: 3333\n    backends:\n{both}"
    )
}

/// The agent's container and pod spec in the rendered development overlay.
fn daemonset() -> anyhow::Result<(PodSpec, Container)> {
    let dir = xlb_tests::repo_root().join("deploy/overlays/development");
    for value in xlb_tests::kustomize::render(&dir)? {
        if value.get("kind").and_then(serde_yaml::Value::as_str) != Some("DaemonSet") {
            continue;
        }
        let set: DaemonSet = serde_yaml::from_value(value)?;
        let pod = set
            .spec
            .and_then(|spec| spec.template.spec)
            .context("the DaemonSet has no pod spec")?;
        let container = pod
            .containers
            .iter()
            .find(|c| c.name == "xlb")
            .cloned()
            .context("the DaemonSet has no container xlb")?;
        return Ok((pod, container));
    }
    bail!("{} renders no DaemonSet", dir.display())
}

/// Where the lab keeps what the pod's volumes stand for.
struct Volumes<'a> {
    /// Holds `config.yaml` (the ConfigMap).
    config_dir: PathBuf,
    /// The test's bpffs: the host's /sys/fs/bpf.
    bpffs: &'a Path,
    /// emptyDirs are new for every pod.
    pod_dir: PathBuf,
    /// The test's own child cgroup: the host's cgroup root.
    cgroup: &'a Path,
}

/// A child cgroup of the test's own, removed on drop (the socket hooks
/// attached to it go with the test's bpffs).
struct ChildCgroup(PathBuf);

impl ChildCgroup {
    fn create() -> anyhow::Result<ChildCgroup> {
        let path = Path::new(CGROUP2_ROOT).join(format!("xlb-container-{}", std::process::id()));
        std::fs::create_dir_all(&path)
            .with_context(|| format!("creating the test's cgroup {}", path.display()))?;
        Ok(ChildCgroup(path))
    }
}

impl Drop for ChildCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// `podman run` arguments for the DaemonSet's container, in the lab.
fn podman_args(
    pod: &PodSpec,
    container: &Container,
    volumes: &Volumes<'_>,
    seccomp: &Path,
    netns: &str,
    name: &str,
    image: &str,
) -> anyhow::Result<Vec<OsString>> {
    let mut args: Vec<OsString> = ["run", "--detach", "--name", name]
        .into_iter()
        .map(OsString::from)
        .collect();
    let mut push = |arg: String| args.push(arg.into());
    ensure!(
        pod.host_network == Some(true),
        "the test runs the container in the node's network namespace, as hostNetwork does"
    );
    push(format!("--network=ns:/var/run/netns/{netns}"));
    // LAB-NOTES 11: rlimits under this machine's hard limits.
    push("--ulimit=nofile=1024:1024".into());
    push("--ulimit=nproc=1024:1024".into());
    let security = container
        .security_context
        .as_ref()
        .context("no securityContext")?;
    ensure!(security.privileged != Some(true), "privileged");
    let capabilities = security.capabilities.as_ref().context("no capabilities")?;
    ensure!(
        capabilities.drop.as_deref() == Some(&[String::from("ALL")][..]),
        "capabilities.drop must be [ALL]"
    );
    push("--cap-drop=all".into());
    for cap in capabilities.add.iter().flatten() {
        push(format!("--cap-add=CAP_{cap}"));
    }
    if security.allow_privilege_escalation == Some(false) {
        push("--security-opt=no-new-privileges".into());
    }
    if security.read_only_root_filesystem == Some(true) {
        // No tmpfs on /tmp, /run, /var/tmp either: only what the pod mounts.
        push("--read-only".into());
        push("--read-only-tmpfs=false".into());
    }
    if let Some(user) = security.run_as_user {
        push(format!("--user={user}"));
    }
    match security.seccomp_profile.as_ref().map(|p| p.type_.as_str()) {
        Some("RuntimeDefault") => push(format!("--security-opt=seccomp={}", seccomp.display())),
        other => bail!("seccompProfile {other:?}: the test knows RuntimeDefault"),
    }
    for mount in container.volume_mounts.iter().flatten() {
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == mount.name)
            .with_context(|| format!("no volume {}", mount.name))?;
        let source = if volume.config_map.is_some() {
            volumes.config_dir.clone()
        } else if volume.empty_dir.is_some() {
            let dir = volumes.pod_dir.join(&mount.name);
            std::fs::create_dir_all(&dir)?;
            dir
        } else if let Some(secret) = &volume.secret {
            // The Secret xlb-hash-seed, present: its key as a file.
            ensure!(
                secret.secret_name.as_deref() == Some("xlb-hash-seed"),
                "secret volume {}: the test stands in only for xlb-hash-seed",
                mount.name
            );
            let dir = volumes.pod_dir.join(&mount.name);
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join("seed"), "0123456789abcdef0011223344556677\n")?;
            dir
        } else if volume
            .host_path
            .as_ref()
            .is_some_and(|host| host.path == HOST_CGROUP)
        {
            ensure!(
                mount.read_only == Some(true),
                "the host's cgroup tree must be mounted read-only"
            );
            volumes.cgroup.to_owned()
        } else if let Some(host) = &volume.host_path {
            let rest = Path::new(&host.path)
                .strip_prefix(HOST_BPFFS)
                .with_context(|| {
                    format!(
                        "hostPath {}: the test stands in only for the host's {HOST_BPFFS}",
                        host.path
                    )
                })?;
            let dir = volumes.bpffs.join(rest);
            // type: DirectoryOrCreate
            std::fs::create_dir_all(&dir)?;
            dir
        } else {
            bail!(
                "volume {}: a kind the test does not stand in for",
                mount.name
            );
        };
        let read_only = if mount.read_only == Some(true) {
            ":ro"
        } else {
            ""
        };
        push(format!(
            "--volume={}:{}{read_only}",
            source.display(),
            mount.mount_path
        ));
    }
    for env in container.env.iter().flatten() {
        match (&env.value, &env.name[..]) {
            (Some(value), _) => push(format!("--env={}={value}", env.name)),
            (None, "NODE_NAME") => push("--env=NODE_NAME=lab-node".into()),
            (None, other) => bail!("env {other}: the test cannot stand in for it"),
        }
    }
    args.push(image.into());
    // The services come from the config file: the lab has no API server.
    for arg in container.args.iter().flatten() {
        if arg != "--kubernetes" {
            args.push(arg.into());
        }
    }
    Ok(args)
}

/// containerd's RuntimeDefault filter, as far as xlb is concerned: podman's
/// default profile (Debian's containers-common) plus the rules containerd
/// adds for the capabilities a container holds: bpf() with CAP_BPF,
/// perf_event_open() with CAP_PERFMON. Debian's profile alone allows them
/// only with CAP_SYS_ADMIN.
fn runtime_default_seccomp(dir: &Path) -> anyhow::Result<PathBuf> {
    let path = Path::new("/usr/share/containers/seccomp.json");
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut profile: serde_json::Value = serde_json::from_str(&text)?;
    let syscalls = profile["syscalls"]
        .as_array_mut()
        .context("the default seccomp profile has no syscalls")?;
    for (name, cap) in [("bpf", "CAP_BPF"), ("perf_event_open", "CAP_PERFMON")] {
        // First, so it wins over the profile's errno rule for the same call.
        syscalls.insert(
            0,
            serde_json::json!({
                "names": [name],
                "action": "SCMP_ACT_ALLOW",
                "includes": { "caps": [cap] },
            }),
        );
    }
    let out = dir.join("seccomp-runtime-default.json");
    std::fs::write(&out, serde_json::to_string_pretty(&profile)?)?;
    Ok(out)
}

/// A container; removed on drop.
struct Running {
    name: String,
}

impl Running {
    fn start(args: &[OsString]) -> anyhow::Result<Running> {
        let name = args[3].to_string_lossy().into_owned();
        let output = image::podman().args(args).output()?;
        let running = Running { name };
        ensure!(
            output.status.success(),
            "podman run failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(running)
    }

    fn inspect(&self, format: &str) -> String {
        image::podman()
            .args(["inspect", "--format", format, &self.name])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    }

    fn logs(&self) -> String {
        image::podman()
            .args(["logs", &self.name])
            .output()
            .map(|o| {
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            })
            .unwrap_or_default()
    }

    /// Waits until /readyz answers 200; fails with the log if the
    /// container exits first.
    fn wait_ready(&self, lab: &Lab) -> anyhow::Result<()> {
        let mut exited = false;
        let ready = poll_until("the container's /readyz", Duration::from_secs(90), || {
            if let Ok((200, _)) = get(lab, "/readyz") {
                return Some(());
            }
            if self.inspect("{{.State.Running}}") == "false" {
                exited = true;
                return Some(());
            }
            None
        });
        if exited || ready.is_err() {
            bail!(
                "the container did not become ready ({}; exit code {}):\n{}",
                ready
                    .err()
                    .map_or_else(|| "it exited".into(), |e| e.to_string()),
                self.inspect("{{.State.ExitCode}}"),
                self.logs()
            );
        }
        Ok(())
    }

    /// `podman stop` (SIGTERM, then the DaemonSet's grace period); returns
    /// the exit code and the log.
    fn stop(&self, grace: i64) -> anyhow::Result<(String, String)> {
        let output = image::podman()
            .args(["stop", "--time", &grace.to_string(), &self.name])
            .output()?;
        ensure!(
            output.status.success(),
            "podman stop: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok((self.inspect("{{.State.ExitCode}}"), self.logs()))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = image::podman()
            .args(["rm", "--force", "--time", "2", &self.name])
            .output();
    }
}

/// Removes the test's image on drop.
struct Image(String);

impl Drop for Image {
    fn drop(&mut self) {
        let _ = image::podman().args(["rmi", "--force", &self.0]).output();
    }
}

fn get(lab: &Lab, path: &str) -> anyhow::Result<(u16, String)> {
    let address: SocketAddr = METRICS.parse()?;
    let path = path.to_owned();
    Ok(lab
        .node
        .run(move || xlb::observe::http::get(address, &path))??)
}

/// The value of the series `series` (exactly as exposed), or 0.
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.parse().ok())
        .unwrap_or(0.0)
}

fn node_port(port: u16) -> SocketAddr {
    SocketAddr::from((NODE_ADDR, port))
}

/// The container's mounts and credentials, as the kernel sees them.
fn check_confinement(pid: &str) -> anyhow::Result<()> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .map(str::trim)
            .unwrap_or_default()
            .to_owned()
    };
    for set in ["CapEff:", "CapPrm:", "CapBnd:"] {
        let mask = u64::from_str_radix(&field(set), 16)?;
        ensure!(
            mask == NAMED_CAPS,
            "{set} {mask:#x}: expected exactly BPF, NET_ADMIN, PERFMON ({NAMED_CAPS:#x})"
        );
    }
    ensure!(field("NoNewPrivs:") == "1", "no_new_privs is not set");
    ensure!(field("Seccomp:") == "2", "no seccomp filter");
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mounts"))?;
    let options = |point: &str| -> Vec<(String, String)> {
        mounts
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                (fields.get(1) == Some(&point))
                    .then(|| (fields[2].to_owned(), fields[3].to_owned()))
            })
            .collect()
    };
    let read_only = |opts: &str| opts.split(',').any(|o| o == "ro");
    let root = options("/");
    ensure!(
        root.last().is_some_and(|(_, o)| read_only(o)),
        "root is not read-only: {root:?}"
    );
    let sys = options("/sys");
    ensure!(
        sys.last()
            .is_some_and(|(kind, o)| kind == "sysfs" && read_only(o)),
        "/sys is not a read-only sysfs: {sys:?}"
    );
    let bpf: Vec<&str> = mounts
        .lines()
        .filter(|line| line.split_whitespace().nth(2) == Some("bpf"))
        .collect();
    ensure!(
        bpf.len() == 1 && bpf[0].split_whitespace().nth(1) == Some(HOST_BPFFS),
        "the container must see one bpffs, its own directory at {HOST_BPFFS}: {bpf:?}"
    );
    Ok(())
}

#[test]
fn the_image_serves_under_the_daemonsets_confinement_and_restarts_without_loss()
-> anyhow::Result<()> {
    xlb_tests::require_root()?;
    if let Some(why) = image::podman_unavailable() {
        println!("SKIPPED: podman cannot run containers on this machine: {why}");
        return Ok(());
    }
    let (pod, container) = daemonset()?;
    let lab = Lab::new(2)?;
    let bpffs = Bpffs::mount(&lab)?;
    let cgroup = ChildCgroup::create()?;
    let tag = format!("localhost/xlb-test:{}", std::process::id());
    let scratch = lab.dir().join("image");
    std::fs::create_dir_all(&scratch)?;
    let id = image::build(
        &Contents {
            xlb: bin_from_env(XLB_BIN_ENV)?,
            echo: bin_from_env(XLB_ECHO_BIN_ENV)?,
        },
        &tag,
        &scratch,
    )?;
    let _image = Image(tag.clone());
    println!("built {tag} ({id}) FROM scratch");
    let seccomp = runtime_default_seccomp(lab.dir())?;
    let config_dir = lab.dir().join("configmap");
    std::fs::create_dir_all(&config_dir)?;
    std::fs::write(config_dir.join("config.yaml"), lab.config_yaml(&services()))?;
    let grace = pod.termination_grace_period_seconds.unwrap_or(30);
    let run = |generation: usize| -> anyhow::Result<(Running, Vec<OsString>)> {
        let volumes = Volumes {
            config_dir: config_dir.clone(),
            bpffs: bpffs.path(),
            pod_dir: lab.dir().join(format!("pod-{generation}")),
            cgroup: &cgroup.0,
        };
        let name = format!("xlb-test-{}-{generation}", std::process::id());
        let args = podman_args(
            &pod,
            &container,
            &volumes,
            &seccomp,
            lab.node.name(),
            &name,
            &tag,
        )?;
        let running = Running::start(&args)?;
        running.wait_ready(&lab)?;
        Ok((running, args))
    };

    let (first, args) = run(1)?;
    println!(
        "podman {}",
        args.iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    check_confinement(&first.inspect("{{.State.Pid}}"))
        .with_context(|| format!("container log:\n{}", first.logs()))?;
    assert_eq!(bpffs.pins("xlb/links").len(), 3, "{}", first.logs());

    // Serving: TCP connections and a UDP flow through the NodePorts.
    let mut connections = (0..6)
        .map(|_| Connection::open(&lab.client, node_port(TCP_PORT)))
        .collect::<anyhow::Result<Vec<_>>>()
        .with_context(|| first.logs())?;
    let backends: BTreeSet<String> = connections.iter().map(|c| c.who.name.clone()).collect();
    for connection in &mut connections {
        connection.exchange()?;
    }
    let drops = SocketDrops::start(&[&lab.client, &lab.backends[0].netns, &lab.backends[1].netns]);
    let stream = Stream::start(&lab.client, node_port(UDP_PORT))?;
    std::thread::sleep(Duration::from_millis(300));

    // Datapath counters on /metrics, read with only the named capabilities.
    let (code, metrics) = get(&lab, "/metrics")?;
    assert_eq!(code, 200, "{metrics}");
    let verdict = |metrics: &str, reason: &str| {
        sample(
            metrics,
            &format!("xlb_datapath_packets_total{{reason=\"{reason}\",verdict=\"forward\"}}"),
        )
    };
    let new_flows = verdict(&metrics, "fwd_new_flow");
    let established = verdict(&metrics, "fwd_established");
    println!(
        "first container: {} TCP connections to {backends:?}; /metrics: fwd_new_flow {new_flows}, fwd_established {established}",
        connections.len()
    );
    assert!(new_flows >= 7.0, "{metrics}");
    assert!(established > 0.0, "{metrics}");
    assert_eq!(sample(&metrics, "xlb_datapath_readable"), 1.0, "{metrics}");

    // A rolling update: the old pod gets SIGTERM and leaves the datapath
    // pinned and forwarding; the new one adopts it.
    let (code, log) = first.stop(grace)?;
    ensure!(code == "0", "first container exit code {code}:\n{log}");
    let attached = lab.node.ip(&["link", "show", NODE_CLIENT_IF])?;
    ensure!(attached.contains("prog/xdp"), "XDP detached:\n{log}");
    drop(first);
    std::thread::sleep(Duration::from_millis(300));
    for connection in &mut connections {
        connection.exchange().context("while no agent runs")?;
    }
    let (second, _) = run(2)?;
    let adopted = second.logs();
    std::thread::sleep(Duration::from_millis(300));
    let report = stream.finish()?;
    let drops = drops.since_start();
    for connection in &mut connections {
        connection
            .exchange()
            .with_context(|| format!("after the restart:\n{adopted}"))?;
    }
    let mut fresh = Connection::open(&lab.client, node_port(TCP_PORT))?;
    fresh.exchange()?;
    println!(
        "container restart under a {}/s UDP stream: {report}; socket drops {drops}",
        stream::RATE
    );
    assert!(
        adopted.contains("adopted the datapath pinned in"),
        "the second container did not adopt the maps:\n{adopted}"
    );
    assert!(adopted.contains("pinned link adopted"), "{adopted}");
    assert_eq!(
        report.lost_beyond(drops),
        0,
        "{report}; {drops} socket drops"
    );
    // The counters were adopted with the maps: they cover both containers.
    let (_, metrics) = get(&lab, "/metrics")?;
    assert!(verdict(&metrics, "fwd_new_flow") > new_flows, "{metrics}");
    assert!(
        verdict(&metrics, "fwd_established") > established,
        "{metrics}"
    );

    // Leave nothing attached: what an operator does after deleting the
    // DaemonSet (`xlb detach`).
    let (code, log) = second.stop(grace)?;
    ensure!(code == "0", "second container exit code {code}:\n{log}");
    let output = lab
        .node
        .command(bin_from_env(XLB_BIN_ENV)?)
        .arg("detach")
        .arg("--bpffs")
        .arg(bpffs.path().join("xlb"))
        .output()?;
    ensure!(
        output.status.success(),
        "xlb detach: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}
