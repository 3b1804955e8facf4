//! Idempotency keys: the first result of a write batch sent with a key is kept, and a
//! repeat with the same key and the same body gets that result again without writing
//! anything; a repeat with a different body is a conflict.
//!
//! The store is part of a tenant's state: updated by `apply` (live and in replay alike)
//! and saved in checkpoints, so a repeat is recognised across restarts. Retention is
//! bounded by [`MAX_KEYS_PER_TENANT`] and [`RETENTION_US`], measured in commit time from
//! the log (not wall time), so replay evicts exactly what the live shard evicted.

use std::collections::{HashMap, VecDeque};

use oc_io::{Lsn, TimestampMicros};

use crate::table::BatchOutcome;

/// Keys kept per tenant; the oldest is evicted beyond this.
pub const MAX_KEYS_PER_TENANT: usize = 10_000;
/// How long a key is kept, in microseconds of commit time (24 hours).
pub const RETENTION_US: u64 = 24 * 3600 * 1_000_000;
/// Longest idempotency key, in bytes.
pub const MAX_KEY_BYTES: usize = 128;

/// The remembered first result of a keyed write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Remembered {
    /// Hash of the request body (table and row writes), to detect a different body.
    pub request_hash: u64,
    pub lsn: Lsn,
    pub outcome: BatchOutcome,
    pub committed: TimestampMicros,
}

/// The keys of one tenant, oldest first.
#[derive(Debug, Clone, Default)]
pub struct IdempotencyStore {
    by_key: HashMap<String, Remembered, ahash::RandomState>,
    order: VecDeque<String>,
}

impl IdempotencyStore {
    pub fn get(&self, key: &str) -> Option<&Remembered> {
        self.by_key.get(key)
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// Remembers a first result, then evicts by count and by age relative to it.
    #[expect(
        clippy::expect_used,
        reason = "the order queue holds every remembered key, so it is non-empty when the map is full"
    )]
    pub fn remember(&mut self, key: String, entry: Remembered) {
        let now = entry.committed.0;
        if self.by_key.insert(key.clone(), entry).is_none() {
            self.order.push_back(key);
        }
        while let Some(oldest) = self.order.front() {
            let expired = self
                .by_key
                .get(oldest)
                .is_some_and(|e| now.saturating_sub(e.committed.0) > RETENTION_US);
            if self.order.len() <= MAX_KEYS_PER_TENANT && !expired {
                break;
            }
            let oldest = self.order.pop_front().expect("front exists");
            self.by_key.remove(&oldest);
        }
    }

    /// Every entry, oldest first (for checkpoints).
    pub fn entries(&self) -> impl Iterator<Item = (&str, &Remembered)> {
        self.order.iter().map(|k| (k.as_str(), &self.by_key[k]))
    }
}

/// A stable 64-bit hash (FNV-1a) of a request body: the same bytes give the same hash
/// in every process and version, which a remembered hash across restarts needs.
pub fn request_hash(parts: &[&[u8]]) -> u64 {
    parts.iter().fold(FNV_OFFSET, |h, part| {
        hash_part(h, std::slice::from_ref(part))
    })
}

/// [`request_hash`] of one part given in pieces (their concatenation), without
/// copying them together.
pub fn request_hash_joined(pieces: &[&[u8]]) -> u64 {
    hash_part(FNV_OFFSET, pieces)
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// Folds one part (its length, then its bytes) into the hash.
fn hash_part(mut h: u64, pieces: &[&[u8]]) -> u64 {
    let len: usize = pieces.iter().map(|p| p.len()).sum();
    let bytes = pieces.iter().flat_map(|p| p.iter());
    for &b in (len as u64).to_le_bytes().iter().chain(bytes) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(ts: u64) -> Remembered {
        Remembered {
            request_hash: 1,
            lsn: Lsn(ts),
            outcome: BatchOutcome::default(),
            committed: TimestampMicros(ts),
        }
    }

    #[test]
    fn the_oldest_keys_are_evicted_beyond_the_count_limit() {
        let mut store = IdempotencyStore::default();
        for i in 0..MAX_KEYS_PER_TENANT as u64 + 5 {
            store.remember(format!("k{i}"), entry(1_000 + i));
        }
        assert_eq!(store.len(), MAX_KEYS_PER_TENANT);
        assert!(store.get("k4").is_none());
        assert!(store.get("k5").is_some());
    }

    #[test]
    fn keys_older_than_the_retention_are_evicted_by_commit_time() {
        let mut store = IdempotencyStore::default();
        store.remember("old".into(), entry(1));
        store.remember("mid".into(), entry(RETENTION_US));
        store.remember("new".into(), entry(RETENTION_US + 2));
        assert!(store.get("old").is_none(), "older than 24 h of commit time");
        assert!(store.get("mid").is_some() && store.get("new").is_some());
        assert_eq!(
            store.entries().map(|(k, _)| k).collect::<Vec<_>>(),
            ["mid", "new"]
        );
    }

    #[test]
    fn request_hashes_are_stable_and_separate_parts() {
        assert_eq!(request_hash(&[b"ab", b"c"]), request_hash(&[b"ab", b"c"]));
        assert_ne!(request_hash(&[b"ab", b"c"]), request_hash(&[b"a", b"bc"]));
        // Golden value (computed independently): the hash must never change.
        assert_eq!(request_hash(&[b"items"]), 0xf0a89cd0503361d4);
    }
}
