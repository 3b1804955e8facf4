//! `oc-bench ask`: `/ask` read queries through a real `oc-server` it starts.
//!
//! 1. Loads `--rows` rows with a `vector(--dim)` column over HTTP.
//! 2. Offers a fixed rate (`--rate`) of point, index-range and aggregate queries,
//!    plus the plain REST point read as the in-run baseline, with coordinated-omission
//!    correction as in `oc-bench http`; scrapes the plan cache before and after.
//! 3. Offers exact kNN queries (k = 10) at `--knn-rate`, checks a few answers against
//!    a brute-force scan done here, and times that scan in-process as the baseline of
//!    what the distance computation alone costs.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use oc_io::SimRng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::http::{parse_url, Connection, Target};
use crate::latency::histogram;
use crate::pacer::Pacer;
use crate::server::Spawned;

#[derive(clap::Args)]
pub struct AskArgs {
    /// Data directory for the server it starts (wiped first).
    #[arg(long, default_value = "/tmp/oc-bench-ask")]
    pub(crate) dir: std::path::PathBuf,
    #[arg(long, default_value_t = 100_000)]
    pub(crate) rows: u64,
    #[arg(long, default_value_t = 128)]
    pub(crate) dim: usize,
    /// Offered point/range/aggregate/REST queries per second.
    #[arg(long, default_value_t = 5000)]
    pub(crate) rate: u64,
    #[arg(long, default_value_t = 10.0)]
    pub(crate) seconds: f64,
    #[arg(long, default_value_t = 32)]
    pub(crate) connections: usize,
    /// Offered kNN queries per second.
    #[arg(long, default_value_t = 40)]
    pub(crate) knn_rate: u64,
    #[arg(long, default_value_t = 10.0)]
    pub(crate) knn_seconds: f64,
    #[arg(long)]
    pub(crate) json: Option<std::path::PathBuf>,
}

const TENANT: &str = "bench-ask";
const WARMUP: Duration = Duration::from_secs(2);
const KNN_CHECKS: usize = 5;

#[derive(Serialize, Deserialize, Clone)]
pub(crate) struct Latency {
    requests: u64,
    errors: u64,
    p50_us: u64,
    p95_us: u64,
    p99_us: u64,
    max_us: u64,
}

impl Latency {
    fn of(h: &Histogram<u64>, errors: u64) -> Self {
        Latency {
            requests: h.len(),
            errors,
            p50_us: h.value_at_quantile(0.50),
            p95_us: h.value_at_quantile(0.95),
            p99_us: h.value_at_quantile(0.99),
            max_us: h.max(),
        }
    }
}

#[derive(Serialize, Deserialize)]
pub(crate) struct AskReport {
    /// `--server-cpus` and `--client-cpus`, as given.
    #[serde(default)]
    pinning: crate::pinning::Pinning,
    rows: u64,
    dim: usize,
    load_rows_per_s: f64,
    offered_rate: u64,
    achieved_rate: f64,
    seconds: f64,
    connections: usize,
    /// point, range, aggregate, rest_get (the baseline).
    kinds: BTreeMap<String, Latency>,
    errors: BTreeMap<String, u64>,
    plan_cache_lookups: u64,
    plan_cache_hit_ratio: f64,
    knn_rate: u64,
    knn: Latency,
    knn_errors: BTreeMap<String, u64>,
    /// The same k = 10 scan done in-process, single thread, plain loop.
    knn_raw_p50_us: u64,
    knn_raw_p95_us: u64,
    knn_checked: usize,
    knn_mismatches: usize,
    /// Latency by percentile of each query kind and kNN (`latency::percentile_curve`),
    /// for the percentile plot; the same histograms are written as `.hgrm` and `.hlog`
    /// beside the JSON.
    #[serde(default)]
    percentiles: Vec<(String, crate::latency::PercentileCurve)>,
}

/// The deterministic dataset: row `id`'s group, price and vector.
fn group(id: u64) -> u64 {
    id % 100
}

fn price(id: u64) -> f64 {
    ((id * 7919) % 10_000) as f64 / 100.0
}

fn vector(id: u64, dim: usize) -> Vec<f32> {
    let mut rng = SimRng::new(id.wrapping_mul(0x9E37_79B9) ^ 0x5EED);
    (0..dim)
        .map(|_| rng.below(2001) as f32 / 1000.0 - 1.0)
        .collect()
}

