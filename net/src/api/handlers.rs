//! What each endpoint does, on the shard that owns the tenant. A handler parses and
//! checks everything it can where the request landed, then sends one closure to the
//! owner, which answers with JSON built there.
//!
//! One file, about 810 lines: one short handler per data-API route, each parse-then-
//! call-the-owner; splitting them by resource would scatter the shared helpers.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use hyper::StatusCode;
use oc_engine::idempotency::MAX_KEY_BYTES as MAX_IDEMPOTENCY_KEY_BYTES;
use oc_engine::query::{
    param_from_json, shared_memory_refusal, AskAnswer, AskLimits, QueryError, QueryErrorKind,
};
use oc_engine::stages::{Laps, Stage};
use oc_engine::{
    owner_of, ColumnType, ShardNode, ShardRouter, Table, TableSchema, Tenant, TenantId, WriteOp,
};
use oc_io::{failpoint, Lsn};
use serde::Deserialize;
use serde_json::{json, Map, Value as Json};

use super::error::ApiError;
use crate::auth::{self, Caller, KeyClaim};
use crate::rate_limit::{self, RateLimit};

/// What a handler answers: a status and a JSON body.
pub type Answer = Result<(StatusCode, Body), ApiError>;

/// A response body: a JSON value, or JSON already encoded (large answers are written
/// straight to bytes instead of being built as a tree first).
pub enum Body {
    Json(Json),
    Encoded(bytes::Bytes),
}

impl From<Json> for Body {
    fn from(json: Json) -> Self {
        Body::Json(json)
    }
}

thread_local! {
    /// Requests in flight per tenant on this (owner) shard.
    static IN_FLIGHT: RefCell<HashMap<TenantId, usize>> = RefCell::new(HashMap::new());
}

/// A slot among a tenant's in-flight requests, held while its work runs on the owner.
struct InFlight(TenantId);

impl InFlight {
    fn enter(tenant: &TenantId, limit: usize) -> Result<Self, ApiError> {
        IN_FLIGHT.with(|map| {
            let mut map = map.borrow_mut();
            let n = map.entry(tenant.clone()).or_default();
            if *n >= limit {
                return Err(ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "tenant_busy",
                    format!("tenant {tenant} already has {limit} requests in flight, its limit; retry shortly"),
                ));
            }
            *n += 1;
            Ok(InFlight(tenant.clone()))
        })
    }

    /// Requests in flight for `tenant` on this shard.
    fn count(tenant: &TenantId) -> usize {
        IN_FLIGHT.with(|map| map.borrow().get(tenant).copied().unwrap_or(0))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT.with(|map| {
            let mut map = map.borrow_mut();
            if let Some(n) = map.get_mut(&self.0) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&self.0);
                }
            }
        })
    }
}

/// Who is asking and the limits that apply to them.
#[derive(Debug, Clone)]
pub struct Access {
    pub caller: Caller,
    pub in_flight_limit: usize,
    pub rate_limit: RateLimit,
}

/// Whether the key's tenant still holds it, asked of the tenant's owner shard. Only a
/// filter run before a body is read: the owner checks the key again when the work
/// runs (see [`on_owner`]), so a key revoked in between is still refused.
pub async fn key_is_known(router: &ShardRouter, claim: &KeyClaim) -> Result<bool, ApiError> {
    let owner = owner_of(router, &claim.tenant);
    let claim = claim.clone();
    router
        .call(owner, move |node: Rc<ShardNode>| async move {
            node.shard()
                .read(&claim.tenant, |t| {
                    t.api_keys().verify(&claim.key_id, &claim.secret_sha256)
                })
                .unwrap_or(false)
        })
        .await
        .map_err(ApiError::from)
}

/// Runs `work` on the owner of `tenant`: there the caller's key is checked against the
/// tenant's stored hashes and its rate limit, and the work holds an in-flight slot.
async fn on_owner<F, Fut, R>(
    router: &ShardRouter,
    access: &Access,
    tenant: TenantId,
    work: F,
) -> Result<R, ApiError>
where
    F: FnOnce(Rc<ShardNode>, TenantId) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<R, ApiError>> + 'static,
    R: Send + 'static,
{
    if let Caller::Key(claim) = &access.caller {
        if claim.tenant != tenant {
            return Err(auth::key_of_another_tenant(claim, tenant.as_str()));
        }
    }
    let owner = owner_of(router, &tenant);
    let access = access.clone();
    // A request the server cancels (its client left) stops on the owner too.
    router
        .call_cancellable(owner, move |node: Rc<ShardNode>| async move {
            if let Caller::Key(claim) = &access.caller {
                let valid = node
                    .shard()
                    .read(&tenant, |t| {
                        t.api_keys().verify(&claim.key_id, &claim.secret_sha256)
                    })
                    .unwrap_or(false);
                if !valid {
                    return Err(auth::unknown_key());
                }
                rate_limit::admit(access.rate_limit, &tenant, &claim.key_id)?;
            }
            let _slot = InFlight::enter(&tenant, access.in_flight_limit)?;
            work(node, tenant).await
        })
        .await?
}

/// Parses a JSON body into `T`, naming the field and position of what is wrong.
pub fn parse_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_json",
            "the request needs a JSON body",
        ));
    }
    // serde would also read a struct from a JSON array of its fields' values.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::bad_request(
            "invalid_json",
            "the request body must be a JSON object ({...})",
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("invalid request body: {e}")))
}

