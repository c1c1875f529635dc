-- ListEventTypes pages through a tenant's types in byte order (as on SQLite, and as the server compares
-- page tokens): `type COLLATE "C" > $2 ORDER BY type COLLATE "C"`. The primary key, in the database's
-- collation, could not serve that: each page read and sorted every type of the tenant. An index, not
-- a new collation for the column: that would change the result type of statements older replicas
-- have prepared, which then fail until their connections are replaced.
CREATE INDEX event_types_by_name ON event_types (tenant, (type COLLATE "C"));
