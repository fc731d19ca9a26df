-- The trace each event belongs to (`ce_traceparent`: its trace id and the span that
-- caused it), so that a trace can be listed across tasks in log order.
ALTER TABLE task_events ADD COLUMN trace_id text, ADD COLUMN span_id text;
CREATE INDEX task_events_by_trace ON task_events (trace_id) WHERE trace_id IS NOT NULL;
