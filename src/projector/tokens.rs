//! The tokens projection: folds `tasklog.auth` into the `tokens` table with the pure
//! fold of [`crate::events::auth`]. API servers reload their credentials on its
//! notifications, which is how a revocation reaches every server within seconds.

use std::collections::HashMap;

use tokio_postgres::Transaction;

use super::keyed::{KeyedEntity, KeyedProjection};
use crate::events::auth::{TokenEvent, TokenState, apply_token};
use crate::events::{RawRecord, Rejection};
use crate::store::projection;
use crate::store::{StoreError, TOKENS_CHANNEL};

/// Default consumer group of the tokens projection.
pub const DEFAULT_GROUP: &str = "tasklog-token-projector";

/// Tokens, as a keyed entity.
pub struct Tokens;

/// Folds auth events into `tokens`.
pub type TokenProjection = KeyedProjection<Tokens>;

impl KeyedEntity for Tokens {
    type Event = TokenEvent;
    type State = TokenState;
    const CHANNEL: &'static str = TOKENS_CHANNEL;

    fn decode(record: &RawRecord<'_>) -> Result<TokenEvent, Rejection> {
        TokenEvent::decode(record)
    }

    fn key(event: &TokenEvent) -> &str {
        &event.name
    }

    fn fold(state: Option<&TokenState>, event: &TokenEvent) -> Result<TokenState, Rejection> {
        apply_token(state, event)
    }

    async fn load(
        tx: &Transaction<'_>,
        keys: &[String],
    ) -> Result<HashMap<String, TokenState>, StoreError> {
        projection::load_tokens(tx, keys).await
    }

    async fn write(tx: &Transaction<'_>, states: &[&TokenState]) -> Result<(), StoreError> {
        projection::write_tokens(tx, states).await
    }
}
