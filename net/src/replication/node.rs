//! This server's side of replication, on the control executor: the writer's listener
//! or the follower's per-shard streams, and a follower's promotion in place.
//!
//! Promotion (`POST /v1/admin/promote` on the ops listener, `oc-server promote`), in
//! this order, each step logged:
//!
//! 1. refuse unless this server is a follower, and (without `force`) when a shard's
//!    applied LSN is more than `--promote-max-lag-lsn` behind what the writer last
//!    reported;
//! 2. stop the streams from the writer: from here on this follower acknowledges nothing
//!    to it, so a synchronous writer can acknowledge nothing more;
//! 3. take the archive's lease with the next epoch ("only if the version read is still
//!    there"): the old writer's next renewal fails and it exits (status 5). An
//!    asynchronous writer's lease is first waited out (its TTL plus the drift margin
//!    since its last renewal), unless `force` says the operator fenced it;
//! 4. each shard finishes applying what it holds and its log starts the new epoch in a
//!    new segment (`Shard::take_writes`); the epoch's first LSNs are recorded in the
//!    layout file;
//! 5. acknowledgements are gated by the lease (and followers, with
//!    `--sync-replication`), shipping starts under the archive prefix of the new epoch
//!    (`epoch-<n>/`), the replication listener (if configured) starts, and the data API
//!    takes writes.
//!
//! A failure before step 3 restarts the streams and changes nothing. A failure after
//! it leaves a server that holds the lease but takes no writes: `/ready` says so, and
//! the operator restarts it in writer mode.

use std::cell::{Cell, RefCell};
use std::os::fd::{FromRawFd, RawFd};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use glommio::net::TcpListener;
use glommio::Task;
use oc_engine::placement::{self, EpochStart, Layout, LiveLayout};
use oc_engine::{ShardNode, ShardRouter};
use oc_io::{failpoint, Epoch, Lsn};
use oc_ship::archive::{Archive, ArchiveError};
use oc_ship::lease::{self, LeaseHold};
use oc_ship::shipper::{self, HeldClaim, LeaseTtl, ShipError, ShipStatus, ShipperConfig};
use oc_ship::timeline::{self, TimelineRecord};
use serde_json::json;

use super::gate::{Gate, SyncPolicy};
use super::{receiver, sender, ApiRole, ReplicationStatus, Role};

/// What a follower needs to become a writer.
pub struct PromotionKit {
    /// The archive's root (the lease lives there).
    pub archive: Arc<dyn Archive>,
    pub ship_config: ShipperConfig,
    pub ship_status: ShipStatus,
    pub on_displaced: shipper::OnDisplaced,
    pub data_dir: PathBuf,
    pub lease_ttl: LeaseTtl,
    /// This server's own `--sync-replication`, applied once it is the writer.
    pub sync_policy: Option<SyncPolicy>,
    pub max_lag_lsn: u64,
    /// `--auto-promote`: promote without an operator once the writer's lease lapsed.
    pub automatic: bool,
}

/// How the control executor starts replication.
pub struct Setup {
    pub role: Role,
    /// The bound replication listener (a writer serves it at once, a follower once
    /// promoted).
    pub listener: Option<RawFd>,
    pub token: Option<String>,
    /// The replication listener's TLS (the API's certificate), when it has one.
    pub tls: Option<futures_rustls::TlsAcceptor>,
    /// A follower's TLS to its writer (`--leader-ca`).
    pub leader_tls: Option<super::LeaderTls>,
    /// A follower refused as diverged ends the process.
    pub on_diverged: receiver::OnDiverged,
    /// The layout the server goes by, which a promotion replaces.
    pub layout: LiveLayout,
    pub max_ready_lag_lsn: u64,
    /// The writer's synchronous replication (a follower's applies once promoted).
    pub sync: Option<SyncPolicy>,
    /// A follower's writer, resolved at start, and its own data directory id.
    pub leader_addr: Option<std::net::SocketAddr>,
    /// A replicating writer's hold on the lease.
    pub lease_hold: Option<Arc<LeaseHold>>,
    /// A follower's data API role.
    pub api_role: Option<Arc<ApiRole>>,
    pub promotion: Option<PromotionKit>,
    /// A writer's start that finishes the promotion which took its lease.
    pub finish_promotion: Option<FinishPromotion>,
}

/// A promotion a writer's start finishes: one that took the archive's lease and started
/// no epoch in this data directory (`timeline::PromotionEnd::EpochMissing`), or a
/// follower's directory started with `--promote-at-start`. The start begins a new
/// epoch where each shard's log ends, before its shards take writes (they were opened
/// with their own writes stopped) or it serves followers, then records the branch
/// point of a promotion that took the lease.
pub struct FinishPromotion {
    pub data_dir: PathBuf,
    /// The lease the promotion took; none for `--promote-at-start`.
    pub lease: Option<PromotionLease>,
}

/// The archive lease a promotion took, for its branch point.
pub struct PromotionLease {
    /// The archive's root.
    pub archive: Arc<dyn Archive>,
    pub lease_epoch: u64,
    pub promoted_at_us: u64,
}

/// A promotion refused or failed: the HTTP status, a stable code, and what to do.
#[derive(Debug)]
pub struct Refusal {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

fn refusal(status: u16, code: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        code,
        message: message.into(),
    }
}

