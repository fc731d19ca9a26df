//! Every route of the API in one table: the router is built from it, and a test checks
//! it against the OpenAPI description (`schemas/openapi.yaml`), so a route cannot be
//! added without being described.

use std::sync::Arc;

use axum::Router;
use axum::handler::Handler;
use axum::routing::{MethodFilter, MethodRouter, on};

use super::{
    AppState, audit, healthz, logs, metrics_text, openapi, readyz, services, tasks, workers,
};

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

/// One row of the table: method, path (axum's `{param}` syntax, as OpenAPI writes it)
/// and what answers it.
struct Route {
    verb: Verb,
    path: &'static str,
    service: MethodRouter<Arc<AppState>>,
}

fn at<H, T>(verb: Verb, path: &'static str, handler: H) -> Route
where
    H: Handler<T, Arc<AppState>>,
    T: 'static,
{
    Route {
        verb,
        path,
        service: on(verb.filter(), handler),
    }
}

/// The table.
fn table() -> Vec<Route> {
    use Verb::{Get, Patch, Post};
    vec![
        at(Post, "/v1/tasks", tasks::submit),
        at(Get, "/v1/tasks", tasks::list),
        at(Post, "/v1/tasks/batch", tasks::submit_batch),
        at(Get, "/v1/tasks/{id}", tasks::get_task),
        at(Get, "/v1/tasks/{id}/events", tasks::events),
        at(Get, "/v1/tasks/{id}/audit", audit::task_audit),
        at(Post, "/v1/tasks/{id}/cancel", tasks::cancel),
        at(Post, "/v1/tasks/{id}/attempts/{n}/start", workers::start),
        at(Post, "/v1/tasks/{id}/attempts/{n}/finish", workers::finish),
        at(Post, "/v1/tasks/{id}/attempts/{n}/ready", services::ready),
        at(Post, "/v1/services", services::create),
        at(Get, "/v1/services", services::list),
        at(Get, "/v1/services/{name}", services::get_service),
        at(Patch, "/v1/services/{name}", services::scale),
        at(Post, "/v1/services/{name}/stop", services::stop),
        at(Get, "/v1/workers", workers::list),
        at(Get, "/v1/workers/{id}", workers::get_worker),
        at(Get, "/v1/workers/{id}/assignments", workers::assignments),
        at(Get, "/v1/tasks/{id}/logs", logs::get_logs),
        at(Post, "/v1/tasks/{id}/logs", logs::post_logs),
        at(Get, "/healthz", healthz),
        at(Get, "/readyz", readyz),
        at(Get, "/metrics", metrics_text),
        at(Get, "/v1/openapi.json", openapi::serve),
    ]
}

/// `router` with every route of the table (several methods of one path merge).
pub(super) fn add_all(router: Router<Arc<AppState>>) -> Router<Arc<AppState>> {
    table()
        .into_iter()
        .fold(router, |router, r| router.route(r.path, r.service))
}

/// Every (method, path) the router answers, as the table lists them.
pub fn all() -> Vec<(Verb, &'static str)> {
    table().into_iter().map(|r| (r.verb, r.path)).collect()
}
