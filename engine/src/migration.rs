//! Online schema migrations: a list of steps on one table, planned into the table's
//! next shape (v1) and a row transform from the current shape (v0), then carried out
//! by log records so the live shard, recovery, restore and followers all agree.
//!
//! The table is stored once. Columns keep their slots: the new shape holds every slot
//! of the old one (a dropped or retyped column's slot is marked dropped) and appends a
//! slot per column the migration adds or retypes, so a row converted to the new shape
//! is its old row with values appended. Read as v0 it is the row it was; read as v1 it
//! is the new row. The backfill converts the rows that existed at the start in place,
//! in key order, up to the last key the table held then (`end_key`); a write to a row
//! the backfill has passed, or past `end_key`, is stored converted as it applies (a
//! write the transform cannot carry is refused whole, naming the migration), so the
//! backfill always ends. The new shape's own indexes are built over
//! the converted rows on the side. Writers keep writing the v0 shape; reads see v1
//! (a row not converted yet is transformed as it is read). Cutover is one record: the
//! table takes the new schema and the built structures, touching no row. Abort drops
//! the built structures: the table reads as v0 again at once.
//!
//! Records (FORMAT.md §5): start (kind 12; kind 8 is an earlier build's, see
//! [`Layout::Compact`]: table, table version, the steps as JSON), backfill
//! chunk (convert base rows after the cursor up to a key), cutover, abort. Each apply
//! is deterministic; a chunk whose row does not transform puts the migration in
//! `Failed` with the reason, live and in replay alike.

use std::borrow::Cow;
use std::collections::VecDeque;

use oc_io::{Lsn, TimestampMicros};
use serde::{Deserialize, Serialize};

use crate::error::EngineError;
use crate::key::Key;
use crate::query::compile_row_expr;
use crate::query::expr::Expr;
use crate::query::{MAX_IN_LIST_COMPARISONS, MAX_LIKE_PER_QUERY};
use crate::schema::{check_name, Column, TableSchema};
use crate::table::{check_transformed_row, BatchOutcome, NewStructures, Row, RowWrite, Table};
use crate::tenant::Tenant;
use crate::value::{ColumnType, Value};

/// Steps one migration may hold.
pub const MAX_MIGRATION_STEPS: usize = 64;
/// Bytes of a migration's steps as compact JSON (they travel in one log record).
pub const MAX_STEPS_JSON_BYTES: usize = 16 * 1024;
/// Bytes of one default or transform expression.
pub const MAX_EXPRESSION_BYTES: usize = 4096;
/// Vector dimensions a migration's expressions may read per row for distances,
/// together: a row is transformed whole wherever the migration meets it (at a write,
/// in one step of its backfill), and 1,750 distances over `vector(4096)` (seven steps)
/// took 15 ms a row, a 40-row write batch over a second.
pub const MAX_DISTANCE_DIMS_PER_ROW: u64 = 16 * crate::limits::MAX_VECTOR_DIM as u64;
/// Finished migrations a tenant remembers (for `GET …/migrations`).
pub const MIGRATION_HISTORY: usize = 32;
/// Bytes of a failure reason kept (it names a row key, which may be long).
const MAX_REASON_BYTES: usize = 1024;

/// One step, as the API takes it (`{"op": "add_column", …}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Step {
    /// A new column; `default` is an expression over the v0 columns (a constant
    /// included). Without one the column must be nullable and starts NULL.
    AddColumn {
        name: String,
        #[serde(rename = "type")]
        ty: String,
        #[serde(default = "nullable_by_default")]
        nullable: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        default: Option<String>,
    },
    DropColumn {
        name: String,
    },
    RenameColumn {
        from: String,
        to: String,
    },
    /// A new type for a column, its values computed by `using` over the v0 columns.
    ChangeType {
        column: String,
        #[serde(rename = "type")]
        ty: String,
        using: String,
    },
    AddIndex {
        name: String,
        columns: Vec<String>,
    },
    DropIndex {
        name: String,
    },
}

fn nullable_by_default() -> bool {
    true
}

impl Step {
    fn op(&self) -> &'static str {
        match self {
            Step::AddColumn { .. } => "add_column",
            Step::DropColumn { .. } => "drop_column",
            Step::RenameColumn { .. } => "rename_column",
            Step::ChangeType { .. } => "change_type",
            Step::AddIndex { .. } => "add_index",
            Step::DropIndex { .. } => "drop_index",
        }
    }
}

/// The steps as the compact JSON the log and checkpoints hold.
pub fn steps_json(steps: &[Step]) -> String {
    serde_json::to_string(steps).unwrap_or_else(|_| "[]".into())
}

/// Parses steps from their JSON (API body or log record), bounding size and count.
pub fn parse_steps(json: &[u8]) -> Result<Vec<Step>, String> {
    if json.len() > MAX_STEPS_JSON_BYTES {
        return Err(format!(
            "the steps take {} bytes of JSON, above the limit of {MAX_STEPS_JSON_BYTES}",
            json.len()
        ));
    }
    let steps: Vec<Step> = serde_json::from_slice(json).map_err(|e| e.to_string())?;
    check_step_count(steps.len())?;
    Ok(steps)
}

fn check_step_count(n: usize) -> Result<(), String> {
    if n == 0 {
        return Err("a migration needs at least one step".into());
    }
    if n > MAX_MIGRATION_STEPS {
        return Err(format!(
            "{n} steps, above the limit of {MAX_MIGRATION_STEPS}"
        ));
    }
    Ok(())
}

/// A value an appended column computes from the v0 row: an expression (`params` are
/// its literals).
#[derive(Debug, Clone)]
struct Computed {
    expr: Expr,
    params: Vec<Value>,
}

/// Where a column of the new shape keeps its values.
#[derive(Debug, Clone)]
enum Slot {
    /// The v0 slot at this position, values as they are.
    Old(usize),
    /// A slot appended after the v0 ones, its values computed.
    New(Computed),
}

/// How a migration leaves its table at the cutover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Columns keep their slots (every migration this build starts: start record kind
    /// 12).
    InPlace,
    /// The table is rewritten at the cutover with only its live columns, a retyped one
    /// in its old place: what a migration an earlier build started (start record kind
    /// 8, which that build carried out on a second copy of the table) cut over to, so
    /// its records, and the writes logged after it in that layout, replay as they were
    /// acknowledged.
    Compact,
}

/// The compact layout of a [`Layout::Compact`] migration's new shape.
#[derive(Debug, Clone)]
struct Compact {
    schema: TableSchema,
    /// The slot of the in-place shape each compact column reads.
    slots: Vec<usize>,
}

/// A validated migration: the v1 schema and how to convert a v0 row into it.
///
/// Columns keep their slots (FORMAT.md §5, "Rows during a migration"): v1 holds every
/// slot of v0, those of dropped columns marked dropped, then one appended slot per
/// column the migration adds or retypes. A converted row is therefore its v0 row with
/// values appended: read as v0 it is the row it was (an abort reads it so), read as v1
/// it is the new row (a cutover reads it so). The table is stored once, in place.
#[derive(Debug, Clone)]
pub struct Plan {
    pub target: TableSchema,
    /// Slots of the v0 shape.
    old_slots: usize,
    /// The v0 slots already dropped (empty when none is): a converted row holds NULL
    /// there, whatever value the row held from before the drop.
    old_dead: Vec<bool>,
    /// What each appended slot computes, in slot order.
    appended: Vec<Computed>,
    /// Set for a [`Layout::Compact`] migration: the table's shape after its cutover.
    compact: Option<Compact>,
}

struct WorkColumn {
    name: String,
    ty: ColumnType,
    nullable: bool,
    slot: Slot,
}

/// The vector dimensions `expr`'s distances read per row: a vector column's own, else
/// the most a vector may have.
fn distance_dims_of(v0: &TableSchema, expr: &Expr) -> u64 {
    let dims = |operand: &Expr| match operand {
        Expr::Column(i) => match v0.columns.get(*i).map(|c| c.ty) {
            Some(ColumnType::Vector(dims)) => Some(u64::from(dims)),
            _ => None,
        },
        _ => None,
    };
    let mut total = 0;
    expr.visit(&mut |e| {
        if let Expr::Distance(_, a, b) = e {
            total += dims(a)
                .or_else(|| dims(b))
                .unwrap_or(u64::from(crate::limits::MAX_VECTOR_DIM));
        }
    });
    total
}

