-- The event log. seq is the rowid: the single writer assigns it in commit order.
CREATE TABLE events (
    seq            INTEGER PRIMARY KEY,
    tenant         TEXT    NOT NULL,
    source         TEXT    NOT NULL,
    id             TEXT    NOT NULL,
    type           TEXT    NOT NULL,
    subject        TEXT,
    correlation_id TEXT,
    priority       INTEGER NOT NULL,
    recorded_ns    INTEGER NOT NULL,
    content_hash   BLOB    NOT NULL,
    body           TEXT    NOT NULL
);
CREATE UNIQUE INDEX events_key ON events (tenant, source, id);
CREATE INDEX events_type ON events (tenant, type, seq);
CREATE INDEX events_correlation ON events (tenant, correlation_id, seq) WHERE correlation_id IS NOT NULL;
CREATE INDEX events_priority ON events (tenant, priority, seq);
CREATE INDEX events_recorded ON events (recorded_ns);

CREATE TABLE event_types (
    tenant           TEXT    NOT NULL,
    type             TEXT    NOT NULL,
    count            INTEGER NOT NULL,
    first_seq        INTEGER NOT NULL,
    last_seq         INTEGER NOT NULL,
    last_recorded_ns INTEGER NOT NULL,
    PRIMARY KEY (tenant, type)
);

CREATE TABLE dead_letters (
    tenant   TEXT    NOT NULL,
    grp      TEXT    NOT NULL,
    seq      INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    reason   TEXT    NOT NULL,
    dead_ns  INTEGER NOT NULL,
    PRIMARY KEY (tenant, grp, seq)
);

-- Durable groups of the embedded stream backend (Redis keeps these in consumer groups).
CREATE TABLE groups (
    tenant       TEXT    NOT NULL,
    name         TEXT    NOT NULL,
    selection    TEXT    NOT NULL,
    max_attempts INTEGER NOT NULL,
    created_ns   INTEGER NOT NULL,
    PRIMARY KEY (tenant, name)
);

-- Per priority level, the last sequence handed to the group.
CREATE TABLE group_cursors (
    tenant   TEXT    NOT NULL,
    grp      TEXT    NOT NULL,
    priority INTEGER NOT NULL,
    cursor   INTEGER NOT NULL,
    PRIMARY KEY (tenant, grp, priority)
);

-- Deliveries handed out and not yet acked or dead-lettered. visible_ns is when it may be delivered again.
CREATE TABLE pending (
    tenant     TEXT    NOT NULL,
    grp        TEXT    NOT NULL,
    seq        INTEGER NOT NULL,
    priority   INTEGER NOT NULL,
    attempts   INTEGER NOT NULL,
    visible_ns INTEGER NOT NULL,
    consumer   TEXT,
    last_error TEXT,
    PRIMARY KEY (tenant, grp, seq)
);
CREATE INDEX pending_due ON pending (tenant, grp, visible_ns);
