//! Typed values, their conversion from JSON, and the order-preserving key encoding
//! used for primary keys and secondary indexes.
//!
//! Key encoding (per column, concatenated; byte order = value order):
//! a tag byte (`0x00` NULL, `0x01` bool, `0x02` int, `0x03` float, `0x04` text), then
//! bool as one byte; int as big-endian u64 with the sign bit flipped; float as its
//! IEEE bits, all flipped if negative else sign bit set (total order, -0.0 == 0.0);
//! text with each 0x00 byte written as `00 FF` and ended by `00 00`. Each part is
//! self-delimiting, so a key made of a prefix of the columns is a byte prefix of the
//! full key.

use std::cmp::Ordering;

use crate::row::ValueRef;

/// The type of a column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ColumnType {
    Text,
    Int,
    Float,
    Bool,
    /// Any JSON value, stored as its compact text.
    Json,
    /// A fixed-length vector of f32.
    Vector(u32),
}

impl ColumnType {
    /// Parses `text`, `int`, `float`, `bool`, `json` or `vector(N)`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "text" => ColumnType::Text,
            "int" => ColumnType::Int,
            "float" => ColumnType::Float,
            "bool" => ColumnType::Bool,
            "json" => ColumnType::Json,
            _ => {
                let dim = s.strip_prefix("vector(")?.strip_suffix(')')?;
                ColumnType::Vector(dim.parse().ok()?)
            }
        })
    }

    /// Whether values of this type can be part of a key (ordered and comparable).
    pub fn is_keyable(self) -> bool {
        matches!(
            self,
            ColumnType::Text | ColumnType::Int | ColumnType::Float | ColumnType::Bool
        )
    }
}

impl std::fmt::Display for ColumnType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ColumnType::Text => f.write_str("text"),
            ColumnType::Int => f.write_str("int"),
            ColumnType::Float => f.write_str("float"),
            ColumnType::Bool => f.write_str("bool"),
            ColumnType::Json => f.write_str("json"),
            ColumnType::Vector(d) => write!(f, "vector({d})"),
        }
    }
}

/// One value of a row.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
    /// Compact JSON text.
    Json(String),
    Vector(Vec<f32>),
}

impl Value {
    /// Converts a JSON value to a value of `ty`; the error says what was expected.
    pub fn from_json(json: &serde_json::Value, ty: ColumnType) -> Result<Value, String> {
        use serde_json::Value as J;
        match (ty, json) {
            (_, J::Null) => Ok(Value::Null),
            (ColumnType::Bool, J::Bool(b)) => Ok(Value::Bool(*b)),
            (ColumnType::Int, J::Number(n)) => n
                .as_i64()
                .map(Value::Int)
                .ok_or_else(|| format!("expected an integer in the i64 range, got {n}")),
            (ColumnType::Float, J::Number(n)) => n
                .as_f64()
                .map(Value::Float)
                .ok_or_else(|| format!("expected a number, got {n}")),
            (ColumnType::Text, J::String(s)) => Ok(Value::Text(s.clone())),
            (ColumnType::Json, other) => Ok(Value::Json(other.to_string())),
            (ColumnType::Vector(dim), J::Array(items)) => {
                if items.len() != dim as usize {
                    return Err(format!("expected {dim} numbers, got {}", items.len()));
                }
                items
                    .iter()
                    .map(|x| match x.as_f64() {
                        Some(f) if (f as f32).is_finite() => Ok(f as f32),
                        _ => Err(format!(
                            "vector elements must be numbers that fit a 32-bit float \
                             (magnitude at most {:e}), got {x}",
                            f32::MAX
                        )),
                    })
                    .collect::<Result<Vec<f32>, String>>()
                    .map(Value::Vector)
            }
            (ty, other) => Err(format!("expected {ty}, got {}", json_kind(other))),
        }
    }