/// Plans `steps` over `v0`, validating all of them before anything starts; the error
/// names the step (counted from 0) and what to fix.
pub fn plan(v0: &TableSchema, steps: &[Step], layout: Layout) -> Result<Plan, EngineError> {
    let invalid = |why: String| EngineError::InvalidMigration(why);
    check_step_count(steps.len()).map_err(invalid)?;
    let mut cols: Vec<WorkColumn> = v0
        .live_columns()
        .map(|(i, c)| WorkColumn {
            name: c.name.clone(),
            ty: c.ty,
            nullable: c.nullable,
            slot: Slot::Old(i),
        })
        .collect();
    let names = |positions: &[usize]| -> Vec<String> {
        positions
            .iter()
            .map(|&p| v0.columns[p].name.clone())
            .collect()
    };
    let mut primary_key = names(&v0.primary_key);
    // The columns' order in the compact layout: a retyped column keeps its place.
    let mut compact_order: Vec<String> = cols.iter().map(|c| c.name.clone()).collect();
    let mut indexes: Vec<(String, Vec<String>)> = v0
        .indexes
        .iter()
        .map(|i| (i.name.clone(), names(&i.columns)))
        .collect();
    let likes = std::cell::Cell::new(0);
    let distance_dims = std::cell::Cell::new(0u64);
    let in_items = std::cell::Cell::new(0);
    for (n, step) in steps.iter().enumerate() {
        let bad = |why: String| invalid(format!("step {n} ({}): {why}", step.op()));
        let find = |cols: &[WorkColumn], name: &str| {
            cols.iter().position(|c| c.name == name).ok_or_else(|| {
                bad(format!(
                    "column {name:?} does not exist at this step (columns: {})",
                    cols.iter()
                        .map(|c| c.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })
        };
        let in_key = |pk: &[String], name: &str| pk.iter().any(|k| k == name);
        let column_type = |ty: &str| {
            ColumnType::parse(ty).ok_or_else(|| {
                bad(format!(
                    "unknown type {:?}; use text, int, float, bool, json or vector(N)",
                    ty.chars().take(40).collect::<String>()
                ))
            })
        };
        let compile = |text: &str| -> Result<Computed, EngineError> {
            if text.len() > MAX_EXPRESSION_BYTES {
                return Err(bad(format!(
                    "the expression is {} bytes, above the limit of {MAX_EXPRESSION_BYTES}",
                    text.len()
                )));
            }
            let (expr, params, like) = compile_row_expr(v0, text).map_err(&bad)?;
            likes.set(likes.get() + like);
            if likes.get() > MAX_LIKE_PER_QUERY {
                return Err(bad(format!(
                    "the migration's expressions use more than {MAX_LIKE_PER_QUERY} LIKE \
                     operators together (each reads its whole text for every row)"
                )));
            }
            // A transform's lists are compared item by item: no value sets.
            in_items.set(in_items.get() + expr.in_list_items());
            if in_items.get() > MAX_IN_LIST_COMPARISONS {
                return Err(bad(format!(
                    "the migration's expressions hold more than {MAX_IN_LIST_COMPARISONS} IN \
                     list items together (each is compared on every row converted)"
                )));
            }
            distance_dims.set(distance_dims.get() + distance_dims_of(v0, &expr));
            if distance_dims.get() > MAX_DISTANCE_DIMS_PER_ROW {
                return Err(bad(format!(
                    "the migration's expressions compute distances over {} vector \
                     dimensions per row together, above the limit of \
                     {MAX_DISTANCE_DIMS_PER_ROW} (each row is transformed whole, and a write \
                     during the migration waits for its rows)",
                    distance_dims.get()
                )));
            }
            Ok(Computed { expr, params })
        };
        match step {
            Step::AddColumn {
                name,
                ty,
                nullable,
                default,
            } => {
                check_name("column name", name).map_err(|e| bad(e.to_string()))?;
                if cols.iter().any(|c| c.name == *name) {
                    return Err(bad(format!("column {name:?} already exists")));
                }
                let ty = column_type(ty)?;
                let computed = match default {
                    Some(text) => compile(text)?,
                    None if *nullable => Computed {
                        expr: Expr::Const(Value::Null),
                        params: Vec::new(),
                    },
                    None => {
                        return Err(bad(format!(
                            "column {name:?} is not nullable, so it needs a default"
                        )))
                    }
                };
                cols.push(WorkColumn {
                    name: name.clone(),
                    ty,
                    nullable: *nullable,
                    slot: Slot::New(computed),
                });
                compact_order.push(name.clone());
            }
            Step::DropColumn { name } => {
                let at = find(&cols, name)?;
                if in_key(&primary_key, name) {
                    return Err(bad(format!(
                        "column {name:?} is part of the primary key; a key cannot change online"
                    )));
                }
                if let Some((index, _)) = indexes.iter().find(|(_, c)| c.contains(name)) {
                    return Err(bad(format!(
                        "column {name:?} is used by index {index:?}; drop the index in an earlier step"
                    )));
                }
                cols.remove(at);
                compact_order.retain(|n| n != name);
            }
            Step::RenameColumn { from, to } => {
                let at = find(&cols, from)?;
                check_name("column name", to).map_err(|e| bad(e.to_string()))?;
                if cols.iter().any(|c| c.name == *to) {
                    return Err(bad(format!("column {to:?} already exists")));
                }
                cols[at].name = to.clone();
                for name in primary_key
                    .iter_mut()
                    .chain(indexes.iter_mut().flat_map(|(_, c)| c.iter_mut()))
                    .chain(compact_order.iter_mut())
                {
                    if name == from {
                        name.clone_from(to);
                    }
                }
            }
            Step::ChangeType { column, ty, using } => {
                let at = find(&cols, column)?;
                if in_key(&primary_key, column) {
                    return Err(bad(format!(
                        "column {column:?} is part of the primary key; a key cannot change online"
                    )));
                }
                // The old values stay in their slot until the cutover (an abort reads
                // them); the new ones go to a slot of their own, appended.
                let old = cols.remove(at);
                cols.push(WorkColumn {
                    ty: column_type(ty)?,
                    slot: Slot::New(compile(using)?),
                    ..old
                });
            }
            Step::AddIndex { name, columns } => {
                check_name("index name", name).map_err(|e| bad(e.to_string()))?;
                if indexes.iter().any(|(i, _)| i == name) {
                    return Err(bad(format!("index {name:?} already exists")));
                }
                for c in columns {
                    find(&cols, c)?;
                }
                indexes.push((name.clone(), columns.clone()));
            }
            Step::DropIndex { name } => {
                let at = indexes
                    .iter()
                    .position(|(i, _)| i == name)
                    .ok_or_else(|| bad(format!("index {name:?} does not exist at this step")))?;
                indexes.remove(at);
            }
        }
    }
    // Every v0 slot stays, dropped unless a column still lives in it; then the new.
    let old_slots = v0.columns.len();
    let mut slots: Vec<Column> = v0
        .columns
        .iter()
        .map(|c| Column {
            dropped: true,
            ..c.clone()
        })
        .collect();
    let mut appended = Vec::new();
    let mut slot_of = Vec::with_capacity(cols.len());
    for c in cols {
        let column = Column {
            name: c.name,
            ty: c.ty,
            nullable: c.nullable,
            dropped: false,
        };
        match c.slot {
            Slot::Old(i) => {
                slot_of.push((column.name.clone(), i));
                slots[i] = column;
            }
            Slot::New(computed) => {
                slot_of.push((column.name.clone(), slots.len()));
                slots.push(column);
                appended.push(computed);
            }
        }
    }
    let position = |name: &String| {
        slot_of
            .iter()
            .find(|(n, _)| n == name)
            .map_or(usize::MAX, |&(_, slot)| slot)
    };
    let key = primary_key.iter().map(position).collect();
    let index_slots = indexes
        .iter()
        .map(|(name, columns)| (name.clone(), columns.iter().map(position).collect()))
        .collect();
    let invalid_target =
        |e: EngineError| invalid(format!("the migrated table would be invalid: {e}"));
    let max_slots = match layout {
        Layout::InPlace => crate::limits::MAX_COLUMNS_PER_TABLE,
        // What limits that build held it to: the compact table's columns, below.
        Layout::Compact => 2 * crate::limits::MAX_COLUMNS_PER_TABLE,
    };
    let target = TableSchema::from_slots_up_to(&v0.name, slots, key, index_slots, max_slots)
        .map_err(invalid_target)?;
    let compact = match layout {
        Layout::InPlace => None,
        Layout::Compact => {
            let slots: Vec<usize> = compact_order.iter().map(position).collect();
            let columns: Vec<(&str, ColumnType, bool)> = slots
                .iter()
                .map(|&s| {
                    let c = &target.columns[s];
                    (c.name.as_str(), c.ty, c.nullable)
                })
                .collect();
            let key: Vec<&str> = primary_key.iter().map(String::as_str).collect();
            let index_columns: Vec<Vec<&str>> = indexes
                .iter()
                .map(|(_, c)| c.iter().map(String::as_str).collect())
                .collect();
            let index_specs: Vec<(&str, &[&str])> = indexes
                .iter()
                .zip(&index_columns)
                .map(|((name, _), c)| (name.as_str(), c.as_slice()))
                .collect();
            let schema =
                TableSchema::new(&v0.name, &columns, &key, &index_specs).map_err(invalid_target)?;
            Some(Compact { schema, slots })
        }
    };
    Ok(Plan {
        target,
        old_slots,
        old_dead: v0.dead_slots(),
        appended,
        compact,
    })
}

impl Plan {
    pub fn layout(&self) -> Layout {
        match self.compact {
            None => Layout::InPlace,
            Some(_) => Layout::Compact,
        }
    }

    /// Checks a converted row against the limits and types of the shape it is read
    /// in: the v1 shape, or for a [`Layout::Compact`] migration the compact row it
    /// becomes at the cutover (the row that build checked).
    pub fn check(&self, row: &Row) -> Result<(), String> {
        match &self.compact {
            None => check_transformed_row(&self.target, row),
            Some(c) => check_transformed_row(&c.schema, &self.after_cutover(row.clone())),
        }
    }

    /// A row of the in-place v1 shape as the table holds it after the cutover: with
    /// NULL in its dropped slots (no abort can read them any more), or for a
    /// [`Layout::Compact`] migration its live values in the compact order.
    fn after_cutover(&self, row: Row) -> Row {
        match &self.compact {
            None => {
                let dead = self.target.dead_slots();
                if dead.is_empty() {
                    return row;
                }
                let cleared = Row::build(|out| {
                    out.values_of(&row, dead.len(), &dead);
                    Ok::<(), std::convert::Infallible>(())
                });
                match cleared {
                    Ok(cleared) => cleared,
                    Err(never) => match never {},
                }
            }
            Some(c) => {
                let values: Vec<Value> = c.slots.iter().map(|&s| row.get(s).to_value()).collect();
                Row::from_values(&values)
            }
        }
    }

    /// The v1 row of a v0 row, or why it has none: the v0 slots as they are, then the
    /// appended values, converted to each column's type by the rules a JSON write
    /// follows (an int fills a float column; anything fills a json column). A row
    /// holding values past the v0 slots (appended by a migration that did not cut
    /// over) has them replaced. The caller checks the row against the v1 table.
    pub fn transform(&self, row: &Row) -> Result<Row, String> {
        let new_columns = &self.target.columns[self.old_slots..];
        Row::build(|out| {
            out.values_of(row, self.old_slots, &self.old_dead);
            for (computed, column) in self.appended.iter().zip(new_columns) {
                let v = crate::query::with_stack(|| computed.expr.eval(row, &computed.params))
                    .map_err(|e| format!("column {:?}: {e}", column.name))?
                    .into_owned();
                let value = if v.is_null() {
                    Value::Null
                } else {
                    Value::from_json(&v.to_json(), column.ty)
                        .map_err(|e| format!("column {:?}: {e}", column.name))?
                };
                if value.is_null() && !column.nullable {
                    return Err(format!(
                        "column {:?} would be null but is not nullable",
                        column.name
                    ));
                }
                out.value(&value);
            }
            Ok(())
        })
    }
}

/// Where a migration is (the API's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationState {
    /// Logged; no chunk converted yet.
    Pending,
    Backfilling,
    /// Every row that existed at the start is converted; the cutover is next.
    CutoverReady,
    Done,
    Aborted,
    Failed,
}

impl MigrationState {
    pub const ALL: [MigrationState; 6] = [
        MigrationState::Pending,
        MigrationState::Backfilling,
        MigrationState::CutoverReady,
        MigrationState::Done,
        MigrationState::Aborted,
        MigrationState::Failed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            MigrationState::Pending => "pending",
            MigrationState::Backfilling => "backfilling",
            MigrationState::CutoverReady => "cutover_ready",
            MigrationState::Done => "done",
            MigrationState::Aborted => "aborted",
            MigrationState::Failed => "failed",
        }
    }

    pub fn is_active(self) -> bool {
        matches!(
            self,
            MigrationState::Pending | MigrationState::Backfilling | MigrationState::CutoverReady
        )
    }

    pub(crate) fn code(self) -> u8 {
        match self {
            MigrationState::Pending => 1,
            MigrationState::Backfilling => 2,
            MigrationState::CutoverReady => 3,
            MigrationState::Done => 4,
            MigrationState::Aborted => 5,
            MigrationState::Failed => 6,
        }
    }

    pub(crate) fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.code() == code)
    }
}

