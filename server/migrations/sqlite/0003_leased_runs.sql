-- First deliveries handed out by one group claim at one priority level, leased together: one row per
-- claim instead of one `pending` row per event. An entry leaves its run when it is acked or
-- dead-lettered, or moves to `pending` when its lease moves (nack, extension, release, expiry).
-- seqs: the claimed sequences after first_seq as LEB128 deltas; settled: one bit per entry, set once it left.
CREATE TABLE leased_runs (
    tenant     TEXT    NOT NULL,
    grp        TEXT    NOT NULL,
    first_seq  INTEGER NOT NULL,
    priority   INTEGER NOT NULL,
    visible_ns INTEGER NOT NULL,
    seqs       BLOB    NOT NULL,
    settled    BLOB    NOT NULL,
    PRIMARY KEY (tenant, grp, first_seq)
);