/// This server's replication, on the control executor.
pub struct Node {
    pub status: Rc<ReplicationStatus>,
    pub max_ready_lag_lsn: u64,
    router: RefCell<Option<Rc<ShardRouter>>>,
    listener: Cell<Option<RawFd>>,
    token: Option<String>,
    tls: Option<futures_rustls::TlsAcceptor>,
    leader_tls: Option<super::LeaderTls>,
    on_diverged: receiver::OnDiverged,
    layout: LiveLayout,
    sync: Cell<Option<SyncPolicy>>,
    leader_addr: Option<std::net::SocketAddr>,
    lease_hold: RefCell<Option<Arc<LeaseHold>>>,
    api_role: Option<Arc<ApiRole>>,
    promotion: RefCell<Option<PromotionKit>>,
    /// Taken by [`Node::finish_promotion`].
    finish_promotion: RefCell<Option<FinishPromotion>>,
    /// The streams from the writer, or the listener's task.
    tasks: RefCell<Vec<Task<()>>>,
    /// A promoted follower's shipping loop and its counters.
    shipping: RefCell<Option<Task<()>>>,
    /// `--auto-promote`'s watch on the writer (a follower's).
    auto_promotion: RefCell<Option<Task<()>>>,
    pub promoted_ship_status: RefCell<Option<ShipStatus>>,
    promoting: Cell<bool>,
    /// A promotion took the lease; set for good (a later failure leaves the server
    /// between roles: only a restart in writer mode finishes it).
    lease_taken: Cell<bool>,
    /// The claim times this process's promotions wrote (or tried to write) into the
    /// lease record: a record carrying one of them and this process's holder is this
    /// process's own write, whatever answer that write got. Each with when its write
    /// was sent.
    attempted_claims: RefCell<Vec<(u64, Instant)>>,
    /// A writer that stepped down for a switchover (not ready, writes refused).
    /// Since when, if it did.
    stepped_down: Cell<Option<Instant>>,
}

/// How long a step-down waits for the shards to settle and then for a follower.
const STEP_DOWN_WAIT: Duration = Duration::from_secs(5);

impl Node {
    pub fn new(setup: Setup, shards: usize) -> Rc<Node> {
        Rc::new(Node {
            status: Rc::new(ReplicationStatus::new(setup.role, shards)),
            max_ready_lag_lsn: setup.max_ready_lag_lsn,
            router: RefCell::new(None),
            listener: Cell::new(setup.listener),
            token: setup.token,
            tls: setup.tls,
            leader_tls: setup.leader_tls,
            on_diverged: setup.on_diverged,
            layout: setup.layout,
            sync: Cell::new(setup.sync),
            leader_addr: setup.leader_addr,
            lease_hold: RefCell::new(setup.lease_hold),
            api_role: setup.api_role,
            promotion: RefCell::new(setup.promotion),
            finish_promotion: RefCell::new(setup.finish_promotion),
            tasks: RefCell::new(Vec::new()),
            shipping: RefCell::new(None),
            auto_promotion: RefCell::new(None),
            promoted_ship_status: RefCell::new(None),
            promoting: Cell::new(false),
            lease_taken: Cell::new(false),
            attempted_claims: RefCell::new(Vec::new()),
            stepped_down: Cell::new(None),
        })
    }

    /// Starts serving followers (a writer) or following (a follower).
    pub fn start(self: &Rc<Node>, router: &Rc<ShardRouter>) {
        *self.router.borrow_mut() = Some(router.clone());
        let role = self.status.role.borrow().clone();
        match role {
            Role::Writer => self.serve_followers(router),
            Role::Follower { .. } => {
                self.follow(router);
                let automatic = self
                    .promotion
                    .borrow()
                    .as_ref()
                    .is_some_and(|k| k.automatic);
                if automatic {
                    *self.auto_promotion.borrow_mut() = Some(glommio::spawn_local(
                        promote_when_the_writer_is_gone(self.clone()),
                    ));
                }
            }
        }
    }

    /// A writer's start that finishes the promotion which took its lease
    /// ([`FinishPromotion`]) does it here, before it serves anything: steps 5 and 6 of
    /// a promotion, then the shards take writes. Failing, it ends the process (the next
    /// start tries again).
    pub async fn finish_promotion(&self, router: &Rc<ShardRouter>) {
        let Some(finish) = self.finish_promotion.borrow_mut().take() else {
            return;
        };
        if let Err(why) = self.start_promoted_epoch(router, finish).await {
            let line = format!(
                "oc-server: FATAL: finishing the promotion of this data directory failed: \
                 {why}; nothing was written; restart the server to try again"
            );
            oc_io::fail_stop::exit_now(1, &line);
        }
    }

    async fn start_promoted_epoch(
        &self,
        router: &Rc<ShardRouter>,
        finish: FinishPromotion,
    ) -> Result<(), String> {
        let layout = Layout::clone(&self.layout.current());
        let frame_epoch = promoted_epoch(
            layout.epoch(),
            finish.lease.as_ref().map_or(0, |l| l.lease_epoch),
        );
        let mut first_lsn = Vec::with_capacity(router.shards());
        for shard in 0..router.shards() {
            first_lsn.push(
                take_writes(router, shard, frame_epoch)
                    .await
                    .map_err(|r| r.message)?
                    .0,
            );
        }
        let started = EpochStart {
            epoch: frame_epoch.0,
            first_lsn: first_lsn.clone(),
            lease_epoch: finish.lease.as_ref().map(|l| l.lease_epoch),
        };
        let data_dir = finish.data_dir.clone();
        let recorded = glommio::executor()
            .spawn_blocking(move || placement::start_epoch(&data_dir, &layout, started))
            .await
            .map_err(|e| e.to_string())?;
        self.layout.replace(recorded);
        if let Some(lease) = &finish.lease {
            let branch = TimelineRecord {
                first_lsn: first_lsn.clone(),
                format_version: timeline::TIMELINE_FORMAT_VERSION,
                frame_epoch: frame_epoch.0,
                lease_epoch: lease.lease_epoch,
                parent_lease_epoch: lease.lease_epoch - 1,
                promoted_at_us: lease.promoted_at_us,
            };
            let archive = lease.archive.clone();
            let recorded = glommio::executor()
                .spawn_blocking(move || timeline::record_branch_point(&archive, &branch))
                .await;
            if let Err(e) = recorded {
                // As in a promotion: the epoch is started, which is what fences; the
                // next start records the branch point (the layout now names this epoch).
                tracing::error!(error = %e, "could not record the branch point: restores of this archive to before this promotion are refused until a start records it (FORMAT.md §9.4)");
            }
        }
        for shard in 0..router.shards() {
            router
                .call(shard, |node: Rc<ShardNode>| async move {
                    node.shard().wal().resume_own_writes();
                })
                .await
                .map_err(|e| e.to_string())?;
        }
        match &finish.lease {
            Some(lease) => tracing::warn!(
                frame_epoch = frame_epoch.0,
                lease_epoch = lease.lease_epoch,
                ?first_lsn,
                "finished the promotion that took the archive's lease: the logs start their epoch here"
            ),
            None => tracing::warn!(
                frame_epoch = frame_epoch.0,
                ?first_lsn,
                "promoted at start (--promote-at-start): this data directory follows no writer any more, and its logs start their epoch here"
            ),
        }
        Ok(())
    }

