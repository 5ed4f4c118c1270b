//! Limits on the shape of what enters the fleet from outside: size, nesting depth, fields per
//! object (and items per array) and string length, one [`Shape`] per way in (submissions,
//! requests, topic messages, memory values), each refusal with its own reason code.
//!
//! The check walks the payload once with serde (no value is built), so it costs about what a
//! decode costs, and it never recurses deeper than the shape allows. It reports only limits: a
//! payload that does not parse passes, and the decoder that follows gives its own reason.

use std::cell::Cell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use crate::types::RejectReason;

/// The largest shape a payload may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Bytes of the whole payload.
    pub max_bytes: usize,
    /// Levels of nested objects and arrays (the top-level object is level 1).
    pub max_depth: usize,
    /// Fields of any one object, or items of any one array.
    pub max_fields: usize,
    /// Bytes of any one string (keys included) or binary value.
    pub max_string_bytes: usize,
}

/// A task submission (`<p>.tasks.submit[.<tenant>]`). The input itself is further held to
/// `intake.max_input_bytes` (`input_too_large`).
pub const SUBMISSION: Shape =
    Shape { max_bytes: 1024 * 1024, max_depth: 64, max_fields: 1024, max_string_bytes: 256 * 1024 };

/// A request to a service: direct messages (`msg.send`), cancel, queue, scale, stop, budget
/// operations. A message's body is further held to 64 KiB.
pub const REQUEST: Shape =
    Shape { max_bytes: 256 * 1024, max_depth: 32, max_fields: 1024, max_string_bytes: 64 * 1024 };

/// A message on a topic (`<p>.topics.<topic>`), checked before it wakes an agent.
pub const TOPIC: Shape =
    Shape { max_bytes: 256 * 1024, max_depth: 32, max_fields: 1024, max_string_bytes: 64 * 1024 };

/// A value written to shared memory (its JSON). The bucket refuses values over
/// [`MAX_MEMORY_VALUE_BYTES`] itself, whoever writes them.
pub const MEMORY: Shape =
    Shape { max_bytes: 64 * 1024, max_depth: 32, max_fields: 1024, max_string_bytes: 64 * 1024 };

/// Largest value the memory bucket stores (`max_value_size`): a memory value's limit and room for
/// what a direct writer might wrap it in.
pub const MAX_MEMORY_VALUE_BYTES: usize = 128 * 1024;

/// Longest key of shared memory as a client names it (without its tenant), in bytes.
pub const MAX_MEMORY_KEY_BYTES: usize = 200;

/// A payload over one of its shape's limits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Exceeded {
    /// `too_large`, `too_deep`, `too_many_fields` or `string_too_long`.
    pub reason: RejectReason,
    pub message: String,
}

impl Exceeded {
    /// The snake_case reason code.
    pub fn code(&self) -> &'static str {
        self.reason.code()
    }
}

impl From<Exceeded> for crate::codec::DecodeError {
    fn from(e: Exceeded) -> Self {
        Self { reason: e.reason, message: e.message }
    }
}

/// Checks `payload` (JSON or MessagePack, as [`crate::codec::decode`] tells them apart) against
/// `shape`.
pub fn check(content_type: Option<&str>, payload: &[u8], shape: &Shape) -> Result<(), Exceeded> {
    if payload.len() > shape.max_bytes {
        return Err(Exceeded {
            reason: RejectReason::TooLarge,
            message: format!(
                "the message is {} bytes; the limit is {} bytes",
                payload.len(),
                shape.max_bytes
            ),
        });
    }
    let mut found = Cell::new(None);
    let walk = Walk { shape, depth: 0, found: &found };
    if crate::codec::is_json(content_type, payload) {
        let mut de = serde_json::Deserializer::from_slice(payload);
        // Deeper than serde_json's own recursion limit is deeper than any shape allows.
        if let Err(e) = walk.deserialize(&mut de)
            && found.get_mut().is_none()
            && e.to_string().starts_with("recursion limit exceeded")
        {
            found.set(Some(too_deep(shape)));
        }
    } else {
        let mut de = rmp_serde::Deserializer::new(payload);
        de.set_max_depth(shape.max_depth.saturating_add(1));
        if let Err(rmp_serde::decode::Error::DepthLimitExceeded) = walk.deserialize(&mut de)
            && found.get_mut().is_none()
        {
            found.set(Some(too_deep(shape)));
        }
    }
    match found.into_inner() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn too_deep(shape: &Shape) -> Exceeded {
    Exceeded {
        reason: RejectReason::TooDeep,
        message: format!("the message is nested deeper than {} levels", shape.max_depth),
    }
}

/// One value of the walk, at `depth`.
#[derive(Clone, Copy)]
struct Walk<'a> {
    shape: &'a Shape,
    depth: usize,
    found: &'a Cell<Option<Exceeded>>,
}

