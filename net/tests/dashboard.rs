//! The shipped Grafana dashboard (`docs/observability/dashboard.json`) is well formed and
//! every panel query returns data from a real `oc-server`: each query becomes a
//! recording rule evaluated by `promtool test rules` over series taken from a real
//! scrape (values rising, so `rate()` has something to work on), with an alert that
//! fires when the query returns nothing. A panel naming a metric the server does not
//! export, or a label it does not have, fails here.
//!
//! CI installs promtool; without it (a developer machine) the promtool part is skipped
//! loudly and the structural checks still run.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use common::Server;
use serde_json::{json, Value};

fn dashboard() -> Value {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/observability/dashboard.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("the dashboard is JSON")
}

/// (panel title, query) of every target.
fn queries(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        if panel["type"] == "row" {
            continue;
        }
        for target in panel["targets"].as_array().expect("targets") {
            out.push((
                panel["title"].as_str().expect("title").to_string(),
                target["expr"].as_str().expect("expr").to_string(),
            ));
        }
    }
    out
}

/// A query as Grafana sends it with every server chosen (the variable's `allValue`).
fn every_server(expr: &str) -> String {
    expr.replace("$instance", ".*")
}

#[test]
fn every_query_is_scoped_to_the_chosen_servers() {
    let d = dashboard();
    let variable = d["templating"]["list"]
        .as_array()
        .expect("variables")
        .iter()
        .find(|v| v["name"] == "instance")
        .expect("an instance variable")
        .clone();
    assert_eq!(variable["includeAll"], true);
    assert_eq!(variable["allValue"], ".*");
    for (title, expr) in queries(&d) {
        let names = metric_names(&expr);
        assert!(!names.is_empty(), "{title}: no metric in {expr}");
        for name in names {
            // Each use of the name as a whole word, and what follows it.
            for (at, _) in expr.match_indices(name.as_str()) {
                let before = expr[..at].chars().last();
                let after = &expr[at + name.len()..];
                let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
                if before.is_some_and(word) || after.starts_with(word) {
                    continue;
                }
                assert!(
                    after.starts_with("{instance=~\"$instance\""),
                    "{title}: {name} is not scoped to the chosen servers in {expr}"
                );
            }
        }
    }
}

#[test]
fn the_dashboard_is_well_formed() {
    let d = dashboard();
    assert_eq!(d["uid"], "oc-overview");
    assert!(d["schemaVersion"].as_u64().expect("schemaVersion") >= 36);
    let datasource = &d["templating"]["list"][0];
    assert_eq!(
        (datasource["type"].as_str(), datasource["query"].as_str()),
        (Some("datasource"), Some("prometheus"))
    );
    let mut ids = BTreeSet::new();
    for panel in d["panels"].as_array().expect("panels") {
        let id = panel["id"].as_u64().expect("id");
        assert!(ids.insert(id), "panel id {id} twice");
        let grid = &panel["gridPos"];
        let (x, w) = (
            grid["x"].as_u64().expect("x"),
            grid["w"].as_u64().expect("w"),
        );
        assert!(x + w <= 24 && grid["h"].as_u64().expect("h") > 0, "{panel}");
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["type"], "timeseries");
        assert_eq!(panel["datasource"]["uid"], "${datasource}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{} has no query", panel["title"]);
        let refs: BTreeSet<&str> = targets
            .iter()
            .map(|t| t["refId"].as_str().expect("refId"))
            .collect();
        assert_eq!(
            refs.len(),
            targets.len(),
            "{}: refIds repeat",
            panel["title"]
        );
    }
    // Every metric a panel reads is documented.
    let operations = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/OPERATIONS.md"),
    )
    .expect("OPERATIONS.md");
    for (title, expr) in queries(&d) {
        for name in metric_names(&expr) {
            let base = name
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            assert!(
                operations.contains(&format!("`{base}`")) || operations.contains(base),
                "{title}: {name} is not in OPERATIONS.md"
            );
        }
    }
}

/// Metric names in a query (identifiers starting `oc_` or `process_`).
fn metric_names(expr: &str) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("oc_") || w.starts_with("process_"))
        .map(str::to_string)
        .collect()
}

/// A scrape turned into promtool input series: every sample rising by 1 a minute.
fn input_series(scrape: &str) -> Vec<Value> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let value: f64 = value
                .parse()
                .ok()
                .filter(|v: &f64| v.is_finite())
                .unwrap_or(0.0);
            Some(json!({"series": series, "values": format!("{value}+1x30")}))
        })
        .collect()
}

