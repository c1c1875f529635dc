-- Times are found by halving the primary key: the sequence lock's holder never records a time before
-- the last one (store/mod.rs, SEQUENCE_BEFORE_SQL), so this index only cost every commit its update.
DROP INDEX events_recorded;
