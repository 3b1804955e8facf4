//! What the kernel knows about this process and its data disk, for `/metrics`: CPU
//! time, resident memory and open descriptors from `/proc/self` (under Prometheus'
//! standard `process_*` names, so stock dashboards and alerts work), and the data
//! directory's file system from `statvfs`.
//!
//! These are blocking system calls: they run on the control executor at scrape time,
//! never on a shard. Each reading that fails is left out of the scrape (a missing
//! series, which the "absent" alerts notice) rather than reported as zero.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// A reading of `/proc/self` and the open-files limit.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessStats {
    /// User plus system CPU time since the process started.
    pub cpu_seconds: Option<f64>,
    pub resident_bytes: Option<u64>,
    pub open_fds: Option<u64>,
    /// The soft `RLIMIT_NOFILE` in force.
    pub max_fds: Option<u64>,
}

/// The data directory's file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskStats {
    /// Bytes an unprivileged writer may still use (`f_bavail`, what `df` shows as free).
    pub free_bytes: u64,
    pub size_bytes: u64,
}

/// Reads this process's CPU time, resident memory and descriptors.
pub fn process() -> ProcessStats {
    let stat = std::fs::read_to_string("/proc/self/stat").ok();
    let fields = stat.as_deref().and_then(stat_fields);
    ProcessStats {
        cpu_seconds: fields.map(|f| f.cpu_ticks as f64 / clock_ticks_per_second()),
        resident_bytes: fields.map(|f| f.rss_pages.saturating_mul(page_size())),
        open_fds: std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|dir| dir.count() as u64),
        max_fds: max_fds(),
    }
}

/// Free and total bytes of the file system holding `dir`.
pub fn disk(dir: &Path) -> std::io::Result<DiskStats> {
    let path = CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut buf: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and outlives the call; statvfs writes only `buf`.
    if unsafe { libc::statvfs(path.as_ptr(), &mut buf) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // Every field is a u64 on the 64-bit Linux targets oc builds for.
    let block = buf.f_frsize;
    Ok(DiskStats {
        free_bytes: buf.f_bavail.saturating_mul(block),
        size_bytes: buf.f_blocks.saturating_mul(block),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StatFields {
    cpu_ticks: u64,
    rss_pages: u64,
}

/// `utime + stime` (fields 14, 15) and `rss` (field 24) of `/proc/<pid>/stat`. The
/// command name (field 2) may hold spaces and parentheses, so fields are counted from
/// the last `)`.
fn stat_fields(stat: &str) -> Option<StatFields> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    // Field 3 (state) is the first one after the name.
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(StatFields {
        cpu_ticks: field(14)?.saturating_add(field(15)?),
        rss_pages: field(24)?,
    })
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a constant of the system.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0 // USER_HZ on every Linux architecture oc builds for
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf only reads a constant of the system.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).unwrap_or(4096).max(1)
}

fn max_fds() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we own.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0).then_some(limit.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        // A command name with spaces and a `)` inside, as a thread may name itself.
        let stat = "4242 (oc (shard) 1) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    250 50 0 0 20 0 9 0 1234 104857600 3000 18446744073709551615";
        let fields = stat_fields(stat).expect("parses");
        assert_eq!(fields.cpu_ticks, 300);
        assert_eq!(fields.rss_pages, 3000);
    }

    #[test]
    fn a_truncated_stat_line_is_no_reading() {
        assert_eq!(stat_fields("4242 (oc) S 1 2 3"), None);
        assert_eq!(stat_fields("no parenthesis"), None);
    }

    #[test]
    fn this_process_reads_itself() {
        let stats = process();
        assert!(stats.cpu_seconds.is_some_and(|s| s >= 0.0));
        assert!(stats.resident_bytes.is_some_and(|b| b > 0));
        assert!(stats.open_fds.is_some_and(|n| n >= 3));
        assert!(stats.max_fds.is_some_and(|n| n > 0));
    }

    #[test]
    fn the_disk_of_a_directory_has_room_within_its_size() {
        let dir = std::env::temp_dir();
        let disk = disk(&dir).expect("statvfs of the temp dir");
        assert!(disk.size_bytes > 0);
        assert!(disk.free_bytes <= disk.size_bytes);
    }
}
