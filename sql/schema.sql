-- Today's schema of windflow-notify's tables, functions and triggers, as a
-- database migrated with sql/V*.sql has it (pg_dump --schema-only). Generated:
-- do not edit. Change the schema with a new migration, then run
-- scripts/schema.sh; tests/schema.rs fails when this file and the migrations
-- disagree.
--
-- PostgreSQL database dump
--



SET statement_timeout = 0;
SET lock_timeout = 0;
SET idle_in_transaction_session_timeout = 0;
SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;
SELECT pg_catalog.set_config('search_path', '', false);
SET check_function_bodies = false;
SET xmloption = content;
SET client_min_messages = warning;
SET row_security = off;

--
-- Name: windflow_deployment_events(); Type: FUNCTION; Schema: public; Owner: -
--

CREATE FUNCTION public.windflow_deployment_events() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'public', 'pg_temp'
    AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.status IS DISTINCT FROM OLD.status THEN
        PERFORM windflow_record('DEPLOYMENT_STATUS_CHANGED', NEW.id, NEW.user_id, NEW.organization_id,
            json_build_object(
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
        PERFORM windflow_record('DEPLOYMENT_PROGRESS', NEW.id, NEW.user_id, NEW.organization_id,
            json_build_object(
                'deployment_id', NEW.id,
                'progress', NEW.progress,
                'current_step', NEW.current_step,
                'total_steps', NEW.total_steps,
                'timestamp', windflow_utc(NEW.updated_at)));
    END IF;
    RETURN NULL;
END
$$;


--
-- Name: windflow_deployment_log_events(); Type: FUNCTION; Schema: public; Owner: -
--

CREATE FUNCTION public.windflow_deployment_log_events() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'public', 'pg_temp'
    AS $$
DECLARE
    owner        uuid;
    organization uuid;
BEGIN
    -- The deployment as this transaction sees it.
    SELECT d.user_id, d.organization_id INTO owner, organization FROM deployments d WHERE d.id = NEW.deployment_id;
    IF NOT FOUND THEN
        -- Deleted later in this same transaction (the cascade took the line too):
        -- nothing to tell anyone.
        IF NOT EXISTS (SELECT FROM deployment_logs l WHERE l.id = NEW.id) THEN
            RETURN NULL;
        END IF;
        RAISE EXCEPTION 'deployment % is not visible to this transaction''s snapshot', NEW.deployment_id
            USING HINT = 'insert its logs from a transaction that started after the deployment was created';
    END IF;
    PERFORM windflow_record('DEPLOYMENT_LOGS_UPDATE', NEW.deployment_id, owner, organization,
        json_build_object(
            'deployment_id', NEW.deployment_id,
            'logs', NEW.message,
            'timestamp', windflow_utc(NEW.created_at),
            'append', true));
    RETURN NULL;
END
$$;


--
-- Name: windflow_events_truncated(); Type: FUNCTION; Schema: public; Owner: -
--

CREATE FUNCTION public.windflow_events_truncated() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'public', 'pg_temp'
    AS $$
BEGIN
    UPDATE windflow_events_pruned
       SET upto = greatest(upto, (SELECT last_value FROM windflow_event_ids));
    RETURN NULL;
END
$$;


--
-- Name: windflow_record(text, uuid, uuid, uuid, json); Type: FUNCTION; Schema: public; Owner: -
--

CREATE FUNCTION public.windflow_record(event_type text, deployment_id uuid, user_id uuid, organization_id uuid, event_data json) RETURNS void
    LANGUAGE plpgsql
    AS $$
DECLARE
    event_id bigint;
    payload  text;
BEGIN
    INSERT INTO windflow_events (type, deployment_id, user_id, organization_id, data)
    VALUES (event_type, deployment_id, user_id, organization_id, event_data)
    RETURNING id INTO event_id;
    -- Another transaction committing events now will wake the servers.
    PERFORM FROM windflow_wakeup FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    -- Whole when it fits NOTIFY's 8000 bytes (psql's LISTEN shows it); the
    -- server reads every event from the log anyway.
    IF octet_length(event_data::text) < 7500 THEN
        payload := json_build_object(
            'event_id', event_id, 'type', event_type, 'deployment_id', deployment_id,
            'user_id', user_id, 'organization_id', organization_id, 'data', event_data)::text;
    END IF;
    IF payload IS NULL OR octet_length(payload) >= 8000 THEN
        payload := json_build_object(
            'event_id', event_id, 'type', event_type, 'deployment_id', deployment_id,
            'user_id', user_id, 'organization_id', organization_id)::text;
    END IF;
    PERFORM pg_notify('windflow_events', payload);
END
$$;


--
-- Name: windflow_touch_updated_at(); Type: FUNCTION; Schema: public; Owner: -
--

CREATE FUNCTION public.windflow_touch_updated_at() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    NEW.updated_at := pg_catalog.now();
    RETURN NEW;
END
$$;


--
-- Name: windflow_utc(timestamp with time zone); Type: FUNCTION; Schema: public; Owner: -
--

CREATE FUNCTION public.windflow_utc(ts timestamp with time zone) RETURNS text
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$
    SELECT to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
$$;


SET default_tablespace = '';

SET default_table_access_method = heap;

--
-- Name: deployment_logs; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.deployment_logs (
    id bigint NOT NULL,
    deployment_id uuid NOT NULL,
    message text NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL
);


--
-- Name: deployment_logs_id_seq; Type: SEQUENCE; Schema: public; Owner: -
--

ALTER TABLE public.deployment_logs ALTER COLUMN id ADD GENERATED BY DEFAULT AS IDENTITY (
    SEQUENCE NAME public.deployment_logs_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);


--
-- Name: deployments; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.deployments (
    id uuid DEFAULT gen_random_uuid() NOT NULL,
    user_id uuid NOT NULL,
    organization_id uuid,
    name text NOT NULL,
    status text DEFAULT 'pending'::text NOT NULL,
    error_message text,
    progress integer DEFAULT 0 NOT NULL,
    current_step text,
    total_steps integer,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT deployments_progress_check CHECK (((progress >= 0) AND (progress <= 100))),
    CONSTRAINT deployments_status_check CHECK ((status = ANY (ARRAY['pending'::text, 'deploying'::text, 'running'::text, 'failed'::text, 'stopped'::text, 'rolling_back'::text])))
);


--
-- Name: windflow_event_ids; Type: SEQUENCE; Schema: public; Owner: -
--

CREATE SEQUENCE public.windflow_event_ids
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;


--
-- Name: windflow_events; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.windflow_events (
    id bigint DEFAULT nextval('public.windflow_event_ids'::regclass) NOT NULL,
    type text NOT NULL,
    deployment_id uuid NOT NULL,
    user_id uuid NOT NULL,
    organization_id uuid,
    data json NOT NULL,
    created_at timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
    size integer GENERATED ALWAYS AS (octet_length((data)::text)) STORED
);


--
-- Name: windflow_events_pruned; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.windflow_events_pruned (
    singleton boolean DEFAULT true NOT NULL,
    upto bigint DEFAULT 0 NOT NULL,
    CONSTRAINT windflow_events_pruned_singleton_check CHECK (singleton)
);


--
-- Name: windflow_wakeup; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.windflow_wakeup (
    singleton boolean DEFAULT true NOT NULL,
    CONSTRAINT windflow_wakeup_singleton_check CHECK (singleton)
);


--
-- Name: deployment_logs deployment_logs_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.deployment_logs
    ADD CONSTRAINT deployment_logs_pkey PRIMARY KEY (id);


--
-- Name: deployments deployments_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.deployments
    ADD CONSTRAINT deployments_pkey PRIMARY KEY (id);


--
-- Name: windflow_events windflow_events_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.windflow_events
    ADD CONSTRAINT windflow_events_pkey PRIMARY KEY (id);


--
-- Name: windflow_events_pruned windflow_events_pruned_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.windflow_events_pruned
    ADD CONSTRAINT windflow_events_pruned_pkey PRIMARY KEY (singleton);


--
-- Name: windflow_wakeup windflow_wakeup_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.windflow_wakeup
    ADD CONSTRAINT windflow_wakeup_pkey PRIMARY KEY (singleton);


--
-- Name: deployment_logs_deployment_id_idx; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX deployment_logs_deployment_id_idx ON public.deployment_logs USING btree (deployment_id, id);


--
-- Name: deployments_organization_id_idx; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX deployments_organization_id_idx ON public.deployments USING btree (organization_id);


--
-- Name: deployments_user_id_idx; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX deployments_user_id_idx ON public.deployments USING btree (user_id);


--
-- Name: windflow_events_deployment_id_idx; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX windflow_events_deployment_id_idx ON public.windflow_events USING btree (deployment_id, id);


--
-- Name: windflow_events_organization_id_idx; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX windflow_events_organization_id_idx ON public.windflow_events USING btree (organization_id, id) WHERE (organization_id IS NOT NULL);


--
-- Name: windflow_events_user_id_idx; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX windflow_events_user_id_idx ON public.windflow_events USING btree (user_id, id);


--
-- Name: deployment_logs deployment_logs_events; Type: TRIGGER; Schema: public; Owner: -
--

CREATE CONSTRAINT TRIGGER deployment_logs_events AFTER INSERT ON public.deployment_logs DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION public.windflow_deployment_log_events();


--
-- Name: deployments deployments_changed_events; Type: TRIGGER; Schema: public; Owner: -
--

CREATE CONSTRAINT TRIGGER deployments_changed_events AFTER UPDATE ON public.deployments DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (((new.status IS DISTINCT FROM old.status) OR (((new.progress IS DISTINCT FROM old.progress) OR (new.current_step IS DISTINCT FROM old.current_step)) OR (new.total_steps IS DISTINCT FROM old.total_steps)))) EXECUTE FUNCTION public.windflow_deployment_events();


--
-- Name: deployments deployments_created_events; Type: TRIGGER; Schema: public; Owner: -
--

CREATE CONSTRAINT TRIGGER deployments_created_events AFTER INSERT ON public.deployments DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION public.windflow_deployment_events();


--
-- Name: deployments deployments_touch_updated_at; Type: TRIGGER; Schema: public; Owner: -
--

CREATE TRIGGER deployments_touch_updated_at BEFORE UPDATE ON public.deployments FOR EACH ROW EXECUTE FUNCTION public.windflow_touch_updated_at();


--
-- Name: windflow_events windflow_events_truncated; Type: TRIGGER; Schema: public; Owner: -
--

CREATE TRIGGER windflow_events_truncated AFTER TRUNCATE ON public.windflow_events FOR EACH STATEMENT EXECUTE FUNCTION public.windflow_events_truncated();


--
-- Name: deployment_logs deployment_logs_deployment_id_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.deployment_logs
    ADD CONSTRAINT deployment_logs_deployment_id_fkey FOREIGN KEY (deployment_id) REFERENCES public.deployments(id) ON DELETE CASCADE;


--
-- Name: FUNCTION windflow_record(event_type text, deployment_id uuid, user_id uuid, organization_id uuid, event_data json); Type: ACL; Schema: public; Owner: -
--

REVOKE ALL ON FUNCTION public.windflow_record(event_type text, deployment_id uuid, user_id uuid, organization_id uuid, event_data json) FROM PUBLIC;


--
-- PostgreSQL database dump complete
--
