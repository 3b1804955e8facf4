//! `oc-bench http`: an open-loop load generator against a running `oc-server`.
//!
//! Requests are due at a fixed rate ([`Pacer`]); each keep-alive connection takes the
//! next due request and records latency from its due time.
//!
//! The client is a small hand-written HTTP/1.1 writer/reader over glommio sockets:
//! it sends fixed-shape requests and reads `content-length` bodies, so its own cost
//! per request is a few microseconds and does not blur the server's latency. Over
//! `https://` it speaks TLS with rustls (the server's own TLS stack), trusting the
//! certificate given with `--ca-cert`.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures_lite::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use hdrhistogram::Histogram;
use oc_io::SimRng;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::latency::{histogram, Percentiles};
use crate::pacer::Pacer;

#[derive(clap::Args)]
pub struct HttpArgs {
    /// Base URL of the data API, e.g. `http://127.0.0.1:7070`.
    #[arg(long)]
    pub(crate) url: String,
    /// Requests per second to offer.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) rate: u64,
    /// Seconds of measured load (after a warm-up of 2 s at the same rate).
    #[arg(long, default_value_t = 10.0)]
    pub(crate) seconds: f64,
    /// Reads:writes, e.g. `90:10`.
    #[arg(long, default_value = "90:10")]
    pub(crate) mix: String,
    /// Keep-alive connections.
    #[arg(long, default_value_t = 64)]
    pub(crate) connections: usize,
    /// Rows preloaded (reads hit them; writes upsert over them).
    #[arg(long, default_value_t = 100_000)]
    pub(crate) rows: u64,
    /// The tenant the load reads and writes (created if missing). Two runs at once
    /// with tenants of different shards load a server as two clients would.
    #[arg(long, default_value = TENANT)]
    pub(crate) tenant: String,
    /// Where to write the JSON results.
    #[arg(long)]
    pub(crate) json: Option<std::path::PathBuf>,
    /// The server's admin token (a file holding it): the setup uses it, and the load
    /// runs with an API key made for the benchmark tenant, as production clients do.
    /// One key is rate-limited by the server (`--rate-limit-rps`, 1000 by default):
    /// raise that above `--rate` on the server.
    #[arg(long)]
    pub(crate) admin_token_file: Option<std::path::PathBuf>,
    /// For an `https://` URL: the PEM certificate (or CA) to trust.
    #[arg(long)]
    pub(crate) ca_cert: Option<std::path::PathBuf>,
    /// Skip the floor: `GET /v1/ping` at the same rate right after the mix, the HTTP
    /// path with no engine state, which the read and write p99 are quoted against.
    #[arg(long)]
    pub(crate) no_floor: bool,
    /// The server's ops listener (`http://127.0.0.1:7071`): its `oc_wal_fsync_lag_ms`
    /// is scraped before and after the mix, and write p99 is judged against the floor
    /// plus twice the log's fsync-lag p99 over the same window.
    #[arg(long)]
    pub(crate) metrics_url: Option<String>,
    /// After the mix and its floor, the same mix at each of these offered rates
    /// (comma-separated, same seconds and connections): p50 and p99 against offered
    /// rate, where the knee is.
    #[arg(long, value_delimiter = ',')]
    pub(crate) sweep: Vec<u64>,
}

pub(crate) const TENANT: &str = "bench-http";
pub(crate) const TABLE: &str = "rows";
const WARMUP: Duration = Duration::from_secs(2);

#[derive(Serialize, Deserialize)]
pub(crate) struct OpResult {
    requests: u64,
    errors: u64,
    p50_us: u64,
    p95_us: u64,
    p99_us: u64,
    p999_us: u64,
    max_us: u64,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct HttpReport {
    url: String,
    offered_rate: u64,
    achieved_rate: f64,
    seconds: f64,
    connections: usize,
    mix: String,
    rows: u64,
    reads: OpResult,
    writes: OpResult,
    /// `GET /v1/ping` at the same rate and connections right after the mix: the HTTP
    /// stack's own latency, with no engine state (absent with `--no-floor`).
    #[serde(default)]
    floor: Option<OpResult>,
    /// Read p99 over the floor's p99.
    #[serde(default)]
    read_p99_over_floor: Option<f64>,
    /// Write p99 minus the floor's p99, µs.
    #[serde(default)]
    write_p99_over_floor_us: Option<i64>,
    /// The log's fsync-lag p99 over the mix (all shards), ms, from the server's
    /// `oc_wal_fsync_lag_ms` buckets as Prometheus' `histogram_quantile` estimates it.
    #[serde(default)]
    fsync_lag_p99_ms: Option<f64>,
    /// Where sampled writes spent their time over the mix, per stage, from the server's
    /// `oc_write_stage_seconds` (with `--metrics-url`).
    #[serde(default)]
    write_stages: Vec<StageTime>,
    /// Latency by percentile of each operation (`latency::percentile_curve`), for the
    /// percentile plot; the same histograms are written as `.hgrm` and `.hlog` beside
    /// the JSON.
    #[serde(default)]
    percentiles: Vec<(String, crate::latency::PercentileCurve)>,
    /// `--sweep`: the mix at each offered rate.
    #[serde(default)]
    sweep: Vec<SweepPoint>,
    /// Non-2xx statuses and transport errors, by kind.
    errors: std::collections::BTreeMap<String, u64>,
    /// The CPUs the generator was pinned to (`--client-cpus`), if it was.
    #[serde(default)]
    client_cpus: Option<String>,
    /// The CPUs of the servers oc-bench started (`--server-cpus`; this subcommand uses
    /// a server started elsewhere, pinned or not by whoever started it).
    #[serde(default)]
    server_cpus: Option<String>,
    /// `none`, or `api key` when the load authenticated with one.
    #[serde(default)]
    auth: String,
    /// Whether the load ran over TLS.
    #[serde(default)]
    tls: bool,
}

/// The mix at one offered rate (`--sweep`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SweepPoint {
    offered_rate: u64,
    achieved_rate: f64,
    read_p50_us: u64,
    read_p99_us: u64,
    write_p50_us: u64,
    write_p99_us: u64,
    errors: u64,
}

