//! A shard's migrations: starting and aborting them, and the backfill driver that
//! logs their chunks and cutovers at a rate the [`BackfillRateLimiter`] sets.
//!
//! Only a shard that takes its own writes drives a backfill (a follower applies the
//! writer's records, and its driver waits while its log takes none of its own), so
//! after a promotion the new writer's driver picks each migration up at its cursor:
//! at most the chunk in flight at the failover is redone.

use std::time::{Duration, Instant};

use super::*;
use crate::migration::{self, MigrationInfo, MigrationState, Step};
use crate::quota::Growth;
use crate::table::Table;

/// How often the driver looks for work and refills its budget while migrations run,
/// and while none does.
const TICK: Duration = Duration::from_millis(5);
const IDLE_TICK: Duration = Duration::from_millis(100);
/// Backfill accounts (for `GET …/migrations/:id`) kept before they are forgotten, once
/// no migration runs.
const MAX_BACKFILL_ACCOUNTS: usize = 1024;
/// Resident bytes a row's growth costs per byte (its allocation grows with it; 2 is
/// generous): the estimate of what converting the table in place adds.
const RESIDENT_PER_ROW_BYTE: u64 = 2;
/// About how long converting one chunk may take, judged on its first rows.
const CHUNK_TIME: Duration = Duration::from_millis(2);
const TIMED_ROWS: usize = 16;
/// Rows and bytes (of v0 rows) one chunk converts at most: a chunk's apply holds the
/// shard for about a millisecond at most.
const MAX_CHUNK_ROWS: usize = 2048;
const MAX_CHUNK_BYTES: usize = 512 << 10;

/// How far the limiter's held view of the foreground moves towards a lower window's
/// rate per window (about a second to forget a load that stopped).
const FOREGROUND_DECAY: f64 = 0.3;

/// Holds a backfill to a share of the shard's foreground write traffic: a closed loop
/// on the bytes of rows the shard's writers logged in the last window (row bytes as the
/// log stores them, the unit a chunk spends, so the share is the same in rows and bytes
/// when old and new rows are alike). A token bucket fills at `share` × that rate, or
/// at a floor that fades out as the foreground grows: `idle_floor` bytes/s on an idle
/// shard, nothing from `idle_below` bytes/s of foreground on, so a lightly loaded
/// shard still finishes quickly. A chunk spends the v0 bytes of the rows it converts.
/// The bucket holds at most one window's worth, so a quiet spell does not bank a burst.
#[derive(Debug, Clone)]
pub struct BackfillRateLimiter {
    share: f64,
    idle_below: f64,
    idle_floor: f64,
    window: Duration,
    window_start: Instant,
    foreground_at_start: u64,
    /// Foreground bytes/s over the last whole window (the share is of this).
    foreground_rate: f64,
    /// The same, held: the last window's when it rose, else decaying towards it by
    /// [`FOREGROUND_DECAY`] per window (whether the floor applies is judged on this).
    foreground_held: f64,
    tokens: f64,
    refilled: Instant,
}

impl BackfillRateLimiter {
    /// The documented policy, in 100 ms windows: 10 % of the foreground, and a floor of
    /// 16 MiB/s on an idle shard that fades to nothing at 256 KiB/s of foreground (a
    /// few thousand small writes a second), where the 10 % takes over.
    pub fn standard(now: Instant, foreground_bytes: u64) -> Self {
        Self::new(
            0.10,
            256.0 * 1024.0,
            16.0 * 1024.0 * 1024.0,
            now,
            foreground_bytes,
        )
    }

    pub fn new(
        share: f64,
        idle_below: f64,
        idle_floor: f64,
        now: Instant,
        foreground_bytes: u64,
    ) -> Self {
        BackfillRateLimiter {
            share,
            idle_below,
            idle_floor,
            window: Duration::from_millis(100),
            window_start: now,
            foreground_at_start: foreground_bytes,
            foreground_rate: 0.0,
            foreground_held: 0.0,
            tokens: 0.0,
            refilled: now,
        }
    }

