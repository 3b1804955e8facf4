//! An async client of the oc HTTP API (docs/API.md, docs/openapi.yaml).
//!
//! ```no_run
//! # async fn demo() -> Result<(), oc_client::Error> {
//! use oc_client::{Client, TableSchema, WriteBatch};
//! use serde_json::json;
//!
//! let oc = Client::builder("http://127.0.0.1:7070").token("…").build()?;
//! oc.create_tenant("acme").await?;
//! let items = TableSchema::new("items", &[("id", "int"), ("name", "text")], &["id"]);
//! oc.create_table("acme", &items).await?;
//! let row = json!({"id": 1, "name": "one"}).as_object().cloned().unwrap_or_default();
//! oc.write_rows("acme", "items", WriteBatch::default().upsert(row)).await?;
//! let answer = oc.ask("acme", "SELECT name FROM items WHERE id = $1", &[json!(1)]).await?;
//! # Ok(()) }
//! ```
//!
//! Calls retry what is safe to retry: reads, and anything the server refused without
//! taking it (`429`, `503 overloaded`, `too_many_connections`, a refused connection),
//! after the server's `Retry-After` (giving up when it asks for more than
//! [`RetryPolicy::max_wait`]). A write whose outcome is unknown (`503
//! deadline_exceeded` or `shard_unavailable`, a dropped connection) is sent again only
//! when it carries an idempotency key: set one on every write that must not apply
//! twice. Operator actions (tenants, tables, keys) are never sent again once they may
//! have run.
//!
//! With replication, give the client every server, writer and followers
//! (`Client::builder("https://a:7070,https://b:7070")`): calls go to one of them and
//! move on to the next when it refuses a write as not the writer (`421 not_leader`)
//! or cannot be reached, so writes find the writer again after a failover or a
//! switchover; a stream ([`Client::watch`]) moves on when its server cannot be
//! reached or is shutting down. A refusal that wrote nothing (a follower, a writer handing over) is
//! sent on whatever the write; one from a writer that lost its lease after logging
//! the write only with an idempotency key. Reads that must see a write pass its `lsn`
//! as [`ReadOptions::min_lsn`] (read-your-writes on a follower).
//!
//! One file, about 570 lines of code: every route is one short method over the same
//! request/retry core, and splitting the methods from that core would only add
//! indirection.
#![deny(clippy::expect_used)]

mod error;
mod tls;
mod types;
mod watch;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

pub use error::{Error, ErrorClass, ErrorCode};
pub use types::*;
pub use watch::{WatchEvent, WatchOptions, WatchStream};

/// Path segments are percent-encoded with everything but RFC 3986's unreserved
/// characters, so a key holding `/`, `%`, `?` or a space reaches the server intact.
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// `s` as one path segment. Empty, `.` and `..` are refused: URL normalization would
/// drop or climb over them, sending the request to another route (a `DELETE` of
/// table `..` would reach the tenant).
fn segment(s: &str) -> Result<String, Error> {
    if s.is_empty() || s == "." || s == ".." {
        return Err(Error::InvalidArgument(format!(
            "{s:?} cannot be a path segment (a name or key part)"
        )));
    }
    Ok(encode(s))
}

/// `s` percent-encoded for a path segment or a query value.
fn encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, SEGMENT).to_string()
}

/// How calls are retried.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1 = never retry).
    pub attempts: u32,
    /// Wait before the first retry when the server names no `Retry-After`; doubled
    /// per retry.
    pub backoff: Duration,
    /// The longest wait between attempts: a `Retry-After` asking for more ends the
    /// retries with that error, so the caller decides.
    pub max_wait: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 4,
            backoff: Duration::from_millis(100),
            max_wait: Duration::from_secs(5),
        }
    }
}

pub struct ClientBuilder {
    base: String,
    token: Option<String>,
    ca_pem: Option<Vec<u8>>,
    timeout: Duration,
    retry: RetryPolicy,
}

