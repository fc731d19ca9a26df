//! The tamper-evident export format (`schemas/audit-export.v1.json`): JSON Lines, one
//! line per record of the log with its coordinates, its exact key, headers and value
//! (base64) and the sha256 of each, chained — every line carries the previous line's
//! hash — and a last line, the manifest, with per-partition offset ranges, counts and
//! the chain head.
//!
//! A line's hash is the sha256 of the previous line's hash (hex), a newline, and the
//! line's own bytes up to (not including) its `"hash"` member, closed with `}`: the
//! verifier hashes the bytes as they are in the file, never a re-encoding. Writing and
//! checking live here, apart from any I/O, so that an auditor can read all of it.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The `format` of every line.
pub const FORMAT: &str = "tasklog.audit-export.v1";

/// The `prev` of the first line.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Lower-case hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut out = String::with_capacity(64);
    for b in digest {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// One record header, exactly as on the log (a header may have no value).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportedHeader {
    /// Header name.
    pub key: String,
    /// Header value, base64; `null` for a header without a value.
    pub value: Option<String>,
}

/// One record of the log, as a line of the export (without its `hash`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordLine {
    /// Always [`FORMAT`].
    pub format: String,
    /// Always `record`.
    pub kind: String,
    /// 1-based line number.
    pub line: u64,
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// The record's timestamp, milliseconds since the epoch (`null` when it has none).
    pub timestamp_ms: Option<i64>,
    /// The key, base64 (`null`: no key).
    pub key: Option<String>,
    /// The headers in order.
    pub headers: Vec<ExportedHeader>,
    /// The value, base64 (`null`: no value).
    pub value: Option<String>,
    /// sha256 of the key bytes (of nothing when there is no key).
    pub key_sha256: String,
    /// sha256 of the headers' canonical form ([`headers_digest`]).
    pub headers_sha256: String,
    /// sha256 of the value bytes (of nothing when there is no value).
    pub value_sha256: String,
    /// The previous line's hash ([`GENESIS`] for the first).
    pub prev: String,
}

/// Per partition, what the export holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionRange {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Lowest offset exported.
    pub first_offset: i64,
    /// Highest offset exported.
    pub last_offset: i64,
    /// Records exported from it.
    pub count: u64,
}

/// The last line: what the export holds, and the head of the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestLine {
    /// Always [`FORMAT`].
    pub format: String,
    /// Always `manifest`.
    pub kind: String,
    /// 1-based line number (the last).
    pub line: u64,
    /// What was asked for (`task`, `since`, `until`), as given.
    pub selection: serde_json::Value,
    /// When the export was written (RFC 3339).
    pub created_at: String,
    /// Records exported.
    pub records: u64,
    /// Per partition: offset range and count.
    pub partitions: Vec<PartitionRange>,
    /// The hash of the last record line ([`GENESIS`] when there is none).
    pub chain_head: String,
    /// The previous line's hash.
    pub prev: String,
}

/// The canonical bytes the headers' digest is taken over: for each header, its name's
/// length (8 bytes, big-endian) and name, then `0xff` for no value or `0x00`, the
/// value's length and the value.
pub fn headers_digest(headers: &[(&str, Option<&[u8]>)]) -> String {
    let mut bytes = Vec::new();
    for (key, value) in headers {
        bytes.extend_from_slice(&(key.len() as u64).to_be_bytes());
        bytes.extend_from_slice(key.as_bytes());
        match value {
            None => bytes.push(0xff),
            Some(v) => {
                bytes.push(0);
                bytes.extend_from_slice(&(v.len() as u64).to_be_bytes());
                bytes.extend_from_slice(v);
            }
        }
    }
    sha256_hex(&bytes)
}

/// Appends `body` (a line's JSON without `hash`) with its hash; returns the hash.
fn seal(out: &mut String, prev: &str, body: &str) -> String {
    let hash = sha256_hex(format!("{prev}\n{body}").as_bytes());
    // `body` ends with `}`: the hash goes in as its last member.
    out.push_str(&body[..body.len() - 1]);
    let _ = writeln!(out, ",\"hash\":\"{hash}\"}}");
    hash
}

