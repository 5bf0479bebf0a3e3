//! Kubernetes manifests (Service and EndpointSlice YAML or JSON, one file,
//! a directory, or a multi-document stream such as `kubectl kustomize`
//! output) -> `ClusterSnapshot`, so GitOps output can drive a node without a
//! cluster (`xlb run --manifests PATH|-`). The translation to a
//! `DesiredState` is the Kubernetes source's (`super::kube`).
//!
//! Every error is located: `file:line:column: document N (Kind ns/name):
//! field.path: problem; fix`. Other kinds (Deployments, ConfigMaps, ...) are
//! skipped, so a whole application's output can be piped in. Unknown fields
//! are errors, as with `kubectl apply`'s strict validation: a misspelt
//! `nodeport` must not silently become "no NodePort".

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::Read as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;
use serde_yaml::Value;

use super::kube::{ClusterSnapshot, ObjectKey, SERVICE_NAME_LABEL, key_of};
use super::locate::{self, Locations};

/// Names manifests read from standard input in messages.
pub const STDIN_ORIGIN: &str = "<stdin>";
/// File name endings read from a directory.
pub const EXTENSIONS: [&str; 3] = ["yaml", "yml", "json"];

/// One located finding in a manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestProblem {
    /// The file as named to xlb, or `<stdin>`.
    pub origin: String,
    /// 1-based among the stream's non-empty documents.
    pub document: usize,
    pub line: usize,
    pub column: usize,
    /// `Service default/web`, when the document got that far.
    pub object: Option<String>,
    /// Field path in the document, e.g. `spec.ports[0].nodePort`; empty
    /// for the document as a whole.
    pub field: String,
    pub message: String,
    pub fix: String,
}

impl fmt::Display for ManifestProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: document {}",
            self.origin, self.line, self.column, self.document
        )?;
        if let Some(object) = &self.object {
            write!(f, " ({object})")?;
        }
        f.write_str(": ")?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)?;
        if !self.fix.is_empty() {
            write!(f, "; {}", self.fix)?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{origin}: cannot read the manifests: {source}; check the path given to --manifests")]
    Read {
        origin: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{origin}: no manifest files (*.yaml, *.yml, *.json) in this directory; check the path \
         given to --manifests"
    )]
    EmptyDirectory { origin: String },
    /// Every problem found (one per line when displayed).
    #[error("{}", display_problems(problems))]
    Invalid { problems: Vec<ManifestProblem> },
}

fn display_problems(problems: &[ManifestProblem]) -> String {
    let lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
    lines.join("\n")
}

/// Loaded manifests: the objects xlb uses, and findings that do not stop it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Manifests {
    pub snapshot: ClusterSnapshot,
    pub warnings: Vec<ManifestProblem>,
    /// Objects of other kinds, by `apiVersion/kind`, and how many.
    pub skipped: BTreeMap<String, usize>,
}

/// The manifest files at `path`: the file itself, or a directory's `*.yaml`,
/// `*.yml` and `*.json` files (not recursive), sorted by name.
pub fn files(path: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    let read_failed = |source| ManifestError::Read {
        origin: path.display().to_string(),
        source,
    };
    let metadata = std::fs::metadata(path).map_err(read_failed)?;
    if !metadata.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(read_failed)? {
        let entry = entry.map_err(read_failed)?;
        let file = entry.path();
        let wanted = file
            .extension()
            .and_then(|extension| extension.to_str())
            .is_some_and(|extension| EXTENSIONS.contains(&extension));
        if wanted && file.is_file() {
            files.push(file);
        }
    }
    if files.is_empty() {
        return Err(ManifestError::EmptyDirectory {
            origin: path.display().to_string(),
        });
    }
    files.sort();
    Ok(files)
}

/// Reads and checks the manifests at `path` (a file or a directory).
pub fn load(path: &Path) -> Result<Manifests, ManifestError> {
    let mut texts = Vec::new();
    for file in files(path)? {
        let origin = file.display().to_string();
        let text = std::fs::read_to_string(&file).map_err(|source| ManifestError::Read {
            origin: origin.clone(),
            source,
        })?;
        texts.push((origin, text));
    }
    parse_all(&texts)
}