    /// The backfill's rate now, bytes/s.
    pub fn rate(&self) -> f64 {
        let idle = (1.0 - self.foreground_held / self.idle_below).max(0.0);
        (self.share * self.foreground_rate).max(self.idle_floor * idle)
    }

    /// Takes in the foreground's byte count at `now` and refills the bucket; returns
    /// the bytes a chunk may convert now (zero or less: wait).
    pub fn budget(&mut self, now: Instant, foreground_bytes: u64) -> f64 {
        let in_window = now.saturating_duration_since(self.window_start);
        if in_window >= self.window {
            let bytes = foreground_bytes.saturating_sub(self.foreground_at_start);
            self.foreground_rate = bytes as f64 / in_window.as_secs_f64();
            // Quick to see load arrive, slow to believe it gone: one quiet window in a
            // steady load does not let the idle floor in.
            self.foreground_held = self.foreground_rate.max(
                (1.0 - FOREGROUND_DECAY) * self.foreground_held
                    + FOREGROUND_DECAY * self.foreground_rate,
            );
            self.window_start = now;
            self.foreground_at_start = foreground_bytes;
        }
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        let rate = self.rate();
        self.tokens = (self.tokens + rate * elapsed).min(rate * self.window.as_secs_f64());
        self.tokens
    }

    /// Spends what a chunk converted (the bucket may go below zero for a large row).
    pub fn spend(&mut self, bytes: usize) {
        self.tokens -= bytes as f64;
    }
}

/// What a migration's backfill has done on this shard since it (or this process)
/// started: the share of the writers' throughput it actually used.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackfillProgress {
    /// v0 bytes of the rows converted.
    pub backfill_bytes: u64,
    /// Bytes the writers logged meanwhile.
    pub foreground_bytes: u64,
    pub rows: u64,
    pub seconds: f64,
}

impl BackfillProgress {
    /// Backfill bytes per foreground byte (`None` while the foreground wrote nothing).
    pub fn share(&self) -> Option<f64> {
        (self.foreground_bytes > 0)
            .then(|| self.backfill_bytes as f64 / self.foreground_bytes as f64)
    }

