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
        config: ServerConfig,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

fn main() -> anyhow::Result<ExitCode> {
    let args = Args::parse();
    if let Some(Command::Check { config, output }) = args.command {
        let checks = oc_net::preflight::run(&config);
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
