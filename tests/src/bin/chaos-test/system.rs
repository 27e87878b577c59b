//! The system under test, owned whole by the chaos test: its services, its allot processes,
//! the sale's products and the ledger, and the phase loop (restock, load, fault, drain, check).

use crate::Args;
use crate::apps::{self, AppEnv, Role};
use crate::check::{self, Catalogue};
use crate::load::{Counts, Ledger, Load, Reply, Shop, Users};
use allot_shared::ProductId;
use allot_shared::amqp::Topology;
use allot_shared::partition::partition_for;
use allot_tests::broker::Broker;
use allot_tests::client::{Api, Order};
use allot_tests::invariants;
use allot_tests::ports::Deployment;
use allot_tests::system::{Owned, Process, Services};
use allot_tests::wait::until;
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
    /// The second API instance (cluster form).
    api_b: Option<Process>,
    /// Two workers; three in the cluster form.
    workers: Vec<Option<Process>>,
    /// The first API instance's client (staff calls, probes).
    pub api: Arc<Api>,
    /// A client of every API instance: the sale's clients are spread over them.
    pub apis: Arc<[Arc<Api>]>,
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
    /// The shop's products (orders of two, holds with a slot), bought besides the sale.
    pub shop: Shop,
    shop_load: Option<Load>,
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
        let cluster = ports.clustered();
        let vars = [
            ("ALLOT_DATABASE_URL", ports.database_url(DATABASE)),
            ("ALLOT_AMQP_URL", ports.amqp_url("/")),
            // Every node (one unless clustered); replaces any list inherited.
            ("ALLOT_AMQP_URLS", ports.amqp_urls("/")),
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
        let mut vars: Vec<(String, String)> =
            vars.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        vars.extend(ports.cluster_env());
        let api_b_addr = ports.api_instance_addr(Deployment::Main, 2);
        let env = AppEnv {
            bin_dir,
            vars,
            api_b_addr: api_b_addr.clone(),
        };
        let api = Arc::new(Api::new(
            &format!("http://{}", ports.api_addr(Deployment::Main)),
            Some(token.clone()),
            256,
        )?);
        let mut apis = vec![api.clone()];
        if cluster {
            apis.push(Arc::new(Api::new(
                &format!("http://{api_b_addr}"),
                Some(token),
                256,
            )?));
        }
        let topology = Topology {
            queue_prefix: QUEUE_PREFIX.into(),
            partitions: PARTITIONS,
            max_length: args.queue_max_length,
            quorum_group_size: cluster.then(|| u16::from(ports.rabbitmq_node_count())),
        };
        // On a cluster the API starts alone and declares the partition queues one after the
        // other, so that the balanced leader locator sees each leader placed before it places
        // the next (several processes declaring fresh queues at once put 4 of 4 leaders on one
        // node in a run); the others start once it is ready.
        let api_app = Some(apps::spawn(Role::Api, &env, &services)?);
        if cluster {
            let first = Api::new(
                &format!("http://{}", ports.api_addr(Deployment::Main)),
                None,
                1,
            )?;
            let started = Instant::now();
            while !first.ready().await {
                anyhow::ensure!(
                    started.elapsed() < Duration::from_secs(60),
                    "chaos-api not ready after 60 s"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        let mut worker_roles = vec![Role::WorkerA, Role::WorkerB];
        if cluster {
            worker_roles.push(Role::WorkerC);
        }
        let mut workers = Vec::new();
        for role in worker_roles {
            workers.push(Some(apps::spawn(role, &env, &services)?));
        }
        let api_b = match cluster {
            true => Some(apps::spawn(Role::ApiB, &env, &services)?),
            false => None,
        };
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
            api_b,
            workers,
            api,
            apis: Arc::from(apis),
            pool,
            redis,
            ledger: Arc::default(),
            users: Arc::default(),
            catalogue: Catalogue {
                supply: Default::default(),
                cursed: 0,
                cursed_stock: 0,
                conserved: Default::default(),
            },
            products: Arc::from(Vec::new()),
            probes: Vec::new(),
            topology,
            load: None,
            shop: Shop {
                basket: [0, 0],
                held: 0,
                slot: 0,
            },
            shop_load: None,
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
        let mut shop = Vec::new();
        for name in ["chaos basket A", "chaos basket B", "chaos held"] {
            let id = system.api.create_product(name, 0).await?.id;
            system.catalogue.conserved.insert(id, 0);
            shop.push(id);
        }
        system.shop = Shop {
            basket: [shop[0], shop[1]],
            held: shop[2],
            slot: system.api.create_slot("chaos slot", 1_000_000_000).await?,
        };
        system.catalogue.cursed = cursed;
        system.catalogue.cursed_stock = cursed_stock;
        system.products = Arc::from(products);
        Ok(system)
    }

    /// Shoppers alongside the sale's clients: a quarter as many, at least two.
    fn shoppers(&self) -> usize {
        (self.clients / 4).max(2)
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
        self.order_via(&self.api, product).await
    }

    /// [`System::order_answer`] through the API instance `api`.
    pub async fn order_via(&self, api: &Api, product: i64) -> Reply {
        let user = self.users.next();
        let sent = Instant::now();
        let order = Order {
            user_id: user,
            product_id: product,
            quantity: 1,
        };
        let reply = Reply::of(&order, api.add_to_cart(order).await);
        self.ledger
            .lock()
            .expect("ledger")
            .record(user, product, sent, reply.clone());
        reply
    }

    /// Waits until `/readyz` of every running API instance answers 200.
    pub async fn wait_ready(&mut self, deadline: Duration) -> Result<Duration> {
        let started = Instant::now();
        let apis = self.apis.clone();
        for (api, role) in apis.iter().zip([Role::Api, Role::ApiB]) {
            if self.slot(role).is_none() {
                continue;
            }
            while !api.ready().await {
                self.ensure_alive()?;
                if started.elapsed() > deadline {
                    bail!("{} not ready after {deadline:?}", role.name());
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(started.elapsed())
    }

    /// Waits until `/readyz` of `role` (an API instance) answers 200.
    pub async fn wait_api_ready(&mut self, role: Role, deadline: Duration) -> Result<Duration> {
        let started = Instant::now();
        let api = self.apis[usize::from(role == Role::ApiB)].clone();
        while !api.ready().await {
            self.ensure_alive()?;
            if started.elapsed() > deadline {
                bail!("{} not ready after {deadline:?}", role.name());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(started.elapsed())
    }

    /// Fails if a process that should run has exited.
    pub fn ensure_alive(&mut self) -> Result<()> {
        let apis = [&mut self.api_app, &mut self.api_b];
        for app in self.workers.iter_mut().chain(apis).flatten() {
            app.ensure_alive()?;
        }
        Ok(())
    }

    /// The worker roles of this form (two, or three in the cluster form).
    pub fn worker_roles(&self) -> Vec<Role> {
        [Role::WorkerA, Role::WorkerB, Role::WorkerC][..self.workers.len()].to_vec()
    }

    /// The API roles of this form (one, or two in the cluster form).
    pub fn api_roles(&self) -> Vec<Role> {
        [Role::Api, Role::ApiB][..self.apis.len()].to_vec()
    }

    fn slot(&mut self, role: Role) -> &mut Option<Process> {
        match role {
            Role::Api => &mut self.api_app,
            Role::ApiB => &mut self.api_b,
            Role::WorkerA => &mut self.workers[0],
            Role::WorkerB => &mut self.workers[1],
            Role::WorkerC => &mut self.workers[2],
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

    /// Where the API refuses a message to a partition queue (`queue_full`): the limit less a
    /// fifth (`allot_api::backlog::bound`, which this binary does not link).
    pub fn queue_bound(&self) -> i64 {
        let limit = self.topology.max_length;
        limit - limit / 5
    }

    /// A connection to the broker: the first node that answers.
    pub async fn broker(&self) -> Result<Broker> {
        let mut failed = None;
        for node in self.services.rabbitmq_nodes() {
            match Broker::connect(&node.amqp_url("/"), self.topology.clone()).await {
                Ok(broker) => return Ok(broker),
                Err(err) => failed = Some(err),
            }
        }
        Err(failed.unwrap_or_else(|| anyhow::anyhow!("no RabbitMQ node")))
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
        let shop = self.shop;
        for product in shop.basket.into_iter().chain([shop.held]) {
            self.api.restock(product, self.restock / 2).await?;
            *self
                .catalogue
                .conserved
                .get_mut(&product)
                .expect("a shop product") += self.restock / 2;
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
            "\n[{}] {name}: restocked {} units of each of {} products ({} of each shop product); \
             {} clients buying, {} shoppers (orders of two products, holds)",
            self.phase,
            self.restock,
            self.products.len(),
            self.restock / 2,
            self.clients,
            self.shoppers()
        );
        self.load = Some(Load::start(
            self.apis.clone(),
            self.ledger.clone(),
            self.users.clone(),
            self.products.clone(),
            self.clients,
        ));
        self.shop_load = Some(Load::start_shop(
            self.api.clone(),
            self.ledger.clone(),
            self.users.clone(),
            self.shop,
            self.shoppers(),
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
        for load in [self.load.take(), self.shop_load.take()]
            .into_iter()
            .flatten()
        {
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
        // The shoppers' abandoned holds expire by themselves: all of them end before the checks.
        let pool = &self.pool;
        until("every hold to end", self.drain_deadline, || async move {
            let open: Option<i64> =
                sqlx::query_scalar("SELECT count(*) FROM transactions WHERE status = 'held'")
                    .fetch_one(pool)
                    .await
                    .ok();
            (open == Some(0)).then_some(())
        })
        .await?;
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
