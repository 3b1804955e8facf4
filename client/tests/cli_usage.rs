//! The `oc` binary's usage errors, which need no server: exit code 2 and a message that
//! names what to fix (docs/API.md lists the codes). The exit codes that need a real
//! server are tested in `net/tests/cli.rs`, which runs this same binary: an integration
//! test here is also what makes `cargo test --workspace` build `oc` on a fresh machine.

use std::process::{Command, Output};

fn oc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_oc"))
        .args(args)
        .env_remove("OC_URL")
        .env_remove("OC_TOKEN")
        .env_remove("OC_CA_CERT")
        .output()
        .expect("oc runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_url_that_is_not_http_is_a_usage_error_naming_the_schemes() {
    let out = oc(&["--url", "ftp://example.invalid", "tenants", "list"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("http:// or https://"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn an_unknown_command_is_a_usage_error() {
    let out = oc(&["no-such-command"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("no-such-command"), "{}", stderr(&out));
}

#[test]
fn nothing_listening_is_unavailable() {
    // A port the kernel just handed out and that was closed again.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let out = oc(&["--url", &url, "tenants", "list"]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
}

/// A reader that closes the pipe before `oc` writes (`oc completions bash | head`)
/// ends `oc` with status 141, as `SIGPIPE` ends other tools: no panic, no message.
#[test]
fn a_closed_pipe_ends_oc_quietly() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_oc"))
        .args(["completions", "bash"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("oc runs");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("oc ends");
    assert_eq!(
        out.status.code(),
        Some(141),
        "{:?}: {}",
        out.status,
        stderr(&out)
    );
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));
}

/// A file name where the JSON text goes is a usage error that says the argument is the
/// text itself and how to pass a file.
#[test]
fn a_file_name_for_a_json_argument_says_how_to_pass_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("schema.json");
    std::fs::write(&file, r#"{"columns": []}"#).expect("write");
    let file = file.to_str().expect("utf-8");
    let url = "http://127.0.0.1:9";
    for arg in [file.to_string(), format!("@{file}")] {
        let out = oc(&["--url", url, "tables", "create", "t", &arg]);
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(
            stderr(&out).contains(&format!("- < '{file}'")),
            "{}",
            stderr(&out)
        );
    }
}