    pub fn rows_per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.rows as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// The driver's running account of one migration.
#[derive(Debug, Clone, Copy)]
pub(super) struct BackfillAccount {
    started: Instant,
    foreground_at_start: u64,
    backfill_bytes: u64,
    rows: u64,
    /// When its cutover was logged, and the foreground bytes then: a finished
    /// migration's figures stay as they were at its end.
    ended: Option<(Instant, u64)>,
}

/// Rows a migration's start transforms to try it and to learn how rows grow, at most
/// and, however costly their transform, at least (the estimate rests on them).
const SAMPLE_ROWS: usize = 64;
const MIN_SAMPLE_ROWS: usize = 4;

/// Converted-row bytes per old-row byte over the table's first rows (1 for an empty
/// table), and vectors a row gains (or loses) on average; a sampled row that does not
/// migrate refuses the migration at once. Stops after [`CHUNK_TIME`] once it has
/// [`MIN_SAMPLE_ROWS`]: the start runs on the shard, and rows whose transform is
/// costly would hold it for the whole sample.
fn sample_growth(base: &Table, plan: &migration::Plan) -> Result<(f64, f64), EngineError> {
    let (mut before, mut after) = (0usize, 0usize);
    let (mut sampled, mut vectors) = (0usize, 0isize);
    let started = Instant::now();
    for (_, row) in base.rows_after(None).take(SAMPLE_ROWS) {
        if sampled >= MIN_SAMPLE_ROWS && started.elapsed() >= CHUNK_TIME {
            break;
        }
        let v1 = plan
            .transform(row)
            .and_then(|v1| plan.check(&v1).map(|()| v1))
            .map_err(|why| {
                EngineError::InvalidMigration(format!(
                    "the table's row {} does not migrate: {why}",
                    migration::row_key_shown(base.schema(), row)
                ))
            })?;
        before += record::row_entry_bytes(row);
        after += record::row_entry_bytes(&v1);
        sampled += 1;
        vectors += v1.vectors() as isize - row.vectors() as isize;
    }
    if sampled == 0 {
        return Ok((1.0, 0.0));
    }
    Ok((
        after as f64 / before as f64,
        vectors as f64 / sampled as f64,
    ))
}

/// The next chunk of a migration: the key it converts up to and the v0 bytes and rows
/// it covers; `None` once the backfill has caught up.
fn next_chunk(
    tenant: &Tenant,
    m: &migration::ActiveMigration,
    budget: f64,
) -> Option<(Vec<u8>, usize, usize)> {
    if m.caught_up() {
        return None;
    }
    let end = m.end_key()?;
    let base = tenant.table(&m.info.table).ok()?;
    // Rows whose transform is costly (wide expressions over large vectors) make a
    // chunk of fewer rows: its apply holds the shard for about CHUNK_TIME at most.
    let max_rows = {
        let started = Instant::now();
        let mut sampled = 0u32;
        for (_, row) in base.rows_after(m.cursor()).take(TIMED_ROWS) {
            let _ = m.transform(row);
            sampled += 1;
            if started.elapsed() >= CHUNK_TIME {
                break; // costly enough to tell: timing more would hold the shard too
            }
        }
        let per_row = (started.elapsed() / sampled.max(1)).max(Duration::from_nanos(100));
        (CHUNK_TIME.as_nanos() / per_row.as_nanos()).clamp(1, MAX_CHUNK_ROWS as u128) as usize
    };
    let mut upto = end;
    let (mut rows, mut bytes) = (0, 0);
    for (key, row) in base.rows_after(m.cursor()) {
        if key > end || rows == max_rows {
            break;
        }
        let size = record::row_entry_bytes(row);
        if rows > 0 && (bytes + size) as f64 > budget.min(MAX_CHUNK_BYTES as f64) {
            break;
        }
        rows += 1;
        bytes += size;
        upto = key;
    }
    // With no row left before the end key (deleted meanwhile) the chunk reaches it.
    Some((upto.to_vec(), rows, bytes))
}

impl<S: Storage> Shard<S> {
    /// Validates and logs the start of a migration; returns it as started.
    pub async fn start_migration(
        &self,
        tenant: &TenantId,
        table: &str,
        steps: Vec<Step>,
    ) -> Result<MigrationInfo, EngineError> {
        let table_version = self.read(tenant, |t| {
            // The table is named in the body, not the path: a 400 like any other step
            // problem (the tenant, in the path, is still a 404).
            let base = t.table(table).map_err(|_| {
                EngineError::InvalidMigration(format!(
                    "table {table:?} does not exist; name one of the tenant's tables"
                ))
            })?;
            if let Some(m) = t.migrations().active(table) {
                return Err(EngineError::MigrationConflict(format!(
                    "table {table:?} is already migrating (migration {}, {}); wait for it to \
                     finish or abort it",
                    m.info.id,
                    m.info.state.name()
                )));
            }
            let plan = migration::plan(base.schema(), &steps, migration::Layout::InPlace)?;
            let (growth, vectors_per_row) = sample_growth(base, &plan)?;
            // The rows grow in place by what the migration appends to them: refuse
            // growth the memory budget has no room for, rather than run the process
            // out of memory half way.
            let (budget, resident) = crate::quota::memory_for_data();
            let converted_bytes = base.usage().bytes as f64 * growth;
            let more = (converted_bytes - base.usage().bytes as f64).max(0.0);
            let built = crate::table::NewStructures::new(base.schema(), &plan.target);
            let needed = (RESIDENT_PER_ROW_BYTE as f64 * more) as u64
                + built.resident_estimate(base.usage().rows);
            let room = budget.saturating_sub(resident);
            if budget > 0 && needed > room {
                return Err(EngineError::LimitExceeded {
                    what: "memory the migration's converted rows and new indexes need, in \
                           bytes (against the room left in the memory budget; free memory \
                           or raise --memory-budget-bytes)",
                    actual: needed as usize,
                    limit: room as usize,
                });
            }
            // Converted, the table holds the new shape: within the quotas, its vectors
            // (a column of them added, with a default) as well as its bytes.
            let bytes = Growth {
                rows: 0,
                bytes: more as i64,
                vectors: (vectors_per_row * base.usage().rows as f64).ceil().max(0.0) as i64,
            };
            self.quotas
                .get()
                .admit(tenant.as_str(), &t.totals(), bytes)?;
            Ok(base.version())
        })??;
        let command = Command::StartMigration {
            table: table.to_string(),
            table_version,
            steps,
            layout: migration::Layout::InPlace,
        };
        match self.commit(tenant, command).await? {
            (_, Applied::MigrationStarted { id }) => self.migration(tenant, id),
            (_, other) => unreachable!("a start applies as a start, not {other:?}"),
        }
    }

