-- Holds that expire, and capacity counters (delivery slots) (issue 14).

-- A hold is a transaction whose units (and slot place) are taken, without an order number yet:
-- status 'held', until a checkout makes it 'succeeded' (numbered then), or a cancel or its
-- expiry makes it 'rejected' ('cancelled', 'expired') and gives its units back. Decided only by
-- the worker, under the row locks of its products and slot.
--
-- hold_seconds: what the request asked for (also on a hold request that was rejected);
-- expires_at: set when the hold was granted (its decision time + hold_seconds), kept after.
-- slot_id: the capacity counter the transaction takes a place of; reason_slot_id: the slot a
-- rejection names (slot_full, slot_ended, unknown_slot).
ALTER TABLE transactions
    DROP CONSTRAINT transactions_status_check,
    ADD CONSTRAINT transactions_status_check CHECK (status IN ('succeeded', 'rejected', 'held')),
    ADD COLUMN hold_seconds   INTEGER CHECK (hold_seconds > 0),
    ADD COLUMN expires_at     TIMESTAMPTZ,
    ADD COLUMN slot_id        BIGINT CHECK (slot_id > 0),
    ADD COLUMN reason_slot_id BIGINT CHECK (reason_slot_id > 0),
    ADD CONSTRAINT transactions_held_expires CHECK (status <> 'held' OR expires_at IS NOT NULL),
    ADD CONSTRAINT transactions_expiry_of_a_hold CHECK (expires_at IS NULL OR hold_seconds IS NOT NULL);

-- What the expiry sweeper reads: the open holds, soonest expiry first.
CREATE INDEX transactions_held_expiry ON transactions (expires_at) WHERE status = 'held';

-- Units of the product held by open holds: taken out of `stock` (the sellable units), not sold
-- yet. stock + held + units sold == units ever stocked.
ALTER TABLE products ADD COLUMN held BIGINT NOT NULL DEFAULT 0 CHECK (held >= 0);

-- A capacity counter: a delivery slot, or any finite capacity an order takes one place of.
-- taken: places of succeeded orders; held: places of open holds. capacity may be lowered below
-- taken + held (nothing is cancelled; new orders are refused), so it is no CHECK: the worker
-- decides every booking under the slot's row lock, and the trigger below refuses any write
-- that would book past the capacity.
CREATE TABLE slots (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name       TEXT        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    capacity   BIGINT      NOT NULL CHECK (capacity >= 0),
    taken      BIGINT      NOT NULL DEFAULT 0 CHECK (taken >= 0),
    held       BIGINT      NOT NULL DEFAULT 0 CHECK (held >= 0),
    starts_at  TIMESTAMPTZ,
    ends_at    TIMESTAMPTZ,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT slots_window CHECK (starts_at < ends_at)
);

-- The last line of defence for "never book past the capacity": a write that adds places
-- (taken + held grows) must stay within the capacity. Moving a place from held to taken (a
-- checkout) or giving places back is always allowed, whatever the capacity now is.
CREATE FUNCTION slots_never_overbooked() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.taken + NEW.held > OLD.taken + OLD.held AND NEW.taken + NEW.held > NEW.capacity THEN
        RAISE EXCEPTION 'slot % would be booked past its capacity (% of %)',
            NEW.id, NEW.taken + NEW.held, NEW.capacity
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER slots_never_overbooked BEFORE UPDATE ON slots
    FOR EACH ROW EXECUTE FUNCTION slots_never_overbooked();

-- Every checkout and cancel of a hold, one row per command id (the primary key decides each
-- once, as transactions.id does for requests): what it did. A command the API withdrew (its
-- publish was not confirmed, the client was answered 503) is recorded 'withdrawn' first, so a
-- worker that receives it later does nothing with it.
CREATE TABLE hold_commands (
    command_id     UUID        PRIMARY KEY,
    transaction_id UUID        NOT NULL REFERENCES transactions (id),
    kind           TEXT        NOT NULL CHECK (kind IN ('checkout', 'cancel')),
    outcome        TEXT        NOT NULL
                   CHECK (outcome IN ('confirmed', 'cancelled', 'expired', 'not_held', 'withdrawn')),
    created_at     TIMESTAMPTZ NOT NULL,
    decided_at     TIMESTAMPTZ NOT NULL
);

CREATE INDEX hold_commands_transaction_id ON hold_commands (transaction_id);