/// Reads and checks a manifest stream from standard input, to its end.
pub fn read_stdin() -> Result<Manifests, ManifestError> {
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .map_err(|source| ManifestError::Read {
            origin: STDIN_ORIGIN.to_owned(),
            source,
        })?;
    parse_all(&[(STDIN_ORIGIN.to_owned(), text)])
}

/// Checks one manifest text; `origin` names it in messages.
pub fn parse(origin: &str, text: &str) -> Result<Manifests, ManifestError> {
    parse_all(&[(origin.to_owned(), text.to_owned())])
}

/// Checks several manifest texts as one set of objects: `(origin, text)`.
pub fn parse_all(texts: &[(String, String)]) -> Result<Manifests, ManifestError> {
    let mut checker = Checker::default();
    for (origin, text) in texts {
        for document in split_documents(text) {
            checker.document(origin, &document);
        }
    }
    checker.cross_check();
    if checker.problems.is_empty() {
        Ok(Manifests {
            snapshot: checker.snapshot,
            warnings: checker.warnings,
            skipped: checker.skipped,
        })
    } else {
        Err(ManifestError::Invalid {
            problems: checker.problems,
        })
    }
}

/// One YAML document of a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Document {
    /// 1-based among non-empty documents.
    index: usize,
    /// Line of the document's first line in the file, minus one.
    line_offset: usize,
    text: String,
}

/// Splits a stream at `---` and `...` lines. The marker is blanked rather
/// than removed, so that columns on its line stay true (`--- {a: 1}`).
/// Documents of only blanks and comments are dropped.
fn split_documents(text: &str) -> Vec<Document> {
    let mut documents = Vec::new();
    let mut current = String::new();
    let mut start = 0;
    let finish = |current: &mut String, start: usize, documents: &mut Vec<Document>| {
        let has_content = current.lines().any(|line| {
            let line = line.trim();
            !line.is_empty() && !line.starts_with('#')
        });
        if has_content {
            documents.push(Document {
                index: documents.len() + 1,
                line_offset: start,
                text: std::mem::take(current),
            });
        }
        current.clear();
    };
    for (number, line) in text.lines().enumerate() {
        let marker = ["---", "..."].into_iter().find(|marker| {
            line.strip_prefix(marker)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
        });
        match marker {
            Some(marker) => {
                finish(&mut current, start, &mut documents);
                start = number;
                let rest = &line[marker.len()..];
                current.push_str(&" ".repeat(marker.len()));
                current.push_str(rest);
                current.push('\n');
            }
            None => {
                current.push_str(line);
                current.push('\n');
            }
        }
    }
    finish(&mut current, start, &mut documents);
    documents
}

/// Where a finding is: the document and how to find lines in it.
struct At<'a> {
    origin: &'a str,
    document: &'a Document,
    locations: &'a Locations,
    /// Prefix of every field path (`items[3].` inside a List).
    prefix: String,
    object: Option<String>,
}

impl<'a> At<'a> {
    /// The same place, about `object`.
    fn about(&self, object: String) -> At<'a> {
        At {
            object: Some(object),
            prefix: self.prefix.clone(),
            ..*self
        }
    }

    /// The item at `prefix` (e.g. `items[3].`) inside this document.
    fn inside(&self, prefix: String) -> At<'a> {
        At {
            prefix,
            object: None,
            ..*self
        }
    }

    fn problem(
        &self,
        field: &str,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> ManifestProblem {
        let full = if field.is_empty() {
            self.prefix.trim_end_matches('.').to_owned()
        } else {
            format!("{}{field}", self.prefix)
        };
        let position = self.locations.find(&full);
        ManifestProblem {
            origin: self.origin.to_owned(),
            document: self.document.index,
            line: position.line + self.document.line_offset,
            column: position.column,
            object: self.object.clone(),
            field: full,
            message: message.into(),
            fix: fix.into(),
        }
    }
}

/// A NodePort's first owner, for duplicate checks across documents.
struct Owner {
    object: String,
    problem: ManifestProblem,
}

