-- Most events have the default priority (normal, stored as 2), and every commit wrote each of them
-- into (tenant, priority, seq) as well: about 1.8 of the ~12 log pages a commit of a dozen events
-- wrote (docs/benchmarks.md, cause 4). The other levels keep their index, which reads name with the
-- same `priority <> 2` term (SQLite uses a partial index only for a query that repeats its condition);
-- a read of the normal level by priority alone walks the primary key from its position instead,
-- where most rows are of that level (store/sqlite.rs, push_page_read and count_after).
DROP INDEX events_priority;
CREATE INDEX events_priority_not_normal ON events (tenant, priority, seq) WHERE priority <> 2;
