//! The writes the test API server takes: agents post Events
//! (`events.k8s.io/v1`: create, and a JSON merge patch when a series
//! repeats). Services, EndpointSlices and Nodes are the test's to change
//! (`ApiServer::apply`), never a client's.

use std::sync::Arc;

use bytes::Bytes;
use hyper::{Method, Response, StatusCode};
use serde_json::Value;

use super::http::{Body, Shared, error_response, json_response, route};
use super::store::Kind;

/// The answer to a POST or PATCH (or any other non-GET method).
pub fn respond(shared: &Arc<Shared>, method: &Method, path: &str, body: &Bytes) -> Response<Body> {
    let writable = |kind: Kind| kind.plural == "events";
    let object: Value = match serde_json::from_slice(body) {
        Ok(object) => object,
        Err(error) => {
            return error_response(StatusCode::BAD_REQUEST, "BadRequest", &error.to_string());
        }
    };
    match *method {
        Method::POST => match route(path) {
            Some((kind, Some(namespace))) if writable(kind) => {
                create(shared, kind, &namespace, object)
            }
            _ => not_allowed(),
        },
        Method::PATCH => {
            let Some((collection, name)) = path.rsplit_once('/') else {
                return not_allowed();
            };
            match route(collection) {
                Some((kind, Some(namespace))) if writable(kind) => {
                    patch(shared, kind, &namespace, name, &object)
                }
                _ => not_allowed(),
            }
        }
        _ => not_allowed(),
    }
}

fn not_allowed() -> Response<Body> {
    error_response(
        StatusCode::METHOD_NOT_ALLOWED,
        "MethodNotAllowed",
        "the test API server lists and watches; clients may only create and patch Events",
    )
}

fn create(shared: &Arc<Shared>, kind: Kind, namespace: &str, mut object: Value) -> Response<Body> {
    let Some(name) = object.pointer("/metadata/name").and_then(Value::as_str) else {
        return error_response(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "metadata.name: Required value",
        );
    };
    let name = name.to_owned();
    if let Some(metadata) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        metadata.insert(String::from("namespace"), Value::from(namespace));
    }
    let stored = {
        let mut store = shared.store();
        let key = (kind.plural, namespace.to_owned(), name.clone());
        if store.objects.contains_key(&key) {
            drop(store);
            let message = format!("{} \"{name}\" already exists", kind.plural);
            return error_response(StatusCode::CONFLICT, "AlreadyExists", &message);
        }
        let revision = store.apply(kind, object, false);
        shared
            .signal
            .send_modify(|signal| signal.revision = revision);
        store.objects.get(&key).cloned().unwrap_or_default()
    };
    json_response(StatusCode::CREATED, &stored)
}

fn patch(
    shared: &Arc<Shared>,
    kind: Kind,
    namespace: &str,
    name: &str,
    patch: &Value,
) -> Response<Body> {
    let mut store = shared.store();
    let key = (kind.plural, namespace.to_owned(), name.to_owned());
    let Some(mut object) = store.objects.get(&key).cloned() else {
        drop(store);
        let message = format!("{} \"{name}\" not found", kind.plural);
        return error_response(StatusCode::NOT_FOUND, "NotFound", &message);
    };
    merge(&mut object, patch);
    let revision = store.apply(kind, object, false);
    shared
        .signal
        .send_modify(|signal| signal.revision = revision);
    let stored = store.objects.get(&key).cloned().unwrap_or_default();
    drop(store);
    json_response(StatusCode::OK, &stored)
}

/// RFC 7386 JSON merge patch: objects merge key by key, `null` removes, any
/// other value replaces.
fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(serde_json::Map::new());
    }
    if let Value::Object(target) = target {
        for (key, value) in patch {
            if value.is_null() {
                target.remove(key);
            } else {
                merge(target.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::merge;

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut target = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge(
            &mut target,
            &json!({"a": "z", "c": {"f": null}, "series": {"count": 2}}),
        );
        assert_eq!(
            target,
            json!({"a": "z", "c": {"d": "e"}, "series": {"count": 2}})
        );
    }
}
