//! Who did a control action: operators sign their requests (and their approval decisions) with
//! their identity's nkey, and services check the signature against the operators' keys in the
//! `<p>_operators` bucket, which only the admin writes. The verified name goes into the event or
//! record the action causes; an action that fails the check is refused with a reason and a
//! `<p>.events.control.refused` event.

use async_nats::HeaderMap;
use async_nats::jetstream::kv;
use base64::Engine as _;
use flotilla_protocol::{ControlEvent, OperatorKey, headers, time::now_ms};

use crate::Fleet;
use crate::auth::Credentials;

/// How far a signature's time may be from the verifier's clock.
pub const MAX_SKEW_MS: u64 = 5 * 60 * 1000;

/// The name an unsigned action is attributed to where signatures are not required.
pub const ANONYMOUS: &str = "anonymous";

/// Why an action was refused because of who asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// `unsigned`, `bad_signature`, `stale_signature`, `unknown_operator`, `revoked_operator`,
    /// `unavailable`.
    pub reason: &'static str,
    pub message: String,
    pub signer: Option<String>,
    pub operator: Option<String>,
}

impl Refusal {
    fn new(reason: &'static str, message: impl Into<String>, signer: Option<&str>) -> Self {
        Self { reason, message: message.into(), signer: signer.map(str::to_owned), operator: None }
    }
}

fn signed_bytes(context: &str, at_ms: u64, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(context.len() + payload.len() + 24);
    b.extend_from_slice(context.as_bytes());
    b.push(b'\n');
    b.extend_from_slice(at_ms.to_string().as_bytes());
    b.push(b'\n');
    b.extend_from_slice(payload);
    b
}

impl Credentials {
    /// Signs `bytes` with this identity's key (base64url, no padding).
    pub fn sign(&self, bytes: &[u8]) -> Result<String, crate::auth::AuthError> {
        let sig = self.key_pair()?.sign(bytes).map_err(|e| crate::auth::AuthError::Invalid(e.to_string()))?;
        Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sig))
    }

    /// Adds the signature headers of a request to `subject` with `payload`.
    pub fn sign_request(
        &self,
        h: &mut HeaderMap,
        subject: &str,
        payload: &[u8],
    ) -> Result<(), crate::auth::AuthError> {
        let at = now_ms();
        let sig = self.sign(&signed_bytes(subject, at, payload))?;
        h.insert(headers::FLOTILLA_SIGNER, self.public_key.as_str());
        h.insert(headers::FLOTILLA_SIGNED_AT, at.to_string().as_str());
        h.insert(headers::FLOTILLA_SIGNATURE, sig.as_str());
        Ok(())
    }
}

fn check_signature(signer: &str, bytes: &[u8], signature: &str) -> Result<(), Refusal> {
    let key = nkeys::KeyPair::from_public_key(signer).map_err(|e| {
        Refusal::new("bad_signature", format!("signer {signer:?} is no public key: {e}"), Some(signer))
    })?;
    let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| Refusal::new("bad_signature", "the signature is not base64url", Some(signer)))?;
    key.verify(bytes, &sig)
        .map_err(|_| Refusal::new("bad_signature", "the signature does not match the request", Some(signer)))
}

/// The operator whose key is `signer`, if it is known and not revoked.
async fn operator(fleet: &Fleet, operators: &kv::Store, signer: &str) -> Result<String, Refusal> {
    match fleet.kv_get::<OperatorKey>(operators, signer).await {
        Ok(Some((k, _))) if k.revoked_ms.is_some() => Err(Refusal {
            operator: Some(k.name.clone()),
            ..Refusal::new("revoked_operator", format!("operator {} was revoked", k.name), Some(signer))
        }),
        Ok(Some((k, _))) => Ok(k.name),
        Ok(None) => {
            Err(Refusal::new("unknown_operator", "the signing key belongs to no operator", Some(signer)))
        }
        Err(e) => {
            Err(Refusal::new("unavailable", format!("cannot read the operators' keys: {e}"), Some(signer)))
        }
    }
}

