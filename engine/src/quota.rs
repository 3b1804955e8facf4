//! What one tenant may store, and what the whole process may hold. All data lives in
//! memory, so both are admission checks on writes, made on the owner shard before a
//! batch is logged: a batch that would take a tenant past a quota is refused whole,
//! and while the process's resident memory is over the server's budget every batch
//! that could grow it is refused. Deletes always pass: they are how one gets back
//! under.
//!
//! Both are checked at admission: batches in flight at the same moment may together
//! overshoot a quota by at most what they carry (bounded by the per-tenant in-flight
//! limit times the batch limit).
//!
//! Read queries hold memory too (rows buffered to sort or return, groups), for as
//! long as they run. What they hold together is bounded on its own ([`QueryMemory`]:
//! past the shared bound a query gets 429 `query_memory_busy`), and so is each tenant's
//! part of it (by default half), so one tenant's queries and unread answers cannot
//! refuse every other tenant's reads. What they hold is left out of
//! the resident size that growth of the data is weighed against
//! ([`memory_for_data`]): otherwise any tenant's reads could refuse every tenant's
//! writes. The data then stays within the budget and the queries within their bound on
//! top of it (by default an eighth of the budget). Freed memory that the allocator
//! keeps is handed back to the kernel (`malloc_trim`) while writes are refused, so
//! deleting rows brings them back without a restart.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::error::EngineError;
use crate::tenant::TenantUsage;

/// What one tenant may store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantQuotas {
    pub max_rows: usize,
    /// Bytes of rows as stored (`Value::stored_bytes`), all tables.
    pub max_bytes: usize,
    pub max_vectors: usize,
}

impl Default for TenantQuotas {
    fn default() -> Self {
        TenantQuotas {
            max_rows: 50_000_000,
            max_bytes: 4 << 30,
            max_vectors: 5_000_000,
        }
    }
}

/// How a batch would change a tenant's usage (negative: it frees).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Growth {
    pub rows: i64,
    pub bytes: i64,
    pub vectors: i64,
}

impl Growth {
    /// Whether the batch could take memory (deletes only cannot).
    pub fn grows(&self) -> bool {
        self.rows > 0 || self.bytes > 0 || self.vectors > 0
    }

    /// `growth` of `writes`, taken on their rows as written, plus what a migration
    /// that stores some of them converted (`carried`, see `Migrations::carry`) adds
    /// to those rows.
    pub fn carried(
        mut growth: Growth,
        writes: &[crate::table::RowWrite],
        carried: Option<&[Option<crate::table::Row>]>,
    ) -> Growth {
        let signed = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        for (write, v1) in writes.iter().zip(carried.unwrap_or_default()) {
            if let (crate::table::RowWrite::Upsert(v0), Some(v1)) = (write, v1) {
                let more = signed(v1.stored_bytes()) - signed(v0.stored_bytes());
                growth.bytes = growth.bytes.saturating_add(more);
                growth.vectors += signed(v1.vectors()) - signed(v0.vectors());
            }
        }
        growth
    }
}

impl TenantQuotas {
    /// Refuses a batch that would take `usage` past a quota (a batch that shrinks a
    /// usage already over a lowered quota passes).
    pub fn admit(
        &self,
        tenant: &str,
        usage: &TenantUsage,
        growth: Growth,
    ) -> Result<(), EngineError> {
        for (what, used, grows, limit) in [
            ("rows", usage.rows, growth.rows, self.max_rows),
            ("bytes", usage.bytes, growth.bytes, self.max_bytes),
            ("vectors", usage.vectors, growth.vectors, self.max_vectors),
        ] {
            let after = (used as i64).saturating_add(grows);
            if grows > 0 && after > limit as i64 {
                return Err(EngineError::QuotaExceeded {
                    tenant: tenant.to_string(),
                    what,
                    used,
                    after: after as usize,
                    limit,
                });
            }
        }
        Ok(())
    }
}

