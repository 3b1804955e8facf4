//! The one error type of the `io` crate. Every variant carries what an operator needs
//! to act: the file, the offset, the LSN. Errors are `Clone` because one failed group
//! commit reports the same error to every appender waiting on it.

use std::sync::Arc;

use crate::wal::Lsn;

/// Everything that can go wrong below the engine.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// An I/O call failed. `source.kind()` / `raw_os_error()` tell which (EIO, ENOSPC…).
    #[error("{op} {file}: {source}")]
    Io {
        op: &'static str,
        file: String,
        source: Arc<std::io::Error>,
    },
    /// The file system has no room. Nothing already durable was harmed.
    #[error("storage full while {op} {file}: free disk space, then retry")]
    StorageFull { op: &'static str, file: String },
    /// The simulated machine crashed (simulation only).
    #[error("simulated crash")]
    SimulatedCrash,
    /// An earlier `fdatasync` or write failed; the log refuses all further work because
    /// the kernel may have dropped the unsynced pages. Restart to run recovery.
    #[error("write-ahead log failed earlier and accepts no more writes; restart to recover (cause: {cause})")]
    WalFailed { cause: Arc<Error> },
    /// The log is shutting down.
    #[error("write-ahead log is closed")]
    WalClosed,
    /// A writer's log that stopped taking its own frames ([`crate::Wal::stop_own_writes`]:
    /// its writer hands over to a follower).
    #[error("this log takes no more writes of its own: its writer is handing over")]
    OwnWritesStopped,
    /// A frame larger than the log can hold in one group or segment.
    #[error("record of {bytes} bytes exceeds the limit of {limit} bytes")]
    RecordTooLarge { bytes: usize, limit: usize },
    /// A tenant tag longer than the frame format allows.
    #[error("tenant tag of {bytes} bytes exceeds the limit of {limit} bytes")]
    TenantTooLong { bytes: usize, limit: usize },
    /// Bytes on disk are damaged in a way a crash cannot explain.
    #[error("corruption in {file} at offset {offset}: {reason}")]
    Corrupt {
        file: String,
        offset: u64,
        reason: String,
    },
    /// Recovery needs frames the log no longer holds.
    #[error("write-ahead log starts at LSN {first_available}, cannot replay from LSN {wanted}")]
    MissingFrames { wanted: Lsn, first_available: Lsn },
    /// The log ends before the LSN recovery must reach: acknowledged frames are gone.
    #[error("write-ahead log ends at LSN {last_in_log}, but state up to LSN {wanted} needs it")]
    LogTooShort { wanted: Lsn, last_in_log: Lsn },
    /// The log holds frames of a newer epoch: this writer has been superseded.
    #[error("configured epoch {} is older than epoch {} found in the log", configured.0, in_log.0)]
    StaleEpoch {
        configured: crate::wal::Epoch,
        in_log: crate::wal::Epoch,
    },
    /// A frame a checkpoint already holds is not on the writer's history: cutting the
    /// log cannot take it back.
    #[error("LSN {} of epoch {}, which a checkpoint holds, is not on the writer's history", lsn.0, epoch.0)]
    OffHistory {
        lsn: crate::wal::Lsn,
        epoch: crate::wal::Epoch,
    },
    /// A writer's frame handed to a follower's log does not continue it (a gap, an
    /// older epoch, a broken group). Nothing was written; resume from the durable LSN.
    #[error("stamped frame refused: {0}")]
    FrameRefused(String),
    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl Error {
    /// Wraps an `std::io::Error`, mapping ENOSPC to [`Error::StorageFull`] by its kind.
    pub fn io(op: &'static str, file: impl Into<String>, source: std::io::Error) -> Self {
        let file = file.into();
        if source.kind() == std::io::ErrorKind::StorageFull {
            return Error::StorageFull { op, file };
        }
        Error::Io {
            op,
            file,
            source: Arc::new(source),
        }
    }

    /// True when the process or the system is out of file descriptors (EMFILE,
    /// ENFILE): like a full disk, a condition that passes, not a broken file.
    pub fn is_out_of_descriptors(&self) -> bool {
        match self {
            Error::Io { source, .. } => matches!(
                source.raw_os_error(),
                Some(libc::EMFILE) | Some(libc::ENFILE)
            ),
            Error::WalFailed { cause } => cause.is_out_of_descriptors(),
            _ => false,
        }
    }

    /// True when the error is ENOSPC (possibly wrapped by a failed log).
    /// A file that is not there (a released log segment, say).
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }

    pub fn is_storage_full(&self) -> bool {
        match self {
            Error::StorageFull { .. } => true,
            Error::WalFailed { cause } => cause.is_storage_full(),
            _ => false,
        }
    }
}

/// Result alias of the `io` crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
