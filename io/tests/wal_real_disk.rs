//! The WAL on the real disk: O_DIRECT files through glommio in a temp directory, with
//! damage injected by ordinary file writes between runs.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::rc::Rc;

use oc_io::executor::run_local;
use oc_io::wal::segment::{parse_segment_name, DATA_START};
use oc_io::{DmaStorage, Epoch, Error, Lsn, RecordKind, RecoveryReport, Wal, WalConfig};

const KIND: RecordKind = RecordKind(7);

fn small_segments() -> WalConfig {
    WalConfig {
        segment_bytes: 64 * 1024,
        max_group_bytes: 16 * 1024,
        ..WalConfig::default()
    }
}

fn payload(i: u64) -> Vec<u8> {
    let mut p = i.to_le_bytes().to_vec();
    p.resize(100 + (i % 300) as usize, i as u8);
    p
}

type Frames = BTreeMap<u64, (Vec<u8>, Vec<u8>)>;

async fn open(
    dir: &Path,
    config: WalConfig,
    from: Lsn,
) -> Result<(Wal<DmaStorage>, Frames, RecoveryReport), Error> {
    let storage = DmaStorage::open(dir).await?;
    let mut frames = BTreeMap::new();
    let (wal, report) = Wal::open(storage, config, from, |f| {
        frames.insert(f.lsn.0, (f.tenant.to_vec(), f.payload.to_vec()));
        Ok(())
    })
    .await?;
    Ok((wal, frames, report))
}

/// A log in small segments (several sealed) holding 600 appends from 4 tasks, closed;
/// returns LSN → payload.
async fn closed_log_of_600(dir: &Path) -> BTreeMap<u64, Vec<u8>> {
    let (wal, _, _) = open(dir, small_segments(), Lsn(1)).await.expect("open");
    let wal = Rc::new(wal);
    let acked = append_many(wal.clone(), 600, 4).await;
    wal.close().await.expect("close");
    acked
}

/// Appends `n` payloads from `tasks` concurrent tasks; returns LSN → payload.
async fn append_many(wal: Rc<Wal<DmaStorage>>, n: u64, tasks: u64) -> BTreeMap<u64, Vec<u8>> {
    append_pausing(wal, n, tasks, |_| std::time::Duration::ZERO).await
}

/// [`append_many`], each task pausing `pause(i)` after its append of payload `i`.
async fn append_pausing(
    wal: Rc<Wal<DmaStorage>>,
    n: u64,
    tasks: u64,
    pause: fn(u64) -> std::time::Duration,
) -> BTreeMap<u64, Vec<u8>> {
    let mut handles = Vec::new();
    for t in 0..tasks {
        let wal = wal.clone();
        handles.push(glommio::spawn_local(async move {
            let mut acked = Vec::new();
            for i in (t..n).step_by(tasks as usize) {
                let p = payload(i);
                let lsn = wal.append(KIND, b"tenant-a", &p).await.expect("append");
                acked.push((lsn.0, p));
                let pause = pause(i);
                if !pause.is_zero() {
                    glommio::timer::sleep(pause).await;
                }
            }
            acked
        }));
    }
    let mut all = BTreeMap::new();
    for h in handles {
        all.extend(h.await);
    }
    all
}

/// Every recovered frame holds the payload acknowledged at its LSN.
fn assert_payloads_match(frames: &Frames, acked: &BTreeMap<u64, Vec<u8>>) {
    for (lsn, (_, p)) in frames {
        assert_eq!(Some(p), acked.get(lsn), "LSN {lsn}");
    }
}

fn segment_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| parse_segment_name(n).is_some())
        .collect();
    names.sort();
    names
}

fn damage(path: &Path, offset: u64, bytes: &[u8]) {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open for damage");
    file.write_all_at(bytes, offset).expect("damage");
    file.sync_all().expect("sync damage");
}

#[test]
fn appends_from_many_tasks_survive_a_reopen_in_lsn_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    run_local(async {
        let (wal, frames, _) = open(dir.path(), WalConfig::default(), Lsn(1))
            .await
            .expect("open");
        assert!(frames.is_empty());
        let wal = Rc::new(wal);
        let acked = append_many(wal.clone(), 2000, 32).await;
        assert_eq!(
            acked.keys().copied().collect::<Vec<_>>(),
            (1..=2000).collect::<Vec<_>>()
        );
        let stats = wal.stats();
        assert_eq!(stats.appends, 2000);
        assert!(
            stats.groups < 2000,
            "32 concurrent appenders share group commits: {} groups",
            stats.groups
        );
        assert_eq!(stats.fsync_lag_us.len(), 2000);
        wal.close().await.expect("close");
        drop(wal);

        let (_wal, frames, report) = open(dir.path(), WalConfig::default(), Lsn(1))
            .await
            .expect("reopen");
        assert_eq!(report.torn_tail, None);
        assert_eq!(report.last_lsn, Lsn(2000));
        for (lsn, p) in &acked {
            assert_eq!(
                frames.get(lsn),
                Some(&(b"tenant-a".to_vec(), p.clone())),
                "LSN {lsn}"
            );
        }
    });
}

#[test]
fn groups_written_while_another_is_on_its_way_survive_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    run_local(async {
        let (wal, _, _) = open(dir.path(), small_segments(), Lsn(1))
            .await
            .expect("open");
        let wal = Rc::new(wal);
        // Appenders that pause between appends arrive while a group is on its way,
        // so the next group is written before the first returns.
        let acked = append_pausing(wal.clone(), 3000, 16, |i| {
            std::time::Duration::from_micros(20 * (i % 7))
        })
        .await;
        let stats = wal.stats();
        assert!(
            stats.groups_overlapped > 0,
            "no group was written while another was on its way ({} groups)",
            stats.groups
        );
        assert!(stats.segments_created > 1, "the log rotated meanwhile");
        wal.close().await.expect("close");
        drop(wal);
        let (_wal, frames, report) = open(dir.path(), small_segments(), Lsn(1))
            .await
            .expect("reopen");
        assert_eq!(report.torn_tail, None);
        assert_eq!(frames.len(), 3000);
        assert_payloads_match(&frames, &acked);
    });
}

