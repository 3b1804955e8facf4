//! Every error code the server can send is in API.md's error table: the codes are
//! read from the source where errors are built, so a new code without its line in
//! the table fails here.

use std::path::{Path, PathBuf};

/// Where errors are built: after each of these comes an error code.
const CODE_FOLLOWS: [&str; 4] = [
    "ApiError::new(",
    "bad_request(",
    "(StatusCode::",
    r#""code":""#,
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("source dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The first `"snake_case"` literal in `text`, if it comes before any `;`.
fn next_code(text: &str) -> Option<String> {
    let end = text.find(';').unwrap_or(text.len());
    let text = &text[..end];
    let start = text.find('"')? + 1;
    let rest = &text[start..];
    let len = rest.find(|c: char| !(c.is_ascii_lowercase() || c == '_'))?;
    let code = &rest[..len];
    (len > 0 && rest[len..].starts_with('"') && code.contains(|c| c != '_'))
        .then(|| code.to_string())
}

fn codes_in_source() -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    let mut codes = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("source");
        let text = text.split("#[cfg(test)]").next().unwrap_or_default();
        for needle in CODE_FOLLOWS {
            for (at, _) in text.match_indices(needle) {
                let after = &text[at + needle.len()..];
                let code = match needle {
                    // `ApiError::new(StatusCode::X, "code", …)`: skip the status.
                    "ApiError::new(" => after.split_once(',').and_then(|(_, rest)| next_code(rest)),
                    "bad_request(" => next_code(after),
                    // `(StatusCode::X, "code")`, a status and its code in a table.
                    "(StatusCode::" => after
                        .split_once(", \"")
                        .filter(|(status, _)| {
                            status.chars().all(|c| c.is_ascii_uppercase() || c == '_')
                        })
                        .and_then(|(_, rest)| {
                            let len = rest.find(|c: char| !(c.is_ascii_lowercase() || c == '_'))?;
                            rest[len..]
                                .starts_with("\")")
                                .then(|| rest[..len].to_string())
                        }),
                    // `"code":"too_many_connections"` inside a raw JSON string.
                    _ => after.split_once('"').map(|(code, _)| code.to_string()),
                };
                codes.extend(code);
            }
        }
    }
    // The query engine's codes (`QueryErrorKind::code`).
    let query = std::fs::read_to_string(root.join("../engine/src/query/mod.rs")).expect("query");
    for (at, _) in query.match_indices("=> \"") {
        if let Some(code) = next_code(&query[at..]) {
            codes.push(code);
        }
    }
    codes.sort();
    codes.dedup();
    codes
}

#[test]
fn every_error_code_the_server_sends_is_in_the_api_error_table() {
    let codes = codes_in_source();
    for expected in [
        "invalid_json",
        "too_many_connections",
        "query_timeout",
        "body_read_failed",
    ] {
        assert!(
            codes.iter().any(|c| c == expected),
            "the scan missed {expected}: {codes:?}"
        );
    }
    let api = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/API.md"))
        .expect("docs/API.md");
    let table: String = api
        .lines()
        .filter(|l| l.starts_with("| 4") || l.starts_with("| 5"))
        .collect::<Vec<_>>()
        .join("\n");
    let missing: Vec<&String> = codes
        .iter()
        .filter(|c| !table.contains(&format!("`{c}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "error codes missing from API.md's error table: {missing:?}"
    );
}
