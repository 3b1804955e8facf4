//! Cross-shard calls: run a closure on the shard that owns a tenant and get its result.
//!
//! Every ordered pair (caller, data shard) gets its own pair of glommio shared channels
//! (lock-free single-producer/single-consumer rings with an eventfd wake-up): one for
//! calls, one for answers. Nothing on this path takes a lock.
//!
//! Backpressure is decided by the caller, never by blocking: a caller keeps at most
//! `capacity` calls in flight per target shard (its table of pending answers) and a
//! call beyond that fails at once with [`MeshError::Overloaded`], which the API turns
//! into 503 + Retry-After. Because a caller never has more calls in flight than the
//! answer ring holds, an answer always fits, and no shard ever awaits room in a ring.
//! That is what keeps the mesh free of the deadlock glommio's own `channel_mesh` can
//! hit when two shards block sending to each other with small capacities.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures_channel::oneshot;
use glommio::channels::shared_channel::{
    self, ConnectedReceiver, ConnectedSender, SharedReceiver, SharedSender,
};
use glommio::GlommioError;

type Reply = Box<dyn Any + Send>;
type Job<C> = Box<dyn FnOnce(Rc<C>) -> Pin<Box<dyn Future<Output = Reply>>> + Send>;

struct Call<C> {
    id: u64,
    job: Job<C>,
    /// Set by a caller that stopped waiting, for a cancellable call.
    abandoned: Option<Arc<AtomicBool>>,
}

struct Answer {
    id: u64,
    reply: Reply,
}

/// Why a call did not run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MeshError {
    #[error("shard {shard} already has {in_flight} forwarded requests in flight, its limit; retry shortly")]
    Overloaded { shard: usize, in_flight: usize },
    #[error("shard {shard} is not running")]
    Unavailable { shard: usize },
    #[error("there is no shard {shard}: the pool has {shards}")]
    NoSuchShard { shard: usize, shards: usize },
}

/// A caller's ends towards one shard: calls out, answers back.
type Link<C> = (SharedSender<Call<C>>, SharedReceiver<Answer>);

/// The channel ends of one participant, made on the thread that builds the mesh and
/// moved to the participant's executor, where [`MeshEndpoints::connect`] wires them.
pub struct MeshEndpoints<C> {
    participant: usize,
    shards: usize,
    capacity: usize,
    /// Per data shard: calls out, answers back (`None` for the participant itself).
    outgoing: Vec<Option<Link<C>>>,
    /// For a data shard: per other participant, calls in and answers out.
    incoming: Vec<(SharedReceiver<Call<C>>, SharedSender<Answer>)>,
}

/// Builds the channels between `shards` data shards (participants `0..shards`, which
/// serve calls) and `clients` callers that serve none (participants after them, e.g.
/// the control executor). `capacity` bounds calls in flight per (caller, shard) pair.
pub fn build_mesh<C: 'static>(
    shards: usize,
    clients: usize,
    capacity: usize,
) -> Vec<MeshEndpoints<C>> {
    assert!(capacity > 0, "a mesh needs room for at least one call");
    let participants = shards + clients;
    let mut endpoints: Vec<MeshEndpoints<C>> = (0..participants)
        .map(|participant| MeshEndpoints {
            participant,
            shards,
            capacity,
            outgoing: (0..shards).map(|_| None).collect(),
            incoming: Vec::new(),
        })
        .collect();
    for caller in 0..participants {
        for shard in 0..shards {
            if caller == shard {
                continue;
            }
            let (call_tx, call_rx) = shared_channel::new_bounded(capacity);
            let (answer_tx, answer_rx) = shared_channel::new_bounded(capacity);
            endpoints[caller].outgoing[shard] = Some((call_tx, answer_rx));
            endpoints[shard].incoming.push((call_rx, answer_tx));
        }
    }
    endpoints
}

