//! Client commands: talk to the tasklog API over HTTP.

use std::io::Read;

use anyhow::{Context, bail};
use serde_json::Value;

use super::{
    ApiArgs, CancelArgs, EventsArgs, GetArgs, LogsArgs, LsArgs, RunArgs, ServiceCommand,
    SubmitArgs, TraceArgs, WorkersArgs,
};

/// A thin JSON client for the API.
pub struct ApiClient {
    base: String,
    /// The HTTP client, with the token in its default headers.
    pub http: reqwest::Client,
}

use crate::events::trace::{TraceContext, parse_trace_id};

impl ApiClient {
    /// A client for the API at `args.url`.
    pub fn new(args: &ApiArgs) -> anyhow::Result<ApiClient> {
        let mut headers =
            crate::worker::bearer_headers(super::tokens::client_token(args).as_deref())?;
        // Inside a traced process (a task's, whose TRACEPARENT the worker sets), what the
        // CLI submits joins that trace.
        if let Some(parent) = TraceContext::read(std::env::var("TRACEPARENT").ok().as_deref())
            && let Ok(value) = reqwest::header::HeaderValue::from_str(&parent.to_string())
        {
            headers.insert("traceparent", value);
        }
        Ok(ApiClient {
            base: args.url.trim_end_matches('/').to_string(),
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(120))
                .default_headers(headers)
                .build()?,
        })
    }

    /// Sends a request and returns the JSON body, or the API's error as an error.
    pub async fn call(&self, request: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let response = request.send().await.with_context(|| {
            format!(
                "cannot reach the tasklog API at {} (is `tasklog up` running? set TASKLOG_API_URL)",
                self.base
            )
        })?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(body);
        }
        match (
            body["error"]["code"].as_str(),
            body["error"]["message"].as_str(),
        ) {
            (Some(code), Some(message)) => bail!("{code}: {message} (HTTP {status})"),
            _ => bail!("HTTP {status}"),
        }
    }

    /// The URL of `path` on the API.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

/// Reads a YAML or JSON spec (YAML is a superset of JSON).
pub fn read_spec(path: &std::path::Path) -> anyhow::Result<Value> {
    let text = if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s)?;
        s
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
    };
    parse_spec_text(&text).with_context(|| format!("{} is not valid YAML or JSON", path.display()))
}

/// Parses the text of a spec file: YAML or JSON (YAML is a superset of JSON).
pub fn parse_spec_text(text: &str) -> Result<Value, serde_yaml_ng::Error> {
    serde_yaml_ng::from_str(text)
}

/// Submits the spec in `file`; returns the task id.
async fn submit_file(
    client: &ApiClient,
    file: &std::path::Path,
    key: Option<&str>,
) -> anyhow::Result<String> {
    let spec = read_spec(file)?;
    let mut request = client.http.post(client.url("/v1/tasks")).json(&spec);
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    let body = client.call(request).await?;
    body["id"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("the API's answer has no task id: {body}"))
}

pub(super) async fn submit(args: SubmitArgs) -> anyhow::Result<()> {
    let client = ApiClient::new(&args.api)?;
    println!(
        "{}",
        submit_file(&client, &args.file, args.key.as_deref()).await?
    );
    Ok(())
}

/// `tasklog run`: submit, follow the logs until the task ends, and return its exit
/// code (1 for a task that failed without one, 130 for a cancelled one).
pub(super) async fn run(args: RunArgs) -> anyhow::Result<i32> {
    let client = ApiClient::new(&args.api)?;
    let id = submit_file(&client, &args.file, args.key.as_deref()).await?;
    eprintln!(
        "tasklog: task {id} submitted; following its logs (Ctrl-C detaches, the task goes on)"
    );
    // The logs endpoint knows the task once the projection has it.
    client
        .call(
            client
                .http
                .get(client.url(&format!("/v1/tasks/{id}")))
                .query(&[("wait_ms", 30_000)]),
        )
        .await?;
    logs(LogsArgs {
        id: Some(id.clone()),
        label: Vec::new(),
        service: None,
        follow: true,
        tail: None,
        attempt: None,
        stream: None,
        json: false,
        api: args.api.clone(),
    })
    .await?;
    let task = client
        .call(client.http.get(client.url(&format!("/v1/tasks/{id}"))))
        .await?;
    let state = task["state"].as_str().unwrap_or("unknown");
    let reason = task["reason"].as_str().unwrap_or("");
    eprintln!(
        "tasklog: task {id} {state}{}",
        if reason.is_empty() {
            String::new()
        } else {
            format!(" ({reason})")
        }
    );
    Ok(match state {
        "succeeded" => 0,
        "cancelled" => 130,
        _ => task["exit_code"]
            .as_i64()
            .filter(|c| *c != 0)
            .map(|c| c.clamp(1, 255) as i32)
            .unwrap_or(1),
    })
}