/// Who sent a control request: the operator whose signature its headers carry, checked against
/// `operators`; an unsigned request is [`ANONYMOUS`] unless `fleet` runs with authentication,
/// where it is refused.
pub async fn request_actor(
    fleet: &Fleet,
    operators: &kv::Store,
    msg: &async_nats::Message,
) -> Result<String, Refusal> {
    let h = msg.headers.as_ref();
    let get = |name: &str| h.and_then(|h| h.get(name)).map(|v| v.as_str().to_owned());
    let (Some(signer), Some(at), Some(sig)) =
        (get(headers::FLOTILLA_SIGNER), get(headers::FLOTILLA_SIGNED_AT), get(headers::FLOTILLA_SIGNATURE))
    else {
        return if fleet.authenticated {
            Err(Refusal::new("unsigned", "control requests must be signed by an operator's key", None))
        } else {
            Ok(ANONYMOUS.to_owned())
        };
    };
    let at: u64 =
        at.parse().map_err(|_| Refusal::new("bad_signature", "unreadable signing time", Some(&signer)))?;
    if now_ms().abs_diff(at) > MAX_SKEW_MS {
        return Err(Refusal::new(
            "stale_signature",
            "the signature is more than 5 minutes old or ahead",
            Some(&signer),
        ));
    }
    check_signature(&signer, &signed_bytes(msg.subject.as_str(), at, &msg.payload), &sig)?;
    operator(fleet, operators, &signer).await
}

/// Who decided an approval: the operator whose signature it carries (over
/// [`flotilla_protocol::Approval::signed_content`]); unsigned as for [`request_actor`].
pub async fn approval_actor(
    fleet: &Fleet,
    operators: &kv::Store,
    a: &flotilla_protocol::Approval,
) -> Result<String, Refusal> {
    let (Some(signer), Some(sig)) = (&a.signer, &a.signature) else {
        return if fleet.authenticated {
            Err(Refusal::new("unsigned", "approval decisions must be signed by an operator's key", None))
        } else {
            Ok(ANONYMOUS.to_owned())
        };
    };
    check_signature(signer, &a.signed_content(), sig)?;
    operator(fleet, operators, signer).await
}

/// Records a refused action (`<p>.events.control.refused`); a failure to record is logged.
pub async fn publish_refusal(fleet: &Fleet, action: &str, task_id: Option<&str>, r: &Refusal, by: &str) {
    tracing::warn!(action, task_id, reason = r.reason, signer = ?r.signer, message = %r.message, "control action refused");
    let ev = ControlEvent {
        kind: "refused".to_owned(),
        action: action.to_owned(),
        actor: None,
        detail: None,
        task_id: task_id.map(str::to_owned),
        signer: r.signer.clone(),
        operator: r.operator.clone(),
        reason: r.reason.to_owned(),
        message: r.message.clone(),
        by: by.to_owned(),
        at_ms: now_ms(),
    };
    if let Err(e) = fleet.publish_durable(fleet.names.control_event_subject("refused"), &ev, None).await {
        tracing::warn!(error = %e, "failed to record a refused control action");
    }
}

/// Records a control action done by `actor` (`<p>.events.control.<action>`, kind `applied`)
/// with what it changed; a failure to record is logged.
pub async fn publish_applied(fleet: &Fleet, action: &str, actor: &str, detail: serde_json::Value, by: &str) {
    tracing::info!(action, actor, %detail, "control action applied");
    let ev = ControlEvent {
        kind: "applied".to_owned(),
        action: action.to_owned(),
        actor: Some(actor.to_owned()),
        detail: Some(detail),
        task_id: None,
        signer: None,
        operator: None,
        reason: String::new(),
        message: String::new(),
        by: by.to_owned(),
        at_ms: now_ms(),
    };
    if let Err(e) = fleet.publish_durable(fleet.names.control_event_subject(action), &ev, None).await {
        tracing::warn!(error = %e, "failed to record a control action");
    }
}

/// The name a dispatcher's unsigned autoscaling request is attributed to (the runner holds it
/// to the template's replica limits).
pub const AUTOSCALER: &str = "autoscaler";
