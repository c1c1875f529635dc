-- The event log. seq is assigned under the row lock of nerve_sequence, so sequence order is commit order
-- even with many writers: a reader never sees sequence N+1 committed before N.
CREATE TABLE nerve_sequence (
    singleton   BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
    seq         BIGINT  NOT NULL,
    recorded_ns BIGINT  NOT NULL
);
INSERT INTO nerve_sequence (seq, recorded_ns) VALUES (0, 0);

CREATE TABLE events (
    seq            BIGINT   PRIMARY KEY,
    tenant         TEXT     NOT NULL,
    source         TEXT     NOT NULL,
    id             TEXT     NOT NULL,
    type           TEXT     NOT NULL,
    subject        TEXT,
    correlation_id TEXT,
    priority       SMALLINT NOT NULL,
    recorded_ns    BIGINT   NOT NULL,
    content_hash   BYTEA    NOT NULL,
    body           TEXT     NOT NULL
);
CREATE UNIQUE INDEX events_key ON events (tenant, source, id);
CREATE INDEX events_type ON events (tenant, type, seq);
CREATE INDEX events_correlation ON events (tenant, correlation_id, seq) WHERE correlation_id IS NOT NULL;
CREATE INDEX events_priority ON events (tenant, priority, seq);
CREATE INDEX events_recorded ON events (recorded_ns);

CREATE TABLE event_types (
    tenant           TEXT   NOT NULL,
    type             TEXT   NOT NULL,
    count            BIGINT NOT NULL,
    first_seq        BIGINT NOT NULL,
    last_seq         BIGINT NOT NULL,
    last_recorded_ns BIGINT NOT NULL,
    PRIMARY KEY (tenant, type)
);

CREATE TABLE dead_letters (
    tenant   TEXT   NOT NULL,
    grp      TEXT   NOT NULL,
    seq      BIGINT NOT NULL,
    attempts INTEGER NOT NULL,
    reason   TEXT   NOT NULL,
    dead_ns  BIGINT NOT NULL,
    PRIMARY KEY (tenant, grp, seq)
);