#[test]
fn a_larger_group_setting_after_a_restart_starts_a_new_segment() {
    let dir = tempfile::tempdir().expect("tempdir");
    run_local(async {
        let small = WalConfig {
            segment_bytes: 1 << 20,
            max_group_bytes: 16 * 1024,
            ..WalConfig::default()
        };
        let (wal, _, _) = open(dir.path(), small.clone(), Lsn(1)).await.expect("open");
        let wal = Rc::new(wal);
        let mut acked = append_many(wal.clone(), 50, 4).await;
        wal.close().await.expect("close");
        drop(wal);
        let before = segment_files(dir.path());

        // The active segment's header promises groups of at most 16 KiB; groups of
        // up to 64 KiB go to a new segment, so a tear stays within what the header says.
        let large = WalConfig {
            max_group_bytes: 64 * 1024,
            ..small
        };
        let (wal, _, _) = open(dir.path(), large.clone(), Lsn(1))
            .await
            .expect("reopen");
        let wal = Rc::new(wal);
        let big = vec![9u8; 40 * 1024];
        let lsn = wal.append(KIND, b"tenant-a", &big).await.expect("append");
        acked.insert(lsn.0, big);
        wal.close().await.expect("close");
        drop(wal);
        let after = segment_files(dir.path());
        assert_eq!(after.len(), before.len() + 1, "{before:?} then {after:?}");

        let (_wal, frames, _) = open(dir.path(), large, Lsn(1)).await.expect("reopen");
        assert_payloads_match(&frames, &acked);
        assert_eq!(frames.len(), acked.len());
    });
}

#[test]
fn full_segments_are_sealed_rotated_and_released() {
    let dir = tempfile::tempdir().expect("tempdir");
    run_local(async {
        let (wal, _, _) = open(dir.path(), small_segments(), Lsn(1))
            .await
            .expect("open");
        let wal = Rc::new(wal);
        let acked = append_many(wal.clone(), 1500, 8).await;
        let segments = wal.segments();
        assert!(segments.len() >= 4, "64 KiB segments rotate: {segments:?}");
        assert_eq!(segments, segment_files(dir.path()));
        assert_eq!(wal.stats().segments_sealed as usize, segments.len() - 1);

        // Releasing below an LSN removes only segments wholly below it.
        let (_, _, second_first) = parse_segment_name(&segments[1]).expect("segment name");
        let removed = wal.release_before(second_first).await.expect("release");
        assert_eq!(removed, vec![segments[0].clone()]);
        wal.close().await.expect("close");
        drop(wal);

        let (_wal, frames, report) = open(dir.path(), small_segments(), second_first)
            .await
            .expect("reopen");
        assert_eq!(report.first_lsn, Some(second_first));
        assert_eq!(report.segments.len(), segments.len() - 1);
        assert_eq!(frames.len() as u64, 1500 - second_first.0 + 1);
        assert_payloads_match(&frames, &acked);
        // Frames the log no longer has cannot be replayed.
        let too_early = open(dir.path(), small_segments(), Lsn(1)).await;
        assert!(
            matches!(too_early, Err(Error::MissingFrames { wanted: Lsn(1), .. })),
            "{:?}",
            too_early.err()
        );
    });
}

/// The log's segment and spare counters, for assertion messages.
fn spares(wal: &Wal<DmaStorage>) -> String {
    let s = wal.stats();
    format!(
        "segments created {}, spares zero-filled {}, spare waits {}",
        s.segments_created, s.spares_zero_filled, s.spare_waits
    )
}

#[test]
fn a_rotation_that_waits_for_the_spare_is_counted_and_one_that_finds_it_ready_is_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    run_local(async {
        let (wal, _, _) = open(dir.path(), small_segments(), Lsn(1))
            .await
            .expect("open");
        // A fresh log has no segment: its first append waits for the first spare,
        // whose fill only started at the open.
        wal.append(KIND, b"tenant-a", &payload(0))
            .await
            .expect("append");
        assert_eq!(wal.stats().spare_waits, 1, "{}", spares(&wal));
        // Once the next spare is ready, the rotation into it does not wait.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while wal.stats().spares_zero_filled < 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "the next spare was not ready within 30 s: {}",
                spares(&wal)
            );
            glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
        }
        let mut i = 1;
        while wal.stats().segments_created < 2 {
            wal.append(KIND, b"tenant-a", &payload(i))
                .await
                .expect("append");
            i += 1;
        }
        assert_eq!(wal.stats().spare_waits, 1, "{}", spares(&wal));
        wal.close().await.expect("close");
    });
}

#[test]
fn a_lost_newest_segment_is_refused_unless_the_operator_truncates() {
    let dir = tempfile::tempdir().expect("tempdir");
    run_local(async {
        let acked = closed_log_of_600(dir.path()).await;
        let segments = segment_files(dir.path());
        assert!(segments.len() >= 3, "64 KiB segments rotate: {segments:?}");
        let (newest, sealed) = (&segments[segments.len() - 1], &segments[segments.len() - 2]);
        let (_, _, lost_from) = parse_segment_name(newest).expect("segment name");
        std::fs::remove_file(dir.path().join(newest)).expect("delete the newest segment");

        // The segment before it says, in its footer, that a successor was made.
        let refused = open(dir.path(), small_segments(), Lsn(1)).await;
        match refused {
            Err(Error::Corrupt { file, reason, .. }) => {
                assert_eq!(&file, sealed);
                assert!(
                    reason.contains("newest segment was deleted or lost"),
                    "{reason}"
                );
                assert!(reason.contains(&format!("LSN {}", lost_from.0)), "{reason}");
            }
            other => panic!("expected a refusal, got {:?}", other.map(|(_, _, r)| r)),
        }
        assert_eq!(
            segment_files(dir.path()).len(),
            segments.len() - 1,
            "nothing removed"
        );

        // The operator may accept the loss: the log goes on from the sealed segment.
        let truncate = WalConfig {
            truncate_corrupt: true,
            ..small_segments()
        };
        let (wal, frames, report) = open(dir.path(), truncate, Lsn(1)).await.expect("truncate");
        let cut = report.truncated_corruption.expect("the loss is reported");
        assert_eq!(&cut.file, sealed);
        assert_eq!(frames.len() as u64, lost_from.0 - 1);
        assert_payloads_match(&frames, &acked);
        wal.close().await.expect("close");
        drop(wal);
        // Accepted once: the next open needs no option, before any new write.
        let (wal, frames, report) = open(dir.path(), small_segments(), Lsn(1))
            .await
            .expect("reopen after the truncation");
        assert_eq!(report.truncated_corruption, None);
        assert_eq!(frames.len() as u64, lost_from.0 - 1);
        assert_eq!(
            wal.append(KIND, b"", b"next").await.expect("append"),
            lost_from
        );
    });
}

