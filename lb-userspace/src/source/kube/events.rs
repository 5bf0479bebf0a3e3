//! Kubernetes Events about Services this node does not serve in full: a
//! port skipped by the translation (a nodePort another Service claims, an
//! endpoint that is not IPv4, ...), a frontend refused because it is an
//! address of the node, a Service left out because the datapath's maps
//! are full. The log and `/metrics` say the same on the node; the Event
//! puts it where the Service's owner looks (`kubectl describe service`,
//! `kubectl events`).
//!
//! Events are `events.k8s.io/v1`, posted by kube-runtime's recorder (one
//! series per Service, reason and node: a finding that comes back is
//! counted on its series). A finding is posted when it appears, not on
//! every generation it lasts; posting never blocks the agent (each is a
//! task of its own), and a failed post is logged, not retried.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use log::{debug, warn};

use super::{Note, NoteLevel, ObjectKey, ServiceObject};

/// The reporting controller Events name.
pub const REPORTING_CONTROLLER: &str = "xlb";
/// At most this many Events are posted for one generation; the rest are
/// only logged (a cluster far too big for the maps would otherwise post
/// one Event per Service at once).
const EVENTS_PER_GENERATION: usize = 50;
/// The API's limit on an Event's note.
const NOTE_MAX_BYTES: usize = 1024;

/// Why a Service is not served in full: an Event's `reason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Why {
    /// The translation skipped part of it (a translation note).
    NotServed,
    /// A frontend is an address of this node.
    FrontendRefused,
    /// It does not fit the datapath's maps.
    DoesNotFit,
}

impl Why {
    fn reason(self) -> &'static str {
        match self {
            Why::NotServed => "NotServed",
            Why::FrontendRefused => "FrontendRefused",
            Why::DoesNotFit => "DoesNotFit",
        }
    }

    fn action(self) -> &'static str {
        match self {
            Why::NotServed => "Translate",
            Why::FrontendRefused => "Refuse",
            Why::DoesNotFit => "Skip",
        }
    }
}

/// One thing to tell a Service's owner.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Finding {
    /// The Service's (namespace, name).
    pub service: ObjectKey,
    pub why: Why,
    pub message: String,
}

impl Finding {
    /// About the model service named `qualified` (`namespace/name` or
    /// `namespace/name:port`, as the translation names them).
    pub fn for_service(qualified: &str, why: Why, message: String) -> Option<Finding> {
        let (namespace, rest) = qualified.split_once('/')?;
        let name = rest.split_once(':').map_or(rest, |(name, _)| name);
        (!namespace.is_empty() && !name.is_empty()).then(|| Finding {
            service: (namespace.to_owned(), name.to_owned()),
            why,
            message,
        })
    }

    /// A translation note's finding, when it warns about a Service.
    pub fn from_note(note: &Note) -> Option<Finding> {
        if note.level != NoteLevel::Warn {
            return None;
        }
        let qualified = note.object.strip_prefix("Service ")?;
        Finding::for_service(qualified, Why::NotServed, note.message.clone())
    }
}

/// Posts Events for new findings.
pub struct ServiceEvents {
    recorder: Recorder,
    /// The findings of the last generation: those are not posted again.
    posted: BTreeSet<Finding>,
}

impl std::fmt::Debug for ServiceEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceEvents")
            .field("posted", &self.posted.len())
            .finish_non_exhaustive()
    }
}

impl ServiceEvents {
    /// Events reported by `xlb` on `node_name` (the reporting instance, so
    /// each node's findings are a series of their own).
    pub fn new(client: Client, node_name: &str) -> Self {
        let reporter = Reporter {
            controller: String::from(REPORTING_CONTROLLER),
            instance: Some(node_name.to_owned()),
        };
        Self {
            recorder: Recorder::new(client, reporter),
            posted: BTreeSet::new(),
        }
    }

    /// Posts an Event for each finding the last call did not have (on
    /// tasks of the current tokio runtime; none outside one). `services`
    /// gives the Services' uids.
    pub fn publish(
        &mut self,
        findings: BTreeSet<Finding>,
        services: &BTreeMap<ObjectKey, Arc<ServiceObject>>,
    ) {
        let fresh: Vec<&Finding> = findings.difference(&self.posted).collect();
        if !fresh.is_empty() {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => self.post(&runtime, &fresh, services),
                Err(_) => debug!("no runtime: {} Event(s) not posted", fresh.len()),
            }
        }
        self.posted = findings;
    }

    fn post(
        &self,
        runtime: &tokio::runtime::Handle,
        fresh: &[&Finding],
        services: &BTreeMap<ObjectKey, Arc<ServiceObject>>,
    ) {
        for finding in fresh.iter().take(EVENTS_PER_GENERATION) {
            let uid = services
                .get(&finding.service)
                .and_then(|service| service.uid.as_deref())
                .map(str::to_owned);
            let (namespace, name) = finding.service.clone();
            let reference = ObjectReference {
                api_version: Some(String::from("v1")),
                kind: Some(String::from("Service")),
                namespace: Some(namespace),
                name: Some(name),
                uid,
                ..ObjectReference::default()
            };
            let event = Event {
                type_: EventType::Warning,
                reason: finding.why.reason().to_owned(),
                note: Some(truncated(&finding.message, NOTE_MAX_BYTES)),
                action: finding.why.action().to_owned(),
                secondary: None,
            };
            let recorder = self.recorder.clone();
            let (namespace, name) = &finding.service;
            let about = format!("{namespace}/{name}");
            runtime.spawn(async move {
                if let Err(error) = recorder.publish(&event, &reference).await {
                    warn!("cannot post an Event about Service {about}: {error}");
                }
            });
        }
        if fresh.len() > EVENTS_PER_GENERATION {
            warn!(
                "{} more Service finding(s) not posted as Events (at most {EVENTS_PER_GENERATION} \
                 per change); the log above has them all",
                fresh.len() - EVENTS_PER_GENERATION
            );
        }
    }
}

/// `text` cut at a character boundary to at most `max` bytes.
fn truncated(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn findings_name_the_service_not_the_port() {
        let finding = Finding::for_service("web/api:grpc", Why::DoesNotFit, String::from("full"));
        assert_eq!(
            finding.map(|finding| finding.service),
            Some((String::from("web"), String::from("api")))
        );
        assert!(Finding::for_service("no-namespace", Why::DoesNotFit, String::new()).is_none());
    }

    #[test]
    fn only_warnings_about_services_are_findings() {
        let note = |level, object: &str| Note {
            level,
            object: object.to_owned(),
            message: String::from("port 80 is already used by web/a; port 80 skipped"),
        };
        let finding = Finding::from_note(&note(NoteLevel::Warn, "Service web/b"));
        assert_eq!(
            finding.map(|finding| (finding.service, finding.why)),
            Some(((String::from("web"), String::from("b")), Why::NotServed))
        );
        assert!(Finding::from_note(&note(NoteLevel::Debug, "Service web/b")).is_none());
        assert!(Finding::from_note(&note(NoteLevel::Warn, "EndpointSlice web/b-1")).is_none());
    }

    #[test]
    fn notes_are_cut_to_the_api_limit() {
        let long = "é".repeat(600);
        let cut = truncated(&long, NOTE_MAX_BYTES);
        assert!(cut.len() <= NOTE_MAX_BYTES && long.starts_with(&cut));
    }
}