/// What `GET …/migrations/:id` reports.
#[derive(Debug, Clone, PartialEq)]
pub struct MigrationInfo {
    /// The LSN of the start record.
    pub id: u64,
    pub table: String,
    pub steps: Vec<Step>,
    pub state: MigrationState,
    pub reason: Option<String>,
    pub started: TimestampMicros,
    /// Zero while active.
    pub finished: TimestampMicros,
    /// Rows the table held at the start (the backfill's work).
    pub rows_total: u64,
    /// Rows the backfill has converted.
    pub rows_done: u64,
}

/// A migration in progress: its plan, how far its backfill got, and the new shape's
/// indexes built over the rows converted so far.
#[derive(Debug, Clone)]
pub struct ActiveMigration {
    pub info: MigrationInfo,
    /// The base table incarnation it migrates.
    pub table_version: u64,
    plan: Plan,
    built: NewStructures,
    /// The last base key converted by the backfill (`None`: none yet).
    cursor: Option<Vec<u8>>,
    /// The last base key when the migration started (`None`: the table was empty).
    end_key: Option<Vec<u8>>,
}

impl ActiveMigration {
    fn new(info: MigrationInfo, table_version: u64, base: &TableSchema, plan: Plan) -> Self {
        ActiveMigration {
            info,
            table_version,
            built: NewStructures::new(base, &plan.target),
            plan,
            cursor: None,
            end_key: None,
        }
    }

    /// A v0 row in the new shape (what a chunk does to each row, and a read during
    /// the migration to every row not converted yet).
    pub fn transform(&self, row: &Row) -> Result<Row, String> {
        self.plan.transform(row)
    }

    pub fn layout(&self) -> Layout {
        self.plan.layout()
    }

    /// The new shape: the v0 slots (dropped columns marked), then the appended ones;
    /// its indexes.
    pub fn target_schema(&self) -> &TableSchema {
        &self.plan.target
    }

    /// A stored row as a read during the migration sees it: as it is when the
    /// migration converted it already; else transformed, and held to the limits the
    /// backfill holds it to (a row that fails either fails the migration when the
    /// backfill reaches it).
    pub fn read_view<'r>(&self, row: &'r Row) -> Result<Cow<'r, Row>, String> {
        let target = &self.plan.target;
        let stored_converted = row.len() == target.columns.len()
            && self.converted(row.tree_key(&target.primary_key).as_bytes());
        if stored_converted {
            return Ok(Cow::Borrowed(row));
        }
        let reshaped = self.plan.transform(row)?;
        self.plan.check(&reshaped)?;
        Ok(Cow::Owned(reshaped))
    }

    /// The slot of old column `v0` in the new shape if the migration keeps its values
    /// as they are (renamed or not): its own; `None` when it drops or retypes it.
    pub fn unchanged_position(&self, v0: usize) -> Option<usize> {
        (v0 < self.plan.old_slots && !self.plan.target.columns[v0].dropped).then_some(v0)
    }

    pub fn cursor(&self) -> Option<&[u8]> {
        self.cursor.as_deref()
    }

    pub fn end_key(&self) -> Option<&[u8]> {
        self.end_key.as_deref()
    }

    /// Whether the backfill has converted every row up to `end_key`.
    pub fn caught_up(&self) -> bool {
        match (&self.end_key, &self.cursor) {
            (None, _) => true,
            (Some(end), Some(cursor)) => cursor >= end,
            (Some(_), None) => false,
        }
    }

    /// Whether the row at `key` is stored converted: by the backfill already (at or
    /// behind the cursor), or written during the migration past the table's last key
    /// at its start. Rows in between are the backfill's to convert; they are stored
    /// as v0 rows, and a write to one stores a v0 row.
    fn converted(&self, key: &[u8]) -> bool {
        self.cursor.as_deref().is_some_and(|c| key <= c)
            || self.end_key.as_deref().is_none_or(|e| key > e)
    }

    /// How each write of a v0 batch is stored, or why the migration cannot carry the
    /// batch: every upsert is transformed and checked, and one whose row is stored
    /// converted is stored as its v1 row (`Some`); the others are stored as written.
    fn carry(&self, writes: &[RowWrite]) -> Result<Vec<Option<Row>>, EngineError> {
        let target = &self.plan.target;
        let refused = |row: usize, why: String| EngineError::MigrationRefused {
            id: self.info.id,
            table: self.info.table.clone(),
            row,
            why,
        };
        let mut out = Vec::with_capacity(writes.len());
        for (row, write) in writes.iter().enumerate() {
            out.push(match write {
                RowWrite::Upsert(values) => {
                    let v1 = self
                        .plan
                        .transform(values)
                        .map_err(|why| refused(row, why))?;
                    self.plan.check(&v1).map_err(|why| refused(row, why))?;
                    let key = v1.key(&target.primary_key);
                    self.converted(&key).then_some(v1)
                }
                RowWrite::Delete(_) => None,
            });
        }
        Ok(out)
    }

    /// Applies carried writes to `base` one at a time, keeping the new shape's
    /// structures in step with the converted rows they replace, add or delete.
    fn apply(
        &mut self,
        base: &mut Table,
        writes: Vec<RowWrite>,
        carried: Vec<Option<Row>>,
        lsn: u64,
    ) -> BatchOutcome {
        let target = &self.plan.target;
        let mut outcome = BatchOutcome::default();
        base.set_written_lsn(lsn);
        for (write, v1) in writes.into_iter().zip(carried) {
            let write = match v1 {
                Some(v1) => RowWrite::Upsert(v1),
                None => write,
            };
            let key = match &write {
                RowWrite::Upsert(row) => row.key(&target.primary_key),
                RowWrite::Delete(key) => key.clone(),
            };
            if self.converted(&key) {
                if let Some(old) = base.row_by_key(&Key::new(key)) {
                    self.built.remove(target, old);
                }
                if let RowWrite::Upsert(row) = &write {
                    self.built.insert(target, row);
                }
            }
            base.apply_one(write, &mut outcome);
        }
        outcome
    }

    /// Converts the base rows after the cursor up to `upto` (and not past `end_key`)
    /// in place; returns the rows converted. Every row is transformed before any is
    /// stored: a row that does not migrate leaves the table as it was.
    fn convert(&mut self, base: &mut Table, upto: &[u8], lsn: u64) -> Result<u64, String> {
        let target = &self.plan.target;
        let limit = match &self.end_key {
            Some(end) if end.as_slice() < upto => end.clone(),
            Some(_) => upto.to_vec(),
            None => return Ok(0),
        };
        let mut converted = Vec::new();
        for (key, row) in base.rows_after(self.cursor.as_deref()) {
            if key > limit.as_slice() {
                break;
            }
            let named = || row_key_shown(base.schema(), row);
            let v1 = self
                .plan
                .transform(row)
                .map_err(|why| format!("the row {} does not migrate: {why}", named()))?;
            self.plan
                .check(&v1)
                .map_err(|e| format!("the row {} does not migrate: {e}", named()))?;
            converted.push(v1);
        }
        let rows = converted.len() as u64;
        base.set_written_lsn(lsn);
        let mut outcome = BatchOutcome::default();
        for v1 in converted {
            self.built.insert(target, &v1);
            base.apply_one(RowWrite::Upsert(v1), &mut outcome);
        }
        if self.cursor.as_deref().is_none_or(|c| c < limit.as_slice()) {
            self.cursor = Some(limit);
        }
        Ok(rows)
    }
}

