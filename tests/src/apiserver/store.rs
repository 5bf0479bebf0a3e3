//! The test API server's state: objects by kind, a global resourceVersion,
//! the event history watches replay, and the knobs tests turn (compaction,
//! connections dropped, away).

use std::collections::BTreeMap;

use serde_json::{Value, json};

/// A kind the server serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kind {
    /// `services`, `endpointslices`, `nodes`.
    pub plural: &'static str,
    /// `v1`, `discovery.k8s.io/v1`.
    pub api_version: &'static str,
    /// `Service`.
    pub kind: &'static str,
    pub namespaced: bool,
}

impl Kind {
    /// `ServiceList`.
    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    /// The URL prefix of the kind's group version: `/api/v1` or
    /// `/apis/discovery.k8s.io/v1`.
    pub fn group_prefix(&self) -> String {
        if self.api_version.contains('/') {
            format!("/apis/{}", self.api_version)
        } else {
            format!("/api/{}", self.api_version)
        }
    }
}

/// Every kind the server knows.
pub const KINDS: [Kind; 4] = [
    Kind {
        plural: "services",
        api_version: "v1",
        kind: "Service",
        namespaced: true,
    },
    Kind {
        plural: "endpointslices",
        api_version: "discovery.k8s.io/v1",
        kind: "EndpointSlice",
        namespaced: true,
    },
    Kind {
        plural: "nodes",
        api_version: "v1",
        kind: "Node",
        namespaced: false,
    },
    // Written by agents (POST, PATCH), read by tests.
    Kind {
        plural: "events",
        api_version: "events.k8s.io/v1",
        kind: "Event",
        namespaced: true,
    },
];

/// The kind with this `kind` name (`Service`).
pub fn kind_named(kind: &str) -> Option<Kind> {
    KINDS.iter().copied().find(|known| known.kind == kind)
}

/// `ADDED`, `MODIFIED`, `DELETED`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Added,
    Modified,
    Deleted,
}

impl Change {
    pub fn name(self) -> &'static str {
        match self {
            Change::Added => "ADDED",
            Change::Modified => "MODIFIED",
            Change::Deleted => "DELETED",
        }
    }
}

/// One change as watches replay it.
#[derive(Clone, Debug)]
pub struct StoredEvent {
    pub revision: u64,
    pub plural: &'static str,
    pub change: Change,
    pub object: Value,
}

/// `(plural, namespace, name)`; the namespace is empty for cluster-scoped
/// kinds.
pub type StoreKey = (&'static str, String, String);

/// One request the server answered, for tests to count lists and watches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub path: String,
    pub query: String,
    /// `None` for a request no kind matched.
    pub plural: Option<&'static str>,
    pub watch: bool,
    pub status: u16,
}

#[derive(Debug, Default)]
pub struct Store {
    /// The last resourceVersion handed out.
    pub revision: u64,
    pub objects: BTreeMap<StoreKey, Value>,
    pub history: Vec<StoredEvent>,
    /// Events at or below this revision are forgotten: a watch resuming
    /// from an older version gets 410 Gone.
    pub compacted: u64,
    /// Answer a too-old watch with HTTP 410 rather than a 410 ERROR event.
    pub gone_as_http: bool,
    /// New connections are closed at once.
    pub away: bool,
    pub requests: Vec<Request>,
    uid: u64,
}

impl Store {
    /// Adds or replaces an object (stamping resourceVersion, uid and
    /// creationTimestamp). `quietly`: no watch event (as if it were lost),
    /// so only a relist sees the change. Returns the new resourceVersion.
    pub fn apply(&mut self, kind: Kind, mut object: Value, quietly: bool) -> u64 {
        self.revision += 1;
        let revision = self.revision;
        let key = key(kind, &object);
        let previous = self.objects.get(&key).cloned();
        if let Value::Object(fields) = &mut object {
            fields.insert(String::from("apiVersion"), json!(kind.api_version));
            fields.insert(String::from("kind"), json!(kind.kind));
            let metadata = fields
                .entry(String::from("metadata"))
                .or_insert_with(|| json!({}));
            if let Value::Object(metadata) = metadata {
                metadata.insert(String::from("resourceVersion"), json!(revision.to_string()));
                if kind.namespaced {
                    metadata.insert(String::from("namespace"), json!(key.1));
                }
                let kept = |field: &str| {
                    previous
                        .as_ref()
                        .and_then(|previous| previous.pointer(&format!("/metadata/{field}")))
                        .cloned()
                };
                let uid = kept("uid").unwrap_or_else(|| {
                    self.uid += 1;
                    json!(format!("00000000-0000-4000-8000-{:012}", self.uid))
                });
                metadata.insert(String::from("uid"), uid);
                let created =
                    kept("creationTimestamp").unwrap_or_else(|| json!("2025-01-01T00:00:00Z"));
                metadata.insert(String::from("creationTimestamp"), created);
            }
        }
        let change = if previous.is_some() {
            Change::Modified
        } else {
            Change::Added
        };
        self.objects.insert(key, object.clone());
        if !quietly {
            self.history.push(StoredEvent {
                revision,
                plural: kind.plural,
                change,
                object,
            });
        }
        revision
    }

