//! A new follower's first start: before its layout is recorded, each shard's newest
//! checkpoint is copied from the writer ([`receiver::fetch_checkpoint`]), so the
//! follower loads the writer's state and streams only the log after it. The writer
//! keeps that log (a segment goes only once every kept checkpoint covers it), while
//! the start of its log may long be gone.
//!
//! The layout file is the commit point: a bootstrap cut short leaves a marker file
//! ([`MARKER`]) and no layout, and the next start removes what it copied and begins
//! again.

use std::path::Path;

use oc_engine::placement::shard_dir;
use oc_io::Lsn;

use super::receiver::LayoutError;

/// Present from the first copied byte until the layout is recorded.
pub const MARKER: &str = "bootstrap.partial";

/// What keeps `data_dir` from being a new follower's to bootstrap: the first entry
/// that is not the lock file, `lost+found` (a fresh file system's root) or what a
/// bootstrap cut short left (its marker and shard directories). `None`: it is new.
pub fn blocker(data_dir: &Path) -> std::io::Result<Option<String>> {
    let interrupted = data_dir.join(MARKER).exists();
    let entries = match std::fs::read_dir(data_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let left_by_bootstrap = interrupted && (name == MARKER || name.starts_with("shard-"));
        let expected = name == oc_io::dir_lock::LOCK_FILE || name == "lost+found";
        if !(expected || left_by_bootstrap) {
            return Ok(Some(name));
        }
    }
    Ok(None)
}

/// Settles a marker at start: one beside a layout is a finished bootstrap's (the
/// process ended before removing it) and goes; one without is refused to a writer,
/// which would lay its own layout over half-copied shards.
pub fn settle_marker(data_dir: &Path, writer: bool) -> Result<(), String> {
    let marker = data_dir.join(MARKER);
    if !marker.exists() {
        return Ok(());
    }
    if data_dir.join(oc_engine::placement::LAYOUT_FILE).exists() {
        return finish(data_dir).map_err(|e| format!("removing {}: {e}", marker.display()));
    }
    if writer {
        return Err(format!(
            "{} holds a follower's bootstrap that did not finish ({MARKER}): start it as a \
             follower again to finish it, or start the writer on an empty directory",
            data_dir.display()
        ));
    }
    Ok(())
}

/// Copies every shard's newest checkpoint into `data_dir` with `fetch(shard, dir)`,
/// after removing what an interrupted bootstrap left. Returns each shard's checkpoint
/// LSN (`None`: the writer had none, the shard starts empty). [`finish`] ends it once
/// the layout is recorded.
pub fn copy_checkpoints(
    data_dir: &Path,
    shards: usize,
    mut fetch: impl FnMut(usize, &Path) -> Result<Option<Lsn>, LayoutError>,
) -> Result<Vec<Option<Lsn>>, LayoutError> {
    let local = |what: &str, path: &Path, e: std::io::Error| {
        LayoutError::Refused(format!("{what} {}: {e}", path.display()))
    };
    let marker = data_dir.join(MARKER);
    std::fs::write(&marker, b"")
        .and_then(|()| sync_dir(data_dir))
        .map_err(|e| local("creating", &marker, e))?;
    for entry in std::fs::read_dir(data_dir).map_err(|e| local("listing", data_dir, e))? {
        let entry = entry.map_err(|e| local("listing", data_dir, e))?;
        if entry.file_name().to_string_lossy().starts_with("shard-") {
            std::fs::remove_dir_all(entry.path())
                .map_err(|e| local("removing the interrupted bootstrap's", &entry.path(), e))?;
        }
    }
    let mut copied = Vec::with_capacity(shards);
    for shard in 0..shards {
        let dir = shard_dir(data_dir, shard);
        std::fs::create_dir(&dir).map_err(|e| local("creating", &dir, e))?;
        let started = std::time::Instant::now();
        let lsn = fetch(shard, &dir)?;
        sync_dir(&dir).map_err(|e| local("syncing", &dir, e))?;
        let bytes: u64 = std::fs::read_dir(&dir)
            .map_err(|e| local("listing", &dir, e))?
            .flatten()
            .filter_map(|entry| entry.metadata().ok())
            .map(|meta| meta.len())
            .sum();
        tracing::info!(
            shard,
            checkpoint = lsn.map_or(0, |l| l.0),
            bytes,
            took_ms = started.elapsed().as_millis() as u64,
            "new follower: copied the writer's newest checkpoint"
        );
        copied.push(lsn);
    }
    sync_dir(data_dir).map_err(|e| local("syncing", data_dir, e))?;
    Ok(copied)
}

/// Ends a bootstrap whose layout is recorded.
pub fn finish(data_dir: &Path) -> std::io::Result<()> {
    std::fs::remove_file(data_dir.join(MARKER))?;
    sync_dir(data_dir)
}

/// Removes everything in `dir` (a shard's copy that is starting over).
pub fn empty_dir(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        std::fs::remove_file(entry?.path())?;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_empty_directory_or_an_interrupted_bootstrap_is_new() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        assert_eq!(blocker(&data).expect("absent"), None);
        std::fs::create_dir(&data).expect("mkdir");
        std::fs::write(data.join(oc_io::dir_lock::LOCK_FILE), b"pid").expect("lock");
        std::fs::create_dir(data.join("lost+found")).expect("mkdir");
        assert_eq!(blocker(&data).expect("the lock, lost+found"), None);
        std::fs::create_dir(data.join("shard-0")).expect("mkdir");
        assert_eq!(
            blocker(&data).expect("a shard without a marker"),
            Some("shard-0".into()),
            "a shard directory not left by a bootstrap is someone's data"
        );
        std::fs::write(data.join(MARKER), b"").expect("marker");
        assert_eq!(blocker(&data).expect("an interrupted bootstrap"), None);
        std::fs::write(data.join("notes.txt"), b"mine").expect("write");
        assert_eq!(
            blocker(&data).expect("anything else"),
            Some("notes.txt".into())
        );
    }

    #[test]
    fn a_marker_beside_a_layout_goes_and_one_without_is_refused_to_a_writer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path();
        settle_marker(data, true).expect("no marker: nothing to do");
        std::fs::write(data.join(MARKER), b"").expect("marker");
        let refused = settle_marker(data, true).expect_err("half-copied shards");
        assert!(refused.contains("did not finish"), "{refused}");
        settle_marker(data, false).expect("a follower starts the copy over");
        assert!(data.join(MARKER).exists());
        std::fs::write(data.join(oc_engine::placement::LAYOUT_FILE), b"{}").expect("layout");
        settle_marker(data, true).expect("a finished bootstrap");
        assert!(!data.join(MARKER).exists());
    }

    #[test]
    fn a_bootstrap_starts_over_from_what_an_interrupted_one_left() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path();
        std::fs::create_dir(data.join("shard-0")).expect("mkdir");
        std::fs::write(data.join("shard-0").join("checkpoint-half.snap"), b"x").expect("w");
        std::fs::write(data.join(MARKER), b"").expect("marker");
        let copied = copy_checkpoints(data, 2, |shard, dir| {
            assert!(
                std::fs::read_dir(dir).expect("list").next().is_none(),
                "shard {shard} starts empty"
            );
            std::fs::write(dir.join("checkpoint"), b"c").expect("w");
            Ok((shard == 1).then_some(Lsn(7)))
        })
        .expect("copied");
        assert_eq!(copied, vec![None, Some(Lsn(7))]);
        assert!(
            data.join(MARKER).exists(),
            "held until the layout is recorded"
        );
        finish(data).expect("finish");
        assert!(!data.join(MARKER).exists());
    }
}
