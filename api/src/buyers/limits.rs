//! The login rate limit: per username and per client address, each a GCRA bucket (governor)
//! that holds `N` attempts and refills one every minute / `N`. An attempt over either answers
//! `429 rate_limited` with `Retry-After`, before any password is hashed.
//!
//! Every well-formed login counts, successful or not, against both; a sign-up counts against
//! its address (each costs a password hash). A body that is refused as malformed never reaches
//! the limiter: it guesses nothing and costs nothing.
//!
//! The client address is the TCP peer's. An IPv6 client is counted by its /64 prefix (one host
//! usually holds the whole /64, so counting single addresses would give it 2^64 budgets). Behind
//! a reverse proxy every client has the proxy's address: raise the per-address budget there.
//! The buckets live in each API instance's memory: with several instances, a client that
//! reaches all of them gets each one's budget.

use super::credentials::Username;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;

/// The login budgets of one API instance.
pub struct LoginLimits {
    per_username: DefaultKeyedRateLimiter<String>,
    per_address: DefaultKeyedRateLimiter<IpAddr>,
    clock: DefaultClock,
}

impl LoginLimits {
    /// `per_username` and `per_address` attempts a minute, each a burst of that size.
    pub fn new(per_username: NonZeroU32, per_address: NonZeroU32) -> Self {
        Self {
            per_username: RateLimiter::keyed(Quota::per_minute(per_username)),
            per_address: RateLimiter::keyed(Quota::per_minute(per_address)),
            clock: DefaultClock::default(),
        }
    }

    /// Takes one attempt from `address`'s budget, or says how long until there is one.
    pub fn check_address(&self, address: IpAddr) -> Result<(), Duration> {
        self.per_address
            .check_key(&address_key(address))
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Takes one attempt from `username`'s budget, or says how long until there is one.
    pub fn check_username(&self, username: &Username) -> Result<(), Duration> {
        self.per_username
            .check_key(&username.as_str().to_owned())
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Forgets buckets that are full again (they would allow the whole burst anyway), every
    /// `every`, so that the maps do not grow with every name and address ever seen.
    pub fn spawn_cleaner(self: Arc<Self>, every: Duration) -> JoinHandle<()> {
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            loop {
                ticks.tick().await;
                self.per_username.retain_recent();
                self.per_username.shrink_to_fit();
                self.per_address.retain_recent();
                self.per_address.shrink_to_fit();
            }
        })
    }
}

/// The key an address is counted under: IPv4 as it is (also when mapped into IPv6), IPv6 by
/// its /64 prefix.
pub fn address_key(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(prefix))
            }
        },
    }
}

/// `Retry-After` in whole seconds, rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u32 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    u32::try_from(secs.max(1)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(value: u32) -> NonZeroU32 {
        NonZeroU32::new(value).unwrap()
    }

    #[test]
    fn each_budget_holds_its_burst_then_refuses_with_a_wait() {
        let limits = LoginLimits::new(n(3), n(5));
        let alice = Username::parse("alice").unwrap();
        let bob = Username::parse("bob").unwrap();
        for _ in 0..3 {
            assert_eq!(limits.check_username(&alice), Ok(()));
        }
        let wait = limits.check_username(&alice).unwrap_err();
        assert!(
            wait > Duration::from_secs(15) && wait <= Duration::from_secs(20),
            "{wait:?}"
        );
        assert_eq!(
            limits.check_username(&bob),
            Ok(()),
            "another username has its own"
        );

        let here: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..5 {
            assert_eq!(limits.check_address(here), Ok(()));
        }
        assert!(limits.check_address(here).is_err());
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert!(
            limits.check_address(mapped).is_err(),
            "the same IPv4 client"
        );
        assert_eq!(limits.check_address("192.0.2.2".parse().unwrap()), Ok(()));
    }

    #[test]
    fn an_ipv6_client_is_counted_by_its_64_bit_prefix() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(address_key(a), address_key(b));
        assert_ne!(address_key(a), address_key(c));
        assert_eq!(address_key(a), "2001:db8:1:2::".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(6000)), 6);
        assert_eq!(retry_after_secs(Duration::from_millis(6001)), 7);
    }
}
