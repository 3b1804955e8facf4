//! The state machine of a shard: [`apply`] takes one durable command at its LSN to
//! the shard's state. It is a pure function of (state, LSN, commit time, command):
//! no I/O, no clock, no randomness, so the live applier, recovery's replay and a
//! restore (which writes files recovery replays) all reach the same state from the
//! same log, and a follower applying the writer's log will too.
//!
//! What must stay true: commands apply in strictly increasing LSN order (asserted);
//! a refused command changes nothing but the applied LSN and says why, identically
//! live and in replay.

use std::collections::BTreeMap;

use oc_io::{Lsn, TimestampMicros};

use crate::api_key::ApiKey;
use crate::command::Command;
use crate::error::EngineError;
use crate::idempotency::Remembered;
use crate::migration::{self, MigrationState};
use crate::record;
use crate::table::BatchOutcome;
use crate::tenant::Tenant;
use crate::tenant_id::TenantId;

/// What an applied command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    TenantCreated,
    TenantDropped,
    TableCreated,
    TableDropped,
    ApiKeyCreated,
    ApiKeyRevoked,
    /// A migration started; its id is the record's LSN.
    MigrationStarted {
        id: u64,
    },
    /// A migration record applied; the migration is now in this state.
    Migration(MigrationState),
    /// A write batch applied at `lsn`; for a repeat of an idempotency key, the LSN and
    /// outcome of the first request.
    Written {
        lsn: Lsn,
        outcome: BatchOutcome,
    },
}

/// The remembered result for `key`, or a conflict if it was used with another body.
pub(crate) fn remembered(
    tenant: &Tenant,
    key: &str,
    hash: u64,
) -> Result<Option<Remembered>, EngineError> {
    match tenant.idempotency().get(key) {
        Some(r) if r.request_hash == hash => Ok(Some(*r)),
        Some(_) => Err(EngineError::IdempotencyConflict {
            key: key.to_string(),
        }),
        None => Ok(None),
    }
}

/// The tenants of a shard and the LSN they reflect.
#[derive(Debug, Default)]
pub struct ShardState {
    pub tenants: BTreeMap<TenantId, Tenant>,
    /// Every command up to this LSN is applied.
    pub applied_lsn: Lsn,
    /// When the command at `applied_lsn` was committed; zero when the state comes from
    /// a checkpoint with nothing applied after it.
    pub last_commit: TimestampMicros,
}

/// Applies one durable command at `lsn`, encoding it to learn what a keyed write's
/// idempotency key remembers (tests and tools; the shard uses [`apply_logged`] with
/// the hash of the bytes it logged or read).
pub fn apply(
    state: &mut ShardState,
    tenant: &TenantId,
    lsn: Lsn,
    committed: TimestampMicros,
    command: Command,
) -> Result<Applied, EngineError> {
    let (kind, payload) = record::encode(&command);
    let request_hash = record::write_request_hash(kind, &payload);
    apply_logged(state, tenant, lsn, committed, command, request_hash)
}

