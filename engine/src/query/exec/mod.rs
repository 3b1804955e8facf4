//! Execution: a plan run in slices. Each slice reads at most [`SLICE_ROWS`] rows (or
//! [`SLICE_KNN_ROWS`] for kNN) while the caller holds the shard state, then hands
//! control back so the shard can yield; the next slice resumes after the last key
//! read. A row present for the whole query is seen exactly once; rows written
//! meanwhile may or may not be seen.
//!
//! Rows flow through stages — access, filter, aggregate, having, sort or top-k,
//! offset/limit, projection — each counting rows in and out and the time spent, which
//! is what EXPLAIN ANALYZE reports. Where rows come from (`access`), how groups are
//! summed (`aggregate`) and how the plan is reported (`explain`) have files of their own.
//!
//! One file, about 650 lines: the slice loop and its resumption state; access paths,
//! aggregation and EXPLAIN are already in their own modules.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::{BinaryHeap, VecDeque};
use std::ops::Bound as KeyBound;
use std::rc::Rc;
use std::time::{Duration, Instant};

use ahash::AHashMap;
use serde_json::json;

use super::bind::{AggFunc, Aggregate, ExplainMode, SortKey};
use super::expr::{
    as_f64, as_vector, check_dims, compare, sort_cmp, truth, type_name, Columns, Expr, NO_COLUMNS,
    VALUE_SET_MIN,
};
use super::plan::{Access, OrderBy, Prepared};
use super::{
    AskLimits, QueryError, QueryErrorKind, MAX_IN_LIST_COMPARISONS, SLICE_KNN_ROWS, SLICE_ROWS,
    SLICE_TARGET,
};
use crate::key::Key;
use crate::quota::{QueryMemory, QueryMemoryBound, QueryMemoryRefused, TenantQueryMemory};
use crate::table::{RangeScan, Row, Table};
use crate::tenant::Tenant;
use crate::value::{ColumnType, Value};

mod access;
mod aggregate;
mod explain;
mod select;

use access::Source;
use aggregate::{AggState, Groups};
use select::CutStep;

