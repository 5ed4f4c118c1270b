//! Following a fleet's task events from now on, as a client waiting for results does: an ordered
//! consumer on the events stream, filtered by subject.

use anyhow::Context as _;
use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use flotilla_service::Fleet;

/// New events on `subjects`; with `headers_only`, without their payloads (the subject says the
/// task and the kind).
pub async fn follow(
    fleet: &Fleet,
    subjects: Vec<String>,
    headers_only: bool,
) -> anyhow::Result<pull::Ordered> {
    let stream = fleet.js.get_stream(fleet.names.events_stream()).await.context("no events stream")?;
    stream
        .create_consumer(pull::OrderedConfig {
            filter_subjects: subjects,
            deliver_policy: DeliverPolicy::New,
            headers_only,
            ..Default::default()
        })
        .await
        .context("failed to follow events")?
        .messages()
        .await
        .context("failed to follow events")
}
