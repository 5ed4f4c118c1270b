//! An incremental Server-Sent Events parser (the `text/event-stream` format of the HTML living
//! standard): bytes go in as the network delivers them, the `data` of each complete event comes
//! out. Lines end in `\n`, `\r\n` or `\r`, also when the ending is split across two chunks;
//! comments and the `event`, `id` and `retry` fields are skipped (the chat APIs do not need them).
//! An event still open when the stream ends is never emitted.

/// Longest line or event accepted; a longer one means the peer is not speaking SSE.
const MAX_LEN: usize = 16 * 1024 * 1024;

/// Why bytes could not be parsed as SSE.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    #[error("an event-stream line is not UTF-8")]
    NotUtf8,
    #[error("an event-stream line or event is longer than {MAX_LEN} bytes")]
    TooLong,
}

/// Parser state between chunks.
#[derive(Debug, Default)]
pub struct Parser {
    /// Bytes of a line not yet terminated.
    pending: Vec<u8>,
    /// The previous chunk ended in `\r`: a `\n` opening the next one belongs to that ending.
    after_cr: bool,
    /// Data lines of the event being read.
    data: Option<String>,
}

impl Parser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds a chunk; returns the data of every event the chunk completed, in order.
    pub fn feed(&mut self, mut chunk: &[u8]) -> Result<Vec<String>, SseError> {
        let mut events = Vec::new();
        if self.after_cr {
            self.after_cr = false;
            if let Some(rest) = chunk.strip_prefix(b"\n") {
                chunk = rest;
            }
        }
        while let Some(pos) = chunk.iter().position(|b| *b == b'\n' || *b == b'\r') {
            let (line, rest) = chunk.split_at(pos);
            self.pending.extend_from_slice(line);
            let line = std::mem::take(&mut self.pending);
            self.line(&line, &mut events)?;
            chunk = match rest {
                [b'\r', b'\n', tail @ ..] => tail,
                [b'\r'] => {
                    self.after_cr = true;
                    &[]
                }
                [_, tail @ ..] => tail,
                [] => &[],
            };
        }
        self.pending.extend_from_slice(chunk);
        if self.pending.len() > MAX_LEN {
            return Err(SseError::TooLong);
        }
        Ok(events)
    }

    fn line(&mut self, line: &[u8], events: &mut Vec<String>) -> Result<(), SseError> {
        let line = std::str::from_utf8(line).map_err(|_| SseError::NotUtf8)?;
        if line.is_empty() {
            if let Some(data) = self.data.take() {
                events.push(data);
            }
            return Ok(());
        }
        if line.starts_with(':') {
            return Ok(());
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        if field == "data" {
            match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.data = Some(value.to_owned()),
            }
            if self.data.as_ref().is_some_and(|d| d.len() > MAX_LEN) {
                return Err(SseError::TooLong);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(chunks: &[&[u8]]) -> Vec<String> {
        let mut p = Parser::new();
        let mut out = Vec::new();
        for c in chunks {
            out.extend(p.feed(c).unwrap());
        }
        out
    }

    #[test]
    fn events_split_anywhere_come_out_whole() {
        let text = "data: {\"a\":1}\n\n: keep-alive\n\nevent: x\ndata: two\ndata:  lines\n\ndata: [DONE]\n\n";
        let whole = all(&[text.as_bytes()]);
        assert_eq!(whole, ["{\"a\":1}", "two\n lines", "[DONE]"]);
        // Every split point, and byte by byte.
        for i in 0..text.len() {
            let (a, b) = text.as_bytes().split_at(i);
            assert_eq!(all(&[a, b]), whole, "split at {i}");
        }
        let bytes: Vec<&[u8]> = text.as_bytes().chunks(1).collect();
        assert_eq!(all(&bytes), whole);
    }

    #[test]
    fn all_line_endings_and_split_utf8() {
        let text = "data: é€\r\n\r\ndata: b\r\rdata:c\n\n";
        let bytes: Vec<&[u8]> = text.as_bytes().chunks(1).collect();
        assert_eq!(all(&bytes), ["é€", "b", "c"]);
        for i in 0..text.len() {
            let (a, b) = text.as_bytes().split_at(i);
            assert_eq!(all(&[a, b]), ["é€", "b", "c"], "split at {i}");
        }
    }

    #[test]
    fn an_unclosed_event_is_not_emitted_and_bad_bytes_are_errors() {
        assert_eq!(all(&[b"data: x\n\ndata: cut"]), ["x"]);
        assert_eq!(Parser::new().feed(b"data: \xff\n"), Err(SseError::NotUtf8));
    }
}
