//! `oc`: the command line for an oc server, on `oc-client`. The command tree and its
//! dispatch stay in this one file (each arm is a call and its printing); how answers
//! are printed is in `output`.
//!
//! Exit codes: 0 done, 1 the server failed (500) or answered off contract, 2 bad
//! usage, 3 the request is invalid (400/409/413/415, quota), 4 credentials (401/403),
//! 5 not found (404), 6 unavailable (421/429/503/507, no connection): try again later
//! (or elsewhere).
//!
//! One file, about 700 lines: the command tree and its dispatch read best side by side;
//! the printing already lives in `output`.

use std::io::{Read, Write};
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use oc_client::{AuditQuery, Client, Error, ErrorClass, ReadOptions, WatchOptions, WriteBatch};
use serde_json::{json, Value};

mod output;

use output::{done, print_answer, print_json, print_table};

#[derive(Parser)]
#[command(name = "oc", version, about = "Talk to an oc server", long_about = None)]
struct Cli {
    /// The server's data API; with replication, the writer's and its followers'
    /// separated by commas (writes find the writer, reads go to the server in use).
    #[arg(
        long,
        env = "OC_URL",
        default_value = "http://127.0.0.1:7070",
        global = true
    )]
    url: String,
    /// The server's ops listener (`oc status`).
    #[arg(
        long,
        env = "OC_OPS_URL",
        default_value = "http://127.0.0.1:7071",
        global = true
    )]
    ops_url: String,
    /// Bearer token: the admin token or a tenant's API key.
    #[arg(long, env = "OC_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// A PEM certificate to trust (a private CA or a self-signed server).
    #[arg(long, env = "OC_CA_CERT", global = true)]
    ca_cert: Option<std::path::PathBuf>,
    /// How answers are printed.
    #[arg(short, long, value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Tenants (admin).
    #[command(subcommand)]
    Tenants(Tenants),
    /// A tenant's tables.
    #[command(subcommand)]
    Tables(Tables),
    /// A tenant's API keys (admin).
    #[command(subcommand)]
    Keys(Keys),
    /// Rows of a table.
    #[command(subcommand)]
    Rows(Rows),
    /// Run one SELECT over a tenant's tables.
    Ask {
        tenant: String,
        sql: String,
        /// A value for $1, $2, … in order, as JSON (`42`, `'"text"'`, `[0.1,0.2]`).
        #[arg(short, long = "param")]
        params: Vec<String>,
        /// Print the plan tree with rows and times per stage.
        #[arg(long)]
        explain: bool,
        /// Answer only once the server has applied this LSN (a write's `lsn`).
        #[arg(long)]
        min_lsn: Option<u64>,
    },
    /// What a tenant stores, its quotas and load.
    Usage { tenant: String },
    /// Follow a tenant's changes (one JSON line per event).
    Watch {
        tenant: String,
        /// Only these tables (comma-separated).
        #[arg(long, value_delimiter = ',')]
        tables: Option<Vec<String>>,
        /// Resume after this event id (`<epoch>-<lsn>`).
        #[arg(long)]
        last_event_id: Option<String>,
        /// Resume after this LSN.
        #[arg(long)]
        from_lsn: Option<u64>,
        /// Stop after this many events.
        #[arg(long)]
        limit: Option<u64>,
        /// Stop when the stream ends instead of resuming it (by default a stream the
        /// server ends, or a lost connection, is resumed from its last id, as an
        /// EventSource does).
        #[arg(long)]
        once: bool,
    },
    /// Entries of the audit log (admin).
    Audit {
        /// Only entries of this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Only entries of this action (e.g. table.create, key.revoke).
        #[arg(long)]
        action: Option<String>,
        /// RFC 3339.
        #[arg(long)]
        since: Option<String>,
        /// Entries after this seq: the next page after one that printed `--after N`.
        #[arg(long)]
        after: Option<u64>,
        /// Entries per page (the server's default and cap apply).
        #[arg(long)]
        limit: Option<u32>,
    },
    /// Health and readiness from the ops listener.
    Status,
    /// Print a shell completion script.
    Completions { shell: clap_complete::Shell },
}

#[derive(Subcommand)]
enum Tenants {
    /// Every tenant, with its shard.
    List,
    /// Create a tenant (`[a-z0-9][a-z0-9_-]{0,62}`).
    Create { tenant: String },
    /// Drop a tenant with all its tables, rows and keys.
    Drop { tenant: String },
}