/// The process's memory budget and its resident size, sampled off the shards; and what
/// the running queries hold, with the most they may hold together.
struct MemoryBudget {
    limit_bytes: AtomicU64,
    resident_bytes: AtomicU64,
    query_bytes: AtomicU64,
    query_limit_bytes: AtomicU64,
    /// The most one tenant's queries may hold of `query_limit_bytes` (0: no bound).
    tenant_query_limit_bytes: AtomicU64,
}

static MEMORY: MemoryBudget = MemoryBudget {
    limit_bytes: AtomicU64::new(0),
    resident_bytes: AtomicU64::new(0),
    query_bytes: AtomicU64::new(0),
    query_limit_bytes: AtomicU64::new(0),
    tenant_query_limit_bytes: AtomicU64::new(0),
};

/// The share of the memory budget the running queries may hold together on top of it,
/// unless configured.
pub const DEFAULT_QUERY_MEMORY_DIVISOR: u64 = 8;
/// A query takes its share of the shared bound in steps of this many bytes, so that
/// buffering a row does not touch a counter every shard shares; its first step is
/// free, so that many small queries cannot fill the bound with steps they do not use.
const QUERY_MEMORY_STEP: u64 = 1 << 20;
/// How soon freed memory is handed back once writes are refused, and the longest wait
/// between two tries while a try frees almost nothing (the process is full of live
/// data): a trim walks the allocator's free lists under their locks.
const TRIM_FIRST: Duration = Duration::from_secs(1);
const TRIM_MOST: Duration = Duration::from_secs(60);

/// Trims that ran (`oc_memory_trims_total`).
static TRIMS: AtomicU64 = AtomicU64::new(0);

/// Sets the most the running queries may hold together, and the most one tenant's
/// may hold of that (0: no bound of its own).
pub fn set_query_memory_limits(all_bytes: u64, tenant_bytes: u64) {
    MEMORY.query_limit_bytes.store(all_bytes, Ordering::Relaxed);
    MEMORY
        .tenant_query_limit_bytes
        .store(tenant_bytes, Ordering::Relaxed);
}

/// (held by the running queries, the most they may hold together; 0 for none).
pub fn query_memory_usage() -> (u64, u64) {
    (
        MEMORY.query_bytes.load(Ordering::Relaxed),
        MEMORY.query_limit_bytes.load(Ordering::Relaxed),
    )
}

/// What one tenant's running queries and unsent answers hold, shared by its queries
/// and by the answers they leave for the connections (which may drop them on another
/// shard's thread).
#[derive(Debug, Clone, Default)]
pub struct TenantQueryMemory(Arc<AtomicU64>);

impl TenantQueryMemory {
    pub fn held_bytes(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// One query's share of the memory the running queries hold together, and of its
/// tenant's part of it; dropping it gives both back.
#[derive(Debug, Default)]
pub struct QueryMemory {
    taken: u64,
    tenant: Option<TenantQueryMemory>,
}

/// Which bound a query's share cannot grow past.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryMemoryBound {
    /// What all running queries may hold together (`--ask-shared-memory-bytes`).
    AllTenants,
    /// What one tenant's may hold of that (`--ask-tenant-memory-bytes`).
    OneTenant,
}

/// Why a query's share cannot grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryMemoryRefused {
    /// Taking more would pass a bound while other queries hold part of it: (held
    /// under that bound, the bound).
    Busy {
        bound: QueryMemoryBound,
        held_bytes: u64,
        limit_bytes: u64,
    },
    /// The query alone needs more than the whole bound.
    AloneOver {
        bound: QueryMemoryBound,
        limit_bytes: u64,
    },
}

impl QueryMemory {
    /// A share that counts toward `tenant`'s part as well as the whole.
    pub fn for_tenant(tenant: &TenantQueryMemory) -> Self {
        QueryMemory {
            taken: 0,
            tenant: Some(tenant.clone()),
        }
    }

