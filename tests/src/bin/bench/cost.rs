//! CPU cost per request of each component: the CPU time (user + system, from
//! `/proc/<pid>/stat`) that every process of a component used during a scenario, divided by the
//! requests the scenario had accepted and decided. The machine's own total (`/proc/stat`) gives
//! what else ran. These per-request costs are the inputs of docs/scaling.md's model.
//!
//! Components are found by process name, machine-wide: run the bench on a machine where no
//! other PostgreSQL, Redis or RabbitMQ is busy (`deploy/local.sh bench` starts only its own),
//! or the other instances' work is counted as allot's.

use std::collections::BTreeMap;
use std::time::Instant;

/// Clock ticks per second of `/proc`'s CPU times (`USER_HZ`, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// The components measured, by the names of their processes.
#[derive(Debug, Clone, Copy)]
pub struct Components {
    pub api: Option<u32>,
    pub worker: Option<u32>,
}

/// CPU seconds used so far, per component, and the machine's busy total.
#[derive(Debug, Clone)]
pub struct Snapshot {
    at: Instant,
    seconds: BTreeMap<&'static str, f64>,
    machine_busy: f64,
}

/// What a scenario cost, per request, in microseconds of CPU.
#[derive(Debug, Clone)]
pub struct Cost {
    pub requests: u64,
    pub wall_seconds: f64,
    pub per_request_us: BTreeMap<&'static str, f64>,
    /// Everything the machine ran, per request (allot, its services, the bench, the rest).
    pub machine_us: f64,
}

/// CPU seconds of one process and of its children that ended (utime + stime + cutime +
/// cstime): PostgreSQL's backends that exit during a scenario leave their time with the
/// postmaster, so a component's total never goes down.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The name is in parentheses and may hold spaces: the fields start after the last ')'
    // (index 0 is field 3, the state; utime, stime, cutime, cstime are fields 14 to 17).
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let mut ticks = 0.0;
    for index in 11..=14 {
        ticks += fields.get(index)?.parse::<f64>().ok()?;
    }
    Some(ticks / TICKS_PER_SECOND)
}

/// The process name (`comm`) of `pid`.
fn comm(pid: u32) -> Option<String> {
    Some(
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .ok()?
            .trim()
            .to_owned(),
    )
}

/// The component a process of this name belongs to, if any.
fn component_of(name: &str) -> Option<&'static str> {
    match name {
        "beam.smp" | "erl_child_setup" | "epmd" => Some("rabbitmq"),
        "postgres" => Some("postgresql"),
        "redis-server" => Some("redis"),
        _ => None,
    }
}

/// Busy CPU seconds of the whole machine (every CPU's time but idle and iowait).
fn machine_busy() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    let Some(line) = stat.lines().next() else {
        return 0.0;
    };
    let ticks: Vec<f64> = (line.split_whitespace().skip(1))
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: f64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3).copied().unwrap_or(0.0) + ticks.get(4).copied().unwrap_or(0.0);
    (total - idle) / TICKS_PER_SECOND
}

impl Components {
    pub fn snapshot(&self) -> Snapshot {
        let mut seconds: BTreeMap<&'static str, f64> = BTreeMap::new();
        let own = std::process::id();
        let mut named = |name: &'static str, pid: Option<u32>| {
            if let Some(used) = pid.and_then(cpu_seconds) {
                *seconds.entry(name).or_default() += used;
            }
        };
        named("allot-api", self.api);
        named("allot-worker", self.worker);
        named("bench (load generator)", Some(own));
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for entry in entries.flatten() {
                let Some(pid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<u32>().ok())
                else {
                    continue;
                };
                if let Some(component) = comm(pid).as_deref().and_then(component_of)
                    && let Some(used) = cpu_seconds(pid)
                {
                    *seconds.entry(component).or_default() += used;
                }
            }
        }
        Snapshot {
            at: Instant::now(),
            seconds,
            machine_busy: machine_busy(),
        }
    }
}

impl Snapshot {
    /// The cost of what ran since `self`, per request of `requests`.
    pub fn cost_until(&self, after: &Snapshot, requests: u64) -> Cost {
        let per = |seconds: f64| seconds * 1e6 / requests.max(1) as f64;
        let per_request_us = (after.seconds.iter())
            .map(|(name, used)| {
                let before = self.seconds.get(name).copied().unwrap_or(0.0);
                // A process that exited in between (a PostgreSQL backend) took its time along;
                // never report a negative cost.
                (*name, per((used - before).max(0.0)))
            })
            .collect();
        Cost {
            requests,
            wall_seconds: after.at.duration_since(self.at).as_secs_f64(),
            per_request_us,
            machine_us: per(after.machine_busy - self.machine_busy),
        }
    }
}

impl Cost {
    /// allot's own cost per request: every component but the bench.
    pub fn allot_us(&self) -> f64 {
        (self.per_request_us.iter())
            .filter(|(name, _)| !name.starts_with("bench"))
            .map(|(_, us)| us)
            .sum()
    }

    /// One line per component, and the totals.
    pub fn print(&self, scenario: &str) {
        println!(
            "cost of {scenario}: CPU per request over {} requests in {:.1} s (µs):",
            self.requests, self.wall_seconds
        );
        for (name, us) in &self.per_request_us {
            println!("  {name:<24} {us:>8.1}");
        }
        let allot = self.allot_us();
        println!(
            "  {:<24} {allot:>8.1}  (requests/s two cores would carry at this cost: {:.0})",
            "allot and its services",
            2e6 / allot.max(f64::MIN_POSITIVE)
        );
        println!(
            "  {:<24} {:>8.1}  (the rest: other processes of the machine)",
            "whole machine", self.machine_us
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_reads_its_own_cpu_time_and_name() {
        let own = std::process::id();
        assert!(cpu_seconds(own).is_some_and(|s| s >= 0.0));
        assert!(comm(own).is_some());
        assert_eq!(component_of("postgres"), Some("postgresql"));
        assert_eq!(component_of("beam.smp"), Some("rabbitmq"));
        assert_eq!(component_of("cargo"), None);
    }

    #[test]
    fn costs_are_per_request_and_never_negative() {
        let at = Instant::now();
        let before = Snapshot {
            at,
            seconds: BTreeMap::from([("allot-api", 1.0), ("postgresql", 5.0)]),
            machine_busy: 10.0,
        };
        let after = Snapshot {
            at,
            seconds: BTreeMap::from([
                ("allot-api", 1.5),
                ("postgresql", 4.0),
                ("bench (load generator)", 0.1),
            ]),
            machine_busy: 12.0,
        };
        let cost = before.cost_until(&after, 1000);
        assert_eq!(cost.per_request_us["allot-api"], 500.0);
        assert_eq!(cost.per_request_us["postgresql"], 0.0);
        assert!((cost.per_request_us["bench (load generator)"] - 100.0).abs() < 1e-9);
        assert_eq!(cost.allot_us(), 500.0);
        assert_eq!(cost.machine_us, 2000.0);
    }
}