pub(super) async fn workers(args: WorkersArgs) -> anyhow::Result<()> {
    let client = ApiClient::new(&args.api)?;
    let body = client
        .call(client.http.get(client.url("/v1/workers")))
        .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(());
    }
    println!(
        "{:<24}  {:<8}  {:>11}  {:>19}  {:>7}  {:>5}  {:<24}  LABELS",
        "WORKER", "STATE", "CPU", "MEMORY", "GPU", "TASKS", "LAST HEARTBEAT"
    );
    for w in body["workers"].as_array().cloned().unwrap_or_default() {
        let gib = |v: &Value| v.as_f64().unwrap_or(0.0) / (1u64 << 30) as f64;
        let labels: Vec<String> = w["labels"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "{:<24}  {:<8}  {:>11}  {:>19}  {:>7}  {:>5}  {:<24}  {}",
            w["id"].as_str().unwrap_or(""),
            w["state"].as_str().unwrap_or(""),
            format!("{}/{}", w["used"]["cpu"], w["capacity"]["cpu"]),
            format!(
                "{:.1}/{:.1}GiB",
                gib(&w["used"]["memory"]),
                gib(&w["capacity"]["memory"])
            ),
            format!("{}/{}", w["used"]["gpu"], w["capacity"]["gpu"]),
            w["tasks"].as_array().map(Vec::len).unwrap_or(0),
            w["last_heartbeat_at"]
                .as_str()
                .unwrap_or("")
                .chars()
                .take(23)
                .collect::<String>(),
            labels.join(","),
        );
    }
    Ok(())
}

pub(super) async fn get(args: GetArgs) -> anyhow::Result<()> {
    let client = ApiClient::new(&args.api)?;
    let body = client
        .call(
            client
                .http
                .get(client.url(&format!("/v1/tasks/{}", args.id)))
                .query(&[("wait_ms", args.wait_ms)]),
        )
        .await?;
    println!("{}", serde_json::to_string_pretty(&body)?);
    Ok(())
}

pub(super) async fn ls(args: LsArgs) -> anyhow::Result<()> {
    let client = ApiClient::new(&args.api)?;
    let mut cursor: Option<String> = None;
    let mut shown = 0usize;
    if !args.json {
        println!(
            "{:<36}  {:<9}  {:<10}  {:>3}  {:<24}  NAME",
            "ID", "STATE", "TYPE", "PRI", "SUBMITTED"
        );
    }
    while shown < args.limit {
        let mut query: Vec<(&str, String)> =
            vec![("limit", (args.limit - shown).min(1000).to_string())];
        if let Some(s) = &args.state {
            query.push(("state", s.clone()));
        }
        if let Some(t) = &args.task_type {
            query.push(("type", t.clone()));
        }
        for l in &args.label {
            query.push(("label", l.clone()));
        }
        if let Some(c) = &cursor {
            query.push(("cursor", c.clone()));
        }
        let body = client
            .call(client.http.get(client.url("/v1/tasks")).query(&query))
            .await?;
        let tasks = body["tasks"].as_array().cloned().unwrap_or_default();
        for t in &tasks {
            if args.json {
                println!("{t}");
            } else {
                println!(
                    "{:<36}  {:<9}  {:<10}  {:>3}  {:<24}  {}",
                    t["id"].as_str().unwrap_or(""),
                    t["state"].as_str().unwrap_or(""),
                    t["spec"]["type"].as_str().unwrap_or("batch"),
                    t["spec"]["priority"].as_i64().unwrap_or(50),
                    t["submitted_at"]
                        .as_str()
                        .unwrap_or("")
                        .chars()
                        .take(23)
                        .collect::<String>(),
                    t["spec"]["name"].as_str().unwrap_or(""),
                );
            }
        }
        shown += tasks.len();
        match body["next_cursor"].as_str() {
            Some(c) if !tasks.is_empty() => cursor = Some(c.to_string()),
            _ => break,
        }
    }
    Ok(())
}

