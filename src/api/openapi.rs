//! The OpenAPI 3.1 description of the API (`schemas/openapi.yaml`), served at
//! `GET /v1/openapi.json`.
//!
//! The YAML refers to the JSON Schemas of `schemas/` by file (`task-spec.v1.json`,
//! `events/dev.tasklog.task.submitted.v1.json#/properties/...`), and those refer to each
//! other by `$id`. The served document is self-contained: every schema file is put into
//! `components/schemas` (named by its file name without `.json`) and every reference is
//! rewritten to point there. All of it is embedded at build time and bundled once.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value};

use super::{ApiError, AppState};

/// The description as written.
pub const OPENAPI_YAML: &str = include_str!("../../schemas/openapi.yaml");

/// Every JSON Schema file under `schemas/`, by its path there.
pub const SCHEMA_FILES: &[(&str, &str)] = &[
    (
        "task-spec.v1.json",
        include_str!("../../schemas/task-spec.v1.json"),
    ),
    (
        "events/dev.tasklog.task.submitted.v1.json",
        include_str!("../../schemas/events/dev.tasklog.task.submitted.v1.json"),
    ),
    (
        "events/dev.tasklog.task.queued.v1.json",
        include_str!("../../schemas/events/dev.tasklog.task.queued.v1.json"),
    ),
    (
        "events/dev.tasklog.task.assigned.v1.json",
        include_str!("../../schemas/events/dev.tasklog.task.assigned.v1.json"),
    ),
    (
        "events/dev.tasklog.task.started.v1.json",
        include_str!("../../schemas/events/dev.tasklog.task.started.v1.json"),
    ),
    (
        "events/dev.tasklog.task.ready.v1.json",
        include_str!("../../schemas/events/dev.tasklog.task.ready.v1.json"),
    ),
    (
        "events/dev.tasklog.task.succeeded.v1.json",
        include_str!("../../schemas/events/dev.tasklog.task.succeeded.v1.json"),
    ),
    (
        "events/dev.tasklog.task.failed.v1.json",
        include_str!("../../schemas/events/dev.tasklog.task.failed.v1.json"),
    ),
    (
        "events/dev.tasklog.task.retry_scheduled.v1.json",
        include_str!("../../schemas/events/dev.tasklog.task.retry_scheduled.v1.json"),
    ),
    (
        "events/dev.tasklog.task.cancel_requested.v1.json",
        include_str!("../../schemas/events/dev.tasklog.task.cancel_requested.v1.json"),
    ),
    (
        "events/dev.tasklog.task.cancelled.v1.json",
        include_str!("../../schemas/events/dev.tasklog.task.cancelled.v1.json"),
    ),
    (
        "events/dev.tasklog.worker.registered.v1.json",
        include_str!("../../schemas/events/dev.tasklog.worker.registered.v1.json"),
    ),
    (
        "events/dev.tasklog.worker.heartbeat.v1.json",
        include_str!("../../schemas/events/dev.tasklog.worker.heartbeat.v1.json"),
    ),
    (
        "events/dev.tasklog.worker.draining.v1.json",
        include_str!("../../schemas/events/dev.tasklog.worker.draining.v1.json"),
    ),
    (
        "events/dev.tasklog.worker.lost.v1.json",
        include_str!("../../schemas/events/dev.tasklog.worker.lost.v1.json"),
    ),
    (
        "events/dev.tasklog.service.created.v1.json",
        include_str!("../../schemas/events/dev.tasklog.service.created.v1.json"),
    ),
    (
        "events/dev.tasklog.service.scaled.v1.json",
        include_str!("../../schemas/events/dev.tasklog.service.scaled.v1.json"),
    ),
    (
        "events/dev.tasklog.service.stop_requested.v1.json",
        include_str!("../../schemas/events/dev.tasklog.service.stop_requested.v1.json"),
    ),
    (
        "events/dev.tasklog.service.stopped.v1.json",
        include_str!("../../schemas/events/dev.tasklog.service.stopped.v1.json"),
    ),
    (
        "events/dev.tasklog.service.failed.v1.json",
        include_str!("../../schemas/events/dev.tasklog.service.failed.v1.json"),
    ),
    (
        "events/dev.tasklog.auth.token_created.v1.json",
        include_str!("../../schemas/events/dev.tasklog.auth.token_created.v1.json"),
    ),
    (
        "events/dev.tasklog.auth.token_revoked.v1.json",
        include_str!("../../schemas/events/dev.tasklog.auth.token_revoked.v1.json"),
    ),
];

