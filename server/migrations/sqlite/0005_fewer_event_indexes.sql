-- Every index on events is written by every commit: each of these two cost about two log pages per
-- commit of a dozen events (SQLite rebalances three leaves whenever an index's last one fills).
-- Reads of a type use events_type_priority, one range per priority level (store/sqlite.rs,
-- push_page_read). Times are found by halving the primary key: the one writer records times that
-- never go backwards (store/sqlite.rs, SEQUENCE_BEFORE).
DROP INDEX events_type;
DROP INDEX events_recorded;
