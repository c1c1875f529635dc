-- Group claims read one priority level of literal types. Through events_type every event of the type
-- was looked up in the table to check its priority, and through events_priority every event of the
-- level to check its type; this index answers the claim's choice of sequences on its own.
CREATE INDEX events_type_priority ON events (tenant, type, priority, seq);
