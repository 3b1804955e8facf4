//! The query engine behind `/ask`: a SQL subset parsed with `sqlparser`, bound to a
//! tenant's schema, planned (primary-key point or range, secondary-index point or
//! range, full scan, top-k, exact vector kNN) and executed in slices that yield to the
//! shard's executor between them.
//!
//! ```text
//! sql ──normalize──► (normalized text, literals) ──plan cache──► Prepared ──► Execution
//!                      literals become parameters   (tenant, schema stamp, text)
//! ```
//!
//! A plan depends only on the query's shape and the schema, never on parameter values,
//! so one plan serves every query that differs only in its literals.

mod bind;
mod cache;
mod exec;
pub(crate) mod expr;
mod like;
mod normalize;
mod plan;

pub use cache::{PlanCache, PlanCacheStats, PLAN_CACHE_BYTES, PLAN_CACHE_ENTRIES};
pub use exec::{shared_memory_refusal, AskAnswer, Execution};
pub use expr::{param_from_json, Metric};
pub use like::MAX_LIKE_PATTERN_CHARS;
pub use normalize::{
    normalize, Normalized, MAX_IN_LIST_COMPARISONS, MAX_LIKE_PER_QUERY, MAX_QUERY_OPERATORS,
};
pub use plan::{prepare, Prepared};

use std::time::Duration;

/// Limits every query runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AskLimits {
    /// Rows a query may return.
    pub max_rows_returned: usize,
    /// Rows (or vectors) a query may read.
    pub max_rows_scanned: usize,
    /// Wall-clock time a query may take, yields included.
    pub deadline: Duration,
    /// Bytes a query may hold while it runs: buffered output rows, sort keys, groups.
    pub max_memory_bytes: usize,
}

impl Default for AskLimits {
    fn default() -> Self {
        AskLimits {
            max_rows_returned: 10_000,
            max_rows_scanned: 5_000_000,
            deadline: Duration::from_secs(5),
            max_memory_bytes: 64 << 20,
        }
    }
}

/// Stack that must be left before a recursive step runs on the current stack...
const STACK_RED_ZONE_BYTES: usize = 128 * 1024;
/// ...else the step continues on a new segment of this size.
const STACK_SEGMENT_BYTES: usize = 2 << 20;

/// Runs one step of a recursive walk over a request-built tree. The operator and
/// nesting limits already bound the depth before any walk starts; this is the second
/// line, so a frame larger than planned (a debug build, a new node kind) grows the
/// stack on the heap instead of overflowing it, which would abort every shard.
#[inline]
pub(crate) fn with_stack<R>(f: impl FnOnce() -> R) -> R {
    stacker::maybe_grow(STACK_RED_ZONE_BYTES, STACK_SEGMENT_BYTES, f)
}

/// Stack a plan is made on: room for the syntax tree of any text the limits let
/// through, whatever sqlparser's frames cost (it recurses to parse, print and drop).
const PLAN_STACK_BYTES: usize = 16 << 20;

/// Runs `f` (parse, bind, plan) on a stack of [`PLAN_STACK_BYTES`], mapped for the
/// call and released after it.
pub(crate) fn with_plan_stack<R>(f: impl FnOnce() -> R) -> R {
    stacker::maybe_grow(PLAN_STACK_BYTES / 2, PLAN_STACK_BYTES, f)
}

/// Rows a query reads between two chances to yield, at most...
pub const SLICE_ROWS: usize = 1024;
/// ...and rows a kNN scan reads (a cheap distance each, nothing else for most)...
pub const SLICE_KNN_ROWS: usize = 8192;
/// ...while a slice takes about this long: a slice whose rows are expensive (long
/// texts under LIKE, wide vectors) reads fewer of them, so no query holds its shard
/// for long between yields whatever its rows cost.
pub const SLICE_TARGET: Duration = Duration::from_millis(1);