/// A row's primary key for a message, as its columns and values (`id = 50`), cut
/// short.
pub(crate) fn row_key_shown(schema: &TableSchema, row: &Row) -> String {
    let shown = schema
        .primary_key
        .iter()
        .map(|&i| {
            let value = row.get(i).to_value().to_json().to_string();
            format!("{} = {value}", schema.columns[i].name)
        })
        .collect::<Vec<_>>()
        .join(", ");
    match shown.char_indices().nth(200) {
        Some((cut, _)) => format!("{}…", &shown[..cut]),
        None => shown,
    }
}

/// A key for a message: hex, cut short.
pub(crate) fn render_key(key: &[u8]) -> String {
    let hex: String = key.iter().take(32).map(|b| format!("{b:02x}")).collect();
    if key.len() > 32 {
        format!("{hex}…")
    } else {
        hex
    }
}

fn reason(why: String) -> String {
    if why.len() <= MAX_REASON_BYTES {
        return why;
    }
    let mut end = MAX_REASON_BYTES;
    while !why.is_char_boundary(end) {
        end -= 1;
    }
    why[..end].to_string()
}

/// What carries a write across the cutover that replaced table incarnation
/// `from_version`.
#[derive(Debug, Clone)]
struct Carried {
    id: u64,
    /// The shape it replaced.
    v0: TableSchema,
    from_version: u64,
    /// The incarnation the cutover made (its LSN).
    to_version: u64,
    plan: Plan,
}

/// A tenant's migrations: the active one per table and the finished ones.
#[derive(Debug, Clone, Default)]
pub struct Migrations {
    pub(crate) active: std::collections::BTreeMap<String, ActiveMigration>,
    pub(crate) finished: VecDeque<MigrationInfo>,
    /// The plan of each table's last cutover, by the incarnation it replaced: a write
    /// validated against that incarnation whose apply came after the cutover is
    /// carried into the new shape and logged again ([`Migrations::carry_across_cutover`]).
    /// Memory only: no apply reads it, so replay needs none of it, and a restart
    /// leaves no write in flight to carry.
    carried: std::collections::BTreeMap<String, Carried>,
    /// Counts starts and ends: what a read sees of a table changes with them (dual
    /// read), so cached plans are keyed on it too.
    generation: u64,
}

impl Migrations {
    pub fn active(&self, table: &str) -> Option<&ActiveMigration> {
        self.active.get(table)
    }

    /// The shape `table` had as incarnation `version`, when its last cutover (applied
    /// by this process) replaced that incarnation.
    pub fn replaced_schema(&self, table: &str, version: u64) -> Option<&TableSchema> {
        let carried = self.carried.get(table)?;
        (carried.from_version == version).then_some(&carried.v0)
    }

    /// Moves on at every start and end of a migration (memory only).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Puts a migration in place, active.
    fn activate(&mut self, table: String, active: ActiveMigration) {
        self.generation += 1;
        self.active.insert(table, active);
    }

    pub fn all_active(&self) -> impl Iterator<Item = &ActiveMigration> {
        self.active.values()
    }

    pub fn finished(&self) -> impl Iterator<Item = &MigrationInfo> {
        self.finished.iter()
    }

    /// Every migration, oldest first.
    pub fn list(&self) -> Vec<MigrationInfo> {
        let mut all: Vec<MigrationInfo> = self
            .finished
            .iter()
            .cloned()
            .chain(self.active.values().map(|m| m.info.clone()))
            .collect();
        all.sort_by_key(|m| m.id);
        all
    }

    pub fn get(&self, id: u64) -> Option<MigrationInfo> {
        self.active
            .values()
            .map(|m| &m.info)
            .chain(self.finished.iter())
            .find(|m| m.id == id)
            .cloned()
    }

    pub(crate) fn remember(&mut self, info: MigrationInfo) {
        self.finished.retain(|m| m.id != info.id);
        self.finished.push_back(info);
        while self.finished.len() > MIGRATION_HISTORY {
            self.finished.pop_front();
        }
    }

    /// How a batch to `table` is stored when a migration is active on it (see
    /// [`ActiveMigration::carry`]), or why the migration cannot carry it.
    pub(crate) fn carry(
        &self,
        table: &str,
        writes: &[RowWrite],
    ) -> Result<Option<Vec<Option<Row>>>, EngineError> {
        self.active.get(table).map(|m| m.carry(writes)).transpose()
    }

    /// Applies a batch to `base`, through the migration active on it if there is one
    /// for this incarnation; all or nothing.
    pub(crate) fn apply_writes(
        &mut self,
        base: &mut Table,
        writes: Vec<RowWrite>,
        lsn: u64,
    ) -> Result<BatchOutcome, EngineError> {
        match self
            .active
            .get_mut(&base.schema().name)
            .filter(|m| m.table_version == base.version())
        {
            None => Ok(base.apply(writes, lsn)),
            Some(m) => {
                let carried = m.carry(&writes)?;
                Ok(m.apply(base, writes, carried, lsn))
            }
        }
    }

    /// Drops the active migration of a table that is dropped or replaced.
    pub(crate) fn forget_table(&mut self, table: &str) {
        self.generation += 1;
        self.active.remove(table);
        self.carried.remove(table);
    }

    /// `writes`, validated against incarnation `from_version` of `target`, in the shape
    /// of `target` as it is now, when a migration's cutover replaced that incarnation
    /// with this one (`None`: it did not).
    pub(crate) fn carry_across_cutover(
        &self,
        target: &Table,
        from_version: u64,
        writes: &[RowWrite],
    ) -> Option<Result<Vec<RowWrite>, EngineError>> {
        let table = &target.schema().name;
        let carried = self.carried.get(table)?;
        if carried.from_version != from_version || carried.to_version != target.version() {
            return None;
        }
        let carry = |(row, write): (usize, &RowWrite)| {
            let refused = |why| EngineError::MigrationRefused {
                id: carried.id,
                table: table.clone(),
                row,
                why,
            };
            match write {
                RowWrite::Upsert(values) => {
                    let v1 = carried.plan.transform(values).map_err(refused)?;
                    let v1 = carried.plan.after_cutover(v1);
                    target.check_transformed_row(&v1).map_err(refused)?;
                    Ok(RowWrite::Upsert(v1))
                }
                RowWrite::Delete(key) => Ok(RowWrite::Delete(key.clone())),
            }
        };
        Some(writes.iter().enumerate().map(carry).collect())
    }

    /// The write records a keyed request `ops` to `target` would have been logged as
    /// when first sent before the cutover that made `target`: as it was (the old
    /// shape), and as carried across the cutover. A retry of it is validated against
    /// the new shape, so its record, and the hash its key remembers, differ from the
    /// first attempt's; these are what the first attempt's hash is compared with.
    pub(crate) fn first_attempts_across_cutover(
        &self,
        target: &Table,
        ops: &[crate::table::WriteOp],
        key: &str,
    ) -> Vec<crate::command::Command> {
        let table = &target.schema().name;
        let Some(carried) = self
            .carried
            .get(table)
            .filter(|c| c.to_version == target.version())
        else {
            return Vec::new();
        };
        let v0 = Table::new(carried.v0.clone(), carried.from_version);
        let Ok(writes) = v0.validate_batch(ops) else {
            return Vec::new();
        };
        let write = |table_version, writes| crate::command::Command::Write {
            table: table.clone(),
            table_version,
            writes,
            idempotency_key: Some(key.to_string()),
        };
        let mut attempts = Vec::with_capacity(2);
        if let Some(Ok(v1)) = self.carry_across_cutover(target, carried.from_version, &writes) {
            attempts.push(write(carried.to_version, v1));
        }
        attempts.push(write(carried.from_version, writes));
        attempts
    }
}

fn conflict(why: String) -> EngineError {
    EngineError::MigrationConflict(why)
}

/// Applies a start record at `lsn`: the migration's id.
pub(crate) fn start(
    tenant: &mut Tenant,
    table: &str,
    table_version: u64,
    steps: Vec<Step>,
    layout: Layout,
    lsn: Lsn,
    committed: TimestampMicros,
) -> Result<u64, EngineError> {
    if tenant.migrations().get(lsn.0).is_some() {
        // Replayed over a checkpoint that holds this migration already (active, or
        // ended while the checkpoint was copied): it stands as the checkpoint has it.
        // (Live, an id is its start's own LSN: never known before.)
        return Ok(lsn.0);
    }
    let base = tenant.table(table)?;
    if base.version() != table_version {
        return Err(EngineError::TableChanged {
            table: table.to_string(),
        });
    }
    if let Some(m) = tenant.migrations().active(table) {
        return Err(conflict(format!(
            "table {table:?} is already migrating (migration {}); wait for it or abort it",
            m.info.id
        )));
    }
    let plan = plan(base.schema(), &steps, layout)?;
    let end_key = base.last_key().map(<[u8]>::to_vec);
    let rows_total = base.usage().rows as u64;
    let info = MigrationInfo {
        id: lsn.0,
        table: table.to_string(),
        steps,
        state: MigrationState::Pending,
        reason: None,
        started: committed,
        finished: TimestampMicros(0),
        rows_total,
        rows_done: 0,
    };
    let active = ActiveMigration {
        end_key,
        ..ActiveMigration::new(info, table_version, base.schema(), plan)
    };
    tenant.migrations_mut().activate(table.to_string(), active);
    Ok(lsn.0)
}

