//! Every route of the API in one table: the router is built from it, and a test checks
//! it against the OpenAPI description (`schemas/openapi.yaml`), so a route cannot be
//! added without being described.

use std::sync::Arc;

use axum::Router;
use axum::handler::Handler;
use axum::routing::{MethodFilter, MethodRouter, on};

use super::{
    AppState, audit, healthz, logs, metrics_text, openapi, readyz, services, tasks, tokens, traces,
    workers,
};
use crate::events::auth::Access;

/// An HTTP method the API routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verb {
    /// `GET` (and `HEAD`, which axum answers with the GET handler).
    Get,
    /// `POST`.
    Post,
    /// `PATCH`.
    Patch,
}

impl Verb {
    /// The method's name, upper case.
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "GET",
            Verb::Post => "POST",
            Verb::Patch => "PATCH",
        }
    }

    fn filter(self) -> MethodFilter {
        match self {
            Verb::Get => MethodFilter::GET,
            Verb::Post => MethodFilter::POST,
            Verb::Patch => MethodFilter::PATCH,
        }
    }
}

/// One row of the table: method, path (axum's `{param}` syntax, as OpenAPI writes it),
/// what it needs of the caller, and what answers it.
struct Route {
    verb: Verb,
    path: &'static str,
    access: Access,
    service: MethodRouter<Arc<AppState>>,
}

fn at<H, T>(verb: Verb, path: &'static str, access: Access, handler: H) -> Route
where
    H: Handler<T, Arc<AppState>>,
    T: 'static,
{
    Route {
        verb,
        path,
        access,
        service: on(verb.filter(), handler),
    }
}

/// The table.
fn table() -> Vec<Route> {
    use Access::{Admin, Anyone, Open, Read, Report, Write};
    use Verb::{Get, Patch, Post};
    vec![
        at(Post, "/v1/tasks", Write, tasks::submit),
        at(Get, "/v1/tasks", Read, tasks::list),
        at(Post, "/v1/tasks/batch", Write, tasks::submit_batch),
        at(Get, "/v1/tasks/{id}", Read, tasks::get_task),
        at(Get, "/v1/tasks/{id}/events", Read, tasks::events),
        at(Get, "/v1/tasks/{id}/audit", Read, audit::task_audit),
        at(Get, "/v1/traces/{trace_id}", Read, traces::get_trace),
        at(Post, "/v1/tasks/{id}/cancel", Write, tasks::cancel),
        at(
            Post,
            "/v1/tasks/{id}/attempts/{n}/start",
            Report,
            workers::start,
        ),
        at(
            Post,
            "/v1/tasks/{id}/attempts/{n}/finish",
            Report,
            workers::finish,
        ),
        at(
            Post,
            "/v1/tasks/{id}/attempts/{n}/ready",
            Report,
            services::ready,
        ),
        at(Post, "/v1/services", Write, services::create),
        at(Get, "/v1/services", Read, services::list),
        at(Get, "/v1/services/{name}", Read, services::get_service),
        at(Patch, "/v1/services/{name}", Write, services::scale),
        at(Post, "/v1/services/{name}/stop", Write, services::stop),
        at(Get, "/v1/workers", Read, workers::list),
        at(Get, "/v1/workers/{id}", Read, workers::get_worker),
        at(Post, "/v1/workers/{id}/events", Report, workers::post_event),
        at(
            Get,
            "/v1/workers/{id}/assignments",
            Report,
            workers::assignments,
        ),
        at(Get, "/v1/tasks/{id}/logs", Read, logs::get_logs),
        at(Post, "/v1/tasks/{id}/logs", Write, logs::post_logs),
        at(Get, "/v1/logs", Read, logs::follow_many),
        at(Get, "/v1/whoami", Anyone, tokens::whoami),
        at(Post, "/v1/tokens", Admin, tokens::create),
        at(Get, "/v1/tokens", Admin, tokens::list),
        at(Post, "/v1/tokens/{name}/revoke", Admin, tokens::revoke),
        at(Get, "/healthz", Open, healthz),
        at(Get, "/readyz", Open, readyz),
        at(Get, "/metrics", Open, metrics_text),
        at(Get, "/v1/openapi.json", Open, openapi::serve),
    ]
}

/// `router` with every route of the table (several methods of one path merge).
pub(super) fn add_all(router: Router<Arc<AppState>>) -> Router<Arc<AppState>> {
    table()
        .into_iter()
        .fold(router, |router, r| router.route(r.path, r.service))
}

/// What the route at (`method`, `path`, as matched) needs of the caller.
pub fn access(method: &axum::http::Method, path: &str) -> Option<Access> {
    static ACCESS: std::sync::OnceLock<Vec<(Verb, &'static str, Access)>> =
        std::sync::OnceLock::new();
    let verb = match *method {
        axum::http::Method::GET | axum::http::Method::HEAD => Verb::Get,
        axum::http::Method::POST => Verb::Post,
        axum::http::Method::PATCH => Verb::Patch,
        _ => return None,
    };
    ACCESS
        .get_or_init(|| {
            table()
                .into_iter()
                .map(|r| (r.verb, r.path, r.access))
                .collect()
        })
        .iter()
        .find(|(v, p, _)| *v == verb && *p == path)
        .map(|(_, _, a)| *a)
}

/// Every route with what it needs of the caller.
pub fn all_with_access() -> Vec<(Verb, &'static str, Access)> {
    table()
        .into_iter()
        .map(|r| (r.verb, r.path, r.access))
        .collect()
}

/// Every (method, path) the router answers, as the table lists them.
pub fn all() -> Vec<(Verb, &'static str)> {
    table().into_iter().map(|r| (r.verb, r.path)).collect()
}
