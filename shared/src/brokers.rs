//! The RabbitMQ addresses a binary may use, and moving between them.
//!
//! A deployment names one broker (`ALLOT_AMQP_URL`) or the nodes of one RabbitMQ cluster
//! (`ALLOT_AMQP_URLS`, comma-separated). Every connection allot opens (the API's publisher
//! link, the worker's session) goes through a [`Failover`]: it tries the addresses in turn,
//! each within [`CONNECT_TIMEOUT`], and uses the first that answers. When the connection in use
//! dies, the owner calls [`Failover::lost`] and connects again: the next round starts at the
//! address *after* the one that died, so a dead node is tried last, not first. A connection
//! that works is kept; nothing moves back to the first address when it returns (no flapping).
//! A round in which no address answers is an error; the owner waits (a capped backoff) and
//! tries another round, for as long as it runs. Nothing here waits without a bound.
//!
//! Which address is in use is logged at `info` with each connection and exported as
//! `allot_broker_connection{connection,address}` (1 on the address in use, 0 on the others);
//! `allot_broker_reconnects_total{connection}` counts the connections opened after the first.
//! Addresses are shown without their user and password.
//!
//! [`Rotation`] is the pure part (which address to try, in what order), unit-tested below.

use crate::amqp;
use lapin::Connection;
use std::fmt;
use std::time::Duration;

/// How long one address may take to answer (TCP and the AMQP handshake). A node that accepts
/// TCP but never finishes the handshake (stopped, overloaded) costs this much, then the next
/// address is tried.
///
/// lapin starts a thread for a connection before its handshake, and a connection abandoned in
/// the middle of it keeps that thread for as long as the node holds the socket open. So an
/// address that once timed out is *probed* before lapin connects to it again: a plain TCP
/// connection that sends the AMQP protocol header and waits for the first byte of the
/// broker's answer, within this same timeout. A node still hung fails the probe and costs no
/// thread; one that answers is cleared. (Only hung addresses are probed: RabbitMQ logs a probe
/// as a client that closed its connection early.)
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One broker address: the URL lapin connects to, and the same without its credentials, for
/// logs and metric labels.
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerAddress {
    url: String,
    shown: String,
}

impl BrokerAddress {
    /// An address as configured (validated by [`parse_amqp_url`] when it comes from the
    /// configuration).
    pub fn new(url: &str) -> Self {
        let url = url.trim();
        Self {
            url: url.to_owned(),
            shown: without_credentials(url),
        }
    }

    /// The URL to connect to (with its credentials: never log it).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The address without user and password, e.g. `amqp://127.0.0.1:55672/%2f`.
    pub fn shown(&self) -> &str {
        &self.shown
    }
}

/// Shown without credentials, so that a `{:?}` of a configuration never leaks a password.
impl fmt::Debug for BrokerAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

impl fmt::Display for BrokerAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

/// `url` without the `user:password@` part of its authority.
fn without_credentials(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    format!("{scheme}://{host}{path}")
}

/// Checks one AMQP URL of the configuration (`amqp://user:password@host:port/vhost`), as lapin
/// will read it; the error names the address without its credentials.
pub fn parse_amqp_url(value: &str) -> Result<String, String> {
    let value = value.trim();
    if value.is_empty() {
        return Err("an empty RabbitMQ address (a stray comma?)".into());
    }
    value
        .parse::<lapin::uri::AMQPUri>()
        .map_err(|err| format!("{}: {err}", without_credentials(value)))?;
    Ok(value.to_owned())
}

/// The addresses of one broker or cluster, in the order they are tried at start. Never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Brokers {
    addresses: Vec<BrokerAddress>,
}

impl Brokers {
    /// The list `urls`, or `None` if it is empty.
    pub fn new<'a>(urls: impl IntoIterator<Item = &'a str>) -> Option<Self> {
        let addresses: Vec<BrokerAddress> = urls.into_iter().map(BrokerAddress::new).collect();
        (!addresses.is_empty()).then_some(Self { addresses })
    }

    pub fn addresses(&self) -> &[BrokerAddress] {
        &self.addresses
    }

    /// The first address (the only one of a single-broker deployment).
    pub fn first(&self) -> &BrokerAddress {
        &self.addresses[0]
    }
}

impl fmt::Display for Brokers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, address) in self.addresses.iter().enumerate() {
            if index > 0 {
                f.write_str(", ")?;
            }
            f.write_str(address.shown())?;
        }
        Ok(())
    }
}

/// Which address to try next: pure, no I/O. A round tries every address once, starting at
/// `next`; a connection that dies moves `next` past its address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    len: usize,
    next: usize,
    in_use: Option<usize>,
}

impl Rotation {
    /// A rotation over `len` addresses (at least one), starting at the first.
    pub fn new(len: usize) -> Self {
        assert!(len > 0, "a rotation needs an address");
        Self {
            len,
            next: 0,
            in_use: None,
        }
    }

