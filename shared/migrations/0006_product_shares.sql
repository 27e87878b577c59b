-- A hot product spread over several partitions (`shards`, 1 to the number of partitions). A
-- product with `shards = 1` (every product unless staff say otherwise) keeps its stock in
-- `products.stock`, as before. A product with `shards = k > 1` keeps it in k rows of
-- `product_shares`, one per shard (0 to k - 1), and `products.stock` is 0: its stock is the sum
-- of its shares. Each shard's single-product purchases are decided by their own partition from
-- that shard's row alone (the product row is only share-locked), so k partitions decide the
-- product at once; a batch whose share runs short locks every share and decides from their sum
-- (see README "How it works" and docs/guarantees.md, "One hot product over several partitions").
ALTER TABLE products ADD COLUMN shards INTEGER NOT NULL DEFAULT 1 CHECK (shards BETWEEN 1 AND 1024);

CREATE TABLE product_shares (
    product_id BIGINT  NOT NULL REFERENCES products (id),
    shard      INTEGER NOT NULL CHECK (shard >= 0),
    stock      BIGINT  NOT NULL CHECK (stock >= 0),
    PRIMARY KEY (product_id, shard)
);
