//! API errors: every failure leaves as `{"error":{"code","message","request_id"}}` with
//! the status that tells a client what to do (fix the request, authenticate, retry).

use bytes::Bytes;
use hyper::{Response, StatusCode};
use oc_engine::{EngineError, MeshError};
use oc_io::Error as IoError;
use serde_json::json;

/// Seconds a client should wait before retrying a 503 or 429.
pub const RETRY_AFTER_S: u32 = 1;

/// `text` quoted for an error message, cut to its first 64 characters: a client's
/// value is echoed so it can see which one was refused, not sent back whole.
pub(crate) fn quoted_short(text: &str) -> String {
    const SHOWN: usize = 64;
    match text.char_indices().nth(SHOWN) {
        None => format!("{text:?}"),
        Some((cut, _)) => format!("{:?}… ({} bytes)", &text[..cut], text.len()),
    }
}

/// A refused or failed request.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    /// A stable, machine-readable reason (documented in docs/API.md).
    pub code: &'static str,
    pub message: String,
    /// Set on `421 not_leader` only: `false` when this server wrote nothing (a
    /// follower, a writer handing over), so a client may send any write on to the
    /// writer; `true` when the write is durable here but unacknowledged (a writer that
    /// lost its lease), so only a write with an idempotency key may be sent again.
    pub taken: Option<bool>,
    /// The connection closes after this answer (a body left unread): said in a
    /// `Connection: close` header, so the client does not send on it.
    pub closes: bool,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            taken: None,
            closes: false,
        }
    }

    /// `421 not_leader`, saying whether this server wrote the request.
    pub fn not_leader(taken: bool, message: impl Into<String>) -> Self {
        ApiError {
            taken: Some(taken),
            ..Self::new(StatusCode::MISDIRECTED_REQUEST, "not_leader", message)
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn overloaded(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", message)
    }

    /// Whether the client should retry after [`RETRY_AFTER_S`].
    pub fn retryable(&self) -> bool {
        matches!(
            self.status,
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS
        )
    }

    /// The JSON response, tagged with the request's id.
    pub fn into_response(self, request_id: &str) -> Response<Bytes> {
        let mut body = json!({"error": {
            "code": self.code,
            "message": self.message,
            "request_id": request_id,
        }});
        if let Some(taken) = self.taken {
            body["error"]["taken"] = taken.into();
        }
        let mut response = Response::new(Bytes::from(body.to_string()));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
        if self.retryable() {
            headers.insert(hyper::header::RETRY_AFTER, RETRY_AFTER_S.into());
        }
        if self.closes {
            headers.insert(
                hyper::header::CONNECTION,
                hyper::header::HeaderValue::from_static("close"),
            );
        }
        if self.status == StatusCode::UNAUTHORIZED {
            // RFC 9110 §11.6.1: a 401 names the scheme that would be accepted.
            headers.insert(
                hyper::header::WWW_AUTHENTICATE,
                hyper::header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let message = e.to_string();
        let (status, code) = match &e {
            EngineError::NotLeader(_) => return ApiError::not_leader(true, message),
            EngineError::HandingOver(_) => return ApiError::not_leader(false, message),
            EngineError::InvalidName { .. } => (StatusCode::BAD_REQUEST, "invalid_name"),
            EngineError::InvalidSchema { .. } => (StatusCode::BAD_REQUEST, "invalid_schema"),
            EngineError::InvalidRow { .. } => (StatusCode::BAD_REQUEST, "invalid_row"),
            EngineError::NotFound { .. } => (StatusCode::NOT_FOUND, "not_found"),
            EngineError::AlreadyExists { .. } => (StatusCode::CONFLICT, "already_exists"),
            EngineError::IdempotencyConflict { .. } => {
                (StatusCode::CONFLICT, "idempotency_conflict")
            }
            EngineError::TableChanged { .. } => (StatusCode::CONFLICT, "table_changed"),
            EngineError::InvalidMigration(_) => (StatusCode::BAD_REQUEST, "invalid_migration"),
            EngineError::MigrationConflict(_) => (StatusCode::CONFLICT, "migration_conflict"),
            EngineError::MigrationRefused { .. } => (StatusCode::BAD_REQUEST, "migration_refused"),
            EngineError::LimitExceeded { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "limit_exceeded"),
            // Not 413 (which tells a client to split its request) and not retryable:
            // the tenant must delete data or have its quota raised.
            EngineError::QuotaExceeded { .. } => (StatusCode::FORBIDDEN, "quota_exceeded"),
            EngineError::MemoryFull { .. } => (StatusCode::INSUFFICIENT_STORAGE, "memory_full"),
            EngineError::BatchTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "batch_too_large"),
            // The log refuses a record over its limit before placing it: nothing was
            // logged and the log is fine, so this is the request's size, not a 5xx.
            // (The shard checks first and answers `batch_too_large`; this is the second
            // line.)
            EngineError::Wal(IoError::RecordTooLarge { .. }) => {
                (StatusCode::PAYLOAD_TOO_LARGE, "limit_exceeded")
            }
            EngineError::Mesh(MeshError::Overloaded { .. }) => {
                (StatusCode::SERVICE_UNAVAILABLE, "overloaded")
            }
            EngineError::Mesh(_) => (StatusCode::SERVICE_UNAVAILABLE, "shard_unavailable"),
            EngineError::Wal(IoError::StorageFull { .. }) => {
                (StatusCode::SERVICE_UNAVAILABLE, "storage_full")
            }
            EngineError::Wal(e) if e.is_out_of_descriptors() => {
                (StatusCode::SERVICE_UNAVAILABLE, "out_of_descriptors")
            }
            EngineError::Wal(_) => (StatusCode::SERVICE_UNAVAILABLE, "log_failed"),
            EngineError::ReplicationUnavailable(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "replication_unavailable")
            }
            EngineError::Replay { .. } | EngineError::Layout(_) | EngineError::Unreadable(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        };
        ApiError::new(status, code, message)
    }
}

impl From<MeshError> for ApiError {
    fn from(e: MeshError) -> Self {
        EngineError::from(e).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_values_are_cut_short_in_messages() {
        assert_eq!(quoted_short("abc"), "\"abc\"");
        let long = "é".repeat(30_000);
        let shown = quoted_short(&long);
        assert!(
            shown.starts_with(&format!("\"{}\"…", "é".repeat(64))),
            "{shown}"
        );
        assert!(shown.ends_with("(60000 bytes)"), "{shown}");
    }
}
