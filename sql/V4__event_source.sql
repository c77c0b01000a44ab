-- The event source, chosen per database.
--
-- 'notify' (the default): windflow_emit NOTIFYs each event at commit, and
-- each server LISTENs. Needs nothing from the DBA, but every notifying
-- commit takes PostgreSQL's global NOTIFY lock through its WAL flush, so
-- writers' commits are serialized.
--
-- 'logical': windflow_emit only writes the event log; each server streams
-- the log's inserts over logical replication (the publication
-- windflow_events, inserts only). Needs wal_level = logical and a server
-- role with REPLICATION.
--
-- Switch with `windflow-notify event-source logical` (or `notify`), which
-- checks the database is ready and creates the publication; by hand:
--   CREATE PUBLICATION windflow_events FOR TABLE windflow_events WITH (publish = 'insert');
--   UPDATE windflow_event_source SET source = 'logical';
-- Servers of the other mode notice within seconds and stop so that they
-- are started again in the new one.

CREATE TABLE windflow_event_source (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    source    text NOT NULL DEFAULT 'notify' CHECK (source IN ('notify', 'logical'))
);
INSERT INTO windflow_event_source DEFAULT VALUES;
REVOKE ALL ON windflow_event_source FROM PUBLIC;

-- V3's windflow_emit, with the NOTIFY skipped in logical mode.
CREATE OR REPLACE FUNCTION windflow_emit(event_type text, deployment deployments, event_data json)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path FROM CURRENT
AS $$
DECLARE
    event_id bigint;
    body     text;
    key      windflow_notify_key;
BEGIN
    INSERT INTO windflow_events (type, deployment_id, user_id, organization_id, data)
    VALUES (event_type, deployment.id, deployment.user_id, deployment.organization_id, event_data)
    RETURNING id INTO event_id;

    -- Logical mode: the servers read this insert from the WAL, whole.
    IF (SELECT source FROM windflow_event_source) = 'logical' THEN
        RETURN;
    END IF;

    -- NOTIFY refuses payloads of 8000 bytes or more; the signature takes 74.
    IF octet_length(event_data::text) < 7500 THEN
        body := json_build_object(
            'event_id', event_id, 'type', event_type,
            'deployment_id', deployment.id, 'user_id', deployment.user_id,
            'organization_id', deployment.organization_id, 'data', event_data)::text;
    END IF;
    IF body IS NULL OR octet_length(body) >= 7900 THEN
        body := json_build_object(
            'event_id', event_id, 'type', event_type,
            'deployment_id', deployment.id, 'user_id', deployment.user_id,
            'organization_id', deployment.organization_id)::text;
    END IF;
    SELECT * INTO STRICT key FROM windflow_notify_key;
    PERFORM pg_notify('windflow_events',
        '{"sig":"'
        || encode(sha256(key.outer_pad || sha256(key.inner_pad || convert_to(body, 'UTF8'))), 'hex')
        || '",' || substr(body, 2));
END
$$;