/// One stage of the sampled writes over the mix (`oc_engine::stages`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StageTime {
    pub(crate) stage: String,
    samples: u64,
    pub(crate) mean_us: f64,
    p50_us: f64,
    pub(crate) p99_us: f64,
}

#[derive(Clone)]
pub(crate) struct Target {
    host: String,
    addr: std::net::SocketAddr,
    /// Sent as `Authorization: Bearer` on every request, when set.
    bearer: Option<String>,
    /// Set for `https://`: the TLS client and the name the certificate must carry.
    tls: Option<(
        futures_rustls::TlsConnector,
        rustls_pki_types::ServerName<'static>,
    )>,
}

pub(crate) fn parse_url(url: &str) -> Result<Target> {
    parse_url_trusting(url, None)
}

/// As [`parse_url`]; an `https://` URL needs `ca_cert`, the PEM certificate to trust.
pub(crate) fn parse_url_trusting(url: &str, ca_cert: Option<&std::path::Path>) -> Result<Target> {
    let (rest, https) = match (url.strip_prefix("http://"), url.strip_prefix("https://")) {
        (Some(rest), _) => (rest, false),
        (_, Some(rest)) => (rest, true),
        _ => bail!("the URL must start with http:// or https://, not {url:?}"),
    };
    let host = rest.trim_end_matches('/').to_string();
    if let Some((_, path)) = host.split_once('/') {
        bail!("give the server's address without a path (drop /{path} from {url:?})");
    }
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&host)
        .with_context(|| format!("resolving {host}"))?
        .next()
        .ok_or_else(|| anyhow!("{host} resolves to nothing"))?;
    let tls = match (https, ca_cert) {
        (false, _) => None,
        (true, None) => bail!("an https:// URL needs --ca-cert, the certificate to trust"),
        (true, Some(pem)) => Some(tls_connector(pem, &host)?),
    };
    Ok(Target {
        host,
        addr,
        bearer: None,
        tls,
    })
}