    /// Logs the abort of an active migration; returns it as aborted.
    pub async fn abort_migration(
        &self,
        tenant: &TenantId,
        id: u64,
    ) -> Result<MigrationInfo, EngineError> {
        let info = self.migration(tenant, id)?;
        match info.state {
            s if s.is_active() => {}
            MigrationState::Done => {
                return Err(EngineError::MigrationConflict(format!(
                    "migration {id} of table {:?} has cut over, so it cannot be aborted; to \
                     undo it, start the inverse migration (for example drop the column it \
                     added, or change the type back with a transform)",
                    info.table
                )))
            }
            other => {
                return Err(EngineError::MigrationConflict(format!(
                    "migration {id} of table {:?} is already {}",
                    info.table,
                    other.name()
                )))
            }
        }
        let command = Command::AbortMigration {
            table: info.table,
            id,
        };
        self.commit(tenant, command).await?;
        self.migration(tenant, id)
    }

    /// One migration of `tenant`.
    pub fn migration(&self, tenant: &TenantId, id: u64) -> Result<MigrationInfo, EngineError> {
        self.read(tenant, |t| t.migrations().get(id))?
            .ok_or_else(|| EngineError::NotFound {
                what: "migration",
                name: id.to_string(),
            })
    }

    /// Every migration `tenant` remembers, oldest first.
    pub fn migrations(&self, tenant: &TenantId) -> Result<Vec<MigrationInfo>, EngineError> {
        self.read(tenant, |t| t.migrations().list())
    }