#[test]
fn a_damaged_header_after_a_seal_that_promised_it_is_corruption_not_removed() {
    let dir = tempfile::tempdir().expect("tempdir");
    run_local(async {
        closed_log_of_600(dir.path()).await;
        let segments = segment_files(dir.path());
        let newest = dir.path().join(&segments[segments.len() - 1]);
        // The header and the first group both damaged: by the file alone it would
        // pass for a segment renamed from the spare and never written.
        damage(&newest, 0, &[0x5a; 2 * oc_io::BLOCK_SIZE]);
        let refused = open(dir.path(), small_segments(), Lsn(1)).await;
        match refused {
            Err(Error::Corrupt { file, reason, .. }) => {
                assert_eq!(file, segments[segments.len() - 1]);
                assert!(
                    reason.contains("previous segment's seal says it was written"),
                    "{reason}"
                );
            }
            other => panic!("expected corruption, got {:?}", other.map(|(_, _, r)| r)),
        }
        assert_eq!(segment_files(dir.path()), segments, "nothing removed");

        // The truncate option cuts the log before it, and the next open needs none.
        let truncate = WalConfig {
            truncate_corrupt: true,
            ..small_segments()
        };
        let (wal, frames, report) = open(dir.path(), truncate, Lsn(1)).await.expect("truncate");
        let cut = report.truncated_corruption.expect("the cut is reported");
        assert_eq!(cut.file, segments[segments.len() - 1]);
        let (_, _, lost_from) =
            parse_segment_name(&segments[segments.len() - 1]).expect("segment name");
        assert_eq!(frames.len() as u64, lost_from.0 - 1);
        assert_eq!(segment_files(dir.path()), segments[..segments.len() - 1]);
        wal.close().await.expect("close");
        drop(wal);
        let (_wal, frames, _) = open(dir.path(), small_segments(), Lsn(1))
            .await
            .expect("reopen after the cut");
        assert_eq!(frames.len() as u64, lost_from.0 - 1);
    });
}

#[test]
fn a_log_sealed_by_a_build_before_the_successor_flag_still_opens() {
    let dir = tempfile::tempdir().expect("tempdir");
    run_local(async {
        let acked = closed_log_of_600(dir.path()).await;
        // An older build sealed before making the next segment, without the flag: a
        // crash between the two left its last segment sealed.
        let segments = segment_files(dir.path());
        let newest = &segments[segments.len() - 1];
        let (_, _, next) = parse_segment_name(newest).expect("segment name");
        std::fs::remove_file(dir.path().join(newest)).expect("remove");
        let sealed = dir.path().join(&segments[segments.len() - 2]);
        let len = std::fs::metadata(&sealed).expect("metadata").len();
        let footer_at = len - oc_io::BLOCK_SIZE as u64;
        let mut footer = vec![0u8; oc_io::BLOCK_SIZE];
        std::fs::File::open(&sealed)
            .and_then(|f| f.read_exact_at(&mut footer, footer_at))
            .expect("read the footer");
        let legacy =
            oc_io::wal::segment::footer_without_successor(&footer).expect("flagged footer");
        damage(&sealed, footer_at, &legacy);

        let (wal, frames, report) = open(dir.path(), small_segments(), Lsn(1))
            .await
            .expect("a legacy sealed end opens");
        assert_eq!(report.truncated_corruption, None);
        assert_eq!(frames.len() as u64, next.0 - 1);
        assert_payloads_match(&frames, &acked);
        assert_eq!(wal.append(KIND, b"", b"next").await.expect("append"), next);
    });
}

#[test]
fn torn_tail_is_truncated_and_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    run_local(async {
        let (wal, _, _) = open(dir.path(), WalConfig::default(), Lsn(1))
            .await
            .expect("open");
        let wal = Rc::new(wal);
        append_many(wal.clone(), 100, 1).await;
        wal.close().await.expect("close");
        drop(wal);
        // A crash mid-write leaves a partial frame after the last group.
        let seg = dir.path().join(&segment_files(dir.path())[0]);
        let bytes = std::fs::read(&seg).expect("read");
        let end = bytes[DATA_START as usize..]
            .iter()
            .rposition(|&b| b != 0)
            .expect("data") as u64
            + DATA_START
            + 1;
        let tail_at = oc_io::align_up(end);
        damage(&seg, tail_at, &[0x55; 700]);

        let (wal, frames, report) = open(dir.path(), WalConfig::default(), Lsn(1))
            .await
            .expect("reopen");
        let torn = report.torn_tail.expect("the torn tail is reported");
        assert_eq!(torn.offset, tail_at);
        assert!(torn.bytes_zeroed >= 700);
        assert_eq!(frames.len(), 100, "every acknowledged frame survives");
        // New writes continue the log, and the repaired log reopens cleanly.
        assert_eq!(
            wal.append(KIND, b"", b"next").await.expect("append"),
            Lsn(101)
        );
        wal.close().await.expect("close");
        drop(wal);
        let (_wal, frames, report) = open(dir.path(), WalConfig::default(), Lsn(1))
            .await
            .expect("third open");
        assert_eq!(report.torn_tail, None);
        assert_eq!(frames.len(), 101);
    });
}

#[test]
fn bad_frame_followed_by_valid_frames_refuses_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    run_local(async {
        let (wal, _, _) = open(dir.path(), WalConfig::default(), Lsn(1))
            .await
            .expect("open");
        let wal = Rc::new(wal);
        append_many(wal.clone(), 50, 1).await; // one frame per group: 50 groups
        wal.close().await.expect("close");
        drop(wal);
        let name = segment_files(dir.path())[0].clone();
        let seg = dir.path().join(&name);
        // Flip a payload byte in the tenth group (block 10 of the data area).
        let offset = DATA_START + 9 * 4096 + 60;
        let mut byte = [0u8; 1];
        std::fs::File::open(&seg)
            .expect("open")
            .read_exact_at(&mut byte, offset)
            .expect("read");
        damage(&seg, offset, &[byte[0] ^ 0xff]);

        let refused = open(dir.path(), WalConfig::default(), Lsn(1)).await;
        let Err(Error::Corrupt {
            file,
            offset: at,
            reason,
        }) = refused.map(|_| ())
        else {
            panic!("a damaged frame followed by valid frames must refuse to open");
        };
        assert_eq!(file, name);
        assert_eq!(at, DATA_START + 9 * 4096);
        assert!(reason.contains("crc"), "{reason}");

        // The operator's explicit truncate keeps frames 1..=9 and drops the rest.
        let config = WalConfig {
            truncate_corrupt: true,
            ..WalConfig::default()
        };
        let (wal, frames, report) = open(dir.path(), config, Lsn(1))
            .await
            .expect("truncating open");
        assert_eq!(frames.len(), 9);
        assert!(report.truncated_corruption.is_some());
        assert_eq!(
            wal.append(KIND, b"", b"after").await.expect("append"),
            Lsn(10)
        );
        wal.close().await.expect("close");
        drop(wal);
        let (_wal, frames, _) = open(dir.path(), WalConfig::default(), Lsn(1))
            .await
            .expect("reopen");
        assert_eq!(frames.len(), 10);
    });
}

