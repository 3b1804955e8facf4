//! Replays the query-parser fuzz corpus (`fuzz/corpus/query_parser`) through the fuzz
//! target's entry point, so `cargo test` on stable covers what the fuzzer keeps.

use std::path::Path;

#[test]
fn query_parser_corpus_replays_without_panics() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/query_parser");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("corpus entry").path();
        let bytes = std::fs::read(&path).expect("corpus file");
        let outcome = std::panic::catch_unwind(|| oc_engine::query::fuzz_entry(&bytes));
        assert!(
            outcome.is_ok(),
            "query_parser panicked on {}",
            path.display()
        );
        count += 1;
    }
    assert!(count >= 20, "the seed corpus is committed ({count} files)");
}
