//! Request handling: a request as it arrives on `<p>.budget.<op>` is checked for where its
//! answer would go, decoded once into a [`BudgetCommand`] (or the refusal to answer it with), and
//! answered in the format it came in.

use bytes::Bytes;
use flotilla_protocol::{BudgetCommand, BudgetOp, BudgetReply, Names, WireFormat, codec};
use flotilla_service::nats::{content_type, format_of, reply_allowed};
use tracing::Instrument as _;

/// Who asked, and how to answer them.
pub(crate) struct Caller {
    request: async_nats::service::Request,
    format: WireFormat,
    /// The request's span, a child of the caller's trace (`traceparent`), from its arrival to
    /// its answer.
    span: tracing::Span,
}

/// A request as received: who asked, and the command they asked for (or the refusal to answer
/// them with: the payload was no such request).
pub(crate) struct Incoming {
    pub caller: Caller,
    pub command: Result<BudgetCommand, BudgetReply>,
    /// Who asked, for a control operation ([`attribute`]).
    pub actor: Option<String>,
}

/// Takes a request of `op` in: `None` (dropped, with a warning) when its reply subject is one the
/// keeper must not write to ([`reply_allowed`]: answering into the fleet's own subjects would let
/// any client write into the ledger and knock the keeper off its fence), else the request decoded.
#[tracing::instrument(level = "debug", skip_all, fields(op = %op))]
pub(crate) fn receive(
    op: BudgetOp,
    request: async_nats::service::Request,
    names: &Names,
) -> Option<Incoming> {
    if !reply_allowed(request.message.reply.as_deref().unwrap_or_default(), names) {
        tracing::warn!(
            op = %op,
            reply = ?request.message.reply,
            "request with a reply subject into the fleet's own or the system's subjects dropped"
        );
        return None;
    }
    let message = &request.message;
    let format = format_of(message.headers.as_ref(), &message.payload);
    let command = BudgetCommand::decode(op, content_type(message.headers.as_ref()), &message.payload)
        .map_err(|error| BudgetReply { error: Some(error), ..Default::default() });
    if let Err(reply) = &command {
        tracing::debug!(error = ?reply.error, "budget request refused undecoded");
    }
    let span = tracing::info_span!("budget", op = %op, otel.kind = "server");
    flotilla_service::trace::continue_from(&span, message.headers.as_ref());
    Some(Incoming { caller: Caller { request, format, span }, command, actor: None })
}

/// Who asked for a control operation (`set`, `rate`, `price`): its verified operator goes into
/// `incoming.actor` and into the ledger entry the operation writes; a request that fails the
/// check is refused (`unauthorized`) and recorded as a `<p>.events.control.refused` event.
pub(crate) async fn attribute(
    op: BudgetOp,
    incoming: &mut Incoming,
    fleet: &flotilla_service::Fleet,
    operators: &async_nats::jetstream::kv::Store,
) {
    if !op.is_control() || incoming.command.is_err() {
        return;
    }
    let message = &incoming.caller.request.message;
    match flotilla_service::attest::request_actor(fleet, operators, message).await {
        Ok(actor) => incoming.actor = Some(actor),
        Err(why) => {
            let action = format!("budget_{}", op.as_str());
            let by = format!("budget-keeper {}", fleet.instance);
            flotilla_service::attest::publish_refusal(fleet, &action, None, &why, &by).await;
            let error =
                flotilla_protocol::ErrorInfo::new("unauthorized", format!("{}: {}", why.reason, why.message));
            incoming.command = Err(BudgetReply { error: Some(error), ..Default::default() });
        }
    }
}

impl Caller {
    /// Answers, in the format the request came in.
    pub(crate) async fn answer(self, reply: BudgetReply) {
        let body = codec::encode(self.format, &reply)
            .map(Bytes::from)
            .map_err(|e| async_nats::service::error::Error { status: e.to_string(), code: 500 });
        let span = self.span;
        if let Err(e) = self.request.respond(body).instrument(span).await {
            tracing::debug!(error = %e, "failed to answer a budget request");
        }
    }
}
