//! deploy/ and examples/: every kustomization renders with `kubectl
//! kustomize`, every object parses as its k8s-openapi type, and the
//! invariants the house style and the agent rely on hold (named
//! capabilities, read-only RBAC, UDP stated wherever it is UDP, image
//! placeholders replaced by overlays, a node config the agent accepts).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, PodSpec, Service, ServiceAccount,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_yaml::Value;
use xlb::source::yaml::{Overrides, parse};
use xlb_tests::repo_root;

/// Every object kind deploy/ and examples/ may hold.
#[derive(Debug)]
enum Object {
    DaemonSet(Box<DaemonSet>),
    Deployment(Box<Deployment>),
    Service(Box<Service>),
    ServiceAccount(Box<ServiceAccount>),
    ClusterRole(Box<ClusterRole>),
    ClusterRoleBinding(Box<ClusterRoleBinding>),
    ConfigMap(Box<ConfigMap>),
    Namespace(Box<Namespace>),
    /// Prometheus Operator objects (deploy/monitoring), which k8s-openapi
    /// has no types for; tests/tests/monitoring.rs checks their content.
    Monitoring {
        kind: String,
        value: Box<Value>,
    },
}

/// A rendered kustomization.
struct Rendered {
    dir: PathBuf,
    objects: Vec<Object>,
}

impl Rendered {
    fn name(&self) -> String {
        self.dir
            .strip_prefix(repo_root())
            .unwrap_or(&self.dir)
            .display()
            .to_string()
    }

    fn is_overlay(&self) -> bool {
        self.dir
            .components()
            .any(|part| part.as_os_str() == "overlays")
    }

    fn pod_specs(&self) -> Vec<(String, &PodSpec)> {
        self.objects
            .iter()
            .filter_map(|object| match object {
                Object::DaemonSet(set) => Some((
                    format!(
                        "DaemonSet {}",
                        set.metadata.name.clone().unwrap_or_default()
                    ),
                    set.spec.as_ref()?.template.spec.as_ref()?,
                )),
                Object::Deployment(deployment) => Some((
                    format!(
                        "Deployment {}",
                        deployment.metadata.name.clone().unwrap_or_default()
                    ),
                    deployment.spec.as_ref()?.template.spec.as_ref()?,
                )),
                _ => None,
            })
            .collect()
    }
}

/// Every directory under deploy/ and examples/ with a kustomization.yaml.
fn kustomizations() -> Vec<PathBuf> {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        // Components (deploy/monitoring) render through the overlays that
        // use them; tests/tests/monitoring.rs checks them there.
        let kustomization = dir.join("kustomization.yaml");
        let is_component = std::fs::read_to_string(&kustomization)
            .is_ok_and(|text| text.lines().any(|line| line.trim() == "kind: Component"));
        if kustomization.is_file() && !is_component {
            found.push(dir.to_owned());
        }
        for entry in entries.flatten() {
            if entry.path().is_dir() {
                walk(&entry.path(), found);
            }
        }
    }
    let mut found = Vec::new();
    walk(&repo_root().join("deploy"), &mut found);
    walk(&repo_root().join("examples"), &mut found);
    found.sort();
    found
}

fn render(dir: &Path) -> anyhow::Result<Rendered> {
    let mut objects = Vec::new();
    for value in xlb_tests::kustomize::render(dir)? {
        let kind = value
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let parsed = |value: Value| -> anyhow::Result<Object> {
            Ok(match kind.as_str() {
                "DaemonSet" => Object::DaemonSet(serde_yaml::from_value(value)?),
                "Deployment" => Object::Deployment(serde_yaml::from_value(value)?),
                "Service" => Object::Service(serde_yaml::from_value(value)?),
                "ServiceAccount" => Object::ServiceAccount(serde_yaml::from_value(value)?),
                "ClusterRole" => Object::ClusterRole(serde_yaml::from_value(value)?),
                "ClusterRoleBinding" => Object::ClusterRoleBinding(serde_yaml::from_value(value)?),
                "ConfigMap" => Object::ConfigMap(serde_yaml::from_value(value)?),
                "Namespace" => Object::Namespace(serde_yaml::from_value(value)?),
                "PrometheusRule" | "PodMonitor" => {
                    anyhow::ensure!(value.get("spec").is_some_and(Value::is_mapping), "no spec");
                    Object::Monitoring {
                        kind: kind.clone(),
                        value: Box::new(value),
                    }
                }
                other => anyhow::bail!("{other}: a kind this test does not check yet; add it"),
            })
        };
        let object =
            parsed(value).map_err(|error| anyhow::anyhow!("{}: {kind}: {error}", dir.display()))?;
        objects.push(object);
    }
    Ok(Rendered {
        dir: dir.to_owned(),
        objects,
    })
}