impl Walk<'_> {
    fn fail<E: de::Error>(&self, e: Exceeded) -> E {
        let message = e.message.clone();
        self.found.set(Some(e));
        E::custom(message)
    }

    fn string<E: de::Error>(&self, len: usize) -> Result<(), E> {
        if len > self.shape.max_string_bytes {
            return Err(self.fail(Exceeded {
                reason: RejectReason::StringTooLong,
                message: format!(
                    "a string is {len} bytes; the limit is {} bytes",
                    self.shape.max_string_bytes
                ),
            }));
        }
        Ok(())
    }

    /// The walk of a child of a container at this depth, or the refusal when the container
    /// itself is too deep.
    fn enter<E: de::Error>(&self) -> Result<Self, E> {
        let depth = self.depth + 1;
        if depth > self.shape.max_depth {
            return Err(self.fail(too_deep(self.shape)));
        }
        Ok(Self { depth, ..*self })
    }

    fn count<E: de::Error>(&self, n: usize, what: &str) -> Result<(), E> {
        if n > self.shape.max_fields {
            return Err(self.fail(Exceeded {
                reason: RejectReason::TooManyFields,
                message: format!("an {what} has more than {} entries", self.shape.max_fields),
            }));
        }
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_i128<E>(self, _: i128) -> Result<(), E> {
        Ok(())
    }
    fn visit_u128<E>(self, _: u128) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_none<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        self.deserialize(d)
    }
    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        self.deserialize(d)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.string(v.len())
    }
    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<(), E> {
        self.string(v.len())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let child = self.enter()?;
        let mut n = 0usize;
        while seq.next_element_seed(child)?.is_some() {
            n += 1;
            self.count(n, "array")?;
        }
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let child = self.enter()?;
        let mut n = 0usize;
        while map.next_key_seed(child)?.is_some() {
            map.next_value_seed(child)?;
            n += 1;
            self.count(n, "object")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: Shape = Shape { max_bytes: 1000, max_depth: 3, max_fields: 4, max_string_bytes: 8 };
    const JSON: Option<&str> = Some(crate::headers::APPLICATION_JSON);

    fn code(ct: Option<&str>, payload: &[u8]) -> Option<&'static str> {
        check(ct, payload, &SMALL).err().map(|e| e.code())
    }

    #[test]
    fn each_limit_has_its_own_code_in_json_and_msgpack() {
        let cases: Vec<(serde_json::Value, Option<&str>)> = vec![
            (serde_json::json!({"a": {"b": [1, 2]}}), None),
            (serde_json::json!({"a": {"b": [[1]]}}), Some("too_deep")),
            (serde_json::json!({"a": 1, "b": 2, "c": 3, "d": 4, "e": 5}), Some("too_many_fields")),
            (serde_json::json!({"a": [1, 2, 3, 4, 5]}), Some("too_many_fields")),
            (serde_json::json!({"a": "123456789"}), Some("string_too_long")),
            (serde_json::json!({"123456789": 1}), Some("string_too_long")),
        ];
        for (value, want) in cases {
            let json = serde_json::to_vec(&value).unwrap();
            assert_eq!(code(JSON, &json), want, "json {value}");
            let mp = rmp_serde::to_vec_named(&value).unwrap();
            assert_eq!(code(None, &mp), want, "msgpack {value}");
        }
        assert_eq!(code(JSON, &vec![b' '; 1001]), Some("too_large"));
    }

    #[test]
    fn very_deep_payloads_are_refused_without_recursing_far() {
        let json = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(code(JSON, json.as_bytes()), Some("too_large"), "the size is checked first");
        let big = Shape { max_bytes: usize::MAX, ..SMALL };
        assert_eq!(check(JSON, json.as_bytes(), &big).unwrap_err().code(), "too_deep");
        let mut mp = vec![0x81, 0xa1, b'a'];
        mp.extend(std::iter::repeat_n(0x91u8, 100_000));
        mp.push(0x01);
        assert_eq!(check(None, &mp, &big).unwrap_err().code(), "too_deep");
    }

    #[test]
    fn what_does_not_parse_is_left_to_the_decoder() {
        assert_eq!(code(JSON, b"{\"a\": "), None);
        assert_eq!(code(None, b"\xc1\xff"), None);
    }
}