/// Whether `id` is the active migration of `table`, or why there is none to act on.
fn check_active(tenant: &Tenant, table: &str, id: u64) -> Result<(), EngineError> {
    let migrations = tenant.migrations();
    match migrations.active.get(table) {
        Some(m) if m.info.id == id => Ok(()),
        _ => Err(match migrations.get(id) {
            Some(info) => conflict(format!(
                "migration {id} is {}, not in progress",
                info.state.name()
            )),
            None => EngineError::NotFound {
                what: "migration",
                name: id.to_string(),
            },
        }),
    }
}

/// Ends the active migration of `table` in `state`; returns it when it cut over (its
/// structures become the table's).
fn finish(
    tenant: &mut Tenant,
    table: &str,
    state: MigrationState,
    why: Option<String>,
    committed: TimestampMicros,
) -> Option<ActiveMigration> {
    let migrations = tenant.migrations_mut();
    let mut m = migrations.active.remove(table)?;
    migrations.generation += 1;
    m.info.state = state;
    m.info.reason = why.map(reason);
    m.info.finished = committed;
    migrations.remember(m.info.clone());
    if state == MigrationState::Done {
        return Some(m);
    }
    // What it built goes, off the shard thread. Rows it converted keep the values
    // it appended: the table's shape does not read them, the next write of the row
    // or a checkpoint's copy leaves them out, and a later migration replaces them.
    crate::reclaim::later(m.built);
    None
}

/// Applies a backfill chunk: the rows converted, or the migration fails.
pub(crate) fn backfill(
    tenant: &mut Tenant,
    table: &str,
    id: u64,
    upto: &[u8],
    lsn: Lsn,
    committed: TimestampMicros,
) -> Result<MigrationState, EngineError> {
    match convert_active(tenant, table, id, Some(upto), lsn)? {
        Ok((rows, caught_up, m)) => {
            // Rows written during the migration below the end key are converted again;
            // progress counts up to the rows there were.
            m.info.rows_done = (m.info.rows_done + rows).min(m.info.rows_total);
            m.info.state = if caught_up {
                MigrationState::CutoverReady
            } else {
                MigrationState::Backfilling
            };
            Ok(m.info.state)
        }
        Err(why) => {
            finish(tenant, table, MigrationState::Failed, Some(why), committed);
            Ok(MigrationState::Failed)
        }
    }
}

/// Converts the rows of the active migration `id` of `table` up to `upto` (its end
/// key when `None`): the rows converted, whether the backfill has caught up, and the
/// migration; or why a row does not migrate.
fn convert_active<'a>(
    tenant: &'a mut Tenant,
    table: &str,
    id: u64,
    upto: Option<&[u8]>,
    lsn: Lsn,
) -> Result<Result<(u64, bool, &'a mut ActiveMigration), String>, EngineError> {
    check_active(tenant, table, id)?;
    let (base, migrations) = tenant.base_and_migrations(table)?;
    let Some(m) = migrations.active.get_mut(table) else {
        unreachable!("checked above")
    };
    let upto = upto.map_or_else(|| m.end_key.clone().unwrap_or_default(), <[u8]>::to_vec);
    Ok(m.convert(base, &upto, lsn.0).map(|rows| {
        let caught_up = m.caught_up();
        (rows, caught_up, m)
    }))
}

/// Applies a cutover: what the backfill had not reached yet is converted (nothing,
/// when the backfill caught up, as the driver waits for), then the table takes the new
/// shape, a new incarnation whose version is the cutover's LSN. Its rows are converted
/// already, so this touches none of them (but for a [`Layout::Compact`] migration of
/// an earlier build's log, whose table is rewritten in that layout).
pub(crate) fn cutover(
    tenant: &mut Tenant,
    table: &str,
    id: u64,
    lsn: Lsn,
    committed: TimestampMicros,
) -> Result<MigrationState, EngineError> {
    match convert_active(tenant, table, id, None, lsn)? {
        Ok((_, _, m)) => m.info.rows_done = m.info.rows_total,
        Err(why) => {
            finish(tenant, table, MigrationState::Failed, Some(why), committed);
            return Ok(MigrationState::Failed);
        }
    }
    let Some(m) = finish(tenant, table, MigrationState::Done, None, committed) else {
        unreachable!("checked above")
    };
    let v0 = match &m.plan.compact {
        None => tenant.cut_over_table(table, m.plan.target.clone(), m.built, lsn.0)?,
        Some(compact) => {
            crate::reclaim::later(m.built);
            let base = tenant.table(table)?;
            let v0 = base.schema().clone();
            let mut rewritten = Table::new(compact.schema.clone(), lsn.0);
            let rows = base
                .rows()
                .map(|r| RowWrite::Upsert(m.plan.after_cutover(r.clone())));
            rewritten.apply(rows.collect(), lsn.0);
            tenant.replace_table(rewritten, lsn.0);
            v0
        }
    };
    let carried = Carried {
        id,
        v0,
        from_version: m.table_version,
        to_version: lsn.0,
        plan: m.plan,
    };
    tenant
        .migrations_mut()
        .carried
        .insert(table.to_string(), carried);
    Ok(MigrationState::Done)
}

/// Ends the active migration of a dropped table as aborted, saying why.
pub(crate) fn end_with_table(tenant: &mut Tenant, table: &str, committed: TimestampMicros) {
    let why = Some(format!("table {table:?} was dropped"));
    finish(tenant, table, MigrationState::Aborted, why, committed);
}

/// Applies an abort: what the migration built goes; the table reads as it was.
pub(crate) fn abort(
    tenant: &mut Tenant,
    table: &str,
    id: u64,
    committed: TimestampMicros,
) -> Result<MigrationState, EngineError> {
    check_active(tenant, table, id)?;
    finish(tenant, table, MigrationState::Aborted, None, committed);
    Ok(MigrationState::Aborted)
}

