//! Changes of the grants (`<p>.dispatcher.grants`, `flotilla grants allow|deny|remove`): the
//! active dispatcher checks the operator's signature, stores the grant with who made it
//! (`created_by`) or removes it, and records the change as a `<p>.events.control.grant` event.
//! Only the dispatcher writes the grants bucket, so every grant in it was made by a verified
//! operator (or, without authentication, by `anonymous`).

use flotilla_protocol::names::is_token;
use flotilla_protocol::{ErrorInfo, Grant, GrantReply, GrantRequest, time::now_ms};
use flotilla_service::Fleet;
use flotilla_service::attest;
use flotilla_service::nats::decode_request;
use flotilla_service::topology::Topology;

fn refused(code: &str, message: impl Into<String>) -> GrantReply {
    GrantReply { error: Some(ErrorInfo::new(code, message)), ..Default::default() }
}

/// Answers one grant change.
#[tracing::instrument(skip_all, fields(subject = %req.subject))]
pub(super) async fn answer(fleet: Fleet, topology: Topology, req: async_nats::Message) {
    let reply = change(&fleet, &topology, &req).await;
    fleet.respond(&req, &reply).await;
}

async fn change(fleet: &Fleet, topology: &Topology, req: &async_nats::Message) -> GrantReply {
    let asked: GrantRequest = match decode_request(req.headers.as_ref(), &req.payload) {
        Ok(r) => r,
        Err(e) => return refused(e.reason.code(), e.message),
    };
    let by = format!("dispatcher {}", fleet.instance);
    let actor = match attest::request_actor(fleet, &topology.operators, req).await {
        Ok(a) => a,
        Err(why) => {
            attest::publish_refusal(fleet, "grant", None, &why, &by).await;
            return refused("unauthorized", format!("{}: {}", why.reason, why.message));
        }
    };
    match (asked.grant, asked.remove) {
        (Some(grant), None) => put(fleet, topology, grant, &actor, &by).await,
        (None, Some(name)) => remove(fleet, topology, &name, &actor, &by).await,
        _ => refused("invalid_request", "give either `grant` or `remove`"),
    }
}

async fn put(fleet: &Fleet, topology: &Topology, mut grant: Grant, actor: &str, by: &str) -> GrantReply {
    if !is_token(&grant.name) {
        return refused("invalid_request", "a grant's name must be 1-128 characters of A-Z a-z 0-9 _ -");
    }
    grant.created_at_ms = Some(now_ms());
    grant.created_by = Some(actor.to_owned());
    if let Err(e) = fleet.kv_put(&topology.grants, &grant.name, &grant).await {
        return refused("unavailable", format!("failed to store the grant: {e}"));
    }
    let detail = serde_json::to_value(&grant).unwrap_or_default();
    attest::publish_applied(fleet, "grant", actor, detail, by).await;
    GrantReply { grant: Some(grant), ..Default::default() }
}

async fn remove(fleet: &Fleet, topology: &Topology, name: &str, actor: &str, by: &str) -> GrantReply {
    match fleet.kv_get::<Grant>(&topology.grants, name).await {
        Ok(Some(_)) => {}
        Ok(None) => return refused("not_found", format!("no grant named {name:?}")),
        Err(e) => return refused("unavailable", format!("failed to read the grant: {e}")),
    }
    if let Err(e) = topology.grants.delete(name).await {
        return refused("unavailable", format!("failed to remove the grant: {e}"));
    }
    attest::publish_applied(fleet, "grant_remove", actor, serde_json::json!({ "name": name }), by).await;
    GrantReply { removed: Some(name.to_owned()), ..Default::default() }
}
