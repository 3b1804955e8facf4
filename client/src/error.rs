//! Errors: the server's `{"error": {"code", "message", "request_id"}}` as a typed value,
//! and what went wrong before an answer arrived.

use std::time::Duration;

/// A failed call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server answered with an error (docs/API.md, "Errors").
    #[error("{status} {code}: {message}{}", request_suffix(request_id))]
    Api {
        status: u16,
        code: ErrorCode,
        message: String,
        request_id: String,
        /// The server's `Retry-After`, when it sent one.
        retry_after: Option<Duration>,
        /// On `421 not_leader`: whether that server wrote the request (docs/API.md).
        taken: Option<bool>,
    },
    /// No answer: the connection failed, timed out or TLS was refused.
    #[error("transport: {}", chain(.0))]
    Transport(#[from] reqwest::Error),
    /// The server did not answer within the client's timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// An answer that is not what the contract says (a bug on one side).
    #[error("unexpected answer: {0}")]
    Decode(String),
    /// A call the client refused before sending it (an empty key, a bad URL).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

/// ` (request ID)`, or nothing when the answer named no request (a proxy's, say).
fn request_suffix(request_id: &str) -> String {
    if request_id.is_empty() {
        String::new()
    } else {
        format!(" (request {request_id})")
    }
}

/// An error with its causes: reqwest's own message alone rarely says what failed.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

impl Error {
    /// The server's error code, when the server answered.
    pub fn code(&self) -> Option<&ErrorCode> {
        match self {
            Error::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    /// The HTTP status, when the server answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether TLS refused the server's certificate (not trusted, expired, another
    /// name): a setting to fix (`--ca-cert`, the URL's host), not an outage to retry.
    pub fn certificate_refused(&self) -> bool {
        let Error::Transport(e) = self else {
            return false;
        };
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(cause) = source {
            // An io::Error's source() skips the error it wraps: look inside it too.
            let mut inner = Some(cause);
            while let Some(e) = inner {
                if let Some(rustls::Error::InvalidCertificate(_)) = e.downcast_ref() {
                    return true;
                }
                inner = e
                    .downcast_ref::<std::io::Error>()
                    .and_then(|io| io.get_ref())
                    .map(|wrapped| wrapped as &(dyn std::error::Error + 'static));
            }
            source = cause.source();
        }
        false
    }

    /// What kind of failure this is, for callers that act per class (the CLI's exit
    /// codes).
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::Api { status, code, .. } => match (status, code) {
                (401 | 403, ErrorCode::QuotaExceeded) => ErrorClass::Invalid,
                (401 | 403, _) => ErrorClass::Auth,
                (404, _) => ErrorClass::NotFound,
                (421 | 429 | 503 | 507, _) | (408, _) => ErrorClass::Unavailable,
                (400..=499, _) => ErrorClass::Invalid,
                _ => ErrorClass::Server,
            },
            Error::Transport(_) | Error::Timeout(_) => ErrorClass::Unavailable,
            Error::Decode(_) => ErrorClass::Server,
            Error::InvalidArgument(_) => ErrorClass::Invalid,
        }
    }
}

/// Failure classes, each with its own exit code in the `oc` CLI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The request is wrong: fix it (400, 409, 413, 415, quota).
    Invalid,
    /// Credentials missing or not enough (401, 403).
    Auth,
    /// No such tenant, table, row or key (404).
    NotFound,
    /// Try again later (or elsewhere): not the writer, rate limits, overload,
    /// deadlines, no connection.
    Unavailable,
    /// The server failed (500) or answered off contract.
    Server,
}

/// The `code` of an error answer. Codes this client does not know yet arrive as
/// [`ErrorCode::Other`], so a newer server never breaks an older client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorCode {
    Unauthorized,
    Forbidden,
    InvalidJson,
    InvalidName,
    InvalidSchema,
    InvalidRow,
    InvalidKey,
    NotFound,
    RowNotFound,
    RouteNotFound,
    MethodNotAllowed,
    BodyTimeout,
    BodyReadFailed,
    AlreadyExists,
    IdempotencyConflict,
    TableChanged,
    InvalidMigration,
    MigrationConflict,
    MigrationRefused,
    BodyTooLarge,
    LimitExceeded,
    QuotaExceeded,
    MemoryFull,
    BatchTooLarge,
    UnsupportedMediaType,
    UnsupportedEncoding,
    RateLimited,
    TenantBusy,
    Overloaded,
    ShardUnavailable,
    DeadlineExceeded,
    StorageFull,
    OutOfDescriptors,
    LogFailed,
    TooManyConnections,
    SqlSyntax,
    SqlUnsupported,
    SqlInvalid,
    InvalidParams,
    QueryEvaluation,
    InvalidQueryString,
    InvalidHeaders,
    ExpectationFailed,
    TableNotFound,
    TenantNotFound,
    ResultTooLarge,
    ScanLimitExceeded,
    QueryMemoryExceeded,
    QueryMemoryBusy,
    DigestBusy,
    QueryTooComplex,
    QueryTimeout,
    AuditUnavailable,
    InvalidLastEventId,
    InvalidTtl,
    WatchTenantLimit,
    WatchServerLimit,
    ShuttingDown,
    NotLeader,
    ReplicationUnavailable,
    LsnNotApplied,
    InvalidMinLsn,
    Internal,
    Other(String),
}

impl ErrorCode {
    pub fn parse(code: &str) -> ErrorCode {
        use ErrorCode::*;
        match code {
            "unauthorized" => Unauthorized,
            "forbidden" => Forbidden,
            "invalid_json" => InvalidJson,
            "invalid_name" => InvalidName,
            "invalid_schema" => InvalidSchema,
            "invalid_row" => InvalidRow,
            "invalid_key" => InvalidKey,
            "not_found" => NotFound,
            "row_not_found" => RowNotFound,
            "route_not_found" => RouteNotFound,
            "method_not_allowed" => MethodNotAllowed,
            "body_timeout" => BodyTimeout,
            "body_read_failed" => BodyReadFailed,
            "already_exists" => AlreadyExists,
            "idempotency_conflict" => IdempotencyConflict,
            "table_changed" => TableChanged,
            "invalid_migration" => InvalidMigration,
            "migration_conflict" => MigrationConflict,
            "migration_refused" => MigrationRefused,
            "body_too_large" => BodyTooLarge,
            "limit_exceeded" => LimitExceeded,
            "quota_exceeded" => QuotaExceeded,
            "memory_full" => MemoryFull,
            "batch_too_large" => BatchTooLarge,
            "unsupported_media_type" => UnsupportedMediaType,
            "unsupported_encoding" => UnsupportedEncoding,
            "rate_limited" => RateLimited,
            "tenant_busy" => TenantBusy,
            "overloaded" => Overloaded,
            "shard_unavailable" => ShardUnavailable,
            "deadline_exceeded" => DeadlineExceeded,
            "storage_full" => StorageFull,
            "out_of_descriptors" => OutOfDescriptors,
            "log_failed" => LogFailed,
            "too_many_connections" => TooManyConnections,
            "sql_syntax" => SqlSyntax,
            "sql_unsupported" => SqlUnsupported,
            "sql_invalid" => SqlInvalid,
            "invalid_params" => InvalidParams,
            "query_evaluation" => QueryEvaluation,
            "invalid_query_string" => InvalidQueryString,
            "invalid_headers" => InvalidHeaders,
            "expectation_failed" => ExpectationFailed,
            "table_not_found" => TableNotFound,
            "tenant_not_found" => TenantNotFound,
            "result_too_large" => ResultTooLarge,
            "scan_limit_exceeded" => ScanLimitExceeded,
            "query_memory_exceeded" => QueryMemoryExceeded,
            "query_memory_busy" => QueryMemoryBusy,
            "digest_busy" => DigestBusy,
            "query_too_complex" => QueryTooComplex,
            "query_timeout" => QueryTimeout,
            "audit_unavailable" => AuditUnavailable,
            "invalid_last_event_id" => InvalidLastEventId,
            "invalid_ttl" => InvalidTtl,
            "watch_tenant_limit" => WatchTenantLimit,
            "watch_server_limit" => WatchServerLimit,
            "shutting_down" => ShuttingDown,
            "not_leader" => NotLeader,
            "replication_unavailable" => ReplicationUnavailable,
            "lsn_not_applied" => LsnNotApplied,
            "invalid_min_lsn" => InvalidMinLsn,
            "internal" => Internal,
            other => Other(other.to_string()),
        }
    }

    /// Whether the server did not take the request at all, so sending it again
    /// cannot apply it twice.
    pub fn not_taken(&self) -> bool {
        use ErrorCode::*;
        matches!(
            self,
            RateLimited
                | TenantBusy
                | Overloaded
                | TooManyConnections
                | LsnNotApplied
                | QueryMemoryBusy
                | DigestBusy
        )
    }

    /// Whether the request may have applied although it failed: safe to send again
    /// only with the same idempotency key.
    pub fn outcome_unknown(&self) -> bool {
        use ErrorCode::*;
        matches!(
            self,
            // shard_unavailable: the owner shard did not take *or did not answer*.
            // not_leader: a writer that lost its lease applied the write without
            // acknowledging it, as replication_unavailable (a follower's or a handing
            // over writer's refusal says `taken: false`: nothing was written).
            DeadlineExceeded
                | ShardUnavailable
                | StorageFull
                | OutOfDescriptors
                | LogFailed
                | NotLeader
                | ReplicationUnavailable
        )
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ErrorCode::Other(code) => f.write_str(code),
            known => {
                // The wire form is the variant name in snake case.
                let name = format!("{known:?}");
                let mut out = String::with_capacity(name.len() + 4);
                for (i, c) in name.chars().enumerate() {
                    if c.is_ascii_uppercase() {
                        if i > 0 {
                            out.push('_');
                        }
                        out.push(c.to_ascii_lowercase());
                    } else {
                        out.push(c);
                    }
                }
                f.write_str(&out)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_through_their_wire_names() {
        for code in [
            "invalid_json",
            "row_not_found",
            "invalid_last_event_id",
            "query_memory_exceeded",
            "out_of_descriptors",
        ] {
            let parsed = ErrorCode::parse(code);
            assert!(!matches!(parsed, ErrorCode::Other(_)), "{code}");
            assert_eq!(parsed.to_string(), code);
        }
        // Every code docs/API.md lists is known by name.
        let api = include_str!("../../docs/API.md");
        let table = &api[api.find("## Errors").expect("errors section")..];
        let table = &table[..table.find("\n## ").expect("next section")];
        let mut seen = 0;
        for line in table
            .lines()
            .filter(|l| l.starts_with("| 4") || l.starts_with("| 5"))
        {
            let cell = line.split('|').nth(2).expect("code cell");
            for code in cell.split('`').skip(1).step_by(2) {
                let parsed = ErrorCode::parse(code);
                assert!(!matches!(parsed, ErrorCode::Other(_)), "{code} is unknown");
                assert_eq!(parsed.to_string(), code);
                seen += 1;
            }
        }
        assert!(seen > 40, "only {seen} codes read from docs/API.md");
        assert_eq!(
            ErrorCode::parse("brand_new"),
            ErrorCode::Other("brand_new".into())
        );
    }

    #[test]
    fn an_answer_without_a_request_id_names_none() {
        let error = |request_id: &str| Error::Api {
            status: 502,
            code: ErrorCode::parse("http_502"),
            message: "bad gateway".into(),
            request_id: request_id.into(),
            retry_after: None,
            taken: None,
        };
        assert_eq!(error("").to_string(), "502 http_502: bad gateway");
        assert_eq!(
            error("r-1").to_string(),
            "502 http_502: bad gateway (request r-1)"
        );
    }
}
