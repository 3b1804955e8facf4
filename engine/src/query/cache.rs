//! The plan cache of one shard: normalized text → plan, per tenant, schema stamp and
//! count of the caller's own placeholders (`id > 5` and `id > $1` normalize to the same
//! text, but the first plan binds its `$1` from the literal and the second from the
//! caller's params), least recently used evicted first. A schema change moves the tenant to a new stamp
//! (the LSN of the change, and the count of migration starts and ends: a migration
//! changes the shape reads see), so plans made against the old schema are never used
//! again and age out.

use std::num::NonZeroUsize;
use std::rc::Rc;

use lru::LruCache;

use super::normalize::Normalized;
use super::plan::Prepared;
use crate::tenant_id::TenantId;

/// Plans one shard keeps...
pub const PLAN_CACHE_ENTRIES: usize = 4096;
/// ...and the bytes they may take together (estimated by [`plan_cost`]): a 64 KiB
/// query makes a plan hundreds of times bigger than a typical one.
pub const PLAN_CACHE_BYTES: usize = 32 << 20;
/// Bytes of plan counted per byte of normalized text: every token becomes at most a
/// couple of expression nodes of a few dozen bytes each, and the text itself is held
/// twice (the key and the plan's copy).
const PLAN_BYTES_PER_TEXT_BYTE: usize = 18;
/// Bytes of plan counted whatever its text (the plan's fixed parts).
const PLAN_BASE_BYTES: usize = 512;

/// The bytes a plan for `text` is counted as.
fn plan_cost(text: &str) -> usize {
    PLAN_BASE_BYTES + text.len() * PLAN_BYTES_PER_TEXT_BYTE
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlanCacheStats {
    pub hits: u64,
    pub misses: u64,
    pub entries: usize,
    pub evictions: u64,
    /// Estimated bytes of the cached plans.
    pub bytes: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    tenant: TenantId,
    schema_stamp: (u64, u64),
    text: String,
    user_params: usize,
}

pub struct PlanCache {
    plans: LruCache<CacheKey, Rc<Prepared>>,
    max_bytes: usize,
    stats: PlanCacheStats,
}

impl PlanCache {
    #[expect(clippy::expect_used, reason = "entries.max(1) is never zero")]
    pub fn new(entries: usize, max_bytes: usize) -> Self {
        PlanCache {
            plans: LruCache::new(NonZeroUsize::new(entries.max(1)).expect("at least one")),
            max_bytes,
            stats: PlanCacheStats::default(),
        }
    }

    /// The cached plan, or the one `make` builds (cached if it succeeds); and whether
    /// it came from the cache.
    pub fn get_or_prepare<E>(
        &mut self,
        tenant: &TenantId,
        schema_stamp: (u64, u64),
        query: &Normalized,
        make: impl FnOnce() -> Result<Prepared, E>,
    ) -> Result<(Rc<Prepared>, bool), E> {
        let key = CacheKey {
            tenant: tenant.clone(),
            schema_stamp,
            text: query.text.clone(),
            user_params: query.user_params,
        };
        if let Some(plan) = self.plans.get(&key) {
            self.stats.hits += 1;
            return Ok((Rc::clone(plan), true));
        }
        self.stats.misses += 1;
        let plan = Rc::new(make()?);
        let cost = plan_cost(&key.text);
        if cost > self.max_bytes {
            return Ok((plan, false)); // used once, never cached
        }
        while self.stats.bytes + cost > self.max_bytes {
            let Some((old, _)) = self.plans.pop_lru() else {
                break;
            };
            self.stats.bytes -= plan_cost(&old.text);
            self.stats.evictions += 1;
        }
        self.stats.bytes += cost;
        if let Some((old, _)) = self.plans.push(key, Rc::clone(&plan)) {
            self.stats.bytes -= plan_cost(&old.text);
            self.stats.evictions += 1;
        }
        Ok((plan, false))
    }

    pub fn stats(&self) -> PlanCacheStats {
        PlanCacheStats {
            entries: self.plans.len(),
            ..self.stats
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::{normalize, prepare};
    use crate::schema::TableSchema;
    use crate::tenant::Tenant;
    use crate::value::ColumnType;

    #[test]
    fn big_plans_are_evicted_by_bytes_and_oversized_ones_never_cached() {
        let id = TenantId::parse("acme").expect("valid");
        let mut tenant = Tenant::new(id.clone());
        let schema =
            TableSchema::new("t", &[("id", ColumnType::Int, false)], &["id"], &[]).expect("valid");
        tenant.create_table(schema, 1).expect("created");
        let query = |n: usize| {
            let sql = format!("SELECT id FROM t WHERE id IN ({})", vec!["7"; n].join(", "));
            normalize(&sql).expect("normalizes")
        };
        let big = query(1004);
        let budget = 3 * plan_cost(&big.text) + 10;
        let mut cache = PlanCache::new(PLAN_CACHE_ENTRIES, budget);
        for i in 0..5 {
            let q = query(1000 + i);
            let (_, cached) = cache
                .get_or_prepare(&id, (1, 0), &q, || prepare(&tenant, &q))
                .expect("plans");
            assert!(!cached);
        }
        let stats = cache.stats();
        assert_eq!(stats.entries, 3);
        assert_eq!(stats.evictions, 2);
        assert!(stats.bytes <= budget, "{stats:?}");
        let huge = query(12_000);
        assert!(plan_cost(&huge.text) > budget);
        cache
            .get_or_prepare(&id, (1, 0), &huge, || prepare(&tenant, &huge))
            .expect("plans");
        assert_eq!(cache.stats().entries, 3, "an oversized plan is not cached");
    }
}
