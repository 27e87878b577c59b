//! Configuration both binaries share. Every setting comes from an `ALLOT_*` environment variable
//! (or the matching command-line flag) and has a default that works with the services
//! `deploy/local.sh` starts.
//!
//! Pointing two deployments at different databases, vhosts and Redis databases (or prefixes)
//! gives two fully separate systems.

use crate::brokers::Brokers;
use clap::Args;

/// The broker address when none is configured: the node `deploy/local.sh` starts.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:55672/%2f";

/// Where the services are and how the partitions are laid out.
#[derive(Debug, Clone, Args)]
pub struct CommonConfig {
    /// PostgreSQL, the source of truth for products, orders and outcomes.
    #[arg(
        long,
        env = "ALLOT_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:55432/allot"
    )]
    pub database_url: String,

    /// RabbitMQ; the vhost in the URL scopes all of allot's queues. Ignored when
    /// `ALLOT_AMQP_URLS` is set.
    #[arg(
        long,
        env = "ALLOT_AMQP_URL",
        default_value = DEFAULT_AMQP_URL,
        value_parser = crate::brokers::parse_amqp_url
    )]
    pub amqp_url: String,

    /// The nodes of one RabbitMQ cluster, comma-separated (`amqp://…@node1:5672/%2f,amqp://…@node2:5672/%2f`):
    /// connections use the first that answers and move on to the next when theirs dies. When
    /// set, it replaces `ALLOT_AMQP_URL`.
    #[arg(
        long,
        env = "ALLOT_AMQP_URLS",
        value_delimiter = ',',
        value_parser = crate::brokers::parse_amqp_url
    )]
    pub amqp_urls: Vec<String>,

    /// Redis, which holds transaction statuses for fast polling.
    #[arg(
        long,
        env = "ALLOT_REDIS_URL",
        default_value = "redis://127.0.0.1:56379/0"
    )]
    pub redis_url: String,

    /// Number of partitions (queues, serial consumers). API and workers must agree.
    #[arg(long, env = "ALLOT_PARTITIONS", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub partitions: u16,

    /// Prefix of the partition queue names (`<prefix>.partition.NN`).
    #[arg(long, env = "ALLOT_QUEUE_PREFIX", default_value = "allot")]
    pub queue_prefix: String,

    /// Prefix of every Redis key allot writes (`<prefix>:tx:<id>`).
    #[arg(long, env = "ALLOT_REDIS_PREFIX", default_value = "allot")]
    pub redis_prefix: String,

    /// Most messages one partition queue holds; a publish beyond it is refused by the broker
    /// and the request answered 503, so a flood cannot grow a queue without bound.
    #[arg(long, env = "ALLOT_QUEUE_MAX_LENGTH", default_value_t = 500_000, value_parser = clap::value_parser!(i64).range(1..))]
    pub queue_max_length: i64,

    /// How long a Redis command may take before it counts as failed (milliseconds).
    #[arg(long, env = "ALLOT_REDIS_TIMEOUT_MS", default_value_t = 1000)]
    pub redis_timeout_ms: u64,
}