pub fn tenant_id(raw: &str) -> Result<TenantId, ApiError> {
    TenantId::parse(raw).map_err(ApiError::from)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTenant {
    pub(crate) tenant: String,
}

pub async fn create_tenant(router: &ShardRouter, body: CreateTenant, access: &Access) -> Answer {
    auth::require_admin(&access.caller)?;
    let tenant = tenant_id(&body.tenant)?;
    on_owner(router, access, tenant, |node, tenant| async move {
        let lsn = node.shard().create_tenant(&tenant).await?;
        Ok((
            StatusCode::CREATED,
            Body::from(json!({"tenant": tenant.as_str(), "shard": node.id(), "lsn": lsn.0})),
        ))
    })
    .await
}

pub async fn drop_tenant(router: &ShardRouter, tenant: TenantId, access: &Access) -> Answer {
    auth::require_admin(&access.caller)?;
    on_owner(router, access, tenant, |node, tenant| async move {
        let lsn = node.shard().drop_tenant(&tenant).await?;
        rate_limit::forget_tenant(&tenant);
        Ok((
            StatusCode::OK,
            Body::from(json!({"tenant": tenant.as_str(), "dropped": true, "lsn": lsn.0})),
        ))
    })
    .await
}

/// Every tenant of every shard, sorted.
pub async fn list_tenants(router: &ShardRouter, access: &Access) -> Answer {
    auth::require_admin(&access.caller)?;
    let mut tenants = Vec::new();
    for shard in 0..router.shards() {
        let names = router
            .call(shard, |node: Rc<ShardNode>| async move {
                node.shard()
                    .tenant_ids()
                    .iter()
                    .map(|t| t.as_str().to_string())
                    .collect::<Vec<_>>()
            })
            .await?;
        tenants.extend(names);
    }
    tenants.sort();
    Ok((StatusCode::OK, Body::from(json!({"tenants": tenants}))))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ColumnJson {
    name: String,
    #[serde(rename = "type")]
    ty: String,
    /// Ignored for primary-key columns, which are never null: clients send the default
    /// (`true`) for every column, and refusing it would break them.
    #[serde(default = "nullable_by_default")]
    nullable: bool,
}

fn nullable_by_default() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IndexJson {
    name: String,
    columns: Vec<String>,
}

/// `T` read from a JSON object only: serde's derive also reads a struct from an array
/// of its fields' values, which the contract (docs/openapi.yaml) does not allow.
struct FromObject<T>(T);

impl<'de, T: for<'a> Deserialize<'a>> Deserialize<'de> for FromObject<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let object = Map::<String, Json>::deserialize(d)?;
        serde_json::from_value(Json::Object(object))
            .map(FromObject)
            .map_err(serde::de::Error::custom)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTable {
    name: String,
    columns: Vec<FromObject<ColumnJson>>,
    primary_key: Vec<String>,
    #[serde(default)]
    indexes: Vec<FromObject<IndexJson>>,
}

impl CreateTable {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn schema(&self) -> Result<TableSchema, ApiError> {
        let mut columns = Vec::with_capacity(self.columns.len());
        for FromObject(c) in &self.columns {
            let ty = ColumnType::parse(&c.ty).ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_schema",
                    format!(
                        "column {:?} has unknown type {:?}; use text, int, float, bool, json or vector(N)",
                        c.name, c.ty
                    ),
                )
            })?;
            columns.push((c.name.as_str(), ty, c.nullable));
        }
        let key: Vec<&str> = self.primary_key.iter().map(String::as_str).collect();
        let index_columns: Vec<Vec<&str>> = self
            .indexes
            .iter()
            .map(|FromObject(i)| i.columns.iter().map(String::as_str).collect())
            .collect();
        let indexes: Vec<(&str, &[&str])> = self
            .indexes
            .iter()
            .zip(&index_columns)
            .map(|(FromObject(i), cols)| (i.name.as_str(), cols.as_slice()))
            .collect();
        Ok(TableSchema::new(&self.name, &columns, &key, &indexes)?)
    }
}

pub async fn create_table(
    router: &ShardRouter,
    tenant: TenantId,
    body: CreateTable,
    access: &Access,
) -> Answer {
    let schema = body.schema()?;
    on_owner(router, access, tenant, |node, tenant| async move {
        let described = schema.to_json();
        let lsn = node.shard().create_table(&tenant, schema).await?;
        Ok((
            StatusCode::CREATED,
            Body::from(json!({"table": described, "lsn": lsn.0})),
        ))
    })
    .await
}

/// `POST /v1/tenants/:t/migrations`: the table and its steps.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartMigration {
    table: String,
    steps: Json,
}

impl StartMigration {
    pub fn table(&self) -> &str {
        &self.table
    }
}

