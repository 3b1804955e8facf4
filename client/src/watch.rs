//! `/watch`: server-sent events read off the response body.

use futures_lite::StreamExt;
use serde_json::Value;

use crate::Error;

/// What to watch and where to resume.
#[derive(Debug, Clone, Default)]
pub struct WatchOptions {
    /// Only these tables' change and schema events (1–64 names).
    pub tables: Option<Vec<String>>,
    /// Resume after this LSN of the server's current epoch.
    pub from_lsn: Option<u64>,
    /// Resume after this event id (`<epoch>-<lsn>`); wins over `from_lsn`.
    pub last_event_id: Option<String>,
}

/// One event: `hello`, `change`, `schema`, `progress`, `reset`, … (docs/API.md).
#[derive(Debug, Clone, PartialEq)]
pub struct WatchEvent {
    pub event: String,
    pub data: Value,
    /// Set on the last event of a write batch: resume from here.
    pub id: Option<String>,
}

/// The events of one stream, in order. Ends (`None`) when the server ends it.
pub struct WatchStream {
    body: std::pin::Pin<Box<dyn futures_lite::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buffer: Vec<u8>,
    last_event_id: Option<String>,
}

/// The longest event this reader accepts (the server's largest is a change with a
/// key of the longest primary key, far below this).
const MAX_EVENT_BYTES: usize = 1 << 20;

impl WatchStream {
    pub(crate) fn new(response: reqwest::Response) -> WatchStream {
        WatchStream {
            body: Box::pin(response.bytes_stream()),
            buffer: Vec::new(),
            last_event_id: None,
        }
    }

    /// The id of the newest event that carried one: where a reconnect resumes.
    pub fn last_event_id(&self) -> Option<&str> {
        self.last_event_id.as_deref()
    }

    /// The next event, `None` at the end of the stream.
    pub async fn next(&mut self) -> Option<Result<WatchEvent, Error>> {
        loop {
            if let Some(end) = find_blank_line(&self.buffer) {
                let block: Vec<u8> = self.buffer.drain(..end.1).collect();
                match parse_block(&block[..end.0]) {
                    Ok(Some(event)) => {
                        if event.id.is_some() {
                            self.last_event_id.clone_from(&event.id);
                        }
                        return Some(Ok(event));
                    }
                    Ok(None) => continue, // a comment (heartbeat) or `retry:` alone
                    Err(e) => return Some(Err(e)),
                }
            }
            if self.buffer.len() > MAX_EVENT_BYTES {
                return Some(Err(Error::Decode(format!(
                    "an event longer than {MAX_EVENT_BYTES} bytes"
                ))));
            }
            match self.body.next().await? {
                Ok(chunk) => self.buffer.extend_from_slice(&chunk),
                Err(e) => return Some(Err(Error::Transport(e))),
            }
        }
    }
}

/// (end of the block, end of its blank line) of the first complete block.
fn find_blank_line(buffer: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0;
    while i + 1 < buffer.len() {
        if buffer[i] == b'\n' && buffer[i + 1] == b'\n' {
            return Some((i, i + 2));
        }
        if buffer[i..].starts_with(b"\r\n\r\n") {
            return Some((i, i + 4));
        }
        i += 1;
    }
    None
}

fn parse_block(block: &[u8]) -> Result<Option<WatchEvent>, Error> {
    let text = std::str::from_utf8(block)
        .map_err(|e| Error::Decode(format!("an event is not UTF-8: {e}")))?;
    let mut event = None;
    let mut data = String::new();
    let mut id = None;
    for line in text.lines() {
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => event = Some(value.to_string()),
            "data" => {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(value);
            }
            "id" => id = Some(value.to_string()),
            _ => {} // retry: and fields a newer server may add
        }
    }
    if event.is_none() && data.is_empty() {
        return Ok(None);
    }
    let data = if data.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&data)
            .map_err(|e| Error::Decode(format!("event data is not JSON: {e}: {data}")))?
    };
    Ok(Some(WatchEvent {
        event: event.unwrap_or_else(|| "message".to_string()),
        data,
        id,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_parse_into_events_and_comments_are_skipped() {
        let block = b"event: change\ndata: {\"lsn\":3}\nid: 1-3";
        let event = parse_block(block).expect("parses").expect("an event");
        assert_eq!(event.event, "change");
        assert_eq!(event.data["lsn"], 3);
        assert_eq!(event.id.as_deref(), Some("1-3"));
        assert_eq!(parse_block(b": heartbeat").expect("parses"), None);
        assert_eq!(find_blank_line(b"a\n\nb"), Some((1, 3)));
        assert_eq!(find_blank_line(b"a\r\n\r\nb"), Some((1, 5)));
        assert_eq!(find_blank_line(b"a\nb"), None);
    }
}
