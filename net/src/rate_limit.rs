//! Per-API-key rate limits: a token bucket per key, kept on the tenant's owner shard.
//! Every request of a tenant runs there, so the bucket is exact without any sharing
//! between shards.

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::Instant;

use hyper::StatusCode;
use oc_engine::TenantId;

use crate::api::error::ApiError;
use crate::metrics;

/// Requests per second a key may sustain, and the burst it may spend at once.
#[derive(Debug, Clone, Copy)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: f64,
}

struct Bucket {
    tokens: f64,
    refilled: Instant,
}

/// What one key's bucket limits: all its requests, or its operator actions (each an
/// audit log entry, fsynced and kept for the audit retention, refused ones too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Purpose {
    Requests,
    OperatorActions,
}

/// Operator actions one key may take (watch token mints, tables, migrations, and
/// attempts at the admin's actions): one a second, 60 at once.
pub const OPERATOR_ACTIONS: RateLimit = RateLimit {
    per_second: 1.0,
    burst: 60.0,
};

thread_local! {
    static BUCKETS: RefCell<HashMap<(TenantId, String, Purpose), Bucket>> = RefCell::new(HashMap::new());
}

/// Takes one token from the key's bucket or refuses with 429.
pub fn admit(limit: RateLimit, tenant: &TenantId, key_id: &str) -> Result<(), ApiError> {
    take(limit, tenant, key_id, Purpose::Requests).map_err(|()| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!(
                "API key {key_id} is over its rate limit of {} requests/s (burst {}); retry \
                 shortly",
                limit.per_second, limit.burst
            ),
        )
    })
}

/// Takes one token from the key's bucket of operator actions, or refuses with 429
/// (`action` names what was asked).
pub fn admit_operator_action(
    tenant: &TenantId,
    key_id: &str,
    action: &str,
) -> Result<(), ApiError> {
    let limit = OPERATOR_ACTIONS;
    take(limit, tenant, key_id, Purpose::OperatorActions).map_err(|()| {
        let advice = if action == "watch_token.create" {
            ": a watch token opens any number of streams of its tenant until it expires, \
             so mint one and share it, with a longer ttl_s"
        } else {
            ""
        };
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!(
                "API key {key_id} is over its limit of {} operator actions/s (burst {}), \
                 each an audit log entry; {action} was not attempted{advice}",
                limit.per_second, limit.burst
            ),
        )
    })
}

fn take(limit: RateLimit, tenant: &TenantId, key_id: &str, purpose: Purpose) -> Result<(), ()> {
    let now = Instant::now();
    let admitted = BUCKETS.with(|buckets| {
        let mut buckets = buckets.borrow_mut();
        let bucket = buckets
            .entry((tenant.clone(), key_id.to_string(), purpose))
            .or_insert(Bucket {
                tokens: limit.burst,
                refilled: now,
            });
        let elapsed = now.duration_since(bucket.refilled).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * limit.per_second).min(limit.burst);
        bucket.refilled = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    });
    if admitted {
        return Ok(());
    }
    metrics::with_http(|m| m.rate_limit_rejections += 1);
    Err(())
}

/// Forgets a revoked key's bucket, so the map holds only live keys.
pub fn forget(tenant: &TenantId, key_id: &str) {
    BUCKETS.with(|b| {
        b.borrow_mut()
            .retain(|(t, k, _), _| t != tenant || k != key_id)
    });
}

/// Forgets every bucket of a dropped tenant.
pub fn forget_tenant(tenant: &TenantId) {
    BUCKETS.with(|b| b.borrow_mut().retain(|(t, _, _), _| t != tenant));
}
