//! README's first session, run as written: its `sh` block through bash with the `oc`
//! CLI (built next to `oc-server` by `cargo test --workspace`) against a fresh server
//! on its defaults, and its output compared line by line with the block after it.

mod common;

use std::path::Path;
use std::process::Command;

use common::Server;

/// The first `` ```lang `` block after `from` in `text`, and where it ends.
fn block<'a>(text: &'a str, from: usize, lang: &str) -> (&'a str, usize) {
    let fence = format!("```{lang}\n");
    let start = from + text[from..].find(&fence).expect("a fenced block") + fence.len();
    let end = start + text[start..].find("\n```").expect("its end");
    (&text[start..end], end)
}

#[test]
fn the_readme_first_session_runs_as_written() {
    let readme = include_str!("../../README.md");
    let marker = readme.find("<!-- first-session").expect("the marker");
    let (session, end) = block(readme, marker, "sh");
    let (expected, _) = block(readme, end, "text");

    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data"), &[]);
    let bins = Path::new(env!("CARGO_BIN_EXE_oc-server"))
        .parent()
        .expect("the target directory");
    assert!(
        bins.join("oc").exists(),
        "build the CLI first (cargo test --workspace does): {}",
        bins.display()
    );
    let path = format!(
        "{}:{}",
        bins.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", session])
        .env("PATH", path)
        .env("OC_URL", &server.api)
        .env("OC_OPS_URL", &server.ops)
        .env_remove("OC_TOKEN")
        .env_remove("OC_CA_CERT")
        .output()
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the session failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Vec<&str> = stdout.lines().collect();
    let want: Vec<&str> = expected.lines().collect();
    assert_eq!(got, want, "README's output block no longer matches");
}
