//! Named failpoints for faults the simulator cannot reach in a real process (a real
//! `fdatasync` error, a panic on a shard thread), so tests against the real binary can
//! prove what the process does then.
//!
//! They exist only in builds with the `failpoints` cargo feature, which the test
//! builds enable (`oc-net`'s dev-dependencies) and release builds of the binaries do
//! not: there [`armed`] is a constant `None` and no request can reach one. Even when
//! compiled in, a failpoint is armed only by the process's environment, never by a
//! client: `OC_FAILPOINTS="<name>=<arg>;<name>=<arg>"`.
//!
//! | name | arg | effect |
//! |---|---|---|
//! | `shard.panic` | a tenant id | a row write to that tenant panics on its owner shard |
//! | `wal.sync.err` | a file path | every `fdatasync` and every durable log write (`write_durable_at`, which replaces the group's `fdatasync` on an `O_DSYNC` segment) of the real storage fails with EIO while that file exists (a blocking `stat` per sync: test builds only) |
//! | `wal.sync.stall` | a file path | every `fdatasync` and durable log write of the real storage waits while that file exists (a frozen disk) |
//! | `shutdown.hang` | anything | the orderly shutdown never finishes (the watchdog must end it) |
//! | `audit.sync.err` | a file path | every sync of the audit log fails with EIO while that file exists |
//! | `digest.slow_ms` | milliseconds | each shard's part of `GET /v1/admin/digest` waits that long first |
//! | `promote.lease_answer_lost` | anything | the first promotion's write of the archive's lease record succeeds, and the promotion is answered as if the archive had failed (`503 archive_unavailable`) |

/// The environment variable that arms failpoints.
pub const ENV: &str = "OC_FAILPOINTS";

/// The argument of failpoint `name` when the environment arms it.
#[cfg(feature = "failpoints")]
pub fn armed(name: &str) -> Option<&'static str> {
    static ARMED: std::sync::OnceLock<Vec<(String, String)>> = std::sync::OnceLock::new();
    let armed = ARMED.get_or_init(|| {
        std::env::var(ENV)
            .unwrap_or_default()
            .split(';')
            .filter_map(|pair| pair.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect()
    });
    armed
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Without the `failpoints` feature nothing is ever armed.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn armed(_name: &str) -> Option<&'static str> {
    None
}

/// True when this build can arm failpoints (logged at start so it is never a secret).
pub const COMPILED_IN: bool = cfg!(feature = "failpoints");