#[test]
fn damage_inside_a_sealed_segment_is_corruption() {
    let dir = tempfile::tempdir().expect("tempdir");
    run_local(async {
        closed_log_of_600(dir.path()).await;
        let names = segment_files(dir.path());
        assert!(names.len() >= 2);
        // Damage the last frame bytes of the first (sealed) segment.
        damage(&dir.path().join(&names[0]), DATA_START + 50, &[0xAB; 4]);
        let refused = open(dir.path(), small_segments(), Lsn(1)).await;
        assert!(
            matches!(&refused, Err(Error::Corrupt { file, .. }) if *file == names[0]),
            "{:?}",
            refused.err()
        );
    });
}

#[test]
fn sealed_segments_before_the_replay_point_are_checked_when_read_not_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    run_local(async {
        let acked = closed_log_of_600(dir.path()).await;
        let names = segment_files(dir.path());
        assert!(names.len() >= 4, "{names:?}");
        let first_of = |name: &str| parse_segment_name(name).expect("segment name").2;
        let (second_first, third_first) = (first_of(&names[1]), first_of(&names[2]));
        // A frame of the first segment, which the replay point leaves behind.
        damage(&dir.path().join(&names[0]), DATA_START + 50, &[0xAB; 4]);
        let (wal, frames, report) = open(dir.path(), small_segments(), third_first)
            .await
            .expect("the open reads from the segment holding the replay point");
        assert_eq!(report.segments_not_read, 2);
        assert_eq!(report.frames_replayed, 601 - third_first.0);
        assert_eq!(frames.keys().next(), Some(&third_first.0));
        assert_eq!(report.last_lsn, Lsn(600));
        assert_payloads_match(&frames, &acked);

        // A read checks every frame it passes: the damage is found there.
        let read = wal.read_after(Lsn(0), Lsn(u64::MAX)).await;
        assert!(
            matches!(&read, Err(Error::Corrupt { file, .. }) if *file == names[0]),
            "{read:?}"
        );
        // The second segment, also not read at the open, reads back whole, a few frames
        // at a time (each read starting at a group start an earlier read passed).
        let mut after = Lsn(second_first.0 - 1);
        while after < Lsn(600) {
            let oc_io::LogRead::Frames(page) =
                wal.read_after(after, Lsn(after.0 + 7)).await.expect("read")
            else {
                panic!("the log holds LSN {}", after.0 + 1);
            };
            assert!(!page.is_empty(), "nothing after LSN {after}");
            for frame in page {
                assert_eq!(frame.lsn, after.next());
                assert_eq!(Some(&frame.payload), acked.get(&frame.lsn.0));
                after = frame.lsn;
            }
        }
        wal.close().await.expect("close");
        drop(wal);

        // The check after an open reads what the open did not and finds the damage.
        let (wal, _, _) = open(dir.path(), small_segments(), third_first)
            .await
            .expect("open");
        assert!(wal.damaged_segments().is_empty());
        assert_eq!(
            wal.check_unread_segments(u64::MAX).await,
            vec![names[0].clone()]
        );
        assert_eq!(wal.damaged_segments(), vec![names[0].clone()]);
        wal.close().await.expect("close");
        drop(wal);

        // A footer that fails its CRC sends the open through the whole segment, which
        // then reads as unsealed with a later segment: corruption, as from the start.
        let second = dir.path().join(&names[1]);
        let footer_at = std::fs::metadata(&second).expect("size").len() - 4096;
        damage(&second, footer_at + 20, &[0xCD; 4]);
        let refused = open(dir.path(), small_segments(), third_first).await;
        assert!(
            matches!(&refused, Err(Error::Corrupt { file, .. }) if *file == names[1]),
            "{:?}",
            refused.err()
        );
    });
}

#[test]
fn a_header_damaged_after_the_open_is_reported_until_the_segment_is_released() {
    let dir = tempfile::tempdir().expect("tempdir");
    run_local(async {
        closed_log_of_600(dir.path()).await;
        let names = segment_files(dir.path());
        let third_first = parse_segment_name(&names[2]).expect("segment name").2;
        let (wal, _, _) = open(dir.path(), small_segments(), third_first)
            .await
            .expect("open");
        // The read finds the segment listed, not being released, yet not the one the
        // log holds: damage, not a release.
        damage(&dir.path().join(&names[1]), 40, &[0xEE; 8]);
        assert_eq!(
            wal.check_unread_segments(u64::MAX).await,
            vec![names[1].clone()]
        );
        assert_eq!(wal.damaged_segments(), vec![names[1].clone()]);
        // Released, it is no longer the log's problem.
        let released = wal.release_before(third_first).await.expect("release");
        assert!(released.contains(&names[1]), "{released:?}");
        assert!(wal.damaged_segments().is_empty());
        wal.close().await.expect("close");
    });
}

#[test]
fn the_check_after_an_open_reads_the_unread_segments_and_keeps_to_its_pace() {
    let dir = tempfile::tempdir().expect("tempdir");
    run_local(async {
        let acked = closed_log_of_600(dir.path()).await;
        let names = segment_files(dir.path());
        let last_first = parse_segment_name(names.last().expect("segments"))
            .expect("segment name")
            .2;
        let (wal, _, report) = open(dir.path(), small_segments(), last_first)
            .await
            .expect("open");
        let unread = report.segments_not_read;
        assert_eq!(unread as usize, names.len() - 1);
        // At 1 MB/s, what the frames before the last segment take.
        let frames_bytes: usize = acked
            .range(..last_first.0)
            .map(|(_, p)| oc_io::wal::frame::frame_len(b"tenant-a".len(), p.len()))
            .sum();
        let started = std::time::Instant::now();
        assert!(wal.check_unread_segments(1_000_000).await.is_empty());
        let took = started.elapsed();
        assert!(
            took.as_secs_f64() >= frames_bytes as f64 / 1e6 * 0.9,
            "{unread} segments checked in {took:?}: faster than the pace allows"
        );
        assert!(wal.damaged_segments().is_empty());
        // Once checked, nothing is left unread: a second check reads nothing.
        let started = std::time::Instant::now();
        assert!(wal.check_unread_segments(1_000).await.is_empty());
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        wal.close().await.expect("close");
    });
}