#[derive(Default)]
struct Checker {
    snapshot: ClusterSnapshot,
    problems: Vec<ManifestProblem>,
    warnings: Vec<ManifestProblem>,
    skipped: BTreeMap<String, usize>,
    /// Where each object was defined, for duplicate messages.
    defined: HashMap<(String, ObjectKey), ManifestProblem>,
    node_ports: HashMap<(String, i32), Owner>,
    /// Where each slice is, for the cross check.
    slices: Vec<(ObjectKey, ManifestProblem)>,
}

impl Checker {
    fn document(&mut self, origin: &str, document: &Document) {
        let locations = Locations::index(&document.text);
        let at = At {
            origin,
            document,
            locations: &locations,
            prefix: String::new(),
            object: None,
        };
        if let Some(position) = locations.first_alias() {
            self.problems.push(ManifestProblem {
                origin: origin.to_owned(),
                document: document.index,
                line: position.line + document.line_offset,
                column: position.column,
                object: None,
                field: String::new(),
                message: String::from(locate::ALIAS_MESSAGE),
                fix: String::from(locate::ALIAS_FIX),
            });
            return;
        }
        let value: Value = match serde_yaml::from_str(&document.text) {
            Ok(value) => value,
            Err(error) => {
                let (line, column) = error
                    .location()
                    .map_or((1, 1), |location| (location.line(), location.column()));
                let mut message = error.to_string();
                if let Some(at) = message.find(" at line ") {
                    message.truncate(at);
                }
                self.problems.push(ManifestProblem {
                    origin: origin.to_owned(),
                    document: document.index,
                    line: line + document.line_offset,
                    column,
                    object: None,
                    field: String::new(),
                    message,
                    fix: String::from(
                        "fix the YAML syntax (indentation, a missing ':' or space after it, an unclosed quote or bracket)",
                    ),
                });
                return;
            }
        };
        if value.is_null() {
            return;
        }
        self.object(&at, &value);
    }

    fn object(&mut self, at: &At<'_>, value: &Value) {
        let Value::Mapping(mapping) = value else {
            self.problems.push(at.problem(
                "",
                "is not a Kubernetes object (a mapping with apiVersion and kind)",
                "write one object per document, separated by ---",
            ));
            return;
        };
        let text = |key: &str| mapping.get(key).and_then(Value::as_str).unwrap_or_default();
        let (api_version, kind) = (text("apiVersion"), text("kind"));
        if kind.is_empty() || api_version.is_empty() {
            let missing = if kind.is_empty() {
                "kind"
            } else {
                "apiVersion"
            };
            self.problems.push(at.problem(
                missing,
                format!("has no {missing}, so it is not a Kubernetes object"),
                "start each document with apiVersion and kind (e.g. apiVersion: v1, kind: Service)",
            ));
            return;
        }
        match (api_version, kind) {
            ("v1", "List") => {
                let items = mapping.get("items").and_then(Value::as_sequence);
                for (index, item) in items.into_iter().flatten().enumerate() {
                    let inner = at.inside(format!("{}items[{index}].", at.prefix));
                    self.object(&inner, item);
                }
            }
            ("v1", "Service") => {
                let at = at.about(label(kind, value));
                if let Some(service) = self.typed::<Service>(&at, value, "Service") {
                    self.service(&at, service);
                }
            }
            ("discovery.k8s.io/v1", "EndpointSlice") => {
                let at = at.about(label(kind, value));
                if let Some(slice) = self.typed::<EndpointSlice>(&at, value, "EndpointSlice") {
                    self.endpoint_slice(&at, slice);
                }
            }
            (_, "Service") | (_, "EndpointSlice") => {
                let wanted = if kind == "Service" {
                    "v1"
                } else {
                    "discovery.k8s.io/v1"
                };
                self.problems.push(at.problem(
                    "apiVersion",
                    format!("{kind} {api_version} is not supported"),
                    format!("use apiVersion: {wanted}"),
                ));
            }
            _ => {
                *self
                    .skipped
                    .entry(format!("{api_version}/{kind}"))
                    .or_default() += 1
            }
        }
    }

