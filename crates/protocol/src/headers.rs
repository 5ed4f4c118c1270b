//! Names and values of the NATS headers Flotilla reads and writes.

/// Standard content-type header. `application/json` switches readers to JSON.
pub const CONTENT_TYPE: &str = "Content-Type";
/// Content type of JSON payloads.
pub const APPLICATION_JSON: &str = "application/json";
/// Content type of MessagePack payloads (the native format).
pub const APPLICATION_MSGPACK: &str = "application/msgpack";
/// JetStream de-duplication id.
pub const NATS_MSG_ID: &str = "Nats-Msg-Id";
/// Machine-readable reason on a dead-letter record or error reply.
pub const FLOTILLA_REASON: &str = "Flotilla-Reason";
/// Which component wrote a message.
pub const FLOTILLA_SOURCE: &str = "Flotilla-Source";
/// The public key (nkey) that signed a control request (see `Flotilla-Signature`).
pub const FLOTILLA_SIGNER: &str = "Flotilla-Signer";
/// When a control request was signed, in epoch milliseconds.
pub const FLOTILLA_SIGNED_AT: &str = "Flotilla-Signed-At";
/// Ed25519 signature (base64url) of `<subject>\n<signed-at>\n<payload>` by the signer's key.
pub const FLOTILLA_SIGNATURE: &str = "Flotilla-Signature";
/// W3C trace context, propagated across services.
pub const TRACEPARENT: &str = "traceparent";
