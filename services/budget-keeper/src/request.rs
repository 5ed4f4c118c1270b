//! Request handling: a request as it arrives on `<p>.budget.<op>` is checked for where its
//! answer would go, decoded once into a [`BudgetCommand`] (or the refusal to answer it with), and
//! answered in the format it came in.

use bytes::Bytes;
use flotilla_protocol::{BudgetCommand, BudgetOp, BudgetReply, WireFormat, codec, headers};
use tracing::Instrument as _;

/// Who asked, and how to answer them.
pub(crate) struct Caller {
    request: async_nats::service::Request,
    format: WireFormat,
}

/// A request as received: who asked, and the command they asked for (or the refusal to answer
/// them with: the payload was no such request).
pub(crate) struct Incoming {
    pub caller: Caller,
    pub command: Result<BudgetCommand, BudgetReply>,
}

/// Takes a request of `op` in: `None` (dropped, with a warning) when its reply subject is one the
/// keeper must not write to (see [`reply_allowed`]), else the request decoded.
#[tracing::instrument(level = "debug", skip_all, fields(op = %op))]
pub(crate) fn receive(
    op: BudgetOp,
    request: async_nats::service::Request,
    own_prefix: &str,
) -> Option<Incoming> {
    if !reply_allowed(request.message.reply.as_deref().unwrap_or_default(), own_prefix) {
        tracing::warn!(
            op = %op,
            reply = ?request.message.reply,
            "request with a reply subject into the fleet's own or the system's subjects dropped"
        );
        return None;
    }
    let ct = request
        .message
        .headers
        .as_ref()
        .and_then(|h| h.get(headers::CONTENT_TYPE))
        .map(|v| v.as_str().to_owned());
    let format = if codec::is_json(ct.as_deref(), &request.message.payload) {
        WireFormat::Json
    } else {
        WireFormat::Msgpack
    };
    let command = BudgetCommand::decode(op, ct.as_deref(), &request.message.payload)
        .map_err(|error| BudgetReply { error: Some(error), ..Default::default() });
    if let Err(reply) = &command {
        tracing::debug!(error = ?reply.error, "budget request refused undecoded");
    }
    Some(Incoming { caller: Caller { request, format }, command })
}

/// A reply may not go where it would be stored or acted on: the fleet's own subjects (its
/// streams, the ledger among them) or the server's (`$JS`, `$KV`, `$O`, `$SRV`, `$SYS`). Answering
/// there would let any client write into the ledger and knock the keeper off its fence.
fn reply_allowed(reply: &str, own_prefix: &str) -> bool {
    !reply.is_empty()
        && !reply.starts_with(own_prefix)
        && !["$JS.", "$KV.", "$O.", "$SRV.", "$SYS.", "$JSC."].iter().any(|p| reply.starts_with(p))
}

impl Caller {
    /// Answers, in the format the request came in.
    pub(crate) async fn answer(self, reply: BudgetReply) {
        let body = codec::encode(self.format, &reply)
            .map(Bytes::from)
            .map_err(|e| async_nats::service::error::Error { status: e.to_string(), code: 500 });
        if let Err(e) = self.request.respond(body).instrument(tracing::debug_span!("respond")).await {
            tracing::debug!(error = %e, "failed to answer a budget request");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::reply_allowed;

    #[test]
    fn answers_go_only_outside_the_fleet_s_and_the_server_s_subjects() {
        assert!(reply_allowed("_INBOX.abc.1", "flotilla."));
        assert!(!reply_allowed("", "flotilla."));
        assert!(!reply_allowed("flotilla.ledger.reserve", "flotilla."));
        for system in ["$JS.API.x", "$KV.b.k", "$O.s", "$SRV.PING", "$SYS.REQ", "$JSC.R"] {
            assert!(!reply_allowed(system, "flotilla."), "{system}");
        }
    }
}