/// Writes an export line by line, keeping the chain and the manifest's counts.
#[derive(Debug)]
pub struct ExportWriter {
    prev: String,
    line: u64,
    ranges: BTreeMap<(String, i32), PartitionRange>,
}

impl Default for ExportWriter {
    fn default() -> Self {
        ExportWriter::new()
    }
}

impl ExportWriter {
    /// A writer at the start of a file.
    pub fn new() -> ExportWriter {
        ExportWriter {
            prev: GENESIS.to_string(),
            line: 0,
            ranges: BTreeMap::new(),
        }
    }

    /// The line for one record, newline included.
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &mut self,
        topic: &str,
        partition: i32,
        offset: i64,
        timestamp_ms: Option<i64>,
        key: Option<&[u8]>,
        headers: &[(&str, Option<&[u8]>)],
        value: Option<&[u8]>,
    ) -> String {
        self.line += 1;
        let line = RecordLine {
            format: FORMAT.to_string(),
            kind: "record".to_string(),
            line: self.line,
            topic: topic.to_string(),
            partition,
            offset,
            timestamp_ms,
            key: key.map(|k| BASE64.encode(k)),
            headers: headers
                .iter()
                .map(|(k, v)| ExportedHeader {
                    key: (*k).to_string(),
                    value: v.map(|v| BASE64.encode(v)),
                })
                .collect(),
            value: value.map(|v| BASE64.encode(v)),
            key_sha256: sha256_hex(key.unwrap_or_default()),
            headers_sha256: headers_digest(headers),
            value_sha256: sha256_hex(value.unwrap_or_default()),
            prev: self.prev.clone(),
        };
        let range = self
            .ranges
            .entry((topic.to_string(), partition))
            .or_insert(PartitionRange {
                topic: topic.to_string(),
                partition,
                first_offset: offset,
                last_offset: offset,
                count: 0,
            });
        range.first_offset = range.first_offset.min(offset);
        range.last_offset = range.last_offset.max(offset);
        range.count += 1;
        let mut out = String::new();
        // A struct of strings and numbers always encodes.
        let body = serde_json::to_string(&line).unwrap_or_default();
        self.prev = seal(&mut out, &self.prev, &body);
        out
    }

    /// The manifest line, newline included: the last line of the file.
    pub fn manifest(mut self, selection: serde_json::Value, created_at: String) -> String {
        self.line += 1;
        let manifest = ManifestLine {
            format: FORMAT.to_string(),
            kind: "manifest".to_string(),
            line: self.line,
            selection,
            created_at,
            records: self.ranges.values().map(|r| r.count).sum(),
            partitions: self.ranges.into_values().collect(),
            chain_head: self.prev.clone(),
            prev: self.prev.clone(),
        };
        let mut out = String::new();
        let body = serde_json::to_string(&manifest).unwrap_or_default();
        seal(&mut out, &self.prev, &body);
        out
    }
}

/// A problem found in an export, at a line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// 1-based line number in the file.
    pub line: u64,
    /// The record's coordinates, when the line names them (`topic partition:offset`).
    pub at: Option<String>,
    /// What is wrong.
    pub problem: String,
}

/// What an offline check of an export found.
#[derive(Debug, Default)]
pub struct Checked {
    /// Every record line that parsed, in file order.
    pub records: Vec<RecordLine>,
    /// The manifest, when the file ends with one.
    pub manifest: Option<ManifestLine>,
    /// Every problem (empty: the chain and the manifest hold).
    pub findings: Vec<Finding>,
}

/// Splits a line into the body its hash covers and the hash it carries.
fn unseal(line: &str) -> Option<(String, &str)> {
    let start = line.rfind(",\"hash\":\"")?;
    let rest = &line[start + 9..];
    let hash = rest.strip_suffix("\"}")?;
    (hash.len() == 64).then(|| (format!("{}}}", &line[..start]), hash))
}