    /// The indexes to try in one round, in order: each address once, from `next` on, wrapping.
    pub fn round(&self) -> impl Iterator<Item = usize> + use<> {
        let (len, next) = (self.len, self.next);
        (0..len).map(move |step| (next + step) % len)
    }

    /// A connection to `index` was opened; the next round (after it dies) starts past it.
    pub fn connected(&mut self, index: usize) {
        self.in_use = Some(index);
        self.next = index;
    }

    /// The connection in use died (or could not be set up): the next round starts at the
    /// address after it, and tries it last. Nothing changes when none was in use (a failed
    /// round starts the next one where it started).
    pub fn lost(&mut self) {
        if let Some(index) = self.in_use.take() {
            self.next = (index + 1) % self.len;
        }
    }

    /// The address in use, if a connection is open.
    pub fn in_use(&self) -> Option<usize> {
        self.in_use
    }
}

/// Connects to whichever address of a [`Brokers`] list answers, and keeps the metrics of which
/// one is in use. One per long-lived connection (the API's link, the worker's session).
#[derive(Debug)]
pub struct Failover {
    brokers: Brokers,
    rotation: Rotation,
    /// The connection's name, as RabbitMQ shows it and as the metrics' `connection` label.
    name: &'static str,
    /// Whether a connection was opened before (the next one is a reconnect).
    connected_before: bool,
    /// Per address: it once did not answer within [`CONNECT_TIMEOUT`]; probe it first.
    hung: Vec<bool>,
}

impl Failover {
    /// A failover over `brokers` for connections named `name` (`allot-api`, `allot-worker`).
    /// Registers its metrics at 0 (the recorder must be installed first to see them).
    pub fn new(brokers: Brokers, name: &'static str) -> Self {
        metrics::counter!("allot_broker_reconnects_total", "connection" => name).increment(0);
        for address in brokers.addresses() {
            set_in_use(name, address, false);
        }
        let rotation = Rotation::new(brokers.addresses().len());
        let hung = vec![false; brokers.addresses().len()];
        Self {
            brokers,
            rotation,
            name,
            connected_before: false,
            hung,
        }
    }

    /// One round: tries each address in turn (each within [`CONNECT_TIMEOUT`]) and returns the
    /// first connection that opens, with the address it uses; an error naming every address
    /// and why it failed if none answered.
    pub async fn connect(&mut self) -> anyhow::Result<(Connection, BrokerAddress)> {
        let mut failures = Vec::new();
        for index in self.rotation.round() {
            let address = self.brokers.addresses()[index].clone();
            if self.hung[index] {
                if let Err(failure) = probe(&address).await {
                    tracing::debug!(connection = self.name, broker = %address, error = %failure, "RabbitMQ address still does not answer");
                    failures.push(format!("{address}: {failure}"));
                    continue;
                }
                self.hung[index] = false;
            }
            let attempt =
                tokio::time::timeout(CONNECT_TIMEOUT, amqp::connect(address.url(), self.name));
            let failure = match attempt.await {
                Ok(Ok(connection)) => {
                    self.rotation.connected(index);
                    for other in self.brokers.addresses() {
                        set_in_use(self.name, other, other == &address);
                    }
                    if self.connected_before {
                        metrics::counter!("allot_broker_reconnects_total", "connection" => self.name)
                            .increment(1);
                    }
                    self.connected_before = true;
                    tracing::info!(connection = self.name, broker = %address, "connected to RabbitMQ");
                    return Ok((connection, address));
                }
                Ok(Err(err)) => format!("{err:#}"),
                Err(_elapsed) => {
                    self.hung[index] = true;
                    format!("no answer within {CONNECT_TIMEOUT:?}")
                }
            };
            tracing::debug!(connection = self.name, broker = %address, error = %failure, "RabbitMQ address did not answer");
            failures.push(format!("{address}: {failure}"));
        }
        anyhow::bail!("no RabbitMQ address answered ({})", failures.join("; "))
    }

    /// The connection in use died, or could not be set up: marks its address unused and moves
    /// the next round past it.
    pub fn lost(&mut self) {
        if let Some(index) = self.rotation.in_use() {
            set_in_use(self.name, &self.brokers.addresses()[index], false);
        }
        self.rotation.lost();
    }

    /// The address in use, if a connection is open.
    pub fn in_use(&self) -> Option<&BrokerAddress> {
        self.rotation
            .in_use()
            .map(|index| &self.brokers.addresses()[index])
    }

    pub fn brokers(&self) -> &Brokers {
        &self.brokers
    }
}