    /// The value as JSON, the inverse of [`Value::from_json`] for its column type.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match self {
            Value::Null => J::Null,
            Value::Bool(b) => J::Bool(*b),
            Value::Int(i) => J::from(*i),
            Value::Float(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
            Value::Text(s) => J::String(s.clone()),
            // Stored as the compact text of a JSON value that parsed once.
            Value::Json(s) => serde_json::from_str(s).unwrap_or_else(|_| J::String(s.clone())),
            Value::Vector(v) => J::Array(
                v.iter()
                    .map(|x| serde_json::Number::from_f64(f64::from(*x)).map_or(J::Null, J::Number))
                    .collect(),
            ),
        }
    }

    /// Writes the value as JSON text, as [`Value::to_json`] would render it, without
    /// building a tree: a json value is written as its stored compact text (checked to
    /// be JSON; text that is not is written as a string).
    pub fn write_json(&self, out: &mut Vec<u8>) {
        use serde::de::IgnoredAny;
        let number = |out: &mut Vec<u8>, f: f64| {
            if f.is_finite() {
                // Writing a number to a Vec cannot fail.
                let _ = serde_json::to_writer(&mut *out, &f);
            } else {
                out.extend_from_slice(b"null");
            }
        };
        match self {
            Value::Null => out.extend_from_slice(b"null"),
            Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
            Value::Int(i) => out.extend_from_slice(i.to_string().as_bytes()),
            Value::Float(f) => number(out, *f),
            Value::Text(s) => {
                let _ = serde_json::to_writer(&mut *out, s);
            }
            Value::Json(s) => {
                if serde_json::from_str::<IgnoredAny>(s).is_ok() {
                    out.extend_from_slice(s.as_bytes());
                } else {
                    let _ = serde_json::to_writer(&mut *out, s);
                }
            }
            Value::Vector(v) => {
                out.push(b'[');
                for (i, x) in v.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    number(out, f64::from(*x));
                }
                out.push(b']');
            }
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// Bytes this value takes in a stored row (for size limits and usage).
    pub fn stored_bytes(&self) -> usize {
        match self {
            Value::Null => 1,
            Value::Bool(_) => 2,
            Value::Int(_) | Value::Float(_) => 9,
            Value::Text(s) | Value::Json(s) => 5 + s.len(),
            Value::Vector(v) => 5 + 4 * v.len(),
        }
    }

    /// The value as a row would hold it, for a keyable value.
    fn keyable(&self) -> ValueRef<'_> {
        match self {
            Value::Null => ValueRef::Null,
            Value::Bool(b) => ValueRef::Bool(*b),
            Value::Int(i) => ValueRef::Int(*i),
            Value::Float(f) => ValueRef::Float(*f),
            Value::Text(s) => ValueRef::Text(s),
            Value::Json(_) | Value::Vector(_) => {
                unreachable!("schema validation keeps json and vector out of keys")
            }
        }
    }

    /// Bytes [`Value::encode_key`] appends.
    pub fn key_len(&self) -> usize {
        self.keyable().key_len()
    }

    /// Appends the order-preserving encoding of a keyable value (see module doc).
    pub fn encode_key(&self, out: &mut Vec<u8>) {
        self.keyable().encode_key(out);
    }

    /// Total order of keyable values of one type, NULL first (the order the key
    /// encoding preserves; used by tests and range checks).
    pub fn key_cmp(&self, other: &Value) -> Ordering {
        match (self, other) {
            (Value::Null, Value::Null) => Ordering::Equal,
            (Value::Null, _) => Ordering::Less,
            (_, Value::Null) => Ordering::Greater,
            (Value::Bool(a), Value::Bool(b)) => a.cmp(b),
            (Value::Int(a), Value::Int(b)) => a.cmp(b),
            (Value::Float(a), Value::Float(b)) => a.partial_cmp(b).unwrap_or(Ordering::Equal),
            (Value::Text(a), Value::Text(b)) => a.as_bytes().cmp(b.as_bytes()),
            _ => Ordering::Equal,
        }
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Encodes a composite key from values in key-column order, in a buffer of exactly
/// its length (a key is built for every row written and replayed: one allocation,
/// and none more when the B-tree boxes it).
pub fn encode_key<'a>(values: impl IntoIterator<Item = &'a Value> + Clone) -> Vec<u8> {
    let len = values.clone().into_iter().map(Value::key_len).sum();
    let mut out = Vec::with_capacity(len);
    for v in values {
        v.encode_key(&mut out);
    }
    debug_assert_eq!(out.len(), len, "key_len matches encode_key");
    out
}