fn render_all() -> anyhow::Result<Vec<Rendered>> {
    let dirs = kustomizations();
    let names: Vec<String> = dirs
        .iter()
        .map(|dir| {
            dir.strip_prefix(repo_root())
                .unwrap_or(dir)
                .display()
                .to_string()
        })
        .collect();
    for expected in [
        "deploy/base",
        "deploy/overlays/development",
        "deploy/overlays/production",
        "examples/apps/tcp-echo/base",
        "examples/apps/tcp-echo/overlays/development",
        "examples/apps/udp-echo/base",
        "examples/apps/udp-echo/overlays/development",
    ] {
        anyhow::ensure!(
            names.iter().any(|name| name.ends_with(expected)),
            "no kustomization at {expected} (found {names:?})"
        );
    }
    dirs.iter().map(|dir| render(dir)).collect()
}

#[test]
fn every_kustomization_renders_and_parses() -> anyhow::Result<()> {
    for rendered in render_all()? {
        let name = rendered.name();
        assert!(!rendered.objects.is_empty(), "{name}: renders nothing");
        for object in &rendered.objects {
            if let Object::Monitoring { kind, value } = object {
                assert!(
                    value
                        .get("metadata")
                        .and_then(|metadata| metadata.get("name"))
                        .is_some(),
                    "{name}: a {kind} without metadata.name"
                );
            }
        }
        // A kustomization that creates a namespace puts its objects in it.
        let declared: Vec<String> = rendered
            .objects
            .iter()
            .filter_map(|object| match object {
                Object::Namespace(namespace) => namespace.metadata.name.clone(),
                _ => None,
            })
            .collect();
        if declared.is_empty() {
            continue;
        }
        for object in &rendered.objects {
            let namespace = match object {
                Object::Deployment(deployment) => deployment.metadata.namespace.clone(),
                Object::Service(service) => service.metadata.namespace.clone(),
                _ => continue,
            };
            assert!(
                namespace
                    .as_ref()
                    .is_some_and(|namespace| declared.contains(namespace)),
                "{name}: an object in namespace {namespace:?}, not in {declared:?}"
            );
        }
    }
    Ok(())
}

fn agent_container(rendered: &Rendered) -> Option<(&DaemonSet, &Container)> {
    rendered.objects.iter().find_map(|object| match object {
        Object::DaemonSet(set) if set.metadata.name.as_deref() == Some("xlb") => {
            let container = set
                .spec
                .as_ref()?
                .template
                .spec
                .as_ref()?
                .containers
                .iter()
                .find(|container| container.name == "xlb")?;
            Some((&**set, container))
        }
        _ => None,
    })
}

