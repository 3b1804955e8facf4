//! Access paths: where a query's rows come from (key ranges over the primary key or an
//! index, a full scan, or an exact kNN scan over a vector column), opened from the
//! plan's bounds and read a slice at a time.

use super::*;
use crate::row::ValueRef;
use crate::table::ScanTarget;
use crate::vectors::LeFloats;

pub(super) enum Source {
    NotStarted,
    Ranges(VecDeque<RangeScan>),
    Knn(Box<KnnScan>),
    /// Every row is in: the groups left to turn into rows of the answer.
    Groups(std::vec::IntoIter<(Vec<Value>, Vec<AggState>)>),
    /// ORDER BY's rows being cut (LIMIT, OFFSET), a slice at a time.
    Cutting(Box<select::Cut>),
    Done,
}

pub(super) struct KnnScan {
    pub(super) query: Vec<f32>,
    /// Every row in primary-key order: a scan that yields and resumes after the last
    /// key it read sees every row that exists for its whole duration exactly once.
    pub(super) rows: RangeScan,
    pub(super) finished: bool,
    pub(super) k: usize,
    pub(super) best: BinaryHeap<Candidate>,
}

/// How far ahead of the row it ranks a kNN scan asks for a row's memory.
const PREFETCH_ROWS_AHEAD: usize = 8;
/// ...and how much of it (the CPU's own prefetcher follows a longer row).
const PREFETCH_BYTES: usize = 1024;

/// A kNN candidate; the heap's top is the worst kept (largest distance, then key).
pub(super) struct Candidate {
    rank: f64,
    key: Key,
    output: Vec<Value>,
    /// What `output` is charged to the memory budget.
    bytes: usize,
}

impl Candidate {
    fn cmp_to(&self, rank: f64, key: &Key) -> Ordering {
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

impl Execution {
    /// Evaluates the access path's bounds and opens its scans.
    pub(super) fn start(&self, table: &Table) -> Result<Source, QueryError> {
        if self.limit == Some(0) {
            return Ok(Source::Done);
        }
        match &self.plan.access {
            Access::Knn { query, column, .. } => {
                let Some(ColumnType::Vector(dim)) =
                    table.schema().columns.get(*column).map(|c| c.ty)
                else {
                    return Err(QueryError::eval("kNN needs a vector column"));
                };
                let value = query.eval(NO_COLUMNS, &self.params).map_err(eval_err)?;
                let Some(query) = as_vector(&value).map_err(eval_err)? else {
                    return Err(QueryError::eval(
                        "the kNN query vector is NULL; pass a vector (a JSON array of numbers)",
                    ));
                };
                let probe = vec![0.0f32; dim as usize];
                check_dims(&probe, &query).map_err(eval_err)?;
                let k = self.offset.saturating_add(self.limit.unwrap_or(usize::MAX));
                Ok(Source::Knn(Box::new(KnnScan {
                    query: query.into_owned(),
                    rows: table.range_scan(
                        ScanTarget::Primary,
                        KeyBound::Unbounded,
                        KeyBound::Unbounded,
                    ),
                    finished: false,
                    k,
                    best: BinaryHeap::with_capacity(k.min(SLICE_KNN_ROWS) + 1),
                })))
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
                    Ok(e.eval(NO_COLUMNS, &self.params)
                        .map_err(eval_err)?
                        .into_owned())
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

    pub(super) fn knn_slice(&mut self, table: &Table, knn: &mut KnnScan) -> Result<(), QueryError> {
        let plan = Rc::clone(&self.plan);
        let Access::Knn { column, metric, .. } = &plan.access else {
            unreachable!("a kNN source comes from a kNN plan")
        };
        let t = Instant::now();
        let mut rows = Vec::with_capacity(self.slice_size);
        knn.finished = table.next_rows(&mut knn.rows, self.slice_size, &mut rows);
        let primary_key = &table.schema().primary_key;
        let own_filter = self.filter.clone();
        let filter = own_filter.as_deref().or(plan.query.filter.as_ref());
        let (mut checked, mut passed) = (0u64, 0u64);
        for (n, row) in rows.iter().enumerate() {
            self.check_deadline_at(n)?;
            // Each row is its own allocation: ask for a later one's lines while this
            // one is ranked, so their misses overlap.
            if let Some(ahead) = rows.get(n + PREFETCH_ROWS_AHEAD) {
                ahead.prefetch(PREFETCH_BYTES);
            }
            let ValueRef::Vector(bytes) = row.get(*column) else {
                continue; // NULL: no distance
            };
            let Some(rank) = metric.rank(&knn.query, &LeFloats(bytes)) else {
                continue;
            };
            // Keys are built only for rows that may enter the heap.
            let key = match knn.best.peek() {
                Some(worst) if knn.best.len() == knn.k => match worst.rank.total_cmp(&rank) {
                    Ordering::Less => continue,
                    Ordering::Greater => row.tree_key(primary_key),
                    Ordering::Equal => {
                        let key = row.tree_key(primary_key);
                        if worst.key <= key {
                            continue;
                        }
                        key
                    }
                },
                _ => row.tree_key(primary_key),
            };
            if let Some(f) = filter {
                checked += 1;
                if truth(&*f.eval(*row, &self.params).map_err(eval_err)?).map_err(eval_err)?
                    != Some(true)
                {
                    continue;
                }
                passed += 1;
            }
            let (output, bytes) = self.project(*row)?;
            self.hold(bytes)?;
            knn.best.push(Candidate {
                rank,
                key,
                output,
                bytes,
            });
            if knn.best.len() > knn.k {
                if let Some(out) = knn.best.pop() {
                    self.release(out.bytes);
                }
            }
        }
        self.stats.access.elapsed += t.elapsed();
        self.stats.access.rows_in += rows.len() as u64;
        self.stats.filter.rows_in += checked;
        self.stats.filter.rows_out += passed;
        if knn.finished {
            let best = std::mem::take(&mut knn.best).into_sorted_vec();
            self.stats.access.rows_out = best.len() as u64;
            self.output = best.into_iter().map(|c| (Vec::new(), c.output)).collect();
        }
        Ok(())
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