#[test]
fn a_newer_epoch_in_the_log_fences_an_old_writer() {
    let dir = tempfile::tempdir().expect("tempdir");
    run_local(async {
        let newer = WalConfig {
            epoch: Epoch(5),
            ..WalConfig::default()
        };
        let (wal, _, _) = open(dir.path(), newer, Lsn(1)).await.expect("open");
        wal.append(KIND, b"", b"x").await.expect("append");
        wal.close().await.expect("close");
        drop(wal);
        let old = open(dir.path(), WalConfig::default(), Lsn(1)).await;
        assert!(
            matches!(
                old,
                Err(Error::StaleEpoch {
                    configured: Epoch(1),
                    in_log: Epoch(5)
                })
            ),
            "{:?}",
            old.err()
        );
        // A yet newer epoch opens and starts a fresh segment stamped with it.
        let (wal, _, _) = open(
            dir.path(),
            WalConfig {
                epoch: Epoch(6),
                ..WalConfig::default()
            },
            Lsn(1),
        )
        .await
        .expect("newer epoch opens");
        assert_eq!(wal.append(KIND, b"", b"y").await.expect("append"), Lsn(2));
        wal.close().await.expect("close");
        let names = segment_files(dir.path());
        assert_eq!(names.len(), 2, "{names:?}");
        assert_eq!(parse_segment_name(&names[1]), Some((0, Epoch(6), Lsn(2))));
    });
}

#[test]
fn oversized_records_and_tenant_tags_are_rejected_before_logging() {
    let dir = tempfile::tempdir().expect("tempdir");
    run_local(async {
        let (wal, _, _) = open(dir.path(), small_segments(), Lsn(1))
            .await
            .expect("open");
        let big = vec![0u8; 16 * 1024];
        assert!(matches!(
            wal.append(KIND, b"", &big).await,
            Err(Error::RecordTooLarge { .. })
        ));
        assert!(matches!(
            wal.append(KIND, &[b'a'; 65], b"").await,
            Err(Error::TenantTooLong { .. })
        ));
        assert_eq!(wal.append(KIND, b"", b"ok").await.expect("append"), Lsn(1));
    });
}

#[test]
fn invalid_configurations_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    run_local(async {
        let bad = WalConfig {
            segment_bytes: 10_000,
            ..WalConfig::default()
        };
        let err = open(dir.path(), bad, Lsn(1)).await.err().expect("refused");
        assert!(
            matches!(&err, Error::Config(m) if m.contains("segment size")),
            "{err}"
        );
        let bad = WalConfig {
            segment_bytes: 64 * 1024,
            max_group_bytes: 64 * 1024,
            ..WalConfig::default()
        };
        let err = open(dir.path(), bad, Lsn(1)).await.err().expect("refused");
        assert!(
            matches!(&err, Error::Config(m) if m.contains("max group bytes")),
            "{err}"
        );
    });
}

#[test]
fn released_segments_are_recycled_into_new_segments() {
    let dir = tempfile::tempdir().expect("tempdir");
    run_local(async {
        let (wal, _, _) = open(dir.path(), small_segments(), Lsn(1))
            .await
            .expect("open");
        let wal = Rc::new(wal);
        let mut acked = append_many(wal.clone(), 600, 4).await;
        let before = wal.segments();
        assert!(before.len() >= 3, "{before:?}");
        // Release everything but the active segment, as a checkpoint would.
        let durable = wal.durable_lsn();
        let released = wal.release_before(durable).await.expect("release");
        assert_eq!(released.len(), before.len() - 1);
        assert!(
            dir.path().join("wal-recycled.tmp").exists(),
            "the newest released segment waits to be reused"
        );
        // Keep writing through more rotations: one of them takes the recycled file.
        for i in 0..600u64 {
            let p = payload(10_000 + i);
            let lsn = wal.append(KIND, b"tenant-a", &p).await.expect("append");
            acked.insert(lsn.0, p);
        }
        let stats = wal.stats();
        assert!(stats.spares_recycled >= 1, "{stats:?}");
        let replay_from = parse_segment_name(&wal.segments()[0]).expect("name").2;
        wal.close().await.expect("close");
        drop(wal);

        let (_wal, frames, report) = open(dir.path(), small_segments(), replay_from)
            .await
            .expect("reopen");
        assert_eq!(
            report.torn_tail, None,
            "older frames in recycled files are not a torn tail"
        );
        assert_eq!(report.last_lsn, Lsn(1200));
        assert_payloads_match(&frames, &acked);
        assert_eq!(frames.len() as u64, 1200 - replay_from.0 + 1);
    });
}

#[test]
fn a_log_of_large_groups_gets_preallocated_spares_and_one_of_small_groups_zero_filled_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    run_local(async {
        let config = WalConfig {
            segment_bytes: 2 << 20,
            ..WalConfig::default()
        };
        let (wal, _, _) = open(dir.path(), config.clone(), Lsn(1))
            .await
            .expect("open");
        let mut acked = BTreeMap::new();
        // One appender of 600 KiB records: every group is one of them.
        for i in 0..20u64 {
            let mut p = payload(i);
            p.resize(600 << 10, i as u8);
            let lsn = wal.append(KIND, b"tenant-a", &p).await.expect("append");
            acked.insert(lsn.0, p);
        }
        let large = wal.stats();
        assert!(large.spares_preallocated >= 2, "{large:?}");
        // The open segment was a preallocated spare: its groups are followed by blocks
        // never written, and the reopened log ends where they begin.
        wal.close().await.expect("close");
        drop(wal);
        let (wal, frames, report) = open(dir.path(), config.clone(), Lsn(1))
            .await
            .expect("reopen");
        assert_eq!(report.torn_tail, None);
        assert_eq!(report.last_lsn, Lsn(20));
        assert_eq!(frames.len(), acked.len());
        assert_payloads_match(&frames, &acked);
        // More large groups on the reopened log (a spare made before it wrote any group
        // is zero-filled: no history yet), then small ones: once a whole segment of
        // them is written, the spares are zero-filled again.
        for i in 0..24u64 {
            let mut p = payload(100 + i);
            p.resize(600 << 10, i as u8);
            let lsn = wal.append(KIND, b"tenant-a", &p).await.expect("append");
            acked.insert(lsn.0, p);
        }
        let large = wal.stats();
        assert!(large.spares_preallocated >= 2, "{large:?}");
        for i in 0..12_000u64 {
            let p = payload(1_000 + i);
            let lsn = wal.append(KIND, b"tenant-a", &p).await.expect("append");
            acked.insert(lsn.0, p);
        }
        let small = wal.stats();
        assert!(
            small.spares_zero_filled >= large.spares_zero_filled + 2,
            "{large:?}\n{small:?}"
        );
        // At most the segment where the sizes changed still averaged large groups.
        assert!(
            small.spares_preallocated <= large.spares_preallocated + 1,
            "{large:?}\n{small:?}"
        );
        wal.close().await.expect("close");
        drop(wal);
        let (wal, frames, report) = open(dir.path(), config, Lsn(1)).await.expect("reopen");
        assert_eq!(report.torn_tail, None);
        assert_eq!(frames.len(), acked.len());
        assert_payloads_match(&frames, &acked);
        let lsn = wal
            .append(KIND, b"tenant-a", b"after")
            .await
            .expect("append");
        assert_eq!(lsn.0, acked.len() as u64 + 1);
    });
}

