//! Runs one task attempt as a child process.
//!
//! [`spawn`] starts the program in its own process group with stdin on `/dev/null` and
//! stdout/stderr piped. Two reader tasks split each pipe into [`OutputLine`]s (at most
//! [`MAX_LINE_BYTES`] each) and send them into a bounded channel. [`Running::wait`] waits
//! for the main process to end — by itself, by the timeout, or by the caller's cancel
//! future — then kills whatever is left of the process group and drains both pipes, so
//! that every byte written before the end arrives as lines, in order per stream.
//!
//! Signals always go to the whole process group. The main process is only reaped after
//! its group has been sent SIGKILL, so the group id cannot have been reused by an
//! unrelated process when we signal it.

use std::future::Future;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::pin::pin;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, warn};

/// Longest piece of output delivered as one [`OutputLine`]; longer lines arrive as
/// consecutive pieces of this size (the last one possibly shorter).
pub const MAX_LINE_BYTES: usize = 1024 * 1024;

/// Grace between SIGTERM and SIGKILL that callers use unless configured otherwise.
pub const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(10);

/// Capacity of each pipe's read buffer.
const READ_BUFFER_BYTES: usize = 64 * 1024;

/// Once the process group has been killed, a pipe that yields nothing for this long is
/// held open by a process that escaped the group; we stop reading it.
const DRAIN_IDLE_LIMIT: Duration = Duration::from_secs(2);

/// How often to look for the main process's exit when SIGCHLD cannot be subscribed to.
const EXIT_POLL_FALLBACK: Duration = Duration::from_millis(50);

/// What to run.
#[derive(Debug, Clone)]
pub struct Launch {
    /// Program followed by its arguments; a shell script is passed as `["sh", "-c", script]`.
    pub argv: Vec<String>,
    /// Variables added to (or overriding) the worker's own environment.
    pub env: Vec<(String, String)>,
    /// Directory to start in; the worker's own when `None`.
    pub working_dir: Option<PathBuf>,
    /// Longest the attempt may run, counted from spawn.
    pub timeout: Option<Duration>,
    /// Time between SIGTERM and SIGKILL when stopping the attempt.
    pub kill_grace: Duration,
}

impl Launch {
    /// A launch of `argv` with no extra environment, no working directory, no timeout
    /// and [`DEFAULT_KILL_GRACE`].
    pub fn new(argv: Vec<String>) -> Self {
        Self {
            argv,
            env: Vec::new(),
            working_dir: None,
            timeout: None,
            kill_grace: DEFAULT_KILL_GRACE,
        }
    }
}

/// Which pipe a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    /// The child's standard output.
    Stdout,
    /// The child's standard error.
    Stderr,
}

/// One line of output, without its trailing newline (a trailing "\r" is kept as is: bytes are exact).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputLine {
    /// Pipe the line was read from.
    pub stream: OutputStream,
    /// The line's bytes, at most [`MAX_LINE_BYTES`] of them.
    pub bytes: Vec<u8>,
}

/// Why the attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndedBy {
    /// The main process exited on its own.
    Exited,
    /// We stopped it because the timeout elapsed.
    Timeout,
    /// We stopped it because the caller cancelled.
    Cancelled,
}

/// How the attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    /// Exit code, when the main process exited normally.
    pub exit_code: Option<i32>,
    /// Signal number, when a signal ended the main process.
    pub signal: Option<i32>,
    /// Time from spawn until the main process ended.
    pub duration: Duration,
    /// Why it ended: by itself, or because we stopped it.
    pub ended_by: EndedBy,
}

