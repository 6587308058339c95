-- Keyhaven broker schema v6 (PostgreSQL): the renewal of a batch of leases as a function, so
-- the broker's prepared statements can renew without being planned per batch (see
-- store/renewals.rs). The function's own settings pin its plan: each lease is found by its
-- primary key whatever the table's size or statistics (a cached generic plan made while the
-- table was small would otherwise scan it), and the plan is made once per connection.
-- The predicates on ended_ms and expires_ms are written so that no other index matches them.
CREATE FUNCTION keyhaven_renew(ids text[], nows bigint[], expiries bigint[])
RETURNS TABLE (lease_id text, lease_expires_ms bigint, lease_max_expires_ms bigint,
               lease_version bigint, latest_version bigint)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off
SET enable_bitmapscan = off SET enable_material = off
SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
    -- Only active leases, never past their max.
    RETURN QUERY
    UPDATE leases rl SET expires_ms = LEAST(r.expires_ms, rl.max_expires_ms),
        renewals = rl.renewals + 1
    FROM unnest(ids, nows, expiries) AS r(id, now_ms, expires_ms)
    WHERE rl.id = r.id AND COALESCE(rl.ended_ms, -1) = -1 AND rl.expires_ms - r.now_ms > 0
    RETURNING rl.id, rl.expires_ms, rl.max_expires_ms, rl.version,
        (SELECT max(v.version) FROM secret_versions v WHERE v.path = rl.path
         AND v.deleted_ms IS NULL AND v.destroyed_ms IS NULL);
END $$;