/// Checks an export offline: every line's hash and link to the previous one, line
/// numbers, each record's digests against its bytes, and the manifest against the
/// records. Every problem is reported with its line number (and coordinates).
pub fn check(text: &str) -> Checked {
    let mut checked = Checked::default();
    let mut prev = GENESIS.to_string();
    let mut ranges: BTreeMap<(String, i32), PartitionRange> = BTreeMap::new();
    let mut last_offsets: BTreeMap<(String, i32), i64> = BTreeMap::new();
    let lines: Vec<&str> = text.lines().collect();
    for (index, raw) in lines.iter().enumerate() {
        let number = index as u64 + 1;
        let mut finding = |at: Option<String>, problem: String| {
            checked.findings.push(Finding {
                line: number,
                at,
                problem,
            })
        };
        if checked.manifest.is_some() {
            finding(None, "a line after the manifest".into());
            continue;
        }
        let Some((body, hash)) = unseal(raw) else {
            finding(None, "no \"hash\" member at the end of the line".into());
            continue;
        };
        let value: serde_json::Value = match serde_json::from_str(&body) {
            Ok(v) => v,
            Err(e) => {
                finding(None, format!("not JSON: {e}"));
                continue;
            }
        };
        let recomputed = sha256_hex(format!("{prev}\n{body}").as_bytes());
        let carried_prev = value["prev"].as_str().unwrap_or("");
        let at = value["topic"].as_str().map(|t| {
            format!(
                "{t} {}:{}",
                value["partition"].as_i64().unwrap_or(-1),
                value["offset"].as_i64().unwrap_or(-1)
            )
        });
        if carried_prev != prev {
            finding(
                at.clone(),
                "does not follow the line before it (its prev is not that line's hash): a line was removed, inserted or moved here".into(),
            );
        } else if recomputed != hash {
            finding(
                at.clone(),
                "its content does not match its hash: the line was edited".into(),
            );
        }
        if value["line"].as_u64() != Some(number) {
            finding(at.clone(), format!("says it is line {}", value["line"]));
        }
        prev = hash.to_string();
        match value["kind"].as_str() {
            Some("record") => match serde_json::from_value::<RecordLine>(value) {
                Ok(record) => {
                    for problem in record_problems(&record) {
                        finding(at.clone(), problem);
                    }
                    let key = (record.topic.clone(), record.partition);
                    if let Some(last) = last_offsets.get(&key)
                        && record.offset <= *last
                    {
                        finding(
                            at.clone(),
                            format!(
                                "offset {} comes after offset {last} of the same partition",
                                record.offset
                            ),
                        );
                    }
                    last_offsets.insert(key.clone(), record.offset);
                    let range = ranges.entry(key).or_insert(PartitionRange {
                        topic: record.topic.clone(),
                        partition: record.partition,
                        first_offset: record.offset,
                        last_offset: record.offset,
                        count: 0,
                    });
                    range.first_offset = range.first_offset.min(record.offset);
                    range.last_offset = range.last_offset.max(record.offset);
                    range.count += 1;
                    checked.records.push(record);
                }
                Err(e) => finding(at, format!("not a record line: {e}")),
            },
            Some("manifest") => match serde_json::from_value::<ManifestLine>(value) {
                Ok(manifest) => {
                    let head = checked
                        .records
                        .last()
                        .map_or(GENESIS.to_string(), |_| manifest.prev.clone());
                    if manifest.chain_head != head {
                        finding(
                            None,
                            "the manifest's chain_head is not the last record's hash".into(),
                        );
                    }
                    let counted: u64 = ranges.values().map(|r| r.count).sum();
                    if manifest.records != counted {
                        finding(
                            None,
                            format!(
                                "the manifest counts {} records; the file has {counted}",
                                manifest.records
                            ),
                        );
                    }
                    let listed: Vec<PartitionRange> = ranges.values().cloned().collect();
                    if manifest.partitions != listed {
                        finding(
                            None,
                            "the manifest's partition ranges differ from the records'".into(),
                        );
                    }
                    checked.manifest = Some(manifest);
                }
                Err(e) => finding(None, format!("not a manifest line: {e}")),
            },
            other => finding(at, format!("unknown kind {other:?}")),
        }
    }
    if checked.manifest.is_none() {
        checked.findings.push(Finding {
            line: lines.len() as u64 + 1,
            at: None,
            problem: "the file does not end with a manifest: it was cut short".into(),
        });
    }
    checked
}

/// The decoded bytes of a record line: key, headers, value.
pub type RecordBytes = (
    Option<Vec<u8>>,
    Vec<(String, Option<Vec<u8>>)>,
    Option<Vec<u8>>,
);

