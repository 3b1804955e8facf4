//! The shipped alert rules (`docs/observability/alerts.yml`) are valid, fire and stay
//! quiet as their unit tests say (promtool), name only metrics a real `oc-server`
//! exports, and link to runbook sections that exist.
//!
//! CI installs promtool; without it (a developer machine) the promtool checks are
//! skipped loudly, the way `common::promtool_check` does, and the rest still runs.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Output};

use common::{promtool_check, Server};
use serde_json::json;

fn docs() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs")
}

fn read_doc(path: &str) -> String {
    let path = docs().join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Runs promtool in `docs/observability`; `None` (after a loud notice) when it is not
/// installed and this is not CI.
fn promtool(args: &[&str]) -> Option<Output> {
    match Command::new("promtool")
        .args(args)
        .current_dir(docs().join("observability"))
        .output()
    {
        Ok(output) => Some(output),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && std::env::var_os("CI").is_none() => {
            eprintln!(
                "!!! promtool is not installed: `promtool {}` is SKIPPED (CI installs it)",
                args.join(" ")
            );
            None
        }
        Err(e) => panic!("running promtool: {e}"),
    }
}

fn assert_success(output: &Output, what: &str) {
    assert!(
        output.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// One alerting rule of alerts.yml, read line by line (the file keeps one key per
/// line, so no YAML parser is needed).
#[derive(Debug, Default)]
struct AlertRule {
    name: String,
    text: String,
}

impl AlertRule {
    /// The value of `key: value` inside this rule, unquoted.
    fn value(&self, key: &str) -> Option<String> {
        self.text.lines().find_map(|line| {
            let rest = line.trim().strip_prefix(key)?.strip_prefix(':')?;
            Some(rest.trim().trim_matches('"').to_string())
        })
    }
}

fn alert_rules() -> Vec<AlertRule> {
    let text = read_doc("observability/alerts.yml");
    let mut rules: Vec<AlertRule> = Vec::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if let Some(name) = trimmed.strip_prefix("- alert:") {
            rules.push(AlertRule {
                name: name.trim().to_string(),
                text: String::new(),
            });
        } else if trimmed.starts_with("- record:") || trimmed.starts_with("- name:") {
            // A recording rule or a new group ends the alert before it.
            rules.push(AlertRule::default());
        } else if let Some(rule) = rules.last_mut() {
            rule.text.push_str(line);
            rule.text.push('\n');
        }
    }
    rules.retain(|r| !r.name.is_empty());
    assert!(rules.len() >= 20, "alerts.yml lost its rules: {rules:?}");
    rules
}

/// GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to
/// hyphens.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

#[test]
fn promtool_accepts_the_alert_rules() {
    if let Some(output) = promtool(&["check", "rules", "alerts.yml"]) {
        assert_success(&output, "promtool check rules alerts.yml");
    }
}

#[test]
fn promtool_unit_tests_of_the_alert_rules_pass() {
    if let Some(output) = promtool(&["test", "rules", "alerts_test.yml"]) {
        assert_success(&output, "promtool test rules alerts_test.yml");
    }
}

#[test]
fn every_alert_has_a_firing_and_a_quiet_unit_test() {
    let tests = read_doc("observability/alerts_test.yml");
    let (mut fires, mut quiet) = (BTreeSet::new(), BTreeSet::new());
    let mut current: Option<String> = None;
    for line in tests.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("alertname:") {
            current = Some(name.trim().to_string());
        } else if let (Some(rest), Some(name)) = (line.strip_prefix("exp_alerts:"), &current) {
            if rest.trim() == "[]" {
                quiet.insert(name.clone());
            } else {
                fires.insert(name.clone());
            }
        }
    }
    for rule in alert_rules() {
        assert!(
            fires.contains(&rule.name),
            "no unit test in alerts_test.yml makes {} fire",
            rule.name
        );
        assert!(
            quiet.contains(&rule.name),
            "no unit test in alerts_test.yml expects {} to stay quiet",
            rule.name
        );
    }
}

#[test]
fn every_alert_has_a_severity_a_summary_an_impact_and_a_runbook() {
    for rule in alert_rules() {
        let severity = rule.value("severity");
        assert!(
            matches!(severity.as_deref(), Some("sev1" | "sev2" | "sev3")),
            "{}: severity {severity:?} is not sev1, sev2 or sev3",
            rule.name
        );
        for key in ["summary", "impact", "runbook_url"] {
            assert!(
                rule.value(key).is_some_and(|v| !v.is_empty()),
                "{} has no {key}",
                rule.name
            );
        }
    }
}

#[test]
fn every_runbook_url_is_a_heading_of_runbook_md() {
    let runbook = read_doc("RUNBOOK.md");
    let anchors: BTreeSet<String> = runbook
        .lines()
        .filter_map(|line| line.strip_prefix('#'))
        .map(|heading| anchor(heading.trim_start_matches('#')))
        .collect();
    for rule in alert_rules() {
        let url = rule.value("runbook_url").expect("checked above");
        let fragment = url
            .strip_prefix("docs/RUNBOOK.md#")
            .unwrap_or_else(|| panic!("{}: {url} is not docs/RUNBOOK.md#<anchor>", rule.name));
        assert!(
            anchors.contains(fragment),
            "{}: docs/RUNBOOK.md has no heading with anchor #{fragment}",
            rule.name
        );
    }
}

#[test]
fn anchors_follow_githubs_rules() {
    assert_eq!(anchor(" OcAskLatencyHigh"), "ocasklatencyhigh");
    assert_eq!(
        anchor(" Severities and their clocks"),
        "severities-and-their-clocks"
    );
    assert_eq!(anchor(" `/ready` is 503"), "ready-is-503");
}

/// Metric names (not recording rules, functions or labels) in the rules' expressions.
fn metric_names_in_alerts() -> BTreeSet<String> {
    let text = read_doc("observability/alerts.yml");
    let mut names = BTreeSet::new();
    let mut in_expr = false;
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') {
            continue;
        }
        if let Some(rest) = trimmed.strip_prefix("expr:") {
            in_expr = true;
            collect_names(rest, &mut names);
        } else if in_expr && line.starts_with("          ") && !trimmed.contains(": ") {
            collect_names(trimmed, &mut names); // a line of a `|` block
        } else {
            in_expr = false;
        }
    }
    names
}

