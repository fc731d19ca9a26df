//! Postgres over TLS, as the database URL says: every connection tasklog makes (the pool,
//! `LISTEN`, the scheduler's leader lock, database creation) goes through [`parse`] and
//! [`connect`], with OpenSSL.
//!
//! What the URL may say (libpq's names; the URL form `postgres://...?sslmode=...`, or
//! the key/value form with unquoted values):
//!
//! | `sslmode` | TLS | certificate checked |
//! |---|---|---|
//! | absent | no (as before; libpq would `prefer`), unless `sslrootcert` is given: `verify-ca` | — |
//! | `disable` | no | — |
//! | `prefer` | if the server offers it, else plaintext | no |
//! | `require` | yes, or no connection | no; with `sslrootcert`: as `verify-ca` (as libpq does) |
//! | `verify-ca` | yes | signed by `sslrootcert` (default: OpenSSL's system CA store) |
//! | `verify-full` | yes | as `verify-ca`, and it names the host connected to |
//!
//! `sslrootcert=FILE` is a PEM file of the CA certificates to trust (then only those).
//! Client certificates (`sslcert`, `sslkey`) and `sslmode=allow` are not supported: they
//! are refused with an error that says so.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::OnceLock;

use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
use openssl::x509::X509;
use openssl::x509::store::X509StoreBuilder;
use postgres_openssl::MakeTlsConnector;
use tokio_postgres::config::SslMode;
use tokio_postgres::{Client, Config, Socket};

/// A connection made by [`connect`]: drive it (spawn it, or poll its messages).
pub type PgConnection = tokio_postgres::Connection<Socket, postgres_openssl::TlsStream<Socket>>;

/// `sslmode`, as libpq names them (tokio-postgres itself knows the first three).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgSslMode {
    /// No TLS.
    Disable,
    /// TLS when the server offers it, unverified.
    Prefer,
    /// TLS, unverified.
    Require,
    /// TLS, the certificate chain verified.
    VerifyCa,
    /// TLS, the chain verified and the host name checked.
    VerifyFull,
}

impl PgSslMode {
    fn parse(value: &str) -> Result<PgSslMode, PgTlsError> {
        Ok(match value {
            "disable" => PgSslMode::Disable,
            "prefer" => PgSslMode::Prefer,
            "require" => PgSslMode::Require,
            "verify-ca" => PgSslMode::VerifyCa,
            "verify-full" => PgSslMode::VerifyFull,
            other => return Err(PgTlsError::SslMode(other.to_string())),
        })
    }
}

