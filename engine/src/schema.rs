//! Table schemas: typed columns, a primary key of one or more columns, and secondary
//! indexes, all validated against the limits before anything is logged.

use crate::error::EngineError;
use crate::limits::{
    MAX_COLUMNS_PER_TABLE, MAX_INDEXES_PER_TABLE, MAX_KEY_COLUMNS, MAX_NAME_BYTES, MAX_VECTOR_DIM,
};
use crate::value::ColumnType;

/// One column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub ty: ColumnType,
    /// Primary-key columns are never nullable.
    pub nullable: bool,
    /// Dropped by a migration: the slot stays (rows written before the drop still hold
    /// a value in it, rows written after hold NULL), but no client sees it, names it or
    /// writes it, and a new column may take its name.
    pub dropped: bool,
}

/// A secondary index over one or more columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexDef {
    pub name: String,
    /// Slots of the indexed columns in [`TableSchema::columns`].
    pub columns: Vec<usize>,
}

/// A validated table schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSchema {
    pub name: String,
    /// Every column slot, in the order rows hold their values: dropped columns keep
    /// theirs (a migration appends the columns it adds or retypes).
    pub columns: Vec<Column>,
    /// Slots of the primary-key columns, in key order.
    pub primary_key: Vec<usize>,
    pub indexes: Vec<IndexDef>,
}

/// Checks a table, column or index name: `[a-z_][a-z0-9_]{0,62}`.
pub fn check_name(what: &'static str, name: &str) -> Result<(), EngineError> {
    let invalid = |why: String| EngineError::InvalidName {
        what,
        name: name.chars().take(80).collect(),
        why: format!("{why}; allowed: [a-z_][a-z0-9_]{{0,62}}"),
    };
    let bytes = name.as_bytes();
    match bytes.first() {
        None => return Err(invalid("it is empty".into())),
        Some(b) if !(b.is_ascii_lowercase() || *b == b'_') => {
            return Err(invalid(
                "it must start with a lowercase letter or '_'".into(),
            ))
        }
        _ => {}
    }
    if bytes.len() > MAX_NAME_BYTES {
        return Err(invalid(format!("it is longer than {MAX_NAME_BYTES} bytes")));
    }
    if let Some(bad) = bytes
        .iter()
        .find(|b| !(b.is_ascii_lowercase() || b.is_ascii_digit() || **b == b'_'))
    {
        return Err(invalid(format!("it contains {:?}", char::from(*bad))));
    }
    Ok(())
}

impl TableSchema {
    /// Builds and validates a schema from column (name, type, nullable) triples, the
    /// primary-key column names, and (index name, column names) pairs.
    pub fn new(
        name: &str,
        columns: &[(&str, ColumnType, bool)],
        primary_key: &[&str],
        indexes: &[(&str, &[&str])],
    ) -> Result<Self, EngineError> {
        check_name("table name", name)?;
        let bad = |why: String| EngineError::InvalidSchema {
            table: name.to_string(),
            why,
        };
        if columns.is_empty() {
            return Err(bad("a table needs at least one column".into()));
        }
        let position = |col: &str| {
            columns
                .iter()
                .position(|c| c.0 == col)
                .ok_or_else(|| bad(format!("unknown column {col:?}")))
        };
        let positions = |names: &[&str]| -> Result<Vec<usize>, EngineError> {
            names.iter().map(|n| position(n)).collect()
        };
        let cols = columns
            .iter()
            .map(|&(col, ty, nullable)| Column {
                name: col.to_string(),
                ty,
                nullable,
                dropped: false,
            })
            .collect();
        let indexes = indexes
            .iter()
            .map(|&(index, names)| Ok((index.to_string(), positions(names)?)))
            .collect::<Result<Vec<_>, EngineError>>()?;
        TableSchema::from_slots(name, cols, positions(primary_key)?, indexes)
    }

    /// Builds and validates a schema from its column slots (dropped ones included: a
    /// migration's shape), and the primary key and (index name, columns) by position.
    pub(crate) fn from_slots(
        name: &str,
        cols: Vec<Column>,
        primary_key: Vec<usize>,
        indexes: Vec<(String, Vec<usize>)>,
    ) -> Result<Self, EngineError> {
        Self::from_slots_up_to(name, cols, primary_key, indexes, MAX_COLUMNS_PER_TABLE)
    }

