//! The read side of tokens: the projected grants, and the credential store that holds
//! each token's hash (off the log; see `migrations/0005_auth.sql`).

use uuid::Uuid;

use super::{Store, StoreError, ctx};
use crate::events::auth::TokenState;

/// A token that may authenticate: its grant and the hash of its secret.
#[derive(Debug, Clone)]
pub struct Credential {
    /// The projected grant.
    pub token: TokenState,
    /// SHA-256 of the secret.
    pub hash: Vec<u8>,
}

impl Store {
    /// Keeps the hash of a new token's secret under its `token_id`. Done before the
    /// `token_created` event is appended: a credential whose event never made it to the
    /// log authenticates nothing.
    pub async fn insert_credential(&self, token_id: Uuid, hash: &[u8]) -> Result<(), StoreError> {
        self.client()
            .await?
            .execute(
                "INSERT INTO token_credentials (token_id, hash) VALUES ($1, $2)",
                &[&token_id, &hash],
            )
            .await
            .map_err(ctx("store a token credential"))?;
        Ok(())
    }

    /// Copies every token credential `source` has that this store lacks (a rebuild into
    /// a new database: the hashes are not on the log); returns how many it copied.
    pub async fn copy_credentials_from(&self, source: &Store) -> Result<u64, StoreError> {
        let rows = source
            .client()
            .await?
            .query(
                "SELECT token_id, hash, created_at FROM token_credentials",
                &[],
            )
            .await
            .map_err(ctx("read token credentials"))?;
        let ids: Vec<Uuid> = rows.iter().map(|r| r.get(0)).collect();
        let hashes: Vec<Vec<u8>> = rows.iter().map(|r| r.get(1)).collect();
        let created: Vec<chrono::DateTime<chrono::Utc>> = rows.iter().map(|r| r.get(2)).collect();
        self.client()
            .await?
            .execute(
                "INSERT INTO token_credentials (token_id, hash, created_at)
                 SELECT * FROM unnest($1::uuid[], $2::bytea[], $3::timestamptz[])
                 ON CONFLICT DO NOTHING",
                &[&ids, &hashes, &created],
            )
            .await
            .map_err(ctx("copy token credentials"))
    }

    /// Every token the projection has, revoked ones too, by name.
    pub async fn tokens(&self) -> Result<Vec<TokenState>, StoreError> {
        let rows = self
            .client()
            .await?
            .query("SELECT doc FROM tokens ORDER BY name", &[])
            .await
            .map_err(ctx("list tokens"))?;
        rows.iter()
            .map(|r| super::from_doc(r.get(0), "tokens.doc"))
            .collect()
    }

    /// The token of this name, if the projection has one.
    pub async fn token(&self, name: &str) -> Result<Option<TokenState>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt("SELECT doc FROM tokens WHERE name = $1", &[&name])
            .await
            .map_err(ctx("read a token"))?;
        row.map(|r| super::from_doc(r.get(0), "tokens.doc"))
            .transpose()
    }

    /// Every token the projection has (revoked and expired ones too, so that callers
    /// can be told so) with the hash of its secret.
    pub async fn credentials(&self) -> Result<Vec<Credential>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT t.doc, c.hash FROM tokens t
                 JOIN token_credentials c ON c.token_id = t.token_id",
                &[],
            )
            .await
            .map_err(ctx("read token credentials"))?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            out.push(Credential {
                token: super::from_doc(r.get(0), "tokens.doc")?,
                hash: r.get(1),
            });
        }
        Ok(out)
    }
}
