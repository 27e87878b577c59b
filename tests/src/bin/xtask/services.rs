//! The copy's services: `services`, `status`, `env`, `down`, `rabbitmqctl`.

use crate::Local;
use allot_tests::ports::{Deployment, TEST_VHOST};
use allot_tests::system::{Service, recorded};
use anyhow::Result;

/// Starts the three services (and the integration tests' vhost, so that `cargo nextest run`
/// works right after).
pub async fn services(local: &Local) -> Result<()> {
    start(local).await?;
    local.services().ensure_vhost(TEST_VHOST).await?;
    println!(
        "==> for cargo test by hand: eval \"$(deploy/local.sh env)\"{}",
        offset_note(local)
    );
    Ok(())
}

/// Starts the services, and says where they are.
pub async fn start(local: &Local) -> Result<()> {
    local.services().start_all().await?;
    announce(local);
    Ok(())
}

/// Says where the services are.
pub fn announce(local: &Local) {
    let ports = local.ports;
    println!(
        "==> services ready: PostgreSQL 127.0.0.1:{}, Redis 127.0.0.1:{}, RabbitMQ 127.0.0.1:{} (node {})",
        ports.postgres(),
        ports.redis(),
        ports.rabbitmq(),
        ports.rabbitmq_node()
    );
}

fn offset_note(local: &Local) -> String {
    match local.ports.offset() {
        0 => String::new(),
        offset => format!(" (with ALLOT_LOCAL_PORT_OFFSET={offset})"),
    }
}

/// What runs on the copy.
pub async fn status(local: &Local) -> Result<()> {
    let services = local.services();
    let ports = local.ports;
    println!(
        "allot in {} (state in {})",
        local.repo.display(),
        local.state.display()
    );
    for (service, port) in [
        (Service::Postgres, ports.postgres()),
        (Service::Redis, ports.redis()),
        (Service::RabbitMq, ports.rabbitmq()),
    ] {
        line(
            &service.to_string(),
            services.pid(service).await,
            &format!("127.0.0.1:{port}"),
        );
    }
    let processes = recorded(&local.run_dir());
    if processes.is_empty() {
        println!(
            "  no allot process recorded in {}",
            local.run_dir().display()
        );
    }
    for process in processes {
        let pid = process.alive().then_some(process.pid);
        let log = local.logs().join(format!("{}.log", process.name));
        line(&process.name, pid, &format!("log {}", log.display()));
    }
    println!(
        "  (allot of `up`: http://{}, its worker http://{})",
        ports.api_addr(Deployment::Main),
        ports.worker_addr(Deployment::Main)
    );
    Ok(())
}

fn line(name: &str, pid: Option<u32>, where_: &str) {
    match pid {
        Some(pid) => println!("  {name:<18} running  pid {pid:<8} {where_}"),
        None => println!("  {name:<18} stopped"),
    }
}

/// The variables that point allot and its tests at this copy's services, as shell exports.
pub fn env(local: &Local) -> Result<()> {
    let ports = local.ports;
    let mut variables = ports.allot_env(Deployment::Main);
    variables.extend(ports.test_env());
    for (name, value) in variables {
        println!("export {name}={value}");
    }
    Ok(())
}

/// Stops everything started on the copy (allot's processes, then the services), and the chaos
/// copy's, if it has one.
pub async fn down(local: &Local) -> Result<()> {
    if local.chaos_state.exists() {
        println!(
            "==> stopping the chaos copy ({})",
            local.chaos_state.display()
        );
        local.chaos_services().down().await?;
    }
    local.services().down().await?;
    println!("==> everything started on this copy is stopped");
    Ok(())
}

/// `rabbitmqctl` against the copy's node.
pub async fn rabbitmqctl(local: &Local, args: &[String]) -> Result<()> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    print!("{}", local.services().rabbitmqctl(&args).await?);
    Ok(())
}
