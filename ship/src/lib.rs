//! `oc-ship` owns the archive (local directory and S3), segment, checkpoint and tail
//! shipping, and point-in-time restore (`oc-pitr`). It holds no tenant state.
//!
//! The archive's owner record ([`lease`]) is the replication lease: it names the one
//! data directory that writes an archive and the process holding it, which renews it
//! while it runs and stops writing when another copy takes it; a promotion takes it
//! with the next epoch and ships under that epoch's prefix, a new history
//! ([`timeline`]) that restores follow. A restore starts a new epoch in the data
//! directory it writes (FORMAT.md §7).
#![deny(clippy::unwrap_used, clippy::expect_used)]

pub mod archive;
pub mod audit;
pub mod breaker;
pub mod catalog;
pub mod drill;
pub mod layout;
pub mod lease;
pub mod replay;
pub mod restore;
pub mod shipper;
pub mod timeline;
pub mod timestamp;

/// An error and its causes on one line for a command's output, as `{:#}` gives them,
/// leaving out a cause whose text its parent's message already holds (errors that
/// quote their source would otherwise print it twice).
pub fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_cause_quoted_by_its_parent_is_printed_once() {
        let io = std::io::Error::other("no AWS region: set AWS_REGION");
        let archive = archive::ArchiveError::Io {
            key: "s3://b/x".into(),
            source: std::sync::Arc::new(io),
        };
        let e = anyhow::Error::new(archive).context("listing the archive");
        let line = super::error_line(&e);
        assert_eq!(line.matches("no AWS region").count(), 1, "{line}");
        assert!(
            line.starts_with("listing the archive: archive I/O on"),
            "{line}"
        );
    }

    use super::archive;
}