/// A migration as the API shows it; `progress` adds what this process's backfill
/// measured (rate and the share of the writers' throughput it used).
fn migration_json(
    info: &oc_engine::migration::MigrationInfo,
    progress: Option<oc_engine::BackfillProgress>,
) -> Json {
    let time = |us: u64| (us > 0).then(|| oc_ship::timestamp::format_rfc3339(us));
    json!({
        "id": info.id,
        "table": info.table,
        "state": info.state.name(),
        "reason": info.reason,
        "steps": info.steps,
        "started": time(info.started.0),
        "finished": time(info.finished.0),
        "progress": {
            "rows_done": info.rows_done,
            "rows_total": info.rows_total,
            "rows_per_second": progress.map(|p| p.rows_per_second()),
            "backfill_bytes": progress.map(|p| p.backfill_bytes),
            "foreground_bytes": progress.map(|p| p.foreground_bytes),
        },
        "writer_share_used": progress.and_then(|p| p.share()),
    })
}

fn migration_id(id: &str) -> Result<u64, ApiError> {
    id.parse::<u64>().map_err(|_| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!(
                "migration {:?} does not exist (ids are numbers)",
                id.chars().take(40).collect::<String>()
            ),
        )
    })
}

pub async fn start_migration(
    router: &ShardRouter,
    tenant: TenantId,
    body: StartMigration,
    access: &Access,
) -> Answer {
    let steps_json = serde_json::to_vec(&body.steps).unwrap_or_default();
    let steps = oc_engine::migration::parse_steps(&steps_json)
        .map_err(|why| ApiError::bad_request("invalid_migration", format!("steps: {why}")))?;
    on_owner(router, access, tenant, |node, tenant| async move {
        let info = node
            .shard()
            .start_migration(&tenant, &body.table, steps)
            .await?;
        Ok((
            StatusCode::ACCEPTED,
            Body::from(migration_json(&info, None)),
        ))
    })
    .await
}

pub async fn list_migrations(router: &ShardRouter, tenant: TenantId, access: &Access) -> Answer {
    on_owner(router, access, tenant, |node, tenant| async move {
        let shard = node.shard();
        let all: Vec<Json> = shard
            .migrations(&tenant)?
            .iter()
            .map(|m| migration_json(m, shard.backfill_progress(&tenant, m.id)))
            .collect();
        Ok((StatusCode::OK, Body::from(json!({"migrations": all}))))
    })
    .await
}

pub async fn get_migration(
    router: &ShardRouter,
    tenant: TenantId,
    id: &str,
    access: &Access,
) -> Answer {
    let id = migration_id(id)?;
    on_owner(router, access, tenant, move |node, tenant| async move {
        let shard = node.shard();
        let info = shard.migration(&tenant, id)?;
        let progress = shard.backfill_progress(&tenant, id);
        Ok((StatusCode::OK, Body::from(migration_json(&info, progress))))
    })
    .await
}

pub async fn abort_migration(
    router: &ShardRouter,
    tenant: TenantId,
    id: &str,
    access: &Access,
) -> Answer {
    let id = migration_id(id)?;
    on_owner(router, access, tenant, move |node, tenant| async move {
        let shard = node.shard();
        let info = shard.abort_migration(&tenant, id).await?;
        let progress = shard.backfill_progress(&tenant, id);
        Ok((StatusCode::OK, Body::from(migration_json(&info, progress))))
    })
    .await
}

pub async fn drop_table(
    router: &ShardRouter,
    tenant: TenantId,
    table: String,
    access: &Access,
) -> Answer {
    on_owner(router, access, tenant, |node, tenant| async move {
        let lsn = node.shard().drop_table(&tenant, &table).await?;
        Ok((
            StatusCode::OK,
            Body::from(json!({"table": table, "dropped": true, "lsn": lsn.0})),
        ))
    })
    .await
}

/// A table's schema and usage, as list and describe answer it.
/// A table: its schema (the shape writes use), usage, and while a migration runs on
/// it, the shape reads see (dual read).
fn describe(tenant: &Tenant, table: &Table) -> Json {
    let usage = table.usage();
    let mut described = json!({
        "schema": table.schema().to_json(),
        "rows": usage.rows,
        "bytes": usage.bytes,
        "vectors": usage.vectors,
    });
    let migration = tenant
        .migrations()
        .active(&table.schema().name)
        .filter(|m| m.table_version == table.version());
    if let Some(m) = migration {
        described["migration"] = json!({
            "id": m.info.id,
            "read_schema": m.target_schema().to_json(),
        });
    }
    described
}

/// How much of a table listing one answer holds: the page ends at the first table past
/// it. A tenant's 256 tables of 256 columns describe in about 10 MB, which would hold
/// the owner shard for hundreds of milliseconds built at once.
pub const TABLES_PAGE_BYTES: usize = 256 * 1024;

/// One page of the tenant's tables, in name order, from the one after `after`; with
/// `next_after` (the page's last table) when more remain.
#[expect(
    clippy::expect_used,
    reason = "serializing JSON values into a Vec cannot fail"
)]
pub async fn list_tables(
    router: &ShardRouter,
    tenant: TenantId,
    after: Option<String>,
    access: &Access,
) -> Answer {
    on_owner(router, access, tenant, |node, tenant| async move {
        let page = node.shard().read(&tenant, |t| {
            let mut out = b"{\"tables\":[".to_vec();
            let mut last = None;
            let mut more = false;
            for table in t.tables_after(after.as_deref()) {
                if out.len() >= TABLES_PAGE_BYTES {
                    more = true;
                    break;
                }
                if last.is_some() {
                    out.push(b',');
                }
                serde_json::to_writer(&mut out, &describe(t, table)).expect("into a Vec");
                last = Some(table.schema().name.clone());
            }
            out.extend_from_slice(b"]");
            if let Some(last) = last.filter(|_| more) {
                out.extend_from_slice(b",\"next_after\":");
                serde_json::to_writer(&mut out, &last).expect("into a Vec");
            }
            out.push(b'}');
            out
        })?;
        Ok((StatusCode::OK, Body::Encoded(page.into())))
    })
    .await
}