/// Why a database URL's TLS settings are refused. Never contains the URL (it may hold
/// a password).
#[derive(Debug, thiserror::Error)]
pub enum PgTlsError {
    /// The URL does not parse.
    #[error("invalid database URL: {0}")]
    Url(String),
    /// An `sslmode` tasklog does not support.
    #[error(
        "sslmode={0:?} is not supported in the database URL (disable, prefer, require, verify-ca, verify-full)"
    )]
    SslMode(String),
    /// An option of libpq's that tasklog does not support.
    #[error("{0} is not supported in the database URL (client certificates are not)")]
    Unsupported(&'static str),
    /// The `sslrootcert` file cannot be read or holds no certificate.
    #[error("sslrootcert {}: {reason}", path.display())]
    RootCert {
        /// The file.
        path: PathBuf,
        /// Why it does not do.
        reason: String,
    },
    /// OpenSSL could not set up the connector.
    #[error("cannot set up TLS for Postgres: {0}")]
    Tls(#[from] openssl::error::ErrorStack),
}

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PgConnectError {
    /// The URL's settings are refused.
    #[error(transparent)]
    Settings(#[from] PgTlsError),
    /// Postgres (or the TLS handshake) refused, or a query failed.
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
}

/// A database URL's connection settings, with the TLS connector its `sslmode` and
/// `sslrootcert` ask for.
#[derive(Clone)]
pub struct PgTarget {
    /// Connection settings for tokio-postgres (its `ssl_mode` set from `sslmode`).
    pub config: Config,
    /// The TLS connector (unused with `sslmode=disable`).
    pub tls: MakeTlsConnector,
    /// The `sslmode` asked for.
    pub mode: PgSslMode,
}

impl std::fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // tokio_postgres::Config's Debug redacts the password.
        f.debug_struct("PgTarget")
            .field("config", &self.config)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl PgTarget {
    /// Connects once.
    pub async fn connect(&self) -> Result<(Client, PgConnection), tokio_postgres::Error> {
        self.config.connect(self.tls.clone()).await
    }
}

/// Parses a database URL (or key/value string) and makes its TLS connector.
pub fn parse(url: &str) -> Result<PgTarget, PgTlsError> {
    let (rest, sslmode, rootcert) = take_tls_options(url)?;
    let mut config = Config::from_str(&rest).map_err(|e| PgTlsError::Url(e.to_string()))?;
    let rootcert = rootcert.map(PathBuf::from);
    let mode = match (
        sslmode.as_deref().map(PgSslMode::parse).transpose()?,
        &rootcert,
    ) {
        (None, None) => PgSslMode::Disable,
        (None, Some(_)) | (Some(PgSslMode::Require), Some(_)) => PgSslMode::VerifyCa,
        (Some(mode), _) => mode,
    };
    config.ssl_mode(match mode {
        PgSslMode::Disable => SslMode::Disable,
        PgSslMode::Prefer => SslMode::Prefer,
        _ => SslMode::Require,
    });
    let tls = match mode {
        PgSslMode::VerifyCa | PgSslMode::VerifyFull => {
            verifying(rootcert.as_deref(), mode == PgSslMode::VerifyFull)?
        }
        _ => unverified()?,
    };
    Ok(PgTarget { config, tls, mode })
}

/// Connects once to `url` ([`parse`], then [`PgTarget::connect`]).
pub async fn connect(url: &str) -> Result<(Client, PgConnection), PgConnectError> {
    Ok(parse(url)?.connect().await?)
}

/// The connector of `prefer` and `require`: TLS without checking the certificate (as
/// libpq does). Made once.
fn unverified() -> Result<MakeTlsConnector, PgTlsError> {
    static CONNECTOR: OnceLock<MakeTlsConnector> = OnceLock::new();
    if let Some(c) = CONNECTOR.get() {
        return Ok(c.clone());
    }
    let mut builder = SslConnector::builder(SslMethod::tls_client())?;
    builder.set_verify(SslVerifyMode::NONE);
    let mut tls = MakeTlsConnector::new(builder.build());
    tls.set_callback(|config, _| {
        config.set_verify_hostname(false);
        Ok(())
    });
    Ok(CONNECTOR.get_or_init(|| tls).clone())
}

/// The connector of `verify-ca` and `verify-full`: the chain must lead to a certificate
/// of `rootcert` (only those; without it, OpenSSL's system store), and with
/// `check_host` the certificate must name the host.
fn verifying(rootcert: Option<&Path>, check_host: bool) -> Result<MakeTlsConnector, PgTlsError> {
    let mut builder = SslConnector::builder(SslMethod::tls_client())?;
    builder.set_verify(SslVerifyMode::PEER);
    if let Some(path) = rootcert {
        let root_err = |reason: String| PgTlsError::RootCert {
            path: path.to_path_buf(),
            reason,
        };
        let pem = std::fs::read(path).map_err(|e| root_err(e.to_string()))?;
        let certs = X509::stack_from_pem(&pem).map_err(|e| root_err(e.to_string()))?;
        if certs.is_empty() {
            return Err(root_err("no PEM certificate in it".into()));
        }
        let mut store = X509StoreBuilder::new()?;
        for cert in certs {
            store.add_cert(cert)?;
        }
        builder.set_cert_store(store.build());
    }
    let mut tls = MakeTlsConnector::new(builder.build());
    if !check_host {
        tls.set_callback(|config, _| {
            config.set_verify_hostname(false);
            Ok(())
        });
    }
    Ok(tls)
}

/// Takes `sslmode` and `sslrootcert` out of a URL's query (or a key/value string),
/// leaving the rest as it was written. Refuses `sslcert`, `sslkey` and `sslpassword`.
fn take_tls_options(url: &str) -> Result<(String, Option<String>, Option<String>), PgTlsError> {
    let (mut sslmode, mut rootcert) = (None, None);
    let mut take = |key: &str, value: String| -> Result<bool, PgTlsError> {
        match key {
            "sslmode" => sslmode = Some(value),
            "sslrootcert" => rootcert = Some(value),
            "sslcert" => return Err(PgTlsError::Unsupported("sslcert")),
            "sslkey" => return Err(PgTlsError::Unsupported("sslkey")),
            "sslpassword" => return Err(PgTlsError::Unsupported("sslpassword")),
            _ => return Ok(false),
        }
        Ok(true)
    };
    let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        match url.split_once('?') {
            None => url.to_string(),
            Some((base, query)) => {
                let mut kept = Vec::new();
                for piece in query.split('&').filter(|p| !p.is_empty()) {
                    let (key, value) = form_urlencoded::parse(piece.as_bytes())
                        .next()
                        .map(|(k, v)| (k.into_owned(), v.into_owned()))
                        .unwrap_or_default();
                    if !take(&key, value)? {
                        kept.push(piece);
                    }
                }
                if kept.is_empty() {
                    base.to_string()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
        }
    } else {
        let mut kept = Vec::new();
        for token in url.split_whitespace() {
            let taken = match token.split_once('=') {
                Some((key, value)) => take(key, value.trim_matches('\'').to_string())?,
                None => false,
            };
            if !taken {
                kept.push(token);
            }
        }
        kept.join(" ")
    };
    Ok((rest, sslmode, rootcert))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_and_rootcert_leave_the_url() {
        let (rest, mode, root) = take_tls_options(
            "postgres://u:p%40ss@h:5432/db?application_name=a%20b&sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem",
        )
        .expect("parses");
        assert_eq!(rest, "postgres://u:p%40ss@h:5432/db?application_name=a%20b");
        assert_eq!(mode.as_deref(), Some("verify-full"));
        assert_eq!(root.as_deref(), Some("/etc/ca.pem"));
        let (rest, mode, _) =
            take_tls_options("host=h user=u sslmode=require dbname=d").expect("parses");
        assert_eq!(rest, "host=h user=u dbname=d");
        assert_eq!(mode.as_deref(), Some("require"));
        let (rest, mode, root) = take_tls_options("postgres://h/db").expect("parses");
        assert_eq!((rest.as_str(), mode, root), ("postgres://h/db", None, None));
    }

    #[test]
    fn modes_follow_libpq() {
        let mode = |url: &str| parse(url).map(|t| (t.mode, t.config.get_ssl_mode()));
        assert_eq!(
            mode("postgres://h/db").unwrap(),
            (PgSslMode::Disable, SslMode::Disable)
        );
        assert_eq!(
            mode("postgres://h/db?sslmode=prefer").unwrap(),
            (PgSslMode::Prefer, SslMode::Prefer)
        );
        assert_eq!(
            mode("postgres://h/db?sslmode=require").unwrap(),
            (PgSslMode::Require, SslMode::Require)
        );
        assert_eq!(
            mode("postgres://h/db?sslmode=verify-full").unwrap(),
            (PgSslMode::VerifyFull, SslMode::Require)
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing.pem");
        let err = parse(&format!(
            "postgres://h/db?sslmode=require&sslrootcert={}",
            missing.display()
        ))
        .expect_err("no such file");
        assert!(err.to_string().starts_with("sslrootcert "), "{err}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").expect("write");
        let err = parse(&format!("postgres://h/db?sslrootcert={}", empty.display()))
            .expect_err("no certificate");
        assert!(err.to_string().contains("sslrootcert"), "{err}");
        let err = parse("postgres://u:hunter2@h/db?sslmode=allow").expect_err("allow");
        assert!(err.to_string().contains("sslmode=\"allow\""), "{err}");
        assert!(!err.to_string().contains("hunter2"));
        let err = parse("postgres://h/db?sslcert=/c.pem").expect_err("client certs");
        assert!(err.to_string().contains("sslcert"), "{err}");
    }
}
