//! The services projection: folds `tasklog.services` into the `services` table with the
//! pure service fold of [`crate::events::service`].

use std::collections::HashMap;

use tokio_postgres::Transaction;

use super::keyed::{KeyedEntity, KeyedProjection};
use crate::events::service::{ServiceEvent, ServiceState, apply_service};
use crate::events::{RawRecord, Rejection};
use crate::store::projection;
use crate::store::{SERVICES_CHANNEL, StoreError};

/// Default consumer group of the services projection.
pub const DEFAULT_GROUP: &str = "tasklog-service-projector";

/// Services, as a keyed entity.
pub struct Services;

/// Folds service events into `services`.
pub type ServiceProjection = KeyedProjection<Services>;

impl KeyedEntity for Services {
    type Event = ServiceEvent;
    type State = ServiceState;
    const CHANNEL: &'static str = SERVICES_CHANNEL;

    fn decode(record: &RawRecord<'_>) -> Result<ServiceEvent, Rejection> {
        ServiceEvent::decode(record)
    }

    fn key(event: &ServiceEvent) -> &str {
        &event.service
    }

    fn fold(state: Option<&ServiceState>, event: &ServiceEvent) -> Result<ServiceState, Rejection> {
        apply_service(state, event)
    }

    async fn load(
        tx: &Transaction<'_>,
        keys: &[String],
    ) -> Result<HashMap<String, ServiceState>, StoreError> {
        projection::load_services(tx, keys).await
    }

    async fn write(tx: &Transaction<'_>, states: &[&ServiceState]) -> Result<(), StoreError> {
        projection::write_services(tx, states).await
    }
}