    fn serve_followers(&self, router: &Rc<ShardRouter>) {
        let Some(fd) = self.listener.take() else {
            return;
        };
        // SAFETY: `fd` is a bound, listening socket this process owns; it was given up
        // by its `std` owner (`into_raw_fd`) for this one conversion (`take` above).
        let listener = unsafe { TcpListener::from_raw_fd(fd) };
        let sender = Rc::new(sender::Sender {
            router: router.clone(),
            layout: self.layout.current(),
            token: self.token.clone(),
            tls: self.tls.clone(),
            status: self.status.clone(),
            sync: self.sync.get(),
            copying: (0..self.status.links.len())
                .map(|_| Cell::new(false))
                .collect(),
        });
        self.tasks
            .borrow_mut()
            .push(glommio::spawn_local(sender::serve(listener, sender)));
    }

    fn follow(&self, router: &Rc<ShardRouter>) {
        let Role::Follower { leader } = self.status.role.borrow().clone() else {
            return;
        };
        let Some(addr) = self.leader_addr else {
            return;
        };
        let receiver = Rc::new(receiver::Receiver {
            router: router.clone(),
            leader,
            addr,
            follower_id: self.layout.current().id.to_string(),
            token: self.token.clone(),
            tls: self.leader_tls.clone(),
            status: self.status.clone(),
            on_diverged: self.on_diverged.clone(),
            api_role: self.api_role.clone(),
            layout: self.layout.clone(),
        });
        let mut tasks = self.tasks.borrow_mut();
        for shard in 0..router.shards() {
            tasks.push(glommio::spawn_local(receiver::follow(
                receiver.clone(),
                shard,
            )));
        }
    }

    /// Why a writer holding a lease is not ready, if it is not.
    pub fn lease_not_ready(&self) -> Option<String> {
        if let Some(since) = self.stepped_down.get() {
            return Some(format!(
                "stepped down for a switchover {} s ago: writes are refused here until the \
                 follower is promoted (this server then exits at its next lease renewal) or \
                 the step-down is called off with POST /v1/admin/step-down?cancel=true \
                 (RUNBOOK.md, \"Planned switchover\")",
                since.elapsed().as_secs()
            ));
        }
        let hold = self.lease_hold.borrow();
        hold.as_ref()?
            .check()
            .err()
            .map(|why| format!("the lease: {why}"))
    }

    /// Promotes this follower in place (module comment). Runs as its own task, so a
    /// client that goes away cannot cancel it half-way.
    pub async fn promote(self: &Rc<Node>, force: bool) -> Result<serde_json::Value, Refusal> {
        if !self.status.is_follower() {
            return Err(refusal(
                409,
                "not_follower",
                "this server is already the writer",
            ));
        }
        self.run_alone("promotion", move |node| async move {
            node.promote_now(force, false).await
        })
        .await
    }

    /// Runs `work` as its own task, so a client that goes away cannot cancel it
    /// half-way, and one promotion or step-down at a time.
    async fn run_alone<F>(
        self: &Rc<Node>,
        what: &'static str,
        work: impl FnOnce(Rc<Node>) -> F + 'static,
    ) -> Result<serde_json::Value, Refusal>
    where
        F: std::future::Future<Output = Result<serde_json::Value, Refusal>> + 'static,
    {
        if self.promoting.replace(true) {
            return Err(refusal(
                409,
                "promotion_running",
                format!("a {what} is already running"),
            ));
        }
        let (done_tx, done_rx) = async_channel::bounded(1);
        let node = self.clone();
        glommio::spawn_local(async move {
            let outcome = work(node.clone()).await;
            node.promoting.set(false);
            let _ = done_tx.send(outcome).await;
        })
        .detach();
        done_rx
            .recv()
            .await
            .unwrap_or_else(|_| Err(refusal(500, "internal", format!("the {what} task ended"))))
    }

    /// A switchover's first half, on the writer: every shard stops taking writes (each
    /// is refused with `421 not_leader` before it is logged), and once a follower holds
    /// everything logged this answers where each shard's log ends. This writer then
    /// acknowledges nothing more, so the follower may be promoted with force; its next
    /// lease renewal finds the record taken and it exits. `cancel` takes writes again
    /// (a switchover called off before the promotion).
    pub async fn step_down(self: &Rc<Node>, cancel: bool) -> Result<serde_json::Value, Refusal> {
        if self.status.is_follower() {
            return Err(refusal(409, "not_writer", "this server is a follower"));
        }
        if self.lease_hold.borrow().is_none() {
            return Err(refusal(
                409,
                "not_replicating",
                "this writer has no followers to hand over to (no --replication-listen)",
            ));
        }
        self.run_alone("step-down", move |node| async move {
            node.step_down_now(cancel).await
        })
        .await
    }

