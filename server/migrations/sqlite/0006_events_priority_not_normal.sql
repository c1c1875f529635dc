-- Most events have the default priority (normal, stored as 2), and every commit wrote each of them
-- into (tenant, priority, seq) as well: about 1.8 of the ~12 log pages a commit of a dozen events
-- wrote (docs/benchmarks.md, cause 4). The other levels keep their index, which reads name with the
-- same `priority <> 2` term (SQLite uses a partial index only for a query that repeats its condition).
-- A read of the normal level by priority alone walks the primary key from its position, a bounded
-- span of sequences per page, and its count takes one range of events_type_priority per type
-- (store/sqlite.rs: push_page_read, SqliteStore::read, level_count_sql).
DROP INDEX IF EXISTS events_priority;
CREATE INDEX events_priority_not_normal ON events (tenant, priority, seq) WHERE priority <> 2;
