//! The API at the HTTP level, over real sockets: an over-limit body gets its JSON 413
//! before the connection closes (with `Content-Length`, chunked, and with
//! `Expect: 100-continue`), and the OpenAPI description is served.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{Broker, Db, Stack, start_projector, start_server};
use serde_json::Value;
use tasklog::api::MAX_BODY_BYTES;

/// Well over the limit: 50 MB.
const BODY_BYTES: usize = 50_000_000;

/// What came back on the socket.
struct Answer {
    status: u16,
    head: String,
    body: Value,
}

/// Reads one HTTP/1.1 response (with a Content-Length) from `stream`, skipping any
/// `100 Continue`.
fn read_response(stream: &mut TcpStream) -> Answer {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = stream.read(&mut chunk).expect("read the response");
        assert!(
            n > 0,
            "the connection closed before a full response: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        if head.starts_with("HTTP/1.1 100") {
            buf.drain(..end + 4);
            continue;
        }
        let length: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse().expect("content-length"))
            })
            .expect("the response has a content-length");
        if buf.len() < end + 4 + length {
            continue;
        }
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status");
        let body = serde_json::from_slice(&buf[end + 4..end + 4 + length]).expect("a JSON body");
        return Answer { status, head, body };
    }
}

/// Sends `head` and then, on another thread, `body` (ignoring write errors: the server
/// may close once it has answered), and reads the answer.
fn exchange(addr: &str, head: String, body: Vec<u8>) -> Answer {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    stream.write_all(head.as_bytes()).expect("send the head");
    let mut writer = stream.try_clone().expect("clone");
    let sender = std::thread::spawn(move || {
        for piece in body.chunks(64 * 1024) {
            if writer.write_all(piece).is_err() {
                return;
            }
        }
    });
    let answer = read_response(&mut stream);
    drop(stream);
    let _ = sender.join();
    answer
}

fn assert_too_large(answer: &Answer) {
    assert_eq!(answer.status, 413, "{}\n{}", answer.head, answer.body);
    assert_eq!(
        answer.body["error"]["code"], "payload_too_large",
        "{}",
        answer.body
    );
    assert!(
        answer.body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(&MAX_BODY_BYTES.to_string())),
        "{}",
        answer.body
    );
    assert!(
        answer
            .head
            .to_ascii_lowercase()
            .contains("connection: close"),
        "{}",
        answer.head
    );
}

fn chunked(total: usize) -> Vec<u8> {
    let piece = vec![b' '; 64 * 1024];
    let mut out = Vec::with_capacity(total + total / 8);
    let mut sent = 0;
    while sent < total {
        let n = piece.len().min(total - sent);
        out.extend_from_slice(format!("{n:x}\r\n").as_bytes());
        out.extend_from_slice(&piece[..n]);
        out.extend_from_slice(b"\r\n");
        sent += n;
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn an_over_limit_body_gets_a_json_413_before_the_connection_closes() {
    let s = Stack::start().await;
    let addr = s.url.trim_start_matches("http://").to_string();
    let answers = tokio::task::spawn_blocking(move || {
        let mut answers = Vec::new();
        for path in ["/v1/tasks", "/v1/tasks/batch", "/v1/services"] {
            // Content-Length over the limit: refused before the body is read, and the
            // body is read and discarded so that the answer is not lost to a reset.
            answers.push(exchange(
                &addr,
                format!(
                    "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                     Content-Length: {BODY_BYTES}\r\n\r\n"
                ),
                vec![b' '; BODY_BYTES],
            ));
            // Chunked: refused once the limit is passed.
            answers.push(exchange(
                &addr,
                format!(
                    "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                     Transfer-Encoding: chunked\r\n\r\n"
                ),
                chunked(BODY_BYTES),
            ));
        }
        // Log lines are read as bytes, not through the JSON body extractor.
        let id = uuid::Uuid::now_v7();
        answers.push(exchange(
            &addr,
            format!(
                "POST /v1/tasks/{id}/logs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            ),
            chunked(BODY_BYTES),
        ));
        // A client waiting for 100 Continue gets the 413 instead, and sends nothing.
        answers.push(exchange(
            &addr,
            format!(
                "POST /v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                 Expect: 100-continue\r\nContent-Length: {BODY_BYTES}\r\n\r\n"
            ),
            Vec::new(),
        ));
        answers
    })
    .await
    .expect("exchanges");
    assert_eq!(answers.len(), 8);
    for answer in &answers {
        assert_too_large(answer);
    }

    // A body at the limit is read and judged on its content.
    let (status, body) = s
        .post_raw(
            "/v1/tasks",
            &format!("{{\"shell\": \"true\"}}{}", " ".repeat(MAX_BODY_BYTES - 17)),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    // The server still answers on new connections.
    let (status, _) = s.get("/healthz").await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_openapi_description_is_served_self_contained() {
    let broker = Broker::start();
    let db = Db::create().await;
    let (_server, url) = start_server(&broker, &db, &[("TASKLOG_MAX_WAIT_MS", "2500")]).await;
    let _projector = start_projector(&broker, &db);
    let r = reqwest::get(format!("{url}/v1/openapi.json"))
        .await
        .expect("GET");
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .is_ok_and(|c| c.starts_with("application/json"))
    );
    let doc: Value = r.json().await.expect("JSON");
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(
        doc["components"]["parameters"]["WaitMs"]["schema"]["maximum"],
        2500
    );
    let text = doc.to_string();
    assert!(!text.contains("\"$ref\":\"task-spec"), "external refs left");
    assert!(doc["components"]["schemas"]["task-spec.v1"]["properties"]["shell"].is_object());
    // The longest wait is what the server enforces.
    let id = uuid::Uuid::now_v7();
    let r = reqwest::get(format!("{url}/v1/tasks/{id}?wait_ms=2501"))
        .await
        .expect("GET");
    assert_eq!(r.status(), 400);
}