    async fn step_down_now(&self, cancel: bool) -> Result<serde_json::Value, Refusal> {
        let started = Instant::now();
        let router = self
            .router
            .borrow()
            .clone()
            .ok_or_else(|| refusal(503, "not_ready", "the shards are not serving yet"))?;
        let resume = |router: Rc<ShardRouter>| async move {
            for shard in 0..router.shards() {
                let _ = router
                    .call(shard, |node: Rc<ShardNode>| async move {
                        node.shard().resume_writes();
                    })
                    .await;
            }
        };
        if cancel {
            resume(router).await;
            self.stepped_down.set(None);
            tracing::warn!("step-down called off: taking writes again");
            return Ok(json!({"stepped_down": false}));
        }
        refuse_while_migrating(&router, "promote a follower with force instead, without a step-down (each migration then resumes there from its last chunk)").await?;
        self.stepped_down.set(Some(Instant::now()));
        let mut last_lsn = Vec::with_capacity(router.shards());
        for shard in 0..router.shards() {
            let stopped = router
                .call(shard, |node: Rc<ShardNode>| async move {
                    node.shard()
                        .stop_writes(STEP_DOWN_WAIT)
                        .await
                        .map_err(|e| e.to_string())
                })
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r);
            match stopped {
                Ok(lsn) => last_lsn.push(lsn.0),
                Err(why) => {
                    resume(router).await;
                    self.stepped_down.set(None);
                    return Err(refusal(503, "shard_unavailable", why));
                }
            }
        }
        // A follower must hold every shard's log to its end.
        let holding = |status: &ReplicationStatus| -> Vec<String> {
            status
                .followers()
                .into_iter()
                .filter(|id| {
                    status.acks.iter().zip(&last_lsn).all(|(acks, last)| {
                        acks.borrow()
                            .get(id)
                            .is_some_and(|ack| ack.durable.0 >= *last)
                    })
                })
                .collect()
        };
        let deadline = Instant::now() + STEP_DOWN_WAIT;
        let followers = loop {
            let held = holding(&self.status);
            if !held.is_empty() {
                break held;
            }
            if Instant::now() >= deadline {
                resume(router).await;
                self.stepped_down.set(None);
                return Err(refusal(
                    409,
                    "followers_behind",
                    format!(
                        "no follower held every shard's log up to {last_lsn:?} within {} ms; \
                         writes are taken again",
                        STEP_DOWN_WAIT.as_millis()
                    ),
                ));
            }
            glommio::timer::sleep(Duration::from_millis(1)).await;
        };
        tracing::warn!(
            ?last_lsn,
            ?followers,
            "stepped down: writes are refused; promote a follower now (with force)"
        );
        Ok(json!({
            "stepped_down": true,
            "last_lsn": last_lsn,
            "followers": followers,
            "took_ms": started.elapsed().as_millis() as u64,
        }))
    }

    /// `automatic`: `--auto-promote` decided it, so the writer's lease must have lapsed
    /// whatever the replication mode (a writer that only lost this follower's streams
    /// is alive, and stays the writer).
    async fn promote_now(
        self: &Rc<Node>,
        force: bool,
        automatic: bool,
    ) -> Result<serde_json::Value, Refusal> {
        let started = Instant::now();
        let mut steps = Vec::new();
        let mut step = |what: String| {
            tracing::warn!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "promotion: {what}"
            );
            steps.push(json!({"ms": started.elapsed().as_millis() as u64, "step": what}));
        };
        let router = self
            .router
            .borrow()
            .clone()
            .ok_or_else(|| refusal(503, "not_ready", "the shards are not serving yet"))?;
        let max_lag = {
            let kit = self.promotion.borrow();
            let kit = kit.as_ref().ok_or_else(|| {
                refusal(
                    409,
                    "no_archive",
                    "this follower has no archive to hold the lease in",
                )
            })?;
            kit.max_lag_lsn
        };
        // Only a writer that told this follower it acknowledges nothing without all of
        // its followers (synchronous, refuse on timeout) is fenced by the streams
        // stopping; any other must be waited out.
        let writer_sync = self.status.writer_confirmed_by.get() > 0;
        // 1. How far behind is it?
        let behind: Vec<String> = self
            .status
            .links
            .iter()
            .enumerate()
            .filter(|(_, l)| l.borrow().applied_lag_lsn() > max_lag)
            .map(|(shard, l)| format!("shard {shard}: {} frames", l.borrow().applied_lag_lsn()))
            .collect();
        if !force {
            refuse_while_migrating(
                &router,
                "promote with force (each migration then resumes here from its last chunk)",
            )
            .await?;
        }
        if !behind.is_empty() && !force {
            return Err(refusal(
                409,
                "follower_behind",
                format!(
                    "this follower is behind the writer ({}; the bound is \
                     --promote-max-lag-lsn {max_lag}): promoting now loses what it lacks. \
                     Investigate replication first, or promote with force",
                    behind.join(", ")
                ),
            ));
        }
        step(format!(
            "checked the lag (largest: {} frames)",
            self.status
                .links
                .iter()
                .map(|l| l.borrow().applied_lag_lsn())
                .max()
                .unwrap_or(0)
        ));
        // 2. A writer that may acknowledge without this follower is waited out first,
        // with the streams still running: what it acknowledges meanwhile arrives here.
        let expect = if force {
            lease::Expect::Any
        } else if writer_sync && !automatic {
            // The writer cannot acknowledge without this follower, so nothing is waited
            // out; but an archive without a lease record is not the writer's, and
            // taking it would fence nothing (another follower may confirm for it).
            let (archive, ..) = self.lease_kit()?;
            require_lease_record(archive).await?;
            lease::Expect::Any
        } else {
            let (archive, owner, holder, ttl) = self.lease_kit()?;
            let ours = OwnClaims {
                holder,
                claims: self.claim_times(),
            };
            let (expect, found) =
                wait_for_lapse_of(archive, &owner, &ours, ttl.max_drift, automatic).await?;
            step(found.into());
            expect
        };
        // 3. Stop following: nothing more is acknowledged to the old writer.
        self.tasks.borrow_mut().clear();
        for link in &self.status.links {
            link.borrow_mut().connected = 0;
        }
        step("stopped the streams from the writer".into());
        // 4. The lease, with the next epoch.
        let held = match self.take_lease(expect).await {
            Ok(held) => held,
            Err(refused) => {
                self.follow(&router);
                return Err(refused);
            }
        };
        self.lease_taken.set(true);
        let claim = &held.claim;
        let lease_epoch = claim.lease.epoch;
        step(format!(
            "took the archive's lease with epoch {lease_epoch} (the old writer's next renewal fails)"
        ));
        // 5. Every shard starts the new epoch where its log ends ([`promoted_epoch`]).
        let frame_epoch = promoted_epoch(self.layout.current().epoch(), lease_epoch);
        let mut first_lsn = Vec::with_capacity(router.shards());
        for shard in 0..router.shards() {
            first_lsn.push(take_writes(&router, shard, frame_epoch).await?.0);
        }
        let (layout, data_dir) = {
            let kit = self.promotion.borrow();
            let data_dir = kit.as_ref().map(|k| k.data_dir.clone()).unwrap_or_default();
            (Layout::clone(&self.layout.current()), data_dir)
        };
        let started_epoch = EpochStart {
            epoch: frame_epoch.0,
            first_lsn: first_lsn.clone(),
            lease_epoch: Some(lease_epoch),
        };
        let recorded = glommio::executor()
            .spawn_blocking(move || placement::start_epoch(&data_dir, &layout, started_epoch))
            .await
            .map_err(|e| {
                refusal(
                    500,
                    "internal",
                    format!("the lease is taken but recording the new epoch failed: {e}; restart this server in writer mode"),
                )
            })?;
        self.layout.replace(recorded);
        step(format!(
            "the logs start epoch {} at LSNs {first_lsn:?}",
            frame_epoch.0
        ));
        // 6. The branch point, in the new namespace before anything ships there: a
        // restore of the archive follows this history, and falls back to the old one
        // only below it.
        let (archive, ..) = self.lease_kit()?;
        let branch = TimelineRecord {
            first_lsn: first_lsn.clone(),
            format_version: timeline::TIMELINE_FORMAT_VERSION,
            frame_epoch: frame_epoch.0,
            lease_epoch,
            parent_lease_epoch: lease_epoch.saturating_sub(1),
            promoted_at_us: claim.lease.claimed_at_us,
        };
        let recorded = glommio::executor()
            .spawn_blocking(move || {
                if lease_epoch < 2 {
                    return Ok(()); // the root's history has no branch point
                }
                timeline::record_branch_point(&archive, &branch)
            })
            .await;
        match recorded {
            Ok(()) => step(format!(
                "recorded the branch point in {}timeline.json",
                lease::namespace(lease_epoch).unwrap_or_default()
            )),
            // Not worth failing a promotion whose lease is taken: the history is whole
            // in its namespace; only restores to before it cannot fall back through it.
            Err(e) => {
                tracing::error!(error = %e, "promotion: recording the branch point failed");
                step(format!(
                    "could not record the branch point ({e}): restores of this archive to \
                     before this promotion are refused (FORMAT.md §9.4)"
                ))
            }
        }
        // 7. Ship, gate acknowledgements, serve followers, take writes.
        // Read before shipping starts: that takes the kit.
        let sync_policy = self.promotion.borrow().as_ref().and_then(|k| k.sync_policy);
        let hold = self.start_shipping(&router, held).await?;
        for shard in 0..router.shards() {
            let hold = hold.clone();
            router
                .call(shard, move |node: Rc<ShardNode>| async move {
                    node.shard()
                        .set_ack_gate(Some(Gate::install(sync_policy, Some(hold))));
                })
                .await
                .map_err(|e| refusal(503, "shard_unavailable", e.to_string()))?;
        }
        *self.lease_hold.borrow_mut() = Some(hold);
        step(format!(
            "shipping to the archive under {}",
            lease::namespace(lease_epoch).unwrap_or_else(|| "its root".into())
        ));
        // A follower's logs were opened with their own frames stopped (so nothing but
        // its writer's frames lands in them); from here the new writer's are taken.
        for shard in 0..router.shards() {
            router
                .call(shard, |node: Rc<ShardNode>| async move {
                    node.shard().wal().resume_own_writes();
                })
                .await
                .map_err(|e| refusal(503, "shard_unavailable", e.to_string()))?;
        }
        *self.status.role.borrow_mut() = Role::Writer;
        self.sync.set(sync_policy);
        self.serve_followers(&router);
        if let Some(role) = &self.api_role {
            role.become_writer();
        }
        step("taking writes".into());
        Ok(json!({
            "promoted": true,
            "lease_epoch": lease_epoch,
            "epoch": frame_epoch.0,
            "first_lsn": first_lsn,
            "took_ms": started.elapsed().as_millis() as u64,
            "steps": steps,
        }))
    }

    /// The archive, this directory's owner id, this process as a holder, and the lease
    /// settings: what taking the lease needs.
    fn lease_kit(&self) -> Result<(Arc<dyn Archive>, String, lease::Holder, LeaseTtl), Refusal> {
        let kit = self.promotion.borrow();
        let Some(kit) = kit.as_ref() else {
            return Err(refusal(409, "no_archive", "no archive"));
        };
        Ok((
            kit.archive.clone(),
            kit.ship_config.owner_id.clone(),
            kit.ship_config.holder.clone(),
            kit.lease_ttl,
        ))
    }

    /// The claim times this process's promotions wrote or tried to write.
    fn claim_times(&self) -> Vec<u64> {
        self.attempted_claims
            .borrow()
            .iter()
            .map(|(at, _)| *at)
            .collect()
    }

    /// Takes the lease for this data directory, displacing what `expect` allows, and
    /// returns it with when the write that made it was sent.
    async fn take_lease(&self, expect: lease::Expect) -> Result<HeldClaim, Refusal> {
        let (archive, owner, holder, ttl) = self.lease_kit()?;
        let claimed_at_us = now_us();
        self.attempted_claims
            .borrow_mut()
            .push((claimed_at_us, Instant::now()));
        let own_claims = self.claim_times();
        let claim = glommio::executor()
            .spawn_blocking(move || {
                let claim = lease::promote(
                    archive.as_ref(),
                    &owner,
                    holder,
                    claimed_at_us,
                    ttl.ttl,
                    &expect,
                    &own_claims,
                )?;
                lost_answer_failpoint()?;
                Ok(claim)
            })
            .await
            .map_err(|e| match e {
                // The archive did not answer, or its lock stayed held: not a lease
                // another writer holds.
                lease::PromoteError::Lease(lease::LeaseError::Archive(ArchiveError::Io {
                    ..
                })) => refusal(
                    503,
                    "archive_unavailable",
                    format!("taking the archive's lease record: {e}; retry the promotion"),
                ),
                e => refusal(409, "lease_held", e.to_string()),
            })?;
        // An earlier attempt's claim, whose answer was lost, was sent when it was.
        let sent = self
            .attempted_claims
            .borrow()
            .iter()
            .find(|(at, _)| *at == claim.lease.claimed_at_us)
            .map(|(_, sent)| *sent)
            .ok_or_else(|| {
                refusal(
                    500,
                    "internal",
                    "the lease taken carries no claim time of this process",
                )
            })?;
        Ok(HeldClaim { claim, sent })
    }

    /// Starts the shipper, which renews `held` from now on (and fails if someone else
    /// wrote the record since), and returns its hold.
    async fn start_shipping(
        &self,
        router: &Rc<ShardRouter>,
        held: HeldClaim,
    ) -> Result<Arc<LeaseHold>, Refusal> {
        let Some(kit) = self.promotion.borrow_mut().take() else {
            return Err(refusal(500, "internal", "the promotion kit was used"));
        };
        // Nothing leaves the disk unarchived from here on (a follower released freely).
        for shard in 0..router.shards() {
            router
                .call(shard, |node: Rc<ShardNode>| async move {
                    node.shard().set_release_barrier(Some(Lsn(1)));
                })
                .await
                .map_err(|e| refusal(503, "shard_unavailable", e.to_string()))?;
        }
        let status = kit.ship_status.clone();
        let PromotionKit {
            archive,
            mut ship_config,
            ship_status,
            on_displaced,
            ..
        } = kit;
        ship_config.held = Some(held);
        let started = glommio::executor()
            .spawn_blocking(move || shipper::start(archive, ship_config, ship_status, on_displaced))
            .await
            .map_err(|e| match e {
                ShipError::Owner(lease::LeaseError::Displaced { .. }) => refusal(
                    409,
                    "lease_lost",
                    format!(
                        "the lease was taken, then written by another process before shipping \
                         started: {e}; this server takes no writes and exits with status 5 in a \
                         second"
                    ),
                ),
                e => refusal(
                    500,
                    "internal",
                    format!(
                        "the lease is taken but shipping could not start: {e}; restart this \
                         server in writer mode"
                    ),
                ),
            })?;
        *self.shipping.borrow_mut() = Some(glommio::spawn_local((started.run)(router.clone())));
        *self.promoted_ship_status.borrow_mut() = Some(status);
        Ok(started.hold)
    }
}

