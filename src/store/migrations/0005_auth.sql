-- Who may do what. `tokens` is the projection of the auth topic (no secrets, no
-- hashes) and is rebuilt with the others. `token_credentials` holds the hash of each
-- token's secret: it is not on the log, which auditors read, so it is never truncated
-- by a rebuild; a credential counts only while the projection has an active token
-- with its `token_id`.
CREATE TABLE tokens (
    name        text        PRIMARY KEY,
    token_id    uuid        NOT NULL,
    role        text        NOT NULL,
    revoked     boolean     NOT NULL,
    updated_at  timestamptz NOT NULL,
    -- events::auth::TokenState as JSON.
    doc         json        NOT NULL
);

CREATE TABLE token_credentials (
    token_id    uuid        PRIMARY KEY,
    hash        bytea       NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Who caused each event (`ce_tasklogprincipal`), when it says.
ALTER TABLE task_events ADD COLUMN principal text;