    /// `value` as a `K`, with type errors and unknown fields located.
    fn typed<K: DeserializeOwned + serde::Serialize>(
        &mut self,
        at: &At<'_>,
        value: &Value,
        kind: &str,
    ) -> Option<K> {
        let object: K = match serde_path_to_error::deserialize(value.clone()) {
            Ok(object) => object,
            Err(error) => {
                let field = path_text(error.path());
                self.problems.push(at.problem(
                    &field,
                    error.inner().to_string(),
                    format!(
                        "write it as the Kubernetes API defines it (kubectl explain {})",
                        explain_path(kind, &field)
                    ),
                ));
                return None;
            }
        };
        let known = serde_json::to_value(&object).unwrap_or(serde_json::Value::Null);
        let mut unknown = Vec::new();
        unknown_fields(value, &known, String::new(), &mut unknown);
        if unknown.is_empty() {
            return Some(object);
        }
        for field in unknown {
            let name = field
                .rsplit(['.', ']'])
                .next()
                .unwrap_or_default()
                .to_owned();
            self.problems.push(at.problem(
                &field,
                format!("unknown field \"{name}\""),
                format!(
                    "remove it or correct its spelling (kubectl explain {})",
                    explain_path(kind, parent_path(&field))
                ),
            ));
        }
        None
    }

    fn define(&mut self, at: &At<'_>, kind: &str, key: &ObjectKey) -> bool {
        let here = at.problem("metadata.name", "", "");
        if let Some(first) = self.defined.get(&(kind.to_owned(), key.clone())) {
            self.problems.push(at.problem(
                "metadata.name",
                format!(
                    "{kind} {}/{} is also defined at {}:{} (document {})",
                    key.0, key.1, first.origin, first.line, first.document
                ),
                "define each object once",
            ));
            return false;
        }
        self.defined.insert((kind.to_owned(), key.clone()), here);
        true
    }

