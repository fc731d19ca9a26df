//! Kafka credentials and TLS: the `TASKLOG_KAFKA_*` security settings, checked once and
//! passed to librdkafka by [`client_config`](super::client_config).
//!
//! | variable | librdkafka property |
//! |---|---|
//! | `TASKLOG_KAFKA_SECURITY_PROTOCOL` | `security.protocol`: `PLAINTEXT` (default), `SSL`, `SASL_PLAINTEXT`, `SASL_SSL` |
//! | `TASKLOG_KAFKA_SASL_MECHANISM` | `sasl.mechanism`: `PLAIN`, `SCRAM-SHA-256`, `SCRAM-SHA-512` |
//! | `TASKLOG_KAFKA_SASL_USERNAME` | `sasl.username` |
//! | `TASKLOG_KAFKA_SASL_PASSWORD` | `sasl.password` |
//! | `TASKLOG_KAFKA_SSL_CA_LOCATION` | `ssl.ca.location` (default: OpenSSL's system CA store) |
//! | `TASKLOG_KAFKA_SSL_CERTIFICATE_LOCATION` | `ssl.certificate.location` (client certificate, PEM) |
//! | `TASKLOG_KAFKA_SSL_KEY_LOCATION` | `ssl.key.location` (client key, PEM) |
//! | `TASKLOG_KAFKA_SSL_KEY_PASSWORD` | `ssl.key.password` |
//! | `TASKLOG_KAFKA_SSL_ENDPOINT_IDENTIFICATION_ALGORITHM` | `ssl.endpoint.identification.algorithm`: `https` (default) or `none` |
//!
//! Secrets (the SASL password, the key password) are held in [`Secret`], whose `Debug`
//! prints `[redacted]` and which has no `Display`: neither [`KafkaSecurity`]'s `Debug` or
//! `Display` nor any [`KafkaSecurityError`] contains one. librdkafka's own `Debug` of a
//! `ClientConfig` leaves `sasl.password` and `ssl.key.password` out as well.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use rdkafka::ClientConfig;

/// `security.protocol`.
pub const ENV_SECURITY_PROTOCOL: &str = "TASKLOG_KAFKA_SECURITY_PROTOCOL";
/// `sasl.mechanism`.
pub const ENV_SASL_MECHANISM: &str = "TASKLOG_KAFKA_SASL_MECHANISM";
/// `sasl.username`.
pub const ENV_SASL_USERNAME: &str = "TASKLOG_KAFKA_SASL_USERNAME";
/// `sasl.password`.
pub const ENV_SASL_PASSWORD: &str = "TASKLOG_KAFKA_SASL_PASSWORD";
/// `ssl.ca.location`.
pub const ENV_SSL_CA_LOCATION: &str = "TASKLOG_KAFKA_SSL_CA_LOCATION";
/// `ssl.certificate.location`.
pub const ENV_SSL_CERTIFICATE_LOCATION: &str = "TASKLOG_KAFKA_SSL_CERTIFICATE_LOCATION";
/// `ssl.key.location`.
pub const ENV_SSL_KEY_LOCATION: &str = "TASKLOG_KAFKA_SSL_KEY_LOCATION";
/// `ssl.key.password`.
pub const ENV_SSL_KEY_PASSWORD: &str = "TASKLOG_KAFKA_SSL_KEY_PASSWORD";
/// `ssl.endpoint.identification.algorithm`.
pub const ENV_SSL_ENDPOINT_IDENTIFICATION_ALGORITHM: &str =
    "TASKLOG_KAFKA_SSL_ENDPOINT_IDENTIFICATION_ALGORITHM";

/// Every variable [`KafkaSecurity::from_env`] reads.
pub const ENV_VARS: [&str; 9] = [
    ENV_SECURITY_PROTOCOL,
    ENV_SASL_MECHANISM,
    ENV_SASL_USERNAME,
    ENV_SASL_PASSWORD,
    ENV_SSL_CA_LOCATION,
    ENV_SSL_CERTIFICATE_LOCATION,
    ENV_SSL_KEY_LOCATION,
    ENV_SSL_KEY_PASSWORD,
    ENV_SSL_ENDPOINT_IDENTIFICATION_ALGORITHM,
];