#[test]
fn a_release_that_fails_part_way_lists_only_the_segments_whose_files_remain() {
    let dir = tempfile::tempdir().expect("tempdir");
    run_local(async {
        let (wal, _, _) = open(dir.path(), small_segments(), Lsn(1))
            .await
            .expect("open");
        let wal = Rc::new(wal);
        append_many(wal.clone(), 600, 4).await;
        let before = wal.segments();
        assert!(before.len() >= 4, "{before:?}");
        // The second-oldest segment cannot be removed: a directory stands in its place.
        let blocked = &before[1];
        std::fs::remove_file(dir.path().join(blocked)).expect("remove");
        std::fs::create_dir(dir.path().join(blocked)).expect("mkdir");
        std::fs::write(dir.path().join(blocked).join("x"), b"x").expect("write");
        let err = wal
            .release_before(wal.durable_lsn())
            .await
            .expect_err("the removal of a directory fails");
        assert!(err.to_string().contains(blocked.as_str()), "{err}");
        // The oldest one's file is gone, and it left the list; the rest stay listed.
        assert!(!dir.path().join(&before[0]).exists());
        assert_eq!(wal.segments(), before[1..].to_vec());
        // Once the obstacle is gone (and with it the file: a file already gone counts as
        // removed) the next release goes on from there.
        std::fs::remove_dir_all(dir.path().join(blocked)).expect("rmdir");
        let released = wal
            .release_before(wal.durable_lsn())
            .await
            .expect("release");
        assert_eq!(released, before[1..before.len() - 1].to_vec());
        assert_eq!(wal.segments(), vec![before[before.len() - 1].clone()]);
    });
}

#[test]
fn full_groups_make_appenders_wait_and_lose_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    run_local(async {
        let config = WalConfig {
            segment_bytes: 256 * 1024,
            max_group_bytes: 16 * 1024,
            ..WalConfig::default()
        };
        let (wal, _, _) = open(dir.path(), config.clone(), Lsn(1))
            .await
            .expect("open");
        let wal = Rc::new(wal);
        // 64 writers of ~3 KiB records: each group fills to its limit and the rest wait.
        let mut handles = Vec::new();
        for t in 0..64u64 {
            let wal = wal.clone();
            handles.push(glommio::spawn_local(async move {
                let mut acked = Vec::new();
                for i in 0..20u64 {
                    let p = vec![(t * 20 + i) as u8; 3000 + (i as usize * 37) % 900];
                    acked.push((wal.append(KIND, b"", &p).await.expect("append").0, p));
                }
                acked
            }));
        }
        let mut acked = BTreeMap::new();
        for h in handles {
            acked.extend(h.await);
        }
        let stats = wal.stats();
        assert!(stats.group_frames.max() >= 4, "groups filled up: {stats:?}");
        assert_eq!(stats.appends, 1280);
        wal.close().await.expect("close");
        drop(wal);
        let (_wal, frames, _) = open(dir.path(), config, Lsn(1)).await.expect("reopen");
        assert_eq!(frames.len(), 1280);
        assert_payloads_match(&frames, &acked);
    });
}

#[test]
fn a_group_delay_still_acknowledges_every_append_durably() {
    let dir = tempfile::tempdir().expect("tempdir");
    run_local(async {
        let config = WalConfig {
            max_group_delay: std::time::Duration::from_millis(2),
            ..WalConfig::default()
        };
        let (wal, _, _) = open(dir.path(), config.clone(), Lsn(1))
            .await
            .expect("open");
        let wal = Rc::new(wal);
        let acked = append_many(wal.clone(), 300, 8).await;
        assert_eq!(wal.durable_lsn(), Lsn(300));
        wal.close().await.expect("close");
        drop(wal);
        let (_wal, frames, _) = open(dir.path(), config, Lsn(1)).await.expect("reopen");
        assert_eq!(frames.len(), 300);
        assert_payloads_match(&frames, &acked);
    });
}

/// The durable tail names the newest segment and where its durable groups end: the bytes
/// before `end`, read by another thread while the log runs, hold exactly the frames up
/// to the durable LSN.
#[test]
fn durable_tail_bounds_what_another_thread_may_copy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().to_path_buf();
    run_local(async move {
        let (wal, _, _) = open(&path, small_segments(), Lsn(1)).await.expect("open");
        let wal = Rc::new(wal);
        for round in 0..6u64 {
            let acked = append_many(wal.clone(), 40 + round * 7, 4).await;
            let tail = wal.durable_tail().expect("a segment exists");
            assert_eq!(tail.lsn, wal.durable_lsn());
            assert_eq!(Some(tail.segment.clone()), wal.segments().last().cloned());
            assert_eq!(tail.end % oc_io::BLOCK_SIZE as u64, 0);
            let bytes = std::thread::scope(|s| {
                s.spawn(|| {
                    let file = std::fs::File::open(path.join(&tail.segment)).expect("open");
                    let mut bytes = vec![0u8; tail.end as usize];
                    file.read_exact_at(&mut bytes, 0).expect("read");
                    bytes
                })
                .join()
                .expect("reader thread")
            });
            let header = oc_io::wal::segment::SegmentHeader::decode(&bytes[..DATA_START as usize])
                .expect("header");
            assert_eq!(header.first_lsn, tail.first_lsn);
            let scan = oc_io::wal::scan::scan_segment(&bytes, &header, |_, _| Ok::<_, ()>(()))
                .expect("scan");
            // Frames end exactly at the durable LSN (or the segment has none yet).
            assert_eq!(scan.last_lsn, Lsn(tail.lsn.0.max(tail.first_lsn.0 - 1)));
            assert!(scan.last_lsn.0 >= *acked.keys().last().expect("acked") || scan.frames == 0);
        }
        wal.close().await.expect("close");
    });
}

