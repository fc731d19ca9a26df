//! Who may do what: API tokens, their roles and projects, the events that grant and
//! revoke them, and the rule every API route obeys.
//!
//! A token is `tlk_` followed by 43 base64url characters: 256 random bits. Only its
//! SHA-256 ([`token_hash`]) is kept, and not on the log: the log is for auditors to
//! read, so `token_created` carries the token's name, role, projects and expiry and
//! a `token_id` that links it to the hash the credential store holds, never the
//! secret or its hash. Grants and revocations are events on `<prefix>.auth`, keyed by
//! the token's name, folded by [`apply_token`].

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::{EncodedEvent, KeyedRecord, Rejection, read_keyed, typed};

/// What every token starts with, so that a leaked one is easy to recognise (and to
/// scan for).
pub const TOKEN_PREFIX: &str = "tlk_";

/// The project of a task, service or worker that names none.
pub const DEFAULT_PROJECT: &str = "default";

/// In a token's project list: every project.
pub const ALL_PROJECTS: &str = "*";

/// Length of the base64url part of a token (32 bytes, unpadded).
const SECRET_CHARS: usize = 43;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything, tokens included, in every project.
    Admin,
    /// Submit, cancel, manage services, post log lines and read — in its projects.
    Submitter,
    /// Read only, in its projects.
    Reader,
    /// A worker agent: poll its own assignments and report attempts assigned to it,
    /// only as the worker whose id is the token's name.
    Worker,
}

impl Role {
    /// Every role.
    pub const ALL: &'static [Role] = &[Role::Admin, Role::Submitter, Role::Reader, Role::Worker];

    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Submitter => "submitter",
            Role::Reader => "reader",
            Role::Worker => "worker",
        }
    }

    /// Parses a lowercase name.
    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.iter().copied().find(|r| r.as_str() == s)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a route needs from the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// Nothing: health, readiness, the API description.
    Open,
    /// Any valid token, whatever its role (who am I).
    Anyone,
    /// Reading tasks, services, workers, logs and events.
    Read,
    /// Changing them: submit, cancel, services, posting log lines.
    Write,
    /// A worker's own business: its assignments and the reports of its attempts.
    Report,
    /// Tokens.
    Admin,
}

/// Why a principal may not do something (answered `403`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Denied(pub String);

/// Who is calling: the token's name, role and projects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's name: recorded on every event the call appends.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// Its projects (`*` for all).
    pub projects: Vec<String>,
}

impl Principal {
    /// The principal of an API whose authentication is off: an admin named `anonymous`.
    pub fn anonymous() -> Principal {
        Principal {
            name: "anonymous".to_string(),
            role: Role::Admin,
            projects: vec![ALL_PROJECTS.to_string()],
        }
    }

    /// Whether the role allows this kind of route at all.
    pub fn allows(&self, access: Access) -> Result<(), Denied> {
        let allowed = match access {
            Access::Open | Access::Anyone => true,
            Access::Read => self.role != Role::Worker,
            Access::Write => matches!(self.role, Role::Admin | Role::Submitter),
            Access::Report => matches!(self.role, Role::Admin | Role::Worker),
            Access::Admin => self.role == Role::Admin,
        };
        if allowed {
            Ok(())
        } else {
            Err(Denied(format!(
                "a {} token may not {}",
                self.role,
                match access {
                    Access::Open | Access::Anyone | Access::Read => "read",
                    Access::Write => "submit, cancel or change anything",
                    Access::Report => "act as a worker",
                    Access::Admin => "manage tokens",
                }
            )))
        }
    }

    /// Whether it may act as worker `worker_id` (poll its assignments, report its
    /// attempts): an admin, or the worker token of that name.
    pub fn may_act_as_worker(&self, worker_id: &str) -> Result<(), Denied> {
        match self.role {
            Role::Admin => Ok(()),
            Role::Worker if self.name == worker_id => Ok(()),
            Role::Worker => Err(Denied(format!(
                "the worker token {:?} may act only as worker {:?}, not {worker_id:?}",
                self.name, self.name
            ))),
            _ => Err(Denied(format!(
                "a {} token may not act as a worker",
                self.role
            ))),
        }
    }

    /// Whether it reaches `project`.
    pub fn reaches(&self, project: &str) -> bool {
        self.reaches_all() || self.projects.iter().any(|p| p == project)
    }

    /// Whether it reaches every project (an admin, or a grant of `*`).
    pub fn reaches_all(&self) -> bool {
        self.role == Role::Admin || self.projects.iter().any(|p| p == ALL_PROJECTS)
    }

