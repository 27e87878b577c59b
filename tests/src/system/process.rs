//! allot's processes (and any other this kit starts): each is a child with its output in
//! `<logs>/<name>.log` and a pid file `<run>/<name>.pid` holding its pid and command name, so
//! that [`stop_recorded`] stops it even after whoever started it died. A [`Process`] is
//! SIGKILLed when dropped, unless it was [`Process::detach`]ed to outlive its starter
//! (`deploy/local.sh up`).
//!
//! Processes are found through their pid files only, and a pid is signalled only while its
//! command name is still the recorded one; nothing is ever killed by name.

use anyhow::{Context as _, Result, bail, ensure};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// What to start.
#[derive(Debug, Clone)]
pub struct Spawn {
    /// The name of its log and pid files, e.g. `functional-api`.
    pub name: String,
    pub binary: PathBuf,
    pub args: Vec<String>,
    /// Added to the environment.
    pub env: Vec<(String, String)>,
    /// Where its pid file goes.
    pub run_dir: PathBuf,
    /// Where its log goes.
    pub log_dir: PathBuf,
}

/// A running process this kit started.
pub struct Process {
    name: String,
    child: Child,
    pid: u32,
    pid_file: PathBuf,
    log: PathBuf,
    detached: bool,
}

impl Process {
    /// Starts it in a process group of its own (a Ctrl-C meant for its starter does not reach
    /// it: its starter stops it), appending its output to its log.
    pub fn spawn(spec: &Spawn) -> Result<Process> {
        std::fs::create_dir_all(&spec.log_dir)
            .with_context(|| format!("creating {}", spec.log_dir.display()))?;
        std::fs::create_dir_all(&spec.run_dir)
            .with_context(|| format!("creating {}", spec.run_dir.display()))?;
        let log = spec.log_dir.join(format!("{}.log", spec.name));
        let mut output = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("opening {}", log.display()))?;
        use std::io::Write as _;
        writeln!(
            output,
            "----- {}: starting {}",
            chrono::Utc::now().to_rfc3339(),
            spec.binary.display()
        )?;
        let mut command = std::process::Command::new(&spec.binary);
        command
            .args(&spec.args)
            .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(output.try_clone()?)
            .stderr(output)
            .process_group(0);
        let child = Command::from(command)
            .kill_on_drop(false)
            .spawn()
            .with_context(|| format!("starting {}", spec.binary.display()))?;
        let pid = child.id().context("a fresh child has a pid")?;
        let comm = command_name(&spec.binary);
        let pid_file = spec.run_dir.join(format!("{}.pid", spec.name));
        std::fs::write(&pid_file, format!("{pid} {comm}\n"))
            .with_context(|| format!("writing {}", pid_file.display()))?;
        Ok(Process {
            name: spec.name.clone(),
            child,
            pid,
            pid_file,
            log,
            detached: false,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Fails if the process exited.
    pub fn ensure_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited unexpectedly ({status}); see {}",
                self.name,
                self.log.display()
            );
        }
        Ok(())
    }

    /// SIGKILL (a crash), and wait until it is gone.
    pub async fn kill(mut self) -> Result<()> {
        self.child.kill().await.context("SIGKILL")?;
        Ok(())
    }

    /// SIGTERM, then wait up to `grace` for its exit, which must be clean (status 0). Returns
    /// how long it took.
    pub async fn terminate(mut self, grace: Duration) -> Result<Duration> {
        let started = Instant::now();
        signal(self.pid, "TERM").await?;
        let exit = tokio::time::timeout(grace, self.child.wait())
            .await
            .with_context(|| format!("{} did not exit within {grace:?} of SIGTERM", self.name))??;
        ensure!(
            exit.success(),
            "{} exited with {exit} after SIGTERM; see {}",
            self.name,
            self.log.display()
        );
        Ok(started.elapsed())
    }

    /// SIGTERM, and SIGKILL if it has not exited after `grace`; however it exits.
    pub async fn stop(mut self, grace: Duration) {
        if signal(self.pid, "TERM").await.is_ok()
            && tokio::time::timeout(grace, self.child.wait()).await.is_ok()
        {
            return;
        }
        let _ = self.child.kill().await;
    }

    /// Leaves it running after we are gone; its pid file stays, for a later `down`.
    pub fn detach(mut self) -> u32 {
        self.detached = true;
        self.pid
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        let _ = self.child.start_kill();
        let _ = std::fs::remove_file(&self.pid_file);
    }
}

/// The name the kernel gives the process of `binary` (`/proc/<pid>/comm`: the file name, cut
/// to 15 bytes).
fn command_name(binary: &Path) -> String {
    let name = binary
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    name.chars().take(15).collect()
}

