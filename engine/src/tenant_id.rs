//! Tenant ids: `[a-z0-9][a-z0-9_-]{0,62}`. Validated once at the edge; the type then
//! carries the proof. Ids are never used raw in file paths (see [`TenantId::file_stem`]).

use std::fmt;

use crate::error::EngineError;

/// Longest tenant id, in bytes.
pub const MAX_TENANT_ID_BYTES: usize = 63;

/// A validated tenant id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TenantId(String);

impl TenantId {
    /// Validates `raw`; the error says what is wrong and what is allowed.
    pub fn parse(raw: &str) -> Result<Self, EngineError> {
        let invalid = |why: &str| EngineError::InvalidName {
            what: "tenant id",
            name: raw.chars().take(80).collect(),
            why: format!("{why}; allowed: [a-z0-9][a-z0-9_-]{{0,62}}"),
        };
        let bytes = raw.as_bytes();
        let Some(&first) = bytes.first() else {
            return Err(invalid("it is empty"));
        };
        if bytes.len() > MAX_TENANT_ID_BYTES {
            return Err(invalid("it is longer than 63 bytes"));
        }
        if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
            return Err(invalid("it must start with a lowercase letter or a digit"));
        }
        if let Some(bad) = bytes
            .iter()
            .find(|&&b| !(b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'))
        {
            return Err(invalid(&format!("it contains {:?}", char::from(*bad))));
        }
        Ok(TenantId(raw.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A file-name stem for this tenant that does not depend on the id being safe in
    /// a path: `t-` followed by the id's bytes in hex.
    pub fn file_stem(&self) -> String {
        let mut stem = String::with_capacity(2 + 2 * self.0.len());
        stem.push_str("t-");
        for b in self.0.bytes() {
            stem.push_str(&format!("{b:02x}"));
        }
        stem
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn valid_ids_parse() {
        for id in ["a", "0", "acme", "acme-corp_2", &"a".repeat(63)] {
            assert_eq!(TenantId::parse(id).expect("valid").as_str(), id);
        }
    }

    #[test]
    fn invalid_ids_are_refused_with_the_reason() {
        for (id, why) in [
            ("", "empty"),
            ("-acme", "must start"),
            ("_a", "must start"),
            ("Acme", "must start"),
            ("ac/me", "contains '/'"),
            ("../etc", "must start"),
            ("a..b", "contains '.'"),
            ("a b", "contains ' '"),
            ("é", "must start"),
        ] {
            let err = TenantId::parse(id).expect_err(id).to_string();
            assert!(err.contains(why), "{id:?}: {err}");
        }
        let long = "a".repeat(64);
        assert!(TenantId::parse(&long)
            .expect_err("too long")
            .to_string()
            .contains("longer than 63"));
    }

    proptest! {
        #[test]
        fn file_stems_are_path_safe_and_distinct(a in "[a-z0-9][a-z0-9_-]{0,62}", b in "[a-z0-9][a-z0-9_-]{0,62}") {
            let (ta, tb) = (TenantId::parse(&a).expect("valid"), TenantId::parse(&b).expect("valid"));
            prop_assert!(ta.file_stem().bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-'));
            prop_assert_eq!(ta.file_stem() == tb.file_stem(), a == b);
        }
    }
}