fn tls_connector(
    pem: &std::path::Path,
    host: &str,
) -> Result<(
    futures_rustls::TlsConnector,
    rustls_pki_types::ServerName<'static>,
)> {
    use futures_rustls::rustls;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_file_iter(pem)
        .with_context(|| format!("reading {}", pem.display()))?
    {
        roots.add(cert.with_context(|| format!("a certificate in {}", pem.display()))?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = host.rsplit_once(':').map_or(host, |(name, _)| name);
    let name = rustls_pki_types::ServerName::try_from(name.to_string())
        .map_err(|e| anyhow!("{name:?} is not a TLS server name: {e}"))?;
    Ok((
        futures_rustls::TlsConnector::from(std::sync::Arc::new(config)),
        name,
    ))
}

/// A connection's byte stream, plain or TLS.
trait Stream: futures_lite::AsyncBufRead + futures_lite::AsyncWrite + Unpin {}
impl<T: futures_lite::AsyncBufRead + futures_lite::AsyncWrite + Unpin> Stream for T {}

/// One keep-alive connection with a reusable read buffer.
pub(crate) struct Connection {
    stream: Box<dyn Stream>,
    host: String,
    /// The `authorization` header line, or nothing.
    auth: String,
    line: String,
    /// The body of the last response.
    body: Vec<u8>,
}

impl Connection {
    pub(crate) async fn open(target: &Target) -> Result<Self> {
        let stream = TcpStream::connect(target.addr)
            .await
            .map_err(|e| anyhow!("connecting to {}: {e}", target.addr))?;
        stream
            .set_nodelay(true)
            .map_err(|e| anyhow!("setting TCP_NODELAY: {e}"))?;
        let stream: Box<dyn Stream> = match &target.tls {
            None => Box::new(stream.buffered()),
            Some((connector, name)) => {
                let tls = connector
                    .connect(name.clone(), stream)
                    .await
                    .map_err(|e| anyhow!("TLS handshake with {}: {e}", target.addr))?;
                Box::new(futures_lite::io::BufReader::new(tls))
            }
        };
        Ok(Connection {
            stream,
            host: target.host.clone(),
            auth: target
                .bearer
                .as_ref()
                .map_or_else(String::new, |t| format!("authorization: Bearer {t}\r\n")),
            line: String::new(),
            body: Vec::new(),
        })
    }

    /// A fresh connection after a failed one, retrying for up to a second.
    pub(crate) async fn reopen(target: &Target) -> Result<Self> {
        let mut last = None;
        for _ in 0..100 {
            match Self::open(target).await {
                Ok(conn) => return Ok(conn),
                Err(e) => last = Some(e),
            }
            glommio::timer::sleep(Duration::from_millis(10)).await;
        }
        Err(last.unwrap_or_else(|| anyhow!("could not reconnect")))
    }

    /// Sends one request and reads the whole response; returns its status.
    pub(crate) async fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<u16> {
        let body = body.unwrap_or("");
        let head = format!(
            "{method} {path} HTTP/1.1\r\nhost: {}\r\n{}content-type: application/json\r\ncontent-length: {}\r\n\r\n",
            self.host,
            self.auth,
            body.len()
        );
        let mut message = head.into_bytes();
        message.extend_from_slice(body.as_bytes());
        self.stream.write_all(&message).await?;
        let status = self.read_status().await?;
        let mut length = 0usize;
        loop {
            self.line.clear();
            if self.stream.read_line(&mut self.line).await? == 0 {
                bail!("the server closed the connection");
            }
            let header = self.line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse()?;
                }
            }
        }
        self.body.resize(length, 0);
        self.stream.read_exact(&mut self.body).await?;
        Ok(status)
    }

    /// Reads a response's status line and returns its code.
    async fn read_status(&mut self) -> Result<u16> {
        self.line.clear();
        self.stream.read_line(&mut self.line).await?;
        self.line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("bad status line {:?}", self.line))
    }

    /// The body of the last response.
    pub(crate) fn body(&self) -> &[u8] {
        &self.body
    }

    /// Sends a GET whose answer is a stream (chunked, e.g. `/watch`) and reads its
    /// head; returns the status. Read the body with [`Connection::next_chunk`].
    pub(crate) async fn open_stream(&mut self, path: &str) -> Result<u16> {
        let head = format!(
            "GET {path} HTTP/1.1\r\nhost: {}\r\naccept: text/event-stream\r\n\r\n",
            self.host
        );
        self.stream.write_all(head.as_bytes()).await?;
        let status = self.read_status().await?;
        loop {
            self.line.clear();
            if self.stream.read_line(&mut self.line).await? == 0 {
                bail!("the server closed the connection");
            }
            if self.line.trim_end().is_empty() {
                return Ok(status);
            }
        }
    }

    /// The next chunk of a chunked body (`None` at its end).
    pub(crate) async fn next_chunk(&mut self) -> Result<Option<&[u8]>> {
        self.line.clear();
        if self.stream.read_line(&mut self.line).await? == 0 {
            return Ok(None);
        }
        let size = usize::from_str_radix(self.line.trim_end().split(';').next().unwrap_or(""), 16)
            .map_err(|_| anyhow!("bad chunk size line {:?}", self.line))?;
        if size == 0 {
            return Ok(None);
        }
        self.body.resize(size, 0);
        self.stream.read_exact(&mut self.body).await?;
        self.line.clear();
        self.stream.read_line(&mut self.line).await?;
        Ok(Some(&self.body))
    }
}

fn parse_mix(mix: &str) -> Result<(u64, u64)> {
    let (r, w) = mix
        .split_once(':')
        .ok_or_else(|| anyhow!("--mix is reads:writes, e.g. 90:10"))?;
    let (r, w): (u64, u64) = (r.parse()?, w.parse()?);
    if r + w == 0 {
        bail!("--mix needs some reads or writes");
    }
    Ok((r, w))
}

fn row_body(id: u64, rng: &mut SimRng) -> String {
    json!({"ops": [{"upsert": {"id": id, "body": format!("{:0>180}", rng.below(u64::MAX))}}]})
        .to_string()
}

/// Creates `tenant` and its table `table` (a table schema as JSON) unless they exist.
pub(crate) async fn create_tenant_and_table(
    conn: &mut Connection,
    tenant: &str,
    table: &serde_json::Value,
) -> Result<()> {
    let body = json!({ "tenant": tenant }).to_string();
    let status = conn.request("POST", "/v1/tenants", Some(&body)).await?;
    if status != 201 && status != 409 {
        bail!("creating the tenant answered {status}");
    }
    let path = format!("/v1/tenants/{tenant}/tables");
    let status = conn
        .request("POST", &path, Some(&table.to_string()))
        .await?;
    if status != 201 && status != 409 {
        bail!("creating the table answered {status}");
    }
    Ok(())
}

