//! A tenant's API keys, as the engine keeps them: an id, a name, and the SHA-256 of the
//! secret (the secret itself is shown once by the server and never stored). Keys are
//! commands in the tenant's log and records in its checkpoints, so they survive
//! restarts exactly like rows. Making and checking secrets is the server's job.

use std::collections::BTreeMap;

use oc_io::TimestampMicros;

use crate::error::EngineError;

/// Keys one tenant may hold.
pub const MAX_API_KEYS_PER_TENANT: usize = 64;
/// Bytes of a key id and of a key name.
pub const MAX_KEY_ID_BYTES: usize = 32;
pub const MAX_KEY_NAME_BYTES: usize = 128;

/// One key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub name: String,
    pub secret_sha256: [u8; 32],
    pub created: TimestampMicros,
}

/// A tenant's keys by id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApiKeys {
    keys: BTreeMap<String, ApiKey>,
}

impl ApiKeys {
    pub fn get(&self, key_id: &str) -> Option<&ApiKey> {
        self.keys.get(key_id)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &ApiKey)> {
        self.keys.iter()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether `secret_sha256` is the hash stored for `key_id`, compared in constant
    /// time so the answer's timing says nothing about how much of the hash matched.
    pub fn verify(&self, key_id: &str, secret_sha256: &[u8; 32]) -> bool {
        use subtle::ConstantTimeEq;
        self.keys
            .get(key_id)
            .is_some_and(|key| key.secret_sha256.ct_eq(secret_sha256).into())
    }

    /// Checks a new key before it is logged.
    pub fn validate_new(&self, key_id: &str, name: &str) -> Result<(), EngineError> {
        if key_id.is_empty()
            || key_id.len() > MAX_KEY_ID_BYTES
            || !key_id.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            return Err(EngineError::InvalidName {
                what: "API key id",
                name: key_id.chars().take(40).collect(),
                why: format!("use 1 to {MAX_KEY_ID_BYTES} ASCII letters and digits"),
            });
        }
        if name.len() > MAX_KEY_NAME_BYTES {
            return Err(EngineError::LimitExceeded {
                what: "API key name bytes",
                actual: name.len(),
                limit: MAX_KEY_NAME_BYTES,
            });
        }
        if self.keys.contains_key(key_id) {
            return Err(EngineError::AlreadyExists {
                what: "API key",
                name: key_id.to_string(),
            });
        }
        if self.keys.len() >= MAX_API_KEYS_PER_TENANT {
            return Err(EngineError::LimitExceeded {
                what: "API keys per tenant",
                actual: self.keys.len() + 1,
                limit: MAX_API_KEYS_PER_TENANT,
            });
        }
        Ok(())
    }

    /// Adds a validated key (apply and checkpoint load).
    pub(crate) fn insert(&mut self, key_id: String, key: ApiKey) -> Result<(), EngineError> {
        self.validate_new(&key_id, &key.name)?;
        self.keys.insert(key_id, key);
        Ok(())
    }

    pub(crate) fn remove(&mut self, key_id: &str) -> Result<(), EngineError> {
        self.keys
            .remove(key_id)
            .map(|_| ())
            .ok_or_else(|| EngineError::NotFound {
                what: "API key",
                name: key_id.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(hash: u8) -> ApiKey {
        ApiKey {
            name: "ci".into(),
            secret_sha256: [hash; 32],
            created: TimestampMicros(1),
        }
    }

    #[test]
    fn verify_accepts_only_the_stored_hash_of_that_id() {
        let mut keys = ApiKeys::default();
        keys.insert("k1".into(), key(7)).expect("insert");
        assert!(keys.verify("k1", &[7; 32]));
        let mut almost = [7; 32];
        almost[31] = 8;
        assert!(!keys.verify("k1", &almost));
        assert!(!keys.verify("k2", &[7; 32]));
        keys.remove("k1").expect("remove");
        assert!(!keys.verify("k1", &[7; 32]));
    }

    #[test]
    fn ids_names_and_counts_are_bounded() {
        let mut keys = ApiKeys::default();
        assert!(keys.validate_new("bad id", "x").is_err());
        assert!(keys.validate_new("", "x").is_err());
        assert!(keys.validate_new("ok", &"n".repeat(129)).is_err());
        for i in 0..MAX_API_KEYS_PER_TENANT {
            keys.insert(format!("k{i}"), key(1))
                .expect("under the limit");
        }
        assert!(matches!(
            keys.validate_new("one-more", "x"),
            Err(EngineError::InvalidName { .. })
        ));
        assert!(matches!(
            keys.validate_new("onemore", "x"),
            Err(EngineError::LimitExceeded { .. })
        ));
    }
}