/// Decodes a record line's key, headers and value.
pub fn record_bytes(record: &RecordLine) -> Result<RecordBytes, String> {
    let decode = |s: &Option<String>| -> Result<Option<Vec<u8>>, String> {
        s.as_ref()
            .map(|s| BASE64.decode(s).map_err(|e| format!("bad base64: {e}")))
            .transpose()
    };
    let headers = record
        .headers
        .iter()
        .map(|h| Ok((h.key.clone(), decode(&h.value)?)))
        .collect::<Result<Vec<_>, String>>()?;
    Ok((decode(&record.key)?, headers, decode(&record.value)?))
}

fn record_problems(record: &RecordLine) -> Vec<String> {
    let (key, headers, value) = match record_bytes(record) {
        Ok(b) => b,
        Err(e) => return vec![e],
    };
    let mut problems = Vec::new();
    if sha256_hex(key.as_deref().unwrap_or_default()) != record.key_sha256 {
        problems.push("key_sha256 does not match the key".to_string());
    }
    let borrowed: Vec<(&str, Option<&[u8]>)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_deref()))
        .collect();
    if headers_digest(&borrowed) != record.headers_sha256 {
        problems.push("headers_sha256 does not match the headers".to_string());
    }
    if sha256_hex(value.as_deref().unwrap_or_default()) != record.value_sha256 {
        problems.push("value_sha256 does not match the value".to_string());
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export(n: usize) -> String {
        let mut w = ExportWriter::new();
        let mut out = String::new();
        for i in 0..n {
            let value = format!("{{\"n\":{i}}}");
            let headers: Vec<(&str, Option<&[u8]>)> =
                vec![("ce_id", Some(b"x".as_slice())), ("empty", None)];
            out.push_str(&w.record(
                "t.events",
                (i % 2) as i32,
                (i / 2) as i64,
                Some(1_700_000_000_000),
                Some(b"k"),
                &headers,
                Some(value.as_bytes()),
            ));
        }
        out.push_str(&w.manifest(serde_json::json!({}), "2026-12-03T00:00:00Z".into()));
        out
    }

    fn lines_of(findings: &[Finding]) -> Vec<u64> {
        let mut l: Vec<u64> = findings.iter().map(|f| f.line).collect();
        l.dedup();
        l
    }

    #[test]
    fn an_untouched_export_checks_and_every_tamper_is_found_at_its_line() {
        let text = export(6);
        let ok = check(&text);
        assert_eq!(ok.findings, vec![]);
        assert_eq!(ok.records.len(), 6);
        assert_eq!(ok.manifest.as_ref().map(|m| m.records), Some(6));

        let lines: Vec<&str> = text.lines().collect();
        let join = |l: &[&str]| l.iter().map(|l| format!("{l}\n")).collect::<String>();

        // Edited: a value changed (its digest no longer matches, nor its hash).
        let mut edited = lines.clone();
        let changed = lines[2].replace("\"value\":\"", "\"value\":\"A");
        edited[2] = &changed;
        let f = check(&join(&edited)).findings;
        assert_eq!(lines_of(&f), vec![3], "{f:?}");
        assert_eq!(f[0].at.as_deref(), Some("t.events 0:1"));

        // Removed.
        let mut removed = lines.clone();
        removed.remove(3);
        assert_eq!(lines_of(&check(&join(&removed)).findings)[0], 4);

        // Inserted (a copy of line 2 after line 4).
        let mut inserted = lines.clone();
        inserted.insert(4, lines[1]);
        assert_eq!(lines_of(&check(&join(&inserted)).findings)[0], 5);

        // Reordered.
        let mut swapped = lines.clone();
        swapped.swap(1, 2);
        assert_eq!(lines_of(&check(&join(&swapped)).findings)[0], 2);

        // The manifest changed.
        let mut manifest = lines.clone();
        let forged = lines[6].replace("\"records\":6", "\"records\":5");
        manifest[6] = &forged;
        assert_eq!(lines_of(&check(&join(&manifest)).findings), vec![7]);

        // Cut short.
        let f = check(&join(&lines[..5])).findings;
        assert_eq!(lines_of(&f), vec![6]);
    }
}