#[test]
fn a_segment_being_read_is_kept_by_a_release_until_the_read_is_done() {
    // glommio's open panics when the file goes between its openat and its statfs, so
    // a release must never remove or rename a segment a reader is opening.
    let dir = tempfile::tempdir().expect("tempdir");
    run_local(async {
        let (wal, _, _) = open(dir.path(), small_segments(), Lsn(1))
            .await
            .expect("open");
        let wal = Rc::new(wal);
        append_many(wal.clone(), 1500, 8).await;
        let segments = wal.segments();
        let (_, _, second_first) = parse_segment_name(&segments[1]).expect("segment name");
        let reader = glommio::spawn_local({
            let wal = wal.clone();
            async move { wal.read_after(Lsn(0), Lsn(u64::MAX)).await }
        });
        // Let the reader start: it marks the oldest segment and waits for its open.
        futures_lite::future::yield_now().await;
        let released = wal.release_before(second_first).await.expect("release");
        assert!(
            released.is_empty(),
            "a segment being read was released: {released:?}"
        );
        let read = reader.await.expect("read");
        assert!(
            matches!(&read, oc_io::LogRead::Frames(frames) if frames.first().is_some_and(|f| f.lsn == Lsn(1))),
            "{read:?}"
        );
        // Once the read is done, the next release takes it.
        let released = wal.release_before(second_first).await.expect("release");
        assert_eq!(released, vec![segments[0].clone()]);
        wal.close().await.expect("close");
    });
}

/// The descriptors this process holds on `dir`'s segment files, with their open flags
/// as `/proc/self/fdinfo` reports them.
fn segment_descriptor_flags(dir: &Path) -> Vec<(String, i32)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd") {
        let fd = entry.expect("fd entry").file_name();
        let Ok(target) = std::fs::read_link(Path::new("/proc/self/fd").join(&fd)) else {
            continue; // closed since it was listed
        };
        if target.parent() != Some(dir) {
            continue;
        }
        let name = target
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        if parse_segment_name(&name).is_none() {
            continue;
        }
        let info =
            std::fs::read_to_string(Path::new("/proc/self/fdinfo").join(&fd)).expect("fdinfo");
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .map(|f| i32::from_str_radix(f.trim(), 8).expect("octal flags"))
            .expect("a flags line");
        found.push((name, flags));
    }
    found
}

/// A group is acknowledged when its one write completes: that holds only because the
/// active segment is open with O_DSYNC, whether the log created it, rotated into it or
/// reopened it in recovery.
#[test]
fn the_active_segment_is_written_through_an_o_dsync_descriptor() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dir_path = std::fs::canonicalize(dir.path()).expect("canonical dir");
    run_local(async {
        let assert_active_is_dsync = |wal: &Wal<DmaStorage>, when: &str| {
            let active = wal.segments().last().cloned().expect("an active segment");
            let descriptors = segment_descriptor_flags(&dir_path);
            let flags: Vec<i32> = descriptors
                .iter()
                .filter(|(name, _)| *name == active)
                .map(|(_, flags)| *flags)
                .collect();
            assert!(
                !flags.is_empty(),
                "{when}: {active} not open: {descriptors:?}"
            );
            for f in flags {
                assert_eq!(f & libc::O_DSYNC, libc::O_DSYNC, "{when}: {active} {f:o}");
                assert_eq!(f & libc::O_DIRECT, libc::O_DIRECT, "{when}: {active} {f:o}");
            }
        };
        let (wal, _, _) = open(&dir_path, small_segments(), Lsn(1))
            .await
            .expect("open");
        let wal = Rc::new(wal);
        append_many(wal.clone(), 10, 1).await;
        assert_active_is_dsync(&wal, "new log");
        append_many(wal.clone(), 600, 4).await;
        assert!(wal.stats().segments_sealed > 0, "64 KiB segments rotate");
        assert_active_is_dsync(&wal, "after rotation");
        wal.close().await.expect("close");
        drop(wal);

        let (wal, frames, _) = open(&dir_path, small_segments(), Lsn(1))
            .await
            .expect("reopen");
        assert!(!frames.is_empty());
        assert_active_is_dsync(&wal, "after recovery");
    });
}

/// Payload `i` of [`large_frames_of_many_sizes_recover_and_sealed_segments_verify`]:
/// from a few bytes to most of a group, around 16 KiB and the 256 KiB records of
/// `oc-bench wal` among them.
fn mixed_payload(i: u64) -> Vec<u8> {
    const SIZES: [usize; 9] = [
        300,
        16_375,
        16_376,
        16_377,
        40_000,
        100 << 10,
        (256 << 10) - 64,
        700 << 10,
        5,
    ];
    let mut p = i.to_le_bytes().to_vec();
    p.resize(SIZES[i as usize % SIZES.len()], 0);
    for (at, byte) in p.iter_mut().enumerate().skip(8) {
        *byte = (at as u64).wrapping_mul(i | 1).to_le_bytes()[at % 8];
    }
    p
}

#[test]
fn large_frames_of_many_sizes_recover_and_sealed_segments_verify() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = WalConfig {
        segment_bytes: 2 << 20,
        max_group_bytes: 1 << 20,
        ..WalConfig::default()
    };
    run_local(async {
        let (wal, _, _) = open(dir.path(), config.clone(), Lsn(1))
            .await
            .expect("open");
        let wal = Rc::new(wal);
        let mut handles = Vec::new();
        for t in 0..4u64 {
            let wal = wal.clone();
            handles.push(glommio::spawn_local(async move {
                let mut acked = Vec::new();
                for i in (t..200).step_by(4) {
                    let p = mixed_payload(i);
                    let lsn = wal.append(KIND, b"tenant-a", &p).await.expect("append");
                    acked.push((lsn.0, p));
                }
                acked
            }));
        }
        let mut acked = BTreeMap::new();
        for h in handles {
            acked.extend(h.await);
        }
        let sealed = wal.stats().segments_sealed as usize;
        assert!(sealed >= 5, "{:?}", wal.stats());
        wal.close().await.expect("close");
        drop(wal);

        // Every sealed segment's data CRC, in its footer, is the CRC of its bytes.
        let segments = segment_files(dir.path());
        assert_eq!(segments.len() - 1, sealed, "{segments:?}");
        for name in &segments[..segments.len() - 1] {
            let file = std::fs::read(dir.path().join(name)).expect("read segment");
            let footer_at = file.len() - oc_io::buffer::BLOCK_SIZE;
            let footer = oc_io::wal::segment::SegmentFooter::decode(&file[footer_at..])
                .expect("a sealed segment's footer");
            let mut image = file[..footer.data_end as usize].to_vec();
            image.extend_from_slice(&file[footer_at..]);
            oc_io::wal::image::check_sealed_image(&image).expect(name);
        }
        // Recovery checks every frame's CRC.
        let (_wal, frames, _) = open(dir.path(), config, Lsn(1)).await.expect("reopen");
        assert_eq!(frames.len(), 200);
        assert_payloads_match(&frames, &acked);
    });
}

