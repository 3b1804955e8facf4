//! Execution: a plan run in slices. Each slice reads at most [`SLICE_ROWS`] rows (or
//! [`SLICE_VECTORS`] vectors) while the caller holds the shard state, then hands
//! control back so the shard can yield; the next slice resumes after the last key (or
//! slot) read. A row present for the whole query is seen exactly once; rows written
//! meanwhile may or may not be seen.
//!
//! Rows flow through stages — access, filter, aggregate, having, sort or top-k,
//! offset/limit, projection — each counting rows in and out and the time spent, which
//! is what EXPLAIN ANALYZE reports.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::{BinaryHeap, VecDeque};
use std::ops::Bound as KeyBound;
use std::rc::Rc;
use std::time::{Duration, Instant};

use ahash::AHashMap;
use serde_json::json;

use super::bind::{AggFunc, Aggregate, ExplainMode, SortKey};
use super::expr::{as_f64, as_vector, check_dims, compare, sort_cmp, truth, type_name, Expr};
use super::plan::{Access, OrderBy, Prepared};
use super::{AskLimits, QueryError, QueryErrorKind, SLICE_ROWS, SLICE_TARGET, SLICE_VECTORS};
use crate::key::Key;
use crate::table::{RangeScan, Row, Table};
use crate::tenant::Tenant;
use crate::value::{ColumnType, Value};

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

enum Source {
    NotStarted,
    Ranges(VecDeque<RangeScan>),
    Knn(KnnScan),
    Done,
}

struct KnnScan {
    query: Vec<f32>,
    next_slot: usize,
    k: usize,
    best: BinaryHeap<Candidate>,
}

/// A kNN candidate; the heap's top is the worst kept (largest distance, then key).
struct Candidate {
    rank: f32,
    key: Key,
    output: Vec<Value>,
    /// What `output` is charged to the memory budget.
    bytes: usize,
}

impl Candidate {
    fn cmp_to(&self, rank: f32, key: &Key) -> Ordering {
        self.rank.total_cmp(&rank).then_with(|| self.key.cmp(key))
    }
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Candidate {}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        self.cmp_to(other.rank, &other.key)
    }
}

/// Running state of one aggregate over one group.
#[derive(Debug, Clone)]
enum AggState {
    Count(i64),
    Sum {
        int: i64,
        float: f64,
        seen: bool,
        is_float: bool,
    },
    Avg {
        sum: f64,
        n: i64,
    },
    Min(Option<Value>),
    Max(Option<Value>),
}

impl AggState {
    fn new(a: &Aggregate) -> Self {
        match a.func {
            AggFunc::Count => AggState::Count(0),
            AggFunc::Sum => AggState::Sum {
                int: 0,
                float: 0.0,
                seen: false,
                is_float: false,
            },
            AggFunc::Avg => AggState::Avg { sum: 0.0, n: 0 },
            AggFunc::Min => AggState::Min(None),
            AggFunc::Max => AggState::Max(None),
        }
    }

    /// Adds one value; returns how many bytes the state's kept value grew by (MIN
    /// and MAX keep a copy of their best value; the others keep numbers).
    fn add(&mut self, v: Option<&Value>) -> Result<isize, String> {
        let Some(v) = v else {
            // COUNT(*)
            if let AggState::Count(n) = self {
                *n += 1;
            }
            return Ok(0);
        };
        if v.is_null() {
            return Ok(0);
        }
        let replace = |best: &mut Option<Value>| -> isize {
            let before = best.as_ref().map_or(0, value_bytes);
            *best = Some(v.clone());
            value_bytes(v) as isize - before as isize
        };
        let numeric = |name: &str| match v {
            Value::Int(_) | Value::Float(_) => Ok(()),
            other => Err(format!("{name} needs numbers, got {}", type_name(other))),
        };
        match self {
            AggState::Count(n) => *n += 1,
            AggState::Sum {
                int,
                float,
                seen,
                is_float,
            } => {
                numeric("sum")?;
                *seen = true;
                *float += as_f64(v);
                match v {
                    Value::Int(i) if !*is_float => {
                        *int = int.checked_add(*i).ok_or("integer overflow in sum")?
                    }
                    _ => *is_float = true,
                }
            }
            AggState::Avg { sum, n } => {
                numeric("avg")?;
                *sum += as_f64(v);
                *n += 1;
            }
            AggState::Min(best) => {
                if best
                    .as_ref()
                    .is_none_or(|b| sort_cmp(v, b) == Ordering::Less)
                {
                    return Ok(replace(best));
                }
            }
            AggState::Max(best) => {
                if best
                    .as_ref()
                    .is_none_or(|b| sort_cmp(v, b) == Ordering::Greater)
                {
                    return Ok(replace(best));
                }
            }
        }
        Ok(0)
    }

