//! Flotilla's wire protocol: every message type, subject, stream, consumer, bucket and header name,
//! and the codec. It has no async runtime and no NATS client, so any tool can depend on it.

pub mod codec;
pub mod headers;
pub mod limits;
pub mod names;
pub mod roles;
pub mod schema;
pub mod time;
pub mod types;
pub mod validate;

pub use codec::{DecodeError, EncodeError, WireFormat, decode, encode};
pub use names::{Names, Prefix, PrefixError};
pub use types::*;

/// Version of the wire protocol. Carried in health replies and registry records; bumped only on a
/// breaking change (fields are only ever added with defaults).
pub const PROTOCOL_VERSION: u32 = 1;