    /// Makes this query's share cover `bytes`: every step past the first, taken or given
    /// back whole.
    pub fn cover(&mut self, bytes: usize) -> Result<(), QueryMemoryRefused> {
        let wanted = (bytes as u64).saturating_sub(QUERY_MEMORY_STEP) / QUERY_MEMORY_STEP
            * QUERY_MEMORY_STEP;
        if wanted <= self.taken {
            if wanted < self.taken {
                self.give_back(self.taken - wanted);
                self.taken = wanted;
            }
            return Ok(());
        }
        let all_limit = MEMORY.query_limit_bytes.load(Ordering::Relaxed);
        let tenant_limit = match &self.tenant {
            Some(_) => MEMORY.tenant_query_limit_bytes.load(Ordering::Relaxed),
            None => 0,
        };
        for (limit, bound) in [
            (all_limit, QueryMemoryBound::AllTenants),
            (tenant_limit, QueryMemoryBound::OneTenant),
        ] {
            if limit > 0 && wanted > limit {
                return Err(QueryMemoryRefused::AloneOver {
                    bound,
                    limit_bytes: limit,
                });
            }
        }
        let more = wanted - self.taken;
        // The tenant's own part first: a tenant at its bound is refused without
        // touching the counter every shard shares.
        if let Some(tenant) = &self.tenant {
            take(&tenant.0, more, tenant_limit, QueryMemoryBound::OneTenant)?;
        }
        if let Err(refused) = take(
            &MEMORY.query_bytes,
            more,
            all_limit,
            QueryMemoryBound::AllTenants,
        ) {
            if let Some(tenant) = &self.tenant {
                tenant.0.fetch_sub(more, Ordering::Relaxed);
            }
            return Err(refused);
        }
        self.taken = wanted;
        Ok(())
    }

    fn give_back(&self, bytes: u64) {
        MEMORY.query_bytes.fetch_sub(bytes, Ordering::Relaxed);
        if let Some(tenant) = &self.tenant {
            tenant.0.fetch_sub(bytes, Ordering::Relaxed);
        }
    }
}

/// Adds `more` to `held` unless that passes `limit` (0: none).
fn take(
    held: &AtomicU64,
    more: u64,
    limit: u64,
    bound: QueryMemoryBound,
) -> Result<(), QueryMemoryRefused> {
    let before = held.fetch_add(more, Ordering::Relaxed);
    if limit == 0 || before + more <= limit {
        return Ok(());
    }
    held.fetch_sub(more, Ordering::Relaxed);
    Err(QueryMemoryRefused::Busy {
        bound,
        held_bytes: before,
        limit_bytes: limit,
    })
}

impl Drop for QueryMemory {
    fn drop(&mut self) {
        self.give_back(self.taken);
    }
}

/// How often the resident size is read from `/proc/self/statm`.
pub const MEMORY_SAMPLE_INTERVAL: Duration = Duration::from_millis(100);
/// The budget when none is configured: this share of the machine's (or the cgroup's)
/// memory, leaving room for the kernel, page cache and allocator slack.
pub const DEFAULT_MEMORY_BUDGET_PERCENT: u64 = 80;

/// Sets the budget (0: [`DEFAULT_MEMORY_BUDGET_PERCENT`] of the memory this process
/// may use), takes a first sample and starts a thread that keeps sampling. Returns the
/// budget in force.
pub fn start_memory_budget(limit_bytes: u64) -> Result<u64, String> {
    let limit = match limit_bytes {
        0 => {
            let total = available_memory_bytes().ok_or(
                "cannot read the machine's memory size (/proc/meminfo); set --memory-budget-bytes",
            )?;
            total / 100 * DEFAULT_MEMORY_BUDGET_PERCENT
        }
        n => n,
    };
    MEMORY.limit_bytes.store(limit, Ordering::Relaxed);
    sample_resident();
    std::thread::Builder::new()
        .name("oc-memory".into())
        .spawn(move || {
            // When the last trim ran, and how long until the next may.
            let mut trimmed: Option<std::time::Instant> = None;
            let mut wait = TRIM_FIRST;
            loop {
                std::thread::sleep(MEMORY_SAMPLE_INTERVAL);
                sample_resident();
                let (_, before) = memory_for_data();
                if before <= limit || trimmed.is_some_and(|at| at.elapsed() < wait) {
                    continue;
                }
                trim_freed_memory();
                trimmed = Some(std::time::Instant::now());
                sample_resident();
                let (_, after) = memory_for_data();
                // Little freed: the memory is live data; try again less often.
                wait = if before.saturating_sub(after) < before / 100 {
                    (wait * 2).min(TRIM_MOST)
                } else {
                    TRIM_FIRST
                };
            }
        })
        .map_err(|e| format!("cannot start the memory sampler: {e}"))?;
    Ok(limit)
}

