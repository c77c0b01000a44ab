-- Two fixes to the triggers of V2.
--
-- 1. Only rows of the event log are events. Any database login may run
--    `NOTIFY windflow_events, '...'`; the server must not take that for an
--    event (a forged status change) nor let it claim a real event's id (the
--    real one would then be dropped as a duplicate). Each payload is now
--    signed with HMAC-SHA256 under a key that only the owner of these
--    objects (the role that runs the migrations, which the server uses) can
--    read. The payload is `{"sig":"<64 hex>",` followed by the signed JSON
--    object without its opening brace, so `LISTEN windflow_events` in psql
--    still shows plain JSON with `event_id` and `type`. windflow_emit runs
--    as that owner (SECURITY DEFINER): writers need no privilege on the
--    event log or the key.
--
-- 2. Writers of one deployment are serialized without failing REPEATABLE
--    READ or SERIALIZABLE writers. V2's `SELECT ... FOR NO KEY UPDATE` on
--    the deployment made such a writer fail ("could not serialize access
--    due to concurrent update") whenever the row had changed since its
--    snapshot. Now every writer of a deployment also takes a
--    transaction-level advisory lock on it before allocating an event id,
--    and a log insert under REPEATABLE READ or SERIALIZABLE takes only
--    that lock (it cannot check a row lock against a newer row version).
--    Under READ COMMITTED the row lock comes first, as before, so a
--    holder of the advisory lock always holds the row lock too and no new
--    deadlock appears. The ids of one deployment still follow its commit
--    order.

CREATE TABLE windflow_notify_key (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    -- The HMAC key, 32 random bytes (from gen_random_uuid, which draws on
    -- the server's strong random source).
    secret     bytea NOT NULL,
    -- The key padded to SHA-256's 64-byte block and XORed with 0x36 and
    -- 0x5c: HMAC's two pads, computed once here.
    inner_pad  bytea NOT NULL,
    outer_pad  bytea NOT NULL
);
REVOKE ALL ON windflow_notify_key FROM PUBLIC;

DO $$
DECLARE
    secret bytea := decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex');
    block  bytea := secret || decode(repeat('00', 32), 'hex');
    ipad   bytea := block;
    opad   bytea := block;
BEGIN
    FOR i IN 0..63 LOOP
        ipad := set_byte(ipad, i, get_byte(block, i) # 54);
        opad := set_byte(opad, i, get_byte(block, i) # 92);
    END LOOP;
    INSERT INTO windflow_notify_key (secret, inner_pad, outer_pad) VALUES (secret, ipad, opad);
END
$$;

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

-- Serialize the writers of one deployment until they commit: called with
-- the deployment's row lock already held (an UPDATE, or a log insert under
-- READ COMMITTED). The two-key form keeps these locks apart from
-- single-key advisory locks an application may take; the first key
-- ('wfnt') names this use.
CREATE FUNCTION windflow_lock_deployment(deployment_id uuid) RETURNS void
LANGUAGE sql AS $$
    SELECT pg_advisory_xact_lock(2003201652, hashtext(deployment_id::text))
$$;

CREATE OR REPLACE FUNCTION windflow_deployment_events() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE'
            AND NEW.status IS NOT DISTINCT FROM OLD.status
            AND (NEW.progress, NEW.current_step, NEW.total_steps)
                IS NOT DISTINCT FROM (OLD.progress, OLD.current_step, OLD.total_steps) THEN
        RETURN NULL;
    END IF;
    PERFORM windflow_lock_deployment(NEW.id);
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

CREATE OR REPLACE FUNCTION windflow_deployment_log_events() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    deployment deployments;
BEGIN
    IF current_setting('transaction_isolation') = 'read committed' THEN
        SELECT * INTO deployment FROM deployments WHERE id = NEW.deployment_id FOR NO KEY UPDATE;
        PERFORM windflow_lock_deployment(NEW.deployment_id);
    ELSE
        -- The writer's snapshot may hold an older version of the row: read
        -- it as the writer sees it, after waiting for the other writers.
        PERFORM windflow_lock_deployment(NEW.deployment_id);
        SELECT * INTO deployment FROM deployments WHERE id = NEW.deployment_id;
    END IF;
    IF deployment.id IS NULL THEN
        RAISE EXCEPTION 'deployment % is not visible to this transaction''s snapshot', NEW.deployment_id
            USING HINT = 'insert its logs from a transaction that started after the deployment was created';
    END IF;
    PERFORM windflow_emit('DEPLOYMENT_LOGS_UPDATE', deployment, json_build_object(
        'deployment_id', NEW.deployment_id,
        'logs', NEW.message,
        'timestamp', windflow_utc(NEW.created_at),
        'append', true));
    RETURN NULL;
END
$$;