impl CommonConfig {
    pub fn redis_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.redis_timeout_ms)
    }

    /// The broker addresses to use: `ALLOT_AMQP_URLS` when it is set, else the one
    /// `ALLOT_AMQP_URL`.
    pub fn brokers(&self) -> Brokers {
        Brokers::new(self.amqp_urls.iter().map(String::as_str))
            .unwrap_or_else(|| Brokers::new([self.amqp_url.as_str()]).expect("one address"))
    }

    /// `ALLOT_AMQP_URL`, shown without credentials, when it was set to an address that
    /// `ALLOT_AMQP_URLS` replaces (it is neither the default nor in the list): worth a warning
    /// at start, as a configuration mistake is likely.
    pub fn ignored_amqp_url(&self) -> Option<String> {
        let ignored = !self.amqp_urls.is_empty()
            && self.amqp_url != DEFAULT_AMQP_URL
            && !self.amqp_urls.contains(&self.amqp_url);
        ignored.then(|| crate::brokers::BrokerAddress::new(&self.amqp_url).to_string())
    }

    /// The partition layout, as the AMQP topology needs it.
    pub fn topology(&self) -> crate::amqp::Topology {
        crate::amqp::Topology {
            queue_prefix: self.queue_prefix.clone(),
            partitions: self.partitions,
            max_length: self.queue_max_length,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        common: CommonConfig,
    }

    /// Parses `args` alone: the variables of the environment the tests run in (`deploy/local.sh
    /// env` sets some) are switched off.
    fn parse(args: &[&str]) -> Result<CommonConfig, clap::Error> {
        use clap::{CommandFactory, FromArgMatches};
        let mut command = Cli::command();
        let ids: Vec<clap::Id> = command
            .get_arguments()
            .map(|arg| arg.get_id().clone())
            .collect();
        for id in ids {
            command = command.mut_arg(id, |arg| arg.env(None));
        }
        let matches =
            command.try_get_matches_from(std::iter::once("allot").chain(args.iter().copied()))?;
        Cli::from_arg_matches(&matches).map(|cli| cli.common)
    }

    fn shown(config: &CommonConfig) -> Vec<String> {
        config
            .brokers()
            .addresses()
            .iter()
            .map(|address| address.url().to_owned())
            .collect()
    }

    // Flags, not variables: the variables are read by the same arguments, and a test that set
    // them would leak into every other test of the process.
    #[test]
    fn one_url_is_a_list_of_one() {
        let config = parse(&["--amqp-url", "amqp://u:p@n1:1/v"]).unwrap();
        assert_eq!(shown(&config), ["amqp://u:p@n1:1/v"]);
        assert_eq!(config.ignored_amqp_url(), None);
    }

    #[test]
    fn the_default_is_the_local_node() {
        let config = parse(&[]).unwrap();
        assert_eq!(shown(&config), [DEFAULT_AMQP_URL]);
    }

    #[test]
    fn a_list_is_split_on_commas_and_trimmed_in_order() {
        let config = parse(&[
            "--amqp-urls",
            "amqp://u:p@n1:1/v, amqp://u:p@n2:2/v,amqp://u:p@n3:3/v",
        ])
        .unwrap();
        assert_eq!(
            shown(&config),
            [
                "amqp://u:p@n1:1/v",
                "amqp://u:p@n2:2/v",
                "amqp://u:p@n3:3/v"
            ]
        );
    }

    #[test]
    fn the_list_wins_over_the_single_url_and_says_so() {
        let config = parse(&[
            "--amqp-url",
            "amqp://u:secret@old:1/v",
            "--amqp-urls",
            "amqp://u:p@n1:1/v,amqp://u:p@n2:2/v",
        ])
        .unwrap();
        assert_eq!(shown(&config), ["amqp://u:p@n1:1/v", "amqp://u:p@n2:2/v"]);
        assert_eq!(config.ignored_amqp_url().as_deref(), Some("amqp://old:1/v"));
        // Not worth a warning: the single URL is one of the list.
        let config = parse(&[
            "--amqp-url",
            "amqp://u:p@n2:2/v",
            "--amqp-urls",
            "amqp://u:p@n1:1/v,amqp://u:p@n2:2/v",
        ])
        .unwrap();
        assert_eq!(config.ignored_amqp_url(), None);
    }

    #[test]
    fn malformed_or_empty_addresses_are_refused_at_start() {
        for bad in [
            "amqp://u:p@n1:1/v,,amqp://u:p@n2:2/v",
            "amqp://u:p@n1:1/v,",
            "http://n1/",
        ] {
            assert!(parse(&["--amqp-urls", bad]).is_err(), "{bad}");
        }
        assert!(parse(&["--amqp-url", "not a url"]).is_err());
    }
}