impl ClientBuilder {
    /// Bearer token: the admin token or a tenant's API key.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Trusts this PEM certificate (a private CA or a self-signed server) on top of
    /// the public roots.
    pub fn ca_cert_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca_pem = Some(pem.into());
        self
    }

    /// Per-request timeout (default 30 s). Streams (`watch`) have none.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    pub fn build(self) -> Result<Client, Error> {
        let mut endpoints = Vec::new();
        // Empty entries (a trailing comma in a templated setting) are skipped.
        for base in self
            .base
            .split(',')
            .map(str::trim)
            .filter(|b| !b.is_empty())
        {
            let base = base.trim_end_matches('/').to_string();
            let url = reqwest::Url::parse(&base)
                .map_err(|e| Error::InvalidArgument(format!("server URL {base:?}: {e}")))?;
            if url.scheme() != "http" && url.scheme() != "https" {
                return Err(Error::InvalidArgument(format!(
                    "server URL {base:?} must start with http:// or https://"
                )));
            }
            // Paths are appended to the base as text: a query, a fragment or
            // credentials in it would be sent wrong or not at all, never as meant.
            if url.query().is_some()
                || url.fragment().is_some()
                || !url.username().is_empty()
                || url.password().is_some()
            {
                return Err(Error::InvalidArgument(format!(
                    "server URL {base:?} must be scheme, host, port and path only: no \
                     ?query, #fragment or user:password@ (send credentials as a token)"
                )));
            }
            endpoints.push(base);
        }
        if endpoints.is_empty() {
            return Err(Error::InvalidArgument(
                "no server URL given (one, or several separated by commas)".into(),
            ));
        }
        let mut http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .user_agent(concat!("oc-client/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = &self.ca_pem {
            let tls = tls::trusting(pem)
                .map_err(|e| Error::InvalidArgument(format!("CA certificate: {e}")))?;
            http = http.use_preconfigured_tls(tls);
        }
        let http = http
            .build()
            .map_err(|e| Error::InvalidArgument(format!("HTTP client: {e}")))?;
        Ok(Client {
            http,
            endpoints: endpoints.into(),
            current: Arc::default(),
            token: self.token,
            timeout: self.timeout,
            retry: self.retry,
        })
    }
}

/// A connection pool to an oc server, or to a writer and its followers. Cheap to
/// clone; clones share which server they take for the writer.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    endpoints: Arc<[String]>,
    /// The index in `endpoints` calls go to: the last one that did not refuse a write
    /// as a follower nor fail to answer.
    current: Arc<AtomicUsize>,
    token: Option<String>,
    timeout: Duration,
    retry: RetryPolicy,
}

/// Whether a call may be sent again once it might have run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Replay {
    /// A read: sent again, to the same server when it was only slow.
    Read,
    /// A write carrying an idempotency key.
    Safe,
    /// An operator action: retried only when the server did not take it.
    Unsafe,
}