    fn service(&mut self, at: &At<'_>, service: Service) {
        let key = key_of(&service.metadata);
        let at = at.about(format!("Service {}/{}", key.0, key.1));
        if !self.metadata_name(&at, &key) || !self.define(&at, "Service", &key) {
            return;
        }
        let problems_before = self.problems.len();
        let Some(spec) = &service.spec else {
            self.problems
                .push(at.problem("spec", "has no spec", "add spec.type and spec.ports"));
            return;
        };
        let service_type = spec.type_.as_deref().unwrap_or("ClusterIP");
        if !matches!(
            service_type,
            "ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName"
        ) {
            self.problems.push(at.problem(
                "spec.type",
                format!("\"{service_type}\" is not a Service type"),
                "use ClusterIP, NodePort, LoadBalancer or ExternalName",
            ));
        }
        if let Some(policy) = &spec.external_traffic_policy
            && !matches!(policy.as_str(), "Cluster" | "Local")
        {
            self.problems.push(at.problem(
                "spec.externalTrafficPolicy",
                format!("\"{policy}\" is not a traffic policy"),
                "use Cluster (the default) or Local",
            ));
        }
        if let Some(affinity) = &spec.session_affinity
            && !matches!(affinity.as_str(), "None" | "ClientIP")
        {
            self.problems.push(at.problem(
                "spec.sessionAffinity",
                format!("\"{affinity}\" is not a session affinity"),
                "use None (the default) or ClientIP",
            ));
        }
        let timeout = spec
            .session_affinity_config
            .as_ref()
            .and_then(|config| config.client_ip.as_ref())
            .and_then(|client_ip| client_ip.timeout_seconds);
        if let Some(timeout) = timeout
            && !(1..=86_400).contains(&timeout)
        {
            self.problems.push(at.problem(
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                format!("{timeout} is out of range"),
                "use 1-86400 seconds (default 10800)",
            ));
        }
        for (index, ip) in spec.external_ips.iter().flatten().enumerate() {
            if ip.parse::<std::net::IpAddr>().is_err() {
                self.problems.push(at.problem(
                    &format!("spec.externalIPs[{index}]"),
                    format!("\"{ip}\" is not an IP address"),
                    "write an IPv4 address such as 192.0.2.10",
                ));
            }
        }
        for (index, range) in spec
            .load_balancer_source_ranges
            .iter()
            .flatten()
            .enumerate()
        {
            let valid = range.split_once('/').is_some_and(|(address, length)| {
                let length: Option<u8> = length.parse().ok();
                match address.parse::<std::net::IpAddr>() {
                    Ok(std::net::IpAddr::V4(_)) => length.is_some_and(|length| length <= 32),
                    Ok(std::net::IpAddr::V6(_)) => length.is_some_and(|length| length <= 128),
                    Err(_) => false,
                }
            });
            if !valid {
                self.problems.push(at.problem(
                    &format!("spec.loadBalancerSourceRanges[{index}]"),
                    format!("\"{range}\" is not a CIDR"),
                    "write a network such as 203.0.113.0/24",
                ));
            }
        }
        let needs_node_ports = matches!(service_type, "NodePort" | "LoadBalancer")
            && spec.allocate_load_balancer_node_ports != Some(false);
        let ports = spec.ports.as_deref().unwrap_or_default();
        if ports.is_empty() && service_type != "ExternalName" {
            self.problems.push(at.problem(
                "spec.ports",
                "the service has no ports",
                "add spec.ports",
            ));
        }
        let mut names: HashMap<&str, usize> = HashMap::new();
        for (index, port) in ports.iter().enumerate() {
            let field = format!("spec.ports[{index}]");
            let name = port.name.as_deref().unwrap_or_default();
            if name.is_empty() && ports.len() > 1 {
                self.problems.push(at.problem(
                    &format!("{field}.name"),
                    "a service with several ports must name each of them",
                    "add a name (e.g. name: http) that the EndpointSlice ports repeat",
                ));
            } else if let Some(first) = names.insert(name, index) {
                self.problems.push(at.problem(
                    &format!("{field}.name"),
                    format!("\"{name}\" is also the name of spec.ports[{first}]"),
                    "give each port its own name",
                ));
            }
            let protocol = port.protocol.as_deref().unwrap_or("TCP");
            if !matches!(protocol, "TCP" | "UDP" | "SCTP") {
                self.problems.push(at.problem(
                    &format!("{field}.protocol"),
                    format!("\"{protocol}\" is not a protocol"),
                    "use TCP, UDP or SCTP (upper case)",
                ));
            }
            if !(1..=65_535).contains(&port.port) {
                self.problems.push(at.problem(
                    &format!("{field}.port"),
                    format!("{} is not a port", port.port),
                    "use 1-65535",
                ));
            }
            match &port.target_port {
                Some(IntOrString::Int(number)) if !(1..=65_535).contains(number) => {
                    self.problems.push(at.problem(
                        &format!("{field}.targetPort"),
                        format!("{number} is not a port"),
                        "use 1-65535, or the name of a container port",
                    ));
                }
                _ => {}
            }
            match port.node_port {
                Some(node_port) if !(1..=65_535).contains(&node_port) => {
                    self.problems.push(at.problem(
                        &format!("{field}.nodePort"),
                        format!("{node_port} is not a port"),
                        "use a port in the cluster's NodePort range (30000-32767 by default)",
                    ));
                }
                Some(node_port) if matches!(service_type, "NodePort" | "LoadBalancer") => {
                    let here = at.problem(&format!("{field}.nodePort"), "", "");
                    let object = at.object.clone().unwrap_or_default();
                    match self.node_ports.get(&(protocol.to_owned(), node_port)) {
                        Some(first) => {
                            let message = format!(
                                "{protocol} {node_port} is already the nodePort of {} ({}:{})",
                                first.object, first.problem.origin, first.problem.line
                            );
                            self.problems.push(at.problem(
                                &format!("{field}.nodePort"),
                                message,
                                "give each service port its own nodePort",
                            ));
                        }
                        None => {
                            self.node_ports.insert(
                                (protocol.to_owned(), node_port),
                                Owner {
                                    object,
                                    problem: here,
                                },
                            );
                        }
                    }
                }
                Some(_) => {}
                None if needs_node_ports => {
                    self.problems.push(at.problem(
                        &format!("{field}.nodePort"),
                        format!("a {service_type} port needs a nodePort here: without a cluster nothing allocates one"),
                        "set nodePort (30000-32767 by default)",
                    ));
                }
                None => {}
            }
        }
        if self.problems.len() == problems_before {
            self.snapshot.insert_service(service);
        }
    }

