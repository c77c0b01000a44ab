-- S4's mix for pgbench (scripts/trigger-floor.sh, scripts/ingest-probe.sh):
-- 1 status change, 2 progress updates and 2 log lines in 5 one-row
-- transactions, on the 64 deployments of pgb_ids.
\set n random(1, 64)
\set p random(0, 100)
\set k random(1, 5)
\if :k = 1
UPDATE deployments SET status = CASE status WHEN 'running' THEN 'deploying' ELSE 'running' END WHERE id = (SELECT id FROM pgb_ids WHERE n = :n);
\elif :k <= 3
UPDATE deployments SET progress = :p, current_step = 'step' WHERE id = (SELECT id FROM pgb_ids WHERE n = :n);
\else
INSERT INTO deployment_logs (deployment_id, message) SELECT id, 'pgbench line' FROM pgb_ids WHERE n = :n;
\endif
