-- Which priority levels each type has used (bit i = Priority::ALL[i]), so a replica knows which Redis
-- streams exist without scanning events. Existing rows claim every level: safe, merely a few more reads.
ALTER TABLE event_types ADD COLUMN levels SMALLINT NOT NULL DEFAULT 15;

-- Durable groups of the Redis Streams backend. Redis holds the live state (consumer groups, leases);
-- these rows let a Redis that lost its data rebuild them.
CREATE TABLE nerve_groups (
    tenant       TEXT    NOT NULL,
    name         TEXT    NOT NULL,
    selection    TEXT    NOT NULL,
    max_attempts INTEGER NOT NULL,
    -- the group receives events after this sequence
    start_after  BIGINT  NOT NULL,
    created_ns   BIGINT  NOT NULL,
    PRIMARY KEY (tenant, name)
);

-- Per group and stream, a position at or below which every event was acknowledged (or dead-lettered):
-- where the group resumes when Redis lost it.
CREATE TABLE nerve_group_checkpoints (
    tenant   TEXT     NOT NULL,
    grp      TEXT     NOT NULL,
    type     TEXT     NOT NULL,
    priority SMALLINT NOT NULL,
    position BIGINT   NOT NULL,
    PRIMARY KEY (tenant, grp, type, priority)
);
