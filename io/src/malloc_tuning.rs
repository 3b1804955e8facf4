//! glibc's allocator keeps a small per-thread cache of freed chunks (7 per size class
//! by default). A shard frees a whole group commit's worth of same-sized buffers at
//! once (each write's parsed JSON, its record), so most of them overflow that cache
//! into the shared bins, and the next group's allocations are searched for there: in
//! a saturated pool of shards (`oc-bench engine`, 256 writers) `malloc` and `free`
//! took 15–20 % of the shards' time. With a cache of 1,000 chunks per class the same
//! run did 1.25× the commits/s. glibc reads the setting only from the environment at
//! start-up, so the process re-executes itself once with it.

/// The tunable, as glibc spells it.
pub const TCACHE_TUNABLE: &str = "glibc.malloc.tcache_count=1000";

/// Set in the re-executed process's environment: at most one re-execution, even when
/// glibc drops the tunable (secure-execution mode strips `GLIBC_TUNABLES`).
pub const REEXECUTED_MARKER: &str = "OC_MALLOC_REEXECUTED";

/// Re-executes the running binary with [`TCACHE_TUNABLE`] added to `GLIBC_TUNABLES`,
/// unless `GLIBC_TUNABLES` already sets a cache count (an operator's choice), this is
/// the re-executed process ([`REEXECUTED_MARKER`]) or it runs in secure-execution mode
/// (setuid or file capabilities: glibc ignores the tunable there). Call it first thing
/// in `main`, before any thread starts. Returns only when it did not re-execute (then with why, if it failed).
pub fn reexec_with_larger_thread_cache() -> Result<(), String> {
    // SAFETY: getauxval reads the process's auxiliary vector; it has no preconditions.
    let secure = unsafe { libc::getauxval(libc::AT_SECURE) } != 0;
    if !cfg!(target_env = "gnu") || secure || std::env::var_os(REEXECUTED_MARKER).is_some() {
        return Ok(());
    }
    let current = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
    if current.contains("glibc.malloc.tcache_count") {
        return Ok(());
    }
    let tunables = if current.is_empty() {
        TCACHE_TUNABLE.to_string()
    } else {
        format!("{current}:{TCACHE_TUNABLE}")
    };
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_default();
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new("/proc/self/exe")
        .arg0(argv0)
        .args(args)
        .env("GLIBC_TUNABLES", tunables)
        .env(REEXECUTED_MARKER, "1")
        .exec();
    Err(format!(
        "could not re-execute with {TCACHE_TUNABLE} ({err}); running with glibc's default thread cache"
    ))
}
