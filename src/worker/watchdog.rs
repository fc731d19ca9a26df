//! The worker's watchdog: a small companion process that stops the worker's attempts
//! when the worker dies without stopping them itself (SIGKILL, OOM kill, a crash).
//!
//! Without it, a SIGKILLed worker's attempts would go on running, in their own process
//! groups, while tasklog ends them as `interruption` and may retry them elsewhere: two
//! copies of one task at once. The ledger ([`super::ledger`]) stops such leftovers when
//! the worker restarts; the watchdog stops them at once, restart or not.
//!
//! The worker starts `tasklog worker-watchdog` with a pipe as its stdin and tells it,
//! one line each, which process groups run which attempts (`+ <pgid> <task id>`) and
//! which have ended (`- <pgid>`). The kernel closes the pipe when the worker exits, however
//! it exits; on that end-of-file the watchdog sends SIGTERM to every group it still
//! knows (only if its leader still carries `TASKLOG_TASK_ID=<task id>`, so a reused process
//! id is never touched), gives them the worker's kill grace, SIGKILLs what is left, and
//! exits. After a clean drain there is nothing left to stop. The watchdog runs in its
//! own process group, so a Ctrl-C meant for the worker does not reach it.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::Path;
use std::process::{ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::process::{group_has_live_members, signal_group};

/// The name of the hidden CLI subcommand that runs [`watch`].
pub const SUBCOMMAND: &str = "worker-watchdog";

/// One line of the worker → watchdog protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    /// Process group `pgid` runs an attempt of task `task`.
    Started {
        /// The attempt's process group.
        pgid: i32,
        /// Its task.
        task: Uuid,
    },
    /// Process group `pgid` has ended (its attempt is over).
    Ended {
        /// The attempt's process group.
        pgid: i32,
    },
}

impl Message {
    /// The line that carries it (with its newline).
    pub fn line(&self) -> String {
        match self {
            Message::Started { pgid, task } => format!("+ {pgid} {task}\n"),
            Message::Ended { pgid } => format!("- {pgid}\n"),
        }
    }

    /// Parses a line; `None` for anything else (ignored, never fatal).
    pub fn parse(line: &str) -> Option<Message> {
        let mut parts = line.split_whitespace();
        let kind = parts.next()?;
        let pgid = parts.next()?.parse::<i32>().ok().filter(|p| *p > 1)?;
        match kind {
            "+" => Some(Message::Started {
                pgid,
                task: Uuid::parse_str(parts.next()?).ok()?,
            }),
            "-" => Some(Message::Ended { pgid }),
            _ => None,
        }
    }
}

/// The groups still running after `lines` (the worker's messages, in order).
pub fn still_running(lines: impl IntoIterator<Item = String>) -> BTreeMap<i32, Uuid> {
    let mut running = BTreeMap::new();
    for line in lines {
        match Message::parse(&line) {
            Some(Message::Started { pgid, task }) => {
                running.insert(pgid, task);
            }
            Some(Message::Ended { pgid }) => {
                running.remove(&pgid);
            }
            None => {}
        }
    }
    running
}