#[test]
fn the_agent_runs_with_named_capabilities() -> anyhow::Result<()> {
    let allowed: BTreeSet<&str> = ["BPF", "NET_ADMIN", "PERFMON"].into_iter().collect();
    for rendered in render_all()?
        .iter()
        .filter(|r| r.name().starts_with("deploy"))
    {
        let name = rendered.name();
        let (set, container) =
            agent_container(rendered).ok_or_else(|| anyhow::anyhow!("{name}: no xlb DaemonSet"))?;
        let pod = set
            .spec
            .as_ref()
            .and_then(|spec| spec.template.spec.as_ref())
            .ok_or_else(|| anyhow::anyhow!("{name}: no pod spec"))?;
        assert_eq!(pod.host_network, Some(true), "{name}: hostNetwork");
        let security = container
            .security_context
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("{name}: no securityContext"))?;
        assert_ne!(security.privileged, Some(true), "{name}: privileged");
        assert_eq!(security.allow_privilege_escalation, Some(false), "{name}");
        let capabilities = security
            .capabilities
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("{name}: no capabilities"))?;
        assert_eq!(
            capabilities.drop.as_deref(),
            Some(&[String::from("ALL")][..]),
            "{name}: drop ALL"
        );
        let added: BTreeSet<&str> = capabilities
            .add
            .iter()
            .flatten()
            .map(String::as_str)
            .collect();
        assert!(
            added.contains("BPF") && added.contains("NET_ADMIN"),
            "{name}: {added:?}"
        );
        assert!(
            added.is_subset(&allowed),
            "{name}: unexpected capabilities {added:?}"
        );

        // Reads the cluster, knows its node, is probed, has its mounts.
        let args = container.args.clone().unwrap_or_default();
        assert!(
            args.iter().any(|arg| arg == "--kubernetes"),
            "{name}: {args:?}"
        );
        let node_name = container
            .env
            .iter()
            .flatten()
            .find(|env| env.name == "NODE_NAME");
        let field = node_name
            .and_then(|env| env.value_from.as_ref())
            .and_then(|from| from.field_ref.as_ref())
            .map(|field| field.field_path.as_str());
        assert_eq!(field, Some("spec.nodeName"), "{name}: NODE_NAME");
        assert!(
            container.readiness_probe.is_some(),
            "{name}: readiness probe"
        );
        let host_paths: BTreeSet<&str> = pod
            .volumes
            .iter()
            .flatten()
            .filter_map(|volume| volume.host_path.as_ref().map(|host| host.path.as_str()))
            .collect();
        // Only xlb's own bpffs directory from the host, and the cgroup tree
        // the socket hooks attach to (mounted read-only), nothing else.
        assert_eq!(
            host_paths,
            BTreeSet::from(["/sys/fs/bpf/xlb", "/sys/fs/cgroup"]),
            "{name}: hostPath volumes"
        );
        let mounts: BTreeSet<&str> = container
            .volume_mounts
            .iter()
            .flatten()
            .map(|mount| mount.mount_path.as_str())
            .collect();
        assert!(mounts.contains("/sys/fs/bpf"), "{name}: {mounts:?}");
        assert!(
            args.iter().any(|arg| arg == "--bpffs=/sys/fs/bpf"),
            "{name}: the agent must pin where its bpffs volume is mounted: {args:?}"
        );
        // A rolling update keeps flows: the old pod leaves the datapath
        // pinned and forwarding, the new one adopts it.
        assert!(
            args.iter().any(|arg| arg == "--keep-attached"),
            "{name}: {args:?}"
        );
        assert_eq!(security.read_only_root_filesystem, Some(true), "{name}");
        let seccomp = security
            .seccomp_profile
            .as_ref()
            .or_else(|| {
                pod.security_context
                    .as_ref()
                    .and_then(|context| context.seccomp_profile.as_ref())
            })
            .map(|profile| profile.type_.as_str());
        assert_eq!(seccomp, Some("RuntimeDefault"), "{name}: seccompProfile");
        let accounts: Vec<&str> = rendered
            .objects
            .iter()
            .filter_map(|object| match object {
                Object::ServiceAccount(account) => account.metadata.name.as_deref(),
                _ => None,
            })
            .collect();
        assert!(
            pod.service_account_name
                .as_deref()
                .is_some_and(|account| accounts.contains(&account)),
            "{name}: serviceAccountName {:?} is not among {accounts:?}",
            pod.service_account_name
        );
    }
    Ok(())
}

#[test]
fn rbac_grants_what_the_agent_watches_and_its_events() -> anyhow::Result<()> {
    for rendered in render_all()?
        .iter()
        .filter(|r| r.name().starts_with("deploy"))
    {
        let name = rendered.name();
        let mut granted = BTreeSet::new();
        for object in &rendered.objects {
            let Object::ClusterRole(role) = object else {
                continue;
            };
            for rule in role.rules.iter().flatten() {
                for group in rule.api_groups.iter().flatten() {
                    for resource in rule.resources.iter().flatten() {
                        for verb in &rule.verbs {
                            granted.insert((group.clone(), resource.clone(), verb.clone()));
                        }
                    }
                }
            }
        }
        let expected: BTreeSet<(String, String, String)> = [
            ("", "services", "list"),
            ("", "services", "watch"),
            ("discovery.k8s.io", "endpointslices", "list"),
            ("discovery.k8s.io", "endpointslices", "watch"),
            ("", "nodes", "get"),
            ("", "nodes", "list"),
            ("", "nodes", "watch"),
            ("events.k8s.io", "events", "create"),
            ("events.k8s.io", "events", "patch"),
        ]
        .into_iter()
        .map(|(group, resource, verb)| (group.to_owned(), resource.to_owned(), verb.to_owned()))
        .collect();
        assert_eq!(granted, expected, "{name}: ClusterRole rules");

        // Bound to the agent's service account, where the agent runs.
        let (set, _) =
            agent_container(rendered).ok_or_else(|| anyhow::anyhow!("{name}: no DaemonSet"))?;
        let namespace = set.metadata.namespace.clone();
        let bound = rendered.objects.iter().any(|object| match object {
            Object::ClusterRoleBinding(binding) => {
                binding.subjects.iter().flatten().any(|subject| {
                    subject.kind == "ServiceAccount"
                        && Some(&subject.name)
                            == set
                                .spec
                                .as_ref()
                                .and_then(|s| s.template.spec.as_ref())
                                .and_then(|p| p.service_account_name.as_ref())
                        && subject.namespace == namespace
                }) && binding.role_ref.name == "xlb"
            }
            _ => false,
        });
        assert!(
            bound,
            "{name}: no ClusterRoleBinding of role xlb to the agent's service account in {namespace:?}"
        );
    }
    Ok(())
}