impl<C: 'static> MeshEndpoints<C> {
    /// Which participant these ends belong to (data shards first).
    pub fn participant(&self) -> usize {
        self.participant
    }

    /// Connects every channel end on the current executor. A data shard passes the
    /// context its calls run with; a client passes `None`. Returns once the calls out
    /// are connected, which waits for every data shard to connect too.
    pub async fn connect(self, local: Option<Rc<C>>) -> Router<C> {
        let is_shard = self.participant < self.shards;
        assert_eq!(
            is_shard,
            local.is_some(),
            "data shards serve calls, clients do not"
        );
        // Calls in are served by tasks that connect on their own: a client that
        // connects late (or never) must not hold up this shard.
        if let Some(ctx) = &local {
            for (calls, answers) in self.incoming {
                let ctx = ctx.clone();
                glommio::spawn_local(async move {
                    let calls = calls.connect().await;
                    let answers = Rc::new(answers.connect().await);
                    serve_calls(calls, answers, ctx).await;
                })
                .detach();
            }
        }
        let mut connecting = Vec::new();
        for (shard, ends) in self.outgoing.into_iter().enumerate() {
            if let Some((calls, answers)) = ends {
                connecting.push((
                    shard,
                    glommio::spawn_local(async move {
                        (calls.connect().await, answers.connect().await)
                    }),
                ));
            }
        }
        let mut peers: Vec<Option<Peer<C>>> = (0..self.shards).map(|_| None).collect();
        for (shard, connected) in connecting {
            let (calls, answers) = connected.await;
            let pending: Pending = Rc::new(RefCell::new(HashMap::new()));
            glommio::spawn_local(deliver_answers(answers, pending.clone())).detach();
            peers[shard] = Some(Peer { calls, pending });
        }
        Router {
            local: local.map(|ctx| (self.participant, ctx)),
            shards: self.shards,
            capacity: self.capacity,
            peers,
            next_id: Cell::new(0),
        }
    }
}

type Pending = Rc<RefCell<HashMap<u64, oneshot::Sender<Reply>>>>;

struct Peer<C> {
    calls: ConnectedSender<Call<C>>,
    pending: Pending,
}

/// One participant's way to run closures on any data shard.
pub struct Router<C> {
    local: Option<(usize, Rc<C>)>,
    shards: usize,
    capacity: usize,
    peers: Vec<Option<Peer<C>>>,
    next_id: Cell<u64>,
}

impl<C: 'static> Router<C> {
    /// The number of data shards.
    pub fn shards(&self) -> usize {
        self.shards
    }

    /// This participant's shard number, if it is a data shard.
    pub fn local_shard(&self) -> Option<usize> {
        self.local.as_ref().map(|(id, _)| *id)
    }

    /// Calls forwarded to `shard` and not yet answered.
    pub fn in_flight(&self, shard: usize) -> usize {
        self.peers
            .get(shard)
            .and_then(Option::as_ref)
            .map_or(0, |peer| peer.pending.borrow().len())
    }

    /// Runs `job` on `shard` with that shard's context and returns its result. On the
    /// local shard it runs inline; elsewhere it is forwarded once, or refused with
    /// [`MeshError::Overloaded`] when `capacity` calls to that shard are in flight.
    pub async fn call<R, F, Fut>(&self, shard: usize, job: F) -> Result<R, MeshError>
    where
        R: Send + 'static,
        F: FnOnce(Rc<C>) -> Fut + Send + 'static,
        Fut: Future<Output = R> + 'static,
    {
        self.call_on(shard, job, false).await
    }

    /// [`Router::call`] for a job that may stop part way, as it would on the local
    /// shard: a caller that stops waiting (its request was cancelled) has a forwarded
    /// job dropped the next time the job's task runs (between slices of a query, when
    /// a turn it waits for comes), instead of run to its end for no one.
    pub async fn call_cancellable<R, F, Fut>(&self, shard: usize, job: F) -> Result<R, MeshError>
    where
        R: Send + 'static,
        F: FnOnce(Rc<C>) -> Fut + Send + 'static,
        Fut: Future<Output = R> + 'static,
    {
        self.call_on(shard, job, true).await
    }

    #[expect(
        clippy::expect_used,
        reason = "the mesh is built with a peer per other shard, and an answer has the type its call asked for"
    )]
    async fn call_on<R, F, Fut>(
        &self,
        shard: usize,
        job: F,
        cancellable: bool,
    ) -> Result<R, MeshError>
    where
        R: Send + 'static,
        F: FnOnce(Rc<C>) -> Fut + Send + 'static,
        Fut: Future<Output = R> + 'static,
    {
        if shard >= self.shards {
            return Err(MeshError::NoSuchShard {
                shard,
                shards: self.shards,
            });
        }
        if let Some((id, ctx)) = &self.local {
            if *id == shard {
                return Ok(job(ctx.clone()).await);
            }
        }
        let peer = self.peers[shard]
            .as_ref()
            .expect("every shard other than the local one has a peer");
        let in_flight = peer.pending.borrow().len();
        if in_flight >= self.capacity {
            return Err(MeshError::Overloaded { shard, in_flight });
        }
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        let job: Job<C> =
            Box::new(move |ctx| Box::pin(async move { Box::new(job(ctx).await) as Reply }));
        let (reply_tx, reply_rx) = oneshot::channel();
        let abandoned = cancellable.then(|| Arc::new(AtomicBool::new(false)));
        let _abandon_on_drop = AbandonOnDrop(abandoned.clone());
        match peer.calls.try_send(Call { id, job, abandoned }) {
            Ok(()) => {}
            Err(GlommioError::WouldBlock(_)) => {
                // The receiver has not yet drained calls whose answers already arrived.
                return Err(MeshError::Overloaded { shard, in_flight });
            }
            Err(_) => return Err(MeshError::Unavailable { shard }),
        }
        peer.pending.borrow_mut().insert(id, reply_tx);
        let reply = reply_rx
            .await
            .map_err(|_| MeshError::Unavailable { shard })?;
        Ok(*reply
            .downcast::<R>()
            .expect("an answer has the type of the call that asked for it"))
    }
}