/// The archive's lease record, read off the executor (`503 archive_unavailable` when
/// it cannot be read).
async fn read_lease(
    archive: Arc<dyn Archive>,
) -> Result<Option<(lease::Lease, oc_ship::archive::Version)>, Refusal> {
    glommio::executor()
        .spawn_blocking(move || lease::read(archive.as_ref()))
        .await
        .map_err(|e| {
            refusal(
                503,
                "archive_unavailable",
                format!("reading the archive's lease record: {e}; nothing changed, retry"),
            )
        })
}

/// Refuses (`lease_missing`) when the archive holds no lease record.
async fn require_lease_record(archive: Arc<dyn Archive>) -> Result<(), Refusal> {
    match read_lease(archive).await? {
        Some(_) => Ok(()),
        None => Err(lease_missing()),
    }
}

/// The refusal for an archive without a lease record.
fn lease_missing() -> Refusal {
    // Not the writer's archive (a follower started with another --archive would be
    // promoted beside a live writer), or its record was removed: nothing says the
    // writer is gone, so only an operator who knows it is may force it.
    refusal(
        409,
        "lease_missing",
        "the archive holds no lease record, so nothing shows the writer's lease lapsed: \
         check that this follower's --archive is the writer's. If the writer ran without \
         an archive, or is known to be stopped, promote with force",
    )
}