/// A secret (a password): `Debug` prints `[redacted]`, and there is no `Display`, so it
/// cannot end up in a log line or an error message by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself, for handing to librdkafka. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// `security.protocol`: how tasklog talks to the brokers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SecurityProtocol {
    /// No TLS, no authentication (the default).
    #[default]
    Plaintext,
    /// TLS, no SASL (a client certificate may authenticate).
    Ssl,
    /// SASL authentication without TLS.
    SaslPlaintext,
    /// SASL authentication over TLS.
    SaslSsl,
}

impl SecurityProtocol {
    /// The name Kafka and librdkafka use (`SASL_SSL`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "PLAINTEXT",
            SecurityProtocol::Ssl => "SSL",
            SecurityProtocol::SaslPlaintext => "SASL_PLAINTEXT",
            SecurityProtocol::SaslSsl => "SASL_SSL",
        }
    }

    /// Parses a name, ignoring case.
    pub fn parse(value: &str) -> Option<SecurityProtocol> {
        [
            SecurityProtocol::Plaintext,
            SecurityProtocol::Ssl,
            SecurityProtocol::SaslPlaintext,
            SecurityProtocol::SaslSsl,
        ]
        .into_iter()
        .find(|p| p.as_str().eq_ignore_ascii_case(value.trim()))
    }

    /// Whether it authenticates with SASL.
    pub fn uses_sasl(self) -> bool {
        matches!(
            self,
            SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
        )
    }

    /// Whether it runs over TLS.
    pub fn uses_tls(self) -> bool {
        matches!(self, SecurityProtocol::Ssl | SecurityProtocol::SaslSsl)
    }
}

impl fmt::Display for SecurityProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `sasl.mechanism`: the SASL mechanisms tasklog supports (GSSAPI/Kerberos is not built
/// into librdkafka; OAUTHBEARER would need a token provider tasklog does not have).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaslMechanism {
    /// `PLAIN`: the password itself goes to the broker (use it over TLS only).
    Plain,
    /// `SCRAM-SHA-256`.
    ScramSha256,
    /// `SCRAM-SHA-512`.
    ScramSha512,
}

impl SaslMechanism {
    /// The name Kafka and librdkafka use (`SCRAM-SHA-512`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }

    /// Parses a name, ignoring case.
    pub fn parse(value: &str) -> Option<SaslMechanism> {
        [
            SaslMechanism::Plain,
            SaslMechanism::ScramSha256,
            SaslMechanism::ScramSha512,
        ]
        .into_iter()
        .find(|m| m.as_str().eq_ignore_ascii_case(value.trim()))
    }
}

impl fmt::Display for SaslMechanism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `ssl.endpoint.identification.algorithm`: whether the broker's certificate must name
/// the host tasklog connects to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EndpointIdentification {
    /// The certificate must match the broker's host name or IP address (the default).
    #[default]
    Https,
    /// Only the certificate chain is checked, not the name in it.
    None,
}

impl EndpointIdentification {
    /// The value librdkafka takes (`https`, `none`).
    pub fn as_str(self) -> &'static str {
        match self {
            EndpointIdentification::Https => "https",
            EndpointIdentification::None => "none",
        }
    }

    /// Parses `https` or `none`, ignoring case.
    pub fn parse(value: &str) -> Option<EndpointIdentification> {
        [EndpointIdentification::Https, EndpointIdentification::None]
            .into_iter()
            .find(|e| e.as_str().eq_ignore_ascii_case(value.trim()))
    }
}

/// SASL credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaslCredentials {
    /// The mechanism.
    pub mechanism: SaslMechanism,
    /// The user name (not secret: it appears in `Display`).
    pub username: String,
    /// The password.
    pub password: Secret,
}

/// TLS settings (used with `SSL` and `SASL_SSL`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsSettings {
    /// PEM file (or directory) of the CA certificates that sign the brokers' certificates.
    /// None: OpenSSL's system store.
    pub ca_location: Option<PathBuf>,
    /// The client's certificate (PEM), for brokers that authenticate clients by certificate.
    pub certificate_location: Option<PathBuf>,
    /// The client's private key (PEM).
    pub key_location: Option<PathBuf>,
    /// The password of an encrypted private key.
    pub key_password: Option<Secret>,
    /// Whether the broker's certificate must name its host. None: librdkafka's default
    /// (`https`: it must).
    pub endpoint_identification: Option<EndpointIdentification>,
}

impl TlsSettings {
    fn is_empty(&self) -> bool {
        *self == TlsSettings::default()
    }
}