/// The watchdog process's body: reads messages from `input` until end-of-file, then
/// stops the groups still running (SIGTERM, `grace`, SIGKILL). Returns how many groups
/// it stopped.
pub fn watch(input: impl BufRead, grace: Duration) -> usize {
    let running = still_running(input.lines().map_while(Result::ok));
    let ours: Vec<i32> = running
        .iter()
        .filter(|(pgid, task)| super::ledger::runs_task(**pgid, task))
        .map(|(pgid, _)| *pgid)
        .collect();
    for pgid in &ours {
        signal_group(*pgid, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && ours.iter().any(|pgid| group_has_live_members(*pgid)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for pgid in ours.iter().filter(|pgid| group_has_live_members(**pgid)) {
        signal_group(*pgid, libc::SIGKILL);
    }
    ours.len()
}

/// The worker's end of a running watchdog.
pub struct Watchdog {
    stdin: Mutex<Option<ChildStdin>>,
    pid: u32,
}

impl Watchdog {
    /// Starts `program worker-watchdog --grace-ms <grace>` (normally the tasklog binary
    /// itself) in its own process group.
    pub fn spawn(program: &Path, grace: Duration) -> std::io::Result<Watchdog> {
        use std::os::unix::process::CommandExt;
        let mut child = Command::new(program)
            .arg(SUBCOMMAND)
            .arg("--grace-ms")
            .arg(grace.as_millis().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .process_group(0)
            .spawn()?;
        // It exits by itself when the pipe closes; nothing waits for it before this
        // process ends (dropping a `Child` neither kills nor waits).
        Ok(Watchdog {
            stdin: Mutex::new(child.stdin.take()),
            pid: child.id(),
        })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Tells the watchdog about a started or ended attempt. If it is gone, says so once
    /// in the log and goes on (the ledger still covers a restart).
    pub fn tell(&self, message: Message) {
        let mut stdin = self.stdin.lock().unwrap_or_else(|e| e.into_inner());
        let Some(pipe) = stdin.as_mut() else {
            return;
        };
        if let Err(e) = pipe.write_all(message.line().as_bytes()) {
            tracing::warn!(error = %e, "worker: the watchdog is gone; a crash of this worker would leave its attempts running until it restarts");
            *stdin = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_junk_is_ignored() {
        let task = Uuid::now_v7();
        for m in [
            Message::Started { pgid: 42, task },
            Message::Ended { pgid: 42 },
        ] {
            assert_eq!(Message::parse(&m.line()), Some(m));
        }
        for junk in [
            "",
            "+",
            "+ 42",
            "+ x 42",
            "* 42",
            "- 1",
            "- 0",
            "- -5",
            "+ 42 nope",
        ] {
            assert_eq!(Message::parse(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn still_running_follows_starts_and_ends() {
        let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let lines = [
            Message::Started { pgid: 10, task: a }.line(),
            Message::Started { pgid: 11, task: b }.line(),
            "garbage".to_owned(),
            Message::Ended { pgid: 10 }.line(),
            Message::Started { pgid: 12, task: c }.line(),
        ];
        let running = still_running(lines.iter().map(|l| l.trim_end().to_owned()));
        assert_eq!(running, BTreeMap::from([(11, b), (12, c)]));
    }

    /// The watchdog stops the groups it was told about when its input ends, SIGKILLing
    /// one that ignores SIGTERM after the grace, and leaves strangers alone.
    #[test]
    fn at_end_of_input_it_stops_recorded_groups_only() {
        use std::os::unix::process::ExitStatusExt;
        let task = Uuid::now_v7();
        let mut stubborn =
            super::super::ledger::tests::started_group(Some(&task), "trap '' TERM; ");
        let mut polite = super::super::ledger::tests::started_group(Some(&task), "");
        let mut stranger = super::super::ledger::tests::started_group(None, "");
        let input = [
            Message::Started {
                pgid: stubborn.id() as i32,
                task,
            }
            .line(),
            Message::Started {
                pgid: polite.id() as i32,
                task,
            }
            .line(),
            Message::Started {
                pgid: stranger.id() as i32,
                task: Uuid::now_v7(),
            }
            .line(),
        ]
        .concat();
        let stopped = watch(std::io::Cursor::new(input), Duration::from_millis(300));
        assert_eq!(stopped, 2);
        assert_eq!(polite.wait().unwrap().signal(), Some(libc::SIGTERM));
        assert_eq!(stubborn.wait().unwrap().signal(), Some(libc::SIGKILL));
        assert!(
            stranger.try_wait().unwrap().is_none(),
            "not ours: left alone"
        );
        let _ = stranger.kill();
        let _ = stranger.wait();
    }
}
