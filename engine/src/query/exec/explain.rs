//! EXPLAIN: the plan as a tree of stages, root first, with rows in and out and time
//! per stage when the query ran.

use super::*;

impl Execution {
    /// Asks for `EXPLAIN ANALYZE` output whatever the statement said (`?explain=true`).
    pub fn analyze(&mut self) {
        if self.plan.query.explain == ExplainMode::Run {
            let mut plan = (*self.plan).clone();
            plan.query.explain = ExplainMode::Analyze;
            self.plan = Rc::new(plan);
        }
    }

    /// The plan as a tree, root (projection) first, with per-stage figures if run.
    pub(super) fn plan_tree(&self, cached: bool, ran: bool) -> serde_json::Value {
        let q = &self.plan.query;
        let s = &self.stats;
        let names = &q.row_names;
        let out_names = &q.output_row_names;
        let figures = |stage: &Stage| {
            if ran {
                json!({
                    "rows_in": stage.rows_in,
                    "rows_out": stage.rows_out,
                    "elapsed_us": stage.elapsed.as_micros() as u64,
                })
            } else {
                json!({})
            }
        };
        let node = |name: &str, detail: String, stage: &Stage| {
            let mut n = json!({"stage": name, "detail": detail});
            if let (Some(obj), serde_json::Value::Object(f)) = (n.as_object_mut(), figures(stage)) {
                obj.extend(f);
            }
            n
        };
        let mut stages = Vec::new();
        let (access_name, access_stage) = match &self.plan.access {
            Access::Knn { .. } => ("knn", s.access),
            Access::Keys { .. } => (
                "scan",
                Stage {
                    rows_in: s.access.rows_out,
                    ..s.access
                },
            ),
        };
        stages.push(node(
            access_name,
            self.plan.access_detail.clone(),
            &access_stage,
        ));
        if let Some(f) = &q.filter {
            stages.push(node("filter", f.render(names), &s.filter));
        }
        if let Some(agg) = &q.aggregation {
            let keys: Vec<String> = agg.group_by.iter().map(|e| e.render(names)).collect();
            let aggs: Vec<String> = out_names[agg.group_by.len()..].to_vec();
            stages.push(node(
                "aggregate",
                format!(
                    "hash aggregate{}: {}",
                    if keys.is_empty() {
                        String::new()
                    } else {
                        format!(" by {}", keys.join(", "))
                    },
                    aggs.join(", ")
                ),
                &Stage {
                    rows_in: s.aggregate.rows_in,
                    ..s.aggregate
                },
            ));
            if let Some(h) = &agg.having {
                stages.push(node("having", h.render(out_names), &s.having));
            }
        }
        let order_detail = || {
            q.order_by
                .iter()
                .map(|k| {
                    format!(
                        "{}{}{}",
                        k.expr.render(out_names),
                        if k.desc { " DESC" } else { "" },
                        if k.nulls_first == k.desc {
                            if k.nulls_first {
                                " NULLS FIRST"
                            } else {
                                " NULLS LAST"
                            }
                        } else {
                            ""
                        }
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self.plan.order {
            OrderBy::Sort => {
                let (name, how) = match self.limit {
                    Some(l) => (
                        "top_k",
                        format!("keep the first {} by ", l.saturating_add(self.offset)),
                    ),
                    None => ("sort", "sort by ".to_string()),
                };
                stages.push(node(name, format!("{how}{}", order_detail()), &s.order));
            }
            OrderBy::ByAccess => stages.push(node(
                "order",
                format!("{}: already in this order from the scan", order_detail()),
                &Stage::default(),
            )),
            OrderBy::Knn | OrderBy::Unordered => {}
        }
        if q.limit.is_some() || q.offset.is_some() {
            stages.push(node(
                "limit",
                format!(
                    "offset {}, limit {}",
                    self.offset,
                    self.limit.map_or("all".to_string(), |l| l.to_string())
                ),
                &s.limit,
            ));
        }
        let projected: Vec<String> = q
            .projection
            .iter()
            .zip(&q.output_names)
            .map(|(e, n)| {
                let r = e.render(out_names);
                if r == *n {
                    r
                } else {
                    format!("{r} AS {n}")
                }
            })
            .collect();
        stages.push(node("project", projected.join(", "), &s.project));
        // Nest: each stage's input is the one before it.
        let mut tree = None;
        for mut stage in stages {
            if let (Some(child), Some(obj)) = (tree.take(), stage.as_object_mut()) {
                obj.insert("input".to_string(), child);
            }
            tree = Some(stage);
        }
        json!({
            "cached": cached,
            "normalized_sql": self.plan.normalized,
            "slices": s.slices,
            "elapsed_us": self.started.elapsed().as_micros() as u64,
            "root": tree,
        })
    }
}