pub(super) async fn events(args: EventsArgs) -> anyhow::Result<()> {
    let client = ApiClient::new(&args.api)?;
    let body = client
        .call(
            client
                .http
                .get(client.url(&format!("/v1/tasks/{}/events", args.id))),
        )
        .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(());
    }
    println!(
        "{:>4}  {:<38}  {:<27}  {:>9}  SOURCE",
        "SEQ", "TYPE", "TIME", "P:OFFSET"
    );
    for e in body["events"].as_array().cloned().unwrap_or_default() {
        println!(
            "{:>4}  {:<38}  {:<27}  {:>9}  {}",
            e["seq"],
            e["type"].as_str().unwrap_or(""),
            e["time"].as_str().unwrap_or(""),
            format!("{}:{}", e["partition"], e["offset"]),
            e["source"].as_str().unwrap_or(""),
        );
    }
    Ok(())
}

pub(super) async fn trace(args: TraceArgs) -> anyhow::Result<()> {
    let client = ApiClient::new(&args.api)?;
    // A task id stands for the trace it was submitted in.
    let trace_id = match uuid::Uuid::parse_str(&args.id) {
        Ok(task) if parse_trace_id(&args.id).is_none() => {
            let body = client
                .call(client.http.get(client.url(&format!("/v1/tasks/{task}"))))
                .await?;
            let Some(tp) = body["traceparent"]
                .as_str()
                .and_then(|t| TraceContext::parse(t).ok())
            else {
                bail!("task {task} was submitted without a trace context");
            };
            tp.trace_id_hex()
        }
        _ => args.id.clone(),
    };
    let body = client
        .call(
            client
                .http
                .get(client.url(&format!("/v1/traces/{trace_id}"))),
        )
        .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(());
    }
    println!("trace {trace_id}");
    println!(
        "{:<36}  {:<10}  {:>10}  {:>10}  {:>8}  {:<27}  NAME",
        "TASK", "STATE", "QUEUED ms", "RUN ms", "ATTEMPTS", "SUBMITTED"
    );
    let ms = |v: &Value| {
        v.as_i64()
            .map_or_else(|| "-".to_string(), |n| n.to_string())
    };
    for t in body["tasks"].as_array().cloned().unwrap_or_default() {
        println!(
            "{:<36}  {:<10}  {:>10}  {:>10}  {:>8}  {:<27}  {}",
            t["task_id"].as_str().unwrap_or(""),
            t["state"].as_str().unwrap_or(""),
            ms(&t["queue_wait_ms"]),
            ms(&t["run_ms"]),
            t["attempts"],
            t["submitted_at"].as_str().unwrap_or(""),
            t["name"].as_str().unwrap_or(""),
        );
    }
    println!();
    println!(
        "{:<27}  {:<36}  {:>4}  {:<26}  {:>9}  SPAN",
        "TIME", "TASK", "SEQ", "TYPE", "P:OFFSET"
    );
    for e in body["events"].as_array().cloned().unwrap_or_default() {
        println!(
            "{:<27}  {:<36}  {:>4}  {:<26}  {:>9}  {}",
            e["time"].as_str().unwrap_or(""),
            e["task_id"].as_str().unwrap_or(""),
            e["seq"],
            e["type"]
                .as_str()
                .unwrap_or("")
                .trim_start_matches("dev.tasklog.task."),
            format!("{}:{}", e["partition"], e["offset"]),
            e["span_id"].as_str().unwrap_or(""),
        );
    }
    Ok(())
}