    fn result(&self) -> Value {
        match self {
            AggState::Count(n) => Value::Int(*n),
            AggState::Sum { seen: false, .. } => Value::Null,
            AggState::Sum {
                float,
                is_float: true,
                ..
            } => Value::Float(*float),
            AggState::Sum { int, .. } => Value::Int(*int),
            AggState::Avg { n: 0, .. } => Value::Null,
            AggState::Avg { sum, n } => Value::Float(sum / *n as f64),
            AggState::Min(v) | AggState::Max(v) => v.clone().unwrap_or(Value::Null),
        }
    }
}

#[derive(Default)]
struct Groups {
    index: AHashMap<Vec<u8>, usize>,
    groups: Vec<(Vec<Value>, Vec<AggState>)>,
}

/// Bytes that are equal exactly when two group keys are equal.
fn group_key(values: &[Value], out: &mut Vec<u8>) {
    out.clear();
    for v in values {
        match v {
            Value::Json(s) => {
                out.push(0x10);
                out.extend_from_slice(&(s.len() as u64).to_le_bytes());
                out.extend_from_slice(s.as_bytes());
            }
            Value::Vector(x) => {
                out.push(0x11);
                out.extend_from_slice(&(x.len() as u64).to_le_bytes());
                x.iter()
                    .for_each(|f| out.extend_from_slice(&f.to_bits().to_le_bytes()));
            }
            keyable => keyable.encode_key(out),
        }
    }
}

/// A projected output row and the values it sorts by.
type OutRow = (Vec<Value>, Vec<Value>);

pub struct Execution {
    plan: Rc<Prepared>,
    params: Vec<Value>,
    limits: AskLimits,
    started: Instant,
    source: Source,
    groups: Option<Groups>,
    output: Vec<OutRow>,
    offset: usize,
    limit: Option<usize>,
    /// Rows skipped for OFFSET so far (streaming output).
    skipped: usize,
    stats: Stats,
    /// Rows (or vectors) the next slice reads: sized so a slice takes about
    /// [`SLICE_TARGET`].
    slice_size: usize,
    /// Bytes held in `output` and `groups`, against `limits.max_memory_bytes`.
    held_bytes: usize,
}

/// Rows a query's first slice reads, before it knows what a row costs.
const FIRST_SLICE_ROWS: usize = 4;
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