    fn endpoint_slice(&mut self, at: &At<'_>, slice: EndpointSlice) {
        let key = key_of(&slice.metadata);
        let at = at.about(format!("EndpointSlice {}/{}", key.0, key.1));
        if !self.metadata_name(&at, &key) || !self.define(&at, "EndpointSlice", &key) {
            return;
        }
        let problems_before = self.problems.len();
        let service = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get(SERVICE_NAME_LABEL));
        if service.is_none() {
            self.problems.push(at.problem(
                "metadata.labels",
                format!("has no {SERVICE_NAME_LABEL} label, so it belongs to no service"),
                format!("add the label {SERVICE_NAME_LABEL}: <the Service's name>"),
            ));
        }
        let address_type = slice.address_type.as_str();
        if !matches!(address_type, "IPv4" | "IPv6" | "FQDN") {
            self.problems.push(at.problem(
                "addressType",
                format!("\"{address_type}\" is not an address type"),
                "use IPv4 (xlb serves IPv4 only)",
            ));
        } else if address_type != "IPv4" {
            self.warnings.push(at.problem(
                "addressType",
                format!("{address_type} slices are not served (IPv4 only)"),
                "use addressType: IPv4 with IPv4 addresses",
            ));
        }
        for (index, port) in slice.ports.iter().flatten().enumerate() {
            let field = format!("ports[{index}]");
            if let Some(number) = port.port
                && !(1..=65_535).contains(&number)
            {
                self.problems.push(at.problem(
                    &format!("{field}.port"),
                    format!("{number} is not a port"),
                    "use 1-65535",
                ));
            }
            let protocol = port.protocol.as_deref().unwrap_or("TCP");
            if !matches!(protocol, "TCP" | "UDP" | "SCTP") {
                self.problems.push(at.problem(
                    &format!("{field}.protocol"),
                    format!("\"{protocol}\" is not a protocol"),
                    "use TCP, UDP or SCTP (upper case)",
                ));
            }
        }
        if slice.ports.as_deref().unwrap_or_default().is_empty() && !slice.endpoints.is_empty() {
            self.warnings.push(at.problem(
                "ports",
                "the slice lists no ports, so its endpoints serve nothing",
                "add ports: [{name: <the Service port's name, or leave out for an unnamed port>, port: N, protocol: TCP}]",
            ));
        }
        for (index, endpoint) in slice.endpoints.iter().enumerate() {
            let field = format!("endpoints[{index}].addresses");
            if endpoint.addresses.is_empty() {
                self.problems.push(at.problem(
                    &field,
                    "the endpoint has no address",
                    "list the pod's address",
                ));
            }
            if address_type != "IPv4" {
                continue;
            }
            for (position, address) in endpoint.addresses.iter().enumerate() {
                if address.parse::<Ipv4Addr>().is_err() {
                    self.problems.push(at.problem(
                        &format!("{field}[{position}]"),
                        format!("\"{address}\" is not an IPv4 address"),
                        "write the pod's IPv4 address, e.g. 10.244.1.7",
                    ));
                }
            }
        }
        if self.problems.len() == problems_before {
            let here = at.problem("metadata.labels", "", "");
            self.slices.push((key, here));
            self.snapshot.insert_endpoint_slice(slice);
        }
    }

    fn metadata_name(&mut self, at: &At<'_>, key: &ObjectKey) -> bool {
        if key.1.is_empty() {
            self.problems.push(at.problem(
                "metadata.name",
                "the object has no name",
                "set metadata.name",
            ));
            return false;
        }
        true
    }

    /// Findings that need every document: slices whose service is missing
    /// or has no port of that name.
    fn cross_check(&mut self) {
        for (key, here) in &self.slices {
            let Some(slice) = self.snapshot.endpoint_slices.get(key) else {
                continue;
            };
            let Some(service_name) = &slice.service_name else {
                continue;
            };
            let service_key = (key.0.clone(), service_name.clone());
            let Some(service) = self.snapshot.services.get(&service_key) else {
                self.warnings.push(ManifestProblem {
                    message: format!(
                        "its Service {}/{service_name} is not in the manifests, so the slice is unused",
                        key.0
                    ),
                    fix: format!("add the Service, or correct the {SERVICE_NAME_LABEL} label"),
                    ..here.clone()
                });
                continue;
            };
            let service_ports: Vec<String> = service
                .spec
                .iter()
                .flat_map(|spec| &spec.ports)
                .map(|port| port.name.clone())
                .collect();
            for port in &slice.ports {
                let name = port.name.clone();
                if !service_ports.contains(&name) {
                    let shown: Vec<String> = service_ports
                        .iter()
                        .map(|name| format!("{name:?}"))
                        .collect();
                    self.warnings.push(ManifestProblem {
                        field: String::from("ports"),
                        message: format!(
                            "port name {name:?} matches no port of Service {}/{service_name} ({})",
                            key.0,
                            shown.join(", ")
                        ),
                        fix: String::from(
                            "use the Service port's name (empty for a single unnamed port)",
                        ),
                        ..here.clone()
                    });
                }
            }
        }
    }
}

