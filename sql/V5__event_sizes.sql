-- The size of each event's data, kept beside it, so that a replay can cut
-- its pages at a number of bytes without reading the data: computing
-- octet_length(data::text) at query time reads (detoasts) every large
-- event of the page's candidates, even those the page then leaves out.
-- Computed once, when the event is written (the value is in memory then).
-- On an existing log this rewrites windflow_events once.
ALTER TABLE windflow_events
    ADD COLUMN size integer GENERATED ALWAYS AS (octet_length(data::text)) STORED;