/// Watches the archive's lease record until it has stayed unchanged for its TTL plus
/// `max_drift`, on this host's monotonic clock, and returns what the promotion may then
/// displace: that version (or no record, when there was none). The writer holding it stops acknowledging
/// `max_drift` before its TTL runs out, counted from the start of the renewal that
/// wrote that version, which is before this host first read it: once the wait is over
/// it has stopped, whatever the two wall clocks say (only their rates may differ, by
/// less than the drift margin). A renewal meanwhile means it is alive: refused at once.
/// A record this process wrote itself (a promotion whose answer was lost) is returned
/// at once. Any other record naming this data directory may be a live writer on a copy
/// of it: `automatic` refuses it; an operator's promotion waits it out like any other.
/// An absent record is refused: nothing shows that the writer, which may ship to
/// another archive than this follower's, is gone. Returns what was found, for the steps.
async fn wait_for_lapse_of(
    archive: Arc<dyn Archive>,
    owner: &str,
    ours: &OwnClaims,
    max_drift: Duration,
    automatic: bool,
) -> Result<(lease::Expect, &'static str), Refusal> {
    let read = || read_lease(archive.clone());
    let Some((watched, version)) = read().await? else {
        return Err(lease_missing());
    };
    // A copy of this directory (a cloned VM keeps the id, the host name and the path)
    // may be the writer itself, alive: only this process's own claims are its own.
    if lease::is_own_claim(&watched, owner, &ours.holder, &ours.claims) {
        return Ok((
            lease::Expect::Version(version),
            "the archive's lease record is this process's own claim (an earlier \
             promotion's answer was lost)",
        ));
    }
    if watched.owner_id == owner && automatic {
        return Err(refusal(
            409,
            "lease_held",
            "the archive's lease record names this data directory (a copy of the writer's?): \
             an automatic promotion cannot tell the writer is gone. If no copy of this \
             directory runs, promote by hand: it treats the record like any writer's",
        ));
    }
    let Some(ttl_ms) = watched.lease_ttl_ms else {
        return Err(refusal(
            409,
            "lease_held",
            format!(
                "the archive's owner record (held by {}) has no TTL: that writer does not \
                 replicate and holds the archive until it stops; promote with force once it \
                 is known to be stopped",
                watched.holder
            ),
        ));
    };
    let seen_at = Instant::now();
    let lapses_at = seen_at + Duration::from_millis(ttl_ms) + max_drift;
    tracing::warn!(
        wait_ms = (lapses_at - seen_at).as_millis() as u64,
        holder = %watched.holder,
        "promotion: waiting for the writer's lease to lapse (its TTL plus the drift margin, \
         on this host's clock)"
    );
    loop {
        let now = Instant::now();
        if now >= lapses_at {
            return Ok((
                lease::Expect::Version(version),
                "the writer's lease lapsed (its record unchanged for its TTL plus the drift \
                 margin)",
            ));
        }
        glommio::timer::sleep((lapses_at - now).min(Duration::from_millis(250))).await;
        match read().await? {
            Some((_, seen)) if seen == version => {}
            Some((now, _)) => {
                return Err(refusal(
                    409,
                    "lease_held",
                    lease::PromoteError::Changed { now: Box::new(now) }.to_string(),
                ))
            }
            None => {
                return Err(refusal(
                    409,
                    "lease_held",
                    "the archive's lease record disappeared while this follower waited for it \
                     to lapse; check the archive",
                ))
            }
        }
    }
}

