//! Client commands: talk to the tasklog API over HTTP.

use std::io::Read;

use anyhow::{Context, bail};
use serde_json::Value;

use super::{ApiArgs, CancelArgs, EventsArgs, GetArgs, LogsArgs, LsArgs, SubmitArgs};

/// A thin JSON client for the API.
pub struct ApiClient {
    base: String,
    http: reqwest::Client,
}

impl ApiClient {
    /// A client for the API at `args.url`.
    pub fn new(args: &ApiArgs) -> anyhow::Result<ApiClient> {
        Ok(ApiClient {
            base: args.url.trim_end_matches('/').to_string(),
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(120))
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

    fn url(&self, path: &str) -> String {
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
    serde_yaml_ng::from_str(&text)
        .with_context(|| format!("{} is not valid YAML or JSON", path.display()))
}

pub(super) async fn submit(args: SubmitArgs) -> anyhow::Result<()> {
    let spec = read_spec(&args.file)?;
    let client = ApiClient::new(&args.api)?;
    let mut request = client.http.post(client.url("/v1/tasks")).json(&spec);
    if let Some(key) = &args.key {
        request = request.header("Idempotency-Key", key);
    }
    let body = client.call(request).await?;
    println!("{}", body["id"].as_str().unwrap_or_default());
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
    let url = client.url(&format!("/v1/tasks/{}/logs", args.id));
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
