//! How `oc` prints answers: aligned tables for people (`-o table`), JSON for programs
//! (`-o json`, one line when piped).

use std::io::IsTerminal;

use oc_client::{AskAnswer, PlanStage};
use serde_json::{json, Value};

use crate::Output;

pub(crate) fn print_json(value: &Value) {
    let text = if std::io::stdout().is_terminal() {
        serde_json::to_string_pretty(value)
    } else {
        serde_json::to_string(value)
    };
    println!("{}", text.unwrap_or_default());
}

/// A one-line summary of a change (`name=value …`, in this order), or its JSON.
pub(crate) fn done(out: Output, fields: &[(&str, Value)]) {
    match out {
        Output::Json => print_json(&Value::Object(
            fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        )),
        Output::Table => {
            let fields: Vec<String> = fields
                .iter()
                .map(|(k, v)| format!("{k}={}", cell(v)))
                .collect();
            println!("{}", fields.join(" "));
        }
    }
}

pub(crate) fn print_answer(out: Output, answer: &AskAnswer) {
    match out {
        Output::Json => {
            let mut value = json!({
                "columns": answer.columns, "rows": answer.rows,
                "row_count": answer.row_count, "rows_scanned": answer.rows_scanned,
                "applied_lsn": answer.applied_lsn,
            });
            if let Some(plan) = &answer.plan {
                value["plan"] = plan_json(plan);
            }
            print_json(&value);
        }
        Output::Table => {
            let names: Vec<&str> = answer.columns.iter().map(String::as_str).collect();
            print_table(&names, &answer.rows);
            println!(
                "({} row{}, {} scanned)",
                answer.row_count,
                if answer.row_count == 1 { "" } else { "s" },
                answer.rows_scanned
            );
            if let Some(plan) = &answer.plan {
                println!(
                    "plan{} ({} µs): {}",
                    if plan.cached { ", cached" } else { "" },
                    plan.elapsed_us.unwrap_or(0),
                    plan.normalized_sql
                );
                let mut stage = plan.root.as_ref();
                let mut depth = 0;
                while let Some(s) = stage {
                    let figures = match (s.rows_in, s.rows_out, s.elapsed_us) {
                        (Some(i), Some(o), Some(us)) => format!("  [{i} in, {o} out, {us} µs]"),
                        _ => String::new(),
                    };
                    println!(
                        "{}└─ {} {}{figures}",
                        "   ".repeat(depth),
                        s.stage,
                        s.detail
                    );
                    stage = s.input.as_deref();
                    depth += 1;
                }
            }
        }
    }
}

fn plan_json(plan: &oc_client::Plan) -> Value {
    fn stage(s: &PlanStage) -> Value {
        json!({
            "stage": s.stage, "detail": s.detail, "rows_in": s.rows_in, "rows_out": s.rows_out,
            "elapsed_us": s.elapsed_us, "input": s.input.as_deref().map(stage),
        })
    }
    json!({
        "cached": plan.cached, "normalized_sql": plan.normalized_sql,
        "elapsed_us": plan.elapsed_us, "root": plan.root.as_ref().map(stage),
    })
}

/// A value as table text. Control characters (a terminal's escape sequences among
/// them) are shown escaped, never sent to the terminal.
fn cell(value: &Value) -> String {
    let text = match value {
        Value::Null => return String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if text.chars().any(char::is_control) {
        text.chars()
            .flat_map(|c| {
                let escaped: Vec<char> = if c.is_control() {
                    c.escape_default().collect()
                } else {
                    vec![c]
                };
                escaped
            })
            .collect()
    } else {
        text
    }
}

/// An aligned text table: numbers right-aligned, everything else left.
pub(crate) fn print_table(header: &[&str], rows: &[Vec<Value>]) {
    let cells: Vec<Vec<String>> = rows.iter().map(|r| r.iter().map(cell).collect()).collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &cells {
        for (i, c) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let line = |values: Vec<(String, bool)>| {
        let parts: Vec<String> = values
            .into_iter()
            .enumerate()
            .map(|(i, (v, right))| {
                let pad = widths[i].saturating_sub(v.chars().count());
                if right {
                    format!("{}{v}", " ".repeat(pad))
                } else {
                    format!("{v}{}", " ".repeat(pad))
                }
            })
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(header.iter().map(|h| (h.to_string(), false)).collect());
    line(widths.iter().map(|w| ("-".repeat(*w), false)).collect());
    for (row, values) in cells.into_iter().zip(rows) {
        line(
            row.into_iter()
                .zip(values)
                .take(widths.len())
                .map(|(c, v)| (c, v.is_number()))
                .collect(),
        );
    }
}
