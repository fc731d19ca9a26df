//! W3C Trace Context (`traceparent`), as tasklog carries it.
//!
//! A write request's `traceparent` (or a fresh one) names the trace every event it
//! causes belongs to. Events carry it as the CloudEvents distributed-tracing extension
//! (`ce_traceparent`); a task keeps the one it was submitted with, so the scheduler's
//! and the worker's events of that task, its log records and its process
//! (`TRACEPARENT`) join the same trace, each as a span of its own under the task's.
//!
//! Only the form `00-<32 hex trace id>-<16 hex span id>-<2 hex flags>` is written. Read
//! per the W3C rules: a later version is read for its first four fields, and a header
//! that is malformed, or whose ids are all zeros, is no context at all (a new trace
//! starts) — a bad tracing header never costs an event or a request.

use std::fmt;

use uuid::Uuid;

/// One span's place in a trace: the trace, the span, and whether it is sampled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceContext {
    /// The trace: 16 bytes, not all zero.
    pub trace_id: [u8; 16],
    /// The span (the "parent id" of whatever continues from it): 8 bytes, not all zero.
    pub span_id: [u8; 8],
    /// The trace flags (bit 0: sampled).
    pub flags: u8,
}

/// Why a `traceparent` is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TraceParentError {
    /// Not `version-traceid-spanid-flags` in lowercase hex of the right lengths.
    #[error("traceparent {0:?} is not version-traceid-parentid-flags in lowercase hex")]
    Malformed(String),
    /// Version `ff`, which W3C forbids.
    #[error("traceparent version ff is invalid")]
    InvalidVersion,
    /// A trace id or span id of zeros.
    #[error("traceparent {0:?} has an all-zero trace id or parent id")]
    ZeroId(String),
}

fn hex_bytes<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != N * 2
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut out = [0u8; N];
    for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
        let text = std::str::from_utf8(chunk).ok()?;
        out[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn random_span_id() -> [u8; 8] {
    loop {
        let bytes = Uuid::new_v4().into_bytes();
        let mut id = [0u8; 8];
        id.copy_from_slice(&bytes[..8]);
        if id != [0; 8] {
            return id;
        }
    }
}

impl TraceContext {
    /// Reads a `traceparent` header value.
    pub fn parse(value: &str) -> Result<TraceContext, TraceParentError> {
        let malformed = || TraceParentError::Malformed(value.chars().take(80).collect());
        let value = value.trim();
        let mut parts = value.split('-');
        let (Some(version), Some(trace), Some(span), Some(flags)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed());
        };
        let version: [u8; 1] = hex_bytes(version).ok_or_else(malformed)?;
        if version[0] == 0xff {
            return Err(TraceParentError::InvalidVersion);
        }
        // Version 00 has exactly four fields; later versions may append more.
        if version[0] == 0 && parts.next().is_some() {
            return Err(malformed());
        }
        let trace_id: [u8; 16] = hex_bytes(trace).ok_or_else(malformed)?;
        let span_id: [u8; 8] = hex_bytes(span).ok_or_else(malformed)?;
        let flags: [u8; 1] = hex_bytes(flags).ok_or_else(malformed)?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return Err(TraceParentError::ZeroId(value.to_string()));
        }
        Ok(TraceContext {
            trace_id,
            span_id,
            flags: flags[0],
        })
    }

    /// Reads an optional header leniently: absent or invalid is `None` (W3C: a
    /// receiver that cannot read a `traceparent` starts a new trace).
    pub fn read(value: Option<&str>) -> Option<TraceContext> {
        value.and_then(|v| TraceContext::parse(v).ok())
    }

    /// The first span of a new trace (sampled).
    pub fn new_root() -> TraceContext {
        let trace_id = loop {
            let id = Uuid::new_v4().into_bytes();
            if id != [0; 16] {
                break id;
            }
        };
        TraceContext {
            trace_id,
            span_id: random_span_id(),
            flags: 1,
        }
    }

    /// A new span in the same trace, whose parent is this one.
    pub fn child(&self) -> TraceContext {
        TraceContext {
            span_id: random_span_id(),
            ..*self
        }
    }

    /// The span that continues `parent`, or the first of a new trace when there is none.
    pub fn child_of(parent: Option<&TraceContext>) -> TraceContext {
        parent.map_or_else(TraceContext::new_root, TraceContext::child)
    }

    /// The trace id in lowercase hex (32 characters).
    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// The span id in lowercase hex (16 characters).
    pub fn span_id_hex(&self) -> String {
        hex(&self.span_id)
    }

    /// Whether the sampled flag is set.
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }
}

impl fmt::Display for TraceContext {
    /// The `traceparent` header value (version 00).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            self.trace_id_hex(),
            self.span_id_hex(),
            self.flags
        )
    }
}

impl serde::Serialize for TraceContext {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for TraceContext {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        TraceContext::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Reads a trace id given on its own (as in `GET /v1/traces/{trace_id}`): 32 lowercase
/// hex characters, not all zero.
pub fn parse_trace_id(value: &str) -> Option<[u8; 16]> {
    hex_bytes::<16>(value).filter(|id| *id != [0; 16])
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn reads_and_writes_the_w3c_example() {
        let tc = TraceContext::parse(EXAMPLE).expect("valid");
        assert_eq!(tc.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(tc.span_id_hex(), "00f067aa0ba902b7");
        assert!(tc.sampled());
        assert_eq!(tc.to_string(), EXAMPLE);
    }

    #[test]
    fn refuses_what_w3c_refuses() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(TraceContext::parse(bad).is_err(), "{bad:?} accepted");
            assert_eq!(TraceContext::read(Some(bad)), None);
        }
        // A later version is read for its first four fields.
        let later = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-ever";
        assert!(TraceContext::parse(later).is_ok());
    }

    #[test]
    fn children_stay_in_the_trace_with_new_spans() {
        let root = TraceContext::new_root();
        let child = root.child();
        assert_eq!(child.trace_id, root.trace_id);
        assert_ne!(child.span_id, root.span_id);
        assert_eq!(TraceContext::parse(&child.to_string()), Ok(child));
        let fresh = TraceContext::child_of(None);
        assert_ne!(fresh.trace_id, root.trace_id);
    }

    #[test]
    fn trace_ids_on_their_own() {
        assert!(parse_trace_id("4bf92f3577b34da6a3ce929d0e0e4736").is_some());
        assert!(parse_trace_id("00000000000000000000000000000000").is_none());
        assert!(parse_trace_id("4bf92f").is_none());
        assert!(parse_trace_id("4BF92F3577B34DA6A3CE929D0E0E4736").is_none());
    }
}