/// Attaches a migration loaded from a checkpoint to its (already loaded) table and
/// builds the new shape's structures over the rows it converted: those up to the
/// cursor and after `end_key` (rows after it were written during the migration). Each
/// is checked against the new shape first (the checkpoint's bytes are untrusted).
pub(crate) fn restore_active(
    tenant: &mut Tenant,
    info: MigrationInfo,
    table_version: u64,
    cursor: Option<Vec<u8>>,
    end_key: Option<Vec<u8>>,
    layout: Layout,
    loaded_at: Lsn,
) -> Result<(), EngineError> {
    let base = tenant.table(&info.table)?;
    if base.version() != table_version {
        return Err(EngineError::TableChanged {
            table: info.table.clone(),
        });
    }
    let plan = plan(base.schema(), &info.steps, layout)?;
    let table = info.table.clone();
    let mut m = ActiveMigration {
        cursor,
        end_key,
        ..ActiveMigration::new(info, table_version, base.schema(), plan)
    };
    let target = &m.plan.target;
    let bad = |key: &[u8], why: String| EngineError::Replay {
        lsn: loaded_at.0,
        why: format!(
            "migration {}: the converted row {} does not fit the new shape: {why}",
            m.info.id,
            render_key(key)
        ),
    };
    // A checkpoint of a build that kept the new shape apart (a compact migration's)
    // holds these rows unconverted: they are converted here, as that build had them.
    // This build's checkpoints hold them converted.
    let mut unconverted = Vec::new();
    for (key, row) in base.rows_after(None) {
        if !m.converted(key) {
            continue;
        }
        if row.len() == target.columns.len() {
            m.plan.check(row).map_err(|why| bad(key, why))?;
        } else if layout == Layout::InPlace {
            return Err(bad(key, format!("{} values, not converted", row.len())));
        } else {
            let v1 = m.plan.transform(row).map_err(|why| bad(key, why))?;
            m.plan.check(&v1).map_err(|why| bad(key, why))?;
            unconverted.push(v1);
        }
    }
    let base = tenant.table_mut(&table)?;
    let mut outcome = BatchOutcome::default();
    for v1 in unconverted {
        base.apply_one(RowWrite::Upsert(v1), &mut outcome);
    }
    for (key, row) in base.rows_after(None) {
        if m.converted(key) {
            m.built.insert(target, row);
        }
    }
    tenant.migrations_mut().activate(table, m);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ColumnType::*;

    fn v0() -> TableSchema {
        TableSchema::new(
            "items",
            &[("id", Int, false), ("name", Text, true), ("n", Int, true)],
            &["id"],
            &[("by_n", &["n"])],
        )
        .expect("valid")
    }

    fn steps(json: &str) -> Vec<Step> {
        parse_steps(json.as_bytes()).expect("steps parse")
    }

    fn err(json: &str) -> String {
        plan(&v0(), &steps(json), Layout::InPlace)
            .expect_err("invalid")
            .to_string()
    }

    /// Each expression is within the per-query limit on LIKE; together they are not.
    #[test]
    fn a_migrations_expressions_share_the_limit_on_like_operators() {
        let step = |i: usize| {
            let likes = ["name LIKE '%zz'"; 9].join(" AND ");
            format!(r#"{{"op":"add_column","name":"c{i}","type":"bool","default":"{likes}"}}"#)
        };
        let one = format!("[{}]", step(0));
        plan(&v0(), &steps(&one), Layout::InPlace).expect("9 LIKE operators");
        let two = format!("[{},{}]", step(0), step(1));
        let refused = err(&two);
        assert!(
            refused.contains("step 1") && refused.contains("16 LIKE"),
            "{refused}"
        );
    }

    /// `IN` list items (compared one by one on every row converted) share one limit
    /// across steps, constants and columns alike.
    #[test]
    fn a_migrations_expressions_share_the_limit_on_in_list_items() {
        let step = |i: usize, item: &str| {
            let list = vec![item; 150].join(", ");
            format!(
                r#"{{"op":"add_column","name":"c{i}","type":"bool","default":"name IN ({list})"}}"#
            )
        };
        let one = format!("[{}]", step(0, "name"));
        plan(&v0(), &steps(&one), Layout::InPlace).expect("150 items");
        for item in ["name", "'a'"] {
            let two = format!("[{},{}]", step(0, item), step(1, item));
            let refused = err(&two);
            assert!(refused.contains("256 IN list items"), "{refused}");
        }
    }

    /// Distances are counted by the dimensions they read per row, across steps.
    #[test]
    fn a_migrations_distances_share_a_limit_on_the_dimensions_they_read() {
        let embedded = TableSchema::new(
            "items",
            &[
                ("id", Int, false),
                ("e", Vector(4096), true),
                ("s", Vector(4), true),
            ],
            &["id"],
            &[],
        )
        .expect("valid");
        let step = |i: usize, column: &str, distances: usize| {
            let sum = vec![format!("({column} <-> {column})"); distances].join(" + ");
            format!(r#"{{"op":"add_column","name":"d{i}","type":"float","default":"{sum}"}}"#)
        };
        let planned = |json: String| plan(&embedded, &steps(&json), Layout::InPlace);
        planned(format!("[{},{}]", step(0, "e", 8), step(1, "e", 8))).expect("16 × 4096");
        let refused = planned(format!("[{},{}]", step(0, "e", 8), step(1, "e", 9)))
            .expect_err("17 × 4096")
            .to_string();
        assert!(
            refused.contains("step 1") && refused.contains("69632 vector dimensions"),
            "{refused}"
        );
        // A small vector's distances cost what it holds.
        planned(format!("[{}]", step(0, "s", 200))).expect("200 × 4");
    }

    #[test]
    fn a_plan_builds_the_v1_shape_and_transforms_rows() {
        let p = plan(
            &v0(),
            &steps(
                r#"[{"op":"add_column","name":"twice","type":"int","default":"n * 2"},
                    {"op":"drop_index","name":"by_n"},
                    {"op":"change_type","column":"n","type":"float","using":"n + 0.5"},
                    {"op":"rename_column","from":"name","to":"title"},
                    {"op":"add_index","name":"by_title","columns":["title"]}]"#,
            ),
            Layout::InPlace,
        )
        .expect("plan");
        // Every v0 slot stays (the retyped column's old slot dropped), the added and
        // the retyped columns are appended.
        let slots: Vec<(&str, bool)> = p
            .target
            .columns
            .iter()
            .map(|c| (c.name.as_str(), c.dropped))
            .collect();
        assert_eq!(
            slots,
            [
                ("id", false),
                ("title", false),
                ("n", true),
                ("twice", false),
                ("n", false)
            ]
        );
        assert_eq!(p.target.columns[4].ty, Float);
        assert_eq!(p.target.column("n"), Some(4));
        assert_eq!(p.target.indexes.len(), 1);
        assert_eq!(p.target.indexes[0].name, "by_title");
        assert_eq!(p.target.indexes[0].columns, [1]);
        let row = Row::from_values(&[Value::Int(1), Value::Text("a".into()), Value::Int(20)]);
        let v1 = p.transform(&row).expect("transforms");
        assert_eq!(
            v1.to_values(),
            vec![
                Value::Int(1),
                Value::Text("a".into()),
                Value::Int(20),
                Value::Int(40),
                Value::Float(20.5)
            ]
        );
        assert_eq!(
            v1.encoded_prefix(3),
            row.encoded_values(),
            "a converted row read as v0 is the row it was"
        );
        let json = crate::table::row_to_json(&p.target, &v1);
        assert_eq!(
            serde_json::Value::Object(json),
            serde_json::json!({"id": 1, "title": "a", "twice": 40, "n": 20.5})
        );
        let null_n = Row::from_values(&[Value::Int(2), Value::Null, Value::Null]);
        assert_eq!(
            p.transform(&null_n).expect("nulls propagate").to_values(),
            vec![
                Value::Int(2),
                Value::Null,
                Value::Null,
                Value::Null,
                Value::Null
            ]
        );
        // Converting again (a chunk replayed over a row converted already) replaces
        // the appended values: the same row.
        assert_eq!(p.transform(&v1).expect("again"), v1);
    }

    /// The shape the shadow design (4ec16f7) cut over to, for an earlier build's log:
    /// live columns only, a retyped column in its old place, indexes by name.
    #[test]
    fn a_compact_plan_is_the_shape_an_earlier_build_cut_over_to() {
        let p = plan(
            &v0(),
            &steps(
                r#"[{"op":"drop_index","name":"by_n"},
                    {"op":"change_type","column":"n","type":"float","using":"n + 0.5"},
                    {"op":"add_column","name":"a","type":"int","default":"n"},
                    {"op":"rename_column","from":"name","to":"title"},
                    {"op":"add_index","name":"by_a","columns":["a"]},
                    {"op":"add_index","name":"by_n2","columns":["n"]}]"#,
            ),
            Layout::Compact,
        )
        .expect("plan");
        let expected = TableSchema::new(
            "items",
            &[
                ("id", Int, false),
                ("title", Text, true),
                ("n", Float, true),
                ("a", Int, true),
            ],
            &["id"],
            &[("by_a", &["a"]), ("by_n2", &["n"])],
        )
        .expect("valid");
        let compact = p.compact.as_ref().expect("compact");
        assert_eq!(compact.schema, expected);
        let row = Row::from_values(&[Value::Int(1), Value::Text("x".into()), Value::Int(20)]);
        let v1 = p.transform(&row).expect("transforms");
        assert_eq!(
            p.after_cutover(v1).to_values(),
            [
                Value::Int(1),
                Value::Text("x".into()),
                Value::Float(20.5),
                Value::Int(20)
            ]
        );
    }

    /// A full table: its compact shape stays within the column limit (a drop frees a
    /// column), though its slots until the cutover do not; in place, they must.
    #[test]
    fn a_full_table_migrates_compact_but_its_slots_bound_an_in_place_migration() {
        let names: Vec<String> = (0..crate::limits::MAX_COLUMNS_PER_TABLE)
            .map(|i| format!("c{i}"))
            .collect();
        let columns: Vec<(&str, ColumnType, bool)> =
            names.iter().map(|n| (n.as_str(), Int, true)).collect();
        let full = TableSchema::new("wide", &columns, &["c0"], &[]).expect("valid");
        let steps = steps(
            r#"[{"op":"drop_column","name":"c1"},{"op":"add_column","name":"z","type":"int"}]"#,
        );
        let compact = plan(&full, &steps, Layout::Compact).expect("compact");
        assert_eq!(
            compact
                .compact
                .as_ref()
                .expect("compact")
                .schema
                .columns
                .len(),
            crate::limits::MAX_COLUMNS_PER_TABLE
        );
        let refused = plan(&full, &steps, Layout::InPlace).expect_err("one slot too many");
        assert!(
            refused
                .to_string()
                .contains("a dropped column keeps its slot"),
            "{refused}"
        );
    }

    #[test]
    fn invalid_steps_are_named_with_what_to_fix() {
        assert!(err(r#"[{"op":"drop_column","name":"id"}]"#).contains("primary key"));
        assert!(err(r#"[{"op":"drop_column","name":"n"}]"#).contains("index \"by_n\""));
        assert!(err(r#"[{"op":"drop_column","name":"zz"}]"#).contains("step 0 (drop_column)"));
        assert!(
            err(r#"[{"op":"add_column","name":"x","type":"int","nullable":false}]"#)
                .contains("needs a default")
        );
        assert!(
            err(r#"[{"op":"add_column","name":"x","type":"int","default":"nope + 1"}]"#)
                .contains("nope")
        );
        assert!(err(r#"[{"op":"add_column","name":"x","type":"blob"}]"#).contains("unknown type"));
        assert!(err(
            r#"[{"op":"rename_column","from":"name","to":"t"},{"op":"rename_column","from":"name","to":"u"}]"#
        )
        .contains("step 1"));
        assert!(
            err(r#"[{"op":"change_type","column":"id","type":"text","using":"id"}]"#)
                .contains("primary key")
        );
        assert!(
            err(r#"[{"op":"add_index","name":"by_n","columns":["n"]}]"#).contains("already exists")
        );
        assert!(parse_steps(b"[]").is_err());
        assert!(parse_steps(br#"[{"op":"drop_column","name":"n","extra":1}]"#).is_err());
        assert!(parse_steps(br#"[{"op":"explode"}]"#).is_err());
    }

    #[test]
    fn a_value_the_new_type_cannot_hold_is_a_transform_error() {
        let p = plan(
            &v0(),
            &steps(r#"[{"op":"change_type","column":"name","type":"int","using":"name"}]"#),
            Layout::InPlace,
        )
        .expect("plan");
        let row = Row::from_values(&[Value::Int(1), Value::Text("abc".into()), Value::Null]);
        let why = p.transform(&row).expect_err("text is not an int");
        assert!(why.contains("column \"name\""), "{why}");
    }
}

#[cfg(test)]
mod apply_tests {
    use super::*;
    use crate::apply::{apply, Applied, ShardState};
    use crate::command::Command;
    use crate::row::ValueRef;
    use crate::tenant_id::TenantId;
    use ColumnType::*;

    struct Log {
        state: ShardState,
        tenant: TenantId,
        next: u64,
    }

    impl Log {
        fn new() -> Self {
            let mut log = Log {
                state: ShardState::default(),
                tenant: TenantId::parse("acme").expect("valid"),
                next: 1,
            };
            log.run(Command::CreateTenant).expect("tenant");
            let schema = TableSchema::new(
                "items",
                &[("id", Int, false), ("n", Int, true), ("gone", Text, true)],
                &["id"],
                &[],
            )
            .expect("valid");
            log.run(Command::CreateTable(schema)).expect("table");
            log
        }

        fn run(&mut self, command: Command) -> Result<Applied, EngineError> {
            let lsn = Lsn(self.next);
            self.next += 1;
            apply(
                &mut self.state,
                &self.tenant,
                lsn,
                TimestampMicros(lsn.0),
                command,
            )
        }

        fn tenant(&self) -> &Tenant {
            &self.state.tenants[&self.tenant]
        }

        fn rows(&self) -> Vec<Row> {
            self.rows_in_place().cloned().collect()
        }

        fn rows_in_place(&self) -> impl Iterator<Item = &Row> {
            self.tenant().table("items").expect("table").rows()
        }

        fn upsert(&mut self, id: i64, n: i64) -> Result<Applied, EngineError> {
            let version = self.tenant().table("items").expect("table").version();
            self.run(Command::Write {
                table: "items".into(),
                table_version: version,
                writes: vec![RowWrite::upsert(&[
                    Value::Int(id),
                    Value::Int(n),
                    Value::Text(format!("row {id}")),
                ])],
                idempotency_key: None,
            })
        }

        fn start(&mut self, steps: &str) -> u64 {
            self.start_in(steps, Layout::InPlace)
        }

        fn start_in(&mut self, steps: &str, layout: Layout) -> u64 {
            let version = self.tenant().table("items").expect("table").version();
            match self
                .run(Command::StartMigration {
                    table: "items".into(),
                    table_version: version,
                    steps: parse_steps(steps.as_bytes()).expect("steps"),
                    layout,
                })
                .expect("started")
            {
                Applied::MigrationStarted { id } => id,
                other => panic!("{other:?}"),
            }
        }

        fn key(&self, id: i64) -> Vec<u8> {
            crate::value::encode_key([&Value::Int(id)])
        }

        fn chunk(&mut self, id: u64, upto: i64) -> MigrationState {
            let upto = self.key(upto);
            match self.run(Command::Backfill {
                table: "items".into(),
                id,
                upto,
            }) {
                Ok(Applied::Migration(state)) => state,
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_transform_that_widens_rows_past_the_row_limit_fails_and_refuses_writes() {
        let mut log = Log::new();
        let version = log.tenant().table("items").expect("table").version();
        let wide = |id: i64| Command::Write {
            table: "items".into(),
            table_version: version,
            writes: vec![RowWrite::upsert(&[
                Value::Int(id),
                Value::Int(id),
                Value::Text("w".repeat(crate::limits::MAX_ROW_BYTES / 2)),
            ])],
            idempotency_key: None,
        };
        log.upsert(0, 0).expect("a narrow row");
        log.run(wide(1)).expect("a wide row, under the limit");
        let id = log.start(
            r#"[{"op":"add_column","name":"a","type":"text","default":"gone"},
                {"op":"add_column","name":"b","type":"text","default":"gone"}]"#,
        );
        // A write the new shape cannot hold is refused whole, naming the limit.
        match log.run(wide(2)) {
            Err(EngineError::MigrationRefused { why, .. }) => {
                assert!(why.contains("above the limit"), "{why}")
            }
            other => panic!("{other:?}"),
        }
        // The backfill reaches the wide row: the migration fails, v0 untouched.
        assert_eq!(log.chunk(id, 1), MigrationState::Failed);
        let info = log.tenant().migrations().get(id).expect("known");
        assert!(
            info.reason
                .as_deref()
                .unwrap_or("")
                .contains("above the limit"),
            "{info:?}"
        );
        assert_eq!(log.rows().len(), 2);
        assert_eq!(
            log.tenant().table("items").expect("table").version(),
            version
        );
    }

    const STEPS: &str = r#"[{"op":"add_column","name":"double","type":"int","default":"n * 2"},
        {"op":"drop_column","name":"gone"},
        {"op":"add_index","name":"by_double","columns":["double"]}]"#;

    #[test]
    fn backfill_and_cutover_give_every_row_the_v1_shape_exactly_once() {
        let mut log = Log::new();
        for id in 0..10 {
            log.upsert(id, id).expect("write");
        }
        let id = log.start(STEPS);
        assert_eq!(log.chunk(id, 3), MigrationState::Backfilling);
        // Rows the backfill passed are stored converted (v0 slots, then the appended
        // column); the others are v0 rows still.
        let arity = |log: &Log| log.rows().iter().map(Row::len).collect::<Vec<_>>();
        assert_eq!(arity(&log), [4, 4, 4, 4, 3, 3, 3, 3, 3, 3]);
        // Writes during the backfill: behind the cursor, ahead of it, and past the
        // end key (a new row); those behind and past are stored converted.
        log.upsert(1, 100).expect("behind");
        log.upsert(7, 700).expect("ahead");
        log.upsert(50, 5).expect("new");
        assert_eq!(arity(&log), [4, 4, 4, 4, 3, 3, 3, 3, 3, 3, 4]);
        assert_eq!(log.chunk(id, 9), MigrationState::CutoverReady);
        assert!(arity(&log).iter().all(|&n| n == 4));
        // The table is stored once: the cutover touches no row, it changes the schema.
        let buffers: Vec<*const u8> = log.rows_in_place().map(|r| r.encoded().as_ptr()).collect();
        match log.run(Command::Cutover {
            table: "items".into(),
            id,
        }) {
            Ok(Applied::Migration(MigrationState::Done)) => {}
            other => panic!("{other:?}"),
        }
        let after: Vec<*const u8> = log.rows_in_place().map(|r| r.encoded().as_ptr()).collect();
        assert_eq!(after, buffers, "no row was copied at the cutover");
        let rows = log.rows();
        assert_eq!(rows.len(), 11);
        let table = log.tenant().table("items").expect("table");
        for row in &rows {
            let (ValueRef::Int(k), ValueRef::Int(n), ValueRef::Int(d)) =
                (row.get(0), row.get(1), row.get(3))
            else {
                panic!("{row:?}")
            };
            let expected_n = match k {
                1 => 100,
                7 => 700,
                50 => 5,
                k => k,
            };
            assert_eq!((n, d), (expected_n, expected_n * 2), "row {k}");
            let json = table.row_to_json(row);
            assert!(!json.contains_key("gone"), "the dropped column is not seen");
            assert_eq!(json.len(), 3);
        }
        assert_eq!(table.schema().indexes[0].name, "by_double");
        assert_eq!(
            table.check_integrity(),
            Ok(11),
            "the new index covers every row"
        );
        assert_eq!(
            log.tenant().migrations().get(id).expect("kept").state,
            MigrationState::Done
        );
        // A write validated against v0 and applied after the cutover is refused.
        let stale = log.run(Command::Write {
            table: "items".into(),
            table_version: 2,
            writes: vec![RowWrite::upsert(&[
                Value::Int(1),
                Value::Int(1),
                Value::Null,
            ])],
            idempotency_key: None,
        });
        assert!(
            matches!(stale, Err(EngineError::TableChanged { .. })),
            "{stale:?}"
        );
    }

    #[test]
    fn abort_leaves_the_base_exactly_as_it_was() {
        let mut log = Log::new();
        for id in 0..5 {
            log.upsert(id, id).expect("write");
        }
        let before = log.rows();
        let digest = |t: &Table| {
            let mut d = crate::table::TableDigest::default();
            while !t.digest_rows(&mut d, usize::MAX) {}
            d
        };
        let digest_before = digest(log.tenant().table("items").expect("table"));
        let schema_before = log.tenant().table("items").expect("table").schema().clone();
        let id = log.start(STEPS);
        log.chunk(id, 2);
        log.upsert(9, 9)
            .expect("a row written during the migration");
        match log.run(Command::AbortMigration {
            table: "items".into(),
            id,
        }) {
            Ok(Applied::Migration(MigrationState::Aborted)) => {}
            other => panic!("{other:?}"),
        }
        let version = log.tenant().table("items").expect("table").version();
        log.run(Command::Write {
            table: "items".into(),
            table_version: version,
            writes: vec![RowWrite::Delete(log.key(9))],
            idempotency_key: None,
        })
        .expect("delete the row written during the migration");
        // The rows it converted keep the values it appended, but the table's shape
        // does not read them: each row reads as it did, and digests the same.
        let table = log.tenant().table("items").expect("table");
        assert_eq!(table.schema(), &schema_before);
        let rows = log.rows();
        assert_eq!(rows.len(), before.len());
        for (row, was) in rows.iter().zip(&before) {
            assert_eq!(row.encoded_prefix(3), was.encoded_values());
            assert_eq!(table.row_to_json(row), table.row_to_json(was));
        }
        assert_eq!(digest(table), digest_before);
        assert_eq!(table.check_integrity(), Ok(5));
        assert!(log.tenant().migrations().active("items").is_none());
        let again = log.run(Command::Cutover {
            table: "items".into(),
            id,
        });
        assert!(
            matches!(&again, Err(EngineError::MigrationConflict(m)) if m.contains("aborted")),
            "{again:?}"
        );
    }

    /// An earlier build's log: a start of kind 8 cut over to the compact layout, and
    /// the writes after it were logged (and acknowledged) in that layout. Replayed
    /// here, they must apply as they did.
    #[test]
    fn a_migration_an_earlier_build_logged_replays_to_the_compact_layout_it_acknowledged() {
        let mut log = Log::new();
        for id in 0..6 {
            log.upsert(id, id).expect("write");
        }
        let id = log.start_in(
            r#"[{"op":"change_type","column":"n","type":"float","using":"n + 0.5"},
                {"op":"drop_column","name":"gone"},
                {"op":"add_column","name":"tag","type":"text","default":"'t'"}]"#,
            Layout::Compact,
        );
        log.chunk(id, 2);
        log.upsert(1, 10).expect("behind the cursor");
        log.upsert(4, 40).expect("ahead of it");
        match log.run(Command::Cutover {
            table: "items".into(),
            id,
        }) {
            Ok(Applied::Migration(MigrationState::Done)) => {}
            other => panic!("{other:?}"),
        }
        let table = log.tenant().table("items").expect("table");
        let shape: Vec<(&str, ColumnType, bool)> = table
            .schema()
            .columns
            .iter()
            .map(|c| (c.name.as_str(), c.ty, c.dropped))
            .collect();
        assert_eq!(
            shape,
            [
                ("id", Int, false),
                ("n", Float, false),
                ("tag", Text, false)
            ],
            "the retyped column in its old place, the dropped one gone"
        );
        let values: Vec<Vec<Value>> = log.rows().iter().map(Row::to_values).collect();
        assert_eq!(
            values[1],
            [Value::Int(1), Value::Float(10.5), Value::Text("t".into())]
        );
        assert_eq!(
            values[4],
            [Value::Int(4), Value::Float(40.5), Value::Text("t".into())]
        );
        assert_eq!(table.check_integrity(), Ok(6));
        // The next record that build logged: a write in the compact layout.
        let version = table.version();
        log.run(Command::Write {
            table: "items".into(),
            table_version: version,
            writes: vec![RowWrite::upsert(&[
                Value::Int(9),
                Value::Float(1.0),
                Value::Text("w".into()),
            ])],
            idempotency_key: None,
        })
        .expect("a write of that layout applies");
        assert_eq!(log.rows().len(), 7);
        // A write validated against the old shape whose apply came after the cutover
        // is carried into the compact layout.
        let v0_write = vec![RowWrite::upsert(&[
            Value::Int(2),
            Value::Int(7),
            Value::Text("gone".into()),
        ])];
        let table = log.tenant().table("items").expect("table");
        let carried = log
            .tenant()
            .migrations()
            .carry_across_cutover(table, 2, &v0_write)
            .expect("this cutover replaced version 2")
            .expect("carried");
        table
            .check_writes(&carried)
            .expect("fits the compact layout");
        let RowWrite::Upsert(row) = &carried[0] else {
            panic!("{carried:?}")
        };
        assert_eq!(
            row.to_values(),
            [Value::Int(2), Value::Float(7.5), Value::Text("t".into())]
        );
    }

    /// An earlier build's checkpoint of a migration half way: its rows are all v0
    /// rows (that build kept the new shape apart), the cursor past some of them.
    /// Attached here, those rows are converted, and the migration goes on.
    #[test]
    fn a_migration_restored_from_an_earlier_builds_checkpoint_converts_its_passed_rows() {
        let mut log = Log::new();
        for id in 0..6 {
            log.upsert(id, id).expect("write");
        }
        let version = log.tenant().table("items").expect("table").version();
        let steps = r#"[{"op":"add_column","name":"double","type":"int","default":"n * 2"},
                        {"op":"add_index","name":"by_double","columns":["double"]}]"#;
        let info = MigrationInfo {
            id: 100,
            table: "items".into(),
            steps: parse_steps(steps.as_bytes()).expect("steps"),
            state: MigrationState::Backfilling,
            reason: None,
            started: TimestampMicros(1),
            finished: TimestampMicros(0),
            rows_total: 6,
            rows_done: 3,
        };
        let (cursor, end) = (log.key(2), log.key(5));
        let tenant = log.state.tenants.get_mut(&log.tenant).expect("tenant");
        restore_active(
            tenant,
            info,
            version,
            Some(cursor),
            Some(end),
            Layout::Compact,
            Lsn(50),
        )
        .expect("restored");
        let widths: Vec<usize> = log.rows().iter().map(Row::len).collect();
        assert_eq!(
            widths,
            [4, 4, 4, 3, 3, 3],
            "the rows it had passed are converted"
        );
        assert_eq!(log.chunk(100, 5), MigrationState::CutoverReady);
        match log.run(Command::Cutover {
            table: "items".into(),
            id: 100,
        }) {
            Ok(Applied::Migration(MigrationState::Done)) => {}
            other => panic!("{other:?}"),
        }
        let table = log.tenant().table("items").expect("table");
        assert_eq!(
            table.check_integrity(),
            Ok(6),
            "the new index covers every row"
        );
        for row in log.rows() {
            let (ValueRef::Int(n), ValueRef::Int(d)) = (row.get(1), row.get(3)) else {
                panic!("{row:?}")
            };
            assert_eq!(d, 2 * n);
        }
    }

    /// A dropped column's values stay in the rows written before the drop, but nothing
    /// reads them: the digest counts them as NULL, the next migration's conversion
    /// leaves NULL there, and the row limit does not count them.
    #[test]
    fn a_dropped_columns_values_are_never_read_and_the_next_conversion_clears_them() {
        let mut log = Log::new();
        for id in 0..4 {
            log.upsert(id, id).expect("write");
        }
        let digest = |log: &Log| {
            let mut d = crate::table::TableDigest::default();
            let table = log.tenant().table("items").expect("table");
            while !table.digest_rows(&mut d, usize::MAX) {}
            d
        };
        let first = log.start(STEPS);
        log.chunk(first, 3);
        log.run(Command::Cutover {
            table: "items".into(),
            id: first,
        })
        .expect("cut over");
        assert_eq!(
            log.rows()[1].get(2),
            ValueRef::Text("row 1"),
            "kept in its slot"
        );
        let after_drop = digest(&log);
        let second = log.start(r#"[{"op":"add_column","name":"x","type":"int","default":"1"}]"#);
        assert_eq!(log.chunk(second, 3), MigrationState::CutoverReady);
        for row in log.rows() {
            assert_eq!(row.get(2), ValueRef::Null, "{row:?}");
        }
        assert_eq!(
            digest(&log),
            after_drop,
            "the same rows as the table reads them"
        );
    }

    /// A retyped column's old and new values are both in the row until the cutover;
    /// only the values the new shape reads count toward the row limit.
    #[test]
    fn retyping_a_large_column_is_held_to_the_row_limit_on_its_new_values_only() {
        let mut log = Log::new();
        let version = log.tenant().table("items").expect("table").version();
        let large = "w".repeat(crate::limits::MAX_ROW_BYTES * 3 / 5);
        log.run(Command::Write {
            table: "items".into(),
            table_version: version,
            writes: vec![RowWrite::upsert(&[
                Value::Int(1),
                Value::Int(1),
                Value::Text(large.clone()),
            ])],
            idempotency_key: None,
        })
        .expect("a large row");
        let id =
            log.start(r#"[{"op":"change_type","column":"gone","type":"json","using":"gone"}]"#);
        assert_eq!(log.chunk(id, 1), MigrationState::CutoverReady);
        let row = &log.rows()[0];
        assert!(
            row.stored_bytes() > crate::limits::MAX_ROW_BYTES,
            "both values held"
        );
        log.run(Command::Cutover {
            table: "items".into(),
            id,
        })
        .expect("cut over");
        let table = log.tenant().table("items").expect("table");
        let json = table.row_to_json(&log.rows()[0]);
        assert_eq!(json["gone"], serde_json::Value::String(large));
    }

    #[test]
    fn dropping_a_migrating_table_ends_its_migration_as_aborted() {
        let mut log = Log::new();
        log.upsert(1, 1).expect("write");
        let id = log.start(STEPS);
        log.run(Command::DropTable {
            table: "items".into(),
        })
        .expect("dropped");
        let info = log.tenant().migrations().get(id).expect("kept");
        assert_eq!(info.state, MigrationState::Aborted);
        assert!(info
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("dropped")));
        assert!(log.tenant().migrations().active("items").is_none());
    }

    #[test]
    fn a_row_that_does_not_transform_fails_the_migration_and_refuses_new_such_writes() {
        let mut log = Log::new();
        log.upsert(1, 5).expect("write");
        log.upsert(2, 0).expect("write");
        let before = log.rows();
        // 10 / n fails for n = 0 (division by zero), at row 2.
        let id = log.start(r#"[{"op":"add_column","name":"inv","type":"int","default":"10 / n"}]"#);
        // A new write the transform cannot carry is refused whole, naming the migration.
        let refused = log.upsert(3, 0);
        assert!(
            matches!(&refused, Err(EngineError::MigrationRefused { id: m, row: 0, .. }) if *m == id),
            "{refused:?}"
        );
        assert_eq!(log.chunk(id, 2), MigrationState::Failed);
        let info = log.tenant().migrations().get(id).expect("kept");
        assert!(
            info.reason
                .as_deref()
                .is_some_and(|r| r.contains("does not migrate")),
            "{info:?}"
        );
        assert_eq!(
            log.rows(),
            before,
            "a failed migration leaves v0 as an abort would"
        );
    }
}
