//! The plan cache of one shard: normalized text → plan, per tenant and schema stamp,
//! least recently used evicted first. A schema change moves the tenant to a new stamp
//! (the LSN of the change), so plans made against the old schema are never used again
//! and age out.

use std::num::NonZeroUsize;
use std::rc::Rc;

use lru::LruCache;

use super::plan::Prepared;
use crate::tenant_id::TenantId;

/// Plans one shard keeps.
pub const PLAN_CACHE_ENTRIES: usize = 4096;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlanCacheStats {
    pub hits: u64,
    pub misses: u64,
    pub entries: usize,
    pub evictions: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    tenant: TenantId,
    schema_stamp: u64,
    text: String,
}

pub struct PlanCache {
    plans: LruCache<CacheKey, Rc<Prepared>>,
    stats: PlanCacheStats,
}

impl PlanCache {
    pub fn new(entries: usize) -> Self {
        PlanCache {
            plans: LruCache::new(NonZeroUsize::new(entries.max(1)).expect("at least one")),
            stats: PlanCacheStats::default(),
        }
    }

    /// The cached plan, or the one `make` builds (cached if it succeeds); and whether
    /// it came from the cache.
    pub fn get_or_prepare<E>(
        &mut self,
        tenant: &TenantId,
        schema_stamp: u64,
        text: &str,
        make: impl FnOnce() -> Result<Prepared, E>,
    ) -> Result<(Rc<Prepared>, bool), E> {
        let key = CacheKey {
            tenant: tenant.clone(),
            schema_stamp,
            text: text.to_string(),
        };
        if let Some(plan) = self.plans.get(&key) {
            self.stats.hits += 1;
            return Ok((Rc::clone(plan), true));
        }
        self.stats.misses += 1;
        let plan = Rc::new(make()?);
        if self.plans.push(key, Rc::clone(&plan)).is_some() {
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