/// How tasklog's Kafka clients authenticate and encrypt: the security protocol, SASL
/// credentials and TLS settings, checked by [`KafkaSecurity::validate`] and applied to
/// every client by [`client_config`](super::client_config).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KafkaSecurity {
    /// `security.protocol`.
    pub protocol: SecurityProtocol,
    /// SASL credentials: required with `SASL_PLAINTEXT` and `SASL_SSL`, refused otherwise.
    pub sasl: Option<SaslCredentials>,
    /// TLS settings: only with `SSL` and `SASL_SSL`.
    pub tls: TlsSettings,
}

/// Why the Kafka security settings are refused. Names the variable, never a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KafkaSecurityError {
    /// A variable has a value that is not one of the known ones.
    #[error("{variable}={value:?} is not supported (expected one of: {expected})")]
    UnknownValue {
        /// The variable.
        variable: &'static str,
        /// Its value (never that of a secret variable).
        value: String,
        /// What it may be.
        expected: &'static str,
    },
    /// A variable is missing that the others make necessary.
    #[error("{variable} must be set: {why}")]
    Missing {
        /// The variable.
        variable: &'static str,
        /// Why it is needed.
        why: String,
    },
    /// A variable is set that the others make meaningless.
    #[error("{variable} is set, but {why}")]
    Unexpected {
        /// The variable.
        variable: &'static str,
        /// Why it does not apply.
        why: String,
    },
    /// A variable holds bytes that are not UTF-8.
    #[error("{variable} is not valid UTF-8")]
    NotUnicode {
        /// The variable.
        variable: &'static str,
    },
    /// A file a variable names cannot be read.
    #[error("{variable} names {}, which cannot be read: {reason}", path.display())]
    File {
        /// The variable.
        variable: &'static str,
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        reason: String,
    },
}

impl KafkaSecurity {
    /// The settings of the `TASKLOG_KAFKA_*` variables ([`ENV_VARS`]), validated. Unset
    /// and empty variables count as absent; nothing set means `PLAINTEXT`.
    pub fn from_env() -> Result<KafkaSecurity, KafkaSecurityError> {
        let mut values = Vec::with_capacity(ENV_VARS.len());
        for variable in ENV_VARS {
            match std::env::var(variable) {
                Ok(v) => values.push((variable, v)),
                Err(std::env::VarError::NotPresent) => {}
                Err(std::env::VarError::NotUnicode(_)) => {
                    return Err(KafkaSecurityError::NotUnicode { variable });
                }
            }
        }
        KafkaSecurity::from_lookup(|name| {
            values
                .iter()
                .find(|(variable, _)| *variable == name)
                .map(|(_, v)| v.clone())
        })
    }

    /// The settings from any source of variables (`lookup` answers a variable's value),
    /// validated: what [`KafkaSecurity::from_env`] does with the process environment.
    pub fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<KafkaSecurity, KafkaSecurityError> {
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let path = |name: &str| get(name).map(PathBuf::from);
        let protocol = match get(ENV_SECURITY_PROTOCOL) {
            None => SecurityProtocol::Plaintext,
            Some(v) => SecurityProtocol::parse(&v).ok_or(KafkaSecurityError::UnknownValue {
                variable: ENV_SECURITY_PROTOCOL,
                value: v,
                expected: "PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL",
            })?,
        };
        let mechanism = match get(ENV_SASL_MECHANISM) {
            None => None,
            Some(v) => Some(SaslMechanism::parse(&v).ok_or(
                KafkaSecurityError::UnknownValue {
                    variable: ENV_SASL_MECHANISM,
                    value: v,
                    expected: "PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 (GSSAPI is not built in; OAUTHBEARER needs a token provider tasklog does not have)",
                },
            )?),
        };
        let username = get(ENV_SASL_USERNAME);
        let password = lookup(ENV_SASL_PASSWORD)
            .filter(|v| !v.is_empty())
            .map(Secret);
        let sasl = match (mechanism, username, password) {
            (None, None, None) => None,
            (None, Some(_), _) | (None, _, Some(_)) => {
                return Err(KafkaSecurityError::Missing {
                    variable: ENV_SASL_MECHANISM,
                    why: "SASL credentials are given (PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)"
                        .into(),
                });
            }
            (Some(mechanism), username, password) => {
                let why = format!("{ENV_SASL_MECHANISM} is {mechanism}");
                Some(SaslCredentials {
                    mechanism,
                    username: username.ok_or_else(|| KafkaSecurityError::Missing {
                        variable: ENV_SASL_USERNAME,
                        why: why.clone(),
                    })?,
                    password: password.ok_or(KafkaSecurityError::Missing {
                        variable: ENV_SASL_PASSWORD,
                        why,
                    })?,
                })
            }
        };
        let endpoint_identification = match get(ENV_SSL_ENDPOINT_IDENTIFICATION_ALGORITHM) {
            None => None,
            Some(v) => Some(EndpointIdentification::parse(&v).ok_or(
                KafkaSecurityError::UnknownValue {
                    variable: ENV_SSL_ENDPOINT_IDENTIFICATION_ALGORITHM,
                    value: v,
                    expected: "https, none",
                },
            )?),
        };
        let security = KafkaSecurity {
            protocol,
            sasl,
            tls: TlsSettings {
                ca_location: path(ENV_SSL_CA_LOCATION),
                certificate_location: path(ENV_SSL_CERTIFICATE_LOCATION),
                key_location: path(ENV_SSL_KEY_LOCATION),
                key_password: lookup(ENV_SSL_KEY_PASSWORD)
                    .filter(|v| !v.is_empty())
                    .map(Secret),
                endpoint_identification,
            },
        };
        security.validate()?;
        Ok(security)
    }

