//! Running health probes of service replicas (the spec side is
//! [`crate::events::probe`]).
//!
//! [`check_once`] runs one check. [`Tracker`] turns a stream of check results into
//! [`Verdict`]s, and [`run`] ties them together: it checks every `interval`, calls its
//! `on_ready` callback once the replica has passed `ready_after` consecutive checks, and
//! returns [`Verdict::Unhealthy`] once it has failed `failure_threshold` consecutive
//! checks, whereupon the caller stops the replica.

use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;
use tokio::time::Instant;
use tracing::{debug, info, warn};

pub use crate::events::probe::{Check, MAX_DURATION, Probe};

/// Expands `${VAR}` from `env` (and leaves unknown ones empty). Only used for http urls.
///
/// When `env` names a variable more than once, the last value wins (as it would in a
/// process environment built from it). A `$` not followed by `{`, and an unterminated
/// `${`, are kept as they are.
pub fn expand(template: &str, env: &[(String, String)]) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("${") {
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            break;
        };
        out.push_str(&rest[..start]);
        let name = &after[..end];
        if let Some((_, value)) = env.iter().rev().find(|(k, _)| k == name) {
            out.push_str(value);
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
}

/// Runs one check: http = GET with the probe timeout, success iff status == expect_status;
/// command = spawn argv with `env` added to the environment (kill_on_drop), success iff exit
/// 0 within timeout.
///
/// The http url is first expanded from `env` with [`expand`]. The response body is not read.
/// `http` should be built without proxies (`no_proxy`), since probes usually target the
/// local host. A command runs with stdin, stdout and stderr on `/dev/null`; when it
/// outlives `timeout` it is killed (only the process itself, not processes it started) and
/// the check fails. Errors (bad url, connection refused, program not found) are failures,
/// logged at debug level.
pub async fn check_once(
    check: &Check,
    timeout: Duration,
    env: &[(String, String)],
    http: &reqwest::Client,
) -> bool {
    match check {
        Check::Http { url, expect_status } => {
            check_http(&expand(url, env), *expect_status, timeout, http).await
        }
        Check::Command { argv } => check_command(argv, timeout, env).await,
    }
}

async fn check_http(
    url: &str,
    expect_status: u16,
    timeout: Duration,
    http: &reqwest::Client,
) -> bool {
    let request = http.get(url).timeout(timeout).send();
    match tokio::time::timeout(timeout, request).await {
        Ok(Ok(response)) => {
            let status = response.status().as_u16();
            if status != expect_status {
                debug!(url, status, expect_status, "probe: unexpected status");
            }
            status == expect_status
        }
        Ok(Err(err)) => {
            debug!(url, error = %err, "probe: request failed");
            false
        }
        Err(_) => {
            debug!(url, ?timeout, "probe: request timed out");
            false
        }
    }
}

async fn check_command(argv: &[String], timeout: Duration, env: &[(String, String)]) -> bool {
    let Some((program, args)) = argv.split_first() else {
        debug!("probe: empty argv");
        return false;
    };
    let mut command = Command::new(program);
    command
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(err) => {
            debug!(program, error = %err, "probe: cannot start command");
            return false;
        }
    };
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => {
            if !status.success() {
                debug!(program, %status, "probe: command failed");
            }
            status.success()
        }
        Ok(Err(err)) => {
            debug!(program, error = %err, "probe: cannot wait for command");
            false
        }
        Err(_) => {
            debug!(program, ?timeout, "probe: command timed out");
            // Kill and reap it now; should that fail, kill_on_drop still applies.
            if child.start_kill().is_ok() {
                let _ = child.wait().await;
            }
            false
        }
    }
}

/// What the probe loop tells its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The replica passed `ready_after` consecutive checks for the first time.
    Ready,
    /// The replica failed `failure_threshold` consecutive checks.
    Unhealthy,
}

/// Pure state: counts consecutive results.
#[derive(Debug, Default)]
pub struct Tracker {
    successes: u32,
    failures: u32,
    ready: bool,
}