/// Why a query was refused or failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct QueryError {
    pub kind: QueryErrorKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryErrorKind {
    /// The text is not SQL we can parse.
    Syntax,
    /// Valid SQL outside the supported subset.
    Unsupported,
    /// Names a column that does not exist, misuses an aggregate, and the like.
    Invalid,
    /// `params` does not fit the placeholders.
    Params,
    /// A value of the wrong type at run time, division by zero, overflow.
    Evaluation,
    UnknownTable,
    UnknownTenant,
    /// The table was dropped or re-created while the query ran.
    TableChanged,
    /// Past a limit on the query's shape (operators, nesting, LIKE pattern length).
    TooComplex,
    ResultTooLarge,
    ScanLimit,
    /// Past the bytes a query may hold (buffered rows, sort keys, groups).
    MemoryLimit,
    /// Past the bytes the running queries may hold together: retry shortly.
    MemoryBusy,
    /// Past its deadline while it ran (`--ask-timeout-ms`): a limit of the query's own.
    Timeout,
    /// Its deadline ran out while the tenant's other queries held its turns: retry
    /// with fewer at once.
    TurnsBusy,
    /// A stored row the running migration of its table cannot read in its new shape.
    MigrationConflict,
}

impl QueryErrorKind {
    /// The stable `error.code` of the API.
    pub fn code(self) -> &'static str {
        match self {
            QueryErrorKind::Syntax => "sql_syntax",
            QueryErrorKind::Unsupported => "sql_unsupported",
            QueryErrorKind::Invalid => "sql_invalid",
            QueryErrorKind::Params => "invalid_params",
            QueryErrorKind::Evaluation => "query_evaluation",
            QueryErrorKind::UnknownTable => "table_not_found",
            QueryErrorKind::UnknownTenant => "tenant_not_found",
            QueryErrorKind::TableChanged => "table_changed",
            QueryErrorKind::TooComplex => "query_too_complex",
            QueryErrorKind::ResultTooLarge => "result_too_large",
            QueryErrorKind::ScanLimit => "scan_limit_exceeded",
            QueryErrorKind::MemoryLimit => "query_memory_exceeded",
            QueryErrorKind::MemoryBusy => "query_memory_busy",
            QueryErrorKind::Timeout => "query_timeout",
            QueryErrorKind::TurnsBusy => "tenant_busy",
            QueryErrorKind::MigrationConflict => "migration_conflict",
        }
    }
}

impl QueryError {
    pub fn new(kind: QueryErrorKind, message: impl Into<String>) -> Self {
        QueryError {
            kind,
            message: message.into(),
        }
    }

    fn unsupported(what: impl std::fmt::Display, at: sqlparser::tokenizer::Span) -> Self {
        QueryError::new(
            QueryErrorKind::Unsupported,
            format!(
                "{what} is not supported{}; see docs/API.md for the SQL subset",
                position(at)
            ),
        )
    }

    fn invalid(message: impl Into<String>) -> Self {
        QueryError::new(QueryErrorKind::Invalid, message)
    }

    fn eval(message: impl Into<String>) -> Self {
        QueryError::new(QueryErrorKind::Evaluation, message)
    }
}

/// ` at line L, column C` for a known span, else nothing.
fn position(span: sqlparser::tokenizer::Span) -> String {
    if span.start.line == 0 {
        String::new()
    } else {
        format!(
            " (at line {}, column {})",
            span.start.line, span.start.column
        )
    }
}

/// The full parameter list of a run: the caller's `$1..$n`, checked against what the
/// plan uses, then the literals normalization moved out of the text.
pub fn bind_params(
    plan: &Prepared,
    params: Vec<crate::value::Value>,
    literals: Vec<crate::value::Value>,
) -> Result<Vec<crate::value::Value>, QueryError> {
    if params.len() != plan.user_params {
        return Err(QueryError::new(
            QueryErrorKind::Params,
            format!(
                "the query uses {} but params holds {} value(s)",
                match plan.user_params {
                    0 => "no placeholders".to_string(),
                    1 => "$1".to_string(),
                    n => format!("$1..${n}"),
                },
                params.len()
            ),
        ));
    }
    let mut all = params;
    all.extend(literals);
    Ok(all)
}