pub(super) async fn cancel(args: CancelArgs) -> anyhow::Result<()> {
    let client = ApiClient::new(&args.api)?;
    let mut body = serde_json::Map::new();
    if let Some(r) = &args.reason {
        body.insert("reason".into(), Value::String(r.clone()));
    }
    let response = client
        .call(
            client
                .http
                .post(client.url(&format!("/v1/tasks/{}/cancel", args.id)))
                .json(&Value::Object(body)),
        )
        .await?;
    match response["task"]["state"].as_str() {
        Some(state) => println!("{} {state}", args.id),
        None => println!("{} cancel requested", args.id),
    }
    Ok(())
}

pub(super) async fn logs(args: LogsArgs) -> anyhow::Result<()> {
    use std::io::Write;
    let client = ApiClient::new(&args.api)?;
    let Some(id) = &args.id else {
        return follow_many(&client, &args).await;
    };
    let url = client.url(&format!("/v1/tasks/{id}/logs"));
    let mut cursor: Option<String> = None;
    let mut first = true;
    let stdout = std::io::stdout();
    loop {
        let mut query: Vec<(&str, String)> = vec![("limit", "5000".into())];
        if let Some(c) = &cursor {
            query.push(("cursor", c.clone()));
        } else if let (true, Some(n)) = (first, args.tail) {
            query.push(("tail", n.to_string()));
        }
        if let Some(a) = args.attempt {
            query.push(("attempt", a.to_string()));
        }
        if let Some(s) = &args.stream {
            query.push(("stream", s.clone()));
        }
        if args.follow {
            query.push(("follow", "true".into()));
            query.push(("wait_ms", "10000".into()));
        }
        first = false;
        let page = client.call(client.http.get(&url).query(&query)).await?;
        let lines = page["lines"].as_array().cloned().unwrap_or_default();
        {
            let mut out = stdout.lock();
            for line in &lines {
                if args.json {
                    writeln!(out, "{line}")?;
                } else if line["continued"] == Value::Bool(true) {
                    write!(out, "{}", line["text"].as_str().unwrap_or(""))?;
                } else {
                    writeln!(out, "{}", line["text"].as_str().unwrap_or(""))?;
                }
            }
            out.flush()?;
        }
        cursor = page["next_cursor"].as_str().map(str::to_string);
        let complete = page["complete"].as_bool().unwrap_or(false);
        if complete || cursor.is_none() || (!args.follow && lines.is_empty()) {
            return Ok(());
        }
    }
}

/// `tasklog logs --label k=v | --service NAME`: one event stream (`GET /v1/logs`) for
/// every matching task, each line prefixed with its task's name (or short id).
async fn follow_many(client: &ApiClient, args: &LogsArgs) -> anyhow::Result<()> {
    use std::io::Write;
    let mut query: Vec<(&str, String)> = args.label.iter().map(|l| ("label", l.clone())).collect();
    if let Some(s) = &args.service {
        query.push(("service", s.clone()));
    }
    if let Some(s) = &args.stream {
        query.push(("stream", s.clone()));
    }
    let response = client
        .http
        .get(client.url("/v1/logs"))
        .query(&query)
        .header("accept", "text/event-stream")
        .send()
        .await
        .context("GET /v1/logs")?;
    if !response.status().is_success() {
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        bail!(
            "{status}: {}",
            body["error"]["message"]
                .as_str()
                .unwrap_or("the API refused the stream")
        );
    }
    let mut response = response;
    let mut buffer = String::new();
    let stdout = std::io::stdout();
    let prefix = |data: &Value| -> String {
        match data["name"].as_str() {
            Some(name) => name.to_string(),
            None => data["task_id"]
                .as_str()
                .unwrap_or("?")
                .chars()
                .take(8)
                .collect(),
        }
    };
    while let Some(chunk) = response.chunk().await.context("reading the event stream")? {
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let event = block
                .lines()
                .find_map(|l| l.strip_prefix("event:"))
                .map(str::trim);
            let data = block
                .lines()
                .find_map(|l| l.strip_prefix("data:"))
                .and_then(|d| serde_json::from_str::<Value>(d.trim()).ok())
                .unwrap_or(Value::Null);
            let mut out = stdout.lock();
            match event {
                Some("line") if args.json => writeln!(out, "{data}")?,
                Some("line") => writeln!(
                    out,
                    "{} | {}",
                    prefix(&data),
                    data["text"].as_str().unwrap_or("")
                )?,
                Some("task") if !args.json => eprintln!("==> following {}", prefix(&data)),
                Some("task_end") if !args.json => eprintln!("==> {} ended", prefix(&data)),
                Some("error") => eprintln!(
                    "error: {}: {}",
                    prefix(&data),
                    data["error"]["message"].as_str().unwrap_or("")
                ),
                _ => {}
            }
            out.flush()?;
        }
    }
    Ok(())
}

