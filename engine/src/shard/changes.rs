//! A tenant's changes read back from the shard's log, for `/watch` resumes: the
//! frames after a position, described as change events.

use super::*;

/// What [`Shard::changes_after`] read.
#[derive(Debug)]
pub enum ChangesRead {
    /// The tenant's changes, in LSN order; the log was read through `through`.
    Batches {
        batches: Vec<ChangeBatch>,
        through: Lsn,
    },
    /// The log no longer holds what was asked for (released after a checkpoint).
    NotHeld { oldest: Option<Lsn> },
}

impl<S: Storage> Shard<S> {
    /// `tenant`'s changes with LSN in `(after, upto]`, read back from the log: from one
    /// segment per call (call again after `through` for more). Commands refused at apply
    /// are described as if applied (a consumer sees at most a needless invalidation);
    /// a write whose table was since dropped and created again has a `null` key.
    pub async fn changes_after(
        &self,
        tenant: &TenantId,
        after: Lsn,
        upto: Lsn,
    ) -> Result<ChangesRead, EngineError> {
        let closing = |e: glommio::GlommioError<()>| EngineError::Replay {
            lsn: after.0,
            why: format!("the shard is closing: {e}"),
        };
        // Resumes read one at a time per shard (each holds a page of frames), and one at
        // a time per tenant before that: 64 streams of one tenant resuming together
        // delayed another's resume from 0.2 s to minutes.
        let tenant_turn = TenantTurns::of(&self.replay_turns, tenant, 1);
        let _mine = tenant_turn.turns.acquire_permit(1).await.map_err(closing)?;
        let _turn = self.replays.acquire_permit(1).await.map_err(closing)?;
        let frames = match self.wal.read_after(after, upto).await? {
            oc_io::LogRead::NotHeld { oldest } => return Ok(ChangesRead::NotHeld { oldest }),
            oc_io::LogRead::Frames(frames) => frames,
        };
        let through = frames.last().map_or(after, |f| f.lsn);
        let batches = self.describe_frames(tenant, &frames)?;
        Ok(ChangesRead::Batches { batches, through })
    }

    /// `tenant`'s changes in `frames` (read back from this shard's log or its archive),
    /// described as [`Shard::changes_after`] says.
    pub fn describe_frames(
        &self,
        tenant: &TenantId,
        frames: &[oc_io::OwnedFrame],
    ) -> Result<Vec<ChangeBatch>, EngineError> {
        // Tables created within the frames: their writes use that schema.
        let mut created: HashMap<String, (u64, TableSchema)> = HashMap::new();
        let state = self.state.borrow();
        let current = feed::current_schema(&state, tenant);
        // Frames before the tenant's creation are an earlier tenant's of the same name
        // (dropped since): never described to this one.
        let began = state.tenants.get(tenant).map_or(0, Tenant::created_lsn);
        let mut batches = Vec::new();
        for frame in frames {
            if frame.tenant != tenant.as_str().as_bytes() || frame.lsn.0 < began {
                continue;
            }
            // Every frame decoded when it was applied; one that does not now is damage
            // that recovery would refuse too.
            let command =
                record::decode(frame.kind, &frame.payload).map_err(|e| EngineError::Replay {
                    lsn: frame.lsn.0,
                    why: e.to_string(),
                })?;
            if let Command::CreateTable(schema) = &command {
                created.insert(schema.name.clone(), (frame.lsn.0, schema.clone()));
            }
            let schema_of = |table: &str, version: u64| match created.get(table) {
                Some((created_at, schema)) if *created_at == version => Some(schema.clone()),
                _ => current(table, version),
            };
            let events = feed::describe(frame.lsn, &command, schema_of);
            if !events.is_empty() {
                batches.push(ChangeBatch::new(frame.lsn, frame.epoch, None, events));
            }
        }
        Ok(batches)
    }
}