    /// Checks that the settings fit together: SASL credentials exactly with a `SASL_*`
    /// protocol, TLS settings only with a TLS protocol, a client key with its
    /// certificate, and every named file readable. Errors name the `TASKLOG_KAFKA_*`
    /// variable that sets the offending field.
    pub fn validate(&self) -> Result<(), KafkaSecurityError> {
        let protocol = self.protocol;
        match &self.sasl {
            None if protocol.uses_sasl() => {
                return Err(KafkaSecurityError::Missing {
                    variable: ENV_SASL_MECHANISM,
                    why: format!("{ENV_SECURITY_PROTOCOL} is {protocol}"),
                });
            }
            Some(_) if !protocol.uses_sasl() => {
                return Err(KafkaSecurityError::Unexpected {
                    variable: ENV_SASL_MECHANISM,
                    why: format!(
                        "{ENV_SECURITY_PROTOCOL} is {protocol} (SASL needs SASL_PLAINTEXT or SASL_SSL)"
                    ),
                });
            }
            Some(sasl) => {
                let why = format!("{ENV_SASL_MECHANISM} is {}", sasl.mechanism);
                if sasl.username.trim().is_empty() {
                    return Err(KafkaSecurityError::Missing {
                        variable: ENV_SASL_USERNAME,
                        why,
                    });
                }
                if sasl.password.expose().is_empty() {
                    return Err(KafkaSecurityError::Missing {
                        variable: ENV_SASL_PASSWORD,
                        why,
                    });
                }
            }
            None => {}
        }
        let tls = &self.tls;
        if !protocol.uses_tls() && !tls.is_empty() {
            let variable = [
                (tls.ca_location.is_some(), ENV_SSL_CA_LOCATION),
                (
                    tls.certificate_location.is_some(),
                    ENV_SSL_CERTIFICATE_LOCATION,
                ),
                (tls.key_location.is_some(), ENV_SSL_KEY_LOCATION),
                (tls.key_password.is_some(), ENV_SSL_KEY_PASSWORD),
                (true, ENV_SSL_ENDPOINT_IDENTIFICATION_ALGORITHM),
            ]
            .into_iter()
            .find_map(|(set, v)| set.then_some(v))
            .unwrap_or(ENV_SSL_ENDPOINT_IDENTIFICATION_ALGORITHM);
            return Err(KafkaSecurityError::Unexpected {
                variable,
                why: format!(
                    "{ENV_SECURITY_PROTOCOL} is {protocol} (TLS settings need SSL or SASL_SSL)"
                ),
            });
        }
        match (&tls.certificate_location, &tls.key_location) {
            (Some(_), None) => {
                return Err(KafkaSecurityError::Missing {
                    variable: ENV_SSL_KEY_LOCATION,
                    why: format!("{ENV_SSL_CERTIFICATE_LOCATION} is set"),
                });
            }
            (None, Some(_)) => {
                return Err(KafkaSecurityError::Missing {
                    variable: ENV_SSL_CERTIFICATE_LOCATION,
                    why: format!("{ENV_SSL_KEY_LOCATION} is set"),
                });
            }
            _ => {}
        }
        if tls.key_password.is_some() && tls.key_location.is_none() {
            return Err(KafkaSecurityError::Unexpected {
                variable: ENV_SSL_KEY_PASSWORD,
                why: format!("{ENV_SSL_KEY_LOCATION} is not"),
            });
        }
        for (variable, path) in [
            (ENV_SSL_CA_LOCATION, &tls.ca_location),
            (ENV_SSL_CERTIFICATE_LOCATION, &tls.certificate_location),
            (ENV_SSL_KEY_LOCATION, &tls.key_location),
        ] {
            if let Some(path) = path {
                readable(variable, path)?;
            }
        }
        Ok(())
    }