pub async fn describe_table(
    router: &ShardRouter,
    tenant: TenantId,
    table: String,
    access: &Access,
) -> Answer {
    on_owner(router, access, tenant, |node, tenant| async move {
        let described = node
            .shard()
            .read(&tenant, |t| t.table(&table).map(|table| describe(t, table)))??;
        Ok((StatusCode::OK, Body::from(described)))
    })
    .await
}

/// One row operation: `{"upsert": {row}}` or `{"delete": {key columns}}`.
#[derive(Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum OpJson {
    Upsert(#[serde(deserialize_with = "columns_once")] Map<String, Json>),
    Delete(#[serde(deserialize_with = "columns_once")] Map<String, Json>),
}

/// A row object that names each column once. JSON leaves a repeated name to the reader;
/// keeping the last value silently would write what the client may not have meant.
fn columns_once<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Map<String, Json>, D::Error> {
    struct Columns;
    impl<'de> serde::de::Visitor<'de> for Columns {
        type Value = Map<String, Json>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object of column values")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut columns: A,
        ) -> Result<Self::Value, A::Error> {
            let mut row = Map::new();
            while let Some((name, value)) = columns.next_entry::<String, Json>()? {
                if row.contains_key(&name) {
                    return Err(serde::de::Error::custom(format!(
                        "column {name:?} is given twice in one row"
                    )));
                }
                row.insert(name, value);
            }
            Ok(row)
        }
    }
    deserializer.deserialize_map(Columns)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteRows {
    pub(crate) ops: Vec<OpJson>,
    #[serde(default)]
    pub(crate) idempotency_key: Option<String>,
}

/// An `idempotency_key`, when given, is 1 to 128 bytes.
pub(crate) fn check_idempotency_key(key: Option<&str>) -> Result<(), ApiError> {
    match key {
        Some("") => Err(ApiError::bad_request(
            "invalid_json",
            "\"idempotency_key\" is empty: send 1 to 128 bytes, or leave it out",
        )),
        Some(key) if key.len() > MAX_IDEMPOTENCY_KEY_BYTES => {
            Err(oc_engine::EngineError::LimitExceeded {
                what: "idempotency key bytes",
                actual: key.len(),
                limit: MAX_IDEMPOTENCY_KEY_BYTES,
            }
            .into())
        }
        _ => Ok(()),
    }
}

/// `laps` times the write's stages (`oc_engine::stages`) when it is sampled.
pub async fn write_rows(
    router: &ShardRouter,
    tenant: TenantId,
    table: String,
    body: WriteRows,
    access: &Access,
    mut laps: Laps,
) -> Answer {
    if body.ops.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_row",
            "\"ops\" is empty: send at least one {\"upsert\": {...}} or {\"delete\": {...}}",
        ));
    }
    let ops: Vec<WriteOp> = body
        .ops
        .into_iter()
        .map(|op| match op {
            OpJson::Upsert(row) => WriteOp::Upsert(row),
            OpJson::Delete(key) => WriteOp::Delete(key),
        })
        .collect();
    check_idempotency_key(body.idempotency_key.as_deref())?;
    let key = body.idempotency_key;
    let (lsn, outcome, mut laps, ops) =
        on_owner(router, access, tenant, move |node, tenant| async move {
            laps.lap(Stage::Forward);
            if failpoint::armed("shard.panic") == Some(tenant.as_str()) {
                panic!("failpoint shard.panic: a row write to tenant {tenant}");
            }
            let (lsn, outcome) = node.shard().write(&tenant, &table, &ops, key).await?;
            // The owner's part is timed on its own clock (`Shard::write`).
            laps.restart();
            Ok((lsn, outcome, laps, ops))
        })
        .await?;
    // The parsed rows go back to be freed by the shard that allocated them: freed by
    // the owner, they feed glibc's arena of another thread under its lock, and the
    // owner's and the receiver's allocations both slow down (a forwarded write cost
    // 25% of the pool's throughput in `oc-bench engine`).
    drop(ops);
    let body = Body::from(json!({
        "lsn": lsn.0,
        "inserted": outcome.inserted,
        "updated": outcome.updated,
        "deleted": outcome.deleted,
        "missing": outcome.missing,
    }));
    laps.lap(Stage::Respond);
    Ok((StatusCode::OK, body))
}

/// What a read waits for: its tenant's shard to have applied `min_lsn` (0: nothing),
/// for at most `wait` on a follower. The LSN of a write's answer, passed to a follower,
/// gives read-your-writes there.
#[derive(Debug, Clone)]
pub struct Freshness {
    pub min_lsn: u64,
    pub wait: Duration,
    /// A follower waits for what its writer has not sent yet; a writer answers a write
    /// only once it is applied, so an LSN past its applied one was never acknowledged
    /// here.
    pub follower: bool,
    /// A follower's: whether its shards' logs are known to be on the writer's history.
    pub role: Option<std::sync::Arc<crate::replication::ApiRole>>,
}

