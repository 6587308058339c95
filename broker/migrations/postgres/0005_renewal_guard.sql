-- Keyhaven broker schema v5 (PostgreSQL): aborts a one-statement audit append whose renewals
-- did not all apply (a lease ended between the Renew's check and the append). The statement
-- then stores nothing, and the broker appends the batch again in a transaction that records
-- the refusals (see store/renewals.rs).
CREATE FUNCTION keyhaven_renewals_changed() RETURNS bigint LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'a renewed lease ended since its renewal was decided' USING ERRCODE = 'KH001';
END $$;
