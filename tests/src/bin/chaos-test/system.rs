//! The system under test, owned whole by the chaos test: its services, its allot processes,
//! the sale's products and the ledger, and the phase loop (restock, load, fault, drain, check).

use crate::Args;
use crate::apps::{self, AppEnv, Role};
use crate::check::{self, Catalogue};
use crate::load::{Counts, Ledger, Load, Reply, Users};
use allot_shared::ProductId;
use allot_shared::amqp::Topology;
use allot_shared::partition::partition_for;
use allot_tests::broker::Broker;
use allot_tests::client::{Api, Order};
use allot_tests::invariants;
use allot_tests::ports::Deployment;
use allot_tests::system::{Owned, Process, Services};
use anyhow::{Context as _, Result, bail};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const PARTITIONS: u16 = 4;
pub const REDIS_PREFIX: &str = "chaos";
pub const QUEUE_PREFIX: &str = "chaos";
/// The chaos copy's database.
const DATABASE: &str = "allot";

pub struct System {
    /// Stopped (with every process recorded on them) when the system is dropped.
    pub services: Owned,
    env: AppEnv,
    api_app: Option<Process>,
    workers: [Option<Process>; 2],
    pub api: Arc<Api>,
    pub pool: PgPool,
    pub redis: redis::aio::ConnectionManager,
    pub ledger: Arc<Mutex<Ledger>>,
    /// The user id of every request sent, one each.
    pub users: Arc<Users>,
    pub catalogue: Catalogue,
    pub products: Arc<[i64]>,
    /// One product per partition that the load never buys, with more stock than any run
    /// sells: the faults probe allot with them, so their requests are never answered sold-out.
    pub probes: Vec<i64>,
    pub topology: Topology,
    load: Option<Load>,
    pub clients: usize,
    restock: i64,
    drain_deadline: Duration,
    phase: i64,
}

/// What a phase started from.
pub struct Phase {
    counts: Counts,
    /// Accepted requests per product before the phase.
    demand: HashMap<i64, u64>,
    /// Sold-out answers per product before the phase.
    sold_out: HashMap<i64, u64>,
    /// Unanswered requests per product before the phase.
    lost: HashMap<i64, u64>,
    started: Instant,
}