#[test]
fn node_configs_are_valid_agent_configs() -> anyhow::Result<()> {
    for rendered in render_all()?
        .iter()
        .filter(|r| r.name().starts_with("deploy"))
    {
        let name = rendered.name();
        let config = rendered
            .objects
            .iter()
            .find_map(|object| match object {
                Object::ConfigMap(map) if map.metadata.name.as_deref() == Some("xlb-config") => {
                    map.data.as_ref()?.get("config.yaml").cloned()
                }
                _ => None,
            })
            .ok_or_else(|| anyhow::anyhow!("{name}: no xlb-config ConfigMap with config.yaml"))?;
        let loaded = parse(
            &format!("{name}: xlb-config config.yaml"),
            &config,
            &Overrides::default(),
        )
        .map_err(|error| anyhow::anyhow!("{error}"))?;
        assert_eq!(
            loaded.state.services,
            [],
            "{name}: services come from the API"
        );
        // Uplinks are found by the agent unless an overlay names them.
        if name.contains("production") {
            assert_eq!(loaded.state.interfaces, ["bond0"], "{name}");
        } else {
            assert_eq!(loaded.state.interfaces, Vec::<String>::new(), "{name}");
        }
    }
    Ok(())
}

#[test]
fn overlays_replace_image_placeholders() -> anyhow::Result<()> {
    for rendered in render_all()? {
        let name = rendered.name();
        for (owner, pod) in rendered.pod_specs() {
            for container in pod
                .containers
                .iter()
                .chain(pod.init_containers.iter().flatten())
            {
                let image = container.image.clone().unwrap_or_default();
                let placeholder = !image.contains('/') && !image.contains(':');
                if rendered.is_overlay() {
                    assert!(
                        !placeholder,
                        "{name}: {owner} still uses the placeholder image {image:?}"
                    );
                    assert!(image.contains(':'), "{name}: {owner}: {image:?} has no tag");
                } else {
                    assert!(
                        placeholder,
                        "{name}: {owner}: base images are logical names, not {image:?}"
                    );
                }
            }
        }
    }
    Ok(())
}

#[test]
fn ports_state_their_protocol() -> anyhow::Result<()> {
    for rendered in render_all()? {
        let name = rendered.name();
        for (owner, pod) in rendered.pod_specs() {
            for container in &pod.containers {
                for port in container.ports.iter().flatten() {
                    assert!(
                        port.protocol.is_some(),
                        "{name}: {owner}: container port {} has no protocol",
                        port.container_port
                    );
                }
            }
        }
        for object in &rendered.objects {
            let Object::Service(service) = object else {
                continue;
            };
            let service_name = service.metadata.name.clone().unwrap_or_default();
            let spec = service
                .spec
                .as_ref()
                .ok_or_else(|| anyhow::anyhow!("{name}: {service_name}: no spec"))?;
            for port in spec.ports.iter().flatten() {
                assert!(
                    port.protocol.is_some(),
                    "{name}: Service {service_name}: port {} has no protocol",
                    port.port
                );
                // A named targetPort must name a container port of the same
                // protocol in the pods the service selects.
                let Some(IntOrString::String(target)) = &port.target_port else {
                    continue;
                };
                let matched = rendered.pod_specs().iter().any(|(_, pod)| {
                    pod.containers
                        .iter()
                        .flat_map(|c| c.ports.iter().flatten())
                        .any(|container_port| {
                            container_port.name.as_deref() == Some(target.as_str())
                                && container_port.protocol == port.protocol
                        })
                });
                assert!(
                    matched,
                    "{name}: Service {service_name}: targetPort {target} names no {:?} container port",
                    port.protocol
                );
            }
        }
    }
    Ok(())
}