impl Tracker {
    /// Feeds one result; returns `Some(Ready)` exactly once, when `ready_after` consecutive
    /// successes are first reached; returns `Some(Unhealthy)` when `failure_threshold`
    /// consecutive failures are reached (at any time, before or after ready), and again on
    /// every further consecutive failure. A success resets the failure count and a failure
    /// resets the success count.
    pub fn observe(&mut self, probe: &Probe, success: bool) -> Option<Verdict> {
        if success {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            if !self.ready && self.successes >= probe.ready_after {
                self.ready = true;
                return Some(Verdict::Ready);
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.failures >= probe.failure_threshold {
                return Some(Verdict::Unhealthy);
            }
        }
        None
    }

    /// Whether `Ready` has been returned (it stays true once it has).
    pub fn is_ready(&self) -> bool {
        self.ready
    }
}

/// Runs checks every `interval` (the first one `initial_delay` after the call) until it
/// is unhealthy; calls `on_ready` once when ready.
///
/// Returns when unhealthy (the caller then stops the replica); never returns otherwise
/// (the caller drops/aborts it when the process ends). Failures before the first ready
/// count toward `failure_threshold` too, so a replica that never comes up becomes
/// unhealthy. Checks start `interval` apart; a check that takes longer delays the next,
/// which then starts right away. HTTP checks use a client without proxies that does not
/// follow redirects, so `expect_status` is compared with the first response.
pub async fn run(probe: &Probe, env: &[(String, String)], mut on_ready: impl FnMut()) -> Verdict {
    let http = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build();
    let http = match http {
        Ok(client) => Some(client),
        Err(err) => {
            warn!(error = %err, "probe: cannot build HTTP client; HTTP checks will fail");
            None
        }
    };
    let mut tracker = Tracker::default();
    let now = Instant::now();
    let mut next = now
        .checked_add(probe.initial_delay.min(MAX_DURATION))
        .unwrap_or(now);
    loop {
        tokio::time::sleep_until(next).await;
        let started = Instant::now();
        let success = match (&probe.check, &http) {
            (check, Some(client)) => check_once(check, probe.timeout, env, client).await,
            (Check::Command { argv }, None) => check_command(argv, probe.timeout, env).await,
            (Check::Http { .. }, None) => false,
        };
        match tracker.observe(probe, success) {
            Some(Verdict::Ready) => {
                info!("probe: replica is ready");
                on_ready();
            }
            Some(Verdict::Unhealthy) => {
                warn!(
                    failures = probe.failure_threshold,
                    ready = tracker.is_ready(),
                    "probe: replica is unhealthy"
                );
                return Verdict::Unhealthy;
            }
            None => {}
        }
        next = started
            .checked_add(probe.interval.min(MAX_DURATION))
            .unwrap_or(started);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn client() -> reqwest::Client {
        reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("build client")
    }

    #[test]
    fn expand_vars() {
        let e = env(&[("PORT", "8080"), ("A", "1"), ("B", "2")]);
        assert_eq!(expand("http://h:${PORT}/x", &e), "http://h:8080/x");
        assert_eq!(expand("${PORT}", &e), "8080");
        assert_eq!(expand("${A}x${B}", &e), "1x2");
        assert_eq!(expand("a${NOPE}b", &e), "ab");
        assert_eq!(expand("http://h/health", &e), "http://h/health");
        assert_eq!(expand("$PORT ${PORT", &e), "$PORT ${PORT");
        assert_eq!(expand("${A}", &env(&[("A", "1"), ("A", "2")])), "2");
    }

    #[test]
    fn tracker_ready_once_after_n_successes() {
        let mut probe = Probe::command(&["true"]);
        probe.ready_after = 3;
        let mut t = Tracker::default();
        assert_eq!(t.observe(&probe, true), None);
        assert_eq!(t.observe(&probe, false), None);
        assert_eq!(t.observe(&probe, true), None);
        assert_eq!(t.observe(&probe, true), None);
        assert!(!t.is_ready());
        assert_eq!(t.observe(&probe, true), Some(Verdict::Ready));
        assert!(t.is_ready());
        for _ in 0..5 {
            assert_eq!(t.observe(&probe, true), None);
        }
        assert_eq!(t.observe(&probe, false), None);
        for _ in 0..5 {
            assert_eq!(t.observe(&probe, true), None);
        }
        assert!(t.is_ready());
    }

    #[test]
    fn tracker_unhealthy_after_threshold() {
        let probe = Probe::command(&["true"]);
        // Before ready.
        let mut t = Tracker::default();
        assert_eq!(t.observe(&probe, false), None);
        assert_eq!(t.observe(&probe, false), None);
        assert_eq!(t.observe(&probe, false), Some(Verdict::Unhealthy));
        assert!(!t.is_ready());
        // After ready, with a success resetting the count.
        let mut t = Tracker::default();
        assert_eq!(t.observe(&probe, true), Some(Verdict::Ready));
        assert_eq!(t.observe(&probe, false), None);
        assert_eq!(t.observe(&probe, false), None);
        assert_eq!(t.observe(&probe, true), None);
        assert_eq!(t.observe(&probe, false), None);
        assert_eq!(t.observe(&probe, false), None);
        assert_eq!(t.observe(&probe, false), Some(Verdict::Unhealthy));
    }

    /// Serves every connection with `response` and closes it; returns the port.
    async fn serve(response: &'static str) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let _ = stream.write_all(response.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        port
    }

    fn http_check(expect_status: u16) -> Check {
        Check::Http {
            url: "http://127.0.0.1:${PORT}/health".to_owned(),
            expect_status,
        }
    }

    #[tokio::test]
    async fn check_once_http() {
        let ok = serve("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await;
        let down = serve("HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n").await;
        let http = client();
        let timeout = Duration::from_secs(2);
        let ok_env = env(&[("PORT", &ok.to_string())]);
        let down_env = env(&[("PORT", &down.to_string())]);
        assert!(check_once(&http_check(200), timeout, &ok_env, &http).await);
        assert!(!check_once(&http_check(200), timeout, &down_env, &http).await);
        assert!(check_once(&http_check(503), timeout, &down_env, &http).await);
        assert!(!check_once(&http_check(503), timeout, &ok_env, &http).await);

        // Connection refused: a port that was just free.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closed = listener.local_addr().unwrap().port();
        drop(listener);
        let closed_env = env(&[("PORT", &closed.to_string())]);
        assert!(!check_once(&http_check(200), timeout, &closed_env, &http).await);

        // A url that does not parse fails rather than panicking.
        let bad = Check::Http {
            url: "not a url".to_owned(),
            expect_status: 200,
        };
        assert!(!check_once(&bad, timeout, &[], &http).await);
    }

    #[tokio::test]
    async fn check_once_http_timeout() {
        // Accepts but never answers.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let started = Instant::now();
        let e = env(&[("PORT", &port.to_string())]);
        assert!(!check_once(&http_check(200), Duration::from_millis(200), &e, &client()).await);
        assert!(started.elapsed() < Duration::from_secs(1));
        server.abort();
    }

    #[tokio::test]
    async fn check_once_command() {
        let http = client();
        let t = Duration::from_secs(2);
        let run = |argv: &[&str]| Probe::command(argv).check;
        assert!(check_once(&run(&["true"]), t, &[], &http).await);
        assert!(!check_once(&run(&["false"]), t, &[], &http).await);
        let test_x = run(&["sh", "-c", "test \"$X\" = yes"]);
        assert!(check_once(&test_x, t, &env(&[("X", "yes")]), &http).await);
        assert!(!check_once(&test_x, t, &env(&[("X", "no")]), &http).await);
        assert!(!check_once(&run(&["/nonexistent/program"]), t, &[], &http).await);

        let started = Instant::now();
        let sleep = run(&["sleep", "5"]);
        assert!(!check_once(&sleep, Duration::from_millis(200), &[], &http).await);
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn first_check_waits_for_initial_delay() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("checks");
        let delay = Duration::from_millis(400);
        let probe = Probe {
            initial_delay: delay,
            interval: Duration::from_millis(50),
            ..Probe::command(&["sh", "-c", "echo x >> \"$LOG\""])
        };
        let e = env(&[("LOG", log.to_str().unwrap())]);
        let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
        let started = Instant::now();
        let task = tokio::spawn(async move {
            run(&probe, &e, move || {
                let _ = ready_tx.send(Instant::now());
            })
            .await
        });
        let ready_at = tokio::time::timeout(Duration::from_secs(10), ready_rx.recv())
            .await
            .expect("ready in time")
            .expect("on_ready called");
        task.abort();
        assert!(
            ready_at.duration_since(started) >= delay,
            "the first check ran {:?} after the start, before the {delay:?} initial delay",
            ready_at.duration_since(started)
        );
        assert!(std::fs::read_to_string(&log).unwrap().lines().count() >= 1);
    }

    #[tokio::test]
    async fn run_ready_then_unhealthy() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("up");
        let log = dir.path().join("checks");
        let count_checks = || {
            std::fs::read_to_string(&log)
                .map(|s| s.lines().count())
                .unwrap_or(0)
        };

        let threshold = 10;
        let probe = Probe {
            // Every check appends a line to `log`, so the test can count them.
            check: Check::Command {
                argv: vec![
                    "sh".into(),
                    "-c".into(),
                    "echo x >> \"$LOG\"; test -e \"$F\"".into(),
                ],
            },
            interval: Duration::from_millis(50),
            timeout: Duration::from_secs(2),
            failure_threshold: threshold,
            ready_after: 1,
            initial_delay: Duration::ZERO,
        };
        let e = env(&[
            ("F", file.to_str().unwrap()),
            ("LOG", log.to_str().unwrap()),
        ]);
        let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            run(&probe, &e, move || {
                let _ = ready_tx.send(());
            })
            .await
        });

        // Nothing can succeed while the file is missing. Once a second check has begun,
        // the first one has run (and failed) without it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while count_checks() < 2 {
            assert!(Instant::now() < deadline, "no second check within 5 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(ready_rx.try_recv().is_err(), "ready before the file exists");
        assert!(!task.is_finished(), "gave up before the file was created");
        std::fs::write(&file, b"").unwrap();
        tokio::time::timeout(Duration::from_secs(5), ready_rx.recv())
            .await
            .expect("ready in time")
            .expect("on_ready called");

        // Stay ready a little, then take the file away.
        tokio::time::sleep(Duration::from_millis(150)).await;
        std::fs::remove_file(&file).unwrap();
        let at_removal = count_checks();
        let verdict = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("unhealthy in time")
            .expect("task");
        assert_eq!(verdict, Verdict::Unhealthy);
        // The check in flight at removal may or may not have failed; all later ones did.
        let after = count_checks() - at_removal;
        let threshold = threshold as usize;
        assert!(
            (threshold - 1..=threshold).contains(&after),
            "{after} checks after removal, threshold {threshold}"
        );
        // on_ready was called exactly once (the sender is gone with the task).
        assert!(ready_rx.recv().await.is_none());
    }
}