/// Why the description could not be bundled (a broken file or reference; the unit tests
/// make sure the embedded ones bundle).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    /// `schemas/openapi.yaml` is not valid YAML, or not an object.
    #[error("schemas/openapi.yaml: {0}")]
    Description(String),
    /// A schema file is not valid JSON.
    #[error("schemas/{file}: {message}")]
    Schema {
        /// The file.
        file: String,
        /// What is wrong.
        message: String,
    },
    /// A `$ref` names a file that is not embedded.
    #[error("unresolved $ref {0:?}")]
    UnknownRef(String),
    /// Two schema files would get the same component name.
    #[error("two schemas are named {0}")]
    DuplicateName(String),
}

/// The component name of a schema file: its file name without `.json`.
fn component_name(path: &str) -> &str {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.strip_suffix(".json").unwrap_or(file)
}

/// Rewrites every external `$ref` in `value` to `#/components/schemas/<name><fragment>`.
/// `names` maps both schema paths and `$id` URIs to component names.
fn rewrite_refs(value: &mut Value, names: &HashMap<String, String>) -> Result<(), BundleError> {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(reference)) = map.get_mut("$ref")
                && !reference.starts_with('#')
            {
                let (target, fragment) = reference
                    .split_once('#')
                    .unwrap_or((reference.as_str(), ""));
                let name = names
                    .get(target.trim_start_matches("./"))
                    .ok_or_else(|| BundleError::UnknownRef(reference.clone()))?;
                *reference = format!("#/components/schemas/{name}{fragment}");
            }
            for v in map.values_mut() {
                rewrite_refs(v, names)?;
            }
            Ok(())
        }
        Value::Array(items) => items.iter_mut().try_for_each(|v| rewrite_refs(v, names)),
        _ => Ok(()),
    }
}

/// Bundles `yaml` (an OpenAPI document) with the schema `files` it refers to into one
/// self-contained JSON document.
pub fn bundle(yaml: &str, files: &[(&str, &str)]) -> Result<Value, BundleError> {
    let mut doc: Value =
        serde_yaml_ng::from_str(yaml).map_err(|e| BundleError::Description(e.to_string()))?;
    let mut names = HashMap::new();
    let mut schemas = Vec::with_capacity(files.len());
    for (path, text) in files {
        let mut schema: Value = serde_json::from_str(text).map_err(|e| BundleError::Schema {
            file: path.to_string(),
            message: e.to_string(),
        })?;
        let name = component_name(path).to_string();
        if let Value::Object(fields) = &mut schema {
            // An `$id` would make the rewritten `#/components/...` references inside
            // resolve against the schema itself; the bundle is one document.
            if let Some(Value::String(id)) = fields.remove("$id") {
                names.insert(id, name.clone());
            }
            fields.remove("$schema");
        }
        names.insert(path.to_string(), name.clone());
        schemas.push((name, schema));
    }
    rewrite_refs(&mut doc, &names)?;
    let components = doc
        .as_object_mut()
        .ok_or_else(|| BundleError::Description("not an object".into()))?
        .entry("components")
        .or_insert_with(|| Value::Object(Map::new()));
    let component_schemas = components
        .as_object_mut()
        .ok_or_else(|| BundleError::Description("components is not an object".into()))?
        .entry("schemas")
        .or_insert_with(|| Value::Object(Map::new()))
        .as_object_mut()
        .ok_or_else(|| BundleError::Description("components.schemas is not an object".into()))?;
    for (name, mut schema) in schemas {
        rewrite_refs(&mut schema, &names)?;
        if component_schemas.insert(name.clone(), schema).is_some() {
            return Err(BundleError::DuplicateName(name));
        }
    }
    Ok(doc)
}

/// The embedded description, bundled once.
pub fn bundled() -> Result<&'static Value, BundleError> {
    static BUNDLED: OnceLock<Result<Value, BundleError>> = OnceLock::new();
    BUNDLED
        .get_or_init(|| bundle(OPENAPI_YAML, SCHEMA_FILES))
        .as_ref()
        .map_err(Clone::clone)
}

/// The description as a server with the given longest `wait_ms` serves it.
pub fn document(max_wait_ms: u64) -> Result<Value, BundleError> {
    let mut doc = bundled()?.clone();
    if let Some(schema) = doc.pointer_mut("/components/parameters/WaitMs/schema")
        && let Value::Object(fields) = schema
    {
        fields.insert("maximum".into(), Value::from(max_wait_ms));
    }
    Ok(doc)
}

