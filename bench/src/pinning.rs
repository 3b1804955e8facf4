//! `--server-cpus` and `--client-cpus`: which CPUs the `oc-server` processes oc-bench
//! starts may use, and which oc-bench itself (the load generator, and every thread it
//! starts) runs on. Disjoint lists tell generator noise from server tails apart. A
//! server pinned to N CPUs takes N shards (its default: one per CPU it may use). Both
//! are recorded in every result.

use std::sync::OnceLock;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// The CPU lists a run was given (`None`: not pinned).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Pinning {
    #[serde(default)]
    pub server_cpus: Option<String>,
    #[serde(default)]
    pub client_cpus: Option<String>,
}

static PINNING: OnceLock<Pinning> = OnceLock::new();

/// Pins this process's main thread (so every thread started later) to `client_cpus`
/// and remembers both lists for the servers started and the results written.
pub fn apply(pinning: Pinning) -> Result<()> {
    if let Some(list) = &pinning.client_cpus {
        set_affinity(&cpus("--client-cpus", list)?, "--client-cpus", list)?;
    }
    if let Some(list) = &pinning.server_cpus {
        cpus("--server-cpus", list)?;
    }
    let _ = PINNING.set(pinning);
    Ok(())
}

/// The lists this run was given.
pub fn current() -> Pinning {
    PINNING.get().cloned().unwrap_or_default()
}

/// Has a child process (an `oc-server` about to be started) run on `--server-cpus`.
pub fn pin_server(command: &mut std::process::Command) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let Some(list) = current().server_cpus else {
        return Ok(());
    };
    let set = cpu_set(&cpus("--server-cpus", &list)?);
    // SAFETY: between fork and exec the closure only calls sched_setaffinity, which is
    // async-signal-safe, on a set built before the fork.
    unsafe {
        command.pre_exec(move || {
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// The CPUs of a list like `1`, `0,2` or `2-3`.
pub fn cpus(flag: &str, list: &str) -> Result<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in list.split(',') {
        let range = match part.split_once('-') {
            Some((a, b)) => a.trim().parse::<usize>().ok().zip(b.trim().parse().ok()),
            None => part.trim().parse::<usize>().ok().map(|one| (one, one)),
        };
        match range {
            Some((first, last)) if first <= last && last < libc::CPU_SETSIZE as usize => {
                cpus.extend(first..=last)
            }
            _ => bail!("{flag} {list:?}: {part:?} is not a CPU or a range like 2-3"),
        }
    }
    Ok(cpus)
}

fn cpu_set(cpus: &[usize]) -> libc::cpu_set_t {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET writes inside it (`cpus`
    // checked every CPU is under CPU_SETSIZE).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &cpu in cpus {
            libc::CPU_SET(cpu, &mut set);
        }
        set
    }
}

/// Pins the calling thread (only it) to `cpu`.
pub fn pin_this_thread(cpu: usize) -> Result<()> {
    set_affinity(&[cpu], "pinning a writer", &cpu.to_string())
}

fn set_affinity(cpus: &[usize], flag: &str, list: &str) -> Result<()> {
    let set = cpu_set(cpus);
    // SAFETY: sched_setaffinity reads the set for the calling thread.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        bail!("{flag} {list:?}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_read_as_the_kernel_writes_them() {
        assert_eq!(cpus("--x", "1").expect("one"), vec![1]);
        assert_eq!(cpus("--x", "0,2-3").expect("list"), vec![0, 2, 3]);
        for bad in ["", "3-1", "a", "1-", "99999"] {
            assert!(cpus("--x", bad).is_err(), "{bad:?}");
        }
    }
}
