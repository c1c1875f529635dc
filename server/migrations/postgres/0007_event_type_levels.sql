-- The sequence of the first event of each priority level a type has used, so that a Redis relay
-- checking a stream it has not added to (PostgresStore::stream_ends) skips a level whose first event
-- comes after the position it asks about, instead of walking back through every event of the type to
-- find none. The commit that first sets a level's bit in event_types.levels writes its row. A level
-- whose bit is set without a row (first used before this table, or by a replica that predates it) is
-- not known, and is walked as before. A table of its own, not columns of event_types: statements
-- older replicas have prepared (`SELECT * FROM event_types`) would fail on a changed row type.
CREATE TABLE event_type_levels (
    tenant    TEXT     NOT NULL,
    type      TEXT     NOT NULL,
    level     SMALLINT NOT NULL,
    first_seq BIGINT   NOT NULL,
    PRIMARY KEY (tenant, type, level)
);