/// `Service ns/name` from an object's raw metadata (`default` namespace
/// when unset), to name it in messages before it is parsed.
fn label(kind: &str, value: &Value) -> String {
    let metadata = value.get("metadata");
    let text = |key: &str| {
        metadata
            .and_then(|metadata| metadata.get(key))
            .and_then(Value::as_str)
            .filter(|text| !text.is_empty())
    };
    format!(
        "{kind} {}/{}",
        text("namespace").unwrap_or("default"),
        text("name").unwrap_or("(no name)")
    )
}

/// serde_path_to_error's path in `locate`'s spelling (`a.b[2].c`; empty for
/// the root).
fn path_text(path: &serde_path_to_error::Path) -> String {
    let mut text = String::new();
    for segment in path {
        match segment {
            serde_path_to_error::Segment::Seq { index } => text.push_str(&format!("[{index}]")),
            serde_path_to_error::Segment::Map { key } => {
                if !text.is_empty() {
                    text.push('.');
                }
                text.push_str(key);
            }
            serde_path_to_error::Segment::Enum { .. } | serde_path_to_error::Segment::Unknown => {}
        }
    }
    text
}

/// `a.b[2].c` -> `a.b[2]`.
fn parent_path(path: &str) -> &str {
    let cut = path.rfind(['.', '[']).unwrap_or(0);
    &path[..cut]
}

/// The `kubectl explain` argument for a field: `service.spec.ports`.
fn explain_path(kind: &str, field: &str) -> String {
    let mut path = kind.to_lowercase();
    for part in field.split('.').filter(|part| !part.is_empty()) {
        let name = part.split('[').next().unwrap_or_default();
        if !name.is_empty() {
            path.push('.');
            path.push_str(name);
        }
    }
    path
}

/// Paths of keys written in `written` (non-null) that the typed object does
/// not have: unknown fields, which k8s-openapi skips silently.
fn unknown_fields(
    written: &Value,
    known: &serde_json::Value,
    path: String,
    unknown: &mut Vec<String>,
) {
    match (written, known) {
        (Value::Mapping(written), serde_json::Value::Object(known)) => {
            for (key, value) in written {
                let Some(key) = key.as_str() else {
                    continue;
                };
                if value.is_null() {
                    continue;
                }
                let child = if path.is_empty() {
                    key.to_owned()
                } else {
                    format!("{path}.{key}")
                };
                match known.get(key) {
                    Some(inner) => unknown_fields(value, inner, child, unknown),
                    None => unknown.push(child),
                }
            }
        }
        (Value::Sequence(written), serde_json::Value::Array(known)) => {
            for (index, (value, inner)) in written.iter().zip(known).enumerate() {
                unknown_fields(value, inner, format!("{path}[{index}]"), unknown);
            }
        }
        (Value::Tagged(tagged), _) => unknown_fields(&tagged.value, known, path, unknown),
        _ => {}
    }
}