/// Whether `address` answers the AMQP protocol header within [`CONNECT_TIMEOUT`] (see there).
async fn probe(address: &BrokerAddress) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let uri: lapin::uri::AMQPUri = address.url().parse()?;
    let answer = async {
        let mut socket =
            tokio::net::TcpStream::connect((uri.authority.host.as_str(), uri.authority.port))
                .await?;
        socket.write_all(b"AMQP\x00\x00\x09\x01").await?;
        let mut first = [0u8; 1];
        socket.read_exact(&mut first).await?;
        std::io::Result::Ok(())
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, answer).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => Err(err.to_string()),
        Err(_elapsed) => Err(format!("no answer within {CONNECT_TIMEOUT:?}")),
    }
}

fn set_in_use(name: &'static str, address: &BrokerAddress, in_use: bool) {
    metrics::gauge!("allot_broker_connection", "address" => address.shown().to_owned(), "connection" => name)
        .set(if in_use { 1.0 } else { 0.0 });
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_first_round_tries_the_addresses_in_the_order_listed() {
        let rotation = Rotation::new(3);
        assert_eq!(rotation.round().collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(rotation.in_use(), None);
    }

    #[test]
    fn a_lost_connection_moves_the_next_round_past_its_address() {
        let mut rotation = Rotation::new(3);
        rotation.connected(1); // the first did not answer
        assert_eq!(rotation.in_use(), Some(1));
        rotation.lost();
        assert_eq!(rotation.in_use(), None);
        assert_eq!(rotation.round().collect::<Vec<_>>(), vec![2, 0, 1]);
        rotation.connected(2);
        rotation.lost();
        assert_eq!(
            rotation.round().collect::<Vec<_>>(),
            vec![0, 1, 2],
            "wraps around"
        );
    }

    #[test]
    fn a_failed_round_starts_the_next_one_where_it_started() {
        let mut rotation = Rotation::new(2);
        rotation.connected(1);
        rotation.lost();
        rotation.lost(); // nothing was in use: the round did not change
        assert_eq!(rotation.round().collect::<Vec<_>>(), vec![0, 1]);
    }

    #[test]
    fn one_address_is_always_the_one_tried() {
        let mut rotation = Rotation::new(1);
        rotation.connected(0);
        rotation.lost();
        assert_eq!(rotation.round().collect::<Vec<_>>(), vec![0]);
    }

    proptest! {
        /// Whatever happened before, a round tries every address exactly once, and after a
        /// loss the address that died comes last.
        #[test]
        fn every_round_tries_each_address_once_and_the_dead_one_last(
            len in 1usize..8,
            events in proptest::collection::vec((any::<bool>(), any::<usize>()), 0..30),
        ) {
            let mut rotation = Rotation::new(len);
            for (connect, index) in events {
                if connect {
                    let index = rotation.round().nth(index % len).unwrap();
                    rotation.connected(index);
                } else {
                    let died = rotation.in_use();
                    rotation.lost();
                    if let Some(died) = died {
                        prop_assert_eq!(rotation.round().last(), Some(died));
                    }
                }
                let mut round: Vec<usize> = rotation.round().collect();
                round.sort_unstable();
                prop_assert_eq!(round, (0..len).collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn addresses_are_shown_without_credentials() {
        let cases = [
            (
                "amqp://guest:secret@127.0.0.1:55672/%2f",
                "amqp://127.0.0.1:55672/%2f",
            ),
            ("amqp://u@node-2:5672/allot", "amqp://node-2:5672/allot"),
            ("amqp://node-3", "amqp://node-3"),
            ("amqp://a:b@h:1?heartbeat=10", "amqp://h:1?heartbeat=10"),
            ("amqp://a:p@ss@h:1/v", "amqp://h:1/v"),
        ];
        for (url, shown) in cases {
            let address = BrokerAddress::new(url);
            assert_eq!(address.shown(), shown, "{url}");
            assert_eq!(format!("{address:?}"), shown);
            assert_eq!(address.url(), url);
        }
    }

    #[test]
    fn configured_addresses_are_checked_and_errors_hide_the_password() {
        assert_eq!(
            parse_amqp_url(" amqp://guest:guest@127.0.0.1:55672/%2f ").unwrap(),
            "amqp://guest:guest@127.0.0.1:55672/%2f"
        );
        assert!(parse_amqp_url("").is_err());
        assert!(parse_amqp_url("  ").is_err());
        let err = parse_amqp_url("http://guest:secret@127.0.0.1:55672/").unwrap_err();
        assert!(!err.contains("secret"), "{err}");
        assert!(parse_amqp_url("not a url").is_err());
    }

    #[test]
    fn a_list_is_never_empty_and_shows_without_credentials() {
        assert!(Brokers::new([]).is_none());
        let brokers = Brokers::new(["amqp://a:b@n1:1/v", "amqp://a:b@n2:2/v"]).unwrap();
        assert_eq!(brokers.to_string(), "amqp://n1:1/v, amqp://n2:2/v");
        assert_eq!(brokers.first().shown(), "amqp://n1:1/v");
    }
}