/// What a query returns.
#[derive(Debug, Clone, PartialEq)]
pub struct AskAnswer {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Value>>,
    pub rows_scanned: u64,
    /// The plan tree, for EXPLAIN and `?explain=true`.
    pub plan: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Stage {
    rows_in: u64,
    rows_out: u64,
    elapsed: Duration,
}

impl Stage {
    fn time<R>(&mut self, f: impl FnOnce() -> R) -> R {
        let t = Instant::now();
        let r = f();
        self.elapsed += t.elapsed();
        r
    }
}

#[derive(Debug, Default)]
struct Stats {
    access: Stage,
    filter: Stage,
    aggregate: Stage,
    having: Stage,
    order: Stage,
    limit: Stage,
    project: Stage,
    slices: u32,
}

/// The order of an answer's rows: ORDER BY `keys`, then the order the rows came in,
/// which `emit` appends to each row's sort keys. Equal sort keys thus keep one order
/// however the rows are cut and selected, and pages (OFFSET) of one answer agree.
fn answer_order(keys: &[SortKey], a: &[Value], b: &[Value]) -> Ordering {
    let arrival = |v: &[Value]| match v.get(keys.len()) {
        Some(Value::Int(n)) => *n,
        _ => 0,
    };
    sort_order(keys, a, b).then_with(|| arrival(a).cmp(&arrival(b)))
}

/// How two rows' sort keys order under ORDER BY `keys` (directions, NULLs first or
/// last).
fn sort_order(keys: &[SortKey], a: &[Value], b: &[Value]) -> Ordering {
    for ((x, y), k) in a.iter().zip(b).zip(keys) {
        let o = match (x.is_null(), y.is_null()) {
            (true, true) => Ordering::Equal,
            (true, false) if k.nulls_first => Ordering::Less,
            (true, false) => Ordering::Greater,
            (false, true) if k.nulls_first => Ordering::Greater,
            (false, true) => Ordering::Less,
            (false, false) if k.desc => sort_cmp(y, x),
            (false, false) => sort_cmp(x, y),
        };
        if o != Ordering::Equal {
            return o;
        }
    }
    Ordering::Equal
}

/// A projected output row and the values it sorts by.
type OutRow = (Vec<Value>, Vec<Value>);

pub struct Execution {
    plan: Rc<Prepared>,
    /// The plan's filter with its long `IN` lists made sets for these parameters
    /// ([`Expr::with_value_sets`]); None to use the plan's own.
    filter: Option<Rc<Expr>>,
    params: Vec<Value>,
    limits: AskLimits,
    /// When the query was asked (its deadline counts from there).
    started: Instant,
    /// How long it waited for a turn before it ran.
    waited: Duration,
    source: Source,
    groups: Option<Groups>,
    output: Vec<OutRow>,
    offset: usize,
    limit: Option<usize>,
    /// Rows skipped for OFFSET so far (streaming output).
    skipped: usize,
    stats: Stats,
    /// Rows the next slice reads: sized so a slice takes about
    /// [`SLICE_TARGET`].
    slice_size: usize,
    /// Bytes held in `output` and `groups`, against `limits.max_memory_bytes`.
    held_bytes: usize,
    /// The same, as this query's share of what all running queries may hold.
    shared_memory: QueryMemory,
    /// ORDER BY with LIMIT, once the output was cut to the rows kept: the sort keys of
    /// the last one, which a new row must sort before to matter, and the bytes the
    /// kept rows hold.
    top_k: Option<(Vec<Value>, usize)>,
    /// A cut to this many rows, due at the end of the slice that asked for it.
    cut_due: Option<usize>,
    /// Rows cut off whose bytes are still held.
    dropped: select::Dropped,
    /// Whether OFFSET and LIMIT were applied to the held rows by the final cut.
    selected: bool,
}

/// Rows a query's first slice reads, before it knows what a row costs: one, since a
/// row can cost milliseconds (16 LIKE over 256 KiB of text), and every query's first
/// slice would hold the shard that long times this (the size doubles each slice while
/// rows are cheap, so a cheap scan reaches its full slices two slices later than from 4).
const FIRST_SLICE_ROWS: usize = 1;
/// Rows evaluated between two looks at the clock inside a slice.
const DEADLINE_CHECK_ROWS: usize = 16;

fn eval_err(e: String) -> QueryError {
    QueryError::eval(e)
}

/// Bytes a value holds, its heap included (an estimate for the memory budget).
fn value_bytes(v: &Value) -> usize {
    std::mem::size_of::<Value>()
        + match v {
            Value::Text(s) | Value::Json(s) => s.len(),
            Value::Vector(x) => x.len() * 4,
            _ => 0,
        }
}

fn values_bytes(values: &[Value]) -> usize {
    values.iter().map(value_bytes).sum::<usize>() + std::mem::size_of::<Vec<Value>>()
}

/// The next slice's size from how long this one took for `size` rows.
fn next_slice_size(size: usize, took: Duration, max: usize) -> usize {
    if took > SLICE_TARGET * 2 {
        (size / 2).max(1)
    } else if took < SLICE_TARGET / 2 {
        size.saturating_mul(2).min(max)
    } else {
        size
    }
}

/// Decodes, once, the parameters that are vectors written as text: those used as an
/// operand of a distance (or as the kNN query). A parameter used both as a vector and
/// as anything else is refused: it would have to be decoded on every row.
fn decode_vector_params(plan: &Prepared, params: &mut [Value]) -> Result<(), QueryError> {
    let mut uses = vec![(0usize, 0usize); params.len()]; // (all uses, as a vector)
    let param = |e: &Expr| match e {
        Expr::Param(i) => Some(*i),
        _ => None,
    };
    let mut vector_uses: Vec<usize> = Vec::new();
    if let Access::Knn { query, .. } = &plan.access {
        vector_uses.extend(param(query));
    }
    plan.visit_exprs(&mut |e| match e {
        Expr::Distance(_, a, b) => vector_uses.extend(param(a).into_iter().chain(param(b))),
        Expr::Param(i) => {
            if let Some(u) = uses.get_mut(*i) {
                u.0 += 1;
            }
        }
        _ => {}
    });
    for i in vector_uses {
        if let Some(u) = uses.get_mut(i) {
            u.1 += 1;
        }
    }
    for (i, (all, vector)) in uses.into_iter().enumerate() {
        let Value::Text(text) = &params[i] else {
            continue;
        };
        if vector == 0 {
            continue;
        }
        if all > vector {
            return Err(QueryError::new(
                QueryErrorKind::Params,
                format!(
                    "${} is used both as a vector and as text; pass vectors as JSON arrays of numbers",
                    i + 1
                ),
            ));
        }
        params[i] = super::expr::vector_from_text(text).map_err(QueryError::eval)?;
    }
    Ok(())
}

/// Checks, before any row is read, every LIKE pattern given as a literal or a
/// parameter (a pattern over the limit is refused whether or not a row would reach it).
fn check_like_patterns(plan: &Prepared, params: &[Value]) -> Result<(), QueryError> {
    let mut refused = None;
    plan.visit_exprs(&mut |e| {
        let Expr::Like(_, pattern, _) = e else { return };
        let text = match &**pattern {
            Expr::Const(Value::Text(t)) => t,
            Expr::Param(i) => match params.get(*i) {
                Some(Value::Text(t)) => t,
                _ => return,
            },
            _ => return,
        };
        if let Err(why) = super::like::LikePattern::new(text) {
            refused.get_or_insert(why);
        }
    });
    refused.map_or(Ok(()), |why| Err(QueryError::eval(why)))
}

/// The error for `what` (a query, an answer) that the memory running queries and unread
/// answers share (`--ask-shared-memory-bytes`), or its tenant's part of it
/// (`--ask-tenant-memory-bytes`), cannot cover; `fix` says how to need less.
pub fn shared_memory_refusal(refused: QueryMemoryRefused, what: &str, fix: &str) -> QueryError {
    let whose = |bound| match bound {
        QueryMemoryBound::AllTenants => {
            "the running queries and the answers not yet read by their clients"
        }
        QueryMemoryBound::OneTenant => {
            "this tenant's running queries and the answers its clients have not yet read"
        }
    };
    let flag = |bound| match bound {
        QueryMemoryBound::AllTenants => "--ask-shared-memory-bytes",
        QueryMemoryBound::OneTenant => "--ask-tenant-memory-bytes",
    };
    match refused {
        QueryMemoryRefused::Busy {
            bound,
            held_bytes,
            limit_bytes,
        } => QueryError::new(
            QueryErrorKind::MemoryBusy,
            format!(
                "{} hold {held_bytes} of the {limit_bytes} bytes they may hold together \
                 ({}), too few left for {what}; retry shortly",
                whose(bound),
                flag(bound)
            ),
        ),
        QueryMemoryRefused::AloneOver { bound, limit_bytes } => QueryError::new(
            QueryErrorKind::MemoryLimit,
            format!(
                "{what} needs more than the {limit_bytes} bytes {} may hold together ({}); {fix}",
                whose(bound),
                flag(bound)
            ),
        ),
    }
}

impl Execution {
    /// Binds the parameters (the caller's, then the literals moved out of the text);
    /// what the query holds counts toward `memory`, its tenant's share.
    pub fn new(
        plan: Rc<Prepared>,
        mut params: Vec<Value>,
        limits: AskLimits,
        memory: &TenantQueryMemory,
    ) -> Result<Self, QueryError> {
        decode_vector_params(&plan, &mut params)?;
        check_like_patterns(&plan, &params)?;
        let count = |e: &Option<Expr>, what: &str| -> Result<Option<usize>, QueryError> {
            let Some(e) = e else { return Ok(None) };
            match &*e.eval(NO_COLUMNS, &params).map_err(eval_err)? {
                Value::Null => Ok(None),
                Value::Int(n) if *n >= 0 => Ok(Some(*n as usize)),
                other => Err(QueryError::eval(format!(
                    "{what} must be a non-negative integer, got {}",
                    other.to_json()
                ))),
            }
        };
        let limit = count(&plan.query.limit, "LIMIT")?;
        let offset = count(&plan.query.offset, "OFFSET")?.unwrap_or(0);
        let groups = plan.query.aggregation.as_ref().map(|_| Groups::default());
        let filter = plan
            .query
            .filter
            .as_ref()
            .and_then(|f| f.with_value_sets(&params))
            .map(Rc::new);
        // Known once the parameters are: which lists became sets.
        let compared = plan.query.in_list_comparisons(filter.as_deref());
        if compared > MAX_IN_LIST_COMPARISONS {
            return Err(QueryError::new(
                QueryErrorKind::TooComplex,
                format!(
                    "the query's IN lists compare {compared} items one by one on every row, \
                     above the limit of {MAX_IN_LIST_COMPARISONS} (a list in WHERE of at least \
                     {VALUE_SET_MIN} constants or parameters of one kind is looked up in a set \
                     instead, whatever its length)"
                ),
            ));
        }
        Ok(Execution {
            filter,
            plan,
            params,
            limits,
            started: Instant::now(),
            waited: Duration::ZERO,
            source: Source::NotStarted,
            groups,
            output: Vec::new(),
            offset,
            limit,
            skipped: 0,
            stats: Stats::default(),
            slice_size: FIRST_SLICE_ROWS,
            held_bytes: 0,
            shared_memory: QueryMemory::for_tenant(memory),
            top_k: None,
            cut_due: None,
            dropped: select::Dropped::default(),
            selected: false,
        })
    }

