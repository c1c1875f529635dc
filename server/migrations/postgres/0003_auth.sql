-- Publishers registered through the Admin API: the event types and sources each may publish.
-- Byte-order collation on the key, so listings come out in the same order as on SQLite.
CREATE TABLE publishers (
    tenant      TEXT COLLATE "C" NOT NULL,
    principal   TEXT COLLATE "C" NOT NULL,
    types       TEXT[] NOT NULL,
    sources     TEXT[] NOT NULL,
    description TEXT   NOT NULL,
    updated_ns  BIGINT NOT NULL,
    PRIMARY KEY (tenant, principal)
);

-- Denied calls and admin actions. Appends take a self-exclusive lock on the table, so ids become
-- visible in id order and readers paging by id skip nothing.
CREATE TABLE audit_log (
    id        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    time_ns   BIGINT NOT NULL,
    tenant    TEXT   NOT NULL,
    principal TEXT   NOT NULL,
    action    TEXT   NOT NULL,
    resource  TEXT   NOT NULL,
    outcome   TEXT   NOT NULL,
    reason    TEXT   NOT NULL
);
CREATE INDEX audit_log_tenant ON audit_log (tenant, id);
