-- windflow_emit runs as the event log's owner (V3), and functions are
-- executable by PUBLIC by default: any login could have called it to
-- write, and sign, an event of its own. Only the triggers may call it now.
-- The trigger functions run as the owner too (PostgreSQL refuses to call a
-- trigger function other than as a trigger), so writers still need no
-- privilege on the event log.
REVOKE EXECUTE ON FUNCTION windflow_emit(text, deployments, json) FROM PUBLIC;

ALTER FUNCTION windflow_deployment_events() SECURITY DEFINER;
ALTER FUNCTION windflow_deployment_events() SET search_path FROM CURRENT;
ALTER FUNCTION windflow_deployment_log_events() SECURITY DEFINER;
ALTER FUNCTION windflow_deployment_log_events() SET search_path FROM CURRENT;