#[derive(Subcommand)]
enum Tables {
    /// The tenant's tables.
    List { tenant: String },
    /// Create a table from its JSON schema (docs/API.md, "Tables"); `-` reads stdin.
    Create { tenant: String, schema: String },
    /// A table's schema, as JSON.
    Describe { tenant: String, table: String },
    /// Drop a table with all its rows.
    Drop { tenant: String, table: String },
}

#[derive(Subcommand)]
enum Keys {
    /// The tenant's API keys (ids and names, never the secrets).
    List { tenant: String },
    /// Create an API key; its secret is printed once.
    Create {
        tenant: String,
        #[arg(long)]
        name: Option<String>,
    },
    /// Revoke an API key by its id.
    Revoke { tenant: String, key_id: String },
}

#[derive(Subcommand)]
enum Rows {
    /// Insert or replace rows: one JSON object, or an array of them; `-` reads stdin.
    Upsert {
        tenant: String,
        table: String,
        rows: String,
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Delete rows by key: a JSON object of the key columns, or an array of them.
    Delete {
        tenant: String,
        table: String,
        keys: String,
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Read one row by its primary key, one value per key column in key order.
    Get {
        tenant: String,
        table: String,
        #[arg(required = true)]
        key: Vec<String>,
        /// Answer only once the server has applied this LSN (a write's `lsn`).
        #[arg(long)]
        min_lsn: Option<u64>,
    },
}

/// How long `oc watch` waits before resuming a stream that ended, doubling up to the
/// most while no event arrives.
const WATCH_FIRST_PAUSE: std::time::Duration = std::time::Duration::from_millis(250);
const WATCH_MOST_PAUSE: std::time::Duration = std::time::Duration::from_secs(5);

/// A failure of the command itself, with its exit code.
struct Failure {
    code: u8,
    message: String,
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        let code = match e.class() {
            _ if matches!(e, Error::InvalidArgument(_)) || e.certificate_refused() => 2,
            ErrorClass::Server => 1,
            ErrorClass::Invalid => 3,
            ErrorClass::Auth => 4,
            ErrorClass::NotFound => 5,
            ErrorClass::Unavailable => 6,
        };
        Failure {
            code,
            message: e.to_string(),
        }
    }
}

fn usage(message: impl Into<String>) -> Failure {
    Failure {
        code: 2,
        message: message.into(),
    }
}

fn main() -> ExitCode {
    // A reader that stops early (`oc ... | head`) ends `oc` quietly with status 141,
    // as SIGPIPE ends other tools, instead of a panic for its failed print. SIGPIPE
    // stays ignored: a socket the server closed is an error for the HTTP client.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("");
        // std's print, or clap_complete's write of a completion script.
        let print =
            message.starts_with("failed printing to std") || message.starts_with("failed to write");
        if print && (message.contains("Broken pipe") || message.contains("BrokenPipe")) {
            std::process::exit(141);
        }
        default_hook(info);
    }));
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("oc: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("oc: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

/// A client of `url`; `with_token` sends the bearer token (never to the ops
/// listener, which asks for none and is often plain HTTP).
fn client(cli: &Cli, url: &str, with_token: bool) -> Result<Client, Failure> {
    let mut builder = Client::builder(url);
    if let Some(token) = cli.token.as_ref().filter(|_| with_token) {
        // Checked here, not found out by the transport: an exit 2 naming the flag.
        if token.is_empty() || token.chars().any(|c| c.is_control() || !c.is_ascii()) {
            return Err(usage(
                "--token (or OC_TOKEN) must be the token's visible ASCII characters only \
                 (a newline or a control character cannot be sent in a header)",
            ));
        }
        builder = builder.token(token.clone());
    }
    if let Some(path) = &cli.ca_cert {
        let pem =
            std::fs::read(path).map_err(|e| usage(format!("--ca-cert {}: {e}", path.display())))?;
        builder = builder.ca_cert_pem(pem);
    }
    Ok(builder.build()?)
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let oc = client(&cli, &cli.url, true)?;
    let out = cli.output;
    match &cli.command {
        Command::Tenants(Tenants::List) => {
            let tenants = oc.list_tenants().await?;
            match out {
                Output::Json => print_json(&json!({ "tenants": tenants })),
                Output::Table => {
                    for t in tenants {
                        println!("{t}");
                    }
                }
            }
        }
        Command::Tenants(Tenants::Create { tenant }) => {
            let created = oc.create_tenant(tenant).await?;
            match out {
                Output::Json => print_json(
                    &json!({"tenant": created.tenant, "shard": created.shard, "lsn": created.lsn}),
                ),
                Output::Table => done(
                    out,
                    &[
                        ("tenant", json!(created.tenant)),
                        ("lsn", json!(created.lsn)),
                    ],
                ),
            }
        }
        Command::Tenants(Tenants::Drop { tenant }) => {
            let dropped = oc.drop_tenant(tenant).await?;
            done(
                out,
                &[
                    ("tenant", json!(tenant)),
                    ("dropped", json!(dropped.dropped)),
                    ("lsn", json!(dropped.lsn)),
                ],
            );
        }
        Command::Tables(Tables::List { tenant }) => {
            let tables = oc.list_tables(tenant).await?;
            let rows: Vec<Vec<Value>> = tables
                .iter()
                .map(|t| {
                    vec![
                        json!(t.schema.name),
                        json!(t.rows),
                        json!(t.bytes),
                        json!(t.vectors),
                        json!(t.schema.primary_key.join(",")),
                    ]
                })
                .collect();
            match out {
                Output::Json => print_json(&json!({ "tables": tables.iter().map(|t| json!({
                    "schema": t.schema, "rows": t.rows, "bytes": t.bytes, "vectors": t.vectors,
                })).collect::<Vec<_>>() })),
                Output::Table => {
                    print_table(&["table", "rows", "bytes", "vectors", "primary key"], &rows)
                }
            }
        }
        Command::Tables(Tables::Create { tenant, schema }) => {
            // Sent as given: the server names any field it does not know.
            let created = oc
                .create_table_json(tenant, &read_json_arg(schema)?)
                .await?;
            match out {
                Output::Json => print_json(&json!({"table": created.table, "lsn": created.lsn})),
                Output::Table => done(
                    out,
                    &[
                        ("table", json!(created.table.name)),
                        ("lsn", json!(created.lsn)),
                    ],
                ),
            }
        }
        Command::Tables(Tables::Describe { tenant, table }) => {
            let info = oc.describe_table(tenant, table).await?;
            match out {
                Output::Json => print_json(&json!({
                    "schema": info.schema, "rows": info.rows, "bytes": info.bytes, "vectors": info.vectors,
                })),
                Output::Table => {
                    let key = &info.schema.primary_key;
                    let rows: Vec<Vec<Value>> = info
                        .schema
                        .columns
                        .iter()
                        .map(|c| {
                            let position = key.iter().position(|k| *k == c.name);
                            vec![
                                json!(c.name),
                                json!(c.ty),
                                json!(if c.nullable { "yes" } else { "no" }),
                                position.map_or(Value::Null, |p| json!(p + 1)),
                            ]
                        })
                        .collect();
                    print_table(&["column", "type", "nullable", "key"], &rows);
                    for index in &info.schema.indexes {
                        println!("index {} ({})", index.name, index.columns.join(", "));
                    }
                    println!(
                        "{} rows, {} bytes, {} vectors",
                        info.rows, info.bytes, info.vectors
                    );
                }
            }
        }
        Command::Tables(Tables::Drop { tenant, table }) => {
            let dropped = oc.drop_table(tenant, table).await?;
            done(
                out,
                &[
                    ("table", json!(table)),
                    ("dropped", json!(dropped.dropped)),
                    ("lsn", json!(dropped.lsn)),
                ],
            );
        }
        Command::Keys(Keys::List { tenant }) => {
            let keys = oc.list_keys(tenant).await?;
            let rows: Vec<Vec<Value>> = keys
                .iter()
                .map(|k| vec![json!(k.key_id), json!(k.name), json!(k.created_us)])
                .collect();
            match out {
                Output::Json => print_json(&json!({ "keys": keys.iter().map(|k| json!({
                    "key_id": k.key_id, "name": k.name, "created_us": k.created_us,
                })).collect::<Vec<_>>() })),
                Output::Table => print_table(&["key id", "name", "created (µs)"], &rows),
            }
        }
        Command::Keys(Keys::Create { tenant, name }) => {
            let key = oc.create_key(tenant, name.as_deref()).await?;
            match out {
                Output::Json => print_json(&json!({
                    "tenant": key.tenant, "key_id": key.key_id, "name": key.name, "key": key.key, "lsn": key.lsn,
                })),
                Output::Table => {
                    println!("{}", key.key);
                    eprintln!(
                        "key {} of tenant {}: shown only now, store it",
                        key.key_id, key.tenant
                    );
                }
            }
        }
        Command::Keys(Keys::Revoke { tenant, key_id }) => {
            let revoked = oc.revoke_key(tenant, key_id).await?;
            done(
                out,
                &[
                    ("key_id", json!(revoked.key_id)),
                    ("revoked", json!(revoked.revoked)),
                    ("lsn", json!(revoked.lsn)),
                ],
            );
        }
        Command::Rows(Rows::Upsert {
            tenant,
            table,
            rows,
            idempotency_key,
        }) => {
            let mut batch = WriteBatch::default();
            for row in objects(read_json_arg(rows)?, "row")? {
                batch = batch.upsert(row);
            }
            write(&oc, out, tenant, table, batch, idempotency_key).await?;
        }
        Command::Rows(Rows::Delete {
            tenant,
            table,
            keys,
            idempotency_key,
        }) => {
            let mut batch = WriteBatch::default();
            for key in objects(read_json_arg(keys)?, "key")? {
                batch = batch.delete(key);
            }
            write(&oc, out, tenant, table, batch, idempotency_key).await?;
        }
        Command::Rows(Rows::Get {
            tenant,
            table,
            key,
            min_lsn,
        }) => {
            // Key parts go as text: the server reads each against its column's type.
            let parts: Vec<Value> = key.iter().map(|k| json!(k)).collect();
            let options = ReadOptions {
                min_lsn: *min_lsn,
                ..ReadOptions::default()
            };
            match oc.get_row_with(tenant, table, &parts, &options).await? {
                Some(found) => match out {
                    Output::Json => print_json(&json!({
                        "row": found.row, "applied_lsn": found.applied_lsn,
                    })),
                    Output::Table => {
                        let row = &found.row;
                        let names: Vec<&str> = row.keys().map(String::as_str).collect();
                        print_table(&names, &[row.values().cloned().collect()]);
                    }
                },
                None => {
                    return Err(Failure {
                        code: 5,
                        message: format!(
                            "404 row_not_found: table {table:?} has no row with that key"
                        ),
                    })
                }
            }
        }
        Command::Ask {
            tenant,
            sql,
            params,
            explain,
            min_lsn,
        } => {
            let params = params
                .iter()
                .map(|p| {
                    serde_json::from_str(p).map_err(|e| {
                        usage(format!(
                            "--param {p:?} is not JSON (quote text: '\"x\"'): {e}"
                        ))
                    })
                })
                .collect::<Result<Vec<Value>, Failure>>()?;
            let options = ReadOptions {
                min_lsn: *min_lsn,
                explain: *explain,
            };
            let answer = oc.ask_with(tenant, sql, &params, &options).await?;
            print_answer(out, &answer);
        }
        Command::Usage { tenant } => {
            let usage = oc.usage(tenant).await?;
            match out {
                Output::Json => print_json(&json!({
                    "tenant": usage.tenant, "shard": usage.shard, "rows": usage.rows, "bytes": usage.bytes,
                    "vectors": usage.vectors, "applied_lsn": usage.applied_lsn,
                    "in_flight_requests": usage.in_flight_requests, "watch_streams": usage.watch_streams,
                    "ask_memory_bytes": usage.ask_memory_bytes,
                    "quotas": {"rows": usage.quotas.rows, "bytes": usage.quotas.bytes, "vectors": usage.quotas.vectors},
                    "tables": usage.tables.iter().map(|(name, c)| (name.clone(), json!({"rows": c.rows, "bytes": c.bytes, "vectors": c.vectors}))).collect::<serde_json::Map<_, _>>(),
                })),
                Output::Table => {
                    let mut rows: Vec<Vec<Value>> = usage
                        .tables
                        .iter()
                        .map(|(name, c)| {
                            vec![json!(name), json!(c.rows), json!(c.bytes), json!(c.vectors)]
                        })
                        .collect();
                    rows.push(vec![
                        json!("(total)"),
                        json!(usage.rows),
                        json!(usage.bytes),
                        json!(usage.vectors),
                    ]);
                    rows.push(vec![
                        json!("(quota)"),
                        json!(usage.quotas.rows),
                        json!(usage.quotas.bytes),
                        json!(usage.quotas.vectors),
                    ]);
                    print_table(&["table", "rows", "bytes", "vectors"], &rows);
                    println!(
                        "tenant {} on shard {}, applied LSN {}, {} requests in flight, {} watch streams, \
                         {} bytes held by /ask queries and unread answers",
                        usage.tenant,
                        usage.shard,
                        usage.applied_lsn,
                        usage.in_flight_requests,
                        usage.watch_streams,
                        usage.ask_memory_bytes
                    );
                }
            }
        }
        Command::Watch {
            tenant,
            tables,
            last_event_id,
            from_lsn,
            limit,
            once,
        } => {
            let mut position = WatchOptions {
                tables: tables.clone(),
                from_lsn: *from_lsn,
                last_event_id: last_event_id.clone(),
                token: None,
            };
            let mut seen = 0;
            let mut pause = WATCH_FIRST_PAUSE;
            let mut connected = false;
            let stdout = std::io::stdout();
            loop {
                let ended = match oc.watch(tenant, &position).await {
                    Ok(mut stream) => {
                        connected = true;
                        let mut ended = None;
                        while limit.is_none_or(|l| seen < l) {
                            let event = match stream.next().await {
                                None => break,
                                // An event this client cannot read would be read again.
                                Some(Err(e @ Error::Decode(_))) => return Err(e.into()),
                                Some(Err(e)) if *once => return Err(e.into()),
                                Some(Err(e)) => {
                                    ended = Some(e.to_string());
                                    break;
                                }
                                Some(Ok(event)) => event,
                            };
                            pause = WATCH_FIRST_PAUSE;
                            let line =
                                json!({"event": event.event, "data": event.data, "id": event.id});
                            let mut lock = stdout.lock();
                            if writeln!(lock, "{line}")
                                .and_then(|()| lock.flush())
                                .is_err()
                            {
                                return Ok(()); // the reader went away (a closed pipe)
                            }
                            seen += 1;
                            match event.event.as_str() {
                                // The stream ends for good: nothing to resume.
                                "tenant_dropped" => return Ok(()),
                                "revoked" => {
                                    return Err(Failure {
                                        code: 4,
                                        message: format!(
                                            "the stream's API key was revoked: {}",
                                            event.data
                                        ),
                                    })
                                }
                                _ => {}
                            }
                        }
                        if let Some(id) = stream.last_event_id() {
                            position.last_event_id = Some(id.to_string());
                        }
                        ended.unwrap_or_else(|| "the server ended the stream".into())
                    }
                    // Resumed only once a stream was open: a server never reached (a
                    // wrong URL or port, a refused certificate) is an error to report.
                    Err(e)
                        if connected
                            && !once
                            && e.class() == ErrorClass::Unavailable
                            && !e.certificate_refused() =>
                    {
                        e.to_string()
                    }
                    Err(e) => return Err(e.into()),
                };
                if *once || limit.is_some_and(|l| seen >= l) {
                    return Ok(());
                }
                eprintln!(
                    "oc: watch: {ended}; resuming after {} in {} ms",
                    position
                        .last_event_id
                        .as_deref()
                        .unwrap_or("the start position"),
                    pause.as_millis()
                );
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(WATCH_MOST_PAUSE);
            }
        }
        Command::Audit {
            tenant,
            action,
            since,
            after,
            limit,
        } => {
            let page = oc
                .audit_logs(&AuditQuery {
                    since: since.clone(),
                    after: *after,
                    tenant: tenant.clone(),
                    action: action.clone(),
                    limit: *limit,
                })
                .await?;
            match out {
                Output::Json => print_json(
                    &json!({"entries": page.entries, "next_after": page.next_after, "problems": page.problems}),
                ),
                Output::Table => {
                    let rows: Vec<Vec<Value>> = page
                        .entries
                        .iter()
                        .map(|e| {
                            vec![
                                e["seq"].clone(),
                                e["time"].clone(),
                                e["actor"].clone(),
                                e["action"].clone(),
                                e["tenant"].clone(),
                                e["target"].clone(),
                                e["result"]["status"].clone(),
                            ]
                        })
                        .collect();
                    print_table(
                        &[
                            "seq", "time", "actor", "action", "tenant", "target", "status",
                        ],
                        &rows,
                    );
                    // The table has no room for it: where a next page would start, on
                    // stderr, when this one is full (a page without `--after` or
                    // `--since` is the newest entries: nothing comes after it).
                    let full = page.entries.len() >= limit.unwrap_or(100) as usize;
                    let paging = after.is_some() || since.is_some();
                    if let (Some(next), true) = (page.next_after, full && paging) {
                        eprintln!("next page: --after {next}");
                    }
                }
            }
        }
        Command::Status => {
            let ops = client(&cli, &cli.ops_url, false)?;
            let (code, health) = ops.get_json("/health").await?;
            // The ops listener answers /health with a status, 200 or 503; anything else
            // (the data API's 404) means the URL is not an ops listener.
            if !matches!(code, 200 | 503) || !health["status"].is_string() {
                return Err(usage(format!(
                    "{} answered {code} to GET /health: it is not an ops listener; give \
                     --ops-url (or OC_OPS_URL) the server's --ops-listen address",
                    cli.ops_url
                )));
            }
            let (_, ready) = ops.get_json("/ready").await?;
            let is_ready = ready["ready"] == json!(true);
            match out {
                Output::Json => print_json(&json!({"health": health, "ready": ready})),
                Output::Table => {
                    println!(
                        "{} {} (commit {}), phase {}, {} shards, up {:.0} s",
                        health["status"].as_str().unwrap_or("?"),
                        health["version"].as_str().unwrap_or("?"),
                        health["git_commit"].as_str().unwrap_or("?"),
                        health["phase"].as_str().unwrap_or("?"),
                        health["shards"],
                        health["uptime_s"].as_f64().unwrap_or(0.0)
                    );
                    if is_ready {
                        let rows: Vec<Vec<Value>> = ready["shards"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|s| vec![s["shard"].clone(), s["applied_lsn"].clone()])
                            .collect();
                        print_table(&["shard", "applied LSN"], &rows);
                    } else {
                        for reason in ready["reasons"].as_array().into_iter().flatten() {
                            println!("not ready: {}", reason.as_str().unwrap_or_default());
                        }
                    }
                }
            }
            if !is_ready || health["status"] != json!("ok") {
                return Err(Failure {
                    code: 6,
                    message: "the server is not ready".into(),
                });
            }
        }
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "oc", &mut std::io::stdout());
        }
    }
    Ok(())
}

