-- The workers projection (from the workers topic) and what the scheduler reads.

CREATE TABLE workers (
    id                 text        PRIMARY KEY,
    state              text        NOT NULL,
    last_heartbeat_at  timestamptz NOT NULL,
    updated_at         timestamptz NOT NULL,
    -- events::worker::WorkerState as JSON.
    doc                json        NOT NULL
);

-- The scheduler follows changed tasks by where their last event sits on the log:
-- per partition, offsets only grow, so "last_offset >= what I saw" is every change.
CREATE INDEX tasks_by_position ON tasks (event_partition, last_offset);
