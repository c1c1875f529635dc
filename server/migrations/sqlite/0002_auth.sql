-- Publishers registered through the Admin API: the event types and sources each may publish.
-- types and sources are JSON arrays of pattern strings.
CREATE TABLE publishers (
    tenant      TEXT    NOT NULL,
    principal   TEXT    NOT NULL,
    types       TEXT    NOT NULL,
    sources     TEXT    NOT NULL,
    description TEXT    NOT NULL,
    updated_ns  INTEGER NOT NULL,
    PRIMARY KEY (tenant, principal)
);

-- Denied calls and admin actions. AUTOINCREMENT: an id is never handed out twice, so readers can page
-- by id. The single writer assigns ids in commit order.
CREATE TABLE audit_log (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    time_ns   INTEGER NOT NULL,
    tenant    TEXT    NOT NULL,
    principal TEXT    NOT NULL,
    action    TEXT    NOT NULL,
    resource  TEXT    NOT NULL,
    outcome   TEXT    NOT NULL,
    reason    TEXT    NOT NULL
);
CREATE INDEX audit_log_tenant ON audit_log (tenant, id);
