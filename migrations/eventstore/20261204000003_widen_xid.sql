-- A 32-bit transaction id (pg_stat_activity.backend_xid) as the 64-bit id it stands
-- for, given `next`, a 64-bit id it lies within 2^31 of, on either side: the read
-- fence compares running transactions with positions, which carry 64-bit ids.
CREATE FUNCTION orderflow_xid8(next bigint, xid32 xid) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT next + ((xid32::text::bigint - (next & 4294967295) + 6442450944) % 4294967296)
           - 2147483648
$$;
