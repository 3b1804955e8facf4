//! Request bodies while they arrive: what a shard holds of them, charged to their
//! caller, and the pace they must keep. A body is buffered whole before it is parsed,
//! so bodies held open (sent slowly, or all but their last byte) pin memory the write
//! path's budget counts and connections the limit counts: one caller's could refuse
//! every tenant's writes (`507 memory_full`) or take every connection.

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_lite::future;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::StatusCode;

use super::error::ApiError;
use super::{ApiLimits, OVER_LIMIT_DRAIN_BYTES};
use crate::auth::Caller;

/// A body's first seconds are not held to `--min-body-bytes-per-s`: a client's first
/// bytes may wait for a slow start or a retransmission.
pub const BODY_RATE_GRACE: Duration = Duration::from_secs(5);

/// Whom a request's body is charged to: its key's tenant, the admin, or anyone (no
/// authentication); set by the dispatcher once the caller is known.
#[derive(Clone)]
pub struct BodyCaller(String);

impl BodyCaller {
    pub fn of(caller: &Caller) -> BodyCaller {
        // Tenant names never hold `<`: none is taken for the admin's or anyone's.
        BodyCaller(match caller {
            Caller::Key(claim) => claim.tenant.as_str().to_string(),
            Caller::Admin => "<admin>".to_string(),
            Caller::Anyone => "<anyone>".to_string(),
        })
    }

    /// The caller the dispatcher set on `req` (anyone when it set none).
    pub fn from<B>(req: &hyper::Request<B>) -> BodyCaller {
        req.extensions()
            .get::<BodyCaller>()
            .cloned()
            .unwrap_or_else(|| BodyCaller::of(&Caller::Anyone))
    }
}

#[derive(Default)]
struct Receiving {
    bytes: usize,
    /// Per caller: bodies being received, and their bytes so far.
    callers: HashMap<String, (usize, usize)>,
}

thread_local! {
    static RECEIVING: RefCell<Receiving> = RefCell::default();
}

/// One body being received on this shard, and the bytes it holds.
pub struct BodyHold {
    caller: String,
    bytes: usize,
}

impl BodyHold {
    /// Counts a body of `caller`'s, or refuses it (429) when the caller already sends
    /// [`ApiLimits::bodies_per_caller`] to this shard.
    pub fn enter(caller: BodyCaller, limits: &ApiLimits) -> Result<BodyHold, ApiError> {
        let caller = caller.0;
        RECEIVING.with(|r| {
            let mut r = r.borrow_mut();
            let (bodies, _) = r.callers.entry(caller.clone()).or_default();
            if *bodies >= limits.bodies_per_caller {
                return Err(ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "tenant_busy",
                    format!(
                        "{} already sends {} request bodies to this server shard at once, its \
                         limit (a quarter of the shard's connections); finish them first",
                        shown(&caller),
                        limits.bodies_per_caller
                    ),
                ));
            }
            *bodies += 1;
            Ok(BodyHold { caller, bytes: 0 })
        })
    }

    /// Takes `n` more bytes from the shard's pool, or refuses: 503 when the pool is
    /// full, 429 when this caller holds half of it.
    pub fn grow(&mut self, n: usize, limits: &ApiLimits) -> Result<(), ApiError> {
        RECEIVING.with(|r| {
            let mut r = r.borrow_mut();
            let pool = limits.body_pool_bytes;
            if r.bytes + n > pool {
                return Err(ApiError::overloaded(format!(
                    "this server shard is receiving {} bytes of request bodies, and {n} more \
                     would pass its limit of {pool} (an eighth of --memory-budget-bytes per \
                     shard); retry shortly",
                    r.bytes
                )));
            }
            let held = r.callers.get(&self.caller).map_or(0, |c| c.1);
            if held + n > pool / 2 {
                return Err(ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "tenant_busy",
                    format!(
                        "{} is sending {held} bytes of request bodies to this server shard, and \
                         {n} more would pass its share of {} (half the shard's limit); finish \
                         them first",
                        shown(&self.caller),
                        pool / 2
                    ),
                ));
            }
            r.bytes += n;
            if let Some(c) = r.callers.get_mut(&self.caller) {
                c.1 += n;
            }
            self.bytes += n;
            Ok(())
        })
    }
}

