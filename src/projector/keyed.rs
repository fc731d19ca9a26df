//! Projections of entities keyed by name (workers, services): each record is one
//! event about one entity, folded with the entity's pure fold over its current state
//! and upserted, in the runner's exactly-once batch transaction.

use std::collections::HashMap;
use std::marker::PhantomData;

use rdkafka::message::OwnedMessage;
use tokio_postgres::Transaction;

use super::{Projection, Record, Refusal};
use crate::events::{RawRecord, Rejection};
use crate::store::StoreError;

/// An entity folded from its own topic.
pub trait KeyedEntity: Send + Sync + 'static {
    /// A decoded event.
    type Event: Clone + Send + Sync + 'static;
    /// The folded state.
    type State: Send + Sync;
    /// The `NOTIFY` channel signalled after each commit.
    const CHANNEL: &'static str;

    /// Decodes and validates one record.
    fn decode(record: &RawRecord<'_>) -> Result<Self::Event, Rejection>;
    /// The entity an event is about.
    fn key(event: &Self::Event) -> &str;
    /// The pure fold.
    fn fold(state: Option<&Self::State>, event: &Self::Event) -> Result<Self::State, Rejection>;
    /// Whether an event is routine: no reader waits to see it applied (a heartbeat).
    /// A batch of routine events only, all applied, is committed without a `NOTIFY`.
    fn routine(_event: &Self::Event) -> bool {
        false
    }
    /// Current states of these entities.
    fn load<'a>(
        tx: &'a Transaction<'_>,
        keys: &'a [String],
    ) -> impl Future<Output = Result<HashMap<String, Self::State>, StoreError>> + Send + 'a;
    /// Upserts these states.
    fn write<'a>(
        tx: &'a Transaction<'_>,
        states: &'a [&'a Self::State],
    ) -> impl Future<Output = Result<(), StoreError>> + Send + 'a;
}

/// The projection of entity `E`.
pub struct KeyedProjection<E>(PhantomData<E>);

impl<E> KeyedProjection<E> {
    /// The projection.
    pub fn new() -> KeyedProjection<E> {
        KeyedProjection(PhantomData)
    }
}

impl<E> Default for KeyedProjection<E> {
    fn default() -> Self {
        KeyedProjection::new()
    }
}

impl<E: KeyedEntity> Projection for KeyedProjection<E> {
    type Decoded = Result<E::Event, Rejection>;

    fn decode(message: &OwnedMessage) -> Self::Decoded {
        E::decode(&super::raw_record(message))
    }

    fn channel(&self) -> &'static str {
        E::CHANNEL
    }

    fn notifies(&self, records: &[&Record<Self::Decoded>], refusals: &[Refusal]) -> bool {
        !refusals.is_empty()
            || records
                .iter()
                .any(|r| r.decoded.as_ref().map_or(true, |e| !E::routine(e)))
    }

    async fn apply(
        &self,
        tx: &Transaction<'_>,
        records: &[&Record<Self::Decoded>],
    ) -> Result<Vec<Refusal>, StoreError> {
        let mut keys: Vec<String> = records
            .iter()
            .filter_map(|r| r.decoded.as_ref().ok().map(|e| E::key(e).to_string()))
            .collect();
        keys.sort();
        keys.dedup();
        let mut states = E::load(tx, &keys).await?;
        let mut touched: Vec<String> = Vec::new();
        let mut refusals = Vec::new();
        for (index, record) in records.iter().enumerate() {
            let outcome = record
                .decoded
                .as_ref()
                .map_err(Clone::clone)
                .and_then(|event| Ok((E::key(event), E::fold(states.get(E::key(event)), event)?)));
            match outcome {
                Ok((key, next)) => {
                    touched.push(key.to_string());
                    states.insert(key.to_string(), next);
                }
                Err(rejection) => refusals.push(Refusal {
                    index,
                    reason: rejection.code(),
                    message: rejection.to_string(),
                }),
            }
        }
        touched.sort();
        touched.dedup();
        let rows: Vec<&E::State> = touched.iter().filter_map(|k| states.get(k)).collect();
        E::write(tx, &rows).await?;
        Ok(refusals)
    }
}