    /// The settings of this process's environment, read and validated once (the first
    /// call) and kept for the life of the process. `tasklog` checks them at start, so a
    /// bad setting ends it before any client is made.
    pub fn global() -> Result<&'static KafkaSecurity, &'static KafkaSecurityError> {
        static GLOBAL: OnceLock<Result<KafkaSecurity, KafkaSecurityError>> = OnceLock::new();
        GLOBAL
            .get_or_init(|| {
                let security = KafkaSecurity::from_env();
                if let Ok(s) = &security
                    && *s != KafkaSecurity::default()
                {
                    tracing::info!(kafka_security = %s, "Kafka security settings");
                }
                security
            })
            .as_ref()
    }

    /// Sets the librdkafka properties of these settings on `config`. Nothing for the
    /// default (`PLAINTEXT` and nothing else).
    pub fn apply(&self, config: &mut ClientConfig) {
        if *self == KafkaSecurity::default() {
            return;
        }
        config.set(
            "security.protocol",
            self.protocol.as_str().to_ascii_lowercase(),
        );
        if let Some(sasl) = &self.sasl {
            config
                .set("sasl.mechanism", sasl.mechanism.as_str())
                .set("sasl.username", &sasl.username)
                .set("sasl.password", sasl.password.expose());
        }
        let tls = &self.tls;
        let paths = [
            ("ssl.ca.location", &tls.ca_location),
            ("ssl.certificate.location", &tls.certificate_location),
            ("ssl.key.location", &tls.key_location),
        ];
        for (key, path) in paths {
            if let Some(path) = path {
                config.set(key, path.to_string_lossy());
            }
        }
        if let Some(password) = &tls.key_password {
            config.set("ssl.key.password", password.expose());
        }
        if let Some(e) = tls.endpoint_identification {
            config.set("ssl.endpoint.identification.algorithm", e.as_str());
        }
    }
}

/// One line for logs: the protocol, the mechanism and user, the CA and client
/// certificate files. No secret.
impl fmt::Display for KafkaSecurity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.protocol)?;
        if let Some(sasl) = &self.sasl {
            write!(f, ", {} as user {:?}", sasl.mechanism, sasl.username)?;
        }
        let tls = &self.tls;
        if let Some(ca) = &tls.ca_location {
            write!(f, ", CA {}", ca.display())?;
        }
        if let Some(cert) = &tls.certificate_location {
            write!(f, ", client certificate {}", cert.display())?;
        }
        if tls.endpoint_identification == Some(EndpointIdentification::None) {
            f.write_str(", broker host name not checked")?;
        }
        Ok(())
    }
}

/// A client context that remembers why the brokers refused a connection: librdkafka
/// reports a failed SASL authentication or TLS handshake only in its log, and the call
/// that needed the connection fails with a bare `BrokerTransportFailure`. Used by the
/// metadata calls every role makes at start, so a wrong password is named as such.
#[derive(Default)]
pub struct RefusalRecorder {
    refusal: std::sync::Mutex<Option<String>>,
}