impl Drop for BodyHold {
    fn drop(&mut self) {
        RECEIVING.with(|r| {
            let mut r = r.borrow_mut();
            r.bytes -= self.bytes;
            if let Some(c) = r.callers.get_mut(&self.caller) {
                c.0 -= 1;
                c.1 -= self.bytes;
                if c.0 == 0 {
                    r.callers.remove(&self.caller);
                }
            }
        });
    }
}

thread_local! {
    /// Per API key's tenant on this shard: `/ask` and row reads running, and their
    /// answers larger than hyper's buffer still being sent.
    static SENDING: RefCell<HashMap<String, Reads>> = RefCell::default();
}

#[derive(Default)]
struct Reads {
    running: usize,
    large: usize,
}

/// Answers at most this large go to hyper's buffer at once and never hold a connection
/// for long; larger ones are counted while they are sent.
pub const HELD_ANSWER_BYTES: usize = 64 << 10;

/// A read of an API key's whose answer may be large (`/ask`, a row), then that answer
/// while it is sent when it is large: a reader that takes large answers slowly holds a
/// connection each, and one tenant's key held 314 of a server's 1,024 connections that
/// way. A caller has at most [`ApiLimits::bodies_per_caller`] (a quarter of the
/// shard's connections) large answers being sent, and its running reads and those
/// together at most `--max-in-flight-per-tenant`: counted from admission, so a burst
/// of reads cannot all get in before the first answer is built.
pub struct AnswerHold {
    caller: String,
    large: bool,
}

impl AnswerHold {
    /// Counts a read of `caller`'s, or refuses it (429) past either bound.
    pub fn take(caller: &BodyCaller, limits: &ApiLimits) -> Result<AnswerHold, ApiError> {
        SENDING.with(|s| {
            let mut s = s.borrow_mut();
            let reads = s.entry(caller.0.clone()).or_default();
            let refused = |what: String| {
                ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "tenant_busy",
                    format!("{} {what}; read them first", shown(&caller.0)),
                )
            };
            if reads.large >= limits.bodies_per_caller {
                return Err(refused(format!(
                    "already has {} answers of over {} KiB still being sent from this \
                     server shard, its limit (a quarter of the shard's connections)",
                    reads.large,
                    HELD_ANSWER_BYTES >> 10
                )));
            }
            if reads.running + reads.large >= limits.max_in_flight_per_tenant {
                return Err(refused(format!(
                    "already has {} reads (`/ask`, rows, table listings) running or being sent on this \
                     server shard, its limit (--max-in-flight-per-tenant)",
                    reads.running + reads.large
                )));
            }
            reads.running += 1;
            Ok(AnswerHold {
                caller: caller.0.clone(),
                large: false,
            })
        })
    }

    /// The hold an answer of `len` bytes keeps while it is sent: none when it is small.
    pub fn answering(mut self, len: usize) -> Option<AnswerHold> {
        if len <= HELD_ANSWER_BYTES {
            return None;
        }
        SENDING.with(|s| {
            if let Some(reads) = s.borrow_mut().get_mut(&self.caller) {
                reads.running -= 1;
                reads.large += 1;
            }
        });
        self.large = true;
        Some(self)
    }
}

impl Drop for AnswerHold {
    fn drop(&mut self) {
        SENDING.with(|s| {
            let mut s = s.borrow_mut();
            if let Some(reads) = s.get_mut(&self.caller) {
                if self.large {
                    reads.large -= 1;
                } else {
                    reads.running -= 1;
                }
                if reads.running == 0 && reads.large == 0 {
                    s.remove(&self.caller);
                }
            }
        });
    }
}

fn shown(caller: &str) -> String {
    match caller {
        "<admin>" => "the admin".to_string(),
        "<anyone>" => "everyone without credentials".to_string(),
        tenant => format!("tenant {tenant}"),
    }
}