#[test]
fn echo_apps_match_the_demo_port_table() -> anyhow::Result<()> {
    // (app, nodePort, port, protocol), as config/demo.yaml and the lab.
    let table = [
        ("tcp-echo", 30999, 3333, "TCP"),
        ("udp-echo", 30998, 4444, "UDP"),
    ];
    let rendered = render_all()?;
    for (app, node_port, port, protocol) in table {
        for kustomization in rendered.iter().filter(|r| r.name().contains(app)) {
            let name = kustomization.name();
            let service = kustomization
                .objects
                .iter()
                .find_map(|object| match object {
                    Object::Service(service) if service.metadata.name.as_deref() == Some(app) => {
                        Some(service)
                    }
                    _ => None,
                })
                .ok_or_else(|| anyhow::anyhow!("{name}: no Service {app}"))?;
            let spec = service
                .spec
                .as_ref()
                .ok_or_else(|| anyhow::anyhow!("{name}: no spec"))?;
            assert_eq!(spec.type_.as_deref(), Some("NodePort"), "{name}");
            let ports = spec.ports.clone().unwrap_or_default();
            assert_eq!(ports.len(), 1, "{name}");
            assert_eq!(ports[0].node_port, Some(node_port), "{name}");
            assert_eq!(ports[0].port, port, "{name}");
            assert_eq!(ports[0].protocol.as_deref(), Some(protocol), "{name}");
            // The service selects the deployment's pods.
            let selector = spec.selector.clone().unwrap_or_default();
            assert!(!selector.is_empty(), "{name}: no selector");
            let selected = kustomization.objects.iter().any(|object| match object {
                Object::Deployment(deployment) => deployment
                    .spec
                    .as_ref()
                    .and_then(|spec| spec.template.metadata.as_ref())
                    .and_then(|metadata| metadata.labels.as_ref())
                    .is_some_and(|labels| {
                        selector
                            .iter()
                            .all(|(key, value)| labels.get(key) == Some(value))
                    }),
                _ => false,
            });
            assert!(
                selected,
                "{name}: Service {app} selects no Deployment's pods"
            );
        }
    }
    Ok(())
}

/// deploy/pod-sockets, used from an overlay, adds exactly CAP_SYS_ADMIN and
/// the host's /run/netns (read-only, host-to-container propagation) to the
/// agent, which is what entering pods' namespaces to destroy their
/// connected UDP sockets takes; everything else stays as the base has it.
#[test]
fn the_pod_sockets_component_adds_sys_admin_and_run_netns() -> anyhow::Result<()> {
    // kustomize takes only relative paths to bases and components, so the
    // overlay lives in the repository for the length of the test.
    let overlay = repo_root().join(format!(".deploy-test-pod-sockets-{}", std::process::id()));
    std::fs::create_dir_all(&overlay)?;
    struct Cleanup<'a>(&'a Path);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(self.0);
        }
    }
    let _cleanup = Cleanup(&overlay);
    std::fs::write(
        overlay.join("kustomization.yaml"),
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n\
         resources: [../deploy/base]\ncomponents: [../deploy/pod-sockets]\n",
    )?;
    let base = render(&repo_root().join("deploy/base"))?;
    let with = render(&overlay)?;
    let (_, base_container) = agent_container(&base).expect("base has the agent");
    let (set, container) = agent_container(&with).expect("component keeps the agent");
    let added = |container: &Container| -> BTreeSet<String> {
        let security = container.security_context.clone().unwrap_or_default();
        security
            .capabilities
            .and_then(|caps| caps.add)
            .unwrap_or_default()
            .into_iter()
            .collect()
    };
    let extra: Vec<String> = added(container)
        .difference(&added(base_container))
        .cloned()
        .collect();
    assert_eq!(extra, ["SYS_ADMIN"]);
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|mount| mount.mount_path == "/run/netns")
        .expect("/run/netns mounted");
    assert_eq!(mount.read_only, Some(true));
    assert_eq!(mount.mount_propagation.as_deref(), Some("HostToContainer"));
    let volume = set
        .spec
        .as_ref()
        .and_then(|spec| spec.template.spec.as_ref())
        .and_then(|pod| pod.volumes.as_ref())
        .and_then(|volumes| volumes.iter().find(|volume| volume.name == mount.name))
        .expect("the mount's volume");
    let host_path = volume.host_path.as_ref().expect("a hostPath volume");
    assert_eq!(host_path.path, "/run/netns");
    assert_eq!(container.args, base_container.args);
    Ok(())
}