    /// [`Principal::reaches`], as the 403 to answer when it does not.
    pub fn may_reach(&self, project: &str) -> Result<(), Denied> {
        if self.reaches(project) {
            return Ok(());
        }
        Err(Denied(format!(
            "the token {:?} does not reach project {project:?} (it reaches {})",
            self.name,
            self.projects.join(", ")
        )))
    }

    /// The projects a listing shows it: `None` for all of them.
    pub fn visible_projects(&self) -> Option<&[String]> {
        (!self.reaches_all()).then_some(self.projects.as_slice())
    }
}

/// Whether `name` can name a token: letters, digits and `._:@-`, up to 256 (a worker
/// token is named after its worker's id, which follows the same rule).
pub fn valid_token_name(name: &str) -> bool {
    crate::worker::valid_worker_id(name)
}

/// Whether `name` can name a project: lowercase letters, digits and `-_`, starting
/// with a letter or digit, up to 64; or `*` in a token's list.
pub fn valid_project(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 64
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_".contains(b))
}

/// Writes 32 random bytes as a token.
pub fn token_from_secret(secret: &[u8; 32]) -> String {
    use base64::Engine;
    format!(
        "{TOKEN_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
    )
}

/// Whether `s` has a token's form (prefix and 43 base64url characters).
pub fn looks_like_token(s: &str) -> bool {
    s.strip_prefix(TOKEN_PREFIX).is_some_and(|rest| {
        rest.len() == SECRET_CHARS
            && rest
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

/// The SHA-256 of a token: what the credential store keeps and looks tokens up by.
/// (A fast hash is right here: the secret has 256 random bits, so there is nothing to
/// guess, and every request checks one.)
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Compares two hashes in time independent of where they differ.
pub fn hashes_equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The type of an auth event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TokenEventType {
    /// `dev.tasklog.auth.token_created.v1`
    Created,
    /// `dev.tasklog.auth.token_revoked.v1`
    Revoked,
}

impl TokenEventType {
    /// Both types.
    pub const ALL: &'static [TokenEventType] = &[TokenEventType::Created, TokenEventType::Revoked];

    /// The `ce_type` string.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenEventType::Created => "dev.tasklog.auth.token_created.v1",
            TokenEventType::Revoked => "dev.tasklog.auth.token_revoked.v1",
        }
    }

    /// Parses a `ce_type` string.
    pub fn parse(s: &str) -> Option<TokenEventType> {
        TokenEventType::ALL
            .iter()
            .copied()
            .find(|t| t.as_str() == s)
    }
}

/// What a `token_created` grants.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Grant {
    /// Links the grant to the hash in the credential store (a new one per creation).
    pub token_id: Uuid,
    /// The role.
    pub role: Role,
    /// Its projects (`*` for all; ignored for admins, who reach every project).
    pub projects: Vec<String>,
    /// When it stops working, if ever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
}

/// Type-specific data of an auth event.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenPayload {
    /// A new token under this name.
    Created(Grant),
    /// The token of this name stops working.
    Revoked,
}

impl TokenPayload {
    /// The event type of this payload.
    pub fn event_type(&self) -> TokenEventType {
        match self {
            TokenPayload::Created(_) => TokenEventType::Created,
            TokenPayload::Revoked => TokenEventType::Revoked,
        }
    }
}

/// A decoded, schema-valid auth event.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent {
    /// `ce_id`.
    pub id: String,
    /// `ce_source`.
    pub source: String,
    /// `ce_time`.
    pub time: DateTime<Utc>,
    /// The token's name (key, subject and `data.name`).
    pub name: String,
    /// Who did it (`ce_tasklogprincipal`): the admin token's name, or the operator
    /// command's.
    pub principal: Option<String>,
    /// Typed data.
    pub payload: TokenPayload,
}

impl TokenEvent {
    /// A new event with a fresh `ce_id` and the current time.
    pub fn new(source: &str, name: &str, principal: &str, payload: TokenPayload) -> TokenEvent {
        TokenEvent {
            id: Uuid::now_v7().to_string(),
            source: source.to_string(),
            time: Utc::now(),
            name: name.to_string(),
            principal: Some(principal.to_string()),
            payload,
        }
    }

    /// The event's data as JSON.
    pub fn data(&self) -> Value {
        let mut data = match &self.payload {
            TokenPayload::Created(grant) => {
                serde_json::to_value(grant).unwrap_or_else(|_| Value::Object(Default::default()))
            }
            TokenPayload::Revoked => serde_json::json!({}),
        };
        data["name"] = Value::from(self.name.clone());
        data
    }

