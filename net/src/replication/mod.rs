//! Replication: a writer streams every shard's durable log frames to its followers;
//! a follower makes them durable in its own log with the writer's LSNs, epochs and
//! commit times (`Wal::submit_stamped`), applies them with the same `apply`, acknowledges
//! what it holds, and serves reads of its applied state. Both ends run on the control
//! executor and reach the shards through the mesh, so no shard ever blocks on a peer.
//!
//! The protocol's bytes are in `wire.rs` (FORMAT.md §11), the writer's side in
//! `sender.rs`, the follower's in `receiver.rs`, the acknowledgement gate
//! (synchronous replication, the lease) in `gate.rs`, and promotion in `node.rs`.

use std::cell::RefCell;
use std::time::{Duration, Instant};

use oc_io::Lsn;

pub mod bootstrap;
pub mod gate;
pub mod node;
pub mod receiver;
pub mod sender;
pub mod wire;

/// How often a writer with nothing new tells a follower its durable LSN.
pub const HEARTBEAT_EVERY: Duration = Duration::from_millis(500);
/// A follower that hears nothing for this long reconnects.
pub const SILENCE_LIMIT: Duration = Duration::from_secs(5);

/// How a follower speaks TLS to its writer's replication listener (`--leader-ca`).
#[derive(Debug, Clone)]
pub struct LeaderTls {
    pub config: std::sync::Arc<futures_rustls::rustls::ClientConfig>,
    /// The name the writer's certificate must carry (`--leader-addr`'s host).
    pub name: rustls_pki_types::ServerName<'static>,
}

/// The first byte of a TLS connection (a handshake record): a listener that speaks TLS
/// tells a follower speaking plain TCP why it refuses, and the other way round.
pub const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// What this server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Writer,
    /// Follows the writer whose replication listener is at `leader`.
    Follower {
        leader: String,
    },
}

/// A follower's stream of one shard, as its writer knows it.
#[derive(Debug, Clone, Copy)]
pub struct FollowerAck {
    /// The connection: only the newest of a follower's counts.
    pub conn: u64,
    /// What it acknowledged last on it.
    pub durable: Lsn,
    pub applied: Lsn,
}

/// One shard's replication link, as the metrics and `/ready` see it.
#[derive(Debug, Clone, Default)]
pub struct ShardLink {
    /// Follower: connected to the writer now. Writer: follower streams open now.
    pub connected: u32,
    /// Follower: the writer's durable LSN as last heard. Writer: its own, as last sent.
    pub writer_durable: Lsn,
    /// Follower: what this server holds durable and has applied. Writer: what the
    /// furthest behind of the connected followers holds.
    pub durable: Lsn,
    pub applied: Lsn,
    /// Follower: when it last had everything the writer had told it of.
    pub caught_up_at: Option<Instant>,
    /// Frames and bytes of frames received (follower) or sent (writer).
    pub frames: u64,
    pub bytes: u64,
    /// Follower: connections that ended and were made again.
    pub reconnects: u64,
    /// Follower: why the last connection ended, if it did.
    pub last_error: Option<String>,
    /// Writer: where the shard's acknowledgement gate was last moved to.
    pub gate_at: Lsn,
}

impl ShardLink {
    /// How many frames the writer has that the follower has not applied.
    pub fn applied_lag_lsn(&self) -> u64 {
        self.writer_durable.0.saturating_sub(self.applied.0)
    }
}

/// Whether the data API takes writes: a follower's refuses them (`421 not_leader`,
/// naming its writer) until it is promoted. Shared by every shard's listener.
#[derive(Debug)]
pub struct ApiRole {
    follower: std::sync::atomic::AtomicBool,
    /// The writer's replication address, as this follower was started with.
    pub leader: String,
    /// Per shard: whether the writer took this follower's position since it started
    /// (its log is on the writer's history, cut back to it if it was not). Until then
    /// the log may hold frames of a writer that was failed over from, which the new
    /// writer never acknowledged under those LSNs.
    on_history: Vec<std::sync::atomic::AtomicBool>,
}

impl ApiRole {
    pub fn follower(leader: String, shards: usize) -> ApiRole {
        ApiRole {
            follower: std::sync::atomic::AtomicBool::new(true),
            leader,
            on_history: (0..shards)
                .map(|_| std::sync::atomic::AtomicBool::new(false))
                .collect(),
        }
    }

