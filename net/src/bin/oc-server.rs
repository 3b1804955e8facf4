//! `oc-server`: parses flags and calls library code.

use clap::Parser;
use oc_net::ServerConfig;

#[derive(Parser)]
#[command(name = "oc-server", version, about = "The oc storage engine server")]
struct Args {
    #[command(flatten)]
    config: ServerConfig,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // First: a panic on any thread from here on ends the process (fail-stop).
    oc_io::fail_stop::install_panic_hook(
        "oc-server",
        oc_net::server::line_format(&args.config.log_format),
    );
    init_logging(&args.config.log_format);
    oc_net::run(args.config)
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