/// `--auto-promote`: watches the streams from the writer, and once every one has been
/// gone for two lease renewal intervals (a reconnect is usually quicker), promotes
/// this follower the way `POST /v1/admin/promote` does without force, waiting for the
/// writer's lease to lapse first. A refusal (the writer renewed: it is alive; the
/// follower is behind; a migration runs) is logged and the watch goes on, trying
/// again less often each time (up to once a minute). Only a follower that has been
/// caught up with the writer on every shard since it started promotes itself: before
/// that its lag behind the writer is unknown. A promotion that failed after taking
/// the lease is not tried again: the server is between roles (logged).
async fn promote_when_the_writer_is_gone(node: Rc<Node>) {
    let interval = node
        .promotion
        .borrow()
        .as_ref()
        .map_or(Duration::from_secs(2), |k| k.lease_ttl.ttl / 5)
        .max(Duration::from_millis(100));
    let mut gone_since: Option<Instant> = None;
    let mut patience = interval * 2;
    loop {
        glommio::timer::sleep(interval).await;
        if !node.status.is_follower() {
            return;
        }
        let links = &node.status.links;
        let connected = links.iter().any(|l| l.borrow().connected > 0);
        let known_lag = links.iter().all(|l| l.borrow().caught_up_at.is_some());
        if connected || !known_lag {
            gone_since = None;
            patience = interval * 2;
            continue;
        }
        let since = *gone_since.get_or_insert_with(Instant::now);
        if since.elapsed() < patience {
            continue;
        }
        tracing::warn!(
            gone_ms = since.elapsed().as_millis() as u64,
            "automatic promotion: no stream from the writer; promoting once its lease lapses"
        );
        let outcome = node
            .run_alone("promotion", |node| async move {
                node.promote_now(false, true).await
            })
            .await;
        match outcome {
            Ok(answer) => {
                tracing::warn!(lease_epoch = %answer["lease_epoch"], took_ms = %answer["took_ms"], "automatic promotion: this server is the writer");
                return;
            }
            Err(failed) if node.lease_taken.get() => {
                tracing::error!(
                    code = failed.code,
                    reason = %failed.message,
                    "automatic promotion failed after taking the lease: restart this server \
                     in writer mode (RUNBOOK.md, \"Failover\")"
                );
                return;
            }
            Err(refused) => {
                tracing::warn!(
                    code = refused.code,
                    reason = %refused.message,
                    "automatic promotion refused; watching the writer again"
                );
                gone_since = None;
                patience = (patience * 2).min(Duration::from_secs(60));
            }
        }
    }
}

