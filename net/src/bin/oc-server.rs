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
    /// O_DIRECT, the data disk's fdatasync latency, the memlock and open-files limits,
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
    // First: a panic on any thread from here on ends the process (fail-stop).
    oc_io::fail_stop::install_panic_hook(
        "oc-server",
        oc_net::server::line_format(&args.config.log_format),
    );
    init_logging(&args.config.log_format);
    oc_net::run(args.config)?;
    Ok(ExitCode::SUCCESS)
}

/// `oc-server promote`: one request to the follower's ops listener, its steps printed.
fn promote(
    addr: &str,
    force: bool,
    token_file: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    let token = match token_file {
        Some(path) => Some(std::fs::read_to_string(path)?.trim().to_string()),
        None => std::env::var("OC_ADMIN_TOKEN").ok(),
    };
    let url = format!(
        "http://{addr}/v1/admin/promote{}",
        if force { "?force=true" } else { "" }
    );
    println!(
        "promoting the follower at {addr}{}",
        if force { " (force)" } else { "" }
    );
    let mut request = ureq::post(&url).timeout(std::time::Duration::from_secs(120));
    if let Some(token) = &token {
        request = request.set("Authorization", &format!("Bearer {token}"));
    }
    let (ok, body) = match request.call() {
        Ok(response) => (true, response.into_string()?),
        Err(ureq::Error::Status(_, response)) => (false, response.into_string()?),
        Err(e) => anyhow::bail!("asking {url}: {e}"),
    };
    let answer: serde_json::Value = serde_json::from_str(&body)?;
    if !ok {
        eprintln!(
            "refused ({}): {}",
            answer["error"]["code"].as_str().unwrap_or("?"),
            answer["error"]["message"].as_str().unwrap_or(&body)
        );
        return Ok(ExitCode::FAILURE);
    }
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
    Ok(ExitCode::SUCCESS)
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
