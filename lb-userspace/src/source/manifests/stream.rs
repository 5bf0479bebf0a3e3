//! A manifest stream -> typed objects: each document's YAML, `v1` Lists,
//! the kinds xlb reads (others are counted and skipped), type errors and
//! unknown fields located, each object defined once. What the objects say
//! is checked in `objects`.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::DeserializeOwned;
use serde_yaml::Value;

use super::Document;
use crate::model::Owners;
use crate::source::cluster::{ClusterSnapshot, ObjectKey, key_of};
use crate::source::locate::Locations;
use crate::source::problem::{Problem, SYNTAX_FIX, error_position};

/// Where a finding is: the document and how to find lines in it.
pub struct At<'a> {
    pub origin: &'a str,
    pub document: &'a Document,
    pub locations: &'a Locations,
    /// Prefix of every field path (`items[3].` inside a List).
    pub prefix: String,
    pub object: Option<String>,
}

impl<'a> At<'a> {
    /// The same place, about `object`.
    pub fn about(&self, object: String) -> At<'a> {
        At {
            object: Some(object),
            prefix: self.prefix.clone(),
            ..*self
        }
    }

    /// The item at `prefix` (e.g. `items[3].`) inside this document.
    pub fn inside(&self, prefix: String) -> At<'a> {
        At {
            prefix,
            object: None,
            ..*self
        }
    }

    pub fn problem(
        &self,
        field: &str,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> Problem {
        let full = if field.is_empty() {
            self.prefix.trim_end_matches('.').to_owned()
        } else {
            format!("{}{field}", self.prefix)
        };
        let position = self.locations.find(&full);
        Problem {
            object: self.object.clone(),
            ..self
                .document
                .problem(self.origin, position, full, message, fix)
        }
    }
}

/// A NodePort's first owner, for duplicate checks across documents.
pub struct Owner {
    pub object: String,
    pub problem: Problem,
}

#[derive(Default)]
pub struct Checker {
    pub snapshot: ClusterSnapshot,
    pub problems: Vec<Problem>,
    pub warnings: Vec<Problem>,
    pub skipped: BTreeMap<String, usize>,
    /// Where each object was defined, for duplicate messages.
    pub defined: HashMap<(String, ObjectKey), Problem>,
    /// Which Service port holds each NodePort (the model's rule).
    pub node_ports: Owners<Owner>,
    /// Where each slice is, for the cross check.
    pub slices: Vec<(ObjectKey, Problem)>,
}

impl Checker {
    pub fn document(&mut self, origin: &str, document: &Document) {
        let locations = Locations::index(&document.text);
        let at = At {
            origin,
            document,
            locations: &locations,
            prefix: String::new(),
            object: None,
        };
        if let Some(position) = locations.first_alias() {
            self.problems
                .push(document.place(Problem::alias(origin, position)));
            return;
        }
        let value: Value = match serde_yaml::from_str(&document.text) {
            Ok(value) => value,
            Err(error) => {
                let mut message = error.to_string();
                if let Some(at) = message.find(" at line ") {
                    message.truncate(at);
                }
                let position = error_position(&error);
                let problem = document.problem(origin, position, "", message, SYNTAX_FIX);
                self.problems.push(problem);
                return;
            }
        };
        if value.is_null() {
            return;
        }
        self.object(&at, &value);
    }

    pub fn object(&mut self, at: &At<'_>, value: &Value) {
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

    /// `at`, about the `kind` object of `metadata`, and its key; `None`
    /// (with a finding) when it has no name or is defined already.
    pub fn named_object<'a>(
        &mut self,
        at: &At<'a>,
        kind: &str,
        metadata: &ObjectMeta,
    ) -> Option<(At<'a>, ObjectKey)> {
        let key = key_of(metadata);
        let at = at.about(format!("{kind} {}/{}", key.0, key.1));
        let defined = self.metadata_name(&at, &key) && self.define(&at, kind, &key);
        defined.then_some((at, key))
    }

    fn define(&mut self, at: &At<'_>, kind: &str, key: &ObjectKey) -> bool {
        let here = at.problem("metadata.name", "", "");
        if let Some(first) = self.defined.get(&(kind.to_owned(), key.clone())) {
            self.problems.push(at.problem(
                "metadata.name",
                format!(
                    "{kind} {}/{} is also defined at {}:{} (document {})",
                    key.0,
                    key.1,
                    first.origin,
                    first.line,
                    first.document.unwrap_or_default()
                ),
                "define each object once",
            ));
            return false;
        }
        self.defined.insert((kind.to_owned(), key.clone()), here);
        true
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
