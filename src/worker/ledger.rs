//! The worker's ledger of running attempts, kept in a small file so that an agent
//! restarted after a crash (or a SIGKILL) can stop the process groups its previous
//! incarnation left behind: tasklog has ended those attempts as interrupted (and may
//! have retried them elsewhere), so they must not go on running.
//!
//! A line per attempt: `<pgid> <task id> <attempt>`. A group is killed only if its
//! leader still carries `TASKLOG_TASK_ID=<task id>` in its environment, so a process
//! id reused by something else is never touched.
//!
//! The ledger also keeps the worker's [`Watchdog`] informed, which stops the attempts
//! as soon as the worker dies; the file covers the case where both were killed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use uuid::Uuid;

use super::watchdog::{Message, Watchdog};

/// Running attempts of this agent, mirrored to a file (and to its watchdog, if any).
pub struct Ledger {
    path: PathBuf,
    entries: Mutex<BTreeMap<i32, (Uuid, u32)>>,
    watchdog: Option<Watchdog>,
}

impl Ledger {
    /// The ledger at `path` (created when needed).
    pub fn new(path: PathBuf) -> Ledger {
        Ledger {
            path,
            entries: Mutex::new(BTreeMap::new()),
            watchdog: None,
        }
    }

    /// The same ledger, also telling `watchdog` which attempts run.
    pub fn with_watchdog(self, watchdog: Watchdog) -> Ledger {
        Ledger {
            watchdog: Some(watchdog),
            ..self
        }
    }

    /// The default place: `<state dir>/worker-<name>.attempts`, with the state dir
    /// `$XDG_STATE_HOME/tasklog` or `$HOME/.local/state/tasklog` (or the temp dir).
    pub fn default_path(name: &str) -> PathBuf {
        state_base()
            .join("tasklog")
            .join(format!("worker-{name}.attempts"))
    }

    /// Kills the process groups a previous incarnation recorded and that still run
    /// its attempts; returns how many it killed. Then starts the ledger afresh.
    pub fn reap_leftovers(&self) -> usize {
        let mut killed = 0;
        if let Ok(text) = std::fs::read_to_string(&self.path) {
            for line in text.lines() {
                let mut parts = line.split_whitespace();
                let (Some(pgid), Some(task)) = (
                    parts.next().and_then(|p| p.parse::<i32>().ok()),
                    parts.next().and_then(|t| Uuid::parse_str(t).ok()),
                ) else {
                    continue;
                };
                if pgid > 1 && runs_task(pgid, &task) {
                    super::process::signal_group(pgid, libc::SIGKILL);
                    tracing::warn!(pgid, %task, "worker: killed an attempt left by a previous run");
                    killed += 1;
                }
            }
        }
        self.save(&BTreeMap::new());
        killed
    }

    /// Records a started attempt.
    pub fn add(&self, pgid: i32, task: Uuid, attempt: u32) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.insert(pgid, (task, attempt));
        self.save(&entries);
        if let Some(watchdog) = &self.watchdog {
            watchdog.tell(Message::Started { pgid, task });
        }
    }

    /// Forgets an ended attempt.
    pub fn remove(&self, pgid: i32) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.remove(&pgid);
        self.save(&entries);
        if let Some(watchdog) = &self.watchdog {
            watchdog.tell(Message::Ended { pgid });
        }
    }

    fn save(&self, entries: &BTreeMap<i32, (Uuid, u32)>) {
        let text: String = entries
            .iter()
            .map(|(pgid, (task, attempt))| format!("{pgid} {task} {attempt}\n"))
            .collect();
        if let Err(e) = write_atomically(&self.path, text.as_bytes()) {
            tracing::warn!(path = %self.path.display(), error = %e, "worker: cannot write the attempt ledger");
        }
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(tmp, path)
}

/// Whether process `pid` is running task `task` (its environment says so).
pub(crate) fn runs_task(pid: i32, task: &Uuid) -> bool {
    let needle = format!("TASKLOG_TASK_ID={task}");
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|env| env.split(|b| *b == 0).any(|v| v == needle.as_bytes()))
        .unwrap_or(false)
}

/// Where per-user state lives: `$XDG_STATE_HOME`, `$HOME/.local/state`, or the temp dir.
pub fn state_base() -> PathBuf {
    std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local").join("state")))
        .unwrap_or_else(std::env::temp_dir)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Starts `sh` in its own process group (optionally carrying `task` in its
    /// environment), running `prefix` and then waiting on its stdin, and returns once
    /// the shell has printed a line: by then its
    /// exec is complete and `/proc/<pid>/environ` shows its environment. (Right
    /// after `spawn` it may not yet: a vfork-based spawn returns while the kernel
    /// is still setting up the new image.)
    pub(crate) fn started_group(task: Option<&Uuid>, prefix: &str) -> std::process::Child {
        use std::io::BufRead;
        use std::os::unix::process::CommandExt;
        let mut command = std::process::Command::new("sh");
        command
            .args(["-c", &format!("{prefix}echo up; read -r never")])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .process_group(0);
        if let Some(task) = task {
            command.env("TASKLOG_TASK_ID", task.to_string());
        }
        let mut child = command.spawn().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line, "up\n");
        child
    }

    #[test]
    fn leftovers_are_killed_only_when_they_run_the_recorded_task() {
        use std::os::unix::process::ExitStatusExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.attempts");
        let task = Uuid::now_v7();
        let mut ours = started_group(Some(&task), "");
        let mut stranger = started_group(None, "");
        let ledger = Ledger::new(path.clone());
        ledger.add(ours.id() as i32, task, 1);
        ledger.add(stranger.id() as i32, Uuid::now_v7(), 1);
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 2);

        // A new incarnation reads the ledger the old one left.
        let restarted = Ledger::new(path.clone());
        assert_eq!(restarted.reap_leftovers(), 1);
        let status = ours.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        assert!(
            stranger.try_wait().unwrap().is_none(),
            "not ours: left alone"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
        let _ = stranger.kill();
        let _ = stranger.wait();
        restarted.add(5, task, 2);
        restarted.remove(5);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
    }
}
