//! ORDER BY's cuts a bounded amount of work at a time. With LIMIT the rows held are
//! cut to the ones that can still be in the answer, and at the end OFFSET's rows go:
//! each cut is a selection over every row held (`OFFSET 150000` holds 150,100 rows),
//! which done at once held the shard for tens of milliseconds. A [`Select`] does a
//! quickselect's partitioning a few thousand comparisons per slice instead, and the
//! rows cut off are freed on the reclaim thread.

use std::hash::{BuildHasher, Hasher};

use super::*;

/// Comparisons a selection makes per slice: about a millisecond of two-key rows.
const COMPARISONS_PER_SLICE: usize = 32_768;
/// Ranges at most this long are selected at once (a few thousand comparisons).
const SELECT_AT_ONCE: usize = 2_048;
/// Rows held at most for a cut while the scan runs to be made at once, in the middle
/// of a slice: it costs a fraction of a slice, and the rows the slice goes on to add
/// before a deferred cut could take a query of large rows past its memory limit.
pub(super) const CUT_AT_ONCE_ROWS: usize = 8_192;

/// A selection of the `nth` row of a vector in answer order, resumable: when done the
/// row at `nth` is the one a sort would put there, the rows before it sort before it
/// and the rows after it after (as `select_nth_unstable_by` leaves them). The rows'
/// sort keys end with their arrival number, so no two are equal and a Lomuto
/// partition stays linear; pivots are random, so no order of rows a client can choose
/// makes it quadratic.
#[derive(Debug)]
pub(super) struct Select {
    nth: usize,
    /// The range holding position `nth` that is still unordered.
    lo: usize,
    hi: usize,
    /// The partition of `lo..hi` under way: the pivot waits at `hi - 1`, rows before
    /// `store` sort before it, rows from `store` to `next` after it.
    partition: Option<(usize, usize)>,
    random: std::collections::hash_map::DefaultHasher,
}

impl Select {
    pub(super) fn new(nth: usize, len: usize) -> Self {
        Select {
            nth,
            lo: 0,
            hi: len,
            partition: None,
            random: std::collections::hash_map::RandomState::new().build_hasher(),
        }
    }

    fn random_below(&mut self, n: usize) -> usize {
        self.random.write_usize(n);
        (self.random.finish() % n as u64) as usize
    }

    /// Goes on with the selection over `rows` (the same vector each time) for at most
    /// `*budget` comparisons, taking them from it; true once done.
    pub(super) fn run(
        &mut self,
        rows: &mut [OutRow],
        keys: &[SortKey],
        budget: &mut usize,
    ) -> bool {
        let before = |rows: &[OutRow], a: usize, b: usize| {
            answer_order(keys, &rows[a].0, &rows[b].0) == Ordering::Less
        };
        loop {
            let (lo, hi) = (self.lo, self.hi);
            if hi - lo <= SELECT_AT_ONCE {
                if hi - lo > 1 {
                    rows[lo..hi].select_nth_unstable_by(self.nth - lo, |a, b| {
                        answer_order(keys, &a.0, &b.0)
                    });
                }
                *budget = budget.saturating_sub(hi - lo);
                return true;
            }
            let (mut store, mut next) = match self.partition {
                Some(at) => at,
                None => {
                    let pivot = lo + self.random_below(hi - lo);
                    rows.swap(pivot, hi - 1);
                    (lo, lo)
                }
            };
            let pivot = hi - 1;
            while next < pivot && *budget > 0 {
                if before(rows, next, pivot) {
                    rows.swap(store, next);
                    store += 1;
                }
                next += 1;
                *budget -= 1;
            }
            if next < pivot {
                self.partition = Some((store, next));
                return false;
            }
            rows.swap(store, pivot);
            self.partition = None;
            match self.nth.cmp(&store) {
                Ordering::Less => self.hi = store,
                Ordering::Greater => self.lo = store + 1,
                Ordering::Equal => return true,
            }
        }
    }
}

/// What a cut does once its row is selected.
#[derive(Debug, Clone, Copy)]
pub(super) enum CutStep {
    /// Drops the rows before this position (OFFSET).
    DropBefore(usize),
    /// Keeps this many rows, dropping the rest (LIMIT, with OFFSET's rows in it while
    /// the scan runs); the last kept one bounds the rows that can still matter.
    KeepFirst(usize),
}

/// Cuts under way over an execution's output, then the source that goes on.
pub(super) struct Cut {
    pub(super) steps: VecDeque<CutStep>,
    select: Option<Select>,
    pub(super) then: Source,
}

impl Cut {
    pub(super) fn new(steps: impl IntoIterator<Item = CutStep>, then: Source) -> Box<Self> {
        Box::new(Cut {
            steps: steps.into_iter().collect(),
            select: None,
            then,
        })
    }
}

