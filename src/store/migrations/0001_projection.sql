-- The task projection: rebuilt from the events topic, never the source of truth.

CREATE TABLE tasks (
    id               uuid PRIMARY KEY,
    state            text        NOT NULL,
    seq              bigint      NOT NULL,
    type             text        NOT NULL,
    name             text,
    priority         integer     NOT NULL,
    labels           jsonb       NOT NULL DEFAULT '{}',
    idempotency_key  text,
    submitted_at     timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL,
    -- Where the task's last applied event sits on the events topic.
    event_partition  integer     NOT NULL,
    last_offset      bigint      NOT NULL,
    -- The full folded state (events::TaskState as JSON). `json`, not `jsonb`: it is only
    -- ever read whole, and storing text is much cheaper for the projector.
    doc              json        NOT NULL
);
CREATE INDEX tasks_by_submission ON tasks (submitted_at DESC, id DESC);
CREATE INDEX tasks_by_state ON tasks (state, submitted_at DESC, id DESC);
CREATE INDEX tasks_by_labels ON tasks USING gin (labels jsonb_path_ops);

-- Every applied event, in per-task order: the task's history.
CREATE TABLE task_events (
    task_id     uuid        NOT NULL,
    seq         bigint      NOT NULL,
    ce_id       text        NOT NULL,
    type        text        NOT NULL,
    time        timestamptz NOT NULL,
    source      text        NOT NULL,
    partition   integer     NOT NULL,
    "offset"    bigint      NOT NULL,
    data        json        NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task_id, seq)
);
CREATE UNIQUE INDEX task_events_ce_id ON task_events (ce_id);

-- Records that were not applied, with the reason; each is also copied to the DLQ topic.
CREATE TABLE rejected_events (
    topic        text        NOT NULL,
    partition    integer     NOT NULL,
    "offset"     bigint      NOT NULL,
    ce_id        text,
    ce_type      text,
    subject      text,
    reason       text        NOT NULL,
    message      text        NOT NULL,
    record_key   bytea,
    headers      jsonb       NOT NULL,
    payload      bytea,
    rejected_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition, "offset")
);
CREATE INDEX rejected_events_ce_id ON rejected_events (ce_id);
CREATE INDEX rejected_events_reason ON rejected_events (reason, rejected_at DESC);

-- The next offset to apply per partition, written in the same transaction as the rows
-- it produced: the projection's exactly-once guarantee.
CREATE TABLE projection_offsets (
    topic        text        NOT NULL,
    partition    integer     NOT NULL,
    next_offset  bigint      NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition)
);

-- Tasks per state, maintained by the projector for metrics.
CREATE TABLE task_state_counts (
    state  text   PRIMARY KEY,
    count  bigint NOT NULL
);