impl Client {
    /// `base_url`: one server's data API, or several separated by commas (a writer
    /// and its followers, in any order).
    pub fn builder(base_url: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            base: base_url.into(),
            token: None,
            ca_pem: None,
            timeout: Duration::from_secs(30),
            retry: RetryPolicy::default(),
        }
    }

    /// The base URL calls go to now (with several servers, the one last found
    /// taking writes or answering).
    pub fn base_url(&self) -> &str {
        &self.endpoints[self.current.load(Ordering::Relaxed) % self.endpoints.len()]
    }

    // --- tenants ---

    pub async fn create_tenant(&self, tenant: &str) -> Result<TenantCreated, Error> {
        let body = json!({ "tenant": tenant });
        self.call(Method::POST, "/v1/tenants", Some(&body), Replay::Unsafe)
            .await
    }

    pub async fn list_tenants(&self) -> Result<Vec<String>, Error> {
        self.get_list("/v1/tenants", "tenants").await
    }

    pub async fn usage(&self, tenant: &str) -> Result<Usage, Error> {
        self.get(&format!("/v1/tenants/{}/usage", segment(tenant)?))
            .await
    }

    pub async fn drop_tenant(&self, tenant: &str) -> Result<Dropped, Error> {
        let path = format!("/v1/tenants/{}", segment(tenant)?);
        self.call(Method::DELETE, &path, None, Replay::Unsafe).await
    }

    // --- API keys ---

    pub async fn create_key(&self, tenant: &str, name: Option<&str>) -> Result<KeyCreated, Error> {
        let path = format!("/v1/tenants/{}/keys", segment(tenant)?);
        let body = match name {
            Some(name) => json!({ "name": name }),
            None => json!({}),
        };
        self.call(Method::POST, &path, Some(&body), Replay::Unsafe)
            .await
    }

    pub async fn list_keys(&self, tenant: &str) -> Result<Vec<KeyInfo>, Error> {
        let path = format!("/v1/tenants/{}/keys", segment(tenant)?);
        self.get_list(&path, "keys").await
    }

    pub async fn revoke_key(&self, tenant: &str, key_id: &str) -> Result<KeyRevoked, Error> {
        let path = format!("/v1/tenants/{}/keys/{}", segment(tenant)?, segment(key_id)?);
        self.call(Method::DELETE, &path, None, Replay::Unsafe).await
    }

    // --- tables ---

    pub async fn create_table(
        &self,
        tenant: &str,
        schema: &TableSchema,
    ) -> Result<TableCreated, Error> {
        let body = serde_json::to_value(schema).map_err(|e| Error::Decode(e.to_string()))?;
        self.create_table_json(tenant, &body).await
    }

    /// As [`Client::create_table`], with the schema as JSON sent as given: the server
    /// refuses unknown fields, where [`TableSchema`] would drop them.
    pub async fn create_table_json(
        &self,
        tenant: &str,
        schema: &Value,
    ) -> Result<TableCreated, Error> {
        let path = format!("/v1/tenants/{}/tables", segment(tenant)?);
        self.call(Method::POST, &path, Some(schema), Replay::Unsafe)
            .await
    }

    /// Every table of the tenant, page after page (a page holds about 256 KiB).
    pub async fn list_tables(&self, tenant: &str) -> Result<Vec<TableInfo>, Error> {
        let path = format!("/v1/tenants/{}/tables", segment(tenant)?);
        let mut tables = Vec::new();
        let mut page_path = path.clone();
        loop {
            let mut answer: Value = self.get(&page_path).await?;
            let page: Vec<TableInfo> = serde_json::from_value(answer["tables"].take())
                .map_err(|e| Error::Decode(format!("GET {page_path}: tables: {e}")))?;
            tables.extend(page);
            match answer["next_after"].as_str() {
                // Pages follow in name order: one that does not move on is a bad answer.
                Some(last) if tables.last().is_some_and(|t| t.schema.name == last) => {
                    page_path = format!("{path}?after={}", encode(last))
                }
                Some(last) => {
                    return Err(Error::Decode(format!(
                        "GET {page_path}: next_after {last:?} is not the page's last table"
                    )))
                }
                None => return Ok(tables),
            }
        }
    }

    pub async fn describe_table(&self, tenant: &str, table: &str) -> Result<TableInfo, Error> {
        self.get(&format!(
            "/v1/tenants/{}/tables/{}",
            segment(tenant)?,
            segment(table)?
        ))
        .await
    }

    pub async fn drop_table(&self, tenant: &str, table: &str) -> Result<Dropped, Error> {
        let path = format!(
            "/v1/tenants/{}/tables/{}",
            segment(tenant)?,
            segment(table)?
        );
        self.call(Method::DELETE, &path, None, Replay::Unsafe).await
    }

    // --- rows ---

    /// Writes a batch atomically; answers once it is durable. A batch with an
    /// idempotency key is sent again after an unknown outcome (a timeout, a dropped
    /// connection, `503 deadline_exceeded`); one without is retried only when the
    /// server did not take it.
    pub async fn write_rows(
        &self,
        tenant: &str,
        table: &str,
        batch: WriteBatch,
    ) -> Result<WriteOutcome, Error> {
        let (body, replay) = Self::prepare(batch)?;
        let path = format!(
            "/v1/tenants/{}/tables/{}/rows",
            segment(tenant)?,
            segment(table)?
        );
        self.call(Method::POST, &path, Some(&body), replay).await
    }

    /// The body of a write, and whether it may be sent again once it may have run.
    fn prepare(batch: WriteBatch) -> Result<(Value, Replay), Error> {
        let body = serde_json::to_value(&batch).map_err(|e| Error::Decode(e.to_string()))?;
        let replay = if batch.idempotency_key.is_some() {
            Replay::Safe
        } else {
            Replay::Unsafe
        };
        Ok((body, replay))
    }

    /// The row with this primary key (one value per key column, in key order), or
    /// `None`.
    pub async fn get_row(
        &self,
        tenant: &str,
        table: &str,
        key: &[Value],
    ) -> Result<Option<Row>, Error> {
        let found = self
            .get_row_with(tenant, table, key, &ReadOptions::default())
            .await?;
        Ok(found.map(|found| found.row))
    }

    /// As [`Client::get_row`], with `options` (`min_lsn`; `explain` does not apply),
    /// and the LSN the answer saw.
    pub async fn get_row_with(
        &self,
        tenant: &str,
        table: &str,
        key: &[Value],
        options: &ReadOptions,
    ) -> Result<Option<FoundRow>, Error> {
        if key.is_empty() {
            return Err(Error::InvalidArgument(
                "a row key needs one value per primary-key column".into(),
            ));
        }
        let mut path = format!(
            "/v1/tenants/{}/tables/{}/rows",
            segment(tenant)?,
            segment(table)?
        );
        for part in key {
            let text = match part {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                other => {
                    return Err(Error::InvalidArgument(format!(
                        "a key value is text, a number or a bool, not {other}"
                    )))
                }
            };
            path.push('/');
            path.push_str(&segment(&text)?);
        }
        if let Some(lsn) = options.min_lsn {
            path.push_str(&format!("?min_lsn={lsn}"));
        }
        match self.get::<FoundRow>(&path).await {
            Ok(found) => Ok(Some(found)),
            Err(e) if e.code() == Some(&ErrorCode::RowNotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    // --- /ask ---

    /// Runs one SELECT; `params` fill `$1`, `$2`, ….
    pub async fn ask(&self, tenant: &str, sql: &str, params: &[Value]) -> Result<AskAnswer, Error> {
        self.ask_with(tenant, sql, params, &ReadOptions::default())
            .await
    }

    /// As [`Client::ask`], with the plan and its per-stage figures in `plan`.
    pub async fn ask_explain(
        &self,
        tenant: &str,
        sql: &str,
        params: &[Value],
    ) -> Result<AskAnswer, Error> {
        let options = ReadOptions {
            explain: true,
            ..ReadOptions::default()
        };
        self.ask_with(tenant, sql, params, &options).await
    }

    /// As [`Client::ask`], with `options`.
    pub async fn ask_with(
        &self,
        tenant: &str,
        sql: &str,
        params: &[Value],
        options: &ReadOptions,
    ) -> Result<AskAnswer, Error> {
        let mut query = Vec::new();
        if options.explain {
            query.push("explain=true".to_string());
        }
        if let Some(lsn) = options.min_lsn {
            query.push(format!("min_lsn={lsn}"));
        }
        let path = format!(
            "/v1/tenants/{}/ask{}{}",
            segment(tenant)?,
            if query.is_empty() { "" } else { "?" },
            query.join("&")
        );
        let body = json!({ "sql": sql, "params": params });
        self.call(Method::POST, &path, Some(&body), Replay::Read)
            .await
    }

    // --- /watch ---

    /// Mints a token that opens this tenant's streams (`ttl_s`: 1–3600, default 300).
    pub async fn create_watch_token(
        &self,
        tenant: &str,
        ttl_s: Option<u64>,
    ) -> Result<WatchToken, Error> {
        let path = format!("/v1/tenants/{}/watch-tokens", segment(tenant)?);
        let body = match ttl_s {
            Some(ttl) => json!({ "ttl_s": ttl }),
            None => json!({}),
        };
        self.call(Method::POST, &path, Some(&body), Replay::Unsafe)
            .await
    }

    /// Opens the tenant's change stream (docs/API.md, "Change streams").
    pub async fn watch(&self, tenant: &str, options: &WatchOptions) -> Result<WatchStream, Error> {
        let mut path = format!("/v1/tenants/{}/watch", segment(tenant)?);
        let mut query = Vec::new();
        if let Some(tables) = &options.tables {
            query.push(format!("tables={}", encode(&tables.join(","))));
        }
        if let Some(lsn) = options.from_lsn {
            query.push(format!("from_lsn={lsn}"));
        }
        if let Some(token) = &options.token {
            query.push(format!("token={}", encode(token)));
        }
        if !query.is_empty() {
            path = format!("{path}?{}", query.join("&"));
        }
        // Any server streams a tenant's changes: one that cannot serve it now moves the
        // client on, each server tried once (as `call` does for a write refused as not
        // the writer), so a stream resumes after a failover or a switchover.
        let mut tried = 0;
        loop {
            let at = self.current.load(Ordering::Relaxed) % self.endpoints.len();
            let mut request = self.request_to(&self.endpoints[at], Method::GET, &path);
            if let Some(id) = &options.last_event_id {
                request = request.header("last-event-id", id);
            }
            // The stream itself has no deadline; its head does.
            let outcome = match tokio::time::timeout(self.timeout, request.send()).await {
                Err(_) => Error::Timeout(self.timeout),
                Ok(Err(e)) => Error::Transport(e),
                Ok(Ok(response)) => match check(response).await {
                    Ok(response) => return Ok(WatchStream::new(response)),
                    Err(e) => e,
                },
            };
            tried += 1;
            if tried >= self.endpoints.len() || !stream_elsewhere(&outcome) {
                return Err(outcome);
            }
            let next = (at + 1) % self.endpoints.len();
            let _ = self
                .current
                .compare_exchange(at, next, Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    // --- operator ---

    pub async fn audit_logs(&self, query: &AuditQuery) -> Result<AuditPage, Error> {
        let mut parts = Vec::new();
        if let Some(since) = &query.since {
            parts.push(format!("since={}", encode(since)));
        }
        if let Some(after) = query.after {
            parts.push(format!("after={after}"));
        }
        if let Some(tenant) = &query.tenant {
            parts.push(format!("tenant={}", segment(tenant)?));
        }
        if let Some(action) = &query.action {
            parts.push(format!("action={}", encode(action)));
        }
        if let Some(limit) = query.limit {
            parts.push(format!("limit={limit}"));
        }
        let path = if parts.is_empty() {
            "/v1/audit/logs".to_string()
        } else {
            format!("/v1/audit/logs?{}", parts.join("&"))
        };
        self.get(&path).await
    }

    /// Where each shard's log stands and, with `tables`, a digest of every table
    /// (the live side of `oc-pitr drill --live`).
    pub async fn admin_digest(&self, tables: bool) -> Result<Value, Error> {
        let query = if tables { "" } else { "?tables=false" };
        self.get(&format!("/v1/admin/digest{query}")).await
    }

    /// The server's API contract (OpenAPI 3.1).
    pub async fn openapi(&self) -> Result<Value, Error> {
        self.get("/v1/openapi.json").await
    }

    /// A JSON GET answered with its status whatever it is: `/health` and `/ready`
    /// of an ops listener answer 503 with a body worth reading.
    pub async fn get_json(&self, path: &str) -> Result<(u16, Value), Error> {
        let response = self
            .request(Method::GET, path)
            .timeout(self.timeout)
            .send()
            .await?;
        let status = response.status().as_u16();
        let bytes = read_capped(response).await?;
        let body = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Decode(format!("GET {path}: {e}")))?;
        Ok((status, body))
    }

    // --- plumbing ---

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, Error> {
        self.call(Method::GET, path, None, Replay::Read).await
    }

    /// The array under `field` of a GET's answer (`{"tables": [...]}`).
    async fn get_list<T: DeserializeOwned>(
        &self,
        path: &str,
        field: &str,
    ) -> Result<Vec<T>, Error> {
        let mut answer: Value = self.get(path).await?;
        serde_json::from_value(answer[field].take())
            .map_err(|e| Error::Decode(format!("GET {path}: {field}: {e}")))
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.request_to(self.base_url(), method, path)
    }

    fn request_to(&self, base: &str, method: Method, path: &str) -> reqwest::RequestBuilder {
        let mut request = self.http.request(method, format!("{base}{path}"));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        request
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        replay: Replay,
    ) -> Result<T, Error> {
        let several = self.endpoints.len() > 1;
        let mut attempt = 1;
        // Servers tried in a row without an answer worth keeping: until each was
        // tried once, moving on costs no wait.
        let mut moved = 0;
        let mut waits = 0;
        loop {
            let at = self.current.load(Ordering::Relaxed) % self.endpoints.len();
            let mut request = self
                .request_to(&self.endpoints[at], method.clone(), path)
                .timeout(self.timeout);
            if let Some(body) = body {
                request = request.json(body);
            }
            let outcome = match request.send().await {
                Ok(response) => match check(response).await {
                    Ok(response) => {
                        let bytes = read_capped(response).await?;
                        return serde_json::from_slice(&bytes)
                            .map_err(|e| Error::Decode(format!("{method} {path}: {e}")));
                    }
                    Err(e) => e,
                },
                Err(e) => Error::Transport(e),
            };
            let move_on = several && elsewhere(&outcome, replay);
            if move_on {
                // Another call may have moved on already: never skip past its choice.
                let next = (at + 1) % self.endpoints.len();
                let _ =
                    self.current
                        .compare_exchange(at, next, Ordering::Relaxed, Ordering::Relaxed);
            }
            if attempt >= self.retry.attempts || !retryable(&outcome, replay, several) {
                return Err(outcome);
            }
            attempt += 1;
            if move_on && moved + 1 < self.endpoints.len() {
                moved += 1;
                continue;
            }
            moved = 0;
            let wait = match &outcome {
                Error::Api {
                    retry_after: Some(after),
                    ..
                } if *after > self.retry.max_wait => return Err(outcome),
                Error::Api {
                    retry_after: Some(after),
                    ..
                } => *after,
                _ => (self.retry.backoff * 2u32.saturating_pow(waits)).min(self.retry.max_wait),
            };
            waits += 1;
            // Up to a fifth more, so clients refused together do not return together.
            let wait = wait.mul_f64(1.0 + fastrand::f64() / 5.0);
            tokio::time::sleep(wait).await;
        }
    }
}

/// Whether another server may answer what this one did not: it is not the writer,
/// it is behind the LSN a read asked for, or it cannot be reached. A server that was
/// only slow keeps a read (a write may find it paused or cut off, and move on).
fn elsewhere(error: &Error, replay: Replay) -> bool {
    match error {
        Error::Api { code, .. } => matches!(code, ErrorCode::NotLeader | ErrorCode::LsnNotApplied),
        Error::Transport(e) if e.is_connect() => true,
        Error::Transport(_) | Error::Timeout(_) => replay != Replay::Read,
        Error::Decode(_) | Error::InvalidArgument(_) => false,
    }
}

/// Whether another server may open the stream this one did not: it cannot be reached
/// or answer in time, it is shutting down, or it serves as many streams as it may.
fn stream_elsewhere(error: &Error) -> bool {
    match error {
        Error::Api { code, .. } => {
            matches!(code, ErrorCode::ShuttingDown | ErrorCode::WatchServerLimit)
        }
        Error::Transport(e) => e.is_connect(),
        Error::Timeout(_) => true,
        Error::Decode(_) | Error::InvalidArgument(_) => false,
    }
}

/// Whether `error` may be answered by sending the same request again (`several`:
/// there is another server to send it to).
fn retryable(error: &Error, replay: Replay, several: bool) -> bool {
    let replayable = replay != Replay::Unsafe;
    match error {
        Error::Api {
            code,
            status,
            taken,
            ..
        } => {
            code.not_taken()
                // Nothing was written, but only another server would take it.
                || (*taken == Some(false) && several)
                || (replayable
                    && (code.outcome_unknown() || *status == StatusCode::BAD_GATEWAY.as_u16()))
        }
        // A refused connection never reached the server; anything later may have.
        Error::Transport(e) => e.is_connect() || replayable,
        Error::Timeout(_) => replayable,
        Error::Decode(_) | Error::InvalidArgument(_) => false,
    }
}

/// The largest answer body read: above the server's largest (`/ask` at its row limit
/// with wide rows), so a broken or hostile peer cannot exhaust the client's memory.
const MAX_ANSWER_BYTES: usize = 256 << 20;

async fn read_capped(mut response: reqwest::Response) -> Result<Vec<u8>, Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(Error::Decode(format!(
                "an answer longer than {MAX_ANSWER_BYTES} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The response when it is a success, else its error body as [`Error::Api`].
async fn check(response: reqwest::Response) -> Result<reqwest::Response, Error> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let header_request_id = response
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let bytes = read_capped(response).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes);
    let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    let error = &body["error"];
    let field = |name: &str| error[name].as_str().map(str::to_string);
    Err(Error::Api {
        taken: error["taken"].as_bool(),
        status: status.as_u16(),
        code: ErrorCode::parse(
            &field("code").unwrap_or_else(|| format!("http_{}", status.as_u16())),
        ),
        message: field("message").unwrap_or_else(|| text.chars().take(200).collect()),
        request_id: field("request_id")
            .filter(|id| !id.is_empty())
            .or(header_request_id)
            .unwrap_or_default(),
        retry_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_segments_are_percent_encoded() {
        assert_eq!(encode("user 1/ä?%"), "user%201%2F%C3%A4%3F%25");
        assert_eq!(encode("plain-key_1.x~"), "plain-key_1.x~");
    }

    #[test]
    fn only_a_write_with_an_idempotency_key_is_replayed() {
        let batch = WriteBatch::default();
        let (body, replay) = Client::prepare(batch.clone()).expect("prepared");
        assert!(body.get("idempotency_key").is_none());
        assert!(replay == Replay::Unsafe);
        let (body, replay) = Client::prepare(batch.idempotency_key("mine")).expect("prepared");
        assert_eq!(body["idempotency_key"], "mine");
        assert!(replay == Replay::Safe);
    }

    #[test]
    fn dot_segments_and_empty_names_are_refused() {
        for bad in ["", ".", ".."] {
            assert!(
                matches!(segment(bad), Err(Error::InvalidArgument(_))),
                "{bad:?}"
            );
        }
        assert_eq!(segment("...").expect("fine"), "...");
    }

    #[test]
    fn only_safe_calls_are_retried_after_an_unknown_outcome() {
        let api = |code: &str, status| Error::Api {
            status,
            code: ErrorCode::parse(code),
            message: String::new(),
            request_id: String::new(),
            retry_after: None,
            taken: None,
        };
        for several in [false, true] {
            assert!(retryable(
                &api("rate_limited", 429),
                Replay::Unsafe,
                several
            ));
            assert!(retryable(&api("overloaded", 503), Replay::Unsafe, several));
            // The owner shard may have run it before its answer was lost.
            assert!(!retryable(
                &api("shard_unavailable", 503),
                Replay::Unsafe,
                several
            ));
            assert!(retryable(
                &api("shard_unavailable", 503),
                Replay::Safe,
                several
            ));
            assert!(!retryable(
                &api("deadline_exceeded", 503),
                Replay::Unsafe,
                several
            ));
            assert!(retryable(
                &api("deadline_exceeded", 503),
                Replay::Safe,
                several
            ));
            assert!(retryable(
                &api("deadline_exceeded", 503),
                Replay::Read,
                several
            ));
            assert!(!retryable(&api("invalid_row", 400), Replay::Safe, several));
            assert!(!retryable(&api("internal", 500), Replay::Read, several));
        }
    }

    #[test]
    fn a_write_refused_as_not_the_writer_is_sent_on_only_when_nothing_was_written() {
        let not_leader = |taken| Error::Api {
            status: 421,
            code: ErrorCode::NotLeader,
            message: String::new(),
            request_id: String::new(),
            retry_after: None,
            taken,
        };
        // A follower or a writer handing over wrote nothing: any write goes on to the
        // next server, when there is one.
        assert!(retryable(&not_leader(Some(false)), Replay::Unsafe, true));
        assert!(!retryable(&not_leader(Some(false)), Replay::Unsafe, false));
        // A writer that lost its lease logged the write: only a keyed one goes again.
        assert!(!retryable(&not_leader(Some(true)), Replay::Unsafe, true));
        assert!(retryable(&not_leader(Some(true)), Replay::Safe, true));
        assert!(!retryable(&not_leader(None), Replay::Unsafe, true));
        // Each sends the call to the next server; a slow server keeps a read only.
        assert!(elsewhere(&not_leader(Some(false)), Replay::Unsafe));
        let slow = Error::Timeout(Duration::from_secs(1));
        assert!(elsewhere(&slow, Replay::Safe));
        assert!(!elsewhere(&slow, Replay::Read));
        let overloaded = Error::Api {
            status: 503,
            code: ErrorCode::Overloaded,
            message: String::new(),
            request_id: String::new(),
            retry_after: None,
            taken: None,
        };
        assert!(!elsewhere(&overloaded, Replay::Read));
    }

    #[test]
    fn several_servers_are_one_comma_separated_url() {
        let oc = Client::builder("http://a:7070/, http://b:7071")
            .build()
            .expect("client");
        assert_eq!(&*oc.endpoints, ["http://a:7070", "http://b:7071"]);
        assert_eq!(oc.base_url(), "http://a:7070");
        assert!(matches!(
            Client::builder("http://a:7070,ftp://b").build(),
            Err(Error::InvalidArgument(_))
        ));
        // A trailing comma is forgiven; no URL at all is not.
        let oc = Client::builder("http://a:7070,").build().expect("client");
        assert_eq!(oc.endpoints.len(), 1);
        assert!(matches!(
            Client::builder(" , ").build(),
            Err(Error::InvalidArgument(_))
        ));
    }
}
