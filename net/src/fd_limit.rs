//! File descriptors are a resource a client can exhaust: every connection holds one,
//! and so does every log segment, checkpoint and archive file a shard opens. The soft
//! `RLIMIT_NOFILE` is raised to the hard limit at start, and a server whose
//! `--max-connections` cannot fit under it refuses to start, instead of failing
//! writes with EMFILE once the connections arrive.

use crate::ops::MAX_OPS_CONNECTIONS;

/// Descriptors a shard may hold besides connections: its executor's ring and event
/// fds, log segments and spares, checkpoint files, listeners.
pub const FDS_PER_SHARD: u64 = 64;
/// Descriptors for the rest of the process: stdio, the control executor, the
/// shipper's and the S3 client's files and sockets, the data directory lock.
pub const FDS_RESERVED: u64 = 256;

/// Descriptors the server needs with `max_connections` and `shards`.
pub fn needed(max_connections: usize, shards: usize) -> u64 {
    max_connections as u64
        + MAX_OPS_CONNECTIONS as u64
        + shards as u64 * FDS_PER_SHARD
        + FDS_RESERVED
}

/// Raises the soft limit to the hard one and checks that `needed` fits; returns the
/// limit now in force.
pub fn raise_and_check(needed: u64) -> Result<u64, String> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(format!(
            "reading the open-files limit failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we own; raising the soft limit up to the
        // hard one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    if limit.rlim_cur < needed {
        return Err(format!(
            "the open-files limit is {} (hard limit {}), but --max-connections and the shards need about {needed}: \
             raise it (systemd: LimitNOFILE=, shell: ulimit -n) or lower --max-connections",
            limit.rlim_cur, limit.rlim_max
        ));
    }
    Ok(limit.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_need_under_the_limit_passes_and_one_over_it_names_the_fix() {
        let limit = raise_and_check(1).expect("one descriptor fits");
        let e = raise_and_check(limit + 1).expect_err("over the hard limit");
        assert!(e.contains("--max-connections"), "{e}");
        assert!(e.contains(&limit.to_string()), "{e}");
    }
}