/// What this process wrote, or tried to write, into the lease record.
struct OwnClaims {
    holder: lease::Holder,
    /// Every claim time this process's promotions used.
    claims: Vec<u64>,
}

/// Failpoint `promote.lease_answer_lost`: the first promotion's write of the lease
/// record lands, and its answer is lost (an I/O error, as a timed-out S3 request).
fn lost_answer_failpoint() -> Result<(), lease::PromoteError> {
    static FIRED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if failpoint::armed("promote.lease_answer_lost").is_some()
        && !FIRED.swap(true, std::sync::atomic::Ordering::SeqCst)
    {
        return Err(lease::LeaseError::Archive(ArchiveError::Io {
            key: lease::LEASE_KEY.to_string(),
            source: Arc::new(std::io::Error::other(
                "failpoint promote.lease_answer_lost: the answer was lost",
            )),
        })
        .into());
    }
    Ok(())
}

/// Switches one shard's log to the new epoch, retrying while frames are in flight.
async fn take_writes(router: &ShardRouter, shard: usize, epoch: Epoch) -> Result<Lsn, Refusal> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let taken = router
            .call(shard, move |node: Rc<ShardNode>| async move {
                node.shard()
                    .take_writes(epoch)
                    .await
                    .map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| refusal(503, "shard_unavailable", e.to_string()))?;
        match taken {
            Ok(first) => return Ok(first),
            Err(why) if Instant::now() < deadline => {
                tracing::info!(shard, %why, "promotion: the shard's last frames are still being written");
                glommio::timer::sleep(Duration::from_millis(5)).await;
            }
            Err(why) => {
                return Err(refusal(
                    500,
                    "internal",
                    format!("the lease is taken but shard {shard} could not start the new epoch: {why}; restart this server in writer mode"),
                ))
            }
        }
    }
}

/// The epoch a promotion's frames take: above the directory's own and at least the
/// time in seconds times 256, with the low byte of the lease epoch it took (0 without
/// one) as its own low byte. Two promotions of followers of one writer that know nothing of each other
/// (the second forced, within the same second) so never share an epoch: a follower
/// tells two histories apart by their epochs and first LSNs only, and one that shared
/// both would take the other's frames as its own history.
fn promoted_epoch(current: u64, lease_epoch: u64) -> Epoch {
    promoted_epoch_at(current, lease_epoch, now_us() / 1_000_000)
}

fn promoted_epoch_at(current: u64, lease_epoch: u64, now_s: u64) -> Epoch {
    // The lowest epoch above both floors whose low byte is the lease epoch's: two
    // promotions holding different lease epochs differ even when the directory's
    // epoch, not the clock, sets the floor (a clock behind the last writer's).
    let floor = current.saturating_add(1).max(now_s << 8);
    let epoch = (floor & !0xff) | (lease_epoch & 0xff);
    Epoch(if epoch < floor {
        epoch.saturating_add(0x100)
    } else {
        epoch
    })
}

fn now_us() -> u64 {
    oc_io::TimestampMicros::now().0
}

/// A planned promotion or switchover waits while a schema migration runs: its backfill
/// is paced by the writer's own traffic, and moving it mid-way restarts that pacing and
/// risks the failover drill on a table that is half converted. `otherwise` says how to
/// go ahead anyway.
async fn refuse_while_migrating(router: &ShardRouter, otherwise: &str) -> Result<(), Refusal> {
    let mut running = Vec::new();
    for shard in 0..router.shards() {
        let on_shard = router
            .call(shard, |node: Rc<ShardNode>| async move {
                node.shard().running_migrations()
            })
            .await
            .map_err(|e| refusal(503, "shard_unavailable", e.to_string()))?;
        running.extend(on_shard.into_iter().map(|(tenant, m)| {
            format!(
                "tenant {tenant}, table {:?}: migration {} is {} ({} of {} rows)",
                m.table,
                m.id,
                m.state.name(),
                m.rows_done,
                m.rows_total
            )
        }));
    }
    if running.is_empty() {
        return Ok(());
    }
    Err(refusal(
        409,
        "migration_running",
        format!(
            "{}: a planned failover waits until no migration runs. Wait for it to finish \
             (GET /v1/tenants/:t/migrations/:id), abort it on the writer, or {otherwise}",
            running.join("; ")
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Promotions in one second with different lease epochs (the race of two forced
    /// promotions of one writer's followers) take different epochs, each above the
    /// directory's own, and later ones rise with the clock.
    #[test]
    fn promotions_in_one_second_take_different_epochs() {
        let now_s = 1_796_671_218;
        let (b, c) = (
            promoted_epoch_at(1, 2, now_s),
            promoted_epoch_at(1, 3, now_s),
        );
        assert_ne!(b, c);
        assert!(b < c, "a later lease epoch, a higher epoch");
        assert_eq!(b.0 >> 8, now_s);
        assert!(promoted_epoch_at(1, 2, now_s + 1) > c, "a later second");
        // Above a directory's own epoch when the clock is behind it, and still told
        // apart by the lease epoch.
        let ahead = ((now_s + 10) << 8) | 0x07;
        let (b, c) = (
            promoted_epoch_at(ahead, 2, now_s),
            promoted_epoch_at(ahead, 3, now_s),
        );
        assert!(b.0 > ahead && c.0 > ahead, "{b:?} {c:?}");
        assert_ne!(b, c);
        assert_eq!((b.0 & 0xff, c.0 & 0xff), (2, 3));
        assert_eq!(promoted_epoch_at(ahead, 8, now_s), Epoch(ahead + 1));
        // Epochs of the seconds-only rule are below every new one.
        assert!(promoted_epoch_at(now_s, 0, now_s).0 > now_s);
        assert!(promoted_epoch(1, 2).0 >> 8 >= now_s);
    }
}