/// Reads a body of at most `max` bytes into one buffer, holding its bytes in `hold`
/// as they arrive (unless `held_ahead`: its declared length is held already). Refused
/// with 408 once it falls behind `--min-body-bytes-per-s` (after [`BODY_RATE_GRACE`])
/// or passes `--body-read-timeout-ms`, and with 413 past `max` (read on up to
/// [`OVER_LIMIT_DRAIN_BYTES`] past it, so its sender reads the answer).
pub async fn read_paced(
    mut body: Incoming,
    max: usize,
    hold: &mut BodyHold,
    held_ahead: bool,
    limits: &ApiLimits,
) -> Result<Bytes, ApiError> {
    paced(&mut body, max, Some(hold), held_ahead, limits).await
}

/// Reads what is left of a body declared a little over `max` (at most
/// [`OVER_LIMIT_DRAIN_BYTES`] past it) and drops it, at the same pace as any body, so a
/// client still sending it reads its 413 (count it among its caller's bodies with a
/// [`BodyHold`] meanwhile).
pub async fn drain(body: &mut Incoming, max: usize, limits: &ApiLimits) -> Result<(), ApiError> {
    match paced(body, max, None, true, limits).await {
        Err(e) if e.status == StatusCode::PAYLOAD_TOO_LARGE => Ok(()),
        other => other.map(|_| ()),
    }
}

/// [`read_paced`], keeping nothing when `hold` is `None`.
async fn paced(
    body: &mut Incoming,
    max: usize,
    mut hold: Option<&mut BodyHold>,
    held_ahead: bool,
    limits: &ApiLimits,
) -> Result<Bytes, ApiError> {
    let started = Instant::now();
    let mut kept = Vec::new();
    let mut seen: u64 = 0;
    loop {
        let (due, rate_bound) = due(started, seen, limits);
        let next = future::or(async { Some(body.frame().await) }, async {
            glommio::timer::sleep(due.saturating_duration_since(Instant::now())).await;
            None
        })
        .await;
        let frame = match next {
            Some(Some(frame)) => frame.map_err(|e| {
                ApiError::bad_request(
                    "body_read_failed",
                    format!("the body could not be read: {e}"),
                )
            })?,
            Some(None) => break,
            None if rate_bound => {
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "body_timeout",
                    format!(
                        "the body arrived slower than {} bytes a second, the least this \
                         server takes after the first {} s ({seen} bytes in {:.1} s); send it \
                         at once",
                        limits.min_body_bytes_per_s,
                        BODY_RATE_GRACE.as_secs(),
                        started.elapsed().as_secs_f64()
                    ),
                ))
            }
            None => {
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "body_timeout",
                    format!(
                        "the body did not arrive within {} ms",
                        limits.body_read_timeout.as_millis()
                    ),
                ))
            }
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        seen += data.len() as u64;
        if seen > max as u64 + OVER_LIMIT_DRAIN_BYTES {
            break;
        }
        if seen <= max as u64 {
            let Some(hold) = hold.as_deref_mut() else {
                continue; // drained
            };
            if !held_ahead {
                hold.grow(data.len(), limits)?;
            }
            kept.extend_from_slice(&data);
        }
    }
    if seen > max as u64 {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the body is larger than the limit of {max} bytes; split the batch"),
        ));
    }
    Ok(Bytes::from(kept))
}

/// When the next byte of a body that started at `started` and brought `seen` bytes is
/// due, and whether that is its minimum rate's bound (or its whole timeout's).
fn due(started: Instant, seen: u64, limits: &ApiLimits) -> (Instant, bool) {
    let whole = started + limits.body_read_timeout;
    if limits.min_body_bytes_per_s == 0 {
        return (whole, false);
    }
    let earned =
        BODY_RATE_GRACE + Duration::from_secs_f64(seen as f64 / limits.min_body_bytes_per_s as f64);
    let paced = started + earned;
    if paced < whole {
        (paced, true)
    } else {
        (whole, false)
    }
}
