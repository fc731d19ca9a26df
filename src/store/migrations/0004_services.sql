-- The services projection (from the services topic) and the lookup of a service's
-- replica tasks.

CREATE TABLE services (
    name        text        PRIMARY KEY,
    lifecycle   text        NOT NULL,
    updated_at  timestamptz NOT NULL,
    -- events::service::ServiceState as JSON.
    doc         json        NOT NULL
);

CREATE INDEX tasks_by_service ON tasks ((doc->'spec'->>'service'))
    WHERE doc->'spec'->>'service' IS NOT NULL;