fn query_vector(i: u64, dim: usize) -> Vec<f32> {
    vector(u64::MAX - i, dim)
}

fn brute_force(vectors: &[f32], dim: usize, q: &[f32], k: usize) -> Vec<u64> {
    let mut scored: Vec<(f32, u64)> = vectors
        .chunks_exact(dim)
        .enumerate()
        .map(|(id, v)| {
            let d: f32 = v.iter().zip(q).map(|(a, b)| (a - b) * (a - b)).sum();
            (d, id as u64)
        })
        .collect();
    scored.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    scored.into_iter().take(k).map(|(_, id)| id).collect()
}

/// A request of the mixed phase: (kind, method, path, body).
type Request = (&'static str, &'static str, String, Option<String>);

/// Makes request `i` of a phase.
type MakeRequest = Rc<dyn Fn(u64, &mut SimRng) -> Request>;

struct Recorder {
    kinds: BTreeMap<&'static str, (Histogram<u64>, u64)>,
    errors: BTreeMap<String, u64>,
    bodies: Vec<(u64, Vec<u8>)>,
}

/// Offers `rate` requests per second for `seconds` after a warm-up, over
/// `connections` keep-alive connections; latency from each request's due time.
async fn fixed_rate(
    target: &Rc<Target>,
    rate: u64,
    seconds: f64,
    connections: usize,
    keep_bodies: u64,
    make: MakeRequest,
) -> Result<(Recorder, f64)> {
    let pacer = Rc::new(Pacer::new(rate, WARMUP, Duration::from_secs_f64(seconds)));
    let recorder = Rc::new(RefCell::new(Recorder {
        kinds: BTreeMap::new(),
        errors: BTreeMap::new(),
        bodies: Vec::new(),
    }));
    let mut tasks = Vec::new();
    for c in 0..connections {
        let mut conn = Connection::open(target).await?;
        let (pacer, recorder, target, make) = (
            pacer.clone(),
            recorder.clone(),
            target.clone(),
            make.clone(),
        );
        tasks.push(glommio::spawn_local(async move {
            let mut rng = SimRng::new(7000 + c as u64);
            while let Some(slot) = pacer.next().await {
                let (kind, method, path, body) = make(slot.index, &mut rng);
                let outcome = conn.request(method, &path, body.as_deref()).await;
                let latency_us = slot.due.elapsed().as_micros() as u64;
                if slot.index < keep_bodies {
                    recorder
                        .borrow_mut()
                        .bodies
                        .push((slot.index, conn.body().to_vec()));
                }
                if outcome.is_err() {
                    conn = Connection::reopen(&target).await?;
                }
                if !slot.measured {
                    continue;
                }
                let mut r = recorder.borrow_mut();
                let entry = r.kinds.entry(kind).or_insert_with(|| (histogram(), 0));
                match &outcome {
                    Ok(status) if (200..300).contains(status) => {
                        entry.0.saturating_record(latency_us)
                    }
                    other => {
                        entry.1 += 1;
                        let why = match other {
                            Ok(status) => format!("{kind}: status {status}"),
                            Err(e) => format!("{kind}: transport: {e}"),
                        };
                        *r.errors.entry(why).or_default() += 1;
                    }
                }
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    let mut last = Instant::now();
    while !pacer.done() {
        glommio::timer::sleep(Duration::from_millis(250)).await;
        if last.elapsed() >= Duration::from_secs(1) {
            last = Instant::now();
            let r = recorder.borrow();
            let p99: Vec<String> = r
                .kinds
                .iter()
                .map(|(k, (h, _))| format!("{k} p99 {} µs", h.value_at_quantile(0.99)))
                .collect();
            eprintln!(
                "  [{:>5.1}s] sent {:>8}, {}",
                pacer.elapsed().as_secs_f64(),
                pacer.sent(),
                p99.join(", ")
            );
        }
    }
    for task in tasks {
        task.await?;
    }
    let elapsed = pacer.elapsed().saturating_sub(WARMUP).as_secs_f64();
    let recorder = Rc::try_unwrap(recorder)
        .map_err(|_| anyhow::anyhow!("tasks still hold the recorder"))?
        .into_inner();
    let answered: u64 = recorder.kinds.values().map(|(h, e)| h.len() + e).sum();
    Ok((recorder, answered as f64 / elapsed))
}

async fn post_ok(conn: &mut Connection, path: &str, body: &Value) -> Result<Value> {
    let status = conn.request("POST", path, Some(&body.to_string())).await?;
    let reply: Value = serde_json::from_slice(conn.body()).unwrap_or(Value::Null);
    if !(200..300).contains(&status) {
        bail!("POST {path}: {status} {reply}");
    }
    Ok(reply)
}

async fn load(target: &Rc<Target>, rows: u64, dim: usize) -> Result<f64> {
    let mut conn = Connection::open(target).await?;
    post_ok(&mut conn, "/v1/tenants", &json!({"tenant": TENANT})).await?;
    post_ok(
        &mut conn,
        &format!("/v1/tenants/{TENANT}/tables"),
        &json!({
            "name": "items",
            "columns": [
                {"name": "id", "type": "int"},
                {"name": "grp", "type": "int"},
                {"name": "price", "type": "float"},
                {"name": "emb", "type": format!("vector({dim})")}
            ],
            "primary_key": ["id"],
            "indexes": [{"name": "by_grp_price", "columns": ["grp", "price"]}]
        }),
    )
    .await?;
    let started = Instant::now();
    let next = Rc::new(Cell::new(0u64));
    let batch = (2_000_000 / (dim as u64 * 8 + 64)).clamp(1, 1000);
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (next, target) = (next.clone(), target.clone());
        tasks.push(glommio::spawn_local(async move {
            let mut conn = Connection::open(&target).await?;
            loop {
                let first = next.get();
                if first >= rows {
                    return Ok::<_, anyhow::Error>(());
                }
                let last = (first + batch).min(rows);
                next.set(last);
                let ops: Vec<Value> = (first..last)
                    .map(|id| {
                        json!({"upsert": {"id": id, "grp": group(id), "price": price(id), "emb": vector(id, dim)}})
                    })
                    .collect();
                post_ok(&mut conn, &format!("/v1/tenants/{TENANT}/tables/items/rows"), &json!({"ops": ops})).await?;
                if last % 20_000 < batch {
                    eprintln!("  loaded {last} rows");
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    Ok(rows as f64 / started.elapsed().as_secs_f64())
}

/// (hits, misses) of the plan caches, summed over shards.
async fn plan_cache(ops: &Rc<Target>) -> Result<(u64, u64)> {
    let mut conn = Connection::open(ops).await?;
    conn.request("GET", "/metrics", None).await?;
    let text = String::from_utf8_lossy(conn.body()).into_owned();
    let sum = |name: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    Ok((
        sum("oc_plan_cache_hits_total{"),
        sum("oc_plan_cache_misses_total{"),
    ))
}

pub fn run(args: AskArgs) -> Result<()> {
    let started = Instant::now();
    if args.rate == 0 || args.knn_rate == 0 || args.connections == 0 || args.rows == 0 {
        bail!("--rate, --knn-rate, --connections and --rows must be above 0");
    }
    let _ = std::fs::remove_dir_all(&args.dir);
    std::fs::create_dir_all(&args.dir)?;
    let server = Spawned::start(&args.dir.join("data"), &["--archive", "none"])?
        .context("no oc-server next to oc-bench (cargo build --release --bin oc-server)")?;
    let target = Rc::new(parse_url(&server.url)?);
    let ops = Rc::new(parse_url(&server.ops_url)?);
    let (rows, dim) = (args.rows, args.dim);
    let report = oc_io::executor::run_local(async {
        eprintln!("loading {rows} rows of vector({dim})...");
        let load_rows_per_s = load(&target, rows, dim).await?;
        let before = plan_cache(&ops).await?;
        eprintln!(
            "mixed queries at {} req/s for {} s...",
            args.rate, args.seconds
        );
        let mixed: MakeRequest = Rc::new(move |_, rng| {
            let ask = format!("/v1/tenants/{TENANT}/ask");
            let id = rng.below(rows);
            let g = rng.below(100);
            match rng.below(10) {
                0..=3 => ("point", "POST", ask, Some(json!({"sql": "SELECT id, grp, price FROM items WHERE id = $1", "params": [id]}).to_string())),
                4..=7 => {
                    let lo = rng.below(95) as f64;
                    ("range", "POST", ask, Some(json!({"sql": "SELECT id, price FROM items WHERE grp = $1 AND price >= $2 AND price < $3 LIMIT 20", "params": [g, lo, lo + 5.0]}).to_string()))
                }
                8 => ("aggregate", "POST", ask, Some(json!({"sql": "SELECT COUNT(*), AVG(price), MAX(price) FROM items WHERE grp = $1 AND price < $2", "params": [g, 20.0]}).to_string())),
                _ => ("rest_get", "GET", format!("/v1/tenants/{TENANT}/tables/items/rows/{id}"), None),
            }
        });
        let (mixed_rec, achieved) =
            fixed_rate(&target, args.rate, args.seconds, args.connections, 0, mixed).await?;
        let after = plan_cache(&ops).await?;
        let (hits, misses) = (after.0 - before.0, after.1 - before.1);

        eprintln!(
            "kNN (k = 10) at {} req/s for {} s...",
            args.knn_rate, args.knn_seconds
        );
        let knn: MakeRequest = Rc::new(move |i, _| {
            let body = json!({"sql": "SELECT id FROM items ORDER BY emb <-> $1 LIMIT 10", "params": [query_vector(i, dim)]});
            (
                "knn",
                "POST",
                format!("/v1/tenants/{TENANT}/ask"),
                Some(body.to_string()),
            )
        });
        let (knn_rec, _) = fixed_rate(
            &target,
            args.knn_rate,
            args.knn_seconds,
            4,
            KNN_CHECKS as u64,
            knn,
        )
        .await?;
        Ok::<_, anyhow::Error>((load_rows_per_s, mixed_rec, achieved, hits, misses, knn_rec))
    })?;
    server.stop()?;
    let (load_rows_per_s, mixed, achieved, hits, misses, knn) = report;

    eprintln!("brute-force baseline and answer check in-process...");
    let vectors: Vec<f32> = (0..rows).flat_map(|id| vector(id, dim)).collect();
    let mut raw = histogram();
    let mut mismatches = 0;
    for (i, body) in &knn.bodies {
        let q = query_vector(*i, dim);
        let t = Instant::now();
        let want = brute_force(&vectors, dim, &q, 10);
        raw.saturating_record(t.elapsed().as_micros() as u64);
        let reply: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let got: Vec<u64> = reply["rows"]
            .as_array()
            .map(|rows| rows.iter().filter_map(|r| r[0].as_u64()).collect())
            .unwrap_or_default();
        if got != want {
            mismatches += 1;
            eprintln!("  kNN answer {i} differs: oc {got:?}, brute force {want:?}");
        }
    }
    for i in 0..10u64 {
        let q = query_vector(1000 + i, dim);
        let t = Instant::now();
        std::hint::black_box(brute_force(&vectors, dim, &q, 10));
        raw.saturating_record(t.elapsed().as_micros() as u64);
    }
    let knn_latency = knn.kinds.get("knn").map(|(h, e)| Latency::of(h, *e));
    let histograms: Vec<(&str, Histogram<u64>)> = mixed
        .kinds
        .iter()
        .chain(knn.kinds.iter())
        .map(|(k, (h, _))| (*k, h.clone()))
        .collect();
    let report = AskReport {
        pinning: crate::pinning::current(),
        rows,
        dim,
        load_rows_per_s,
        offered_rate: args.rate,
        achieved_rate: achieved,
        seconds: args.seconds,
        connections: args.connections,
        kinds: mixed
            .kinds
            .iter()
            .map(|(k, (h, e))| (k.to_string(), Latency::of(h, *e)))
            .collect(),
        errors: mixed.errors,
        plan_cache_lookups: hits + misses,
        plan_cache_hit_ratio: hits as f64 / (hits + misses).max(1) as f64,
        knn_rate: args.knn_rate,
        knn: knn_latency.context("no kNN query was answered")?,
        knn_errors: knn.errors,
        knn_raw_p50_us: raw.value_at_quantile(0.5),
        knn_raw_p95_us: raw.value_at_quantile(0.95),
        knn_checked: knn.bodies.len(),
        knn_mismatches: mismatches,
        percentiles: histograms
            .iter()
            .filter(|(_, h)| !h.is_empty())
            .map(|(k, h)| (k.to_string(), crate::latency::percentile_curve(h)))
            .collect(),
    };
    crate::report::write_outputs(
        &report,
        args.json.as_deref(),
        markdown(&report),
        svgs(&report),
    )?;
    if let Some(json) = &args.json {
        crate::report::write_histograms(json, &histograms, started.elapsed())?;
    }
    Ok(())
}

fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

pub(crate) fn markdown(r: &AskReport) -> String {
    let mut out = format!(
        "### /ask: {} rows, vector({}), {} req/s offered ({:.0} answered/s) over {} connections for {} s\n\n\
         | query | requests | errors | p50 ms | p95 ms | p99 ms | max ms |\n|---|---|---|---|---|---|---|\n",
        r.rows, r.dim, r.offered_rate, r.achieved_rate, r.connections, r.seconds
    );
    let mut row = |name: &str, l: &Latency| {
        out.push_str(&format!(
            "| {name} | {} | {} | {} | {} | {} | {} |\n",
            l.requests,
            l.errors,
            ms(l.p50_us),
            ms(l.p95_us),
            ms(l.p99_us),
            ms(l.max_us)
        ));
    };
    for (kind, l) in &r.kinds {
        row(kind, l);
    }
    row(&format!("knn k=10 at {} req/s", r.knn_rate), &r.knn);
    let point = r.kinds.get("point").map_or(0, |l| l.p99_us);
    let range = r.kinds.get("range").map_or(0, |l| l.p99_us);
    let rest = r.kinds.get("rest_get").map_or(1, |l| l.p99_us.max(1));
    let verdict = |ok: bool| if ok { "met" } else { "not met" };
    out.push_str(&format!(
        "\n- Plan cache over the mixed phase: {:.4} hit ratio ({} lookups).\n\
         - In-process brute-force kNN (same data, one thread): p50 {} ms, p95 {} ms; oc's kNN p50 is {:.2}× that.\n\
         - kNN answers checked against brute force: {} of {} identical.\n\
         - `/ask` point p99 is {:.2}× the REST point read's p99 (the baseline in this run).\n\n\
         | target | measured | |\n|---|---|---|\n\
         | point and index-range p99 ≤ 2 ms at {} req/s | {} / {} ms | {} |\n\
         | exact kNN (k=10) p95 ≤ 15 ms | {} ms | {} |\n\
         | plan-cache hit ratio ≥ 0.99 | {:.4} | {} |\n",
        r.plan_cache_hit_ratio,
        r.plan_cache_lookups,
        ms(r.knn_raw_p50_us),
        ms(r.knn_raw_p95_us),
        r.knn.p50_us as f64 / r.knn_raw_p50_us.max(1) as f64,
        r.knn_checked - r.knn_mismatches,
        r.knn_checked,
        point as f64 / rest as f64,
        r.offered_rate,
        ms(point),
        ms(range),
        verdict(point <= 2000 && range <= 2000),
        ms(r.knn.p95_us),
        verdict(r.knn.p95_us <= 15_000),
        r.plan_cache_hit_ratio,
        verdict(r.plan_cache_hit_ratio >= 0.99),
    ));
    if !r.errors.is_empty() || !r.knn_errors.is_empty() {
        out.push_str(&format!("\nErrors: {:?} {:?}\n", r.errors, r.knn_errors));
    }
    out
}

pub(crate) fn svgs(r: &AskReport) -> Vec<(String, String)> {
    use crate::report::{bar_chart, Bars};
    let values = |l: &Latency| {
        vec![
            Some(l.p50_us as f64 / 1000.0),
            Some(l.p95_us as f64 / 1000.0),
            Some(l.p99_us as f64 / 1000.0),
        ]
    };
    let mut series: Vec<(String, Vec<Option<f64>>)> = r
        .kinds
        .iter()
        .map(|(k, l)| (k.clone(), values(l)))
        .collect();
    series.push(("knn k=10".into(), values(&r.knn)));
    let mut charts = vec![(
        "latency".to_string(),
        bar_chart(&Bars {
            title: format!(
                "/ask at {} req/s (kNN at {} req/s), {} rows",
                r.offered_rate, r.knn_rate, r.rows
            ),
            y_label: "ms from due time".into(),
            groups: ["p50", "p95", "p99"].map(String::from).to_vec(),
            series,
        }),
    )];
    if !r.percentiles.is_empty() {
        charts.push((
            "percentiles".to_string(),
            crate::report::percentile_plot(
                &format!("/ask at {} req/s: latency by percentile", r.offered_rate),
                &r.percentiles,
            ),
        ));
    }
    charts
}
