//! The request body limit, answered with a JSON 413 that the client actually receives.
//!
//! A body over [`MAX_BODY_BYTES`] is refused here, before any handler runs: at once when
//! `Content-Length` says so, after reading just past the limit otherwise (chunked). The
//! answer carries `Connection: close`, and the rest of the body is read and discarded in
//! the background (bounded by [`DRAIN_MAX_BYTES`] and [`DRAIN_TIMEOUT`]). Without that
//! drain the server would close a socket with unread data in it, the kernel would answer
//! with a reset, and the client would lose the 413 it had not read yet.

use std::time::Duration;

use axum::body::{Body, BodyDataStream, Bytes, HttpBody};
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;

use super::{ApiError, MAX_BODY_BYTES};

/// Most bytes of a refused body read (and discarded) after the 413, so that the client
/// receives it; past this the connection is closed.
pub const DRAIN_MAX_BYTES: u64 = 8 * MAX_BODY_BYTES as u64;
/// Longest time spent reading a refused body after the 413.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The 413 for a body over the limit.
pub fn too_large() -> Response {
    let mut response = ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("the body is larger than {MAX_BODY_BYTES} bytes"),
    )
    .into_response();
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Reads and discards the rest of a body in the background, within the drain bounds.
fn drain(mut stream: BodyDataStream) {
    tokio::spawn(async move {
        let mut read = 0u64;
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
            while let Some(Ok(chunk)) = stream.next().await {
                read += chunk.len() as u64;
                if read > DRAIN_MAX_BYTES {
                    break;
                }
            }
        })
        .await;
    });
}

/// `Content-Length`, when the request has a valid one.
fn content_length(request: &Request) -> Option<u64> {
    request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

fn expects_continue(request: &Request) -> bool {
    request
        .headers()
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// Middleware: refuses bodies over [`MAX_BODY_BYTES`] with a JSON 413 (see the module
/// documentation); passes every other request on, a body of unknown length read into
/// memory first.
pub async fn limit_body(request: Request, next: Next) -> Response {
    let limit = MAX_BODY_BYTES as u64;
    if let Some(length) = content_length(&request) {
        if length <= limit {
            // hyper stops the body at its Content-Length: it cannot grow past the limit.
            return next.run(request).await;
        }
        // A client waiting for `100 Continue` has sent nothing yet and will not once it
        // has the 413; reading the body would invite it to send all of it.
        if !expects_continue(&request) {
            drain(request.into_body().into_data_stream());
        }
        return too_large();
    }
    if request.body().is_end_stream() || request.body().size_hint().upper() == Some(0) {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let mut stream = body.into_data_stream();
    let mut buffer = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(e) => {
                return ApiError::bad_request(
                    "invalid_body",
                    format!("the body could not be read: {e}"),
                )
                .into_response();
            }
        };
        if (buffer.len() + chunk.len()) as u64 > limit {
            drain(stream);
            return too_large();
        }
        buffer.extend_from_slice(&chunk);
    }
    next.run(Request::from_parts(parts, Body::from(Bytes::from(buffer))))
        .await
}