#[test]
fn every_panel_query_returns_data_from_a_real_scrape() {
    let dir = tempfile::tempdir().expect("tempdir");
    // With the default archive, so the archive panels have their series.
    // A writer (the replication panels read its series).
    let server = Server::start(
        &dir.path().join("data"),
        &["--replication-listen", "127.0.0.1:0"],
    );
    server.create_tenant_with_items("acme");
    let write = server.post(
        "/v1/tenants/acme/tables/items/rows",
        &json!({"ops": [{"upsert": {"id": 1, "name": "one", "batch": 1}}]}),
    );
    assert_eq!(write.status, 200, "{write:?}");
    let ask = server.post(
        "/v1/tenants/acme/ask",
        &json!({"sql": "SELECT id FROM items"}),
    );
    assert_eq!(ask.status, 200, "{ask:?}");
    let (status, scrape) = server.ops_get("/metrics");
    assert_eq!(status, 200);

    let d = dashboard();
    let queries = queries(&d);
    let mut rules = Vec::new();
    let mut checks = Vec::new();
    for (i, (title, expr)) in queries.iter().enumerate() {
        let record = format!("panel_{i}");
        rules.push(json!({"record": record, "expr": every_server(expr)}));
        let alert = format!("PanelNoData{i}");
        rules.push(json!({"alert": alert, "expr": format!("absent({record})"), "labels": {"panel": title}}));
        checks.push(json!({"eval_time": "10m", "alertname": alert, "exp_alerts": []}));
    }
    let work = tempfile::tempdir().expect("tempdir");
    // promtool reads YAML; JSON is YAML.
    std::fs::write(
        work.path().join("panels.yml"),
        json!({"groups": [{"name": "dashboard panels", "rules": rules}]}).to_string(),
    )
    .expect("rules");
    std::fs::write(
        work.path().join("panels_test.yml"),
        json!({
            "rule_files": ["panels.yml"],
            "evaluation_interval": "1m",
            "tests": [{"interval": "1m", "input_series": input_series(&scrape), "alert_rule_test": checks}],
        })
        .to_string(),
    )
    .expect("test");
    let output = match Command::new("promtool")
        .args(["test", "rules", "panels_test.yml"])
        .current_dir(work.path())
        .output()
    {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && std::env::var_os("CI").is_none() => {
            eprintln!(
                "!!! promtool is not installed: the panel queries are NOT checked (CI installs it)"
            );
            return;
        }
        Err(e) => panic!("running promtool: {e}"),
    };
    assert!(
        output.status.success(),
        "a panel query is invalid or returns nothing (see the alert's panel label):\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(queries.len() >= 25, "{} queries", queries.len());
}

/// The dashboard type-checks as Grafana's published `Dashboard` (`@grafana/schema`,
/// pinned in `tools/grafana-schema`): every field known to Grafana, of the right type.
/// The JSON is written as an object literal assigned to a `Dashboard`, so TypeScript's
/// excess-property check rejects unknown fields too. CI installs the package; without
/// it the check is skipped loudly.
#[test]
fn the_dashboard_matches_grafanas_published_schema() {
    let tools = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tools/grafana-schema");
    let tsc = tools.join("node_modules/.bin/tsc");
    if !tsc.exists() {
        if std::env::var_os("CI").is_some() {
            panic!("CI must install tools/grafana-schema (npm ci): see .ci/run");
        }
        eprintln!("skipped: run `npm ci` in tools/grafana-schema to check the dashboard against Grafana's schema");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    std::os::unix::fs::symlink(tools.join("node_modules"), dir.path().join("node_modules"))
        .expect("symlink node_modules");
    let text = serde_json::to_string_pretty(&dashboard()).expect("JSON");
    let check = dir.path().join("check.ts");
    std::fs::write(
        &check,
        format!(
            "import type {{ Dashboard }} from \"@grafana/schema\";\nexport const dashboard: Dashboard = {text};\n"
        ),
    )
    .expect("write check.ts");
    let out = Command::new(&tsc)
        .args([
            "--noEmit",
            "--strict",
            "--skipLibCheck",
            "--module",
            "esnext",
            "--moduleResolution",
            "bundler",
            "--target",
            "es2020",
        ])
        .arg(&check)
        .output()
        .expect("run tsc");
    assert!(
        out.status.success(),
        "the dashboard does not match Grafana's Dashboard type:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