/// Creates the tenant and table (if missing) and preloads `rows` rows.
pub(crate) async fn prepare(target: &Target, tenant: &str, rows: u64) -> Result<()> {
    let mut conn = Connection::open(target).await?;
    let table = json!({
        "name": TABLE,
        "columns": [{"name": "id", "type": "int"}, {"name": "body", "type": "text"}],
        "primary_key": ["id"],
    });
    create_tenant_and_table(&mut conn, tenant, &table).await?;
    let path = format!("/v1/tenants/{tenant}/tables/{TABLE}/rows");
    let mut rng = SimRng::new(7);
    for start in (0..rows).step_by(500) {
        let ops: Vec<_> = (start..(start + 500).min(rows))
            .map(|id| json!({"upsert": {"id": id, "body": format!("{:0>180}", rng.below(u64::MAX))}}))
            .collect();
        let status = conn
            .request("POST", &path, Some(&json!({"ops": ops}).to_string()))
            .await?;
        if status != 200 {
            bail!("preloading answered {status}");
        }
    }
    Ok(())
}

struct Recorder {
    reads: Histogram<u64>,
    writes: Histogram<u64>,
    pings: Histogram<u64>,
    read_errors: u64,
    write_errors: u64,
    ping_errors: u64,
    errors: std::collections::BTreeMap<String, u64>,
}

/// Makes an API key for `tenant` (with the admin token) and returns it.
async fn make_key(admin: &Target, tenant: &str) -> Result<String> {
    let mut conn = Connection::open(admin).await?;
    let status = conn
        .request(
            "POST",
            &format!("/v1/tenants/{tenant}/keys"),
            Some(r#"{"name":"oc-bench"}"#),
        )
        .await?;
    if status != 201 {
        bail!("making an API key answered {status}");
    }
    let answer: serde_json::Value = serde_json::from_slice(conn.body())?;
    answer["key"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("the key answer has no key"))
}

/// One request kind of a load.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write,
    /// `GET /v1/ping`: the HTTP path with no engine state (the floor).
    Ping,
}

