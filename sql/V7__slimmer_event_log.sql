-- A slimmer event log write: what each writer's commit pays for an event.
--
-- Every index on windflow_events is work in every writer's transaction, and
-- two of them served only the server's rare reads:
--
-- 1. windflow_events_created_at_idx, for retention. Retention now walks the
--    log in id order (the primary key) up to the first event newer than the
--    retention, and deletes what comes before it (db::retention).
-- 2. windflow_events_xid_idx, for the catch-up after an outage. Each marker
--    now also carries the newest event id allocated before its transaction
--    took its xid; the catch-up reads the log by id from such a bound
--    (src/db/catchup.rs).
--
-- windflow_events_deployment_id_idx stays: it keeps a per-deployment replay
-- from reading the whole log.
--
-- And windflow_emit no longer switches user and search_path itself: only
-- the trigger functions call it (V6 revoked it from PUBLIC), and they
-- already run as the owner with the owner's search_path (V6), so a second
-- switch per event bought nothing.

DROP INDEX windflow_events_created_at_idx;
DROP INDEX windflow_events_xid_idx;

ALTER FUNCTION windflow_emit(text, deployments, json) SECURITY INVOKER;
ALTER FUNCTION windflow_emit(text, deployments, json) RESET search_path;