impl RefusalRecorder {
    /// What librdkafka said about the last refused connection (authentication or TLS),
    /// if any. Holds no secret: librdkafka does not log credentials, and this process's
    /// SASL and key passwords are cut out should they appear.
    pub fn refusal(&self) -> Option<String> {
        self.refusal
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// Whether a librdkafka log line tells of refused credentials or a failed TLS handshake.
fn is_refusal(message: &str) -> bool {
    [
        "SASL authentication error",
        "Authentication failed",
        "SSL handshake failed",
        "certificate verify failed",
        "Unsupported SASL mechanism",
    ]
    .iter()
    .any(|m| message.contains(m))
}

/// `message` with this process's secrets replaced by `[redacted]`.
fn scrub(message: &str) -> String {
    let mut text = message.to_string();
    if let Ok(security) = KafkaSecurity::global() {
        let secrets = [
            security.sasl.as_ref().map(|s| &s.password),
            security.tls.key_password.as_ref(),
        ];
        for secret in secrets.into_iter().flatten() {
            if !secret.expose().is_empty() {
                text = text.replace(secret.expose(), "[redacted]");
            }
        }
    }
    text
}

impl RefusalRecorder {
    fn record(&self, text: String) {
        *self
            .refusal
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(text);
    }
}

impl rdkafka::ClientContext for RefusalRecorder {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        use rdkafka::types::RDKafkaErrorCode as E;
        let reason = scrub(reason);
        match error.rdkafka_error_code() {
            Some(E::Authentication | E::SSL | E::SaslAuthenticationFailed) => {
                tracing::warn!(target: "rdkafka", "{error}: {reason}");
                self.record(reason);
            }
            _ => tracing::debug!(target: "rdkafka", "{error}: {reason}"),
        }
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        let severe = matches!(level, L::Emerg | L::Alert | L::Critical | L::Error);
        if severe && is_refusal(message) {
            let message = scrub(message);
            // "[thrd:...]: sasl_ssl://host:port/bootstrap: SASL authentication error: ..."
            let text = message
                .split_once("]: ")
                .map_or(message.as_str(), |(_, rest)| rest)
                .to_string();
            tracing::warn!(target: "rdkafka", facility = fac, "{text}");
            self.record(text);
        } else {
            tracing::debug!(target: "rdkafka", facility = fac, "{}", scrub(message));
        }
    }
}

impl rdkafka::consumer::ConsumerContext for RefusalRecorder {}

fn readable(variable: &'static str, path: &Path) -> Result<(), KafkaSecurityError> {
    let result = if path.is_dir() {
        std::fs::read_dir(path).map(|_| ())
    } else {
        std::fs::File::open(path).map(|_| ())
    };
    result.map_err(|e| KafkaSecurityError::File {
        variable,
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWORD: &str = "s3cr3t-Pa55word";

    fn parse(vars: &[(&str, &str)]) -> Result<KafkaSecurity, KafkaSecurityError> {
        KafkaSecurity::from_lookup(|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
    }

    fn scram() -> Vec<(&'static str, &'static str)> {
        vec![
            (ENV_SECURITY_PROTOCOL, "sasl_plaintext"),
            (ENV_SASL_MECHANISM, "scram-sha-512"),
            (ENV_SASL_USERNAME, "tasklog"),
            (ENV_SASL_PASSWORD, PASSWORD),
        ]
    }

    #[test]
    fn nothing_set_is_plaintext_and_changes_no_setting() {
        let s = parse(&[]).expect("valid");
        assert_eq!(s, KafkaSecurity::default());
        let mut config = ClientConfig::new();
        s.apply(&mut config);
        assert_eq!(config.get("security.protocol"), None);
        // Empty values count as unset.
        assert_eq!(
            parse(&[(ENV_SECURITY_PROTOCOL, ""), (ENV_SASL_PASSWORD, "")]).expect("valid"),
            KafkaSecurity::default()
        );
    }

    #[test]
    fn scram_settings_reach_librdkafka() {
        let s = parse(&scram()).expect("valid");
        assert_eq!(s.protocol, SecurityProtocol::SaslPlaintext);
        let mut config = ClientConfig::new();
        s.apply(&mut config);
        assert_eq!(config.get("security.protocol"), Some("sasl_plaintext"));
        assert_eq!(config.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(config.get("sasl.username"), Some("tasklog"));
        assert_eq!(config.get("sasl.password"), Some(PASSWORD));
        assert_eq!(config.get("ssl.ca.location"), None);
    }

    #[test]
    fn tls_settings_reach_librdkafka() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\n").expect("write");
        let ca = ca.to_str().expect("utf-8");
        let mut vars = scram();
        vars[0].1 = "SASL_SSL";
        vars.push((ENV_SSL_CA_LOCATION, ca));
        vars.push((ENV_SSL_ENDPOINT_IDENTIFICATION_ALGORITHM, "none"));
        let s = parse(&vars).expect("valid");
        let mut config = ClientConfig::new();
        s.apply(&mut config);
        assert_eq!(config.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(config.get("ssl.ca.location"), Some(ca));
        assert_eq!(
            config.get("ssl.endpoint.identification.algorithm"),
            Some("none")
        );
        // librdkafka accepts every value (the build has SSL and SCRAM).
        let created: Result<rdkafka::producer::BaseProducer, _> = config
            .set("bootstrap.servers", "127.0.0.1:1")
            .set("ssl.ca.location", "probe")
            .create();
        assert!(created.is_ok(), "{:?}", created.err());
    }

    #[test]
    fn librdkafka_is_built_with_ssl_and_scram() {
        let features = ClientConfig::new()
            .create_native_config()
            .and_then(|native| native.get("builtin.features"))
            .expect("builtin.features");
        for feature in ["ssl", "sasl_scram", "sasl_plain"] {
            assert!(
                features.split(',').any(|f| f == feature),
                "librdkafka lacks {feature}: {features}"
            );
        }
    }

    #[test]
    fn debug_display_and_errors_never_show_a_secret() {
        let mut vars = scram();
        vars[0].1 = "SASL_SSL";
        vars.push((ENV_SSL_KEY_PASSWORD, PASSWORD));
        // A key password without a key is refused: the error must not show it.
        let err = parse(&vars).expect_err("no key location");
        assert!(!format!("{err} {err:?}").contains(PASSWORD), "{err}");
        let s = parse(&scram()).expect("valid");
        let shown = format!("{s} {s:?} {:?}", s.sasl);
        assert!(!shown.contains(PASSWORD), "{shown}");
        assert!(shown.contains("[redacted]"), "{shown}");
        assert!(s.to_string().contains("SCRAM-SHA-512 as user \"tasklog\""));
        let mut config = ClientConfig::new();
        s.apply(&mut config);
        assert!(!format!("{config:?}").contains(PASSWORD));
    }

    #[test]
    fn bad_values_name_their_variable() {
        let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
            (
                vec![(ENV_SECURITY_PROTOCOL, "TLS")],
                "TASKLOG_KAFKA_SECURITY_PROTOCOL=\"TLS\" is not supported",
            ),
            (
                {
                    let mut v = scram();
                    v[1].1 = "GSSAPI";
                    v
                },
                "TASKLOG_KAFKA_SASL_MECHANISM=\"GSSAPI\" is not supported",
            ),
            (
                vec![(ENV_SECURITY_PROTOCOL, "SASL_SSL")],
                "TASKLOG_KAFKA_SASL_MECHANISM must be set",
            ),
            (
                scram()[1..].to_vec(),
                "TASKLOG_KAFKA_SASL_MECHANISM is set, but TASKLOG_KAFKA_SECURITY_PROTOCOL is PLAINTEXT",
            ),
            (
                scram()[..3].to_vec(),
                "TASKLOG_KAFKA_SASL_PASSWORD must be set",
            ),
            (
                vec![(ENV_SASL_USERNAME, "u"), (ENV_SASL_PASSWORD, PASSWORD)],
                "TASKLOG_KAFKA_SASL_MECHANISM must be set",
            ),
            (
                vec![(ENV_SSL_CA_LOCATION, "/etc/hostname")],
                "TASKLOG_KAFKA_SSL_CA_LOCATION is set, but TASKLOG_KAFKA_SECURITY_PROTOCOL is PLAINTEXT",
            ),
            (
                vec![
                    (ENV_SECURITY_PROTOCOL, "SSL"),
                    (ENV_SSL_CA_LOCATION, "/nonexistent/ca.pem"),
                ],
                "TASKLOG_KAFKA_SSL_CA_LOCATION names /nonexistent/ca.pem, which cannot be read",
            ),
            (
                vec![
                    (ENV_SECURITY_PROTOCOL, "SSL"),
                    (ENV_SSL_KEY_LOCATION, "/etc/hostname"),
                ],
                "TASKLOG_KAFKA_SSL_CERTIFICATE_LOCATION must be set",
            ),
            (
                vec![
                    (ENV_SECURITY_PROTOCOL, "SSL"),
                    (ENV_SSL_ENDPOINT_IDENTIFICATION_ALGORITHM, "strict"),
                ],
                "TASKLOG_KAFKA_SSL_ENDPOINT_IDENTIFICATION_ALGORITHM=\"strict\" is not supported",
            ),
        ];
        for (vars, expected) in cases {
            let err = parse(&vars).expect_err(expected).to_string();
            assert!(err.starts_with(expected), "{vars:?}: {err}");
            assert!(!err.contains(PASSWORD), "{err}");
        }
    }
}