/// Runs one paced load of `shares` (reads, writes, pings) at `rate` and returns
/// what it recorded.
async fn load(
    target: &Rc<Target>,
    args: &HttpArgs,
    rate: u64,
    shares: (u64, u64, u64),
    label: &str,
) -> Result<(Recorder, Duration)> {
    let measured = Duration::from_secs_f64(args.seconds);
    let pacer = Rc::new(Pacer::new(rate, WARMUP, measured));
    let recorder = Rc::new(RefCell::new(Recorder {
        reads: histogram(),
        writes: histogram(),
        pings: histogram(),
        read_errors: 0,
        write_errors: 0,
        ping_errors: 0,
        errors: Default::default(),
    }));
    let (reads, writes, pings) = shares;
    let mut tasks = Vec::new();
    for c in 0..args.connections {
        let mut conn = Connection::open(target).await?;
        let (pacer, recorder, target) = (pacer.clone(), recorder.clone(), target.clone());
        let rows = args.rows.max(1);
        let tenant = args.tenant.clone();
        tasks.push(glommio::spawn_local(async move {
            let mut rng = SimRng::new(1000 + c as u64);
            let read_path = |id: u64| format!("/v1/tenants/{tenant}/tables/{TABLE}/rows/{id}");
            let write_path = format!("/v1/tenants/{tenant}/tables/{TABLE}/rows");
            while let Some(slot) = pacer.next().await {
                let pick = rng.below(reads + writes + pings);
                let op = if pick < reads {
                    Op::Read
                } else if pick < reads + writes {
                    Op::Write
                } else {
                    Op::Ping
                };
                let id = rng.below(rows);
                let outcome = match op {
                    Op::Read => conn.request("GET", &read_path(id), None).await,
                    Op::Write => {
                        conn.request("POST", &write_path, Some(&row_body(id, &mut rng)))
                            .await
                    }
                    Op::Ping => conn.request("GET", "/v1/ping", None).await,
                };
                let latency_us = slot.due.elapsed().as_micros() as u64;
                if outcome.is_err() {
                    conn = Connection::reopen(&target).await?;
                }
                if !slot.measured {
                    continue;
                }
                let mut r = recorder.borrow_mut();
                let error = match &outcome {
                    Ok(status) if (200..300).contains(status) => None,
                    Ok(status) => Some(format!("status {status}")),
                    Err(e) => Some(format!("transport: {e}")),
                };
                let r = &mut *r;
                let (histogram, errors) = match op {
                    Op::Read => (&mut r.reads, &mut r.read_errors),
                    Op::Write => (&mut r.writes, &mut r.write_errors),
                    Op::Ping => (&mut r.pings, &mut r.ping_errors),
                };
                match error {
                    None => histogram.saturating_record(latency_us),
                    Some(kind) => {
                        *errors += 1;
                        *r.errors.entry(kind).or_default() += 1;
                    }
                }
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    let mut last_report = Instant::now();
    while !pacer.done() {
        glommio::timer::sleep(Duration::from_millis(250)).await;
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            let r = recorder.borrow();
            eprintln!(
                "  {label} [{:>5.1}s] sent {:>8}, read p99 {} µs, write p99 {} µs, ping p99 {} µs, errors {}",
                pacer.elapsed().as_secs_f64(),
                pacer.sent(),
                r.reads.value_at_quantile(0.99),
                r.writes.value_at_quantile(0.99),
                r.pings.value_at_quantile(0.99),
                r.read_errors + r.write_errors + r.ping_errors
            );
        }
    }
    for task in tasks {
        task.await?;
    }
    let elapsed = pacer.elapsed().saturating_sub(WARMUP);
    drop(pacer);
    let recorder = Rc::try_unwrap(recorder)
        .map_err(|_| anyhow!("a load task outlived its load"))?
        .into_inner();
    Ok((recorder, elapsed))
}

/// The histogram the write goal is judged against.
const FSYNC_LAG: &str = "oc_wal_fsync_lag_ms";

/// One scrape of the server's `/metrics`.
async fn scrape(ops: &Target) -> Result<String> {
    let mut conn = Connection::open(ops).await?;
    let status = conn.request("GET", "/metrics", None).await?;
    if status != 200 {
        bail!("GET /metrics answered {status}");
    }
    Ok(String::from_utf8_lossy(conn.body()).into_owned())
}

/// The stages of `oc_write_stage_seconds`, in the order a write passes them.
const STAGES: [&str; 9] = [
    "parse",
    "forward",
    "admit",
    "log_submit",
    "durable",
    "apply",
    "wake",
    "ack",
    "respond",
];

/// Each write stage's samples, mean and quantiles between two scrapes.
fn stage_times(before: &str, after: &str) -> Vec<StageTime> {
    let series = "oc_write_stage_seconds";
    STAGES
        .iter()
        .filter_map(|stage| {
            let labels = format!("stage=\"{stage}\",");
            let (b, a) = (
                buckets(before, series, &labels),
                buckets(after, series, &labels),
            );
            let sample = |scrape: &str, suffix: &str| {
                let prefix = format!("{series}_{suffix}{{stage=\"{stage}\"}} ");
                scrape
                    .lines()
                    .find_map(|l| l.strip_prefix(&prefix)?.trim().parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            let samples = sample(after, "count") - sample(before, "count");
            let seconds = sample(after, "sum") - sample(before, "sum");
            Some(StageTime {
                stage: stage.to_string(),
                samples: samples as u64,
                mean_us: if samples > 0.0 {
                    seconds / samples * 1e6
                } else {
                    0.0
                },
                p50_us: quantile_between(&b, &a, 0.5)? * 1e6,
                p99_us: quantile_between(&b, &a, 0.99)? * 1e6,
            })
        })
        .collect()
}

/// The same figures for writes timed in this process, on this thread, between two
/// snapshots of `oc_engine::stages` (the engine benchmark's shard runs on its thread).
pub(crate) fn stage_times_in_process(
    before: &oc_engine::stages::StageHistograms,
    after: &oc_engine::stages::StageHistograms,
) -> Vec<StageTime> {
    use oc_engine::stages::{Stage, BUCKETS_US};
    // Cumulative, in seconds, as a scrape has them.
    let cumulative = |h: &oc_engine::stages::StageHistogram| {
        let mut sum = 0.0;
        let mut out: Vec<(f64, f64)> = BUCKETS_US
            .iter()
            .zip(h.buckets)
            .map(|(&le, n)| {
                sum += n as f64;
                (le as f64 / 1e6, sum)
            })
            .collect();
        out.push((f64::INFINITY, h.count as f64));
        out
    };
    Stage::ALL
        .iter()
        .zip(before.iter().zip(after))
        .filter_map(|(stage, (b, a))| {
            let samples = a.count - b.count;
            if samples == 0 {
                return None;
            }
            let mean_us = (a.sum_us - b.sum_us) as f64 / samples as f64;
            let (b, a) = (cumulative(b), cumulative(a));
            Some(StageTime {
                stage: stage.name().to_string(),
                samples,
                mean_us,
                p50_us: quantile_between(&b, &a, 0.5)? * 1e6,
                p99_us: quantile_between(&b, &a, 0.99)? * 1e6,
            })
        })
        .collect()
}

/// A histogram's cumulative buckets in a scrape: (upper bound, count), by bound, for
/// the series whose labels before `le` are `labels` (each `name="value",`).
fn buckets(scrape: &str, name: &str, labels: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{{labels}le=\"");
    let mut out: Vec<(f64, f64)> = scrape
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(&prefix)?;
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect();
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// Quantile `q` of what a histogram counted between two scrapes, interpolated
/// linearly inside the bucket that holds it (as `histogram_quantile` does); `None`
/// without observations or when the buckets differ.
fn quantile_between(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    if before.len() != after.len() || after.is_empty() {
        return None;
    }
    let delta: Vec<(f64, f64)> = after
        .iter()
        .zip(before)
        .map(|(a, b)| (a.0, a.1 - b.1))
        .collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in &delta {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let width = count - lower.1;
            let within = if width > 0.0 {
                (rank - lower.1) / width
            } else {
                1.0
            };
            return Some(lower.0 + (le - lower.0) * within);
        }
        lower = (le, count);
    }
    None
}

fn op_result(h: &Histogram<u64>, errors: u64) -> OpResult {
    let p = Percentiles::of(h);
    OpResult {
        requests: h.len(),
        errors,
        p50_us: p.p50_us,
        p95_us: h.value_at_quantile(0.95),
        p99_us: p.p99_us,
        p999_us: p.p999_us,
        max_us: h.max(),
    }
}

pub fn run(args: HttpArgs) -> Result<()> {
    let started = Instant::now();
    let mut target = parse_url_trusting(&args.url, args.ca_cert.as_deref())?;
    if let Some(path) = &args.admin_token_file {
        let token =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        target.bearer = Some(token.trim().to_string());
    }
    let (reads_share, writes_share) = parse_mix(&args.mix)?;
    if args.rate == 0 || args.connections == 0 || args.sweep.contains(&0) {
        bail!("--rate and --connections must be above 0");
    }
    let target = Rc::new(target);
    let report = oc_io::executor::run_local(async {
        eprintln!(
            "preloading {} rows into {}/{TABLE}...",
            args.rows, args.tenant
        );
        prepare(&target, &args.tenant, args.rows).await?;
        // The load authenticates as a tenant's client does: with its API key.
        let target = match &target.bearer {
            Some(_) => Rc::new(Target {
                bearer: Some(make_key(&target, &args.tenant).await?),
                ..(*target).clone()
            }),
            None => target,
        };
        let metrics = args.metrics_url.as_deref().map(parse_url).transpose()?;
        let before = match &metrics {
            Some(m) => Some(scrape(m).await?),
            None => None,
        };
        let (r, elapsed) = load(
            &target,
            &args,
            args.rate,
            (reads_share, writes_share, 0),
            "mix",
        )
        .await?;
        let (fsync_lag_p99_ms, write_stages) = match (&metrics, before) {
            (Some(m), Some(before)) => {
                let after = scrape(m).await?;
                let lag = quantile_between(
                    &buckets(&before, FSYNC_LAG, ""),
                    &buckets(&after, FSYNC_LAG, ""),
                    0.99,
                );
                (lag, stage_times(&before, &after))
            }
            _ => (None, Vec::new()),
        };
        // The floor, at the same rate over the same connections, right after.
        let mut histograms = vec![("reads", r.reads.clone()), ("writes", r.writes.clone())];
        let floor = if args.no_floor {
            None
        } else {
            let (f, _) = load(&target, &args, args.rate, (0, 0, 1), "floor").await?;
            histograms.push(("floor", f.pings.clone()));
            Some(op_result(&f.pings, f.ping_errors))
        };
        let mut sweep = Vec::new();
        for &rate in &args.sweep {
            let (s, took) = load(
                &target,
                &args,
                rate,
                (reads_share, writes_share, 0),
                "sweep",
            )
            .await?;
            let errors = s.read_errors + s.write_errors;
            sweep.push(SweepPoint {
                offered_rate: rate,
                achieved_rate: (s.reads.len() + s.writes.len() + errors) as f64
                    / took.as_secs_f64(),
                read_p50_us: s.reads.value_at_quantile(0.5),
                read_p99_us: s.reads.value_at_quantile(0.99),
                write_p50_us: s.writes.value_at_quantile(0.5),
                write_p99_us: s.writes.value_at_quantile(0.99),
                errors,
            });
        }
        let percentiles = histograms
            .iter()
            .filter(|(_, h)| !h.is_empty())
            .map(|(name, h)| (name.to_string(), crate::latency::percentile_curve(h)))
            .collect();
        let answered = r.reads.len() + r.writes.len() + r.read_errors + r.write_errors;
        let reads = op_result(&r.reads, r.read_errors);
        let writes = op_result(&r.writes, r.write_errors);
        let report = HttpReport {
            url: args.url.clone(),
            offered_rate: args.rate,
            achieved_rate: answered as f64 / elapsed.as_secs_f64(),
            seconds: args.seconds,
            connections: args.connections,
            mix: args.mix.clone(),
            rows: args.rows,
            read_p99_over_floor: floor
                .as_ref()
                .map(|f| reads.p99_us as f64 / f.p99_us.max(1) as f64),
            write_p99_over_floor_us: floor
                .as_ref()
                .map(|f| writes.p99_us as i64 - f.p99_us as i64),
            fsync_lag_p99_ms,
            write_stages,
            percentiles,
            sweep,
            client_cpus: crate::pinning::current().client_cpus,
            server_cpus: crate::pinning::current().server_cpus,
            reads,
            writes,
            floor,
            errors: r.errors.clone(),
            auth: if args.admin_token_file.is_some() {
                "api key".into()
            } else {
                "none".into()
            },
            tls: args.url.starts_with("https://"),
        };
        Ok::<_, anyhow::Error>((report, histograms))
    })?;
    let (report, histograms) = report;
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

pub(crate) fn markdown(r: &HttpReport) -> String {
    let mut out = format!(
        "{} req/s offered ({} reads:writes), {:.0} req/s answered over {} s, {} connections{}{}, {} rows{}.\n\n",
        r.offered_rate,
        r.mix,
        r.achieved_rate,
        r.seconds,
        r.connections,
        if r.tls { " over TLS" } else { "" },
        if r.auth == "api key" { " with an API key" } else { "" },
        r.rows,
        r.client_cpus
            .as_ref()
            .map(|c| format!(", generator on CPUs {c}"))
            .unwrap_or_default()
    );
    out += "| operation | requests | errors | p50 µs | p95 µs | p99 µs | p999 µs | max µs |\n|---|---:|---:|---:|---:|---:|---:|---:|\n";
    let rows = [
        Some(("point read", &r.reads)),
        Some(("single-row write", &r.writes)),
        r.floor.as_ref().map(|f| ("floor: `GET /v1/ping` alone", f)),
    ];
    for (name, o) in rows.into_iter().flatten() {
        out += &format!(
            "| {name} | {} | {} | {} | {} | {} | {} | {} |\n",
            o.requests, o.errors, o.p50_us, o.p95_us, o.p99_us, o.p999_us, o.max_us
        );
    }
    if let (Some(read), Some(write)) = (r.read_p99_over_floor, r.write_p99_over_floor_us) {
        out += &format!(
            "\nread p99 = {read:.2} × the floor's; write p99 = the floor's + {write} µs\n"
        );
    }
    if let (Some(lag), Some(floor)) = (r.fsync_lag_p99_ms, &r.floor) {
        let goal_us = floor.p99_us as f64 + 2.0 * lag * 1e3;
        out += &format!(
            "log fsync-lag p99 over the mix ≈ {lag:.2} ms: write p99 {} µs against the goal \
             floor + 2 × that = {goal_us:.0} µs ({})\n",
            r.writes.p99_us,
            if (r.writes.p99_us as f64) <= goal_us {
                "met"
            } else {
                "not met"
            }
        );
    }
    if !r.write_stages.is_empty() {
        out += "\nWhere sampled writes spent their time (server side, `oc_write_stage_seconds`; \
                p50/p99 interpolated inside the buckets):\n\n\
                | stage | samples | mean µs | p50 µs | p99 µs |\n|---|---:|---:|---:|---:|\n";
        for t in &r.write_stages {
            out += &format!(
                "| {} | {} | {:.0} | {:.0} | {:.0} |\n",
                t.stage, t.samples, t.mean_us, t.p50_us, t.p99_us
            );
        }
    }
    if !r.sweep.is_empty() {
        out += "\nThe same mix at other offered rates (`--sweep`):\n\n\
                | offered req/s | answered req/s | read p50 µs | read p99 µs | write p50 µs | write p99 µs | errors |\n\
                |---:|---:|---:|---:|---:|---:|---:|\n";
        for p in &r.sweep {
            out += &format!(
                "| {} | {:.0} | {} | {} | {} | {} | {} |\n",
                p.offered_rate,
                p.achieved_rate,
                p.read_p50_us,
                p.read_p99_us,
                p.write_p50_us,
                p.write_p99_us,
                p.errors
            );
        }
    }
    if !r.errors.is_empty() {
        out += &format!("\nerrors: {:?}\n", r.errors);
    }
    out
}

/// Chart: latency percentiles of reads and writes.
pub(crate) fn svgs(r: &HttpReport) -> Vec<(String, String)> {
    use crate::report::{bar_chart, Bars};
    let values = |o: &OpResult| {
        vec![o.p50_us, o.p95_us, o.p99_us, o.p999_us]
            .into_iter()
            .map(|v| Some(v as f64))
            .collect()
    };
    let mut charts = vec![(
        "latency".to_string(),
        bar_chart(&Bars {
            title: format!("{} req/s offered ({} reads:writes)", r.offered_rate, r.mix),
            y_label: "µs from due time".into(),
            groups: ["p50", "p95", "p99", "p999"].map(String::from).to_vec(),
            series: vec![
                ("point read".into(), values(&r.reads)),
                ("single-row write".into(), values(&r.writes)),
            ],
        }),
    )];
    if !r.sweep.is_empty() {
        let line = |f: fn(&SweepPoint) -> u64| {
            r.sweep
                .iter()
                .map(|p| (p.offered_rate as f64, f(p) as f64))
                .collect::<Vec<_>>()
        };
        charts.push((
            "sweep".to_string(),
            crate::report::line_chart(&crate::report::Lines {
                title: format!("{} reads:writes: latency against offered rate", r.mix),
                x_label: "offered req/s".into(),
                y_label: "µs".into(),
                x_ticks: Vec::new(),
                series: vec![
                    ("read p50".into(), line(|p| p.read_p50_us)),
                    ("read p99".into(), line(|p| p.read_p99_us)),
                    ("write p50".into(), line(|p| p.write_p50_us)),
                    ("write p99".into(), line(|p| p.write_p99_us)),
                ],
            }),
        ));
    }
    if !r.percentiles.is_empty() {
        charts.push((
            "percentiles".to_string(),
            crate::report::percentile_plot(
                &format!(
                    "{} req/s offered ({} reads:writes): latency by percentile",
                    r.offered_rate, r.mix
                ),
                &r.percentiles,
            ),
        ));
    }
    charts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_url_with_a_path_is_refused_with_what_to_drop() {
        let refused = parse_url("http://127.0.0.1:7071/metrics")
            .err()
            .map(|e| e.to_string());
        assert!(
            refused
                .as_deref()
                .is_some_and(|e| e.contains("drop /metrics")),
            "{refused:?}"
        );
        assert!(parse_url("http://127.0.0.1:7071/").is_ok());
        assert!(parse_url("http://127.0.0.1:7071").is_ok());
    }

    #[test]
    fn the_quantile_between_two_scrapes_counts_only_what_came_between() {
        let scrape = |counts: [u64; 4]| {
            format!(
                "# TYPE oc_wal_fsync_lag_ms histogram\n\
                 oc_wal_fsync_lag_ms_bucket{{le=\"0.5\"}} {}\n\
                 oc_wal_fsync_lag_ms_bucket{{le=\"1\"}} {}\n\
                 oc_wal_fsync_lag_ms_bucket{{le=\"2\"}} {}\n\
                 oc_wal_fsync_lag_ms_bucket{{le=\"+Inf\"}} {}\n",
                counts[0], counts[1], counts[2], counts[3]
            )
        };
        // Before: 1000 fast syncs. Between: 100 more, 90 under 0.5 ms and 10 in 1–2 ms.
        let before = buckets(&scrape([1000, 1000, 1000, 1000]), FSYNC_LAG, "");
        let after = buckets(&scrape([1090, 1090, 1100, 1100]), FSYNC_LAG, "");
        assert_eq!(before.len(), 4);
        let p50 = quantile_between(&before, &after, 0.5).expect("p50");
        assert!((p50 - 0.5 * 50.0 / 90.0).abs() < 1e-9, "{p50}");
        let p99 = quantile_between(&before, &after, 0.99).expect("p99");
        assert!((p99 - 1.9).abs() < 1e-9, "{p99}");
        assert_eq!(
            quantile_between(&after, &after, 0.99),
            None,
            "nothing between"
        );
        assert_eq!(quantile_between(&before, &after[..2], 0.99), None);
    }

    #[test]
    fn stage_times_read_each_labelled_series_between_two_scrapes() {
        let scrape = |durable: [u64; 3], sum: f64| {
            format!(
                "oc_write_stage_seconds_bucket{{stage=\"apply\",le=\"0.00001\"}} 5\n\
                 oc_write_stage_seconds_bucket{{stage=\"apply\",le=\"+Inf\"}} 5\n\
                 oc_write_stage_seconds_sum{{stage=\"apply\"}} 0.00002\n\
                 oc_write_stage_seconds_count{{stage=\"apply\"}} 5\n\
                 oc_write_stage_seconds_bucket{{stage=\"durable\",le=\"0.001\"}} {}\n\
                 oc_write_stage_seconds_bucket{{stage=\"durable\",le=\"0.002\"}} {}\n\
                 oc_write_stage_seconds_bucket{{stage=\"durable\",le=\"+Inf\"}} {}\n\
                 oc_write_stage_seconds_sum{{stage=\"durable\"}} {sum}\n\
                 oc_write_stage_seconds_count{{stage=\"durable\"}} {}\n",
                durable[0], durable[1], durable[2], durable[2]
            )
        };
        // Between: 10 durable stages, 8 under 1 ms and 2 in 1–2 ms, 12 ms in all.
        let times = stage_times(&scrape([10, 10, 10], 0.005), &scrape([18, 20, 20], 0.017));
        let durable = times
            .iter()
            .find(|t| t.stage == "durable")
            .expect("durable");
        assert_eq!(durable.samples, 10);
        assert!((durable.mean_us - 1200.0).abs() < 1e-6, "{durable:?}");
        assert!((durable.p99_us - 1950.0).abs() < 1e-6, "{durable:?}");
        // A stage with nothing between the scrapes, or not in them, is left out.
        assert!(times.iter().all(|t| t.stage == "durable"), "{times:?}");
    }
}
