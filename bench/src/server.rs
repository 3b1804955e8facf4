//! Starting the `oc-server` binary that sits next to `oc-bench` (same build), for
//! `oc-bench all`'s HTTP phase, and learning its addresses as the integration tests do
//! (`oc_net::announce`).

use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context, Result};

pub struct Spawned {
    child: Child,
    pub url: String,
    /// The ops listener (`/metrics`).
    pub ops_url: String,
}

impl Spawned {
    /// Starts `oc-server` on a kernel-chosen loopback port on `data_dir` as it is, or
    /// returns `None` when no `oc-server` binary sits next to this one.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Result<Option<Spawned>> {
        let exe = std::env::current_exe().context("locating oc-bench")?;
        let server = exe.with_file_name("oc-server");
        if !server.exists() {
            return Ok(None);
        }
        let mut command = Command::new(&server);
        command
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", "127.0.0.1:0", "--ops-listen", "127.0.0.1:0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        crate::pinning::pin_server(&mut command)?;
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {}", server.display()))?;
        // The tests start it the same way (`oc_net::announce`).
        match oc_net::announce::wait_for(&mut child, std::time::Duration::from_secs(60)) {
            Ok(endpoints) => Ok(Some(Spawned {
                child,
                url: endpoints.api,
                ops_url: endpoints.ops,
            })),
            Err(why) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("oc-server did not start: {why}")
            }
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: the machine is lost, as far as the server can tell.
    pub fn kill9(mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// SIGTERM and wait: the server drains and exits 0.
    pub fn stop(mut self) -> Result<()> {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait()?;
        if !status.success() {
            bail!("oc-server exited with {status} on SIGTERM");
        }
        Ok(())
    }
}