/// How often a read with `min_lsn` on a follower looks whether its writer took the
/// follower's position yet (once per start; the flag is set on another thread).
const HISTORY_POLL: Duration = Duration::from_millis(5);

/// Waits until `node`'s shard has applied `want.min_lsn`, and returns the LSN up to
/// which the read that follows sees every write.
async fn applied_at_least(node: &ShardNode, want: Freshness) -> Result<u64, ApiError> {
    let confirmed = || {
        !want.follower
            || want
                .role
                .as_ref()
                .is_some_and(|r| r.lsns_are_the_writers(node.id()))
    };
    let asked = Instant::now();
    // An old writer restarted as a follower holds its own frames past the failover
    // until its writer cuts them: under the same LSNs, other writes. The writer taking
    // this follower's position (on the control executor) is waited for like an LSN.
    while want.min_lsn > 0 && !confirmed() && asked.elapsed() < want.wait {
        glommio::timer::sleep(HISTORY_POLL).await;
    }
    if want.min_lsn > 0 && !confirmed() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "lsn_not_applied",
            format!(
                "this follower has not reached its writer since it started (waited {} ms, \
                 --min-lsn-wait-ms), so it cannot tell whether its log up to min_lsn {} is \
                 the writer's (a log from before a failover holds writes the new writer \
                 never acknowledged); retry once it follows the writer (/ready), or read \
                 from the writer",
                want.wait.as_millis(),
                want.min_lsn
            ),
        ));
    }
    let applied = node.shard().applied_lsn().0;
    if applied >= want.min_lsn {
        return Ok(applied);
    }
    if !want.follower {
        return Err(ApiError::bad_request(
            "invalid_min_lsn",
            format!(
                "min_lsn {} is past LSN {applied}, the newest this writer has applied on the \
                 tenant's shard: no write it acknowledged has that LSN (pass the lsn of a \
                 write's answer from this writer; one from a writer that was failed over from \
                 may have been lost)",
                want.min_lsn
            ),
        ));
    }
    let feed = node.shard().feed();
    let reached = async {
        feed.published_after(Lsn(want.min_lsn - 1)).await;
        true
    };
    let gave_up = async {
        // One wait in all, the one for the writer included.
        glommio::timer::sleep(want.wait.saturating_sub(asked.elapsed())).await;
        false
    };
    if !futures_lite::future::or(reached, gave_up).await {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "lsn_not_applied",
            format!(
                "this follower has applied its tenant's shard up to LSN {}, not min_lsn {} \
                 (waited {} ms, --min-lsn-wait-ms): it is still catching up; retry, or read \
                 from the writer",
                node.shard().applied_lsn().0,
                want.min_lsn,
                want.wait.as_millis()
            ),
        ));
    }
    Ok(node.shard().applied_lsn().0)
}

