-- Event bodies are written in the store's binary encoding (server/src/store/body.rs) to body_binary.
-- Events committed before keep their JSON in body. A nullable column without a default is added
-- without rewriting the table, so the upgrade takes no time at any size; the check holds for every
-- row written from now on (NOT VALID skips the scan of the old ones, which all have a body).
ALTER TABLE events ALTER COLUMN body DROP NOT NULL;
ALTER TABLE events ADD COLUMN body_binary BYTEA;
ALTER TABLE events ADD CONSTRAINT events_one_body CHECK ((body IS NULL) <> (body_binary IS NULL)) NOT VALID;