    /// Encodes the event for Kafka (CloudEvents binary mode, key = token name).
    pub fn encode(&self) -> EncodedEvent {
        let encoded = EncodedEvent::keyed(
            &self.id,
            &self.source,
            self.payload.event_type().as_str(),
            self.time,
            &self.name,
            &self.data(),
        );
        match &self.principal {
            Some(p) => encoded.with_principal(p),
            None => encoded,
        }
    }

    /// Decodes and validates a record of the auth topic.
    pub fn decode(record: &crate::RawRecord<'_>) -> Result<TokenEvent, Rejection> {
        let KeyedRecord {
            attributes,
            event_type,
            data,
            key,
        } = read_keyed(
            record,
            TokenEventType::parse,
            crate::schema::validate_token_event_data,
            "name",
        )?;
        let payload = match event_type {
            TokenEventType::Created => {
                let grant: Grant = typed(&data)?;
                if let Some(bad) = grant.projects.iter().find(|p| !valid_grant_project(p)) {
                    return Err(Rejection::SchemaViolation(format!(
                        "projects: {bad:?} is not a project name"
                    )));
                }
                TokenPayload::Created(grant)
            }
            TokenEventType::Revoked => TokenPayload::Revoked,
        };
        Ok(TokenEvent {
            id: attributes.id,
            source: attributes.source,
            time: attributes.time,
            name: key,
            principal: attributes.principal,
            payload,
        })
    }
}

/// Whether `p` may appear in a token's project list.
pub fn valid_grant_project(p: &str) -> bool {
    p == ALL_PROJECTS || valid_project(p)
}

/// A token as folded from its events (no secret, no hash).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenState {
    /// Name.
    pub name: String,
    /// The current grant's link to the credential store.
    pub token_id: Uuid,
    /// Role.
    pub role: Role,
    /// Projects.
    pub projects: Vec<String>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// Who created it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    /// When it expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// When it was revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<DateTime<Utc>>,
    /// Who revoked it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_by: Option<String>,
}

impl TokenState {
    /// Whether it is neither revoked nor expired at `now`.
    pub fn active_at(&self, now: DateTime<Utc>) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|e| e > now)
    }

    /// The principal it authenticates.
    pub fn principal(&self) -> Principal {
        Principal {
            name: self.name.clone(),
            role: self.role,
            projects: self.projects.clone(),
        }
    }
}

