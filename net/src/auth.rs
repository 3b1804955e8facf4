//! Who is calling: the operator (admin token) or one tenant's API key.
//!
//! API keys look like `oc.<tenant>.<key id>.<secret>`: the tenant part lets a request
//! for another tenant be refused (403) where it lands; the secret (32 random bytes, hex)
//! is checked on the tenant's owner shard against the SHA-256 stored in the tenant's
//! log. A plain hash is enough because the secret is 256 random bits, not a password.
//! The admin token is compared in constant time (on digests, with `subtle`).

use hyper::header::AUTHORIZATION;
use hyper::{HeaderMap, StatusCode};
use oc_engine::TenantId;
use sha2::{Digest, Sha256};

use crate::api::error::ApiError;

/// Shortest admin token accepted.
pub const MIN_ADMIN_TOKEN_BYTES: usize = 16;
const KEY_PREFIX: &str = "oc";

/// Whether authentication is on, and the admin token when it is.
#[derive(Clone, Debug, Default)]
pub struct AuthConfig {
    pub admin_token: Option<String>,
}

/// The identity a request proved.
#[derive(Debug, Clone)]
pub enum Caller {
    /// Authentication is off (no admin token configured, loopback only).
    Anyone,
    Admin,
    Key(KeyClaim),
}

/// An API key as presented: checked on the owner shard.
#[derive(Debug, Clone)]
pub struct KeyClaim {
    pub tenant: TenantId,
    pub key_id: String,
    pub secret_sha256: [u8; 32],
}

fn unauthorized(message: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
}

pub fn forbidden(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
}

/// The caller of a request, from its `Authorization: Bearer` header.
pub fn identify(headers: &HeaderMap, config: &AuthConfig) -> Result<Caller, ApiError> {
    let Some(admin_token) = &config.admin_token else {
        return Ok(Caller::Anyone);
    };
    let Some(value) = headers.get(AUTHORIZATION) else {
        return Err(unauthorized(
            "send `Authorization: Bearer <API key or admin token>`",
        ));
    };
    // A proxy in front may take another of them than this server would: ambiguous.
    if headers.get_all(AUTHORIZATION).iter().nth(1).is_some() {
        return Err(unauthorized("send one Authorization header, not several"));
    }
    let token = value
        .to_str()
        .ok()
        .and_then(bearer_token)
        .ok_or_else(|| unauthorized("the Authorization header must be `Bearer <token>`"))?;
    if constant_time_eq(token.as_bytes(), admin_token.as_bytes()) {
        return Ok(Caller::Admin);
    }
    parse_key(token)
        .map(Caller::Key)
        .ok_or_else(|| unauthorized("the token is neither the admin token nor an API key"))
}

/// The token of an `Authorization: Bearer <token>` value. The scheme is matched
/// without regard to case (RFC 9110 §11.1: clients that send `bearer` are right).
pub(crate) fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn parse_key(token: &str) -> Option<KeyClaim> {
    let mut parts = token.split('.');
    let (prefix, tenant, key_id, secret) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if prefix != KEY_PREFIX || parts.next().is_some() || secret.len() != 64 {
        return None;
    }
    Some(KeyClaim {
        tenant: TenantId::parse(tenant).ok()?,
        key_id: key_id.to_string(),
        secret_sha256: Sha256::digest(secret.as_bytes()).into(),
    })
}

/// A well-formed API key its tenant does not hold (never was, or revoked).
pub fn unknown_key() -> ApiError {
    unauthorized("the API key is unknown or revoked")
}

/// A key its tenant holds, used on another tenant.
pub fn key_of_another_tenant(claim: &KeyClaim, tenant: &str) -> ApiError {
    forbidden(format!(
        "this API key belongs to tenant {}, not {tenant}",
        claim.tenant
    ))
}

/// Only the operator may do this.
pub fn require_admin(caller: &Caller) -> Result<(), ApiError> {
    match caller {
        Caller::Anyone | Caller::Admin => Ok(()),
        Caller::Key(_) => Err(forbidden(
            "this endpoint needs the admin token, not an API key",
        )),
    }
}

/// A new key for `tenant`: (key id, the full key to show once, its secret's SHA-256).
pub fn new_key(tenant: &TenantId) -> Result<(String, String, [u8; 32]), ApiError> {
    let mut random = [0u8; 40];
    getrandom::getrandom(&mut random).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("no randomness for a key: {e}"),
        )
    })?;
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let key_id = format!("k{}", hex(&random[..8]));
    let secret = hex(&random[8..]);
    let sha: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
    Ok((
        key_id.clone(),
        format!("{KEY_PREFIX}.{tenant}.{key_id}.{secret}"),
        sha,
    ))
}

/// Watch tokens live this long unless asked otherwise...
pub const WATCH_TOKEN_DEFAULT_TTL_S: u64 = 300;
/// ...and at most this long.
pub const WATCH_TOKEN_MAX_TTL_S: u64 = 3600;
const WATCH_TOKEN_PREFIX: &str = "ocw";
/// The key part of a watch token the admin minted.
const ADMIN_MINTED: &str = "-";