/// Plans and runs a query to the end at once, without a plan cache or yielding
/// (tests, tools, the fuzz target). Servers use `Shard::ask`.
pub fn ask_now(
    tenant: &crate::tenant::Tenant,
    sql: &str,
    params: Vec<crate::value::Value>,
    limits: AskLimits,
) -> Result<AskAnswer, QueryError> {
    let normalized = normalize(sql)?;
    let plan = prepare(tenant, &normalized)?;
    let params = bind_params(&plan, params, normalized.literals)?;
    let mut run = Execution::new(
        std::rc::Rc::new(plan),
        params,
        limits,
        tenant.query_memory(),
    )?;
    while !run.step(tenant)? {}
    run.finish(false)
}

/// Compiles one expression over a table's rows, in the `/ask` expression language
/// (a migration's default or transform): the expression and the values of its
/// literals, which it reads as parameters. The text is checked by the same limits and
/// binder as a query's `SELECT` list, and must be one plain expression: no aggregate,
/// no placeholder, nothing after it. Also returns the `LIKE` operators it uses.
pub(crate) fn compile_row_expr(
    schema: &crate::schema::TableSchema,
    text: &str,
) -> Result<(expr::Expr, Vec<crate::value::Value>, usize), String> {
    let mut tenant = crate::tenant::Tenant::new(
        crate::tenant_id::TenantId::parse("migration").map_err(|e| e.to_string())?,
    );
    tenant
        .create_table(schema.clone(), 1)
        .map_err(|e| e.to_string())?;
    let sql = format!("SELECT {text} FROM {}", schema.name);
    let normalized = normalize(&sql).map_err(|e| e.message)?;
    if normalized.user_params > 0 {
        return Err("an expression cannot use placeholders ($1, …)".into());
    }
    let plan = prepare(&tenant, &normalized).map_err(|e| e.message)?;
    let q = &plan.query;
    let plain = q.filter.is_none()
        && q.aggregation.is_none()
        && q.order_by.is_empty()
        && q.limit.is_none()
        && q.offset.is_none()
        && matches!(q.explain, bind::ExplainMode::Run);
    match q.projection.as_slice() {
        [one] if plain => Ok((one.clone(), normalized.literals, normalized.likes)),
        _ => Err(format!(
            "{:?} is not one expression over the row (no aggregates, clauses or lists)",
            text.chars().take(80).collect::<String>()
        )),
    }
}

/// Fuzzing entry (and its corpus replay): any text through normalization, parsing
/// and binding against a fixed schema must return, never panic.
#[expect(
    clippy::expect_used,
    reason = "a fixed schema and rows, valid by construction (fuzzing and its corpus replay only)"
)]
pub fn fuzz_entry(bytes: &[u8]) {
    use crate::schema::TableSchema;
    use crate::value::ColumnType;
    let Ok(sql) = std::str::from_utf8(bytes) else {
        return;
    };
    let schema = TableSchema::new(
        "t",
        &[
            ("id", ColumnType::Int, false),
            ("name", ColumnType::Text, true),
            ("score", ColumnType::Float, true),
            ("ok", ColumnType::Bool, true),
            ("doc", ColumnType::Json, true),
            ("emb", ColumnType::Vector(3), true),
        ],
        &["id"],
        &[("by_name", &["name"]), ("by_score", &["score", "name"])],
    )
    .expect("a valid schema");
    let mut tenant =
        crate::tenant::Tenant::new(crate::tenant_id::TenantId::parse("fuzz").expect("valid id"));
    tenant.create_table(schema, 1).expect("a fresh tenant");
    for (id, name) in [(1, "a"), (2, "b")] {
        let row = serde_json::json!({"id": id, "name": name, "score": 1.5, "emb": [1, 2, 3]});
        let serde_json::Value::Object(row) = row else {
            return;
        };
        tenant
            .write("t", &[crate::table::WriteOp::Upsert(row)])
            .expect("a valid row");
    }
    // Every placeholder bound to a small integer: enough to reach execution.
    let users = normalize(sql).map_or(0, |n| n.user_params);
    let params = (0..users)
        .map(|i| crate::value::Value::Int(i as i64))
        .collect();
    let _ = ask_now(&tenant, sql, params, AskLimits::default());
}
