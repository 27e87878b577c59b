//! allot's integration tests: real RabbitMQ, PostgreSQL and Redis, a real API server on
//! `127.0.0.1:0` and a real worker, in one test binary.
//!
//! Isolation: every test gets a fresh database (`#[sqlx::test]`, which needs `DATABASE_URL`),
//! its own queue prefix and its own Redis key prefix, so tests run in parallel. The broker and
//! Redis come from `ALLOT_TEST_AMQP_URL` and `ALLOT_TEST_REDIS_URL` (defaults match
//! `deploy/local.sh`, which sets all three). Set `TEST_LOG=1` to see the servers' logs.

mod helpers;

mod accounts;
mod api_contract;
mod backlog;
mod bad_input;
mod brokers;
mod buyer_identity;
mod buyer_orders;
mod docs;
mod envelopes;
mod group_commit;
mod history;
mod hold_expiry;
mod holds;
mod idempotency;
mod limits;
mod observability;
mod order_races;
mod orders;
mod outages;
mod pipeline;
mod poison;
mod sale_windows;
mod shards;
mod slots;
mod sold_out;
mod spread;
mod sweep;
mod unconfirmed;
mod waiting;
mod watch;
