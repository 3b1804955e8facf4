//! The small JSON files of FORMAT.md (checkpoint manifests, `oc-layout.json`, the
//! archive's `manifest.json` and `lease.json`): each is one `serde`-derived struct that
//! both writes and reads it, so the fields on disk and the fields in code cannot drift.
//!
//! Reading is untrusted: the `format_version` is checked first (a newer file may have
//! other fields, so "unsupported version" is the useful answer, not "missing field"),
//! then the whole struct. Every refusal is a [`FileProblem`]; a missing field is named
//! as [`FileProblem::MissingField`] from the struct's list of required fields, since
//! serde reports it only as text.
//!
//! What must stay true: the bytes written never change within a version. The structs
//! declare their fields in the order the files have always had them (alphabetical: they
//! were once built as `serde_json` maps, which sort their keys), and each has a golden
//! test against the old construction.

use std::collections::BTreeMap;

use serde::de::{DeserializeOwned, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::error::Category;

use crate::error::FileProblem;

/// A JSON file of FORMAT.md, read and written through its struct.
pub trait JsonFile: Serialize + DeserializeOwned {
    /// The `format_version`s this build reads.
    const VERSIONS: &'static [u64];
    /// Top-level fields a readable file must have (every field but the optional ones).
    const REQUIRED_FIELDS: &'static [&'static str];

    /// Decodes a file's bytes (trailing whitespace, such as block padding, is allowed).
    fn decode(bytes: &[u8]) -> Result<Self, FileProblem> {
        let version: VersionOnly = serde_json::from_slice(bytes).map_err(json_problem)?;
        let found = version
            .format_version
            .ok_or(FileProblem::MissingField("format_version"))?;
        if !Self::VERSIONS.contains(&found) {
            return Err(FileProblem::UnsupportedVersion {
                found,
                supported: Self::VERSIONS,
            });
        }
        serde_json::from_slice(bytes).map_err(|e| match missing_field::<Self>(bytes) {
            Some(field) => FileProblem::MissingField(field),
            None => json_problem(e),
        })
    }

    /// The file's bytes: compact JSON.
    #[expect(
        clippy::expect_used,
        reason = "the file structs hold only strings, integers and lists, which always serialize"
    )]
    fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("the file structs hold only strings, integers and lists")
    }
}

/// The one field every version of every file has. Read by hand so that the file must
/// be a JSON object: derived structs also accept an array of their fields in order,
/// which no file of FORMAT.md is.
struct VersionOnly {
    format_version: Option<u64>,
}

impl<'de> Deserialize<'de> for VersionOnly {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<VersionOnly, D::Error> {
        struct Object;
        impl<'de> Visitor<'de> for Object {
            type Value = VersionOnly;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<VersionOnly, A::Error> {
                let mut format_version = None;
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    if key == "format_version" {
                        format_version = Some(map.next_value::<u64>()?);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(VersionOnly { format_version })
            }
        }
        d.deserialize_map(Object)
    }
}

fn json_problem(e: serde_json::Error) -> FileProblem {
    match e.classify() {
        Category::Data => FileProblem::Malformed(e.to_string()),
        Category::Io | Category::Syntax | Category::Eof => FileProblem::NotJson(e.to_string()),
    }
}

/// The first required field the file's top-level object lacks, if it is an object.
/// Runs only once decoding failed, to name the field in a typed error.
fn missing_field<T: JsonFile>(bytes: &[u8]) -> Option<&'static str> {
    let keys: BTreeMap<String, IgnoredAny> = serde_json::from_slice(bytes).ok()?;
    T::REQUIRED_FIELDS
        .iter()
        .find(|field| !keys.contains_key(**field))
        .copied()
}

/// `#[serde(with = "lsn")]`: an [`oc_io::Lsn`] as its number.
pub mod lsn {
    use oc_io::Lsn;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(lsn: &Lsn, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(lsn.0)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Lsn, D::Error> {
        u64::deserialize(d).map(Lsn)
    }
}

/// Checks, for a file struct's golden value, that each top-level field is required
/// exactly when [`JsonFile::REQUIRED_FIELDS`] says so, and that dropping a required one
/// is reported as that missing field. Keeps the list and the struct in step.
#[cfg(test)]
pub(crate) fn assert_required_fields<T: JsonFile + std::fmt::Debug>(golden: &T) {
    let serde_json::Value::Object(fields) =
        serde_json::to_value(golden).expect("a file struct is a JSON object")
    else {
        panic!("a file struct is a JSON object");
    };
    for field in fields.keys() {
        let mut without = fields.clone();
        without.remove(field);
        let bytes = serde_json::to_vec(&without).expect("a map serializes");
        let decoded = T::decode(&bytes);
        if T::REQUIRED_FIELDS.contains(&field.as_str()) {
            assert!(
                matches!(&decoded, Err(FileProblem::MissingField(f)) if f == field),
                "without {field}: {decoded:?}"
            );
        } else {
            assert!(decoded.is_ok(), "{field} is optional: {decoded:?}");
        }
    }
    for field in T::REQUIRED_FIELDS {
        assert!(fields.contains_key(*field), "{field} is not a field");
    }
}