/// `GET .../rows/<k1>/<k2>...`: one path segment per primary-key column, in key order.
pub async fn get_row(
    router: &ShardRouter,
    tenant: TenantId,
    table: String,
    key: Vec<String>,
    freshness: Freshness,
    access: &Access,
) -> Answer {
    on_owner(router, access, tenant, move |node, tenant| async move {
        let applied_lsn = applied_at_least(&node, freshness).await?;
        let found = node.shard().read(&tenant, |t| {
            let table = t.table(&table)?;
            let key = key_from_path(table.schema(), &key)?;
            let row = table
                .get_by_json_key(&key)
                .map_err(|why| ApiError::bad_request("invalid_key", why))?
                .map(|row| t.row_as_read(table, row))
                .transpose()?;
            Ok::<_, ApiError>(row)
        })??;
        match found {
            Some(row) => Ok((
                StatusCode::OK,
                Body::from(json!({"row": row, "applied_lsn": applied_lsn})),
            )),
            None => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "row_not_found",
                format!(
                    "table {table:?} has no row with that primary key (as of LSN {applied_lsn} \
                     on this server)"
                ),
            )),
        }
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AskBody {
    pub(crate) sql: String,
    #[serde(default)]
    pub(crate) params: Vec<Json>,
}

/// `POST /v1/tenants/:t/ask`: one SELECT over the tenant's durable state.
pub async fn ask(
    router: &ShardRouter,
    tenant: TenantId,
    body: AskBody,
    explain: bool,
    limits: AskLimits,
    freshness: Freshness,
    access: &Access,
) -> Answer {
    let params: Vec<_> = body.params.iter().map(param_from_json).collect();
    on_owner(router, access, tenant, move |node, tenant| async move {
        let applied_lsn = applied_at_least(&node, freshness).await?;
        let answer = node
            .shard()
            .ask(&tenant, &body.sql, params, explain, limits)
            .await
            .map_err(query_error)?;
        // The text counts toward the queries' memory while it is written (other
        // answers are written meanwhile) and until its client has read it.
        let mut memory = node
            .shard()
            .tenant_query_memory(&tenant)
            .map_or_else(Default::default, |t| {
                oc_engine::quota::QueryMemory::for_tenant(&t)
            });
        let encoded =
            encode_answer(&answer, applied_lsn, limits.max_memory_bytes, &mut memory).await?;
        drop(answer);
        Ok((
            StatusCode::OK,
            Body::Encoded(charged_answer(encoded, memory)?),
        ))
    })
    .await
}

/// An encoded `/ask` answer holding its share of the memory the running queries may hold
/// together (`--ask-shared-memory-bytes`), and of its tenant's part of it, until the
/// connection has sent it or closed:
/// answers a client does not read would otherwise stay in memory counted nowhere (40
/// unread answers of 52 MB held 2 GB, and writes were refused for the memory).
struct ChargedAnswer {
    bytes: Vec<u8>,
    _memory: oc_engine::quota::QueryMemory,
}

impl AsRef<[u8]> for ChargedAnswer {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

fn charged_answer(
    bytes: Vec<u8>,
    mut memory: oc_engine::quota::QueryMemory,
) -> Result<bytes::Bytes, ApiError> {
    cover_answer(&mut memory, bytes.len())?;
    Ok(bytes::Bytes::from_owner(ChargedAnswer {
        bytes,
        _memory: memory,
    }))
}

/// Makes `memory` cover an answer's `len` bytes of text, or says which bound refused.
fn cover_answer(memory: &mut oc_engine::quota::QueryMemory, len: usize) -> Result<(), ApiError> {
    memory.cover(len).map_err(|refused| {
        query_error(shared_memory_refusal(
            refused,
            &format!("this answer's {len} bytes"),
            "add a LIMIT or select fewer columns",
        ))
    })
}

/// Rows, and bytes of text, encoded between two checks for a turn and of the answer's
/// size: wide rows (a 256 KiB text of control characters is 1.5 MB of JSON) reach the
/// byte bound first.
const ENCODE_ROWS_PER_SLICE: usize = 64;
const ENCODE_BYTES_PER_SLICE: usize = 256 << 10;

/// An `/ask` answer as JSON text, written value by value: a tree of
/// `serde_json::Value` would take several times the rows' own size (a vector element
/// is 4 bytes in a row and 32 in a tree), outside the query's memory budget. The text
/// may take at most `max_bytes` (the query's own memory limit: a vector's text is
/// several times its stored size, and 2,000 rows of 4,096 dimensions made 157 MB),
/// and the shard gets turns while it is written (that answer held it for 0.5 s).
async fn encode_answer(
    answer: &AskAnswer,
    applied_lsn: u64,
    max_bytes: usize,
    memory: &mut oc_engine::quota::QueryMemory,
) -> Result<Vec<u8>, ApiError> {
    let mut turns = oc_io::executor::Turns::new(oc_engine::query::SLICE_TARGET);
    let mut out = Vec::with_capacity(256);
    let text = |out: &mut Vec<u8>, s: &str| {
        // Writing a &str to a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
    };
    let too_large = |written: usize| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            QueryErrorKind::ResultTooLarge.code(),
            format!(
                "the answer's JSON text passed {max_bytes} bytes, the query's memory limit \
                 (--ask-max-memory-bytes), after {written} of its {} rows; add a LIMIT or \
                 select fewer or smaller columns",
                answer.rows.len()
            ),
        )
    };
    out.extend_from_slice(b"{\"columns\":[");
    for (i, c) in answer.columns.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        text(&mut out, c);
    }
    out.extend_from_slice(b"],\"rows\":[");
    let (mut rows_since, mut checked_at) = (0, out.len());
    for (i, row) in answer.rows.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.push(b'[');
        for (j, v) in row.iter().enumerate() {
            if j > 0 {
                out.push(b',');
            }
            v.write_json(&mut out);
        }
        out.push(b']');
        rows_since += 1;
        if rows_since == ENCODE_ROWS_PER_SLICE || out.len() - checked_at >= ENCODE_BYTES_PER_SLICE {
            if out.len() > max_bytes {
                return Err(too_large(i + 1));
            }
            cover_answer(memory, out.len())?;
            turns.between_slices().await;
            (rows_since, checked_at) = (0, out.len());
        }
    }
    out.extend_from_slice(
        format!(
            "],\"row_count\":{},\"rows_scanned\":{},\"applied_lsn\":{applied_lsn}",
            answer.rows.len(),
            answer.rows_scanned
        )
        .as_bytes(),
    );
    if let Some(plan) = &answer.plan {
        out.extend_from_slice(b",\"plan\":");
        let _ = serde_json::to_writer(&mut out, plan);
    }
    out.push(b'}');
    // The rows after the last check count too.
    if out.len() > max_bytes {
        return Err(too_large(answer.rows.len()));
    }
    cover_answer(memory, out.len())?;
    Ok(out)
}

fn query_error(e: QueryError) -> ApiError {
    let status = match e.kind {
        QueryErrorKind::UnknownTable | QueryErrorKind::UnknownTenant => StatusCode::NOT_FOUND,
        QueryErrorKind::TableChanged | QueryErrorKind::MigrationConflict => StatusCode::CONFLICT,
        // The query's own limits: the same query would meet them again.
        QueryErrorKind::ResultTooLarge
        | QueryErrorKind::ScanLimit
        | QueryErrorKind::MemoryLimit
        | QueryErrorKind::Timeout => StatusCode::PAYLOAD_TOO_LARGE,
        QueryErrorKind::MemoryBusy | QueryErrorKind::TurnsBusy => StatusCode::TOO_MANY_REQUESTS,
        QueryErrorKind::Syntax
        | QueryErrorKind::TooComplex
        | QueryErrorKind::Unsupported
        | QueryErrorKind::Invalid
        | QueryErrorKind::Params
        | QueryErrorKind::Evaluation => StatusCode::BAD_REQUEST,
    };
    ApiError::new(status, e.kind.code(), e.message)
}

