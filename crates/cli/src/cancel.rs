//! `flotilla cancel <id>`: ends a task that has not finished. The task record is written `failed`
//! with code `cancelled` (a revision-checked update, so it cannot overwrite an outcome that lands
//! meanwhile), the `failed` event is published with the same de-duplication id the services use,
//! and the runner holding a running attempt is told to stop it (`<p>.runners.<runner>.cancel`).

use anyhow::Context as _;
use async_nats::jetstream::kv;
use flotilla_protocol::names::{event_kind, runner_op};
use flotilla_protocol::{
    CancelTask, ErrorInfo, Names, TaskEvent, TaskRecord, TaskState, WireFormat, codec, failure, headers,
    time::now_ms,
};
use flotilla_service::nats::event_msg_id;

use crate::client::connect;
use crate::{Cli, Failure, exit, output};

/// Lost revision races after which the command gives up.
const TRIES: usize = 5;

#[tracing::instrument(skip(cli, reason))]
pub async fn cancel(cli: &Cli, id: &str, reason: Option<&str>) -> Result<(), Failure> {
    let (client, js, names) = connect(cli).await?;
    let store = js.get_key_value(names.tasks_bucket()).await.context("the tasks bucket does not exist")?;
    let error = ErrorInfo::new(failure::CANCELLED, reason.unwrap_or("cancelled by an operator"));
    let (rec, was) = write_cancelled(&store, id, &error).await?;

    // The same event (and id) a runner would publish for this attempt, so copies de-duplicate.
    let mut ev = TaskEvent::for_task(&rec, event_kind::FAILED);
    ev.error = rec.error.clone();
    let mut hdrs = async_nats::HeaderMap::new();
    hdrs.insert(headers::CONTENT_TYPE, WireFormat::Msgpack.content_type());
    hdrs.insert(headers::NATS_MSG_ID, event_msg_id(&ev).as_str());
    let payload = codec::encode(WireFormat::Msgpack, &ev).context("failed to encode the event")?;
    js.publish_with_headers(names.task_event_subject(id, event_kind::FAILED), hdrs, payload.into())
        .await
        .context("failed to publish the failed event")?
        .await
        .context("the event stream did not take the failed event")?;

    if matches!(was, TaskState::Assigned | TaskState::Running)
        && let Err(e) = tell_runner(&client, &names, &rec, &error).await
    {
        // Best effort: the task is cancelled either way, and the attempt's result is fenced off.
        eprintln!("warning: {e:#}");
    }

    if cli.json {
        println!("{}", serde_json::to_string(&rec).context("failed to render")?);
    } else {
        println!("cancelled {id} (it was {})", was.as_str());
        print!("{}", output::task_block(&rec));
    }
    Ok(())
}

/// Writes the record `failed`/`cancelled` if it is not final yet; returns it and the state it had.
async fn write_cancelled(
    store: &kv::Store,
    id: &str,
    error: &ErrorInfo,
) -> Result<(TaskRecord, TaskState), Failure> {
    for _ in 0..TRIES {
        let entry = store.entry(id).await.context("failed to read the task")?;
        let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else {
            return Err(Failure::new(exit::NOT_FOUND, anyhow::anyhow!("no task {id}")));
        };
        let mut rec: TaskRecord = codec::decode(None, &entry.value).context("unreadable task record")?;
        let was = rec.state;
        if was.is_terminal() {
            let detail =
                rec.error.as_ref().map(|e| format!(" ({}: {})", e.code, e.message)).unwrap_or_default();
            return Err(Failure::new(
                exit::TASK_FAILED,
                anyhow::anyhow!("task {id} is already {}{detail}; nothing to cancel", was.as_str()),
            ));
        }
        let now = now_ms();
        if was == TaskState::Running {
            // The running attempt ends here: it goes into the history like any failed attempt.
            rec.record_failed_attempt(error, None, now);
        }
        rec.state = TaskState::Failed;
        rec.error = Some(error.clone());
        rec.finished_at_ms = Some(now);
        rec.updated_at_ms = now;
        let bytes = codec::encode(WireFormat::Msgpack, &rec).context("failed to encode the task record")?;
        match store.update(id, bytes.into(), entry.revision).await {
            Ok(_) => return Ok((rec, was)),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
            Err(e) => {
                return Err(Failure::new(
                    exit::UNAVAILABLE,
                    anyhow::anyhow!("failed to write the task record: {e}"),
                ));
            }
        }
    }
    Err(Failure::new(exit::UNAVAILABLE, anyhow::anyhow!("task {id} kept changing; try again")))
}

/// Asks the runner of the attempt to stop it (core NATS, no answer).
async fn tell_runner(
    client: &async_nats::Client,
    names: &Names,
    rec: &TaskRecord,
    error: &ErrorInfo,
) -> anyhow::Result<()> {
    let Some(runner) = rec.runner_id.as_deref() else { return Ok(()) };
    let req = CancelTask { task_id: rec.id.clone(), attempt: rec.attempt, error: error.clone() };
    let payload = codec::encode(WireFormat::Msgpack, &req).context("failed to encode the cancel request")?;
    let mut hdrs = async_nats::HeaderMap::new();
    hdrs.insert(headers::CONTENT_TYPE, WireFormat::Msgpack.content_type());
    let subject = names.runner_control(runner, runner_op::CANCEL);
    client
        .publish_with_headers(subject, hdrs, payload.into())
        .await
        .with_context(|| format!("failed to tell runner {runner} to stop the attempt"))?;
    client.flush().await.with_context(|| format!("failed to tell runner {runner} to stop the attempt"))
}
