//! Running commands (their output on the terminal, killed if the run is dropped) and numbered
//! steps (named when they fail, timed when they end).

use anyhow::{Context as _, Result, bail};
use std::ffi::OsStr;
use std::future::Future;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::Command;

/// A command to run, with its output on the terminal, in a process group of its own: when the
/// run is dropped (a signal, a failed step), the whole group is stopped, the command's own
/// children with it (see [`Group`]).
pub fn command(program: impl AsRef<OsStr>) -> Command {
    let mut command = Command::new(program);
    command
        .stdin(Stdio::null())
        .process_group(0)
        .kill_on_drop(true);
    command
}

/// Runs `command` to its end (or `within`) and fails unless it succeeded.
pub async fn status(mut command: Command, within: Option<Duration>) -> Result<()> {
    let shown = describe(&command);
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {shown}"))?;
    let _group = child.id().map(Group);
    let status = match within {
        Some(within) => match tokio::time::timeout(within, child.wait()).await {
            Ok(status) => status?,
            Err(_) => {
                let _ = child.kill().await;
                bail!("{shown} did not finish within {within:?}");
            }
        },
        None => child.wait().await?,
    };
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

/// `program args...` in `dir`, to its end.
pub async fn cmd(dir: &Path, program: &str, args: &[&str]) -> Result<()> {
    let mut command = command(program);
    command.args(args).current_dir(dir);
    status(command, None).await
}

/// [`cmd`], its output appended to `log` instead of the terminal.
pub async fn cmd_logged(dir: &Path, log: &Path, program: &str, args: &[&str]) -> Result<()> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let mut command = command(program);
    command
        .args(args)
        .current_dir(dir)
        .stdout(file.try_clone()?)
        .stderr(file);
    status(command, None)
        .await
        .with_context(|| format!("see {}", log.display()))
}

/// Work started now and awaited later ([`Background::wait`]), beside the steps in between:
/// what waits on the network or the disk (installing packages, starting the services) beside
/// what keeps the CPU busy (compiling). Dropped before it is awaited, it is aborted, and the
/// commands it runs are stopped with it.
pub struct Background {
    task: Option<tokio::task::JoinHandle<Result<()>>>,
    started: Instant,
}

impl Background {
    pub fn start(work: impl Future<Output = Result<()>> + Send + 'static) -> Background {
        Background {
            task: Some(tokio::spawn(work)),
            started: Instant::now(),
        }
    }

    /// Its outcome; says how long it ran.
    pub async fn wait(mut self) -> Result<()> {
        let task = self.task.take().expect("awaited once");
        let outcome = task.await.context("a background task failed")?;
        println!(
            "==> started {:.0} s ago, in the background",
            self.started.elapsed().as_secs_f64()
        );
        outcome
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The process group of a command [`status`] runs. Dropped (the command ended, or the run was
/// dropped), it stops whatever is left in the group: SIGTERM, which lets a command that
/// cleans up (the chaos test stops its services) do so, then SIGKILL after 60 s. A command
/// that ended normally leaves nothing, and this is a no-op.
struct Group(u32);

impl Group {
    fn signal(&self, signal: &str) {
        let _ = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg("--")
            .arg(format!("-{}", self.0))
            .stderr(Stdio::null())
            .status();
    }

    /// Whether a process of the group still runs (zombies, exited and not yet reaped, do not
    /// count), from /proc.
    fn alive(&self) -> bool {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return false;
        };
        entries.flatten().any(|entry| {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                return false;
            };
            // After "pid (comm) ": state, ppid, pgrp, ...
            let Some((_, rest)) = stat.rsplit_once(") ") else {
                return false;
            };
            let fields: Vec<&str> = rest.split(' ').take(3).collect();
            fields.len() == 3 && fields[0] != "Z" && fields[2] == self.0.to_string()
        })
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if !self.alive() {
            return;
        }
        self.signal("TERM");
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if self.alive() {
            self.signal("KILL");
        }
    }
}

fn describe(command: &Command) -> String {
    let command = command.as_std();
    let mut shown = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        shown.push(' ');
        shown.push_str(&arg.to_string_lossy());
    }
    if shown.len() > 160 {
        shown.truncate(160);
        shown.push('…');
    }
    shown
}

/// Numbered steps, each announced, timed and named when it fails.
pub struct Steps {
    total: usize,
    done: usize,
    started: Instant,
    timings: Vec<(String, Duration)>,
}

impl Steps {
    pub fn new(total: usize) -> Steps {
        Steps {
            total,
            done: 0,
            started: Instant::now(),
            timings: Vec::new(),
        }
    }

    /// Runs one step.
    pub async fn run<T>(&mut self, name: &str, step: impl Future<Output = Result<T>>) -> Result<T> {
        self.done += 1;
        let title = format!("[{}/{}] {name}", self.done, self.total);
        println!("==> {title}");
        let started = Instant::now();
        let outcome = step.await;
        let took = started.elapsed();
        match &outcome {
            Ok(_) => println!("==> {title}: done in {:.0} s", took.as_secs_f64()),
            Err(_) => eprintln!(
                "\nerror: step failed: {title} (after {:.0} s)",
                took.as_secs_f64()
            ),
        }
        self.timings.push((title, took));
        outcome
    }

    /// The time each step took, and in all.
    pub fn summary(&self) {
        println!("\nsteps:");
        for (title, took) in &self.timings {
            println!("  {:>6.0} s  {title}", took.as_secs_f64());
        }
        println!(
            "  {:>6.0} s  in all (xtask; the release build before it is not counted)",
            self.started.elapsed().as_secs_f64()
        );
    }
}