/// A shipping writer's log that ends before what the archive holds of it (the archive
/// took only durable groups) is refused, whichever way it falls short; one that reaches
/// as far opens.
#[test]
fn a_log_ending_before_its_archived_copy_is_refused() {
    use oc_io::wal::{ArchivedLog, ArchivedTail};
    let dir = tempfile::tempdir().expect("tempdir");
    run_local(async {
        closed_log_of_600(dir.path()).await;
        let (wal, _, _) = open(dir.path(), small_segments(), Lsn(1))
            .await
            .expect("open");
        let tail = wal.durable_tail().expect("a durable tail");
        assert_eq!(tail.lsn, Lsn(600));
        assert!(tail.end > DATA_START);
        wal.close().await.expect("close");
        drop(wal);
        let (_, epoch, first_lsn) = parse_segment_name(&tail.segment).expect("segment name");
        let as_far = ArchivedTail {
            epoch,
            first_lsn,
            end: tail.end,
        };
        let with = |archived: ArchivedLog| WalConfig {
            archived: Some(archived),
            ..small_segments()
        };
        let reaching = ArchivedLog {
            sealed_lsn: Lsn(first_lsn.0 - 1),
            tail: Some(as_far),
        };
        let cases = [
            (
                ArchivedLog {
                    tail: Some(ArchivedTail {
                        end: tail.end + 4096,
                        ..as_far
                    }),
                    ..reaching
                },
                format!(
                    "the archive holds this segment to offset {}",
                    tail.end + 4096
                ),
            ),
            (
                ArchivedLog {
                    tail: Some(ArchivedTail {
                        first_lsn: Lsn(601),
                        end: DATA_START + 4096,
                        ..as_far
                    }),
                    ..reaching
                },
                "the archive holds a segment from LSN 601".to_string(),
            ),
            (
                ArchivedLog {
                    sealed_lsn: Lsn(601),
                    ..reaching
                },
                "the archive holds sealed segments to LSN 601".to_string(),
            ),
        ];
        for (archived, expected) in cases {
            match open(dir.path(), with(archived), Lsn(1)).await {
                Err(Error::Corrupt { file, reason, .. }) => {
                    assert_eq!(file, tail.segment);
                    assert!(reason.contains(&expected), "{reason}");
                    assert!(reason.contains("Restore from the archive"), "{reason}");
                }
                other => panic!(
                    "{archived:?}: expected a refusal, got {:?}",
                    other.map(|(_, _, r)| r)
                ),
            }
        }
        // Refusals change nothing: an archive that reaches as far opens every frame.
        let (wal, frames, _) = open(dir.path(), with(reaching), Lsn(1))
            .await
            .expect("open with the archive as far");
        assert_eq!(frames.len(), 600);
        wal.close().await.expect("close");
        drop(wal);

        // A log with no segment left, where the archive holds some.
        for name in segment_files(dir.path()) {
            std::fs::remove_file(dir.path().join(name)).expect("remove");
        }
        match open(dir.path(), with(reaching), Lsn(1)).await {
            Err(Error::Corrupt { reason, .. }) => {
                assert!(reason.contains("it has no segment"), "{reason}");
            }
            other => panic!("expected a refusal, got {:?}", other.map(|(_, _, r)| r)),
        }
    });

    // A log's only segment with its header and first group damaged reads like a segment
    // made but never used, which recovery removes: not when the archive holds its frames.
    let dir = tempfile::tempdir().expect("tempdir");
    run_local(async {
        let (wal, _, _) = open(dir.path(), WalConfig::default(), Lsn(1))
            .await
            .expect("open");
        for i in 0..10 {
            wal.append(KIND, b"", &payload(i)).await.expect("append");
        }
        let tail = wal.durable_tail().expect("a durable tail");
        wal.close().await.expect("close");
        drop(wal);
        let (_, epoch, first_lsn) = parse_segment_name(&tail.segment).expect("segment name");
        let only = dir.path().join(&tail.segment);
        damage(&only, 0, &[0; 8192]);
        let archived = ArchivedLog {
            sealed_lsn: Lsn(0),
            tail: Some(ArchivedTail {
                epoch,
                first_lsn,
                end: tail.end,
            }),
        };
        let config = WalConfig {
            archived: Some(archived),
            ..WalConfig::default()
        };
        match open(dir.path(), config, Lsn(1)).await {
            Err(Error::Corrupt { file, reason, .. }) => {
                assert_eq!(file, tail.segment);
                assert!(
                    reason.contains("the archive holds frames of this segment"),
                    "{reason}"
                );
            }
            other => panic!("expected a refusal, got {:?}", other.map(|(_, _, r)| r)),
        }
        assert!(only.exists(), "the refusal removed the segment");
        // Without an archive it reads as never used, as before.
        let (_, frames, report) = open(dir.path(), WalConfig::default(), Lsn(1))
            .await
            .expect("open");
        assert!(frames.is_empty() && report.removed == vec![tail.segment.clone()]);
    });
}

/// A shard directory with no segment yet opens where it cannot write its probe file
/// (a full disk; here a directory takes the probe's name) when a sibling shard holds a
/// written segment: that one is probed instead, so such a data directory restarts.
#[test]
fn an_empty_shard_beside_a_written_one_opens_without_writing_a_probe() {
    let data = tempfile::tempdir().expect("tempdir");
    let (written, empty) = (data.path().join("shard-0"), data.path().join("shard-1"));
    std::fs::create_dir(&written).expect("mkdir");
    std::fs::create_dir(&empty).expect("mkdir");
    run_local(async {
        closed_log_of_600(&written).await;
    });
    std::fs::create_dir(empty.join(".oc-iopoll-probe")).expect("the probe's name taken");
    run_local(async {
        let (wal, frames, _) = open(&empty, small_segments(), Lsn(1))
            .await
            .expect("opens without a probe file of its own");
        assert!(frames.is_empty());
        wal.close().await.expect("close");
    });
    // Alone, it must write one: refused, naming the file.
    let alone = tempfile::tempdir().expect("tempdir");
    let shard = alone.path().join("shard-0");
    std::fs::create_dir_all(shard.join(".oc-iopoll-probe")).expect("mkdir");
    run_local(async {
        let refused = DmaStorage::open(&shard)
            .await
            .err()
            .expect("no file to probe");
        assert!(
            refused.to_string().contains(".oc-iopoll-probe"),
            "{refused}"
        );
    });
}
