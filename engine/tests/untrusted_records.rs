//! Records and checkpoints are untrusted input: a row that decodes but does not fit its
//! table is refused where it is applied, never stored (it would panic a key encoding,
//! an index or a query later). Found by the `record_decode` fuzz target.

use oc_engine::apply::apply;
use oc_engine::command::Command;
use oc_engine::fuzz_entry::{fixture, FIXTURE_TABLE, FIXTURE_TABLE_VERSION};
use oc_engine::table::RowWrite;
use oc_engine::{record, EngineError, Value};
use oc_io::TimestampMicros;

/// A row that fits the fixture table (int, text, float, bool, json, vector(3)).
fn good_row() -> Vec<Value> {
    vec![
        Value::Int(7),
        Value::Text("g".into()),
        Value::Float(0.5),
        Value::Bool(false),
        Value::Json("{}".into()),
        Value::Vector(vec![1.0, 2.0, 3.0]),
    ]
}

/// Logs `rows` as one write batch (through the record codec, as replay reads it) and
/// applies it to the fixture; returns the outcome and the fixture table's row count.
fn replay_write(rows: Vec<Vec<Value>>) -> (Result<(), EngineError>, usize) {
    let (tenant, mut state) = fixture();
    let command = Command::Write {
        table: FIXTURE_TABLE.into(),
        table_version: FIXTURE_TABLE_VERSION,
        writes: rows.iter().map(|r| RowWrite::upsert(r)).collect(),
        idempotency_key: None,
    };
    let (kind, payload) = record::encode(&command);
    let decoded = record::decode(kind, &payload).expect("the record decodes");
    let lsn = state.applied_lsn.next();
    let outcome = apply(&mut state, &tenant, lsn, TimestampMicros(1), decoded).map(|_| ());
    let rows = state.tenants[&tenant]
        .table(FIXTURE_TABLE)
        .expect("the table")
        .usage()
        .rows;
    (outcome, rows)
}

#[test]
fn a_logged_row_with_a_json_value_in_a_key_column_is_refused_not_applied() {
    let mut row = good_row();
    row[0] = Value::Json("1".into());
    let (outcome, rows) = replay_write(vec![good_row(), row]);
    assert!(
        matches!(&outcome, Err(EngineError::InvalidRow { row: 1, why }) if why.contains("\"id\"")),
        "{outcome:?}"
    );
    assert_eq!(
        rows, 2,
        "nothing of the batch is applied, the good row neither"
    );
}

#[test]
fn logged_rows_of_the_wrong_length_type_dimension_or_nullability_are_refused() {
    let with = |column: usize, value: Value| {
        let mut row = good_row();
        row[column] = value;
        row
    };
    let bad_rows = [
        good_row()[..5].to_vec(),
        [good_row(), vec![Value::Null]].concat(),
        with(1, Value::Vector(vec![1.0])),
        with(1, Value::Null),
        with(2, Value::Int(1)),
        with(2, Value::Float(f64::NAN)),
        with(3, Value::Text("true".into())),
        with(5, Value::Vector(vec![1.0, 2.0])),
        with(5, Value::Vector(vec![1.0, f32::INFINITY, 3.0])),
        with(5, Value::Json("[1,2,3]".into())),
    ];
    for bad in bad_rows {
        let (outcome, rows) = replay_write(vec![bad.clone()]);
        assert!(
            matches!(outcome, Err(EngineError::InvalidRow { row: 0, .. })),
            "{bad:?}: {outcome:?}"
        );
        assert_eq!(rows, 2, "{bad:?} changed the table");
    }
    let mut other = with(2, Value::Null);
    other[1] = Value::Text("h".into());
    let (outcome, rows) = replay_write(vec![good_row(), other]);
    assert!(outcome.is_ok(), "{outcome:?}");
    assert_eq!(rows, 4);
}
