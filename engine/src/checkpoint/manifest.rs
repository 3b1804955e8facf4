//! A checkpoint's manifest, `checkpoint-<S>.json` (FORMAT.md §6): what the snapshot
//! holds and how to check it. The server writes it, recovery reads it, and the archive
//! stores it byte for byte, so one struct serves all three.
//!
//! Readers ignore unknown fields (`completed_us` was added that way); every other field
//! has been written by every version, so all but `completed_us` are required.

use oc_io::Lsn;
use serde::{Deserialize, Serialize};

use super::CHECKPOINT_FORMAT_VERSION;
use crate::error::FileProblem;
use crate::json_file::JsonFile;

/// `checkpoint-<S>.json`, field for field. Fields are in the order the file has always
/// had them (alphabetical); do not reorder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointManifest {
    /// When the copy finished (µs since the Unix epoch): every row in the snapshot was
    /// committed by then. Absent in manifests written before the field existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_us: Option<u64>,
    /// CRC-32C of the snapshot's first `data_bytes` bytes.
    pub crc32c: u32,
    /// When the checkpoint started (µs since the Unix epoch).
    pub created_us: u64,
    /// Bytes of frames in the snapshot, before its zero padding.
    pub data_bytes: u64,
    pub epoch: u64,
    pub format_version: u64,
    /// The LSN the shard had applied when the checkpoint started (also in the name).
    #[serde(with = "crate::json_file::lsn")]
    pub lsn: Lsn,
    pub rows: u64,
    pub shard: u32,
    /// The snapshot's file name.
    pub snapshot: String,
    /// Ids of the tenants the snapshot holds.
    pub tenants: Vec<String>,
}

impl JsonFile for CheckpointManifest {
    const VERSIONS: &'static [u64] = &[CHECKPOINT_FORMAT_VERSION as u64];
    const REQUIRED_FIELDS: &'static [&'static str] = &[
        "crc32c",
        "created_us",
        "data_bytes",
        "epoch",
        "format_version",
        "lsn",
        "rows",
        "shard",
        "snapshot",
        "tenants",
    ];
}

impl CheckpointManifest {
    /// Decodes a manifest and checks that it names `lsn`, the LSN of its file name or
    /// archive key.
    pub fn decode_for(bytes: &[u8], lsn: Lsn) -> Result<CheckpointManifest, FileProblem> {
        let manifest = CheckpointManifest::decode(bytes)?;
        if manifest.lsn != lsn {
            return Err(FileProblem::BadField {
                field: "lsn",
                why: format!("is {}, the file's name says {}", manifest.lsn, lsn),
            });
        }
        Ok(manifest)
    }

