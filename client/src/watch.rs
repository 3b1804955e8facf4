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
    /// A watch token (`?token=`), for a client without the tenant's key.
    pub token: Option<String>,
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
    /// How far `buffer` is known to hold no blank line, so each byte is scanned once.
    scanned: usize,
    last_event_id: Option<String>,
    /// Set after an error that ends the stream: `next` answers `None` from then on.
    ended: bool,
}

/// The longest event this reader accepts (the server's largest is a change with a
/// key of the longest primary key, far below this).
const MAX_EVENT_BYTES: usize = 1 << 20;

impl WatchStream {
    pub(crate) fn new(response: reqwest::Response) -> WatchStream {
        WatchStream {
            body: Box::pin(response.bytes_stream()),
            buffer: Vec::new(),
            scanned: 0,
            last_event_id: None,
            ended: false,
        }
    }

    /// The id of the newest event that carried one: where a reconnect resumes.
    pub fn last_event_id(&self) -> Option<&str> {
        self.last_event_id.as_deref()
    }

    /// The next event, `None` at the end of the stream. After an error the stream is
    /// over: reconnect with [`WatchStream::last_event_id`].
    pub async fn next(&mut self) -> Option<Result<WatchEvent, Error>> {
        if self.ended {
            return None;
        }
        let next = self.next_event().await;
        if matches!(next, Some(Err(_)) | None) {
            self.ended = true;
            self.buffer = Vec::new();
        }
        next
    }

    async fn next_event(&mut self) -> Option<Result<WatchEvent, Error>> {
        loop {
            // A blank line may straddle the previous scan's end: look 3 bytes back.
            let from = self.scanned.saturating_sub(3);
            if let Some((end, next)) = find_blank_line(&self.buffer[from..]) {
                let block: Vec<u8> = self.buffer.drain(..from + next).collect();
                self.scanned = 0;
                let block = block[..from + end]
                    .strip_prefix(b"\xEF\xBB\xBF")
                    .unwrap_or(&block[..from + end]);
                match parse_block(block) {
                    Ok(Some(event)) => {
                        if event.id.is_some() {
                            self.last_event_id.clone_from(&event.id);
                        }
                        if event.event.is_empty() {
                            continue; // an id alone: the position moved, nothing to report
                        }
                        return Some(Ok(event));
                    }
                    Ok(None) => continue, // a comment (heartbeat) or `retry:` alone
                    Err(e) => return Some(Err(e)),
                }
            }
            self.scanned = self.buffer.len();
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
        // Per the SSE rules an `id:` moves the resume position even without data.
        return Ok(id.map(|id| WatchEvent {
            event: String::new(),
            data: Value::Null,
            id: Some(id),
        }));
    }
    // oc sends JSON; data a newer server might send otherwise is kept as text.
    let data = match serde_json::from_str(&data) {
        Ok(json) => json,
        Err(_) if data.is_empty() => Value::Null,
        Err(_) => Value::String(data),
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
        let id_only = parse_block(b"id: 1-9")
            .expect("parses")
            .expect("a position");
        assert_eq!(
            (id_only.event.as_str(), id_only.id.as_deref()),
            ("", Some("1-9"))
        );
        let text = parse_block(b"event: x\ndata: not json")
            .expect("parses")
            .expect("event");
        assert_eq!(text.data, Value::String("not json".into()));
        assert_eq!(find_blank_line(b"a\n\nb"), Some((1, 3)));
        assert_eq!(find_blank_line(b"a\r\n\r\nb"), Some((1, 5)));
        assert_eq!(find_blank_line(b"a\nb"), None);
    }
}