/// Why an attempt could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// `argv` was empty, so there is no program to run.
    #[error("cannot start a process: argv is empty")]
    EmptyArgv,
    /// The program does not exist (or is not on `PATH`).
    #[error("program not found: {program}")]
    ProgramNotFound {
        /// The program as given in `argv[0]`.
        program: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The program exists but may not be executed.
    #[error("program is not executable: {program}: {source}")]
    NotExecutable {
        /// The program as given in `argv[0]`.
        program: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The working directory is missing, inaccessible or not a directory.
    #[error("working directory {}: {source}", dir.display())]
    WorkingDir {
        /// The requested working directory.
        dir: PathBuf,
        /// What is wrong with it.
        #[source]
        source: io::Error,
    },
    /// Any other failure to start the program.
    #[error("cannot start {program}: {source}")]
    Io {
        /// The program as given in `argv[0]`.
        program: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
}

/// A started attempt.
///
/// Dropping it without calling [`Running::wait`] sends SIGKILL to the process group.
pub struct Running {
    child: Child,
    pid: u32,
    /// Process group id; equal to `pid` because the child leads its own group.
    pgid: libc::pid_t,
    started: Instant,
    deadline: Option<Instant>,
    kill_grace: Duration,
    /// SIGCHLD notifications; `None` if they could not be subscribed to (then we poll).
    sigchld: Option<Signal>,
    /// Set to `true` (or dropped) once the group has been killed: readers then drain.
    group_killed: watch::Sender<bool>,
    readers: Vec<JoinHandle<()>>,
    /// Whether the main process has been reaped; after that its pid may be reused.
    reaped: bool,
}

/// Starts `launch` and streams its output lines into `lines`.
///
/// Must be called inside a Tokio runtime. The reader tasks own the only clones of
/// `lines`, so the channel closes once both pipes are drained.
pub fn spawn(launch: &Launch, lines: mpsc::Sender<OutputLine>) -> Result<Running, SpawnError> {
    let Some(program) = launch.argv.first() else {
        return Err(SpawnError::EmptyArgv);
    };
    if let Some(dir) = &launch.working_dir {
        check_working_dir(dir)?;
    }

    // Subscribe before the child exists so that no exit can go unnoticed.
    let sigchld = match signal(SignalKind::child()) {
        Ok(stream) => Some(stream),
        Err(error) => {
            warn!(%error, "cannot subscribe to SIGCHLD; polling for child exits");
            None
        }
    };

    let mut command = Command::new(program);
    command
        .args(&launch.argv[1..])
        .envs(launch.env.iter().map(|(key, value)| (key, value)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if let Some(dir) = &launch.working_dir {
        command.current_dir(dir);
    }

    let mut child = command
        .spawn()
        .map_err(|source| spawn_error(program, launch, source))?;
    let started = Instant::now();

    let Some(pid) = child.id() else {
        return Err(io_error(program, "child has no pid right after spawn"));
    };
    let Some(pgid) = libc::pid_t::try_from(pid).ok().filter(|&id| id > 1) else {
        return Err(io_error(
            program,
            "child pid does not fit a process group id",
        ));
    };
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        signal_group(pgid, libc::SIGKILL);
        return Err(io_error(program, "child pipes are missing"));
    };
    debug!(pid, program = %program, "spawned attempt process");

    let (group_killed, killed_rx) = watch::channel(false);
    let readers = vec![
        tokio::spawn(pump_lines(
            OutputStream::Stdout,
            stdout,
            lines.clone(),
            killed_rx.clone(),
        )),
        tokio::spawn(pump_lines(OutputStream::Stderr, stderr, lines, killed_rx)),
    ];

    Ok(Running {
        child,
        pid,
        pgid,
        started,
        deadline: launch
            .timeout
            .and_then(|timeout| started.checked_add(timeout)),
        kill_grace: launch.kill_grace,
        sigchld,
        group_killed,
        readers,
        reaped: false,
    })
}

impl Running {
    /// Process id of the main process (also its process group id).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits until the process has ended AND every line of its stdout and stderr has been sent into `lines`.
    ///
    /// `cancel` resolving starts the cancel sequence (SIGTERM to the process group, up to
    /// `kill_grace` for the main process to exit, then SIGKILL) and the result is
    /// [`EndedBy::Cancelled`]; pass `std::future::pending()` for "never". The timeout,
    /// counted from spawn, does the same with [`EndedBy::Timeout`]. If the main process
    /// exits first, the result is [`EndedBy::Exited`]. Either way the whole group is then
    /// sent SIGKILL so that leftover background processes cannot hold the pipes open.
    /// If this future is dropped before completing, the group is killed.
    ///
    /// The receiver of `lines` must be read concurrently (or dropped): a full channel
    /// holds the readers, and this waits for them.
    pub async fn wait(mut self, cancel: impl Future<Output = ()>) -> Exit {
        self.finish(cancel, std::future::pending()).await
    }

    /// As [`Running::wait`], but `kill` resolving — before the cancel sequence or
    /// during its grace — sends SIGKILL to the process group at once instead of waiting
    /// out the grace; the result is then [`EndedBy::Cancelled`] (unless the process had
    /// already exited by itself or timed out).
    pub async fn wait_or_kill(
        mut self,
        cancel: impl Future<Output = ()>,
        kill: impl Future<Output = ()>,
    ) -> Exit {
        self.finish(cancel, kill).await
    }

    /// Body of [`Running::wait`]; borrowing lets `Drop` still run if it is abandoned.
    async fn finish(
        &mut self,
        cancel: impl Future<Output = ()>,
        kill: impl Future<Output = ()>,
    ) -> Exit {
        let mut cancel = pin!(cancel);
        let mut kill = pin!(kill);
        let deadline = self.deadline;
        let (ended_by, killed) = tokio::select! {
            biased;
            () = self.main_process_exit() => (EndedBy::Exited, false),
            () = &mut kill => (EndedBy::Cancelled, true),
            () = &mut cancel => (EndedBy::Cancelled, false),
            () = sleep_until_deadline(deadline) => (EndedBy::Timeout, false),
        };
        if killed {
            debug!(pid = self.pid, "killing attempt process group at once");
            signal_group(self.pgid, libc::SIGKILL);
            self.main_process_exit().await;
        } else if ended_by != EndedBy::Exited {
            self.stop(ended_by, kill).await;
        }
        let duration = self.started.elapsed();

        // The main process is a zombie now, so its group id is still ours to signal.
        signal_group(self.pgid, libc::SIGKILL);
        let (exit_code, signal) = match self.child.wait().await {
            Ok(status) => {
                self.reaped = true;
                (status.code(), status.signal())
            }
            Err(error) => {
                warn!(pid = self.pid, %error, "cannot reap attempt process");
                (None, None)
            }
        };
        // Receivers only disappear when the readers are done; nothing to do then.
        let _ = self.group_killed.send(true);
        for reader in std::mem::take(&mut self.readers) {
            if let Err(error) = reader.await {
                warn!(pid = self.pid, %error, "output reader task failed");
            }
        }
        debug!(
            pid = self.pid,
            ?exit_code,
            ?signal,
            ?ended_by,
            "attempt process ended"
        );
        Exit {
            exit_code,
            signal,
            duration,
            ended_by,
        }
    }

    /// SIGTERM to the group, up to `kill_grace` for the main process to exit (cut short
    /// when `kill` resolves), then SIGKILL.
    async fn stop(&mut self, reason: EndedBy, kill: std::pin::Pin<&mut impl Future<Output = ()>>) {
        debug!(pid = self.pid, ?reason, "stopping attempt process group");
        signal_group(self.pgid, libc::SIGTERM);
        let grace = self.kill_grace;
        let exited = tokio::select! {
            exited = tokio::time::timeout(grace, self.main_process_exit()) => exited.is_ok(),
            () = kill => false,
        };
        if !exited {
            debug!(
                pid = self.pid,
                "grace elapsed; killing attempt process group"
            );
            signal_group(self.pgid, libc::SIGKILL);
            self.main_process_exit().await;
        }
    }

    /// Resolves once the main process has exited, without reaping it. Cancel-safe.
    async fn main_process_exit(&mut self) {
        loop {
            match has_exited_unreaped(self.pid) {
                Ok(true) => return,
                Ok(false) => {}
                Err(error) => {
                    // Cannot observe it without reaping; let `Child::wait` take over.
                    warn!(pid = self.pid, %error, "cannot poll attempt process state");
                    return;
                }
            }
            let notified = match &mut self.sigchld {
                Some(sigchld) => sigchld.recv().await.is_some(),
                None => false,
            };
            if !notified {
                self.sigchld = None;
                tokio::time::sleep(EXIT_POLL_FALLBACK).await;
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.reaped {
            // Not reaped yet, so the group id still belongs to this attempt.
            signal_group(self.pgid, libc::SIGKILL);
        }
    }
}

/// Resolves at `deadline`, or never when there is none.
async fn sleep_until_deadline(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Sends `signal` to process group `pgid`, ignoring groups that are already gone.
pub(super) fn signal_group(pgid: libc::pid_t, signal: libc::c_int) {
    // killpg(0 or 1, …) would hit our own group or every process.
    if pgid <= 1 {
        return;
    }
    // SAFETY: killpg takes plain integers and touches no memory of ours.
    let result = unsafe { libc::killpg(pgid, signal) };
    if result != 0 {
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::ESRCH) {
            warn!(pgid, signal, %error, "cannot signal attempt process group");
        }
    }
}

/// Whether any member of group `pgid` still runs. Zombies do not count: whoever is to
/// reap them may be slow to (the worker's watchdog waits for attempts whose parent, the
/// worker, is dead), or never do it (a bare pid 1 in a container).
pub(super) fn group_has_live_members(pgid: i32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        // SAFETY: signal 0 only checks that the group exists; no memory effects.
        return unsafe { libc::killpg(pgid, 0) == 0 };
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .any(|stat| live_member_of(&stat, pgid))
}

/// Whether a `/proc/<pid>/stat` line is of a live (not zombie or dead) member of group `pgid`.
fn live_member_of(stat: &str, pgid: i32) -> bool {
    // `pid (comm) state ppid pgrp ...`; comm may hold spaces and parentheses.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return false;
    };
    let mut fields = rest.split_whitespace();
    let state = fields.next();
    let group = fields.nth(1).and_then(|g| g.parse::<i32>().ok());
    group == Some(pgid) && !matches!(state, Some("Z") | Some("X"))
}

/// Whether child `pid` has exited, leaving it unreaped (a zombie) if so.
fn has_exited_unreaped(pid: u32) -> io::Result<bool> {
    loop {
        // SAFETY: siginfo_t is a plain C struct for which all-zero bytes are a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a valid, writable siginfo_t; WNOHANG makes the call return at
        // once and WNOWAIT leaves the child waitable, so tokio's `Child::wait` still reaps it.
        let result = unsafe {
            libc::waitid(
                libc::P_PID,
                pid,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        if result == 0 {
            // SAFETY: waitid filled `info` for a SIGCHLD-style report; si_pid stays zero
            // when the child has not exited yet.
            return Ok(unsafe { info.si_pid() } != 0);
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// Fails unless `dir` exists and is a directory, so the error can name the directory.
fn check_working_dir(dir: &std::path::Path) -> Result<(), SpawnError> {
    match std::fs::metadata(dir) {
        Ok(metadata) if metadata.is_dir() => Ok(()),
        Ok(_) => Err(SpawnError::WorkingDir {
            dir: dir.to_path_buf(),
            source: io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
        }),
        Err(source) => Err(SpawnError::WorkingDir {
            dir: dir.to_path_buf(),
            source,
        }),
    }
}

/// Turns a failed spawn of `program` into the error that says what went wrong.
fn spawn_error(program: &str, launch: &Launch, source: io::Error) -> SpawnError {
    let program = program.to_owned();
    match source.kind() {
        io::ErrorKind::NotFound => match &launch.working_dir {
            // The directory was checked, but may have vanished since.
            Some(dir) if !dir.is_dir() => SpawnError::WorkingDir {
                dir: dir.clone(),
                source,
            },
            _ => SpawnError::ProgramNotFound { program, source },
        },
        io::ErrorKind::PermissionDenied => SpawnError::NotExecutable { program, source },
        _ => SpawnError::Io { program, source },
    }
}

/// An [`SpawnError::Io`] for `program` with a plain message.
fn io_error(program: &str, message: &str) -> SpawnError {
    SpawnError::Io {
        program: program.to_owned(),
        source: io::Error::other(message.to_owned()),
    }
}

/// Result of one step of filling the current line.
enum Fill {
    /// A newline ended the line (the newline is consumed, not stored).
    Newline,
    /// The line reached [`MAX_LINE_BYTES`] without a newline.
    Full,
    /// Bytes were added; the line continues.
    More,
    /// The pipe is closed.
    Eof,
}

/// Moves the next available bytes from `reader` into `line`. Cancel-safe: nothing is
/// consumed unless it was stored.
async fn fill_line<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    line: &mut Vec<u8>,
) -> io::Result<Fill> {
    let available = reader.fill_buf().await?;
    if available.is_empty() {
        return Ok(Fill::Eof);
    }
    let room = MAX_LINE_BYTES.saturating_sub(line.len());
    let window = &available[..available.len().min(room)];
    if let Some(newline_at) = window.iter().position(|&byte| byte == b'\n') {
        line.extend_from_slice(&window[..newline_at]);
        reader.consume(newline_at + 1);
        return Ok(Fill::Newline);
    }
    let taken = window.len();
    line.extend_from_slice(window);
    reader.consume(taken);
    Ok(if line.len() >= MAX_LINE_BYTES {
        Fill::Full
    } else {
        Fill::More
    })
}

/// Sends lines to a receiver that may have gone away, after which lines are discarded.
struct LineSink {
    stream: OutputStream,
    lines: mpsc::Sender<OutputLine>,
    receiver_open: bool,
}

impl LineSink {
    /// Sends one line, or drops it once the receiver is gone.
    async fn deliver(&mut self, bytes: Vec<u8>) {
        if !self.receiver_open {
            return;
        }
        let line = OutputLine {
            stream: self.stream,
            bytes,
        };
        if self.lines.send(line).await.is_err() {
            debug!(stream = ?self.stream, "output receiver gone; discarding further lines");
            self.receiver_open = false;
        }
    }
}

/// Reads `pipe` to its end, sending each line (or [`MAX_LINE_BYTES`] piece) into `lines`.
///
/// Once `group_killed` turns true (or its sender is dropped), a pipe that stays silent
/// for [`DRAIN_IDLE_LIMIT`] is abandoned: only a process outside the group can hold it.
async fn pump_lines<R: AsyncRead + Unpin>(
    stream: OutputStream,
    pipe: R,
    lines: mpsc::Sender<OutputLine>,
    mut group_killed: watch::Receiver<bool>,
) {
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, pipe);
    let mut sink = LineSink {
        stream,
        lines,
        receiver_open: true,
    };
    let mut line = Vec::new();
    // A newline right after a full piece ends that piece rather than an empty line.
    let mut after_full_piece = false;
    let mut draining = false;
    loop {
        let fill = if draining {
            match tokio::time::timeout(DRAIN_IDLE_LIMIT, fill_line(&mut reader, &mut line)).await {
                Ok(fill) => fill,
                Err(_) => {
                    warn!(
                        ?stream,
                        "pipe still open after the process group was killed; abandoning it"
                    );
                    Ok(Fill::Eof)
                }
            }
        } else {
            tokio::select! {
                fill = fill_line(&mut reader, &mut line) => fill,
                changed = group_killed.changed() => {
                    draining = changed.is_err() || *group_killed.borrow();
                    continue;
                }
            }
        };
        match fill {
            Ok(Fill::Newline) => {
                if line.is_empty() && after_full_piece {
                    after_full_piece = false;
                } else {
                    after_full_piece = false;
                    sink.deliver(std::mem::take(&mut line)).await;
                }
            }
            Ok(Fill::Full) => {
                after_full_piece = true;
                sink.deliver(std::mem::take(&mut line)).await;
            }
            Ok(Fill::More) => {}
            Ok(Fill::Eof) => break,
            Err(error) => {
                warn!(?stream, %error, "cannot read attempt output");
                break;
            }
        }
    }
    if !line.is_empty() {
        sink.deliver(line).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(argv: &[&str]) -> Launch {
        Launch::new(argv.iter().map(|arg| (*arg).to_owned()).collect())
    }

    fn sh(script: &str) -> Launch {
        launch(&["sh", "-c", script])
    }

    fn text(line: &OutputLine) -> String {
        String::from_utf8_lossy(&line.bytes).into_owned()
    }

    /// Runs `launch` to the end with a cancel future, collecting every line.
    async fn run_with(
        launch: &Launch,
        cancel: impl Future<Output = ()>,
    ) -> (Exit, Vec<OutputLine>) {
        let (sender, mut receiver) = mpsc::channel(64);
        let running = spawn(launch, sender).expect("spawn");
        let collector = tokio::spawn(async move {
            let mut lines = Vec::new();
            while let Some(line) = receiver.recv().await {
                lines.push(line);
            }
            lines
        });
        let exit = running.wait(cancel).await;
        let lines = collector.await.expect("collector");
        (exit, lines)
    }

    async fn run(launch: &Launch) -> (Exit, Vec<OutputLine>) {
        run_with(launch, std::future::pending()).await
    }

    /// Spawns `launch`, resolves cancel once a line equal to `marker` arrives.
    async fn run_cancelled_after(launch: &Launch, marker: &str) -> (u32, Exit, Vec<OutputLine>) {
        let (sender, mut receiver) = mpsc::channel(64);
        let running = spawn(launch, sender).expect("spawn");
        let pid = running.pid();
        let (seen_tx, seen_rx) = tokio::sync::oneshot::channel::<()>();
        let marker = marker.as_bytes().to_vec();
        let collector = tokio::spawn(async move {
            let mut seen_tx = Some(seen_tx);
            let mut lines = Vec::new();
            while let Some(line) = receiver.recv().await {
                if line.bytes == marker
                    && let Some(seen) = seen_tx.take()
                {
                    let _ = seen.send(());
                }
                lines.push(line);
            }
            lines
        });
        let exit = running
            .wait(async move {
                let _ = seen_rx.await;
            })
            .await;
        let lines = collector.await.expect("collector");
        (pid, exit, lines)
    }

    fn process_exists(pid: u32) -> bool {
        let pid = libc::pid_t::try_from(pid).expect("pid fits");
        // SAFETY: kill with signal 0 only checks for existence.
        let result = unsafe { libc::kill(pid, 0) };
        result == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
    }

    #[test]
    fn group_members_are_read_from_proc_stat_and_zombies_do_not_count() {
        let line = "4242 (my (odd) cmd) S 1 4240 4240 0 -1 4194560 98 0 0 0";
        assert!(live_member_of(line, 4240));
        assert!(!live_member_of(line, 4242));
        assert!(!live_member_of(&line.replace(") S ", ") Z "), 4240));
        assert!(!live_member_of("garbage", 4240));
    }

    /// Members killed with SIGKILL may take a moment to finish exiting; poll the real state.
    async fn assert_group_gone(pgid: u32) {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            if !group_has_live_members(pgid as i32) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "group {pgid} still has live members"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn lines_from_both_streams_including_unterminated_tail() {
        let (exit, lines) = run(&sh("echo a; echo b >&2; printf tail")).await;
        assert_eq!(exit.exit_code, Some(0));
        assert_eq!(exit.signal, None);
        assert_eq!(exit.ended_by, EndedBy::Exited);
        let stdout: Vec<String> = lines
            .iter()
            .filter(|line| line.stream == OutputStream::Stdout)
            .map(text)
            .collect();
        let stderr: Vec<String> = lines
            .iter()
            .filter(|line| line.stream == OutputStream::Stderr)
            .map(text)
            .collect();
        assert_eq!(stdout, ["a", "tail"]);
        assert_eq!(stderr, ["b"]);
    }

    #[tokio::test]
    async fn carriage_returns_and_empty_lines_are_kept() {
        let (_, lines) = run(&sh("printf 'x\\r\\n\\n\\ny\\n'")).await;
        let bytes: Vec<&[u8]> = lines.iter().map(|line| line.bytes.as_slice()).collect();
        assert_eq!(bytes, [&b"x\r"[..], b"", b"", b"y"]);
    }

    #[tokio::test]
    async fn exit_code_is_reported() {
        let (exit, lines) = run(&sh("exit 3")).await;
        assert_eq!(exit.exit_code, Some(3));
        assert_eq!(exit.signal, None);
        assert_eq!(exit.ended_by, EndedBy::Exited);
        assert!(lines.is_empty());
    }

    #[tokio::test]
    async fn fast_output_arrives_complete_and_in_order() {
        let (exit, lines) = run(&launch(&["seq", "1", "200000"])).await;
        assert_eq!(exit.exit_code, Some(0));
        assert_eq!(lines.len(), 200_000);
        for (index, line) in lines.iter().enumerate() {
            assert_eq!(line.stream, OutputStream::Stdout);
            assert_eq!(line.bytes, (index + 1).to_string().into_bytes());
        }
    }

    #[tokio::test]
    async fn env_and_working_dir_are_applied() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut launch = sh("echo $FOO; pwd -P");
        launch.env.push(("FOO".to_owned(), "bar baz".to_owned()));
        launch.working_dir = Some(dir.path().to_path_buf());
        let (exit, lines) = run(&launch).await;
        assert_eq!(exit.exit_code, Some(0));
        let expected_dir = dir.path().canonicalize().expect("canonicalize");
        let texts: Vec<String> = lines.iter().map(text).collect();
        assert_eq!(
            texts,
            ["bar baz".to_owned(), expected_dir.display().to_string()]
        );
    }

    #[tokio::test]
    async fn timeout_terminates_the_process() {
        let mut launch = launch(&["sleep", "30"]);
        launch.timeout = Some(Duration::from_millis(300));
        let (exit, _) = run(&launch).await;
        assert_eq!(exit.ended_by, EndedBy::Timeout);
        assert_eq!(exit.signal, Some(libc::SIGTERM));
        assert_eq!(exit.exit_code, None);
        assert!(exit.duration >= Duration::from_millis(300));
        assert!(
            exit.duration < Duration::from_secs(5),
            "{:?}",
            exit.duration
        );
    }

    #[tokio::test]
    async fn cancel_stops_the_whole_group() {
        let (pid, exit, lines) =
            run_cancelled_after(&sh("echo started; sleep 30"), "started").await;
        assert_eq!(exit.ended_by, EndedBy::Cancelled);
        assert!(
            exit.duration < Duration::from_secs(5),
            "{:?}",
            exit.duration
        );
        assert!(lines.iter().any(|line| line.bytes == b"started"));
        assert!(!process_exists(pid), "main process {pid} still exists");
        assert_group_gone(pid).await;
    }

    #[tokio::test]
    async fn ignored_sigterm_gets_sigkill_after_grace() {
        let mut launch = sh("trap '' TERM; echo ready; sleep 30");
        launch.kill_grace = Duration::from_millis(300);
        let (pid, exit, lines) = run_cancelled_after(&launch, "ready").await;
        assert_eq!(exit.ended_by, EndedBy::Cancelled);
        assert_eq!(exit.signal, Some(libc::SIGKILL));
        assert!(
            exit.duration < Duration::from_secs(5),
            "{:?}",
            exit.duration
        );
        assert!(lines.iter().any(|line| line.bytes == b"ready"));
        assert_group_gone(pid).await;
    }

    /// A process that ignores SIGTERM, cancelled with a 30 s grace: `kill` resolving
    /// (`kill_after` after the cancel, or before it when `None`) ends it with SIGKILL
    /// at once.
    async fn cancel_then_kill(kill_after: Option<Duration>) -> (u32, Exit) {
        let mut launch = sh("trap '' TERM; echo ready; sleep 30");
        launch.kill_grace = Duration::from_secs(30);
        let (sender, mut receiver) = mpsc::channel(64);
        let running = spawn(&launch, sender).expect("spawn");
        let pid = running.pid();
        let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while let Some(line) = receiver.recv().await {
                if line.bytes == b"ready" {
                    let _ = ready_tx.send(true);
                }
            }
        });
        let ready = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|r| *r).await;
        };
        let exit = match kill_after {
            Some(after) => {
                let cancel = ready(ready_rx.clone());
                let kill = async move {
                    ready(ready_rx).await;
                    tokio::time::sleep(after).await;
                };
                running.wait_or_kill(cancel, kill).await
            }
            None => {
                running
                    .wait_or_kill(std::future::pending(), ready(ready_rx))
                    .await
            }
        };
        (pid, exit)
    }

    #[tokio::test]
    async fn kill_during_the_grace_does_not_wait_it_out() {
        let (pid, exit) = cancel_then_kill(Some(Duration::from_millis(300))).await;
        assert_eq!(exit.ended_by, EndedBy::Cancelled);
        assert_eq!(exit.signal, Some(libc::SIGKILL));
        assert!(
            exit.duration >= Duration::from_millis(300) && exit.duration < Duration::from_secs(10),
            "{:?}",
            exit.duration
        );
        assert_group_gone(pid).await;
    }

    #[tokio::test]
    async fn kill_without_cancel_sends_sigkill_at_once() {
        let (pid, exit) = cancel_then_kill(None).await;
        assert_eq!(exit.ended_by, EndedBy::Cancelled);
        assert_eq!(exit.signal, Some(libc::SIGKILL));
        assert!(
            exit.duration < Duration::from_secs(10),
            "{:?}",
            exit.duration
        );
        assert_group_gone(pid).await;
    }

    #[tokio::test]
    async fn trapped_sigterm_exiting_cleanly_still_counts_as_cancelled() {
        let launch = sh("trap 'echo bye; exit 0' TERM; echo ready; while :; do sleep 1; done");
        let (_, exit, lines) = run_cancelled_after(&launch, "ready").await;
        assert_eq!(exit.ended_by, EndedBy::Cancelled);
        assert_eq!(exit.exit_code, Some(0));
        assert!(lines.iter().any(|line| line.bytes == b"bye"));
    }

    #[tokio::test]
    async fn background_grandchild_does_not_hold_wait() {
        let (sender, mut receiver) = mpsc::channel(64);
        let running = spawn(&sh("sleep 30 & echo done"), sender).expect("spawn");
        let pid = running.pid();
        let collector = tokio::spawn(async move {
            let mut lines = Vec::new();
            while let Some(line) = receiver.recv().await {
                lines.push(line);
            }
            lines
        });
        let waited =
            tokio::time::timeout(Duration::from_secs(5), running.wait(std::future::pending()))
                .await
                .expect("wait returned promptly");
        let lines = collector.await.expect("collector");
        assert_eq!(waited.ended_by, EndedBy::Exited);
        assert_eq!(waited.exit_code, Some(0));
        assert_eq!(lines.iter().map(text).collect::<Vec<_>>(), ["done"]);
        assert_group_gone(pid).await;
    }

    #[tokio::test]
    async fn process_escaping_the_group_cannot_hold_wait_forever() {
        // `setsid` moves the sleep into its own session, where it keeps the pipes open;
        // the script ends only once the move has happened (session id == its pid).
        let script = r#"setsid sleep 30 & pid=$!
            while [ "$(cut -d' ' -f6 /proc/$pid/stat)" != "$pid" ]; do :; done
            echo $pid"#;
        let (exit, lines) = tokio::time::timeout(Duration::from_secs(10), run(&sh(script)))
            .await
            .expect("wait gave up on the escaped pipe holder");
        assert_eq!(exit.ended_by, EndedBy::Exited);
        let escaped: libc::pid_t = text(&lines[0]).parse().expect("pid line");
        assert!(
            process_exists(escaped.unsigned_abs()),
            "escaped holder is alive"
        );
        // SAFETY: test cleanup; the pid is the escaped sleep we started.
        unsafe { libc::kill(escaped, libc::SIGKILL) };
    }

    #[tokio::test]
    async fn missing_program_is_reported_with_its_name() {
        let (sender, _receiver) = mpsc::channel(1);
        let error = spawn(&launch(&["no-such-program-tasklog-xyz"]), sender)
            .err()
            .expect("spawn must fail");
        assert!(
            matches!(error, SpawnError::ProgramNotFound { .. }),
            "{error:?}"
        );
        assert!(error.to_string().contains("no-such-program-tasklog-xyz"));
    }

    #[tokio::test]
    async fn empty_argv_is_rejected() {
        let (sender, _receiver) = mpsc::channel(1);
        let error = spawn(&Launch::new(Vec::new()), sender)
            .err()
            .expect("spawn must fail");
        assert!(matches!(error, SpawnError::EmptyArgv), "{error:?}");
    }

    #[tokio::test]
    async fn missing_working_dir_is_reported_with_its_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("absent");
        let mut launch = launch(&["true"]);
        launch.working_dir = Some(missing.clone());
        let (sender, _receiver) = mpsc::channel(1);
        let error = spawn(&launch, sender).err().expect("spawn must fail");
        assert!(matches!(error, SpawnError::WorkingDir { .. }), "{error:?}");
        assert!(error.to_string().contains(&missing.display().to_string()));
    }

    #[tokio::test]
    async fn non_executable_program_is_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("script.sh");
        std::fs::write(&script, "#!/bin/sh\necho hi\n").expect("write");
        let mut launch = launch(&[]);
        launch.argv = vec![script.display().to_string()];
        let (sender, _receiver) = mpsc::channel(1);
        let error = spawn(&launch, sender).err().expect("spawn must fail");
        assert!(
            matches!(error, SpawnError::NotExecutable { .. }),
            "{error:?}"
        );
        assert!(error.to_string().contains("script.sh"));
    }

    #[tokio::test]
    async fn long_line_arrives_in_one_mebibyte_pieces() {
        // 3 MiB of 'x' followed by a newline, then a short line.
        let launch = sh("head -c 3145728 /dev/zero | tr '\\0' x; echo; echo after");
        let (exit, lines) = run(&launch).await;
        assert_eq!(exit.exit_code, Some(0));
        let sizes: Vec<usize> = lines.iter().map(|line| line.bytes.len()).collect();
        assert_eq!(sizes, [MAX_LINE_BYTES, MAX_LINE_BYTES, MAX_LINE_BYTES, 5]);
        let joined: Vec<u8> = lines[..3]
            .iter()
            .flat_map(|line| line.bytes.iter().copied())
            .collect();
        assert_eq!(joined, vec![b'x'; 3 * MAX_LINE_BYTES]);
        assert_eq!(lines[3].bytes, b"after");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fast_output_on_a_multi_threaded_runtime() {
        let (exit, lines) = run(&launch(&["seq", "1", "200000"])).await;
        assert_eq!(exit.exit_code, Some(0));
        let expected: Vec<Vec<u8>> = (1..=200_000)
            .map(|number: u32| number.to_string().into_bytes())
            .collect();
        let received: Vec<Vec<u8>> = lines.into_iter().map(|line| line.bytes).collect();
        assert_eq!(received, expected);
    }

    #[tokio::test]
    async fn wait_future_is_send_for_use_in_spawned_tasks() {
        fn assert_send<T: Send>(value: T) -> T {
            value
        }
        let (sender, receiver) = mpsc::channel(8);
        drop(receiver);
        let running = spawn(&launch(&["true"]), sender).expect("spawn");
        let handle = tokio::spawn(assert_send(running.wait(std::future::pending())));
        let exit = handle.await.expect("join");
        assert_eq!(exit.exit_code, Some(0));
    }

    #[tokio::test]
    async fn unterminated_long_line_keeps_every_byte() {
        // 2 MiB + 3 bytes without any newline.
        let launch = sh("head -c 2097155 /dev/zero | tr '\\0' y");
        let (_, lines) = run(&launch).await;
        let sizes: Vec<usize> = lines.iter().map(|line| line.bytes.len()).collect();
        assert_eq!(sizes, [MAX_LINE_BYTES, MAX_LINE_BYTES, 3]);
        assert!(
            lines
                .iter()
                .all(|line| line.bytes.iter().all(|&byte| byte == b'y'))
        );
    }

    #[tokio::test]
    async fn dropped_receiver_does_not_block_the_child() {
        let (sender, receiver) = mpsc::channel(1);
        drop(receiver);
        let running = spawn(&launch(&["seq", "1", "100000"]), sender).expect("spawn");
        let exit = tokio::time::timeout(
            Duration::from_secs(10),
            running.wait(std::future::pending()),
        )
        .await
        .expect("wait returned");
        assert_eq!(exit.exit_code, Some(0));
        assert_eq!(exit.ended_by, EndedBy::Exited);
    }

    #[tokio::test]
    async fn dropping_running_kills_the_group() {
        let (sender, mut receiver) = mpsc::channel(64);
        let running = spawn(&sh("echo ready; sleep 30 & sleep 30"), sender).expect("spawn");
        let pid = running.pid();
        let first = receiver.recv().await.expect("first line");
        assert_eq!(first.bytes, b"ready");
        drop(running);
        // The channel closes only when every holder of the pipes is gone.
        let rest = tokio::time::timeout(Duration::from_secs(5), receiver.recv())
            .await
            .expect("pipes closed promptly");
        assert_eq!(rest, None);
        assert_group_gone(pid).await;
    }
}