    /// The snapshot's data (its bytes before the padding), after checking its size and
    /// checksum against this manifest.
    pub fn check_snapshot<'a>(&self, snapshot: &'a [u8]) -> Result<&'a [u8], FileProblem> {
        let data = usize::try_from(self.data_bytes)
            .ok()
            .and_then(|n| snapshot.get(..n))
            .ok_or(FileProblem::SnapshotTooShort {
                actual: snapshot.len() as u64,
                expected: self.data_bytes,
            })?;
        let actual = crc32c::crc32c(data);
        if actual != self.crc32c {
            return Err(FileProblem::SnapshotCrc {
                actual,
                expected: self.crc32c,
            });
        }
        Ok(data)
    }

    /// The earliest restore target this checkpoint serves: `completed_us`, or
    /// `u64::MAX` for a manifest without it (usable only to restore the latest state).
    pub fn restorable_from_us(&self) -> u64 {
        self.completed_us.unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json_file::assert_required_fields;

    fn golden() -> CheckpointManifest {
        CheckpointManifest {
            completed_us: Some(1_764_000_000_500_000),
            crc32c: 0x1234_abcd,
            created_us: 1_764_000_000_000_000,
            data_bytes: 5000,
            epoch: 1,
            format_version: 1,
            lsn: Lsn(0x2a),
            rows: 77,
            shard: 3,
            snapshot: "checkpoint-000000000000002a.snap".into(),
            tenants: vec!["acme".into(), "beta".into()],
        }
    }

    const GOLDEN: &str = r#"{"completed_us":1764000000500000,"crc32c":305441741,"created_us":1764000000000000,"data_bytes":5000,"epoch":1,"format_version":1,"lsn":42,"rows":77,"shard":3,"snapshot":"checkpoint-000000000000002a.snap","tenants":["acme","beta"]}"#;

    /// The bytes are those of the writer before the struct: a `serde_json::json!` map.
    #[test]
    fn the_manifest_writes_the_bytes_it_always_did() {
        let m = golden();
        let legacy = serde_json::json!({
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "shard": m.shard,
            "lsn": m.lsn.0,
            "epoch": m.epoch,
            "created_us": m.created_us,
            "completed_us": m.completed_us,
            "snapshot": m.snapshot,
            "data_bytes": m.data_bytes,
            "crc32c": m.crc32c,
            "rows": m.rows,
            "tenants": m.tenants,
        });
        let bytes = String::from_utf8(m.encode()).expect("utf-8");
        assert_eq!(bytes, GOLDEN);
        assert_eq!(bytes, legacy.to_string());
        assert_eq!(
            CheckpointManifest::decode(GOLDEN.as_bytes()).expect("decode"),
            m
        );
    }

    #[test]
    fn a_manifest_from_before_completed_us_still_loads() {
        let old = r#"{"crc32c":0,"created_us":5,"data_bytes":0,"epoch":1,"format_version":1,"lsn":9,"rows":0,"shard":0,"snapshot":"checkpoint-0000000000000009.snap","tenants":[]}"#;
        let padded = format!("{old}{}", " ".repeat(4096 - old.len()));
        let m = CheckpointManifest::decode_for(padded.as_bytes(), Lsn(9)).expect("old manifest");
        assert_eq!(m.completed_us, None);
        assert_eq!(m.restorable_from_us(), u64::MAX);
        assert_eq!(m.encode(), old.as_bytes(), "and writes back unchanged");
    }

    #[test]
    fn every_field_but_completed_us_is_required_and_named_when_missing() {
        assert_required_fields(&golden());
    }

    #[test]
    fn unknown_fields_are_ignored_and_unknown_versions_refused() {
        let newer = GOLDEN.replace("\"epoch\"", "\"later\":[1],\"epoch\"");
        assert_eq!(
            CheckpointManifest::decode(newer.as_bytes()).expect("unknown field"),
            golden()
        );
        let v2 = GOLDEN.replace("\"format_version\":1", "\"format_version\":2");
        let err = CheckpointManifest::decode(v2.as_bytes()).expect_err("version 2");
        assert!(
            matches!(
                err,
                FileProblem::UnsupportedVersion {
                    found: 2,
                    supported: [1]
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn garbage_wrong_types_and_another_lsn_are_refused() {
        for (bad, problem) in [
            ("", "not JSON"),
            ("{\"format_version\":1,", "not JSON"),
            ("[1]", "invalid type: sequence"),
            ("{\"format_version\":\"1\"}", "invalid type"),
        ] {
            let err = CheckpointManifest::decode(bad.as_bytes()).expect_err(bad);
            assert!(err.to_string().contains(problem), "{bad}: {err}");
        }
        let wide = GOLDEN.replace("305441741", "4294967296");
        assert!(matches!(
            CheckpointManifest::decode(wide.as_bytes()),
            Err(FileProblem::Malformed(_))
        ));
        let err = CheckpointManifest::decode_for(GOLDEN.as_bytes(), Lsn(7)).expect_err("lsn");
        assert!(
            matches!(err, FileProblem::BadField { field: "lsn", .. }),
            "{err:?}"
        );
    }

    #[test]
    fn the_snapshot_is_checked_by_size_and_crc() {
        let data = b"frames".to_vec();
        let m = CheckpointManifest {
            data_bytes: data.len() as u64,
            crc32c: crc32c::crc32c(&data),
            ..golden()
        };
        let mut padded = data.clone();
        padded.resize(4096, 0);
        assert_eq!(m.check_snapshot(&padded).expect("good"), &data[..]);
        assert!(matches!(
            m.check_snapshot(&data[..3]),
            Err(FileProblem::SnapshotTooShort {
                actual: 3,
                expected: 6
            })
        ));
        padded[0] ^= 1;
        assert!(matches!(
            m.check_snapshot(&padded),
            Err(FileProblem::SnapshotCrc { .. })
        ));
    }
}