/// (budget, resident bytes at the last sample); a budget of 0 means none is set.
pub fn memory_usage() -> (u64, u64) {
    (
        MEMORY.limit_bytes.load(Ordering::Relaxed),
        MEMORY.resident_bytes.load(Ordering::Relaxed),
    )
}

/// (budget, resident bytes less what the running queries hold): what growth of the
/// data (writes, streams' buffers, migrations) is weighed against. Queries count no
/// more than they hold (whole steps past their first), so the data passes the budget
/// by at most a step per running query.
pub fn memory_for_data() -> (u64, u64) {
    let (limit, resident) = memory_usage();
    let (queries, _) = query_memory_usage();
    (limit, resident.saturating_sub(queries))
}

/// Trims of freed memory so far.
pub fn memory_trims() -> u64 {
    TRIMS.load(Ordering::Relaxed)
}

/// Refuses a write that could grow memory while the data is over the budget (see
/// [`memory_for_data`]).
pub fn admit_memory(growth: Growth) -> Result<(), EngineError> {
    let (limit, resident) = memory_for_data();
    if limit > 0 && resident > limit && growth.grows() {
        return Err(EngineError::MemoryFull {
            resident_bytes: resident,
            budget_bytes: limit,
        });
    }
    Ok(())
}

/// Hands the pages of freed memory the allocator keeps back to the kernel.
fn trim_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks and releases the allocator's own free memory.
    unsafe {
        libc::malloc_trim(0);
    }
    TRIMS.fetch_add(1, Ordering::Relaxed);
}

fn sample_resident() {
    if let Some(bytes) = resident_bytes() {
        MEMORY.resident_bytes.store(bytes, Ordering::Relaxed);
    }
}

/// Resident set size from `/proc/self/statm` (second field, in pages).
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

/// The smaller of the machine's memory and the cgroup's limit, if any.
fn available_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let total_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    let total = total_kib * 1024;
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    Some(cgroup.map_or(total, |c| c.min(total)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(rows: usize, bytes: usize, vectors: usize) -> TenantUsage {
        TenantUsage {
            rows,
            bytes,
            vectors,
            ..TenantUsage::default()
        }
    }

    #[test]
    fn a_batch_past_a_quota_is_refused_naming_it_and_shrinking_always_passes() {
        let q = TenantQuotas {
            max_rows: 10,
            max_bytes: 1000,
            max_vectors: 2,
        };
        let grow = |rows, bytes, vectors| Growth {
            rows,
            bytes,
            vectors,
        };
        assert!(q.admit("t", &usage(9, 0, 0), grow(1, 10, 0)).is_ok());
        let e = q
            .admit("t", &usage(10, 0, 0), grow(1, 10, 0))
            .expect_err("the 11th row");
        assert!(e.to_string().contains("rows"), "{e}");
        assert!(e.to_string().contains("10"), "{e}");
        assert!(q.admit("t", &usage(5, 990, 0), grow(0, 11, 0)).is_err());
        assert!(q.admit("t", &usage(5, 0, 2), grow(1, 1, 1)).is_err());
        // Over a quota lowered after the fact: deletes and shrinking updates pass.
        assert!(q
            .admit("t", &usage(50, 5000, 9), grow(-1, -100, -1))
            .is_ok());
        assert!(q.admit("t", &usage(50, 5000, 9), grow(0, -1, 0)).is_ok());
    }

    #[test]
    fn the_resident_size_and_the_machine_size_can_be_read() {
        let rss = resident_bytes().expect("statm");
        assert!(rss > 0);
        let total = available_memory_bytes().expect("meminfo");
        assert!(total > rss);
    }
}
