-- The reconciler waits only on the audit consumer's own slots: another tool's
-- logical slot in the database (a DBA's, a test's) no longer holds it up or
-- makes it report the stream behind. The function takes the slots to wait on;
-- the one-argument form goes (only the reconciler, an operator's command,
-- calls it).
DROP FUNCTION audit.stream_behind(jsonb);

-- Of the audit consumer's slots (p_slots: each node's, as `rewards audit run`
-- names them), those on any node that have not yet confirmed past that
-- node's mark from audit.stream_barrier: none once the history holds
-- everything committed before the marks. Other logical slots of the database
-- (a DBA's, a test's, another tool's) feed nothing into the history, so
-- whether they keep up says nothing about it: they are not looked at. A slot
-- of the list that does not exist on a node is not waited for either (that
-- node's consumer makes it, and backfills, at its next poll).
CREATE FUNCTION audit.stream_behind(p_marks jsonb, p_slots text[])
RETURNS TABLE (nodeid integer, slot_name text, confirmed_lsn pg_lsn, mark_lsn pg_lsn)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_slots CONSTANT text := format($c$SELECT coalesce(json_agg(json_build_object(
        'slot', slot_name, 'confirmed', confirmed_flush_lsn)), '[]') FROM pg_catalog.pg_replication_slots
        WHERE database = current_database() AND slot_type = 'logical' AND slot_name = ANY (%L::text[])$c$,
        p_slots);
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'citus') THEN
        RETURN QUERY
        SELECT 0, s.slot_name::text, s.confirmed_flush_lsn, (p_marks ->> '0')::pg_lsn
        FROM pg_catalog.pg_replication_slots s
        WHERE s.database = current_database() AND s.slot_type = 'logical' AND s.slot_name = ANY (p_slots)
          AND (s.confirmed_flush_lsn IS NULL OR s.confirmed_flush_lsn < (p_marks ->> '0')::pg_lsn);
        RETURN;
    END IF;
    RETURN QUERY
    WITH nodes AS MATERIALIZED (
        SELECT r.nodeid, r.success, r.result, (p_marks ->> r.nodeid::text)::pg_lsn AS mark
        FROM pg_catalog.run_command_on_all_nodes(v_slots) AS r
        WHERE p_marks ? r.nodeid::text
    )
    SELECT n.nodeid, slot ->> 'slot', (slot ->> 'confirmed')::pg_lsn, n.mark
    FROM nodes n CROSS JOIN LATERAL jsonb_array_elements(CASE WHEN n.success THEN n.result::jsonb ELSE '[]' END) AS slot
    WHERE n.success AND ((slot ->> 'confirmed') IS NULL OR (slot ->> 'confirmed')::pg_lsn < n.mark)
    UNION ALL
    -- a node that does not answer cannot be shown to be caught up
    SELECT n.nodeid, NULL, NULL, n.mark FROM nodes n WHERE NOT n.success;
END;
$$;

ALTER FUNCTION audit.stream_behind(jsonb, text[]) OWNER TO rewards_owner;
REVOKE ALL ON FUNCTION audit.stream_behind(jsonb, text[]) FROM PUBLIC;
COMMENT ON FUNCTION audit.stream_behind(jsonb, text[]) IS
'The audit consumer''s slots (p_slots) not yet past their node''s mark: none once the history holds all committed before it.';
