//! `oc-server`: parses flags and calls library code.

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use oc_net::ServerConfig;

#[derive(Parser)]
#[command(
    name = "oc-server",
    version = oc_net::server::VERSION_LINE,
    about = "The oc storage engine server",
    args_conflicts_with_subcommands = true
)]
struct Args {
    #[command(flatten)]
    config: ServerConfig,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Preflight: checks the kernel and io_uring, the data directory's file system and
    /// O_DIRECT, the data disk's durable-write latency, the memlock and open-files limits,
    /// and the archive, each with its fix. Takes the flags the server would run with.
    /// Exits 1 when a check fails.
    Check {
        #[command(flatten)]
        config: Box<ServerConfig>,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Promotes a running follower to writer in place: asks its ops listener
    /// (`POST /v1/admin/promote`) and prints each step it took. Exits 1 when refused.
    Promote {
        /// The follower's ops address (`--ops-listen`), `host:port`.
        #[arg(long)]
        addr: String,
        /// Promote even when the follower is behind, or without waiting for an
        /// asynchronous writer's lease to lapse: only when the old writer is known to
        /// be stopped (RUNBOOK.md).
        #[arg(long)]
        force: bool,
        /// File holding the admin token (or set OC_ADMIN_TOKEN).
        #[arg(long, env = "OC_ADMIN_TOKEN_FILE")]
        admin_token_file: Option<std::path::PathBuf>,
    },
    /// Planned switchover: the writer stops taking writes, the follower catches up
    /// and is promoted, each step printed with its time. Called off (the writer takes
    /// writes again) when the follower does not catch up. Exits 1 when it fails.
    Switchover {
        /// The writer's ops address, `host:port`.
        #[arg(long)]
        from: String,
        /// The follower's ops address, `host:port`.
        #[arg(long)]
        to: String,
        /// File holding the admin token of both (or set OC_ADMIN_TOKEN).
        #[arg(long, env = "OC_ADMIN_TOKEN_FILE")]
        admin_token_file: Option<std::path::PathBuf>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

fn main() -> anyhow::Result<ExitCode> {
    let args = Args::parse();
    if let Some(Command::Promote {
        addr,
        force,
        admin_token_file,
    }) = &args.command
    {
        return promote(addr, *force, admin_token_file.as_deref());
    }
    if let Some(Command::Switchover {
        from,
        to,
        admin_token_file,
    }) = &args.command
    {
        return switchover(from, to, admin_token_file.as_deref());
    }
    if let Some(Command::Check { config, output }) = args.command {
        let checks = oc_net::preflight::run(config.as_ref());
        let passed = checks.iter().all(|c| c.verdict != "fail");
        if output == Output::Json {
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({"ok": passed, "checks": checks}))?
            );
        } else {
            oc_net::preflight::print_text(&checks, &mut std::io::stdout().lock())?;
        }
        return Ok(if passed {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    // Before any thread starts (the serving path only: the subcommands above are
    // one-shot clients).
    if let Err(why) = oc_io::malloc_tuning::reexec_with_larger_thread_cache() {
        eprintln!("oc-server: {why}");
    }
    // First: a panic on any thread from here on ends the process (fail-stop).
    oc_io::fail_stop::install_panic_hook(
        "oc-server",
        oc_net::server::line_format(&args.config.log_format),
    );
    init_logging(&args.config.log_format);
    oc_net::run(args.config)?;
    Ok(ExitCode::SUCCESS)
}

fn admin_token(token_file: Option<&std::path::Path>) -> anyhow::Result<Option<String>> {
    Ok(match token_file {
        Some(path) => Some(std::fs::read_to_string(path)?.trim().to_string()),
        None => std::env::var("OC_ADMIN_TOKEN").ok(),
    })
}

/// One request to an ops listener: its JSON answer, or the refusal's code and message.
fn ops_call(
    method: &str,
    url: &str,
    token: Option<&str>,
) -> anyhow::Result<Result<serde_json::Value, String>> {
    let (ok, answer) = ops_answer(method, url, token)?;
    Ok(if ok {
        Ok(answer)
    } else {
        Err(format!(
            "{}: {}",
            answer["error"]["code"].as_str().unwrap_or("refused"),
            answer["error"]["message"]
                .as_str()
                .map_or_else(|| answer.to_string(), str::to_string)
        ))
    })
}

/// One request to an ops listener: whether it succeeded, and its JSON body either way.
fn ops_answer(
    method: &str,
    url: &str,
    token: Option<&str>,
) -> anyhow::Result<(bool, serde_json::Value)> {
    let mut request = ureq::request(method, url).timeout(std::time::Duration::from_secs(120));
    if let Some(token) = token {
        request = request.set("Authorization", &format!("Bearer {token}"));
    }
    let (ok, body) = match request.call() {
        Ok(response) => (true, response.into_string()?),
        Err(ureq::Error::Status(_, response)) => (false, response.into_string()?),
        Err(e) => anyhow::bail!("asking {url}: {e}"),
    };
    Ok((ok, serde_json::from_str(&body)?))
}

/// `oc-server promote`: one request to the follower's ops listener, its steps printed.
fn promote(
    addr: &str,
    force: bool,
    token_file: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    let token = admin_token(token_file)?;
    let url = format!(
        "http://{addr}/v1/admin/promote{}",
        if force { "?force=true" } else { "" }
    );
    println!(
        "promoting the follower at {addr}{}",
        if force { " (force)" } else { "" }
    );
    let answer = match ops_call("POST", &url, token.as_deref())? {
        Ok(answer) => answer,
        Err(why) => {
            eprintln!("refused ({why})");
            return Ok(ExitCode::FAILURE);
        }
    };
    print_promotion(&answer);
    Ok(ExitCode::SUCCESS)
}

fn print_promotion(answer: &serde_json::Value) {
    for step in answer["steps"].as_array().into_iter().flatten() {
        println!(
            "  {:>6} ms  {}",
            step["ms"].as_u64().unwrap_or(0),
            step["step"].as_str().unwrap_or("")
        );
    }
    println!(
        "promoted: epoch {}, lease epoch {}, in {} ms; point clients at this server now",
        answer["epoch"], answer["lease_epoch"], answer["took_ms"]
    );
}

/// `oc-server switchover`: step-down on the writer, wait for the follower to hold
/// every shard's log to its end, promote it with force (the writer acknowledges
/// nothing more), or call the step-down off.
fn switchover(
    from: &str,
    to: &str,
    token_file: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    let token = admin_token(token_file)?;
    let token = token.as_deref();
    let started = std::time::Instant::now();
    let at = || format!("{:>6} ms", started.elapsed().as_millis());
    match ops_call("GET", &format!("http://{to}/ready"), None)? {
        Ok(ready) if ready["role"] == "follower" => {
            println!("{}  the follower at {to} is ready", at())
        }
        Ok(ready) => {
            eprintln!("{to} is not a follower: {ready}");
            return Ok(ExitCode::FAILURE);
        }
        Err(why) => {
            eprintln!("the follower at {to} is not ready, nothing changed: {why}");
            return Ok(ExitCode::FAILURE);
        }
    }
    let stepped = match ops_call("POST", &format!("http://{from}/v1/admin/step-down"), token)? {
        Ok(answer) => answer,
        Err(why) => {
            eprintln!("the writer at {from} did not step down (it takes writes as before): {why}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let last: Vec<u64> = stepped["last_lsn"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(serde_json::Value::as_u64)
        .collect();
    println!(
        "{}  the writer at {from} stepped down: writes refused, its logs end at {last:?}",
        at()
    );
    let cancel = |why: String| -> anyhow::Result<ExitCode> {
        eprintln!("{why}; calling the switchover off");
        match ops_call(
            "POST",
            &format!("http://{from}/v1/admin/step-down?cancel=true"),
            token,
        )? {
            Ok(_) => eprintln!("the writer at {from} takes writes again"),
            Err(e) => eprintln!("the writer at {from} did not take writes back: {e} (RUNBOOK.md)"),
        }
        Ok(ExitCode::FAILURE)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        // A follower that is not ready (lagging) still says how far each shard is.
        let (_, ready) = ops_answer("GET", &format!("http://{to}/ready"), None)?;
        let applied: Vec<u64> = ready["shards"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s["applied_lsn"].as_u64())
            .collect();
        if applied.len() == last.len() && applied.iter().zip(&last).all(|(a, l)| a >= l) {
            break;
        }
        if std::time::Instant::now() >= deadline {
            return cancel(format!(
                "the follower at {to} applied {applied:?}, not {last:?}, within 5 s"
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    println!("{}  the follower holds and applied every write", at());
    match ops_call(
        "POST",
        &format!("http://{to}/v1/admin/promote?force=true"),
        token,
    )? {
        Ok(answer) => {
            print_promotion(&answer);
            println!("{}  switched over", at());
            Ok(ExitCode::SUCCESS)
        }
        Err(why) => cancel(format!("the follower at {to} refused the promotion: {why}")),
    }
}

/// Logs to stderr; `RUST_LOG` filters (default `info`).
fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour codes only for a person at a terminal: in a file or a journal they are
    // noise that breaks grep.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
