-- The durable event log and the triggers that fill it. The triggers are the
-- only source of events: every write to deployments or deployment_logs, from
-- any client, records its events here and NOTIFYs them at commit.

CREATE TABLE windflow_events (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The writing transaction. After a listener outage the server asks for
    -- the events of every transaction that had not finished at its last
    -- marker snapshot; ids alone cannot say that, since they are allocated
    -- before commit and transactions commit out of id order.
    xid             xid8 NOT NULL DEFAULT pg_current_xact_id(),
    type            text NOT NULL,
    deployment_id   uuid NOT NULL,
    -- Owner and organization as they were when the event happened: routing
    -- and replay decide visibility from these, not from today's row.
    user_id         uuid NOT NULL,
    organization_id uuid,
    -- The message's "data" object, exactly as clients receive it.
    data            json NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE INDEX windflow_events_xid_idx ON windflow_events (xid);
CREATE INDEX windflow_events_created_at_idx ON windflow_events (created_at);
CREATE INDEX windflow_events_deployment_id_idx ON windflow_events (deployment_id, id);

-- The highest event id retention has deleted: a client resuming from an
-- older id is told to resync.
CREATE TABLE windflow_events_pruned (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    upto      bigint NOT NULL DEFAULT 0
);
INSERT INTO windflow_events_pruned DEFAULT VALUES;

-- RFC 3339 in UTC with microseconds and a trailing Z, as in every message.
CREATE FUNCTION windflow_utc(ts timestamptz) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
$$;

-- Record one event and NOTIFY it on windflow_events.
--
-- The payload carries the whole event when it fits; NOTIFY refuses payloads
-- of 8000 bytes or more, so a larger event (a 1 MiB log line) is announced
-- without its "data" and the server reads it from windflow_events. Every
-- payload holds its own event_id, so PostgreSQL never folds two events of
-- one transaction into one notification.
CREATE FUNCTION windflow_emit(event_type text, deployment deployments, event_data json)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    event_id bigint;
    payload  text;
BEGIN
    INSERT INTO windflow_events (type, deployment_id, user_id, organization_id, data)
    VALUES (event_type, deployment.id, deployment.user_id, deployment.organization_id, event_data)
    RETURNING id INTO event_id;

    IF octet_length(event_data::text) < 7500 THEN
        payload := json_build_object(
            'event_id', event_id, 'type', event_type,
            'deployment_id', deployment.id, 'user_id', deployment.user_id,
            'organization_id', deployment.organization_id, 'data', event_data)::text;
    END IF;
    IF payload IS NULL OR octet_length(payload) >= 8000 THEN
        payload := json_build_object(
            'event_id', event_id, 'type', event_type,
            'deployment_id', deployment.id, 'user_id', deployment.user_id,
            'organization_id', deployment.organization_id)::text;
    END IF;
    PERFORM pg_notify('windflow_events', payload);
END
$$;

CREATE FUNCTION windflow_deployment_events() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- The row lock taken by this INSERT or UPDATE is held until commit, so
    -- the event ids of one deployment follow its commit order.
    IF TG_OP = 'INSERT' OR NEW.status IS DISTINCT FROM OLD.status THEN
        PERFORM windflow_emit('DEPLOYMENT_STATUS_CHANGED', NEW, json_build_object(
            'deployment_id', NEW.id,
            'status', NEW.status,
            'old_status', CASE WHEN TG_OP = 'UPDATE' THEN OLD.status END,
            'timestamp', windflow_utc(NEW.updated_at),
            'user_id', NEW.user_id,
            'name', NEW.name,
            'error_message', NEW.error_message));
    END IF;
    IF TG_OP = 'UPDATE' AND (NEW.progress, NEW.current_step, NEW.total_steps)
            IS DISTINCT FROM (OLD.progress, OLD.current_step, OLD.total_steps) THEN
        PERFORM windflow_emit('DEPLOYMENT_PROGRESS', NEW, json_build_object(
            'deployment_id', NEW.id,
            'progress', NEW.progress,
            'current_step', NEW.current_step,
            'total_steps', NEW.total_steps,
            'timestamp', windflow_utc(NEW.updated_at)));
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER deployments_events
    AFTER INSERT OR UPDATE ON deployments
    FOR EACH ROW EXECUTE FUNCTION windflow_deployment_events();

CREATE FUNCTION windflow_deployment_log_events() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    deployment deployments;
BEGIN
    -- Serialize the writers of one deployment before allocating an event id,
    -- so its ids follow commit order. NO KEY UPDATE conflicts with other
    -- writers of this deployment but not with the foreign-key checks of
    -- other log inserts' readers.
    SELECT * INTO deployment FROM deployments WHERE id = NEW.deployment_id FOR NO KEY UPDATE;
    PERFORM windflow_emit('DEPLOYMENT_LOGS_UPDATE', deployment, json_build_object(
        'deployment_id', NEW.deployment_id,
        'logs', NEW.message,
        'timestamp', windflow_utc(NEW.created_at),
        'append', true));
    RETURN NULL;
END
$$;

CREATE TRIGGER deployment_logs_events
    AFTER INSERT ON deployment_logs
    FOR EACH ROW EXECUTE FUNCTION windflow_deployment_log_events();