impl Execution {
    /// Binds the parameters (the caller's, then the literals moved out of the text).
    pub fn new(
        plan: Rc<Prepared>,
        mut params: Vec<Value>,
        limits: AskLimits,
    ) -> Result<Self, QueryError> {
        decode_vector_params(&plan, &mut params)?;
        let count = |e: &Option<Expr>, what: &str| -> Result<Option<usize>, QueryError> {
            let Some(e) = e else { return Ok(None) };
            match &*e.eval(&[], &params).map_err(eval_err)? {
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
        Ok(Execution {
            plan,
            params,
            limits,
            started: Instant::now(),
            source: Source::NotStarted,
            groups,
            output: Vec::new(),
            offset,
            limit,
            skipped: 0,
            stats: Stats::default(),
            slice_size: FIRST_SLICE_ROWS,
            held_bytes: 0,
        })
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

    /// Runs one slice; returns whether the scan is finished (then call `finish`).
    pub fn step(&mut self, tenant: &Tenant) -> Result<bool, QueryError> {
        if self.plan_only() {
            return Ok(true);
        }
        let table = self.table(tenant)?;
        self.stats.slices += 1;
        if matches!(self.source, Source::NotStarted) {
            self.source = self.start(table)?;
        }
        let slice_started = Instant::now();
        match std::mem::replace(&mut self.source, Source::Done) {
            Source::Ranges(mut ranges) => {
                let want = self.batch_size();
                let mut batch: Vec<&Row> = Vec::with_capacity(want);
                let t = Instant::now();
                while batch.len() < want {
                    let Some(scan) = ranges.front_mut() else {
                        break;
                    };
                    if table.next_rows(scan, want - batch.len(), &mut batch) {
                        ranges.pop_front();
                    }
                }
                self.stats.access.elapsed += t.elapsed();
                self.stats.access.rows_out += batch.len() as u64;
                self.check_scanned()?;
                self.consume(batch)?;
                if !ranges.is_empty() && !self.output_full() {
                    self.source = Source::Ranges(ranges);
                }
            }
            Source::Knn(mut knn) => {
                self.knn_slice(table, &mut knn)?;
                self.check_scanned()?;
                if knn.next_slot < self.vector_slots(table) {
                    self.source = Source::Knn(knn);
                } else {
                    self.source = Source::Knn(KnnScan {
                        next_slot: usize::MAX,
                        ..knn
                    });
                }
            }
            Source::NotStarted | Source::Done => {}
        }
        let max = match self.source {
            Source::Knn(_) => SLICE_VECTORS,
            _ => SLICE_ROWS,
        };
        self.slice_size = next_slice_size(self.slice_size, slice_started.elapsed(), max);
        self.check_deadline()?;
        Ok(match &self.source {
            Source::Knn(k) => k.next_slot == usize::MAX,
            Source::Done => true,
            _ => false,
        })
    }

    fn check_deadline(&self) -> Result<(), QueryError> {
        if self.started.elapsed() > self.limits.deadline {
            return Err(QueryError::new(
                QueryErrorKind::Timeout,
                format!(
                    "the query ran past its deadline of {} ms; narrow it with WHERE on an indexed column or a LIMIT",
                    self.limits.deadline.as_millis()
                ),
            ));
        }
        Ok(())
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

    /// Adds `bytes` to what the query holds; past the budget the query fails.
    fn hold(&mut self, bytes: usize) -> Result<(), QueryError> {
        self.held_bytes = self.held_bytes.saturating_add(bytes);
        if self.held_bytes > self.limits.max_memory_bytes {
            return Err(self.over_memory_budget());
        }
        Ok(())
    }

    /// Gives back what [`hold`](Self::hold) took (a row that left a top-k heap).
    fn release(&mut self, bytes: usize) {
        self.held_bytes = self.held_bytes.saturating_sub(bytes);
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
    /// needs, doubling each slice in case the filter drops rows, so `LIMIT 10` over
    /// an ordered walk reads about ten rows, not a whole slice; and no slice reads
    /// more than its time budget allows.
    fn batch_size(&self) -> usize {
        let wanted = match self.limit {
            Some(limit) if self.streams() => {
                let needed = self
                    .offset
                    .saturating_add(limit)
                    .saturating_sub(self.skipped + self.output.len());
                let grown = needed.saturating_mul(1 << self.stats.slices.saturating_sub(1).min(10));
                grown.clamp(1, SLICE_ROWS)
            }
            _ => SLICE_ROWS,
        };
        wanted.min(self.slice_size)
    }

    fn vector_slots(&self, table: &Table) -> usize {
        match &self.plan.access {
            Access::Knn { column, .. } => table.vector_column(*column).map_or(0, |c| c.slots()),
            _ => 0,
        }
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

    /// Evaluates the access path's bounds and opens its scans.
    fn start(&self, table: &Table) -> Result<Source, QueryError> {
        if self.limit == Some(0) {
            return Ok(Source::Done);
        }
        match &self.plan.access {
            Access::Knn { query, column, .. } => {
                let store = table
                    .vector_column(*column)
                    .ok_or_else(|| QueryError::eval("kNN needs a vector column"))?;
                let value = query.eval(&[], &self.params).map_err(eval_err)?;
                let Some(query) = as_vector(&value).map_err(eval_err)? else {
                    return Err(QueryError::eval(
                        "the kNN query vector is NULL; pass a vector (a JSON array of numbers)",
                    ));
                };
                let probe = vec![0.0f32; store.dim()];
                check_dims(&probe, &query).map_err(eval_err)?;
                let k = self.offset.saturating_add(self.limit.unwrap_or(usize::MAX));
                Ok(Source::Knn(KnnScan {
                    query: query.into_owned(),
                    next_slot: 0,
                    k,
                    best: BinaryHeap::with_capacity(k.min(SLICE_VECTORS) + 1),
                }))
            }
            Access::Keys {
                target,
                key_types,
                eq,
                in_list,
                lower,
                upper,
            } => {
                let eval = |e: &Expr| -> Result<Value, QueryError> {
                    Ok(e.eval(&[], &self.params).map_err(eval_err)?.into_owned())
                };
                let mut prefix = Vec::with_capacity(eq.len() + 1);
                let mut widened = false;
                for (e, ty) in eq.iter().zip(key_types) {
                    match as_key(eval(e)?, *ty)? {
                        KeyValue::Exact(v) => prefix.push(v),
                        KeyValue::Null => return Ok(Source::Done),
                        KeyValue::Mismatch => {
                            widened = true;
                            break;
                        }
                    }
                }
                let next_ty = key_types.get(prefix.len()).copied();
                let mut ranges = VecDeque::new();
                let bound =
                    |b: &Option<(Expr, bool)>| -> Result<Option<(Value, bool)>, QueryError> {
                        match (b, next_ty, widened) {
                            (Some((e, inclusive)), Some(ty), false) => {
                                Ok(match as_key(eval(e)?, ty)? {
                                    KeyValue::Exact(v) => Some((v, *inclusive)),
                                    KeyValue::Null => Some((Value::Null, false)),
                                    KeyValue::Mismatch => None,
                                })
                            }
                            _ => Ok(None),
                        }
                    };
                match (in_list, next_ty, widened) {
                    (Some(list), Some(ty), false) => {
                        let mut items: Vec<(Vec<u8>, Value)> = Vec::new();
                        let mut usable = true;
                        for e in list {
                            match as_key(eval(e)?, ty)? {
                                KeyValue::Exact(v) => {
                                    let mut k = Vec::new();
                                    v.encode_key(&mut k);
                                    items.push((k, v));
                                }
                                KeyValue::Null => {}
                                KeyValue::Mismatch => usable = false,
                            }
                        }
                        if usable {
                            items.sort_by(|a, b| a.0.cmp(&b.0));
                            items.dedup_by(|a, b| a.0 == b.0);
                            for (_, v) in items {
                                let mut key = prefix.clone();
                                key.push(v);
                                ranges.push_back(table.range_scan(
                                    *target,
                                    KeyBound::Included(&key),
                                    KeyBound::Included(&key),
                                ));
                            }
                            return Ok(Source::Ranges(ranges));
                        }
                    }
                    _ => {
                        let (lo, hi) = (bound(lower)?, bound(upper)?);
                        if matches!(lo, Some((Value::Null, _)))
                            || matches!(hi, Some((Value::Null, _)))
                        {
                            return Ok(Source::Done);
                        }
                        let with = |v: &Value| {
                            let mut k = prefix.clone();
                            k.push(v.clone());
                            k
                        };
                        let lo_key = lo.as_ref().map(|(v, inc)| (with(v), *inc));
                        let hi_key = hi.as_ref().map(|(v, inc)| (with(v), *inc));
                        ranges.push_back(table.range_scan(
                            *target,
                            key_bound(&lo_key, &prefix),
                            key_bound(&hi_key, &prefix),
                        ));
                        return Ok(Source::Ranges(ranges));
                    }
                }
                // An IN list whose values do not fit the column: walk the prefix.
                let all = if prefix.is_empty() {
                    KeyBound::Unbounded
                } else {
                    KeyBound::Included(prefix.as_slice())
                };
                ranges.push_back(table.range_scan(*target, all, all));
                Ok(Source::Ranges(ranges))
            }
        }
    }

    fn knn_slice(&mut self, table: &Table, knn: &mut KnnScan) -> Result<(), QueryError> {
        let plan = Rc::clone(&self.plan);
        let Access::Knn { column, metric, .. } = &plan.access else {
            unreachable!("a kNN source comes from a kNN plan")
        };
        let store = table
            .vector_column(*column)
            .ok_or_else(|| QueryError::eval("kNN needs a vector column"))?;
        let to = knn.next_slot.saturating_add(self.slice_size);
        let t = Instant::now();
        let filter = plan.query.filter.as_ref();
        let mut scanned = 0u64;
        let (mut checked, mut passed) = (0u64, 0u64);
        for (key, vector) in store.live_slots(knn.next_slot, to) {
            self.check_deadline_at(scanned as usize)?;
            scanned += 1;
            let Some(rank) = metric.rank(&knn.query, vector) else {
                continue;
            };
            if knn.best.len() == knn.k {
                match knn.best.peek() {
                    Some(worst) if worst.cmp_to(rank, key) == Ordering::Greater => {}
                    _ => continue,
                }
            }
            let Some(row) = table.row_by_key(key) else {
                continue;
            };
            if let Some(f) = filter {
                checked += 1;
                if truth(&*f.eval(row, &self.params).map_err(eval_err)?).map_err(eval_err)?
                    != Some(true)
                {
                    continue;
                }
                passed += 1;
            }
            let (output, bytes) = self.project(row)?;
            self.hold(bytes)?;
            knn.best.push(Candidate {
                rank,
                key: key.clone(),
                output,
                bytes,
            });
            if knn.best.len() > knn.k {
                if let Some(out) = knn.best.pop() {
                    self.release(out.bytes);
                }
            }
        }
        knn.next_slot = to.min(store.slots());
        self.stats.access.elapsed += t.elapsed();
        self.stats.access.rows_in += scanned;
        self.stats.filter.rows_in += checked;
        self.stats.filter.rows_out += passed;
        if knn.next_slot >= store.slots() {
            let best = std::mem::take(&mut knn.best).into_sorted_vec();
            self.stats.access.rows_out = best.len() as u64;
            self.output = best.into_iter().map(|c| (Vec::new(), c.output)).collect();
        }
        Ok(())
    }

    /// The projection of `row` and its size. Evaluation borrows columns and
    /// parameters, so a projection that would copy a huge value many times is refused
    /// before the copy, not after.
    fn project(&self, row: &[Value]) -> Result<(Vec<Value>, usize), QueryError> {
        self.materialize(self.plan.query.projection.iter(), row)
    }

    fn sort_keys(&self, row: &[Value]) -> Result<(Vec<Value>, usize), QueryError> {
        self.materialize(self.plan.query.order_by.iter().map(|k| &k.expr), row)
    }

    /// Evaluates `exprs` over `row`; copies them only if they fit the memory budget.
    fn materialize<'e>(
        &self,
        exprs: impl Iterator<Item = &'e Expr>,
        row: &[Value],
    ) -> Result<(Vec<Value>, usize), QueryError> {
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
        if let Some(f) = &self.plan.query.filter {
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
                        .eval(row, params)
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

    #[expect(
        clippy::expect_used,
        reason = "only an aggregating plan has groups, and only it reaches these paths"
    )]
    fn aggregate(&mut self, batch: &[&Row]) -> Result<(), QueryError> {
        let plan = Rc::clone(&self.plan);
        let agg = plan
            .query
            .aggregation
            .as_ref()
            .expect("an aggregating plan");
        let mut key_bytes = Vec::new();
        for (i, row) in batch.iter().enumerate() {
            self.check_deadline_at(i)?;
            let (keys, keys_size) = self.materialize(agg.group_by.iter(), row)?;
            group_key(&keys, &mut key_bytes);
            let known = self
                .groups
                .as_ref()
                .and_then(|g| g.index.get(&key_bytes).copied());
            if known.is_none() {
                let states = agg.aggregates.len() * std::mem::size_of::<AggState>();
                self.hold(2 * key_bytes.len() + keys_size + states)?;
            }
            let groups = self.groups.as_mut().expect("an aggregating plan");
            let slot = match known {
                Some(slot) => slot,
                None => {
                    groups.index.insert(key_bytes.clone(), groups.groups.len());
                    groups
                        .groups
                        .push((keys, agg.aggregates.iter().map(AggState::new).collect()));
                    groups.groups.len() - 1
                }
            };
            let states = &mut groups.groups[slot].1;
            let mut kept = 0isize;
            for (state, a) in states.iter_mut().zip(&agg.aggregates) {
                kept += match &a.arg {
                    None => state.add(None),
                    Some(e) => state.add(Some(&*e.eval(row, &self.params).map_err(eval_err)?)),
                }
                .map_err(eval_err)?;
            }
            // MIN and MAX keep a copy of their best value: its size is held too.
            match kept {
                grew if grew > 0 => self.hold(grew.unsigned_abs())?,
                shrank => self.release(shrank.unsigned_abs()),
            }
        }
        Ok(())
    }

    /// One row (a table row, or an aggregated row) into the output.
    fn emit(&mut self, row: &[Value]) -> Result<(), QueryError> {
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
        let (keys, key_bytes) = self.sort_keys(row)?;
        let (out, out_bytes) = self.project(row)?;
        self.held_bytes += key_bytes + out_bytes;
        self.output.push((keys, out));
        let keep = self.limit.map(|l| l.saturating_add(self.offset));
        let crowded = self.held_bytes > self.limits.max_memory_bytes / 2;
        match keep {
            Some(keep)
                if self.output.len() >= keep.saturating_mul(2).max(1024)
                    || (crowded && self.output.len() > keep) =>
            {
                self.sort_output();
                self.output.truncate(keep);
                self.held_bytes = self
                    .output
                    .iter()
                    .map(|(k, o)| values_bytes(k) + values_bytes(o))
                    .sum();
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

    fn sort_output(&mut self) {
        let keys: &[SortKey] = &self.plan.query.order_by;
        self.output.sort_by(|a, b| {
            for ((x, y), k) in a.0.iter().zip(&b.0).zip(keys) {
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
        });
    }

    /// Aggregation output, HAVING, ORDER BY, OFFSET/LIMIT: the rows of the answer.
    #[expect(
        clippy::expect_used,
        reason = "only an aggregating plan has groups, and only it reaches these paths"
    )]
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
        if let Some(groups) = self.groups.take() {
            let agg = self
                .plan
                .query
                .aggregation
                .clone()
                .expect("an aggregating plan");
            let t = Instant::now();
            let mut rows: Vec<Vec<Value>> = groups
                .groups
                .into_iter()
                .map(|(mut keys, states)| {
                    keys.extend(states.iter().map(AggState::result));
                    keys
                })
                .collect();
            if rows.is_empty() && agg.group_by.is_empty() {
                rows.push(
                    agg.aggregates
                        .iter()
                        .map(|a| AggState::new(a).result())
                        .collect(),
                );
            }
            self.stats.aggregate.rows_out = rows.len() as u64;
            self.stats.aggregate.elapsed += t.elapsed();
            for (i, row) in rows.into_iter().enumerate() {
                self.check_deadline_at(i)?;
                if let Some(h) = &agg.having {
                    self.stats.having.rows_in += 1;
                    let keep =
                        truth(&*h.eval(&row, &self.params).map_err(eval_err)?).map_err(eval_err)?;
                    if keep != Some(true) {
                        continue;
                    }
                    self.stats.having.rows_out += 1;
                }
                // Aggregated rows go through ORDER BY and OFFSET/LIMIT like table rows
                // (`groups` is taken, so `emit` no longer sees an aggregating query).
                self.emit(&row)?;
            }
        }
        if !self.streams() && self.plan.order != OrderBy::Knn {
            self.check_deadline()?;
            let t = Instant::now();
            self.sort_output();
            self.stats.order.elapsed += t.elapsed();
            self.stats.order.rows_out = self.output.len() as u64;
        }
        if !self.streams() {
            let rows_in = self.output.len();
            let skip = self.offset.min(rows_in);
            self.output.drain(..skip);
            if let Some(l) = self.limit {
                self.output.truncate(l);
            }
            self.stats.limit.rows_in = rows_in as u64;
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

    /// Asks for `EXPLAIN ANALYZE` output whatever the statement said (`?explain=true`).
    pub fn analyze(&mut self) {
        if self.plan.query.explain == ExplainMode::Run {
            let mut plan = (*self.plan).clone();
            plan.query.explain = ExplainMode::Analyze;
            self.plan = Rc::new(plan);
        }
    }

    /// The plan as a tree, root (projection) first, with per-stage figures if run.
    fn plan_tree(&self, cached: bool, ran: bool) -> serde_json::Value {
        let q = &self.plan.query;
        let s = &self.stats;
        let names = &q.row_names;
        let out_names = &q.output_row_names;
        let figures = |stage: &Stage| {
            if ran {
                json!({
                    "rows_in": stage.rows_in,
                    "rows_out": stage.rows_out,
                    "elapsed_us": stage.elapsed.as_micros() as u64,
                })
            } else {
                json!({})
            }
        };
        let node = |name: &str, detail: String, stage: &Stage| {
            let mut n = json!({"stage": name, "detail": detail});
            if let (Some(obj), serde_json::Value::Object(f)) = (n.as_object_mut(), figures(stage)) {
                obj.extend(f);
            }
            n
        };
        let mut stages = Vec::new();
        let (access_name, access_stage) = match &self.plan.access {
            Access::Knn { .. } => ("knn", s.access),
            Access::Keys { .. } => (
                "scan",
                Stage {
                    rows_in: s.access.rows_out,
                    ..s.access
                },
            ),
        };
        stages.push(node(
            access_name,
            self.plan.access_detail.clone(),
            &access_stage,
        ));
        if let Some(f) = &q.filter {
            stages.push(node("filter", f.render(names), &s.filter));
        }
        if let Some(agg) = &q.aggregation {
            let keys: Vec<String> = agg.group_by.iter().map(|e| e.render(names)).collect();
            let aggs: Vec<String> = out_names[agg.group_by.len()..].to_vec();
            stages.push(node(
                "aggregate",
                format!(
                    "hash aggregate{}: {}",
                    if keys.is_empty() {
                        String::new()
                    } else {
                        format!(" by {}", keys.join(", "))
                    },
                    aggs.join(", ")
                ),
                &Stage {
                    rows_in: s.aggregate.rows_in,
                    ..s.aggregate
                },
            ));
            if let Some(h) = &agg.having {
                stages.push(node("having", h.render(out_names), &s.having));
            }
        }
        let order_detail = || {
            q.order_by
                .iter()
                .map(|k| {
                    format!(
                        "{}{}{}",
                        k.expr.render(out_names),
                        if k.desc { " DESC" } else { "" },
                        if k.nulls_first == k.desc {
                            if k.nulls_first {
                                " NULLS FIRST"
                            } else {
                                " NULLS LAST"
                            }
                        } else {
                            ""
                        }
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self.plan.order {
            OrderBy::Sort => {
                let (name, how) = match self.limit {
                    Some(l) => (
                        "top_k",
                        format!("keep the first {} by ", l.saturating_add(self.offset)),
                    ),
                    None => ("sort", "sort by ".to_string()),
                };
                stages.push(node(name, format!("{how}{}", order_detail()), &s.order));
            }
            OrderBy::ByAccess => stages.push(node(
                "order",
                format!("{}: already in this order from the scan", order_detail()),
                &Stage::default(),
            )),
            OrderBy::Knn | OrderBy::Unordered => {}
        }
        if q.limit.is_some() || q.offset.is_some() {
            stages.push(node(
                "limit",
                format!(
                    "offset {}, limit {}",
                    self.offset,
                    self.limit.map_or("all".to_string(), |l| l.to_string())
                ),
                &s.limit,
            ));
        }
        let projected: Vec<String> = q
            .projection
            .iter()
            .zip(&q.output_names)
            .map(|(e, n)| {
                let r = e.render(out_names);
                if r == *n {
                    r
                } else {
                    format!("{r} AS {n}")
                }
            })
            .collect();
        stages.push(node("project", projected.join(", "), &s.project));
        // Nest: each stage's input is the one before it.
        let mut tree = None;
        for mut stage in stages {
            if let (Some(child), Some(obj)) = (tree.take(), stage.as_object_mut()) {
                obj.insert("input".to_string(), child);
            }
            tree = Some(stage);
        }
        json!({
            "cached": cached,
            "normalized_sql": self.plan.normalized,
            "slices": s.slices,
            "elapsed_us": self.started.elapsed().as_micros() as u64,
            "root": tree,
        })
    }
}

/// One end of a key range: a bound key, or (none) everything under the prefix.
fn key_bound<'a>(
    bound: &'a Option<(Vec<Value>, bool)>,
    prefix: &'a [Value],
) -> KeyBound<&'a [Value]> {
    match bound {
        Some((k, true)) => KeyBound::Included(k.as_slice()),
        Some((k, false)) => KeyBound::Excluded(k.as_slice()),
        None if prefix.is_empty() => KeyBound::Unbounded,
        None => KeyBound::Included(prefix),
    }
}

/// A bound value converted to a key column's type.
enum KeyValue {
    Exact(Value),
    /// Never equal to anything: the range is empty.
    Null,
    /// Not representable in the column's type: the bound is dropped (the filter
    /// still decides).
    Mismatch,
}

/// Converts a bound to a key column's type. A value that cannot even be compared with
/// the column's values (text against int) is the error every row would give.
fn as_key(v: Value, ty: ColumnType) -> Result<KeyValue, QueryError> {
    let probe = match ty {
        ColumnType::Int => Value::Int(0),
        ColumnType::Float => Value::Float(0.0),
        ColumnType::Text => Value::Text(String::new()),
        ColumnType::Bool => Value::Bool(false),
        _ => Value::Null,
    };
    compare(&probe, &v).map_err(eval_err)?;
    Ok(match (v, ty) {
        (Value::Null, _) => KeyValue::Null,
        (Value::Int(i), ColumnType::Int) => KeyValue::Exact(Value::Int(i)),
        (Value::Float(f), ColumnType::Int) if f.fract() == 0.0 && f.abs() < 9.0e15 => {
            KeyValue::Exact(Value::Int(f as i64))
        }
        (Value::Float(f), ColumnType::Float) => KeyValue::Exact(Value::Float(f)),
        (Value::Int(i), ColumnType::Float) if i.unsigned_abs() < (1 << 53) => {
            KeyValue::Exact(Value::Float(i as f64))
        }
        (Value::Text(s), ColumnType::Text) => KeyValue::Exact(Value::Text(s)),
        (Value::Bool(b), ColumnType::Bool) => KeyValue::Exact(Value::Bool(b)),
        _ => KeyValue::Mismatch,
    })
}
