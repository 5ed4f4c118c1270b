//! The codec: MessagePack (`to_vec_named`, maps not arrays) is native; JSON is read when the
//! `Content-Type` header says `application/json` or the payload is plainly a JSON object, and
//! written when a deployment asks for it. Decode errors are classified into reject reasons.

use serde::{Serialize, de::DeserializeOwned};

use crate::headers::{APPLICATION_JSON, APPLICATION_MSGPACK};
use crate::types::RejectReason;

/// Format of payloads a service writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WireFormat {
    /// MessagePack with named fields (native, default).
    #[default]
    Msgpack,
    /// JSON, for human-readable streams.
    Json,
}

impl WireFormat {
    /// The `Content-Type` header value for this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Msgpack => APPLICATION_MSGPACK,
            Self::Json => APPLICATION_JSON,
        }
    }
}

impl std::str::FromStr for WireFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "msgpack" | "messagepack" => Ok(Self::Msgpack),
            "json" => Ok(Self::Json),
            other => Err(format!("unknown wire format {other:?} (use msgpack or json)")),
        }
    }
}

/// A value could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("failed to encode MessagePack: {0}")]
    Msgpack(#[from] rmp_serde::encode::Error),
    #[error("failed to encode JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// A payload could not be decoded; `reason` says how, for rejections and dead letters.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("{message}")]
pub struct DecodeError {
    pub reason: RejectReason,
    pub message: String,
}

/// Encodes `value` in `format`.
pub fn encode<T: Serialize + ?Sized>(format: WireFormat, value: &T) -> Result<Vec<u8>, EncodeError> {
    Ok(match format {
        WireFormat::Msgpack => rmp_serde::to_vec_named(value)?,
        WireFormat::Json => serde_json::to_vec(value)?,
    })
}

/// True when the payload should be read as JSON: the content type says so, or there is no
/// content type and the first non-blank byte is `{` (never the start of a MessagePack map).
pub fn is_json(content_type: Option<&str>, payload: &[u8]) -> bool {
    match content_type {
        Some(ct) => ct.trim().to_ascii_lowercase().starts_with(APPLICATION_JSON),
        None => payload.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{'),
    }
}

/// Decodes a payload, choosing the format from the content type (see [`is_json`]).
pub fn decode<T: DeserializeOwned>(content_type: Option<&str>, payload: &[u8]) -> Result<T, DecodeError> {
    decode_reporting(content_type, payload).map(|(v, _)| v)
}

/// Decodes a payload and also returns the paths of fields this version does not know, so they can
/// be reported instead of silently dropped.
pub fn decode_reporting<T: DeserializeOwned>(
    content_type: Option<&str>,
    payload: &[u8],
) -> Result<(T, Vec<String>), DecodeError> {
    let mut unknown = Vec::new();
    decode_noting(content_type, payload, &mut unknown).map(|v| (v, unknown))
}

/// Decodes a payload like [`decode`] but refuses a field `T` does not know (`malformed`, as
/// serde's `deny_unknown_fields` would) and a payload over the limits of a request
/// ([`crate::limits::REQUEST`]): for requests, where a misspelt field must not be ignored. The type itself stays tolerant, so copies stored with more fields still decode.
pub fn decode_strict<T: DeserializeOwned>(
    content_type: Option<&str>,
    payload: &[u8],
) -> Result<T, DecodeError> {
    crate::limits::check(content_type, payload, &crate::limits::REQUEST)?;
    let mut unknown = Vec::new();
    let result = decode_noting(content_type, payload, &mut unknown);
    // An unknown field seen before a decoding error came first, as it would have with
    // `deny_unknown_fields`.
    match unknown.first() {
        Some(field) => {
            Err(DecodeError { reason: RejectReason::Malformed, message: format!("unknown field `{field}`") })
        }
        None => result,
    }
}

/// Decodes a payload, noting the paths of fields `T` does not know in `unknown` (also those seen
/// before an error).
fn decode_noting<T: DeserializeOwned>(
    content_type: Option<&str>,
    payload: &[u8],
    unknown: &mut Vec<String>,
) -> Result<T, DecodeError> {
    if is_json(content_type, payload) {
        if json_depth_exceeds(payload, MAX_DEPTH) {
            return Err(too_deep());
        }
        let mut de = serde_json::Deserializer::from_slice(payload);
        serde_ignored::deserialize(&mut de, |p| unknown.push(p.to_string()))
            .and_then(|v| de.end().map(|()| v))
            .map_err(classify_json)
    } else {
        let mut de = rmp_serde::Deserializer::new(payload);
        de.set_max_depth(MAX_DEPTH);
        serde_ignored::deserialize(&mut de, |p| unknown.push(p.to_string())).map_err(|e| {
            // Every Flotilla message is a map; anything else was never a message at all.
            let is_map = matches!(payload.first(), Some(0x80..=0x8f | 0xde | 0xdf));
            if is_map {
                classify_msgpack(e)
            } else {
                DecodeError {
                    reason: RejectReason::Malformed,
                    message: format!("malformed MessagePack: expected a map ({e})"),
                }
            }
        })
    }
}

/// Deepest nesting a message may have. Deeper values could exhaust the stack of a decoder or be
/// unreadable when stored as JSON, so they are refused up front.
pub const MAX_DEPTH: usize = 64;

fn too_deep() -> DecodeError {
    DecodeError {
        reason: RejectReason::TooDeep,
        message: format!("the message is nested deeper than {MAX_DEPTH} levels"),
    }
}

/// True when JSON text nests objects and arrays deeper than `max` (strings are skipped).
fn json_depth_exceeds(payload: &[u8], max: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in payload {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

fn classify_message(message: String) -> DecodeError {
    let reason = if message.contains("expected struct") || message.contains("expected a map") {
        RejectReason::Malformed
    } else if message.starts_with("missing field") {
        RejectReason::MissingField
    } else if message.starts_with("invalid type") {
        RejectReason::WrongType
    } else if message.starts_with("invalid value")
        || message.starts_with("invalid length")
        || message.starts_with("unknown variant")
        || message.contains("did not match any variant")
    {
        RejectReason::InvalidField
    } else {
        RejectReason::Malformed
    };
    DecodeError { reason, message }
}

fn classify_json(e: serde_json::Error) -> DecodeError {
    use serde_json::error::Category;
    match e.classify() {
        Category::Data => classify_message(e.to_string()),
        Category::Io | Category::Syntax | Category::Eof => {
            DecodeError { reason: RejectReason::Malformed, message: format!("malformed JSON: {e}") }
        }
    }
}

fn classify_msgpack(e: rmp_serde::decode::Error) -> DecodeError {
    match e {
        rmp_serde::decode::Error::DepthLimitExceeded => too_deep(),
        rmp_serde::decode::Error::Syntax(m) => classify_message(m),
        rmp_serde::decode::Error::TypeMismatch(marker) if marker != rmp::Marker::Reserved => DecodeError {
            reason: RejectReason::WrongType,
            message: format!("invalid type: a field holds MessagePack {marker:?}"),
        },
        other => DecodeError {
            reason: RejectReason::Malformed,
            message: format!("malformed MessagePack: {other}"),
        },
    }
}

/// The string value of `key` in a JSON object's top level, found without decoding the rest (so
/// also in a document nested too deep to decode, or with other fields of the wrong type): a scan
/// that keeps no stack. `None` when the payload is not an object or `key` is absent or not a
/// string.
pub fn json_top_level_string(payload: &[u8], key: &str) -> Option<String> {
    let ws = |p: &[u8], mut i: usize| {
        while p.get(i).is_some_and(u8::is_ascii_whitespace) {
            i += 1;
        }
        i
    };
    let mut i = ws(payload, 0);
    if payload.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    loop {
        i = ws(payload, i);
        if payload.get(i) != Some(&b'"') {
            return None;
        }
        let end = json_string_end(payload, i)?;
        let k: String = serde_json::from_slice(payload.get(i..end)?).ok()?;
        i = ws(payload, end);
        if payload.get(i) != Some(&b':') {
            return None;
        }
        i = ws(payload, i + 1);
        if k == key {
            if payload.get(i) != Some(&b'"') {
                return None;
            }
            let end = json_string_end(payload, i)?;
            return serde_json::from_slice(payload.get(i..end)?).ok();
        }
        i = ws(payload, json_skip_value(payload, i)?);
        match payload.get(i)? {
            b',' => i += 1,
            _ => return None,
        }
    }
}

/// Just past the closing quote of the JSON string that opens at `start`.
fn json_string_end(p: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    loop {
        match p.get(i)? {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
}

/// Where the JSON value that starts at `start` ends: the `,` or `}` after it in its object.
fn json_skip_value(p: &[u8], start: usize) -> Option<usize> {
    let (mut depth, mut i) = (0usize, start);
    loop {
        match p.get(i)? {
            b'"' => i = json_string_end(p, i)?,
            b'{' | b'[' => {
                depth += 1;
                i += 1;
            }
            b'}' | b']' if depth == 0 => return Some(i),
            b'}' | b']' => {
                depth -= 1;
                i += 1;
            }
            b',' if depth == 0 => return Some(i),
            _ => i += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_top_level_string_is_found_without_decoding_the_rest() {
        let deep = format!(
            r#"{{"input": {}1{}, "n": {{"id": "inner"}}, "id": "t\u0031"}}"#,
            "[".repeat(5000),
            "]".repeat(5000)
        );
        assert_eq!(json_top_level_string(deep.as_bytes(), "id").as_deref(), Some("t1"));
        assert_eq!(json_top_level_string(br#" { "a": "x,}\"", "id" : "ok" } "#, "id").as_deref(), Some("ok"));
        assert_eq!(json_top_level_string(br#"{"id": 5}"#, "id"), None);
        assert_eq!(json_top_level_string(br#"{"a": {"id": "inner"}}"#, "id"), None);
        assert_eq!(json_top_level_string(br#"["id", "x"]"#, "id"), None);
        assert_eq!(json_top_level_string(br#"{"id": "unterminated"#, "id"), None);
        assert_eq!(json_top_level_string(b"", "id"), None);
    }

    use super::*;
    use crate::types::{Priority, TaskSubmission};

    fn sub() -> TaskSubmission {
        TaskSubmission {
            capability: "echo".into(),
            input: serde_json::json!({"text": "hi"}),
            priority: Some(Priority::BATCH),
            ..Default::default()
        }
    }

    #[test]
    fn msgpack_and_json_round_trip() {
        for fmt in [WireFormat::Msgpack, WireFormat::Json] {
            let bytes = encode(fmt, &sub()).unwrap();
            let back: TaskSubmission = decode(Some(fmt.content_type()), &bytes).unwrap();
            assert_eq!(back, sub());
        }
    }

    #[test]
    fn json_is_sniffed_without_header() {
        let back: TaskSubmission =
            decode(None, br#" {"capability":"echo","priority":"interactive"}"#).unwrap();
        assert_eq!(back.priority, Some(Priority::INTERACTIVE));
    }

    #[test]
    fn errors_are_classified() {
        let r = |ct: Option<&str>, b: &[u8]| decode::<TaskSubmission>(ct, b).unwrap_err().reason;
        assert_eq!(r(None, b"\xff\xfe garbage"), RejectReason::Malformed);
        assert_eq!(r(Some(APPLICATION_JSON), b"{not json"), RejectReason::Malformed);
        assert_eq!(r(None, br#"{"input": 1}"#), RejectReason::MissingField);
        assert_eq!(r(None, br#"{"capability": 7}"#), RejectReason::WrongType);
        assert_eq!(r(None, br#"{"capability": "x", "priority": 42}"#), RejectReason::InvalidField);
        let mp = rmp_serde::to_vec_named(&serde_json::json!({"capability": ["x"]})).unwrap();
        assert_eq!(r(None, &mp), RejectReason::WrongType);
        let mp = rmp_serde::to_vec_named(&serde_json::json!({"input": 1})).unwrap();
        assert_eq!(r(None, &mp), RejectReason::MissingField);
        let mp = rmp_serde::to_vec_named(&serde_json::json!({"capability": "x", "budget_tokens": "lots"}))
            .unwrap();
        assert_eq!(r(None, &mp), RejectReason::WrongType);
        let mp = rmp_serde::to_vec_named(&serde_json::json!(["x", 1])).unwrap();
        assert_eq!(r(None, &mp), RejectReason::Malformed);
        assert_eq!(r(None, b"\xc1"), RejectReason::Malformed);
        assert_eq!(r(None, b""), RejectReason::Malformed);
    }

    #[test]
    fn deep_nesting_is_refused_without_recursing() {
        let deep_json = format!(r#"{{"capability":"x","input":{}1{}}}"#, "[".repeat(600), "]".repeat(600));
        let e = decode::<TaskSubmission>(None, deep_json.as_bytes()).unwrap_err();
        assert_eq!(e.reason, RejectReason::TooDeep);
        let ok_json = format!(r#"{{"capability":"x","input":{}"[{{}}"{}}}"#, "[".repeat(10), "]".repeat(10));
        assert!(
            decode::<TaskSubmission>(None, ok_json.as_bytes()).is_ok(),
            "brackets inside strings do not count"
        );
        // Encoding that deep recurses too, so build the bytes by hand: fixarray(1) markers.
        let mut mp = rmp_serde::to_vec_named(&serde_json::json!({"capability": "x"})).unwrap();
        mp[0] = 0x82; // two entries: capability and input
        mp.extend(rmp_serde::to_vec(&"input").unwrap());
        mp.extend(std::iter::repeat_n(0x91u8, 600));
        mp.push(0x01);
        let e = decode::<TaskSubmission>(None, &mp).unwrap_err();
        assert_eq!(e.reason, RejectReason::TooDeep);
    }

    #[test]
    fn unknown_fields_are_reported_not_fatal() {
        let (s, unknown) =
            decode_reporting::<TaskSubmission>(None, br#"{"capability":"echo","colour":"red"}"#).unwrap();
        assert_eq!(s.capability, "echo");
        assert_eq!(unknown, vec!["colour".to_string()]);
    }

    #[test]
    fn strict_decoding_refuses_unknown_fields_first() {
        let r =
            |b: &[u8]| decode_strict::<TaskSubmission>(None, b).map(|s| s.capability).map_err(|e| e.reason);
        assert_eq!(r(br#"{"capability":"echo"}"#), Ok("echo".to_owned()));
        assert_eq!(r(br#"{"capability":"echo","colour":"red"}"#), Err(RejectReason::Malformed));
        // The unknown field comes before the missing one, as with `deny_unknown_fields`.
        assert_eq!(r(br#"{"colour":"red"}"#), Err(RejectReason::Malformed));
        assert_eq!(r(br#"{"capability":7,"colour":"red"}"#), Err(RejectReason::WrongType));
        let mp = rmp_serde::to_vec_named(&serde_json::json!({"capability": "x", "colour": 1})).unwrap();
        let e = decode_strict::<TaskSubmission>(None, &mp).unwrap_err();
        assert_eq!((e.reason, e.message.as_str()), (RejectReason::Malformed, "unknown field `colour`"));
    }
}