async fn write(
    oc: &Client,
    out: Output,
    tenant: &str,
    table: &str,
    mut batch: WriteBatch,
    idempotency_key: &Option<String>,
) -> Result<(), Failure> {
    if let Some(key) = idempotency_key {
        batch = batch.idempotency_key(key.clone());
    }
    let outcome = oc.write_rows(tenant, table, batch).await?;
    done(
        out,
        &[
            ("inserted", json!(outcome.inserted)),
            ("updated", json!(outcome.updated)),
            ("deleted", json!(outcome.deleted)),
            ("missing", json!(outcome.missing)),
            ("lsn", json!(outcome.lsn)),
        ],
    );
    Ok(())
}

/// A JSON argument, or stdin for `-`.
fn read_json_arg(arg: &str) -> Result<Value, Failure> {
    let text = if arg == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| usage(format!("cannot read stdin: {e}")))?;
        text
    } else {
        arg.to_string()
    };
    serde_json::from_str(&text).map_err(|e| {
        let file = arg.strip_prefix('@').unwrap_or(arg);
        let hint = if arg != "-" && std::path::Path::new(file).is_file() {
            format!(
                " ({arg:?} names a file: the argument is the JSON text itself; pass - and the \
                 file on stdin: - < '{}')",
                file.replace('\'', "'\\''")
            )
        } else if arg == "-" {
            String::new()
        } else {
            " (the argument is the JSON text itself, or - to read it from stdin)".to_string()
        };
        usage(format!("not JSON: {e}{hint}"))
    })
}

/// One object, or an array of objects.
fn objects(value: Value, what: &str) -> Result<Vec<serde_json::Map<String, Value>>, Failure> {
    let items = match value {
        Value::Array(items) => items,
        one => vec![one],
    };
    items
        .into_iter()
        .map(|item| match item {
            Value::Object(map) => Ok(map),
            other => Err(usage(format!("each {what} is a JSON object, not {other}"))),
        })
        .collect()
}