/// Turns path segments into a JSON object of the primary-key columns.
pub(crate) fn key_from_path(
    schema: &TableSchema,
    segments: &[String],
) -> Result<Map<String, Json>, ApiError> {
    if segments.len() != schema.primary_key.len() {
        let names: Vec<&str> = schema
            .primary_key
            .iter()
            .map(|&p| schema.columns[p].name.as_str())
            .collect();
        return Err(ApiError::bad_request(
            "invalid_key",
            format!(
                "table {:?} has a primary key of {} column(s) {names:?}: give one path segment for each, in that order",
                schema.name,
                names.len()
            ),
        ));
    }
    let mut key = Map::new();
    for (&p, raw) in schema.primary_key.iter().zip(segments) {
        let column = &schema.columns[p];
        let bad = || {
            ApiError::bad_request(
                "invalid_key",
                format!(
                    "key column {:?} is {}, not {}",
                    column.name,
                    column.ty,
                    super::error::quoted_short(raw)
                ),
            )
        };
        let value = match column.ty {
            ColumnType::Text => Json::String(raw.clone()),
            ColumnType::Int => raw.parse::<i64>().map(Json::from).map_err(|_| bad())?,
            ColumnType::Bool => raw.parse::<bool>().map(Json::from).map_err(|_| bad())?,
            _ => return Err(bad()),
        };
        key.insert(column.name.clone(), value);
    }
    Ok(key)
}

pub async fn usage(router: &ShardRouter, tenant: TenantId, access: &Access) -> Answer {
    on_owner(router, access, tenant, |node, tenant| async move {
        // This request holds one of the slots; report the others.
        let in_flight = InFlight::count(&tenant).saturating_sub(1);
        let (usage, ask_memory) = node
            .shard()
            .read(&tenant, |t| (t.usage(), t.query_memory().held_bytes()))?;
        let quotas = node.shard().quotas();
        let tables: Map<String, Json> = usage
            .tables
            .iter()
            .map(|(name, u)| {
                (
                    name.clone(),
                    json!({"rows": u.rows, "bytes": u.bytes, "vectors": u.vectors}),
                )
            })
            .collect();
        Ok((
            StatusCode::OK,
            Body::from(json!({
                "tenant": tenant.as_str(),
                "shard": node.id(),
                "rows": usage.rows,
                "bytes": usage.bytes,
                "vectors": usage.vectors,
                "tables": tables,
                "quotas": {
                    "rows": quotas.max_rows,
                    "bytes": quotas.max_bytes,
                    "vectors": quotas.max_vectors,
                },
                "in_flight_requests": in_flight,
                "watch_streams": super::watch::open_streams(&tenant),
                "ask_memory_bytes": ask_memory,
                "applied_lsn": node.shard().applied_lsn().0,
            })),
        ))
    })
    .await
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CreateWatchToken {
    /// Seconds the token is valid (default and limits in `auth`); any JSON number
    /// with no fraction (`300`, `300.0`), as JSON Schema's `integer` reads it.
    ttl_s: Option<serde_json::Number>,
}

/// Takes a key's turn at an operator action ([`rate_limit::admit_operator_action`]) on
/// its tenant's owner, where its buckets are; the admin and callers without
/// credentials (authentication off) are not limited.
pub async fn admit_operator_action(
    router: &ShardRouter,
    access: &Access,
    action: &'static str,
) -> Result<(), ApiError> {
    let Caller::Key(claim) = &access.caller else {
        return Ok(());
    };
    // The key was verified already; the action's own call to the owner takes its
    // request token and in-flight place.
    let (tenant, key_id) = (claim.tenant.clone(), claim.key_id.clone());
    router
        .call(owner_of(router, &tenant), move |_| async move {
            rate_limit::admit_operator_action(&tenant, &key_id, action)
        })
        .await
        .map_err(ApiError::from)?
}

/// Mints a token that opens `/watch` streams of this tenant only, for clients that
/// cannot send an Authorization header (a browser's `EventSource`).
pub async fn create_watch_token(
    router: &ShardRouter,
    tenant: TenantId,
    ttl_s: u64,
    (access, auth): (&Access, &auth::AuthConfig),
) -> Answer {
    let key_id = match &access.caller {
        Caller::Key(claim) => Some(claim.key_id.clone()),
        Caller::Admin | Caller::Anyone => None,
    };
    let auth = auth.clone();
    on_owner(router, access, tenant, move |node, tenant| async move {
        node.shard().read(&tenant, |_| ())?;
        let (token, expires_unix_s) =
            auth::mint_watch_token(&tenant, key_id.as_deref(), ttl_s, &auth)?;
        Ok((
            StatusCode::CREATED,
            Body::from(json!({
                "token": token,
                "expires_unix_s": expires_unix_s,
                "ttl_s": ttl_s,
            })),
        ))
    })
    .await
}

/// A watch token's lifetime in seconds, as asked (checked before anything is spent).
pub fn watch_token_ttl(body: &CreateWatchToken) -> Result<u64, ApiError> {
    let max = auth::WATCH_TOKEN_MAX_TTL_S;
    let ttl_s = match &body.ttl_s {
        None => auth::WATCH_TOKEN_DEFAULT_TTL_S,
        Some(n) => n
            .as_u64()
            .or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && (1.0..=max as f64).contains(f))
                    .map(|f| f as u64)
            })
            .unwrap_or(0),
    };
    if ttl_s == 0 || ttl_s > max {
        return Err(ApiError::bad_request(
            "invalid_ttl",
            format!("ttl_s must be a whole number of seconds from 1 to {max}"),
        ));
    }
    Ok(ttl_s)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    #[serde(default)]
    pub(crate) name: String,
}

