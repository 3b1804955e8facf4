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
}

/// A secondary index over one or more columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexDef {
    pub name: String,
    /// Positions of the indexed columns in [`TableSchema::columns`].
    pub columns: Vec<usize>,
}

/// A validated table schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSchema {
    pub name: String,
    pub columns: Vec<Column>,
    /// Positions of the primary-key columns, in key order.
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
        if columns.len() > MAX_COLUMNS_PER_TABLE {
            return Err(EngineError::LimitExceeded {
                what: "columns per table",
                actual: columns.len(),
                limit: MAX_COLUMNS_PER_TABLE,
            });
        }
        let mut cols: Vec<Column> = Vec::with_capacity(columns.len());
        for &(col, ty, nullable) in columns {
            check_name("column name", col)?;
            if cols.iter().any(|c| c.name == col) {
                return Err(bad(format!("column {col:?} appears twice")));
            }
            if let ColumnType::Vector(dim) = ty {
                if dim == 0 || dim > MAX_VECTOR_DIM {
                    return Err(bad(format!(
                        "vector column {col:?} has dimension {dim}; allowed 1..={MAX_VECTOR_DIM}"
                    )));
                }
            }
            cols.push(Column {
                name: col.to_string(),
                ty,
                nullable,
            });
        }
        let position = |col: &str| {
            cols.iter()
                .position(|c| c.name == col)
                .ok_or_else(|| bad(format!("unknown column {col:?}")))
        };
        let key_columns = |what: &str, names: &[&str]| -> Result<Vec<usize>, EngineError> {
            if names.is_empty() || names.len() > MAX_KEY_COLUMNS {
                return Err(bad(format!("{what} needs 1 to {MAX_KEY_COLUMNS} columns")));
            }
            let mut positions = Vec::with_capacity(names.len());
            for n in names {
                let p = position(n)?;
                if positions.contains(&p) {
                    return Err(bad(format!("{what} lists column {n:?} twice")));
                }
                if !cols[p].ty.is_keyable() {
                    return Err(bad(format!(
                        "{what} cannot use column {n:?} of type {} (keys are text, int, float or bool)",
                        cols[p].ty
                    )));
                }
                positions.push(p);
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
        for &(index, names) in indexes {
            check_name("index name", index)?;
            if defs.iter().any(|d| d.name == index) {
                return Err(bad(format!("index {index:?} appears twice")));
            }
            defs.push(IndexDef {
                name: index.to_string(),
                columns: key_columns(&format!("index {index:?}"), names)?,
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

    /// The schema as the JSON the API accepts to create it.
    pub fn to_json(&self) -> serde_json::Value {
        let names = |positions: &[usize]| -> Vec<String> {
            positions
                .iter()
                .map(|&p| self.columns[p].name.clone())
                .collect()
        };
        serde_json::json!({
            "name": self.name,
            "columns": self.columns.iter().map(|c| serde_json::json!({
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

    /// Position of a column by name.
    pub fn column(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
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
                what: "columns per table",
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