    /// [`TableSchema::from_slots`] with room for `max_slots` slots: a migration of an
    /// earlier build's log (`Layout::Compact`) holds the old slots and the new ones
    /// until its cutover leaves only the live columns, which the limit bounds.
    pub(crate) fn from_slots_up_to(
        name: &str,
        mut cols: Vec<Column>,
        primary_key: Vec<usize>,
        indexes: Vec<(String, Vec<usize>)>,
        max_slots: usize,
    ) -> Result<Self, EngineError> {
        check_name("table name", name)?;
        let bad = |why: String| EngineError::InvalidSchema {
            table: name.to_string(),
            why,
        };
        if cols.iter().all(|c| c.dropped) {
            return Err(bad("a table needs at least one column".into()));
        }
        if cols.len() > max_slots {
            return Err(EngineError::LimitExceeded {
                what: "columns per table (a dropped column keeps its slot)",
                actual: cols.len(),
                limit: max_slots,
            });
        }
        for i in 0..cols.len() {
            // A dropped column's slot holds NULL in every row written after its drop.
            cols[i].nullable |= cols[i].dropped;
            let col = &cols[i];
            check_name("column name", &col.name)?;
            if let ColumnType::Vector(dim) = col.ty {
                if dim == 0 || dim > MAX_VECTOR_DIM {
                    return Err(bad(format!(
                        "vector column {:?} has dimension {dim}; allowed 1..={MAX_VECTOR_DIM}",
                        col.name
                    )));
                }
            }
            let named = |c: &Column| !c.dropped && c.name == col.name;
            if !col.dropped && cols[..i].iter().any(named) {
                return Err(bad(format!("column {:?} appears twice", col.name)));
            }
        }
        let key_columns = |what: &str, positions: Vec<usize>| -> Result<Vec<usize>, EngineError> {
            if positions.is_empty() || positions.len() > MAX_KEY_COLUMNS {
                return Err(bad(format!("{what} needs 1 to {MAX_KEY_COLUMNS} columns")));
            }
            for (n, &p) in positions.iter().enumerate() {
                let col = cols
                    .get(p)
                    .filter(|c| !c.dropped)
                    .ok_or_else(|| bad(format!("{what} names column slot {p}, not a column")))?;
                if positions[..n].contains(&p) {
                    return Err(bad(format!("{what} lists column {:?} twice", col.name)));
                }
                if !col.ty.is_keyable() {
                    return Err(bad(format!(
                        "{what} cannot use column {:?} of type {} (keys are text, int, float or bool)",
                        col.name, col.ty
                    )));
                }
            }
            Ok(positions)
        };
        let primary_key = key_columns("the primary key", primary_key)?;
        for &p in &primary_key {
            if cols[p].ty == ColumnType::Float {
                return Err(bad(format!(
                    "primary key column {:?} is a float; use int or text for exact keys",
                    cols[p].name
                )));
            }
        }
        if indexes.len() > MAX_INDEXES_PER_TABLE {
            return Err(EngineError::LimitExceeded {
                what: "indexes per table",
                actual: indexes.len(),
                limit: MAX_INDEXES_PER_TABLE,
            });
        }
        let mut defs: Vec<IndexDef> = Vec::with_capacity(indexes.len());
        for (index, positions) in indexes {
            check_name("index name", &index)?;
            if defs.iter().any(|d| d.name == index) {
                return Err(bad(format!("index {index:?} appears twice")));
            }
            let columns = key_columns(&format!("index {index:?}"), positions)?;
            defs.push(IndexDef {
                name: index,
                columns,
            });
        }
        for &p in &primary_key {
            cols[p].nullable = false;
        }
        Ok(TableSchema {
            name: name.to_string(),
            columns: cols,
            primary_key,
            indexes: defs,
        })
    }

    /// The columns a client sees, with their slots: every one but the dropped.
    pub fn live_columns(&self) -> impl Iterator<Item = (usize, &Column)> {
        self.columns.iter().enumerate().filter(|(_, c)| !c.dropped)
    }