/// `kill -SIGNAL pid` (the signal by name: TERM, KILL).
async fn signal(pid: u32, signal: &str) -> Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status()
        .await
        .context("running kill")?;
    ensure!(status.success(), "kill -{signal} {pid} failed");
    Ok(())
}

/// A process recorded in a pid file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub name: String,
    pub pid: u32,
    /// Its command name, as recorded.
    pub comm: String,
}

impl Recorded {
    /// Whether it still runs as what was recorded (and is no zombie).
    pub fn alive(&self) -> bool {
        alive(self.pid, &self.comm)
    }
}

/// Every process recorded in `run_dir`, alive or not.
pub fn recorded(run_dir: &Path) -> Vec<Recorded> {
    let Ok(entries) = std::fs::read_dir(run_dir) else {
        return Vec::new();
    };
    let mut found: Vec<Recorded> = entries
        .flatten()
        .filter_map(|entry| {
            let path = entry.path();
            let name = path.file_name()?.to_str()?.strip_suffix(".pid")?.to_owned();
            let text = std::fs::read_to_string(&path).ok()?;
            let mut fields = text.split_whitespace();
            let pid = fields.next()?.parse().ok()?;
            // Pid files of older scripts hold the pid alone: the name tells the command.
            let comm = match fields.next() {
                Some(comm) => comm.to_owned(),
                None if name.ends_with("-api") || name == "api" => "allot-api".into(),
                None if name.ends_with("worker") => "allot-worker".into(),
                None => return None,
            };
            Some(Recorded { name, pid, comm })
        })
        .collect();
    found.sort_by(|a, b| a.name.cmp(&b.name));
    found
}

/// Stops every process recorded in `run_dir` (SIGTERM, SIGKILL after `grace`) and removes the
/// pid files; returns what it stopped. Blocking: also for drops and exit paths.
pub fn stop_recorded(run_dir: &Path, grace: Duration) -> Vec<Recorded> {
    stop_where(run_dir, grace, |_| true)
}

/// [`stop_recorded`], for the processes of these names only.
pub fn stop_recorded_named(run_dir: &Path, names: &[&str], grace: Duration) -> Vec<Recorded> {
    stop_where(run_dir, grace, |process| {
        names.contains(&process.name.as_str())
    })
}

fn stop_where(run_dir: &Path, grace: Duration, which: impl Fn(&Recorded) -> bool) -> Vec<Recorded> {
    let mut stopped = Vec::new();
    for process in recorded(run_dir)
        .into_iter()
        .filter(|process| which(process))
    {
        if process.alive() {
            stop_blocking(&process, grace);
            stopped.push(process.clone());
        }
        let _ = std::fs::remove_file(run_dir.join(format!("{}.pid", process.name)));
    }
    stopped
}

fn stop_blocking(process: &Recorded, grace: Duration) {
    let kill = |signal: &str| {
        let _ = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(process.pid.to_string())
            .stderr(Stdio::null())
            .status();
    };
    kill("TERM");
    let deadline = Instant::now() + grace;
    while process.alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    if process.alive() {
        kill("KILL");
        let deadline = Instant::now() + Duration::from_secs(5);
        while process.alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Whether process `pid` exists, is not a zombie, and its command name is `comm`.
pub fn alive(pid: u32, comm: &str) -> bool {
    let Ok(name) = std::fs::read_to_string(format!("/proc/{pid}/comm")) else {
        return false;
    };
    if name.trim_end() != comm {
        return false;
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The fields after "pid (comm) "; the first is the state.
    let state = stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next());
    state != Some(Some('Z'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_files_name_their_process_and_old_ones_are_still_read() {
        let dir = std::env::temp_dir().join(format!("allot-kit-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("functional-api.pid"), "12 allot-api\n").unwrap();
        std::fs::write(dir.join("chaos-a-worker.pid"), "13\n").unwrap();
        std::fs::write(dir.join("mystery.pid"), "14\n").unwrap();
        std::fs::write(dir.join("garbage.pid"), "x\n").unwrap();
        let found = recorded(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            found,
            [
                Recorded {
                    name: "chaos-a-worker".into(),
                    pid: 13,
                    comm: "allot-worker".into()
                },
                Recorded {
                    name: "functional-api".into(),
                    pid: 12,
                    comm: "allot-api".into()
                },
            ]
        );
    }

    #[test]
    fn only_a_live_process_with_the_recorded_name_is_alive() {
        let me = std::process::id();
        let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
        assert!(alive(me, comm.trim_end()));
        assert!(!alive(me, "allot-api"));
        assert!(!alive(u32::MAX, "allot-api"));
        assert_eq!(
            command_name(Path::new("/x/a-binary-with-a-long-name")),
            "a-binary-with-a"
        );
    }
}