fn collect_names(expr: &str, names: &mut BTreeSet<String>) {
    // Recording rules (`oc:...`) contain ':', which splits them into non-metric words.
    for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')) {
        if (word.starts_with("oc_") || word.starts_with("process_")) && !word.contains(':') {
            names.insert(word.to_string());
        }
    }
}

#[test]
fn every_metric_the_alerts_use_is_in_a_real_scrape() {
    let names = metric_names_in_alerts();
    for expected in [
        "oc_ask_latency_ms_bucket",
        "oc_plan_cache_misses_total",
        "oc_data_disk_free_bytes",
        "oc_memory_budget_bytes",
    ] {
        assert!(
            names.contains(expected),
            "{expected} not found in {names:?}"
        );
    }

    let dir = tempfile::tempdir().expect("tempdir");
    // The default archive (`<data-dir>-archive`) is on, so the shipping metrics exist.
    let server = Server::start(&dir.path().join("data"), &["--shards", "2"]);
    server.create_tenant_with_items("acme");
    let rows: Vec<_> = (0..20)
        .map(|i| json!({"upsert": {"id": i, "name": format!("n{i}"), "batch": i % 3}}))
        .collect();
    let written = server.post("/v1/tenants/acme/tables/items/rows", &json!({"ops": rows}));
    assert_eq!(written.status, 200, "{written:?}");
    for id in 0..5 {
        let asked = server.post(
            "/v1/tenants/acme/ask",
            &json!({"sql": "SELECT name FROM items WHERE id = $1", "params": [id]}),
        );
        assert_eq!(asked.status, 200, "{asked:?}");
    }
    assert_eq!(server.get("/v1/tenants/acme/usage").status, 200);
    assert_eq!(server.ops_get("/ready").0, 200);

    let (status, scrape) = server.ops_get("/metrics");
    assert_eq!(status, 200);
    let exported: BTreeSet<&str> = scrape
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split(['{', ' ']).next())
        .collect();
    let missing: Vec<&String> = names
        .iter()
        .filter(|name| !exported.contains(name.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "alerts.yml uses metrics a running server does not export: {missing:?}\n{scrape}"
    );
    // The latency SLO counts answers within 100 ms from this exact bucket.
    assert!(
        scrape
            .lines()
            .any(|l| l.starts_with("oc_ask_latency_ms_bucket{le=\"100\"}")),
        "{scrape}"
    );
    // The availability SLO leaves out the ops listener's routes by name.
    assert!(scrape.contains("route=\"ready\""), "{scrape}");
    promtool_check(&scrape);
}
