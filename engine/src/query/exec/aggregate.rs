//! Aggregation: per-group running states (`count`, `sum`, `avg`, `min`, `max`) keyed
//! by the group's values, fed a slice of rows at a time; then the groups, turned into
//! rows (HAVING, then ORDER BY or LIMIT), also a slice at a time: a million groups
//! would otherwise hold the shard for their whole pass.

use super::*;

/// Running state of one aggregate over one group.
#[derive(Debug, Clone)]
pub(super) enum AggState {
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
    pub(super) fn new(a: &Aggregate) -> Self {
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
                // As `*` does: an infinite sum has no JSON number to answer with.
                if *is_float && !float.is_finite() {
                    return Err("float overflow in sum".into());
                }
            }
            AggState::Avg { sum, n } => {
                numeric("avg")?;
                *sum += as_f64(v);
                *n += 1;
                if !sum.is_finite() {
                    return Err("float overflow in avg".into());
                }
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

    pub(super) fn result(&self) -> Value {
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
pub(super) struct Groups {
    index: AHashMap<Vec<u8>, usize>,
    pub(super) groups: Vec<(Vec<Value>, Vec<AggState>)>,
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

impl Execution {
    #[expect(
        clippy::expect_used,
        reason = "only an aggregating plan has groups, and only it reaches these paths"
    )]
    pub(super) fn aggregate(&mut self, batch: &[&Row]) -> Result<(), QueryError> {
        let plan = Rc::clone(&self.plan);
        let agg = plan
            .query
            .aggregation
            .as_ref()
            .expect("an aggregating plan");
        let mut key_bytes = Vec::new();
        for (i, row) in batch.iter().enumerate() {
            self.check_deadline_at(i)?;
            let (keys, keys_size) = self.materialize(agg.group_by.iter(), *row)?;
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
                    Some(e) => state.add(Some(&*e.eval(*row, &self.params).map_err(eval_err)?)),
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
}

impl Execution {
    /// The scan is over: the groups become the rows [`Execution::group_slice`] emits.
    /// Without GROUP BY there is one group even when no row matched.
    pub(super) fn close_groups(&mut self, groups: Groups) -> Source {
        let mut groups = groups.groups;
        if groups.is_empty() {
            if let Some(agg) = self.plan.query.aggregation.as_ref() {
                if agg.group_by.is_empty() {
                    groups.push((
                        Vec::new(),
                        agg.aggregates.iter().map(AggState::new).collect(),
                    ));
                }
            }
        }
        self.stats.aggregate.rows_out = groups.len() as u64;
        Source::Groups(groups.into_iter())
    }

    /// Emits one slice of the groups as rows; returns whether none is left (or LIMIT
    /// has what it wants of unordered groups). `groups` is taken by now, so `emit`
    /// treats the rows as a plain query's.
    pub(super) fn group_slice(
        &mut self,
        mut groups: std::vec::IntoIter<(Vec<Value>, Vec<AggState>)>,
    ) -> Result<bool, QueryError> {
        let plan = Rc::clone(&self.plan);
        let having = plan
            .query
            .aggregation
            .as_ref()
            .and_then(|a| a.having.as_ref());
        let started = Instant::now();
        self.stats.slices += 1;
        for i in 0..self.slice_size {
            if self.output_full() {
                return Ok(true);
            }
            let Some((mut row, states)) = groups.next() else {
                return Ok(true);
            };
            self.check_deadline_at(i)?;
            row.extend(states.iter().map(AggState::result));
            if let Some(h) = having {
                self.stats.having.rows_in += 1;
                let keep = truth(&*h.eval(row.as_slice(), &self.params).map_err(eval_err)?)
                    .map_err(eval_err)?;
                if keep != Some(true) {
                    continue;
                }
                self.stats.having.rows_out += 1;
            }
            self.emit(row.as_slice())?;
        }
        self.slice_size = next_slice_size(self.slice_size, started.elapsed(), SLICE_ROWS);
        self.check_deadline()?;
        if groups.len() == 0 {
            return Ok(true);
        }
        self.source = Source::Groups(groups);
        Ok(false)
    }
}