    /// The migrations still running on this shard, with their tenants (a planned
    /// promotion or switchover waits for them).
    pub fn running_migrations(&self) -> Vec<(TenantId, MigrationInfo)> {
        self.state
            .borrow()
            .tenants
            .iter()
            .flat_map(|(id, t)| {
                t.migrations()
                    .all_active()
                    .map(|m| (id.clone(), m.info.clone()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// What the backfill of migration `id` did here (`None` before its first chunk on
    /// this process).
    pub fn backfill_progress(&self, tenant: &TenantId, id: u64) -> Option<BackfillProgress> {
        let account = *self.backfill.borrow().get(&(tenant.clone(), id))?;
        let (until, foreground) = account
            .ended
            .unwrap_or_else(|| (Instant::now(), self.foreground_bytes.get()));
        Some(BackfillProgress {
            backfill_bytes: account.backfill_bytes,
            foreground_bytes: foreground.saturating_sub(account.foreground_at_start),
            rows: account.rows,
            seconds: until
                .saturating_duration_since(account.started)
                .as_secs_f64(),
        })
    }

    /// Migrations per state, the backfill's rows so far and its share of the foreground
    /// in the last second (for `/metrics`).
    pub fn migration_metrics(&self) -> MigrationMetrics {
        let mut by_state = [0u64; MigrationState::ALL.len()];
        for tenant in self.state.borrow().tenants.values() {
            for info in tenant
                .migrations()
                .all_active()
                .map(|m| &m.info)
                .chain(tenant.migrations().finished())
            {
                if let Some(i) = MigrationState::ALL.iter().position(|s| *s == info.state) {
                    by_state[i] += 1;
                }
            }
        }
        MigrationMetrics {
            by_state,
            backfill_rows: self.backfill_rows.get(),
            backfill_share: self.backfill_share.get(),
        }
    }

    /// Counts the foreground bytes a write logged (the limiter's input).
    pub(super) fn count_foreground(&self, bytes: usize) {
        self.foreground_bytes
            .set(self.foreground_bytes.get() + bytes as u64);
    }
}

/// `/metrics` figures of a shard's migrations.
#[derive(Debug, Clone, Copy, Default)]
pub struct MigrationMetrics {
    /// Indexed like [`MigrationState::ALL`].
    pub by_state: [u64; 6],
    pub backfill_rows: u64,
    /// Backfill bytes per foreground byte over the last whole second.
    pub backfill_share: f64,
}

/// Runs the backfill driver of `shard` until the returned task is dropped.
pub fn spawn_backfill<S: Storage + 'static>(shard: Rc<Shard<S>>) -> Task<()> {
    glommio::spawn_local(async move { drive_backfill(shard).await })
}

async fn drive_backfill<S: Storage>(shard: Rc<Shard<S>>) {
    let mut limiter = BackfillRateLimiter::standard(Instant::now(), shard.foreground_bytes.get());
    let mut second = (Instant::now(), shard.foreground_bytes.get(), 0u64);
    let mut paused_for_memory = false;
    let mut tick = TICK;
    loop {
        glommio::timer::sleep(tick).await;
        if shard.wal().failure().is_some() {
            return; // the shard needs a restart
        }
        let now = Instant::now();
        let foreground = shard.foreground_bytes.get();
        if now.duration_since(second.0) >= Duration::from_secs(1) {
            let fg = foreground.saturating_sub(second.1);
            shard.backfill_share.set(if fg > 0 {
                second.2 as f64 / fg as f64
            } else {
                0.0
            });
            second = (now, foreground, 0);
        }
        let work: Vec<(TenantId, String, u64, bool)> = shard
            .state
            .borrow()
            .tenants
            .iter()
            .flat_map(|(id, t)| {
                t.migrations()
                    .all_active()
                    .map(|m| (id.clone(), m.info.table.clone(), m.info.id, m.caught_up()))
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut budget = limiter.budget(now, foreground);
        // Looking for work walks every tenant: seldom while there is none.
        tick = if work.is_empty() { IDLE_TICK } else { TICK };
        if work.is_empty() {
            // What the finished migrations' backfills did is kept for a while.
            let mut accounts = shard.backfill.borrow_mut();
            if accounts.len() > MAX_BACKFILL_ACCOUNTS {
                accounts.clear();
            }
        }
        // A follower applies its writer's migration records; it logs none of its own.
        if work.is_empty() || !shard.wal().takes_own_writes() {
            continue;
        }
        // Over the memory budget the backfill waits (it grows rows and new indexes);
        // a cutover, which grows nothing, goes ahead.
        let (limit, resident) = crate::quota::memory_for_data();
        let memory_full = limit > 0 && resident > limit;
        if memory_full != paused_for_memory {
            paused_for_memory = memory_full;
            if memory_full {
                tracing::warn!(
                    resident,
                    limit,
                    "backfills wait: the process is over its memory budget"
                );
            } else {
                tracing::info!("backfills resume: the process is back under its memory budget");
            }
        }
        if memory_full {
            budget = 0.0;
        }
        for (tenant, table, id, caught_up) in work {
            // A chunk of the backfill grows rows; a cutover grows nothing.
            let grown_from = (!caught_up)
                .then(|| shard.read(&tenant, |t| t.totals()).ok())
                .flatten();
            let aborts = Command::AbortMigration {
                table: table.clone(),
                id,
            };
            let command = if caught_up {
                Command::Cutover { table, id }
            } else {
                if budget <= 0.0 {
                    continue;
                }
                let chunk = shard
                    .read(&tenant, |t| {
                        t.migrations()
                            .active(&table)
                            .filter(|m| m.info.id == id)
                            .and_then(|m| next_chunk(t, m, budget))
                    })
                    .ok()
                    .flatten();
                let Some((upto, rows, bytes)) = chunk else {
                    continue;
                };
                limiter.spend(bytes);
                budget -= bytes as f64;
                second.2 += bytes as u64;
                shard
                    .backfill_rows
                    .set(shard.backfill_rows.get() + rows as u64);
                let mut accounts = shard.backfill.borrow_mut();
                let account =
                    accounts
                        .entry((tenant.clone(), id))
                        .or_insert_with(|| BackfillAccount {
                            started: now,
                            foreground_at_start: foreground,
                            backfill_bytes: 0,
                            rows: 0,
                            ended: None,
                        });
                account.backfill_bytes += bytes as u64;
                account.rows += rows as u64;
                drop(accounts);
                Command::Backfill { table, id, upto }
            };
            match shard.commit(&tenant, command).await {
                Ok(_) => {
                    if caught_up {
                        if let Some(account) =
                            shard.backfill.borrow_mut().get_mut(&(tenant.clone(), id))
                        {
                            account.ended = Some((Instant::now(), shard.foreground_bytes.get()));
                        }
                    }
                    if let Some(why) = grown_from.and_then(|before| {
                        let after = shard.read(&tenant, |t| t.totals()).ok()?;
                        past_quota(&before, &after, shard.quotas.get())
                    }) {
                        // Admitted on an estimate from its first rows: the rows it
                        // converts may grow more than those did.
                        tracing::warn!(tenant = %tenant, migration = id, %why, "a migration's backfill took the tenant past its quota: aborted");
                        if let Err(e) = shard.commit(&tenant, aborts).await {
                            tracing::warn!(tenant = %tenant, migration = id, error = %e, "aborting the migration past its quota was refused");
                        }
                    }
                }
                // A follower, a fenced writer or one handing over: the writer drives
                // the backfill.
                Err(EngineError::NotLeader(_) | EngineError::HandingOver(_)) => {
                    glommio::timer::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => {
                    tracing::warn!(tenant = %tenant, migration = id, error = %e, "backfill step refused")
                }
            }
        }
    }
}

/// What a backfill chunk that took a tenant from `before` to `after` grew past its
/// quota, if anything: a chunk that shrinks nothing is never stopped for a quota the
/// tenant was over already (a migration dropping a column frees room).
fn past_quota(
    before: &crate::tenant::TenantUsage,
    after: &crate::tenant::TenantUsage,
    quotas: crate::quota::TenantQuotas,
) -> Option<String> {
    [
        (
            "bytes",
            before.bytes,
            after.bytes,
            quotas.max_bytes,
            "--tenant-max-bytes",
        ),
        (
            "vectors",
            before.vectors,
            after.vectors,
            quotas.max_vectors,
            "--tenant-max-vectors",
        ),
    ]
    .into_iter()
    .find(|&(_, before, after, limit, _)| after > before && after > limit)
    .map(|(what, _, after, limit, flag)| {
        format!("the tenant's {what} reached {after}, past its quota of {limit} ({flag})")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_chunk_that_grows_the_tenant_past_its_quota_stops_the_backfill() {
        let usage = |bytes, vectors| crate::tenant::TenantUsage {
            bytes,
            vectors,
            ..Default::default()
        };
        let quotas = crate::quota::TenantQuotas {
            max_bytes: 1000,
            max_vectors: 10,
            ..Default::default()
        };
        assert_eq!(past_quota(&usage(900, 0), &usage(990, 0), quotas), None);
        let grew = past_quota(&usage(900, 0), &usage(1100, 0), quotas).expect("past");
        assert!(grew.contains("--tenant-max-bytes"), "{grew}");
        let vectors = past_quota(&usage(0, 5), &usage(0, 11), quotas).expect("past");
        assert!(vectors.contains("--tenant-max-vectors"), "{vectors}");
        // Over already, and shrinking: left to finish.
        assert_eq!(past_quota(&usage(2000, 0), &usage(1500, 0), quotas), None);
    }

    /// The rate after one whole window in which the writers logged `bytes_per_s`.
    fn rate_at(bytes_per_s: f64) -> f64 {
        let start = Instant::now();
        let mut limiter = BackfillRateLimiter::standard(start, 0);
        let window = Duration::from_millis(100);
        limiter.budget(start + window, (bytes_per_s * 0.1) as u64);
        limiter.rate()
    }

    #[test]
    fn the_share_holds_under_load_and_the_floor_fades_in_as_the_shard_goes_idle() {
        const MIB: f64 = 1024.0 * 1024.0;
        assert_eq!(rate_at(0.0), 16.0 * MIB, "an idle shard: the floor");
        let light = rate_at(1_000.0); // ten 100-byte writes a second
        assert!(light > 15.0 * MIB, "a trickle barely slows it: {light}");
        let half = rate_at(128.0 * 1024.0);
        assert!((half - 8.0 * MIB).abs() < 0.01 * MIB, "{half}");
        for busy in [256.0 * 1024.0, 2.0 * MIB, 50.0 * MIB] {
            let rate = rate_at(busy);
            assert!(
                (rate - 0.10 * busy).abs() < 1.0,
                "at {busy} B/s of writes the backfill gets 10 %, not {rate}"
            );
        }
    }

    #[test]
    fn a_quiet_window_in_a_steady_load_does_not_let_the_floor_in() {
        let start = Instant::now();
        let mut limiter = BackfillRateLimiter::standard(start, 0);
        let window = Duration::from_millis(100);
        let mut written = 0;
        let mut now = start;
        for per_window in [40_000, 40_000, 10_000, 40_000] {
            now += window;
            written += per_window;
            limiter.budget(now, written);
            // 400 kB/s, with a window at 100 kB/s: the floor stays out.
            assert!(limiter.rate() < 50_000.0, "{}", limiter.rate());
        }
        // Once the load is gone for good, the floor comes back within about a second.
        for _ in 0..15 {
            now += window;
            limiter.budget(now, written);
        }
        assert!(limiter.rate() > 8.0 * 1024.0 * 1024.0, "{}", limiter.rate());
    }

    #[test]
    fn the_bucket_spends_what_chunks_convert_and_banks_at_most_one_window() {
        let start = Instant::now();
        let mut limiter = BackfillRateLimiter::standard(start, 0);
        let window = Duration::from_millis(100);
        // 2 MB/s of writes: 200 KB/s of backfill, 20 KB a window.
        let mut written = 0;
        let mut now = start;
        for _ in 0..3 {
            now += window;
            written += 200_000;
            limiter.budget(now, written);
        }
        let budget = limiter.budget(now, written);
        assert!(
            (budget - 20_000.0).abs() < 1.0,
            "one window's worth: {budget}"
        );
        limiter.spend(15_000);
        let left = limiter.budget(now, written);
        assert!((left - 5_000.0).abs() < 1.0, "{left}");
        // A long quiet spell (the floor) still banks one window only.
        let later = now + Duration::from_secs(10);
        let banked = limiter.budget(later, written);
        assert!(banked <= 16.0 * 1024.0 * 1024.0 * 0.1 + 1.0, "{banked}");
    }
}