impl Execution {
    /// Goes on with `cut` for one slice; true once its steps are done (then the source
    /// it interrupted is back).
    pub(super) fn cut_slice(&mut self, mut cut: Box<Cut>) -> bool {
        let mut budget = COMPARISONS_PER_SLICE;
        let plan = Rc::clone(&self.plan);
        let keys: &[SortKey] = &plan.query.order_by;
        let done = loop {
            let Some(&step) = cut.steps.front() else {
                break true;
            };
            let len = self.output.len();
            let nth = match step {
                CutStep::DropBefore(n) if n >= len => {
                    let all = std::mem::take(&mut self.output);
                    self.drop_rows(all);
                    cut.steps.pop_front();
                    continue;
                }
                CutStep::KeepFirst(n) if n >= len => {
                    cut.steps.pop_front();
                    continue;
                }
                CutStep::KeepFirst(0) => {
                    let all = std::mem::take(&mut self.output);
                    self.drop_rows(all);
                    self.top_k = None;
                    cut.steps.pop_front();
                    continue;
                }
                CutStep::DropBefore(n) => n,
                CutStep::KeepFirst(n) => n - 1,
            };
            if budget == 0 {
                break false;
            }
            let select = cut.select.get_or_insert_with(|| Select::new(nth, len));
            if !select.run(&mut self.output, keys, &mut budget) {
                break false;
            }
            cut.select = None;
            cut.steps.pop_front();
            match step {
                CutStep::DropBefore(n) => {
                    let rest = self.output.split_off(n);
                    let before = std::mem::replace(&mut self.output, rest);
                    self.drop_rows(before);
                }
                CutStep::KeepFirst(n) => {
                    let after = self.output.split_off(n);
                    self.drop_rows(after);
                    self.top_k = self
                        .output
                        .last()
                        .map(|(k, _)| (k.clone(), self.held_bytes));
                }
            }
        };
        if done {
            self.source = std::mem::replace(&mut cut.then, Source::Done);
        } else {
            self.source = Source::Cutting(cut);
        }
        done
    }

    /// Keeps the first `keep` rows held, at once, and gives back what the others held.
    pub(super) fn cut_now(&mut self, keep: usize) {
        let then = std::mem::replace(&mut self.source, Source::Done);
        self.run_cut(Cut::new([CutStep::KeepFirst(keep)], then));
        self.settle_dropped(usize::MAX);
    }

    /// Runs `cut` to its end at once.
    pub(super) fn run_cut(&mut self, mut cut: Box<Cut>) {
        while !self.cut_slice(cut) {
            let Source::Cutting(more) = std::mem::replace(&mut self.source, Source::Done) else {
                return;
            };
            cut = more;
        }
    }

    /// Sets `rows` aside to be given back ([`Execution::settle_dropped`]): their bytes
    /// stay held until then, since adding them up walks every row.
    pub(super) fn drop_rows(&mut self, rows: Vec<OutRow>) {
        if !rows.is_empty() {
            self.dropped.0.push(rows);
        }
    }

    /// Gives back what up to `max` of the rows set aside held (from the kept rows'
    /// figure too, which counted them) and frees them on the reclaim thread.
    pub(super) fn settle_dropped(&mut self, max: usize) {
        let mut left = max;
        while left > 0 {
            let Some(rows) = self.dropped.0.last_mut() else {
                return;
            };
            let chunk = rows.split_off(rows.len().saturating_sub(left));
            if rows.is_empty() {
                self.dropped.0.pop();
            }
            left -= chunk.len();
            let bytes: usize = chunk
                .iter()
                .map(|(k, o)| values_bytes(k) + values_bytes(o))
                .sum();
            self.release(bytes);
            if let Some((_, kept)) = &mut self.top_k {
                *kept = kept.saturating_sub(bytes);
            }
            crate::reclaim::later_or_now(chunk);
        }
    }
}

/// Rows a cut dropped whose bytes are not given back yet; freed through the reclaim
/// thread whenever they go (the query ended).
#[derive(Default)]
pub(super) struct Dropped(pub(super) Vec<Vec<OutRow>>);

impl Drop for Dropped {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            crate::reclaim::later_or_now(std::mem::take(&mut self.0));
        }
    }
}

/// Rows set aside by a cut whose bytes a slice adds up and gives back.
pub(super) const SETTLE_ROWS_PER_SLICE: usize = 8_192;

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(values: &[i64]) -> Vec<OutRow> {
        values
            .iter()
            .enumerate()
            .map(|(i, &v)| (vec![Value::Int(v), Value::Int(i as i64)], Vec::new()))
            .collect()
    }

    /// A selection run a few comparisons at a time leaves the vector as one at once
    /// does: the nth row in place, the ones before it smaller, the ones after larger.
    #[test]
    fn a_selection_in_slices_selects_the_nth_row() {
        let keys = [SortKey {
            expr: crate::query::expr::Expr::Column(0),
            desc: false,
            nulls_first: false,
        }];
        let mut random = Select::new(0, 1);
        for (n, len) in [(0, 5000), (4999, 5000), (2500, 5000), (77, 100_000), (0, 1)] {
            // Many ties (values mod 97), ascending, descending and shuffled runs.
            let values: Vec<i64> = (0..len as i64)
                .map(|i| match n % 3 {
                    0 => i % 97,
                    1 => -i,
                    _ => random.random_below(1000) as i64,
                })
                .collect();
            let mut held = rows(&values);
            let mut select = Select::new(n, len);
            let mut slices = 0;
            loop {
                let mut budget = 1000;
                slices += 1;
                if select.run(&mut held, &keys, &mut budget) {
                    break;
                }
            }
            let mut sorted = rows(&values);
            sorted.sort_by(|a, b| answer_order(&keys, &a.0, &b.0));
            assert_eq!(held[n], sorted[n], "row {n} of {len}");
            let order = |a: &OutRow| answer_order(&keys, &a.0, &held[n].0);
            assert!(held[..n].iter().all(|r| order(r) == Ordering::Less));
            assert!(held[n + 1..].iter().all(|r| order(r) == Ordering::Greater));
            if len > 10 * SELECT_AT_ONCE {
                assert!(
                    slices > 10,
                    "{len} rows took {slices} slices of 1000 comparisons"
                );
            }
        }
    }
}
