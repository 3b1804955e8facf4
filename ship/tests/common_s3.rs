//! A real S3-compatible server for tests: `moto_server` on a free loopback port, with a
//! bucket made for the test. CI installs moto (`.ci/run`); on a developer machine
//! without it the S3 tests are skipped with a loud message, never in CI (`CI` set).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Moto {
    child: Child,
    pub endpoint: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn raw_http(addr: &str, request: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(request.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

impl Moto {
    /// Starts moto, or returns `None` (after saying so) when it is not installed and
    /// this is not CI.
    pub fn start() -> Option<Moto> {
        let bin = std::env::var("OC_MOTO_SERVER").unwrap_or_else(|_| "moto_server".into());
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let spawned = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(e) if std::env::var_os("CI").is_none() => {
                eprintln!(
                    "!!! {bin} could not start ({e}): the S3 tests are SKIPPED (CI installs moto)"
                );
                return None;
            }
            Err(e) => panic!("starting {bin}: {e}"),
        };
        let addr = format!("127.0.0.1:{port}");
        let moto = Moto {
            child,
            endpoint: format!("http://{addr}"),
        };
        let started = Instant::now();
        while TcpStream::connect(&addr).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "moto did not listen on {addr}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(moto)
    }

    /// Creates `bucket` (path style, unsigned: moto does not check signatures).
    pub fn create_bucket(&self, bucket: &str) {
        let addr = self.endpoint.trim_start_matches("http://");
        let response = raw_http(
            addr,
            &format!("PUT /{bucket} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
        )
        .expect("create bucket");
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    }

    /// Stores raw bytes (no envelope) under `bucket/key`, as a damaged object would be.
    pub fn put_raw(&self, bucket: &str, key: &str, body: &[u8]) {
        let addr = self.endpoint.trim_start_matches("http://");
        let head = format!(
            "PUT /{bucket}/{key} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let mut request = head.into_bytes();
        request.extend_from_slice(body);
        let response = raw_http(addr, &String::from_utf8_lossy(&request)).expect("raw put");
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    }

    /// The archive URI of `bucket/prefix` on this server.
    pub fn uri(&self, bucket: &str, prefix: &str) -> String {
        format!(
            "s3://{bucket}/{prefix}?endpoint={}&path_style=true&region=us-east-1",
            self.endpoint
        )
    }

    /// Credentials moto accepts, for child processes.
    pub const ENV: [(&'static str, &'static str); 2] = [
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
    ];
}
