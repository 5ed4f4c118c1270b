//! `flotilla cancel <id>`: asks the active dispatcher to cancel a task that has not finished
//! (`<p>.dispatcher.cancel`). The dispatcher writes the record `failed` with code `cancelled`
//! (revision-checked, so it cannot overwrite an outcome that lands meanwhile), publishes the
//! `failed` event and tells the runner holding a running attempt to stop it; the CLI writes
//! nothing itself.

use anyhow::Context as _;
use flotilla_protocol::{CancelReply, CancelRequest, TaskState, cancel_code};

use crate::client::{connect, request};
use crate::{Cli, Failure, exit, output};

#[tracing::instrument(skip(cli, reason))]
pub async fn cancel(cli: &Cli, id: &str, reason: Option<&str>) -> Result<(), Failure> {
    let fleet = connect(cli).await?;
    let req = CancelRequest { task_id: id.to_owned(), reason: reason.map(str::to_owned) };
    let reply: CancelReply =
        request(&fleet, fleet.names.dispatcher_cancel(), "active dispatcher", &req).await?;
    if let Some(e) = reply.error {
        let code = match e.code.as_str() {
            cancel_code::NOT_FOUND => exit::NOT_FOUND,
            cancel_code::ALREADY_FINISHED => exit::TASK_FAILED,
            _ => exit::UNAVAILABLE,
        };
        return Err(Failure::new(code, anyhow::anyhow!("{}", e.message)));
    }
    let (Some(rec), Some(was)) = (reply.record, reply.was) else {
        return Err(Failure::new(
            exit::UNAVAILABLE,
            anyhow::anyhow!("the dispatcher's answer names no task"),
        ));
    };
    if cli.json {
        println!("{}", serde_json::to_string(&rec).context("failed to render")?);
    } else {
        match was {
            TaskState::Failed => println!("{id} was cancelled already"),
            _ => println!("cancelled {id} (it was {was})"),
        }
        print!("{}", output::task_block(&rec));
    }
    Ok(())
}