fn print_service(s: &Value) {
    println!(
        "{} {} ({}/{} ready, {})",
        s["name"].as_str().unwrap_or(""),
        s["status"].as_str().unwrap_or(""),
        s["ready_replicas"],
        s["spec"]["replicas"],
        s["lifecycle"].as_str().unwrap_or(""),
    );
}

/// `tasklog service up|ls|get|scale|stop`.
pub(super) async fn service(command: ServiceCommand) -> anyhow::Result<()> {
    match command {
        ServiceCommand::Up { file, api } => {
            let client = ApiClient::new(&api)?;
            let body = read_spec(&file)?;
            let s = client
                .call(client.http.post(client.url("/v1/services")).json(&body))
                .await?;
            print_service(&s);
        }
        ServiceCommand::Ls { api } => {
            let client = ApiClient::new(&api)?;
            let body = client
                .call(client.http.get(client.url("/v1/services")))
                .await?;
            println!(
                "{:<24}  {:<13}  {:>5}  {:>8}",
                "SERVICE", "STATUS", "READY", "REPLICAS"
            );
            for s in body["services"].as_array().cloned().unwrap_or_default() {
                println!(
                    "{:<24}  {:<13}  {:>5}  {:>8}",
                    s["name"].as_str().unwrap_or(""),
                    s["status"].as_str().unwrap_or(""),
                    s["ready_replicas"].to_string(),
                    s["spec"]["replicas"].to_string(),
                );
            }
        }
        ServiceCommand::Get { name, api } => {
            let client = ApiClient::new(&api)?;
            let s = client
                .call(client.http.get(client.url(&format!("/v1/services/{name}"))))
                .await?;
            print_service(&s);
            println!(
                "{:>5}  {:<36}  {:<9}  {:<5}  {:>7}  {:<16}  {:>8}",
                "INDEX", "TASK", "STATE", "READY", "ATTEMPT", "WORKER", "PID"
            );
            for r in s["replicas"].as_array().cloned().unwrap_or_default() {
                println!(
                    "{:>5}  {:<36}  {:<9}  {:<5}  {:>7}  {:<16}  {:>8}",
                    r["index"].to_string(),
                    r["task_id"].as_str().unwrap_or(""),
                    r["state"].as_str().unwrap_or(""),
                    r["ready"].to_string(),
                    r["attempt"].to_string(),
                    r["worker_id"].as_str().unwrap_or("-"),
                    r["pid"].to_string(),
                );
            }
        }
        ServiceCommand::Scale {
            name,
            replicas,
            api,
        } => {
            let client = ApiClient::new(&api)?;
            let s = client
                .call(
                    client
                        .http
                        .patch(client.url(&format!("/v1/services/{name}")))
                        .json(&serde_json::json!({ "replicas": replicas })),
                )
                .await?;
            print_service(&s);
        }
        ServiceCommand::Stop { name, api } => {
            let client = ApiClient::new(&api)?;
            let s = client
                .call(
                    client
                        .http
                        .post(client.url(&format!("/v1/services/{name}/stop"))),
                )
                .await?;
            print_service(&s);
        }
    }
    Ok(())
}