/// Decodes a key made by [`encode_key`] back into values, one per column type given.
/// `None` when the bytes are not such a key (the caller had the wrong types).
pub fn decode_key(mut bytes: &[u8], types: &[ColumnType]) -> Option<Vec<Value>> {
    let mut values = Vec::with_capacity(types.len());
    for _ in types {
        let (&tag, rest) = bytes.split_first()?;
        bytes = rest;
        let value = match tag {
            0x00 => Value::Null,
            0x01 => {
                let (&b, rest) = bytes.split_first()?;
                bytes = rest;
                Value::Bool(b != 0)
            }
            0x02 | 0x03 => {
                let (word, rest) = bytes.split_first_chunk::<8>()?;
                bytes = rest;
                let bits = u64::from_be_bytes(*word);
                if tag == 0x02 {
                    Value::Int((bits ^ (1 << 63)) as i64)
                } else if bits >> 63 == 1 {
                    Value::Float(f64::from_bits(bits & !(1 << 63)))
                } else {
                    Value::Float(f64::from_bits(!bits))
                }
            }
            0x04 => {
                let mut text = Vec::new();
                loop {
                    match bytes {
                        [0x00, 0x00, rest @ ..] => {
                            bytes = rest;
                            break;
                        }
                        [0x00, 0xFF, rest @ ..] => {
                            text.push(0);
                            bytes = rest;
                        }
                        [b, rest @ ..] if *b != 0 => {
                            text.push(*b);
                            bytes = rest;
                        }
                        _ => return None,
                    }
                }
                Value::Text(String::from_utf8(text).ok()?)
            }
            _ => return None,
        };
        values.push(value);
    }
    bytes.is_empty().then_some(values)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn keyable() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::Int),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::Float),
            ".{0,12}".prop_map(Value::Text),
            proptest::collection::vec(
                prop_oneof![Just(0u8), Just(1u8), Just(255u8), any::<u8>()],
                0..6
            )
            .prop_map(|b| Value::Text(String::from_utf8_lossy(&b).into_owned())),
        ]
    }

    fn same_type(a: &Value, b: &Value) -> bool {
        std::mem::discriminant(a) == std::mem::discriminant(b) || a.is_null() || b.is_null()
    }

    proptest! {
        #[test]
        fn key_encoding_preserves_order(a in keyable(), b in keyable(), c in keyable(), d in keyable()) {
            prop_assume!(same_type(&a, &c) && same_type(&b, &d));
            let left = encode_key([&a, &b]);
            let right = encode_key([&c, &d]);
            let expected = a.key_cmp(&c).then(b.key_cmp(&d));
            prop_assert_eq!(left.cmp(&right), expected, "{:?},{:?} vs {:?},{:?}", a, b, c, d);
        }

        #[test]
        fn keys_decode_to_the_values_they_encode(a in keyable(), b in keyable()) {
            let ty = |v: &Value| match v {
                Value::Bool(_) => ColumnType::Bool,
                Value::Int(_) => ColumnType::Int,
                Value::Float(_) => ColumnType::Float,
                _ => ColumnType::Text,
            };
            let bytes = encode_key([&a, &b]);
            let decoded = decode_key(&bytes, &[ty(&a), ty(&b)]).expect("a key decodes");
            // -0.0 encodes as 0.0; every other value comes back as it went in.
            let norm = |v: &Value| match v {
                Value::Float(f) if *f == 0.0 => Value::Float(0.0),
                other => other.clone(),
            };
            prop_assert_eq!(decoded, vec![norm(&a), norm(&b)]);
            prop_assert_eq!(decode_key(&bytes[..bytes.len() - 1], &[ty(&a), ty(&b)]), None);
        }

        #[test]
        fn a_key_is_built_in_a_buffer_of_exactly_its_length(a in keyable(), b in keyable()) {
            let mut grown = Vec::new();
            a.encode_key(&mut grown);
            b.encode_key(&mut grown);
            let exact = encode_key([&a, &b]);
            prop_assert_eq!(exact.capacity(), grown.len());
            prop_assert_eq!(exact, grown);
        }

        #[test]
        fn a_key_prefix_encodes_to_a_byte_prefix(a in keyable(), b in keyable()) {
            let full = encode_key([&a, &b]);
            prop_assert!(full.starts_with(&encode_key([&a])));
        }
    }

    #[test]
    fn json_values_convert_by_column_type() {
        assert_eq!(
            Value::from_json(&json!(7), ColumnType::Int),
            Ok(Value::Int(7))
        );
        assert_eq!(
            Value::from_json(&json!(7), ColumnType::Float),
            Ok(Value::Float(7.0))
        );
        assert_eq!(
            Value::from_json(&json!({"a":[1]}), ColumnType::Json),
            Ok(Value::Json("{\"a\":[1]}".into()))
        );
        assert_eq!(
            Value::from_json(&json!([1, 2.5]), ColumnType::Vector(2)),
            Ok(Value::Vector(vec![1.0, 2.5]))
        );
        assert_eq!(
            Value::from_json(&json!(null), ColumnType::Text),
            Ok(Value::Null)
        );
        for (input, ty, wanted) in [
            (json!(1.5), ColumnType::Int, "expected an integer"),
            (json!("7"), ColumnType::Int, "expected int, got a string"),
            (json!(1), ColumnType::Text, "expected text, got a number"),
            (
                json!([1]),
                ColumnType::Vector(2),
                "expected 2 numbers, got 1",
            ),
            (json!([1, "x"]), ColumnType::Vector(2), "fit a 32-bit float"),
            (
                json!([1e300, 1]),
                ColumnType::Vector(2),
                "fit a 32-bit float",
            ),
            (
                json!(true),
                ColumnType::Float,
                "expected float, got a boolean",
            ),
        ] {
            let err = Value::from_json(&input, ty).expect_err("refused");
            assert!(err.contains(wanted), "{input} as {ty}: {err}");
        }
    }

    #[test]
    fn column_types_parse_and_print() {
        for s in ["text", "int", "float", "bool", "json", "vector(128)"] {
            assert_eq!(ColumnType::parse(s).expect(s).to_string(), s);
        }
        for s in ["vector()", "vector(x)", "varchar", "vector(3"] {
            assert_eq!(ColumnType::parse(s), None, "{s}");
        }
    }
}