    /// Counts the deadline from `at` (when the query was asked), not from now.
    pub fn started_at(&mut self, at: Instant) {
        self.waited = self.started.saturating_duration_since(at);
        self.started = at;
    }

    /// Whether the query only wants its plan (`EXPLAIN` without ANALYZE).
    pub fn plan_only(&self) -> bool {
        self.plan.query.explain == ExplainMode::PlanOnly
    }

    fn table<'t>(&self, tenant: &'t Tenant) -> Result<&'t Table, QueryError> {
        let q = &self.plan.query;
        match tenant.table(&q.table) {
            Ok(t) if t.version() == q.table_version => Ok(t),
            _ => Err(QueryError::new(
                QueryErrorKind::TableChanged,
                format!(
                    "table {:?} was dropped or re-created while the query ran; retry it",
                    q.table
                ),
            )),
        }
    }

    /// The migration whose new shape a dual-read plan reads; it must still run.
    fn dual_read<'t>(
        &self,
        tenant: &'t Tenant,
    ) -> Result<Option<&'t crate::migration::ActiveMigration>, QueryError> {
        let q = &self.plan.query;
        let Some(id) = q.dual_read else {
            return Ok(None);
        };
        match tenant.migrations().active(&q.table) {
            Some(m) if m.info.id == id => Ok(Some(m)),
            _ => Err(QueryError::new(
                QueryErrorKind::TableChanged,
                format!(
                    "migration {id} of table {:?} ended while the query ran (cut over, \
                     aborted or failed), so the shape it reads changed; retry it",
                    q.table
                ),
            )),
        }
    }

    /// Runs one slice; returns whether the scan is finished (then call `finish`).
    pub fn step(&mut self, tenant: &Tenant) -> Result<bool, QueryError> {
        if self.plan_only() {
            return Ok(true);
        }
        if !self.dropped.0.is_empty() {
            let t = Instant::now();
            self.settle_dropped(select::SETTLE_ROWS_PER_SLICE);
            self.stats.order.elapsed += t.elapsed();
        }
        if matches!(self.source, Source::Cutting(_)) {
            if let Source::Cutting(cut) = std::mem::replace(&mut self.source, Source::Done) {
                self.stats.slices += 1;
                let t = Instant::now();
                let cut_done = self.cut_slice(cut);
                self.stats.order.elapsed += t.elapsed();
                self.check_deadline()?;
                return Ok(cut_done && matches!(self.source, Source::Done));
            }
        }
        let done = self.step_source(tenant)?;
        if let Some(keep) = self.cut_due.take() {
            // Once every row is in, the final cut does this one's work.
            if !done {
                let then = std::mem::replace(&mut self.source, Source::Done);
                self.source = Source::Cutting(select::Cut::new([CutStep::KeepFirst(keep)], then));
            }
        }
        if done && self.final_cut_due() {
            self.source = Source::Cutting(self.final_cut());
            return Ok(false);
        }
        Ok(done)
    }

    /// Whether OFFSET or LIMIT has rows to cut from an ordered answer held whole.
    fn final_cut_due(&self) -> bool {
        !self.selected
            && !self.streams()
            && self.plan.order != OrderBy::Knn
            && ((self.offset > 0 && !self.output.is_empty())
                || self.limit.is_some_and(|l| l < self.output.len()))
    }

    /// The cut that applies OFFSET and LIMIT to the rows held, once every row is in.
    fn final_cut(&mut self) -> Box<select::Cut> {
        let rows_in = self.output.len() as u64;
        self.stats.order.rows_out = rows_in;
        self.stats.limit.rows_in = rows_in;
        self.selected = true;
        let steps = (self.offset > 0)
            .then_some(CutStep::DropBefore(self.offset))
            .into_iter()
            .chain(self.limit.map(CutStep::KeepFirst));
        select::Cut::new(steps, Source::Done)
    }

    /// One slice of the scan, the kNN ranking or the groups' emission.
    fn step_source(&mut self, tenant: &Tenant) -> Result<bool, QueryError> {
        if matches!(self.source, Source::Groups(_)) {
            if let Source::Groups(groups) = std::mem::replace(&mut self.source, Source::Done) {
                return self.group_slice(groups);
            }
        }
        let table = self.table(tenant)?;
        let migration = self.dual_read(tenant)?;
        self.stats.slices += 1;
        if matches!(self.source, Source::NotStarted) {
            self.source = self.start(table)?;
            if let Source::Ranges(ranges) = &mut self.source {
                // A scan whose order is the answer's cannot return a row out of it.
                table.track_index_moves(ranges.iter_mut(), self.plan.order != OrderBy::ByAccess);
            }
        }
        let slice_started = Instant::now();
        match std::mem::replace(&mut self.source, Source::Done) {
            Source::Ranges(mut ranges) => {
                let want = self.batch_size();
                let mut batch: Vec<&Row> = Vec::with_capacity(want);
                let t = Instant::now();
                let mut lost_moves = false;
                while batch.len() < want {
                    let Some(scan) = ranges.front_mut() else {
                        break;
                    };
                    let finished = table.next_rows(scan, want - batch.len(), &mut batch);
                    lost_moves |= scan.lost_moves();
                    if finished {
                        ranges.pop_front();
                    }
                }
                self.stats.access.elapsed += t.elapsed();
                self.stats.access.rows_out += batch.len() as u64;
                if lost_moves {
                    return Err(QueryError::new(
                        QueryErrorKind::TableChanged,
                        format!(
                            "more than {} rows moved in the index the query reads (their \
                             indexed values changed) while it ran, so it cannot tell which \
                             it returned; retry it",
                            crate::table::MAX_INDEX_MOVES
                        ),
                    ));
                }
                self.check_scanned()?;
                match migration {
                    None => self.consume(batch)?,
                    Some(m) => {
                        let t = Instant::now();
                        let mut reshaped = Vec::with_capacity(batch.len());
                        for (n, row) in batch.iter().enumerate() {
                            self.check_deadline_at(n)?;
                            reshaped.push(m.read_view(row).map_err(|why| {
                                QueryError::new(
                                    QueryErrorKind::MigrationConflict,
                                    format!(
                                        "a stored row cannot be read in the new shape of \
                                         migration {}, which runs on table {:?} (its backfill \
                                         will fail on it; abort it, or fix the row): {why}",
                                        m.info.id, self.plan.query.table
                                    ),
                                )
                            })?);
                        }
                        self.stats.access.elapsed += t.elapsed();
                        self.consume(reshaped.iter().map(AsRef::as_ref).collect())?;
                    }
                }
                if !ranges.is_empty() && !self.output_full() {
                    self.source = Source::Ranges(ranges);
                }
            }
            Source::Knn(mut knn) => {
                self.knn_slice(table, &mut knn)?;
                self.check_scanned()?;
                self.source = Source::Knn(knn);
            }
            Source::NotStarted | Source::Groups(_) | Source::Cutting(_) | Source::Done => {}
        }
        let max = match self.source {
            Source::Knn(_) => SLICE_KNN_ROWS,
            _ => SLICE_ROWS,
        };
        self.slice_size = next_slice_size(self.slice_size, slice_started.elapsed(), max);
        self.check_deadline()?;
        if matches!(self.source, Source::Done) {
            if let Some(groups) = self.groups.take() {
                self.source = self.close_groups(groups);
                return Ok(false);
            }
        }
        Ok(match &self.source {
            Source::Knn(k) => k.finished,
            Source::Done => true,
            _ => false,
        })
    }

    fn check_deadline(&self) -> Result<(), QueryError> {
        let deadline = self.limits.deadline;
        if self.started.elapsed() <= deadline {
            return Ok(());
        }
        // Most of it (and a millisecond at least) went waiting for the tenant's other
        // queries: not this one's cost.
        if self.waited > deadline / 2 && self.waited >= Duration::from_millis(1) {
            return Err(QueryError::new(
                QueryErrorKind::TurnsBusy,
                format!(
                    "the query ran past its deadline of {} ms after waiting {} ms of it for a \
                     turn behind the tenant's other queries; send fewer at once",
                    deadline.as_millis(),
                    self.waited.as_millis()
                ),
            ));
        }
        Err(QueryError::new(
            QueryErrorKind::Timeout,
            format!(
                "the query ran past its deadline of {} ms (--ask-timeout-ms, capped by the \
                 request deadline); narrow it with WHERE on an indexed column or a LIMIT",
                deadline.as_millis()
            ),
        ))
    }

    /// Checks the deadline every [`DEADLINE_CHECK_ROWS`]-th row of a loop while rows
    /// are cheap (full-size slices), and on every row once they are not: a slice that
    /// shrank below full size has rows that cost microseconds or more each.
    fn check_deadline_at(&self, row: usize) -> Result<(), QueryError> {
        if self.slice_size < SLICE_ROWS || row % DEADLINE_CHECK_ROWS == DEADLINE_CHECK_ROWS - 1 {
            self.check_deadline()?;
        }
        Ok(())
    }

    /// Adds `bytes` to what the query holds; past its own budget, or past what the
    /// running queries may hold together, the query fails.
    fn hold(&mut self, bytes: usize) -> Result<(), QueryError> {
        self.held_bytes = self.held_bytes.saturating_add(bytes);
        if self.held_bytes > self.limits.max_memory_bytes {
            return Err(self.over_memory_budget());
        }
        self.shared_memory
            .cover(self.held_bytes)
            .map_err(|refused| {
                shared_memory_refusal(
                    refused,
                    "this query",
                    "add a LIMIT, narrow the WHERE or group by fewer values",
                )
            })
    }

    /// Gives back what [`hold`](Self::hold) took (a row that left a top-k heap).
    fn release(&mut self, bytes: usize) {
        self.held_bytes = self.held_bytes.saturating_sub(bytes);
        // Covering less never fails.
        let _ = self.shared_memory.cover(self.held_bytes);
    }

    fn over_memory_budget(&self) -> QueryError {
        QueryError::new(
            QueryErrorKind::MemoryLimit,
            format!(
                "the query needs more than {} bytes of memory (rows it buffers to sort or return, and its groups), its limit; add a LIMIT, narrow the WHERE, or group by fewer values",
                self.limits.max_memory_bytes
            ),
        )
    }

    /// Rows to read this slice: a streaming query with a LIMIT reads what it still
    /// needs, doubling each slice when a filter may drop rows, so `LIMIT 10` over
    /// an ordered walk reads about ten rows, not a whole slice; and no slice reads
    /// more than its time budget allows.
    fn batch_size(&self) -> usize {
        let wanted = match self.limit {
            Some(limit) if self.streams() => {
                let needed = self
                    .offset
                    .saturating_add(limit)
                    .saturating_sub(self.skipped + self.output.len());
                let doublings = match self.plan.query.filter {
                    Some(_) => self.stats.slices.saturating_sub(1).min(10),
                    None => 0,
                };
                let grown = needed.saturating_mul(1 << doublings);
                grown.clamp(1, SLICE_ROWS)
            }
            _ => SLICE_ROWS,
        };
        wanted.min(self.slice_size)
    }

    fn check_scanned(&self) -> Result<(), QueryError> {
        let scanned = self.stats.access.rows_out.max(self.stats.access.rows_in);
        if scanned > self.limits.max_rows_scanned as u64 {
            return Err(QueryError::new(
                QueryErrorKind::ScanLimit,
                format!(
                    "the query read more than {} rows, its scan limit; add a WHERE condition on the primary key or an index (see EXPLAIN)",
                    self.limits.max_rows_scanned
                ),
            ));
        }
        Ok(())
    }

    /// The projection of `row` and its size. A projection that would copy a huge value
    /// many times is refused before the copies, not after: parameters and decoded
    /// values are borrowed until the budget is checked, and a stored row's columns are
    /// sized before they are read.
    fn project<R: Columns + ?Sized>(&self, row: &R) -> Result<(Vec<Value>, usize), QueryError> {
        self.materialize(self.plan.query.projection.iter(), row)
    }

    fn sort_keys<R: Columns + ?Sized>(&self, row: &R) -> Result<(Vec<Value>, usize), QueryError> {
        self.materialize(self.plan.query.order_by.iter().map(|k| &k.expr), row)
    }

    /// Evaluates `exprs` over `row`; copies them only if they fit the memory budget.
    fn materialize<'e, R: Columns + ?Sized>(
        &self,
        exprs: impl Iterator<Item = &'e Expr> + Clone,
        row: &R,
    ) -> Result<(Vec<Value>, usize), QueryError> {
        if R::COPIES {
            let copies = exprs
                .clone()
                .filter_map(|e| match e {
                    Expr::Column(i) => Some(row.column_bytes(*i)),
                    _ => None,
                })
                .fold(0usize, usize::saturating_add);
            if self.held_bytes.saturating_add(copies) > self.limits.max_memory_bytes {
                return Err(self.over_memory_budget());
            }
        }
        let values = exprs
            .map(|e| e.eval(row, &self.params).map_err(eval_err))
            .collect::<Result<Vec<_>, QueryError>>()?;
        let bytes = values.iter().map(|v| value_bytes(v)).sum::<usize>()
            + std::mem::size_of::<Vec<Value>>();
        if self.held_bytes.saturating_add(bytes) > self.limits.max_memory_bytes {
            return Err(self.over_memory_budget());
        }
        Ok((values.into_iter().map(Cow::into_owned).collect(), bytes))
    }

    /// Streaming output has all the rows LIMIT wants.
    fn output_full(&self) -> bool {
        self.streams() && self.limit.is_some_and(|l| self.output.len() >= l)
    }

    fn streams(&self) -> bool {
        self.groups.is_none() && matches!(self.plan.order, OrderBy::Unordered | OrderBy::ByAccess)
    }

    /// Filter, then aggregate or collect output.
    fn consume(&mut self, mut batch: Vec<&Row>) -> Result<(), QueryError> {
        if let Some(f) = self.filter.as_deref().or(self.plan.query.filter.as_ref()) {
            let params = &self.params;
            let mut failure = None;
            let mut seen = 0;
            let (started, deadline) = (self.started, self.limits.deadline);
            let every_row = self.slice_size < SLICE_ROWS;
            self.stats.filter.rows_in += batch.len() as u64;
            self.stats.filter.time(|| {
                batch.retain(|row| {
                    seen += 1;
                    if failure.is_some() {
                        return false;
                    }
                    if (every_row || seen % DEADLINE_CHECK_ROWS == 0)
                        && started.elapsed() > deadline
                    {
                        failure = Some(Err(()));
                        return false;
                    }
                    match f
                        .eval(*row, params)
                        .map_err(eval_err)
                        .and_then(|v| truth(&v).map_err(eval_err))
                    {
                        Ok(t) => t == Some(true),
                        Err(e) => {
                            failure = Some(Ok(e));
                            false
                        }
                    }
                })
            });
            match failure {
                Some(Ok(e)) => return Err(e),
                Some(Err(())) => self.check_deadline()?,
                None => {}
            }
            self.stats.filter.rows_out += batch.len() as u64;
        }
        if self.groups.is_some() {
            let t = Instant::now();
            self.stats.aggregate.rows_in += batch.len() as u64;
            let r = self.aggregate(&batch);
            self.stats.aggregate.elapsed += t.elapsed();
            return r;
        }
        for (i, row) in batch.into_iter().enumerate() {
            self.check_deadline_at(i)?;
            self.emit(row)?;
            if self.output_full() {
                break;
            }
        }
        Ok(())
    }

    /// One row (a table row, or an aggregated row) into the output.
    fn emit<R: Columns + ?Sized>(&mut self, row: &R) -> Result<(), QueryError> {
        if self.streams() {
            let t = Instant::now();
            self.stats.limit.rows_in += 1;
            if self.skipped < self.offset {
                self.skipped += 1;
            } else {
                let (out, bytes) = self.project(row)?;
                self.hold(bytes)?;
                self.output.push((Vec::new(), out));
                if self.output.len() > self.limits.max_rows_returned {
                    return Err(self.too_many_rows());
                }
            }
            self.stats.project.elapsed += t.elapsed();
            return Ok(());
        }
        let t = Instant::now();
        self.stats.order.rows_in += 1;
        let (mut keys, mut key_bytes) = self.sort_keys(row)?;
        keys.push(Value::Int(self.stats.order.rows_in as i64));
        key_bytes += std::mem::size_of::<Value>();
        if let Some((last_kept, _)) = &self.top_k {
            // Not before the last row kept: it cannot be in the answer (ties among
            // equal keys come in no promised order).
            if answer_order(&self.plan.query.order_by, &keys, last_kept) != Ordering::Less {
                self.stats.order.elapsed += t.elapsed();
                return Ok(());
            }
        }
        let (out, out_bytes) = self.project(row)?;
        self.held_bytes += key_bytes + out_bytes;
        self.output.push((keys, out));
        let keep = self.limit.map(|l| l.saturating_add(self.offset));
        // Cut again once the rows added since the last cut take half the memory left
        // beside the kept ones: each cut then buys room for as many again, instead of
        // one cut (a whole sort) per row once the kept rows alone take half the limit.
        let kept_bytes = self.top_k.as_ref().map_or(0, |(_, bytes)| *bytes);
        let room = self.limits.max_memory_bytes.saturating_sub(kept_bytes);
        let crowded = self.held_bytes.saturating_sub(kept_bytes) > room / 2;
        match keep {
            Some(keep)
                if self.cut_due.is_none()
                    && (self.output.len() >= keep.saturating_mul(2).max(1024)
                        || (crowded && self.output.len() > keep)) =>
            {
                if self.output.len() <= select::CUT_AT_ONCE_ROWS {
                    self.cut_now(keep);
                } else {
                    // Cut in the slices that follow this one, a bounded amount at a time.
                    self.cut_due = Some(keep);
                }
            }
            Some(keep)
                if self.cut_due.is_some() && self.held_bytes > self.limits.max_memory_bytes =>
            {
                // The rows this slice added after asking for a cut would take the query
                // past its limit: the cut is made now, however long it takes.
                self.cut_due = None;
                self.cut_now(keep);
            }
            None if self.output.len()
                > self.offset.saturating_add(self.limits.max_rows_returned) =>
            {
                return Err(self.too_many_rows())
            }
            _ => {}
        }
        self.hold(0)?;
        self.stats.order.elapsed += t.elapsed();
        Ok(())
    }

    fn too_many_rows(&self) -> QueryError {
        QueryError::new(
            QueryErrorKind::ResultTooLarge,
            format!(
                "the query returns more than {} rows, the limit; add a LIMIT (and OFFSET to page)",
                self.limits.max_rows_returned
            ),
        )
    }

    /// ORDER BY, OFFSET and LIMIT over the rows held: those before OFFSET are selected
    /// out, then the first LIMIT of the rest (by the final cut, in slices when the
    /// caller stepped to the end), and only the answer's rows are sorted.
    fn select_answer(&mut self) -> Result<(), QueryError> {
        if !self.selected {
            let cut = self.final_cut();
            self.run_cut(cut);
        }
        if self.output.len() > self.limits.max_rows_returned {
            return Err(self.too_many_rows());
        }
        let keys: &[SortKey] = &self.plan.query.order_by;
        self.output
            .sort_unstable_by(|a, b| answer_order(keys, &a.0, &b.0));
        Ok(())
    }

    /// Aggregation output, HAVING, ORDER BY, OFFSET/LIMIT: the rows of the answer.
    pub fn finish(mut self, cached: bool) -> Result<AskAnswer, QueryError> {
        let explain = self.plan.query.explain;
        if explain == ExplainMode::PlanOnly {
            return Ok(AskAnswer {
                columns: self.plan.query.output_names.clone(),
                rows: Vec::new(),
                rows_scanned: 0,
                plan: Some(self.plan_tree(cached, false)),
            });
        }
        // A caller that did not step to the end (or a scan that ended without a last
        // step) has its cut finished and its groups turned into rows here, in one go.
        if matches!(self.source, Source::Cutting(_)) {
            if let Source::Cutting(cut) = std::mem::replace(&mut self.source, Source::Done) {
                self.run_cut(cut);
            }
        }
        if let Some(groups) = self.groups.take() {
            self.source = self.close_groups(groups);
        }
        while let Source::Groups(groups) = std::mem::replace(&mut self.source, Source::Done) {
            if self.group_slice(groups)? {
                break;
            }
        }
        if !self.streams() {
            let rows_in = self.output.len();
            if self.plan.order == OrderBy::Knn {
                // Ranked as they were kept.
                self.output.drain(..self.offset.min(rows_in));
                if let Some(l) = self.limit {
                    self.output.truncate(l);
                }
            } else {
                self.check_deadline()?;
                let t = Instant::now();
                self.select_answer()?;
                self.stats.order.elapsed += t.elapsed();
            }
            if !self.selected {
                self.stats.limit.rows_in = rows_in as u64;
            }
        }
        if self.streams() {
            if let Some(l) = self.limit {
                self.output.truncate(l);
            }
        }
        self.stats.limit.rows_out = self.output.len() as u64;
        self.stats.project.rows_in = self.stats.limit.rows_out;
        self.stats.project.rows_out = self.stats.limit.rows_out;
        if self.output.len() > self.limits.max_rows_returned {
            return Err(self.too_many_rows());
        }
        let plan = (explain == ExplainMode::Analyze).then(|| self.plan_tree(cached, true));
        let rows_scanned = self.stats.access.rows_in.max(self.stats.access.rows_out);
        Ok(AskAnswer {
            columns: self.plan.query.output_names.clone(),
            rows: self.output.into_iter().map(|(_, out)| out).collect(),
            rows_scanned,
            plan,
        })
    }
}
