//! The lines `oc-server` prints on stdout once it serves, and the one reader of them
//! that scripts' counterparts use: the integration tests and `oc-bench` start the
//! binary on kernel-chosen ports and learn its addresses here.
//!
//! ```text
//! oc-server: api listening on 127.0.0.1:41017 (http)
//! oc-server: ops listening on 127.0.0.1:38291
//! ```

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::Child;
use std::sync::mpsc;
use std::time::Duration;

const API: &str = "oc-server: api listening on ";
const OPS: &str = "oc-server: ops listening on ";
const REPLICATION: &str = "oc-server: replication listening on ";

/// Prints the lines, the replication listener's (when there is one) first, the ops
/// listener's last (write errors are ignored: a script that closed stdout must not
/// stop the server).
pub fn print(api: SocketAddr, tls: bool, ops: SocketAddr, replication: Option<SocketAddr>) {
    let scheme = if tls { "https" } else { "http" };
    let mut stdout = std::io::stdout().lock();
    if let Some(addr) = replication {
        let _ = writeln!(stdout, "{REPLICATION}{addr}");
    }
    let _ = writeln!(stdout, "{API}{api} ({scheme})");
    let _ = writeln!(stdout, "{OPS}{ops}");
    let _ = stdout.flush();
}

/// Where a started server serves: the data API's base URL (`http://` or `https://`)
/// and the ops listener's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    pub api: String,
    pub ops: String,
    /// The replication listener, `host:port`, when the server has one.
    pub replication: Option<String>,
}

/// Reads a child `oc-server`'s piped stdout until it has announced both listeners;
/// a thread keeps draining it afterwards, so the server never writes into a closed
/// pipe. An error when the server exits or stays silent for `within`.
pub fn wait_for(child: &mut Child, within: Duration) -> Result<Endpoints, String> {
    let stdout = child
        .stdout
        .take()
        .ok_or("the server's stdout is not piped")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let (mut api, mut ops, mut replication) = (None, None, None);
    while api.is_none() || ops.is_none() {
        match rx.recv_timeout(within) {
            Ok(line) => {
                if let Some(rest) = line.strip_prefix(API) {
                    let (addr, scheme) = rest.split_once(' ').unwrap_or((rest, "(http)"));
                    let scheme = scheme.trim_matches(|c| c == '(' || c == ')');
                    api = Some(format!("{scheme}://{addr}"));
                } else if let Some(addr) = line.strip_prefix(OPS) {
                    ops = Some(format!("http://{addr}"));
                } else if let Some(addr) = line.strip_prefix(REPLICATION) {
                    replication = Some(addr.to_string());
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(format!("the server announced nothing for {within:?}"));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.wait().map_err(|e| e.to_string())?;
                return Err(format!("the server exited ({status}) before serving"));
            }
        }
    }
    Ok(Endpoints {
        api: api.unwrap_or_default(),
        ops: ops.unwrap_or_default(),
        replication,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    fn child_printing(script: &str) -> Child {
        Command::new("sh")
            .args(["-c", script])
            .stdout(Stdio::piped())
            .spawn()
            .expect("sh runs")
    }

    #[test]
    fn both_listeners_are_read_with_the_api_scheme() {
        let mut child = child_printing(&format!(
            "echo 'starting'; echo '{API}127.0.0.1:4000 (https)'; echo '{OPS}127.0.0.1:4001'; sleep 0.2"
        ));
        let endpoints = wait_for(&mut child, Duration::from_secs(10)).expect("announced");
        assert_eq!(
            endpoints,
            Endpoints {
                api: "https://127.0.0.1:4000".into(),
                ops: "http://127.0.0.1:4001".into(),
                replication: None,
            }
        );
        child.wait().expect("exits");
    }

    #[test]
    fn a_server_that_exits_first_is_an_error_naming_its_status() {
        let mut child = child_printing(&format!("echo '{API}127.0.0.1:4000 (http)'; exit 3"));
        let err = wait_for(&mut child, Duration::from_secs(10)).expect_err("no ops line");
        assert!(err.contains("exited") && err.contains('3'), "{err}");
    }
}