/// The key that signs watch tokens. With authentication on it is derived from the
/// admin token, so a token outlives a restart and opens streams on every server of the
/// same admin token (a follower, a promoted one): an `EventSource`, which cannot be
/// given a new URL when it reconnects, resumes after a restart or a failover. Changing
/// the admin token voids every watch token. Without authentication tokens are not
/// checked, and the key is random per process.
fn watch_token_key(config: &AuthConfig) -> Result<[u8; 32], ApiError> {
    use hmac::{Hmac, Mac};
    if let Some(admin_token) = &config.admin_token {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(admin_token.as_bytes())
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        mac.update(b"oc watch-token signing key, version 1");
        return Ok(mac.finalize().into_bytes().into());
    }
    static KEY: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    if let Some(key) = KEY.get() {
        return Ok(*key);
    }
    let mut key = [0u8; 32];
    getrandom::getrandom(&mut key).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("no randomness for the watch-token key: {e}"),
        )
    })?;
    Ok(*KEY.get_or_init(|| key))
}

fn watch_token_signature(key: &[u8; 32], claim: &str) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(claim.as_bytes());
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn unix_now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A token that opens `/watch` streams of `tenant` for `ttl_s` seconds, on behalf of
/// API key `key_id` (`None`: the admin): `ocw.<tenant>.<key id or "-">.<expiry, unix
/// seconds>.<HMAC-SHA256 of the rest>`. Returns it and its expiry.
pub fn mint_watch_token(
    tenant: &TenantId,
    key_id: Option<&str>,
    ttl_s: u64,
    config: &AuthConfig,
) -> Result<(String, u64), ApiError> {
    let expires = unix_now_s() + ttl_s;
    let claim = format!(
        "{WATCH_TOKEN_PREFIX}.{tenant}.{}.{expires}",
        key_id.unwrap_or(ADMIN_MINTED)
    );
    let signature = watch_token_signature(&watch_token_key(config)?, &claim);
    Ok((format!("{claim}.{signature}"), expires))
}

/// Checks a watch token for `tenant` and returns the API key it was minted with
/// (`None`: the admin's; any token passes when authentication is off). The key must
/// still exist when the stream opens: the caller checks that on the owner.
pub fn check_watch_token(
    token: &str,
    tenant: &TenantId,
    config: &AuthConfig,
) -> Result<Option<String>, ApiError> {
    if config.admin_token.is_none() {
        return Ok(None);
    }
    let invalid = || {
        unauthorized("the watch token is invalid or expired; mint a new one (POST /v1/tenants/<tenant>/watch-tokens)")
    };
    let (claim, signature) = token.rsplit_once('.').ok_or_else(invalid)?;
    let mut parts = claim.split('.');
    let (Some(WATCH_TOKEN_PREFIX), Some(for_tenant), Some(key), Some(expires), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(invalid());
    };
    let expected = watch_token_signature(&watch_token_key(config)?, claim);
    if !constant_time_eq(expected.as_bytes(), signature.as_bytes()) {
        return Err(invalid());
    }
    let expires: u64 = expires.parse().map_err(|_| invalid())?;
    if expires <= unix_now_s() {
        return Err(invalid());
    }
    if for_tenant != tenant.as_str() {
        return Err(forbidden(format!(
            "this watch token is for tenant {for_tenant}, not {tenant}"
        )));
    }
    Ok((key != ADMIN_MINTED).then(|| key.to_string()))
}

/// Compares the SHA-256 digests of both in constant time: neither the position of the
/// first difference nor the admin token's length shows in the time taken.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    let (a, b): ([u8; 32], [u8; 32]) = (Sha256::digest(a).into(), Sha256::digest(b).into());
    a.ct_eq(&b).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            AUTHORIZATION,
            format!("Bearer {token}").parse().expect("header"),
        );
        h
    }

    #[test]
    fn the_bearer_scheme_is_matched_in_any_case_and_needs_a_token() {
        for (value, token) in [
            ("Bearer abc", Some("abc")),
            ("bearer abc", Some("abc")),
            ("BEARER  abc ", Some("abc")),
            ("Bearer", None),
            ("Bearer ", None),
            ("Basic abc", None),
            ("Bearerabc", None),
        ] {
            assert_eq!(bearer_token(value), token, "{value:?}");
        }
    }

    #[test]
    fn a_new_key_parses_back_to_its_tenant_id_and_hash() {
        let tenant = TenantId::parse("acme").expect("valid");
        let (key_id, key, sha) = new_key(&tenant).expect("key");
        let config = AuthConfig {
            admin_token: Some("a".repeat(20)),
        };
        match identify(&headers(&key), &config).expect("identified") {
            Caller::Key(claim) => {
                assert_eq!(claim.tenant, tenant);
                assert_eq!(claim.key_id, key_id);
                assert_eq!(claim.secret_sha256, sha);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn admin_token_missing_and_malformed_headers() {
        let config = AuthConfig {
            admin_token: Some("s3cret-admin-token".into()),
        };
        assert!(matches!(
            identify(&headers("s3cret-admin-token"), &config),
            Ok(Caller::Admin)
        ));
        for bad in ["s3cret-admin-tokeN", "oc.acme.k1.short", "oc.ACME.k1.x", ""] {
            let e = identify(&headers(bad), &config).expect_err(bad);
            assert_eq!(e.status, StatusCode::UNAUTHORIZED);
        }
        let e = identify(&HeaderMap::new(), &config).expect_err("missing");
        assert_eq!(e.status, StatusCode::UNAUTHORIZED);
        let mut twice = headers("s3cret-admin-token");
        twice.append(
            AUTHORIZATION,
            "Bearer s3cret-admin-token".parse().expect("header"),
        );
        let e = identify(&twice, &config).expect_err("two headers");
        assert_eq!(e.status, StatusCode::UNAUTHORIZED);
        assert!(
            e.message.contains("one Authorization header"),
            "{}",
            e.message
        );
        assert!(matches!(
            identify(&HeaderMap::new(), &AuthConfig::default()),
            Ok(Caller::Anyone)
        ));
    }
}
