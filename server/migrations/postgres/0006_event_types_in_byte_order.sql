-- ListEventTypes pages through a tenant's types in byte order (as on SQLite, and as the server compares
-- page tokens). With the database's collation, the primary key could not serve `type > $2 ORDER BY
-- type COLLATE "C"`: each page read and sorted every type of the tenant. Equality is unchanged (it is
-- byte equality either way), so no key can collide.
ALTER TABLE event_types ALTER COLUMN type SET DATA TYPE TEXT COLLATE "C";
