-- Orders of several products, per-buyer limits, sale windows and pauses (issue 13).

-- A transaction of one line (every addToCart, an order of one item) keeps it in product_id and
-- quantity, so the single-product path writes exactly what it wrote before. An order of several
-- lines has both NULL, and its lines in transaction_items.
--
-- reason_product_id: the product a rejection names, on orders of several lines only (the first
-- line that could not be served); a one-line transaction's product is its product_id.
ALTER TABLE transactions
    ALTER COLUMN product_id DROP NOT NULL,
    ALTER COLUMN quantity DROP NOT NULL,
    ADD COLUMN reason_product_id BIGINT CHECK (reason_product_id > 0),
    ADD CONSTRAINT transactions_one_line_or_items CHECK ((product_id IS NULL) = (quantity IS NULL));

-- The lines of an order of several products, in the order the buyer listed them (position 0
-- first). Each product at most once per order. Written only for orders of several lines.
CREATE TABLE transaction_items (
    transaction_id UUID     NOT NULL REFERENCES transactions (id),
    position       SMALLINT NOT NULL CHECK (position >= 0),
    product_id     BIGINT   NOT NULL CHECK (product_id > 0),
    quantity       BIGINT   NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (transaction_id, position),
    UNIQUE (transaction_id, product_id)
);

CREATE INDEX transaction_items_product_id ON transaction_items (product_id);

-- Every transaction's lines, whichever way they are stored: one row per line.
CREATE VIEW transaction_lines AS
    SELECT id AS transaction_id, 0::smallint AS position, product_id, quantity
    FROM transactions WHERE product_id IS NOT NULL
    UNION ALL
    SELECT transaction_id, position, product_id, quantity FROM transaction_items;

-- Per-buyer limits and sale windows. A request is judged at the time the API accepted it
-- (transactions.created_at): on sale iff sale_starts_at <= created_at < sale_ends_at (a missing
-- bound is no bound) and the product was not paused then. paused_at: paused since (NULL: not
-- paused); last_resumed_at: the end of the latest closed pause, so that a batch reads
-- product_pauses only for requests accepted before it.
ALTER TABLE products
    ADD COLUMN max_per_buyer   BIGINT CHECK (max_per_buyer > 0),
    ADD COLUMN sale_starts_at  TIMESTAMPTZ,
    ADD COLUMN sale_ends_at    TIMESTAMPTZ,
    ADD COLUMN paused_at       TIMESTAMPTZ,
    ADD COLUMN last_resumed_at TIMESTAMPTZ,
    ADD CONSTRAINT products_sale_window CHECK (sale_starts_at < sale_ends_at);

-- Closed pauses, [paused_at, resumed_at): a request accepted inside one is rejected 'paused'
-- even when it is decided after the resume.
CREATE TABLE product_pauses (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    product_id BIGINT      NOT NULL REFERENCES products (id),
    paused_at  TIMESTAMPTZ NOT NULL,
    resumed_at TIMESTAMPTZ NOT NULL,
    CHECK (paused_at < resumed_at)
);

CREATE INDEX product_pauses_product_id ON product_pauses (product_id, resumed_at);

-- Units each buyer has succeeded with, for the products that have a max_per_buyer. Read and
-- written only in the transaction that decides, under the product's row lock (or, when staff set
-- or clear a limit, under the same lock), so a limit holds exactly under any concurrency.
CREATE TABLE buyer_units (
    product_id BIGINT NOT NULL REFERENCES products (id),
    user_id    BIGINT NOT NULL CHECK (user_id > 0),
    units      BIGINT NOT NULL CHECK (units > 0),
    PRIMARY KEY (product_id, user_id)
);
