//! allot's test kit: what every test, scenario and tool of this crate shares, so that each of
//! them is written once.
//!
//! - [`ports`]: the one port map (every port of every copy of allot on this machine);
//! - [`client`]: the typed black-box client of allot's HTTP API, judging every answer strictly;
//! - [`load`]: the load generator (keep-alive connections, closed and open loops);
//! - [`system`]: a private system: services on a state folder and ports of their own
//!   ([`system::Services`]), allot's processes ([`system::Process`], [`system::Allot`]), all
//!   stopped on drop and on every exit path;
//! - [`invariants`]: the promises, checked in PostgreSQL and Redis;
//! - [`broker`]: RabbitMQ used directly (raw publishes, queue depths), as a misbehaving or
//!   retrying publisher would;
//! - [`proxy`]: a TCP proxy a test cuts to take one service away from one allot;
//! - [`metrics`] reads Prometheus text, [`wait`] polls a condition until a deadline.
//!
//! The integration tests (`tests/it`), `functional-test`, `bench`, `chaos-test` and `xtask` (the
//! pipeline behind `deploy/local.sh`) are built on it.

pub mod broker;
pub mod client;
pub mod invariants;
pub mod load;
pub mod metrics;
pub mod ports;
pub mod proxy;
pub mod system;
pub mod wait;