/// Makes a key; its secret appears in this answer only.
pub async fn create_key(
    router: &ShardRouter,
    tenant: TenantId,
    body: CreateKey,
    access: &Access,
) -> Answer {
    auth::require_admin(&access.caller)?;
    let (key_id, key, secret_sha256) = auth::new_key(&tenant)?;
    on_owner(router, access, tenant, move |node, tenant| async move {
        let lsn = node
            .shard()
            .create_api_key(&tenant, &key_id, &body.name, secret_sha256)
            .await?;
        Ok((
            StatusCode::CREATED,
            Body::from(json!({
                "tenant": tenant.as_str(),
                "key_id": key_id,
                "name": body.name,
                "key": key,
                "lsn": lsn.0,
                "note": "the key is shown only in this answer; store it now",
            })),
        ))
    })
    .await
}

pub async fn list_keys(router: &ShardRouter, tenant: TenantId, access: &Access) -> Answer {
    auth::require_admin(&access.caller)?;
    on_owner(router, access, tenant, |node, tenant| async move {
        let keys = node.shard().read(&tenant, |t| {
            t.api_keys()
                .iter()
                .map(|(id, key)| json!({"key_id": id, "name": key.name, "created_us": key.created.0}))
                .collect::<Vec<_>>()
        })?;
        Ok((StatusCode::OK, Body::from(json!({"keys": keys}))))
    })
    .await
}

pub async fn revoke_key(
    router: &ShardRouter,
    tenant: TenantId,
    key_id: String,
    access: &Access,
) -> Answer {
    auth::require_admin(&access.caller)?;
    on_owner(router, access, tenant, |node, tenant| async move {
        let lsn = node.shard().revoke_api_key(&tenant, &key_id).await?;
        rate_limit::forget(&tenant, &key_id);
        Ok((
            StatusCode::OK,
            Body::from(json!({"key_id": key_id, "revoked": true, "lsn": lsn.0})),
        ))
    })
    .await
}

/// Rows digested per slice by `GET /v1/admin/digest` before the shard may run
/// something else.
const DIGEST_SLICE_ROWS: usize = 4096;

/// Digests that may run at once. Each reads every row of the server a slice at a time,
/// and one whose caller has left runs on to its end on the shards: callers that ask and
/// leave, over and over, would otherwise pile digests up until every tenant's requests
/// wait seconds behind them.
const DIGESTS_AT_ONCE: usize = 2;
static DIGESTS_RUNNING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One of the [`DIGESTS_AT_ONCE`] places, held until the last shard's part has finished.
struct DigestPlace;

impl DigestPlace {
    fn take() -> Result<std::sync::Arc<DigestPlace>, ApiError> {
        use std::sync::atomic::Ordering;
        DIGESTS_RUNNING
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < DIGESTS_AT_ONCE).then_some(n + 1)
            })
            .map_err(|running| {
                ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "digest_busy",
                    format!(
                        "{running} digests are running, the most at once; retry once they \
                         finish (one whose caller left still runs to its end)"
                    ),
                )
            })?;
        Ok(std::sync::Arc::new(DigestPlace))
    }
}

impl Drop for DigestPlace {
    fn drop(&mut self) {
        DIGESTS_RUNNING.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// `GET /v1/admin/digest`: where each shard's log stands and, unless `tables` is false,
/// every table summed up (`oc_engine::digest`), for `oc-pitr drill --live`. Tables are
/// digested a slice at a time; one written to meanwhile gets no digest.
pub async fn digest(
    router: &ShardRouter,
    with_tables: bool,
    layout: &oc_engine::placement::Layout,
    access: &Access,
) -> Answer {
    auth::require_admin(&access.caller)?;
    let place = DigestPlace::take()?;
    let mut shards = Vec::new();
    for shard in 0..router.shards() {
        let place = place.clone();
        let summed = router
            .call(shard, move |node: Rc<ShardNode>| async move {
                let _place = place;
                if let Some(ms) = failpoint::armed("digest.slow_ms").and_then(|v| v.parse().ok()) {
                    glommio::timer::sleep(Duration::from_millis(ms)).await;
                }
                let d = node.shard().digest(with_tables, DIGEST_SLICE_ROWS).await;
                let (applied, last_commit, tables) = (d.applied_lsn, d.last_commit_us, d.tables);
                json!({
                    "shard": shard,
                    "applied_lsn": applied,
                    "last_commit_us": (last_commit > 0).then_some(last_commit),
                    "tables": tables,
                })
            })
            .await?;
        shards.push(summed);
    }
    Ok((
        StatusCode::OK,
        Body::from(json!({
            "data_dir_id": layout.id.to_string(),
            "epoch": layout.epoch(),
            "shards": shards,
        })),
    ))
}