    pub fn is_follower(&self) -> bool {
        self.follower.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Promotion: writes are taken from now on.
    pub fn become_writer(&self) {
        self.follower
            .store(false, std::sync::atomic::Ordering::Release);
    }

    /// The writer took `shard`'s position: its log is on the writer's history.
    pub fn confirm_history(&self, shard: usize) {
        if let Some(flag) = self.on_history.get(shard) {
            flag.store(true, std::sync::atomic::Ordering::Release);
        }
    }

    /// Whether an LSN on `shard` means here what it means on the writer: always on a
    /// writer, on a follower once [`ApiRole::confirm_history`] said so.
    pub fn lsns_are_the_writers(&self, shard: usize) -> bool {
        !self.is_follower()
            || self
                .on_history
                .get(shard)
                .is_some_and(|f| f.load(std::sync::atomic::Ordering::Acquire))
    }
}

/// Every shard's link, shared by the replication tasks and the ops endpoints (all on
/// the control executor).
#[derive(Debug)]
pub struct ReplicationStatus {
    pub role: RefCell<Role>,
    pub links: Vec<RefCell<ShardLink>>,
    /// Writer: per shard, each follower's (by its data directory id) current
    /// connection and what it acknowledged last on it, from which the synchronous
    /// gate's position is read.
    pub acks: Vec<RefCell<std::collections::BTreeMap<String, FollowerAck>>>,
    /// Follower: how many followers the writer said must confirm each write (its last
    /// heartbeat; 0: it may acknowledge without them).
    pub writer_confirmed_by: std::cell::Cell<u16>,
}

impl ReplicationStatus {
    pub fn new(role: Role, shards: usize) -> ReplicationStatus {
        ReplicationStatus {
            role: RefCell::new(role),
            links: (0..shards)
                .map(|_| RefCell::new(ShardLink::default()))
                .collect(),
            acks: (0..shards).map(|_| RefCell::default()).collect(),
            writer_confirmed_by: std::cell::Cell::new(0),
        }
    }

    /// Writer: the followers with a stream open on any shard.
    pub fn followers(&self) -> std::collections::BTreeSet<String> {
        self.acks
            .iter()
            .flat_map(|acks| acks.borrow().keys().cloned().collect::<Vec<_>>())
            .collect()
    }

    /// Writer: the link's figures from the connected followers' acknowledgements (the
    /// furthest behind counts: its lag is the one to alert on); kept as they were when
    /// none is connected.
    pub fn settle_link(&self, shard: usize) {
        let acks = self.acks[shard].borrow();
        let durable = acks.values().map(|ack| ack.durable).min();
        let applied = acks.values().map(|ack| ack.applied).min();
        if let (Some(durable), Some(applied)) = (durable, applied) {
            let mut link = self.links[shard].borrow_mut();
            link.durable = durable;
            link.applied = applied;
        }
    }

    /// The LSN `replicas` follower streams of `shard` all hold durable (the
    /// `replicas`-th highest acknowledgement), if that many are open.
    pub fn held_by(&self, shard: usize, replicas: usize) -> Option<Lsn> {
        let acks = self.acks[shard].borrow();
        let mut held: Vec<Lsn> = acks.values().map(|ack| ack.durable).collect();
        held.sort_unstable_by(|a, b| b.cmp(a));
        held.get(replicas.checked_sub(1)?).copied()
    }

    pub fn is_follower(&self) -> bool {
        matches!(*self.role.borrow(), Role::Follower { .. })
    }

    /// Every link, copied (for a scrape).
    pub fn snapshot(&self) -> ReplicationMetrics {
        ReplicationMetrics {
            follower: self.is_follower(),
            links: self.links.iter().map(|l| l.borrow().clone()).collect(),
        }
    }

    /// Why a follower is not ready (not connected, or further behind than
    /// `max_lag_lsn`), shard by shard; empty when it is, and always for a writer.
    pub fn follower_not_ready(&self, max_lag_lsn: u64) -> Vec<String> {
        if !self.is_follower() {
            return Vec::new();
        }
        let mut reasons = Vec::new();
        for (shard, link) in self.links.iter().enumerate() {
            let link = link.borrow();
            if link.connected == 0 {
                reasons.push(format!(
                    "shard {shard}: not connected to the writer{}",
                    link.last_error
                        .as_ref()
                        .map(|e| format!(" ({e})"))
                        .unwrap_or_default()
                ));
            } else if link.applied_lag_lsn() > max_lag_lsn {
                reasons.push(format!(
                    "shard {shard}: {} frames behind the writer (the bound is {max_lag_lsn})",
                    link.applied_lag_lsn()
                ));
            }
        }
        reasons
    }
}

/// A scrape's copy of the links.
#[derive(Debug, Clone, Default)]
pub struct ReplicationMetrics {
    pub follower: bool,
    pub links: Vec<ShardLink>,
}

/// The token a replication peer proves, compared in constant time.
pub fn token_matches(expected: Option<&str>, presented: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    match expected {
        None => true,
        Some(expected) => expected.as_bytes().ct_eq(presented).into(),
    }
}