/// Applies one durable command at `lsn`. Total and deterministic: a refused command
/// changes nothing and reports why, live and in replay alike. `request_hash` is
/// [`record::write_request_hash`] of the command's logged bytes (`None` for anything
/// but a keyed write), computed once where the bytes are.
pub fn apply_logged(
    state: &mut ShardState,
    tenant: &TenantId,
    lsn: Lsn,
    committed: TimestampMicros,
    command: Command,
    request_hash: Option<u64>,
) -> Result<Applied, EngineError> {
    assert!(lsn > state.applied_lsn, "commands apply in LSN order");
    state.applied_lsn = lsn;
    state.last_commit = committed;
    let missing = || EngineError::NotFound {
        what: "tenant",
        name: tenant.to_string(),
    };
    match command {
        Command::CreateTenant => {
            if state.tenants.contains_key(tenant) {
                return Err(EngineError::AlreadyExists {
                    what: "tenant",
                    name: tenant.to_string(),
                });
            }
            state
                .tenants
                .insert(tenant.clone(), Tenant::created_at(tenant.clone(), lsn.0));
            Ok(Applied::TenantCreated)
        }
        Command::DropTenant => {
            crate::reclaim::later(state.tenants.remove(tenant).ok_or_else(missing)?);
            Ok(Applied::TenantDropped)
        }
        Command::CreateTable(schema) => {
            let t = state.tenants.get_mut(tenant).ok_or_else(missing)?;
            t.create_table(schema, lsn.0)?;
            Ok(Applied::TableCreated)
        }
        Command::DropTable { table } => {
            let t = state.tenants.get_mut(tenant).ok_or_else(missing)?;
            t.drop_table(&table, lsn.0)?;
            migration::end_with_table(t, &table, committed);
            Ok(Applied::TableDropped)
        }
        Command::Write {
            table,
            table_version,
            writes,
            idempotency_key,
        } => {
            let t = state.tenants.get_mut(tenant).ok_or_else(missing)?;
            let (Some(key), Some(hash)) = (idempotency_key, request_hash) else {
                let outcome = t.apply_writes(&table, table_version, writes, lsn)?;
                return Ok(Applied::Written { lsn, outcome });
            };
            if let Some(first) = remembered(t, &key, hash)? {
                return Ok(Applied::Written {
                    lsn: first.lsn,
                    outcome: first.outcome,
                });
            }
            let outcome = t.apply_writes(&table, table_version, writes, lsn)?;
            t.idempotency_mut().remember(
                key,
                Remembered {
                    request_hash: hash,
                    lsn,
                    outcome,
                    committed,
                },
            );
            Ok(Applied::Written { lsn, outcome })
        }
        Command::CreateApiKey {
            key_id,
            name,
            secret_sha256,
        } => {
            let t = state.tenants.get_mut(tenant).ok_or_else(missing)?;
            let key = ApiKey {
                name,
                secret_sha256,
                created: committed,
            };
            t.api_keys_mut().insert(key_id, key)?;
            Ok(Applied::ApiKeyCreated)
        }
        Command::RevokeApiKey { key_id } => {
            let t = state.tenants.get_mut(tenant).ok_or_else(missing)?;
            t.api_keys_mut().remove(&key_id)?;
            Ok(Applied::ApiKeyRevoked)
        }
        Command::StartMigration {
            table,
            table_version,
            steps,
            layout,
        } => {
            let t = state.tenants.get_mut(tenant).ok_or_else(missing)?;
            let id = migration::start(t, &table, table_version, steps, layout, lsn, committed)?;
            Ok(Applied::MigrationStarted { id })
        }
        Command::Backfill { table, id, upto } => {
            let t = state.tenants.get_mut(tenant).ok_or_else(missing)?;
            migration::backfill(t, &table, id, &upto, lsn, committed).map(Applied::Migration)
        }
        Command::Cutover { table, id } => {
            let t = state.tenants.get_mut(tenant).ok_or_else(missing)?;
            migration::cutover(t, &table, id, lsn, committed).map(Applied::Migration)
        }
        Command::AbortMigration { table, id } => {
            let t = state.tenants.get_mut(tenant).ok_or_else(missing)?;
            migration::abort(t, &table, id, committed).map(Applied::Migration)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::TableSchema;
    use crate::table::RowWrite;
    use crate::value::{ColumnType, Value};

    fn schema() -> TableSchema {
        TableSchema::new("items", &[("id", ColumnType::Int, false)], &["id"], &[]).expect("valid")
    }

    /// Tenant "acme" (LSN 1) with table "items" created at LSN 2 (its version).
    fn tenant_with_table() -> (TenantId, ShardState) {
        let acme = TenantId::parse("acme").expect("valid");
        let mut state = ShardState::default();
        apply(
            &mut state,
            &acme,
            Lsn(1),
            TimestampMicros(1),
            Command::CreateTenant,
        )
        .expect("tenant");
        apply(
            &mut state,
            &acme,
            Lsn(2),
            TimestampMicros(2),
            Command::CreateTable(schema()),
        )
        .expect("table");
        (acme, state)
    }

    #[test]
    fn a_write_validated_against_a_dropped_table_is_refused_and_changes_nothing() {
        let (acme, mut state) = tenant_with_table();
        let stale = Command::Write {
            table: "items".into(),
            table_version: 2,
            writes: vec![RowWrite::upsert(&[Value::Int(7)])],
            idempotency_key: None,
        };
        apply(
            &mut state,
            &acme,
            Lsn(3),
            TimestampMicros(3),
            Command::DropTable {
                table: "items".into(),
            },
        )
        .expect("drop");
        apply(
            &mut state,
            &acme,
            Lsn(4),
            TimestampMicros(4),
            Command::CreateTable(schema()),
        )
        .expect("table v4");
        let refused = apply(&mut state, &acme, Lsn(5), TimestampMicros(5), stale);
        assert!(
            matches!(refused, Err(EngineError::TableChanged { .. })),
            "{refused:?}"
        );
        let rows = state.tenants[&acme]
            .table("items")
            .expect("table")
            .rows()
            .count();
        assert_eq!(rows, 0, "the stale batch changed nothing");
        assert_eq!(
            state.applied_lsn,
            Lsn(5),
            "a refused command still takes its LSN"
        );
    }

    fn keyed(key: &str, id: i64) -> Command {
        Command::Write {
            table: "items".into(),
            table_version: 2,
            writes: vec![RowWrite::upsert(&[Value::Int(id)])],
            idempotency_key: Some(key.into()),
        }
    }

    #[test]
    fn a_repeated_idempotency_key_replays_the_first_result_and_a_new_body_conflicts() {
        let (acme, mut state) = tenant_with_table();
        let first = apply(
            &mut state,
            &acme,
            Lsn(3),
            TimestampMicros(3),
            keyed("k1", 7),
        )
        .expect("first");
        let again = apply(
            &mut state,
            &acme,
            Lsn(4),
            TimestampMicros(4),
            keyed("k1", 7),
        )
        .expect("repeat");
        assert_eq!(first, again, "the repeat gets the first LSN and outcome");
        let Applied::Written { lsn, outcome } = again else {
            panic!("a write")
        };
        assert_eq!((lsn, outcome.inserted), (Lsn(3), 1));
        let conflict = apply(
            &mut state,
            &acme,
            Lsn(5),
            TimestampMicros(5),
            keyed("k1", 8),
        );
        assert!(
            matches!(conflict, Err(EngineError::IdempotencyConflict { .. })),
            "{conflict:?}"
        );
        assert_eq!(
            state.tenants[&acme]
                .table("items")
                .expect("t")
                .rows()
                .count(),
            1,
            "nothing applied twice"
        );
        // A refused write is not remembered: the key stays free for a retry.
        let stale = Command::Write {
            table: "items".into(),
            table_version: 99,
            writes: vec![RowWrite::upsert(&[Value::Int(9)])],
            idempotency_key: Some("k2".into()),
        };
        assert!(apply(&mut state, &acme, Lsn(6), TimestampMicros(6), stale).is_err());
        assert!(state.tenants[&acme].idempotency().get("k2").is_none());
    }

    #[test]
    fn commands_for_missing_tenants_and_tables_are_refused_without_effect() {
        let acme = TenantId::parse("acme").expect("valid");
        let mut state = ShardState::default();
        let r = apply(
            &mut state,
            &acme,
            Lsn(1),
            TimestampMicros(1),
            Command::CreateTable(schema()),
        );
        assert!(matches!(
            r,
            Err(EngineError::NotFound { what: "tenant", .. })
        ));
        apply(
            &mut state,
            &acme,
            Lsn(2),
            TimestampMicros(2),
            Command::CreateTenant,
        )
        .expect("tenant");
        let r = apply(
            &mut state,
            &acme,
            Lsn(3),
            TimestampMicros(3),
            Command::CreateTenant,
        );
        assert!(matches!(
            r,
            Err(EngineError::AlreadyExists { what: "tenant", .. })
        ));
        let r = apply(
            &mut state,
            &acme,
            Lsn(4),
            TimestampMicros(4),
            Command::DropTable {
                table: "nope".into(),
            },
        );
        assert!(matches!(
            r,
            Err(EngineError::NotFound { what: "table", .. })
        ));
        assert_eq!(state.tenants.len(), 1);
    }
}
