-- The log index: where each task attempt's lines are on the logs topic. The lines
-- themselves stay on Kafka; readers seek there, bounded by this index.

CREATE TABLE log_index (
    task_id       uuid        NOT NULL,
    attempt       integer     NOT NULL,
    partition     integer     NOT NULL,
    first_offset  bigint      NOT NULL,
    last_offset   bigint      NOT NULL,
    lines         bigint      NOT NULL,
    bytes         bigint      NOT NULL,
    last_line     bigint      NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task_id, attempt)
);

-- Sparse checkpoints: the offset of line 1, 1001, 2001, ... of each attempt, so that
-- "from line K" starts near the right offset instead of scanning.
CREATE TABLE log_checkpoints (
    task_id   uuid    NOT NULL,
    attempt   integer NOT NULL,
    line      bigint  NOT NULL,
    "offset"  bigint  NOT NULL,
    PRIMARY KEY (task_id, attempt, line)
);

-- Secrets the servers share (the log cursor MAC key), created once.
CREATE TABLE server_keys (
    name  text  PRIMARY KEY,
    key   bytea NOT NULL
);