    /// The schema as the JSON the API accepts to create it (dropped columns left out).
    pub fn to_json(&self) -> serde_json::Value {
        let names = |positions: &[usize]| -> Vec<String> {
            positions
                .iter()
                .map(|&p| self.columns[p].name.clone())
                .collect()
        };
        serde_json::json!({
            "name": self.name,
            "columns": self.live_columns().map(|(_, c)| serde_json::json!({
                "name": c.name,
                "type": c.ty.to_string(),
                "nullable": c.nullable,
            })).collect::<Vec<_>>(),
            "primary_key": names(&self.primary_key),
            "indexes": self.indexes.iter().map(|i| serde_json::json!({
                "name": i.name,
                "columns": names(&i.columns),
            })).collect::<Vec<_>>(),
        })
    }

    /// Which slots are dropped, by slot; empty when none is (the common case, which
    /// then costs nothing per row).
    pub fn dead_slots(&self) -> Vec<bool> {
        if self.columns.iter().any(|c| c.dropped) {
            self.columns.iter().map(|c| c.dropped).collect()
        } else {
            Vec::new()
        }
    }

    /// Slot of a (live) column by name.
    pub fn column(&self, name: &str) -> Option<usize> {
        self.live_columns()
            .find(|(_, c)| c.name == name)
            .map(|(i, _)| i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ColumnType::*;

    fn err(r: Result<TableSchema, EngineError>) -> String {
        r.expect_err("invalid schema").to_string()
    }

    #[test]
    fn a_valid_schema_makes_key_columns_not_null() {
        let s = TableSchema::new(
            "docs",
            &[
                ("tenant_doc", Text, true),
                ("n", Int, true),
                ("emb", Vector(3), true),
            ],
            &["tenant_doc", "n"],
            &[("by_n", &["n"])],
        )
        .expect("valid");
        assert_eq!(s.primary_key, vec![0, 1]);
        assert!(!s.columns[0].nullable && !s.columns[1].nullable && s.columns[2].nullable);
        assert_eq!(s.indexes[0].columns, vec![1]);
    }

    #[test]
    fn invalid_schemas_say_what_to_fix() {
        let cols = [
            ("id", Int, false),
            ("v", Vector(2), true),
            ("f", Float, true),
        ];
        assert!(err(TableSchema::new("Docs", &cols, &["id"], &[])).contains("must start"));
        assert!(err(TableSchema::new("t", &[], &["id"], &[])).contains("at least one column"));
        assert!(
            err(TableSchema::new("t", &cols, &["nope"], &[])).contains("unknown column \"nope\"")
        );
        assert!(err(TableSchema::new("t", &cols, &[], &[])).contains("primary key needs 1 to 8"));
        assert!(err(TableSchema::new("t", &cols, &["v"], &[]))
            .contains("cannot use column \"v\" of type vector(2)"));
        assert!(err(TableSchema::new("t", &cols, &["f"], &[])).contains("is a float"));
        assert!(err(TableSchema::new("t", &cols, &["id", "id"], &[])).contains("twice"));
        assert!(err(TableSchema::new(
            "t",
            &[("id", Int, false), ("id", Text, true)],
            &["id"],
            &[]
        ))
        .contains("appears twice"));
        assert!(err(TableSchema::new(
            "t",
            &[("id", Int, false), ("v", Vector(0), true)],
            &["id"],
            &[]
        ))
        .contains("dimension 0"));
        assert!(
            err(TableSchema::new("t", &cols, &["id"], &[("ix", &["v"])]))
                .contains("index \"ix\" cannot use")
        );
        assert!(err(TableSchema::new(
            "t",
            &cols,
            &["id"],
            &[("ix", &["f"]), ("ix", &["id"])]
        ))
        .contains("appears twice"));
        let many: Vec<(String, ColumnType, bool)> =
            (0..300).map(|i| (format!("c{i}"), Int, true)).collect();
        let many: Vec<(&str, ColumnType, bool)> =
            many.iter().map(|(n, t, b)| (n.as_str(), *t, *b)).collect();
        assert!(matches!(
            TableSchema::new("t", &many, &["c0"], &[]),
            Err(EngineError::LimitExceeded {
                what: "columns per table (a dropped column keeps its slot)",
                actual: 300,
                ..
            })
        ));
    }

    #[test]
    fn names_follow_the_identifier_rule() {
        for ok in ["a", "_x", "col_9", &"a".repeat(63)] {
            check_name("column name", ok).expect(ok);
        }
        for bad in ["", "9a", "A", "a-b", "a b", "a.b", &"a".repeat(64)] {
            assert!(check_name("column name", bad).is_err(), "{bad:?}");
        }
    }
}