    /// Deletes an object; false if there was none.
    pub fn delete(&mut self, kind: Kind, namespace: &str, name: &str, quietly: bool) -> bool {
        let namespace = if kind.namespaced { namespace } else { "" };
        let Some(mut object) =
            self.objects
                .remove(&(kind.plural, namespace.to_owned(), name.to_owned()))
        else {
            return false;
        };
        self.revision += 1;
        if let Some(Value::Object(metadata)) = object.get_mut("metadata") {
            metadata.insert(
                String::from("resourceVersion"),
                json!(self.revision.to_string()),
            );
        }
        if !quietly {
            self.history.push(StoredEvent {
                revision: self.revision,
                plural: kind.plural,
                change: Change::Deleted,
                object,
            });
        }
        true
    }

    /// Forgets every event so far.
    pub fn compact(&mut self) {
        self.compacted = self.revision;
        self.history.clear();
    }

    /// One page of a list: up to `limit` objects of `kind` in `namespace`
    /// (all namespaces when `None`) that `wanted` accepts, in key order,
    /// after the `(namespace, name)` `after`; and the key of the last one
    /// when more follow. Only the page's objects are copied.
    pub fn page(
        &self,
        kind: Kind,
        namespace: Option<&str>,
        after: Option<&(String, String)>,
        limit: Option<usize>,
        wanted: impl Fn(&Value) -> bool,
    ) -> Page {
        use std::ops::Bound;
        let start = match after {
            Some((namespace, name)) => {
                Bound::Excluded((kind.plural, namespace.clone(), name.clone()))
            }
            None => Bound::Included((kind.plural, String::new(), String::new())),
        };
        let mut matching = self
            .objects
            .range((start, Bound::Unbounded))
            .take_while(|((plural, _, _), _)| *plural == kind.plural)
            .filter(|((_, object_namespace, _), object)| {
                namespace.is_none_or(|namespace| namespace == object_namespace) && wanted(object)
            });
        let limit = limit.unwrap_or(usize::MAX);
        let mut page = Page::default();
        for ((_, object_namespace, name), object) in matching.by_ref() {
            if page.items.len() == limit {
                page.remaining = 1;
                break;
            }
            page.items.push(object.clone());
            page.last = Some((object_namespace.clone(), name.clone()));
        }
        if page.remaining == 0 {
            page.last = None;
        } else {
            page.remaining += matching.count();
        }
        page
    }

    /// Current objects of `kind` in `namespace` (all when `None`).
    pub fn list(&self, kind: Kind, namespace: Option<&str>) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|((plural, object_namespace, _), _)| {
                *plural == kind.plural
                    && namespace.is_none_or(|namespace| namespace == object_namespace)
            })
            .map(|(_, object)| object.clone())
            .collect()
    }
}

/// One page of a list ([`Store::page`]).
#[derive(Debug, Default)]
pub struct Page {
    pub items: Vec<Value>,
    /// `(namespace, name)` of the last item, when more follow.
    pub last: Option<(String, String)>,
    /// How many matching objects follow.
    pub remaining: usize,
}

/// Where `object` is stored.
fn key(kind: Kind, object: &Value) -> StoreKey {
    let text = |pointer: &str| {
        object
            .pointer(pointer)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let namespace = if kind.namespaced {
        let namespace = text("/metadata/namespace");
        if namespace.is_empty() {
            String::from("default")
        } else {
            namespace
        }
    } else {
        String::new()
    };
    (kind.plural, namespace, text("/metadata/name"))
}

/// A `Status` object, as errors are sent.
pub fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}