impl System {
    /// Fresh services, a fresh database, two workers and the API, and the products.
    pub async fn start(args: &Args, services: Services) -> Result<System> {
        let ports = services.ports();
        println!(
            "starting fresh services (deploy/services.sh, port offset {}, state {})",
            ports.offset(),
            services.state().display()
        );
        let services = Owned::fresh(services).await?;
        services
            .ensure_database(DATABASE)
            .await
            .context("creating the database")?;

        let token = format!("chaos-{}", uuid::Uuid::new_v4());
        let bin_dir = match &args.bin_dir {
            Some(dir) => dir.clone(),
            None => std::env::current_exe()?
                .parent()
                .context("the binary has a folder")?
                .to_owned(),
        };
        let max_length = args.queue_max_length.to_string();
        let vars = [
            ("ALLOT_DATABASE_URL", ports.database_url(DATABASE)),
            ("ALLOT_AMQP_URL", ports.amqp_url("/")),
            ("ALLOT_AMQP_URLS", ports.amqp_url("/")), // replaces any list inherited
            ("ALLOT_REDIS_URL", ports.redis_url(0)),
            ("ALLOT_HTTP_ADDR", ports.api_addr(Deployment::Main)),
            ("ALLOT_ADMIN_TOKEN", token.clone()),
            ("ALLOT_PARTITIONS", PARTITIONS.to_string()),
            ("ALLOT_QUEUE_PREFIX", QUEUE_PREFIX.to_owned()),
            ("ALLOT_REDIS_PREFIX", REDIS_PREFIX.to_owned()),
            ("ALLOT_QUEUE_MAX_LENGTH", max_length),
            ("ALLOT_CONFIRM_TIMEOUT_MS", "2000".to_owned()),
            ("ALLOT_DB_MAX_CONNECTIONS", "8".to_owned()),
            ("ALLOT_BATCH_SIZE", "100".to_owned()),
            ("RUST_LOG", "info".to_owned()),
        ];
        let env = AppEnv {
            bin_dir,
            vars: vars.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        };
        let api = Arc::new(Api::new(
            &format!("http://{}", ports.api_addr(Deployment::Main)),
            Some(token),
            256,
        )?);
        let topology = Topology {
            queue_prefix: QUEUE_PREFIX.into(),
            partitions: PARTITIONS,
            max_length: args.queue_max_length,
        };
        let workers = [
            Some(apps::spawn(Role::WorkerA, &env, &services)?),
            Some(apps::spawn(Role::WorkerB, &env, &services)?),
        ];
        let api_app = Some(apps::spawn(Role::Api, &env, &services)?);
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(3))
            .connect(&ports.database_url(DATABASE))
            .await?;
        // Reconnects by itself after the Redis fault.
        let redis =
            redis::aio::ConnectionManager::new(redis::Client::open(ports.redis_url(0))?).await?;
        let mut system = System {
            services,
            env,
            api_app,
            workers,
            api,
            pool,
            redis,
            ledger: Arc::default(),
            users: Arc::default(),
            catalogue: Catalogue {
                supply: Default::default(),
                cursed: 0,
                cursed_stock: 0,
            },
            products: Arc::from(Vec::new()),
            probes: Vec::new(),
            topology,
            load: None,
            clients: args.clients,
            restock: args.restock.unwrap_or(60),
            drain_deadline: Duration::from_secs(args.drain_secs),
            phase: 0,
        };
        system.wait_ready(Duration::from_secs(60)).await?;
        let mut products = Vec::new();
        for i in 0..args.products {
            let id = system
                .api
                .create_product(&format!("chaos sale {i}"), 0)
                .await?
                .id;
            system.catalogue.supply.insert(id, 0);
            products.push(id);
        }
        // Shares a partition with the first sale product, so the poison fault proves that a
        // partition keeps moving past a message that fails every time.
        let cursed_stock = 1_000;
        let cursed = loop {
            let id = system
                .api
                .create_product("chaos cursed", cursed_stock)
                .await?
                .id;
            if (id - products[0]) % i64::from(PARTITIONS) == 0 {
                break id;
            } // else an unused product: the next id lands in the right partition
        };
        let probe_stock = 1_000_000;
        let mut covered = HashSet::new();
        while covered.len() < usize::from(PARTITIONS) {
            let id = system
                .api
                .create_product("chaos probe", probe_stock)
                .await?
                .id;
            let product = ProductId::try_from(id).map_err(anyhow::Error::msg)?;
            if covered.insert(partition_for(product, PARTITIONS)) {
                system.catalogue.supply.insert(id, probe_stock);
                system.probes.push(id);
            } // else an unused product: its partition already has a probe
        }
        system.catalogue.cursed = cursed;
        system.catalogue.cursed_stock = cursed_stock;
        system.products = Arc::from(products);
        Ok(system)
    }

    /// Orders one unit of `product` for a fresh user, records the answer in the ledger and
    /// returns the transaction id if it was accepted.
    pub async fn order(&self, product: i64) -> Option<uuid::Uuid> {
        match self.order_answer(product).await {
            Reply::Accepted(id) => Some(id),
            _ => None,
        }
    }

    /// Orders one unit of `product` for a fresh user, records the answer in the ledger and
    /// returns it.
    pub async fn order_answer(&self, product: i64) -> Reply {
        let user = self.users.next();
        let sent = Instant::now();
        let order = Order {
            user_id: user,
            product_id: product,
            quantity: 1,
        };
        let reply = Reply::of(&order, self.api.add_to_cart(order).await);
        self.ledger
            .lock()
            .expect("ledger")
            .record(user, product, sent, reply.clone());
        reply
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&mut self, deadline: Duration) -> Result<Duration> {
        let started = Instant::now();
        while !self.api.ready().await {
            self.ensure_alive()?;
            if started.elapsed() > deadline {
                bail!("allot-api not ready after {deadline:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(started.elapsed())
    }

    /// Fails if a process that should run has exited.
    pub fn ensure_alive(&mut self) -> Result<()> {
        for app in self.workers.iter_mut().chain([&mut self.api_app]).flatten() {
            app.ensure_alive()?;
        }
        Ok(())
    }

    fn slot(&mut self, role: Role) -> &mut Option<Process> {
        match role {
            Role::Api => &mut self.api_app,
            Role::WorkerA => &mut self.workers[0],
            Role::WorkerB => &mut self.workers[1],
        }
    }

    pub async fn spawn(&mut self, role: Role) -> Result<()> {
        let app = apps::spawn(role, &self.env, &self.services)?;
        println!("    started {}", role.name());
        *self.slot(role) = Some(app);
        Ok(())
    }

    pub async fn kill(&mut self, role: Role) -> Result<()> {
        let app = self
            .slot(role)
            .take()
            .with_context(|| format!("{} is not running", role.name()))?;
        app.kill().await?;
        println!("    kill -9 {}", role.name());
        Ok(())
    }

    pub async fn terminate(&mut self, role: Role) -> Result<Duration> {
        let app = self
            .slot(role)
            .take()
            .with_context(|| format!("{} is not running", role.name()))?;
        let took = app.terminate(Duration::from_secs(30)).await?;
        println!(
            "    SIGTERM {}: exited cleanly after {:.2} s",
            role.name(),
            took.as_secs_f64()
        );
        Ok(took)
    }

    pub async fn broker(&self) -> Result<Broker> {
        Broker::connect(&self.services.ports().amqp_url("/"), self.topology.clone()).await
    }

    /// Restocks every sale product and starts the load.
    pub async fn begin(&mut self, name: &str) -> Result<Phase> {
        self.phase += 1;
        for product in self.products.iter() {
            self.api.restock(*product, self.restock).await?;
            *self
                .catalogue
                .supply
                .get_mut(product)
                .expect("a sale product") += self.restock;
        }
        let (counts, demand, sold_out, lost) = {
            let ledger = self.ledger.lock().expect("ledger");
            (
                ledger.counts(),
                ledger.demand.clone(),
                ledger.sold_out.clone(),
                ledger.lost.clone(),
            )
        };
        println!(
            "\n[{}] {name}: restocked {} units of each of {} products; {} clients buying",
            self.phase,
            self.restock,
            self.products.len(),
            self.clients
        );
        self.load = Some(Load::start(
            self.api.clone(),
            self.ledger.clone(),
            self.users.clone(),
            self.products.clone(),
            self.clients,
        ));
        Ok(Phase {
            counts,
            demand,
            sold_out,
            lost,
            started: Instant::now(),
        })
    }

    /// Keeps the load on until every sale product sold out in this phase (its 202s cover the
    /// restock, and either exceed it or the API has begun answering sold-out), stops it, waits
    /// until every accepted request is decided and checks the promises. Returns the violations.
    pub async fn end(&mut self, phase: Phase) -> Result<Vec<String>> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let short = {
                let ledger = self.ledger.lock().expect("ledger");
                // Every phase sells out: its own demand reaches its restock, so at its end the
                // stock is 0 and units sold == min(demand, supply) is tested at its edge. A
                // request whose answer a `kill -9` of the API lost may have been sold: it counts
                // as possible demand (the check counts it if it reached the database).
                let this_phase = |of: &HashMap<i64, u64>, before: &HashMap<i64, u64>, product| {
                    of.get(product).copied().unwrap_or(0)
                        - before.get(product).copied().unwrap_or(0)
                };
                self.products.iter().any(|product| {
                    let demand = this_phase(&ledger.demand, &phase.demand, product);
                    let sold_out = this_phase(&ledger.sold_out, &phase.sold_out, product);
                    let lost = this_phase(&ledger.lost, &phase.lost, product);
                    let restock = self.restock as u64;
                    demand + lost < restock || (demand < restock + 5 && sold_out == 0)
                })
            };
            if !short || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if let Some(load) = self.load.take() {
            load.stop().await;
        }
        self.ensure_alive()?;
        let ids: Vec<uuid::Uuid> = self
            .ledger
            .lock()
            .expect("ledger")
            .accepted
            .keys()
            .copied()
            .collect();
        let drained = invariants::wait_decided(&self.pool, &ids, self.drain_deadline).await?;
        let ledger = std::mem::take(&mut *self.ledger.lock().expect("ledger"));
        let result = check::check_all(
            &self.pool,
            &mut self.redis,
            REDIS_PREFIX,
            &ledger,
            &self.catalogue,
        )
        .await;
        let counts = ledger.counts().since(phase.counts);
        let slowest = ledger.slowest_outage_refusal;
        let mut ledger = ledger;
        ledger.violations.clear(); // reported once, in this phase
        ledger.reset_outage_stats();
        *self.ledger.lock().expect("ledger") = ledger;
        let (summary, violations) = result?;
        println!(
            "    load: {counts}; phase took {:.1} s; all decided {:.1} s after the load stopped",
            phase.started.elapsed().as_secs_f64(),
            drained.as_secs_f64()
        );
        if !slowest.is_zero() {
            println!(
                "    slowest 503 while a dependency was down: {} ms",
                slowest.as_millis()
            );
        }
        println!("    checked: {summary}");
        if violations.is_empty() {
            println!("    OK");
        } else {
            for violation in &violations {
                println!("    VIOLATION: {violation}");
            }
        }
        Ok(violations)
    }
}