/// Folds one auth event. Pure. A name may be reused once its token is revoked (the
/// new grant gets a new `token_id`, so the old secret stays dead).
pub fn apply_token(
    state: Option<&TokenState>,
    event: &TokenEvent,
) -> Result<TokenState, Rejection> {
    match (&event.payload, state) {
        (TokenPayload::Created(_), Some(current)) if current.revoked_at.is_none() => {
            Err(Rejection::IllegalTokenTransition(format!(
                "token {:?} exists; revoke it before creating another under its name",
                event.name
            )))
        }
        (TokenPayload::Created(grant), _) => Ok(TokenState {
            name: event.name.clone(),
            token_id: grant.token_id,
            role: grant.role,
            projects: grant.projects.clone(),
            created_at: event.time,
            created_by: event.principal.clone(),
            expires_at: grant.expires_at,
            revoked_at: None,
            revoked_by: None,
        }),
        (TokenPayload::Revoked, None) => Err(Rejection::UnknownToken(event.name.clone())),
        (TokenPayload::Revoked, Some(current)) if current.revoked_at.is_some() => Err(
            Rejection::IllegalTokenTransition(format!("token {:?} is already revoked", event.name)),
        ),
        (TokenPayload::Revoked, Some(current)) => {
            let mut next = current.clone();
            next.revoked_at = Some(event.time);
            next.revoked_by = event.principal.clone();
            Ok(next)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(name: &str, role: Role, projects: &[&str]) -> Principal {
        Principal {
            name: name.into(),
            role,
            projects: projects.iter().map(|p| p.to_string()).collect(),
        }
    }

    #[test]
    fn roles_allow_what_the_table_says() {
        use Access::*;
        let table = [
            (Role::Admin, [true, true, true, true, true]),
            (Role::Submitter, [true, true, true, false, false]),
            (Role::Reader, [true, true, false, false, false]),
            (Role::Worker, [true, false, false, true, false]),
        ];
        for (role, expected) in table {
            let p = principal("p", role, &["default"]);
            for (access, allowed) in [Open, Read, Write, Report, Admin].into_iter().zip(expected) {
                assert_eq!(p.allows(access).is_ok(), allowed, "{role} {access:?}");
            }
        }
    }

    #[test]
    fn a_worker_acts_only_as_itself() {
        let w = principal("gpu-1", Role::Worker, &["*"]);
        assert!(w.may_act_as_worker("gpu-1").is_ok());
        let err = w.may_act_as_worker("gpu-2").unwrap_err();
        assert!(err.0.contains("gpu-2"), "{err}");
        assert!(
            principal("a", Role::Admin, &[])
                .may_act_as_worker("x")
                .is_ok()
        );
        assert!(
            principal("s", Role::Submitter, &["*"])
                .may_act_as_worker("s")
                .is_err()
        );
    }

    #[test]
    fn projects_reach_what_they_name() {
        let p = principal("s", Role::Submitter, &["ml", "web"]);
        assert!(p.reaches("ml") && p.reaches("web") && !p.reaches("default"));
        assert!(principal("s", Role::Reader, &["*"]).reaches("anything"));
        assert!(principal("a", Role::Admin, &[]).reaches("anything"));
    }

    #[test]
    fn tokens_have_a_recognisable_form_and_a_stable_hash() {
        let t = token_from_secret(&[7u8; 32]);
        assert!(t.starts_with(TOKEN_PREFIX) && looks_like_token(&t), "{t}");
        assert!(!looks_like_token("tlk_short"));
        assert!(!looks_like_token(&t.replace("tlk_", "xyz_")));
        assert_eq!(token_hash(&t), token_hash(&t));
        assert_ne!(token_hash(&t), token_hash(&token_from_secret(&[8u8; 32])));
        assert!(hashes_equal(&token_hash(&t), &token_hash(&t)));
        assert!(!hashes_equal(&token_hash(&t), &[0u8; 32]));
        assert!(!hashes_equal(&[1, 2], &[1, 2, 3]));
    }

    #[test]
    fn project_names() {
        for ok in ["default", "ml-team", "a1", "x_y"] {
            assert!(valid_project(ok), "{ok}");
        }
        for bad in ["", "-x", "ML", "a b", &"x".repeat(65), "*"] {
            assert!(!valid_project(bad), "{bad}");
        }
        assert!(valid_grant_project("*"));
    }

    fn created(name: &str, role: Role) -> TokenEvent {
        TokenEvent::new(
            "tasklog://test",
            name,
            "root",
            TokenPayload::Created(Grant {
                token_id: Uuid::new_v4(),
                role,
                projects: vec!["default".into()],
                expires_at: None,
            }),
        )
    }

    #[test]
    fn created_then_revoked_then_created_again() {
        let first = apply_token(None, &created("ci", Role::Submitter)).expect("created");
        assert!(first.active_at(Utc::now()));
        assert_eq!(first.created_by.as_deref(), Some("root"));
        let again = apply_token(Some(&first), &created("ci", Role::Reader));
        assert_eq!(again.unwrap_err().code(), "illegal_transition");
        let revoke = TokenEvent::new("tasklog://test", "ci", "root", TokenPayload::Revoked);
        let revoked = apply_token(Some(&first), &revoke).expect("revoked");
        assert!(!revoked.active_at(Utc::now()));
        assert!(apply_token(Some(&revoked), &revoke).is_err());
        assert!(apply_token(None, &revoke).is_err());
        let second = apply_token(Some(&revoked), &created("ci", Role::Reader)).expect("reused");
        assert_ne!(second.token_id, first.token_id);
        assert!(second.active_at(Utc::now()));
    }

    #[test]
    fn expiry_ends_a_token() {
        let mut state = apply_token(None, &created("ci", Role::Reader)).expect("created");
        state.expires_at = Some(Utc::now() - chrono::Duration::seconds(1));
        assert!(!state.active_at(Utc::now()));
    }

    #[test]
    fn auth_events_round_trip_and_carry_no_secret() {
        use chrono::SubsecRound;
        let mut event = created("ci", Role::Worker);
        event.time = event.time.trunc_subsecs(6); // ce_time carries microseconds
        let encoded = event.encode();
        let decoded = TokenEvent::decode(&encoded.as_record()).expect("decodes");
        assert_eq!(decoded, event);
        let text = String::from_utf8(encoded.payload.clone()).expect("utf-8");
        assert!(!text.contains(TOKEN_PREFIX), "{text}");
        assert_eq!(
            encoded.as_record().header(crate::header::PRINCIPAL),
            Some("root")
        );
    }

    #[test]
    fn a_grant_with_a_bad_project_is_refused() {
        let mut event = created("ci", Role::Reader);
        if let TokenPayload::Created(g) = &mut event.payload {
            g.projects = vec!["Not A Project".into()];
        }
        let err = TokenEvent::decode(&event.encode().as_record()).unwrap_err();
        assert_eq!(err.code(), "schema_violation", "{err}");
    }
}
