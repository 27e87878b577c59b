-- Buyer accounts, their login sessions, and the index a buyer's order history reads.

-- A buyer's account. Account ids start at 10^15, above every id an anonymous buyer may name
-- in a request body (1 to 10^15 - 1), so the two kinds of buyer can never be mistaken for each
-- other: an anonymous request cannot buy as an account, or read an account's transactions.
-- (10^15 is below 2^53, so every id stays exact in a browser's JavaScript numbers.)
--
-- The username is stored folded to lower case, and is unique in that form. The password is
-- only ever stored as an Argon2id PHC string (`$argon2id$v=19$m=...,t=...,p=...$salt$hash`),
-- which carries its own salt and parameters.
CREATE TABLE users (
    id            BIGINT GENERATED ALWAYS AS IDENTITY (START WITH 1000000000000000) PRIMARY KEY
                  CHECK (id >= 1000000000000000),
    username      TEXT        NOT NULL UNIQUE CHECK (username ~ '^[a-z0-9][a-z0-9._-]{2,31}$'),
    password_hash TEXT        NOT NULL CHECK (password_hash LIKE '$argon2id$%'),
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One row per login. The token itself is never stored: it is signed (HMAC-SHA256) and names
-- its session, so verifying it needs no lookup. The row exists so that a logout can revoke the
-- session (revoked_at), and every API instance learns of revocations from here.
CREATE TABLE sessions (
    id         UUID        PRIMARY KEY,
    user_id    BIGINT      NOT NULL REFERENCES users (id),
    created_at TIMESTAMPTZ NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL,
    revoked_at TIMESTAMPTZ,
    CHECK (expires_at > created_at)
);

-- What the API instances poll: the sessions revoked since they last looked.
CREATE INDEX sessions_revoked_at ON sessions (revoked_at) WHERE revoked_at IS NOT NULL;

-- A buyer's history, newest first: transaction ids are UUIDv7, ordered by acceptance time.
CREATE INDEX transactions_user_id_id ON transactions (user_id, id DESC);