async fn serve_calls<C: 'static>(
    calls: ConnectedReceiver<Call<C>>,
    answers: Rc<ConnectedSender<Answer>>,
    ctx: Rc<C>,
) {
    while let Some(Call { id, job, abandoned }) = calls.recv().await {
        let answers = answers.clone();
        let ctx = ctx.clone();
        glommio::spawn_local(async move {
            let reply = match abandoned {
                None => job(ctx).await,
                // Answered all the same: the caller's table of calls in flight keeps
                // the call until an answer comes.
                Some(abandoned) => Unless::new(&abandoned, job(ctx))
                    .await
                    .unwrap_or_else(|| Box::new(()) as Reply),
            };
            // The caller keeps no more calls in flight than the answer ring holds, so
            // this cannot find it full; if the caller is gone the answer has no reader.
            if let Err(GlommioError::WouldBlock(_)) = answers.try_send(Answer { id, reply }) {
                unreachable!("answer ring full: a caller exceeded its in-flight limit");
            }
        })
        .detach();
    }
}

/// Marks a cancellable call abandoned when its caller's future is dropped (a finished
/// call's job has answered, so the mark is seen by no one).
struct AbandonOnDrop(Option<Arc<AtomicBool>>);

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        if let Some(abandoned) = &self.0 {
            abandoned.store(true, Ordering::Relaxed);
        }
    }
}

/// `inner`, dropped unfinished (None) when polled after `abandoned` is set.
struct Unless<'a, F> {
    abandoned: &'a AtomicBool,
    inner: Pin<Box<F>>,
}

impl<'a, F: Future> Unless<'a, F> {
    fn new(abandoned: &'a AtomicBool, inner: F) -> Self {
        Unless {
            abandoned,
            inner: Box::pin(inner),
        }
    }
}

impl<F: Future> Future for Unless<'_, F> {
    type Output = Option<F::Output>;

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        if self.abandoned.load(Ordering::Relaxed) {
            return std::task::Poll::Ready(None);
        }
        self.inner.as_mut().poll(cx).map(Some)
    }
}

async fn deliver_answers(answers: ConnectedReceiver<Answer>, pending: Pending) {
    while let Some(Answer { id, reply }) = answers.recv().await {
        let waiter = pending.borrow_mut().remove(&id);
        if let Some(waiter) = waiter {
            // The caller may have given up waiting; its slot is free either way.
            let _ = waiter.send(reply);
        }
    }
    // The shard is gone: wake every waiter with `Unavailable`.
    pending.borrow_mut().clear();
}