/// `GET /v1/openapi.json`
pub async fn serve(State(state): State<Arc<AppState>>) -> Response {
    let max_wait_ms = u64::try_from(state.options.max_wait.as_millis()).unwrap_or(u64::MAX);
    match document(max_wait_ms) {
        Ok(doc) => Json(doc).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "cannot bundle the OpenAPI description");
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
                .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::api::routes;

    const METHODS: &[&str] = &[
        "get", "put", "post", "delete", "options", "head", "patch", "trace",
    ];

    fn described(doc: &Value) -> BTreeSet<(String, String)> {
        let paths = doc["paths"].as_object().expect("paths");
        paths
            .iter()
            .flat_map(|(path, item)| {
                let item = item.as_object().expect("path item");
                METHODS
                    .iter()
                    .filter(|m| item.contains_key(**m))
                    .map(|m| (m.to_uppercase(), path.clone()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn every_route_is_described_and_every_description_is_routed() {
        let doc = bundled().expect("bundle");
        let routed: BTreeSet<(String, String)> = routes::all()
            .into_iter()
            .map(|(verb, path)| (verb.as_str().to_string(), path.to_string()))
            .collect();
        let described = described(doc);
        let undescribed: Vec<_> = routed.difference(&described).collect();
        let unrouted: Vec<_> = described.difference(&routed).collect();
        assert!(
            undescribed.is_empty(),
            "routes missing from schemas/openapi.yaml: {undescribed:?}"
        );
        assert!(
            unrouted.is_empty(),
            "schemas/openapi.yaml describes operations the router lacks: {unrouted:?}"
        );
        assert_eq!(routed.len(), routes::all().len(), "a route is listed twice");
    }

    #[test]
    fn the_bundle_is_self_contained_and_every_ref_resolves() {
        let doc = bundled().expect("bundle");
        assert_eq!(doc["openapi"], "3.1.0");
        fn refs(v: &Value, out: &mut Vec<String>) {
            match v {
                Value::Object(m) => {
                    if let Some(Value::String(r)) = m.get("$ref") {
                        out.push(r.clone());
                    }
                    m.values().for_each(|v| refs(v, out));
                }
                Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
                _ => {}
            }
        }
        let mut all = Vec::new();
        refs(doc, &mut all);
        assert!(all.len() > 50, "{all:?}");
        for r in &all {
            let pointer = r
                .strip_prefix('#')
                .unwrap_or_else(|| panic!("external $ref left: {r}"));
            assert!(doc.pointer(pointer).is_some(), "dangling $ref {r}");
        }
        // The spec and event schemas are the files', not copies.
        let spec: Value = serde_json::from_str(SCHEMA_FILES[0].1).expect("spec");
        assert_eq!(
            doc["components"]["schemas"]["task-spec.v1"]["properties"],
            spec["properties"]
        );
        assert!(all.contains(&"#/components/schemas/task-spec.v1".to_string()));
        assert!(
            doc["components"]["schemas"]["dev.tasklog.task.submitted.v1"]
                .get("$id")
                .is_none()
        );
    }

    #[test]
    fn every_schema_file_is_embedded() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
        let mut on_disk = BTreeSet::new();
        for dir in [root.clone(), root.join("events")] {
            for entry in std::fs::read_dir(&dir).expect("schemas dir") {
                let path = entry.expect("entry").path();
                if path.extension().is_some_and(|e| e == "json") {
                    let rel = path.strip_prefix(&root).expect("under schemas");
                    on_disk.insert(rel.to_string_lossy().into_owned());
                }
            }
        }
        // The audit export's schema describes a file `tasklog audit export` writes, not
        // anything the API sends or takes.
        on_disk.remove("audit-export.v1.json");
        let embedded: BTreeSet<String> = SCHEMA_FILES.iter().map(|(p, _)| p.to_string()).collect();
        assert_eq!(on_disk, embedded);
    }

    #[test]
    fn the_served_document_says_the_servers_longest_wait() {
        let doc = document(1234).expect("document");
        assert_eq!(
            doc["components"]["parameters"]["WaitMs"]["schema"]["maximum"],
            1234
        );
    }

    #[test]
    fn unknown_refs_and_bad_files_are_typed_errors() {
        let yaml = "openapi: 3.1.0\npaths: {}\ncomponents:\n  schemas:\n    A: {$ref: nope.json}\n";
        assert_eq!(
            bundle(yaml, &[]),
            Err(BundleError::UnknownRef("nope.json".into()))
        );
        assert!(matches!(
            bundle("openapi: 3.1.0\n", &[("x.json", "{")]),
            Err(BundleError::Schema { .. })
        ));
        assert!(matches!(
            bundle(": : :", &[]),
            Err(BundleError::Description(_))
        ));
    }
}
