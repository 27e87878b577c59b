-- allot's schema. PostgreSQL is the source of truth; the constraints below are the last line
-- of defence for the promises, whatever the code above them does.

-- The catalogue. Stock is the number of units still for sale and can never go below zero.
CREATE TABLE products (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name       TEXT        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    stock      BIGINT      NOT NULL CHECK (stock >= 0),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Every decided purchase request, one row per transaction id (the primary key is what makes a
-- redelivered or duplicated message unable to be decided twice). Pending requests live in
-- Redis and in their partition queue until the worker writes this row.
--
-- A succeeded row carries its order number (order_day, order_seq); a rejected row a reason and
-- no number. product_id has no foreign key on purpose: requests for unknown products are
-- recorded too, as rejected with reason 'unknown_product'.
CREATE TABLE transactions (
    id          UUID        PRIMARY KEY,
    user_id     BIGINT      NOT NULL CHECK (user_id > 0),
    product_id  BIGINT      NOT NULL CHECK (product_id > 0),
    quantity    BIGINT      NOT NULL CHECK (quantity > 0),
    status      TEXT        NOT NULL CHECK (status IN ('succeeded', 'rejected')),
    reason      TEXT,
    order_day   DATE,
    order_seq   BIGINT      CHECK (order_seq > 0),
    partition   INTEGER     NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    decided_at  TIMESTAMPTZ NOT NULL,
    CHECK ((status = 'succeeded') = (order_day IS NOT NULL AND order_seq IS NOT NULL)),
    CHECK ((status = 'rejected') = (reason IS NOT NULL)),
    -- Order numbers are unique within a day.
    UNIQUE (order_day, order_seq)
);

CREATE INDEX transactions_product_id ON transactions (product_id);

-- The last order number handed out per day, across all partitions. A batch with successes
-- increments it by its number of successes in the same database transaction as its orders,
-- so numbers are gapless and belong only to committed successes.
CREATE TABLE order_counters (
    day      DATE   PRIMARY KEY,
    last_seq BIGINT NOT NULL CHECK (last_seq > 0)
);

-- Messages the worker could not even parse (no transaction id to decide), kept for inspection
-- instead of blocking their partition.
CREATE TABLE dead_letters (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    partition   INTEGER     NOT NULL,
    message_id  TEXT,
    body        BYTEA       NOT NULL,
    error       TEXT        NOT NULL,
    received_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
