-- Projects: a task's is its spec's `project` (default `default`), listed by project.
CREATE INDEX tasks_by_project
    ON tasks ((COALESCE(doc->'spec'->>'project', 'default')), submitted_at DESC, id DESC);
