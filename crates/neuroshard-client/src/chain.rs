//! The failover chain as a state machine with no IO: what a session does next, given the reply
//! or the failure of its last call.
//!
//! A step sends one input through the hops of a chain, each hop's reply being the next hop's
//! input. Every hop keeps a [`ReplayLog`] of the inputs it accepted, at their absolute
//! positions. When a hop fails, the machine asks its driver for a replacement of the hop's
//! span; the replacement (one hop or several) gets the failed hop's log replayed, in order, at
//! the same positions, so its caches hold exactly what the failed hop's held, and then the
//! input that failed. Hops downstream keep their caches: what the replacement recomputes is
//! what they already consumed. A replacement may fail in turn; its own replay nests inside.
//!
//! The driver (`session.rs`) makes the calls, asks the router for plans, and feeds the results
//! back: [`Chain::start`], then [`Chain::replied`], [`Chain::failed`], [`Chain::replanned`] or
//! [`Chain::resume`], each returning the next [`Action`]. Deadlines and bans stay in the router;
//! this machine decides only what happens in which order, which is what the invariant (replayed
//! inputs equal the original ones) rests on, and is tested with thousands of seeded fault
//! schedules below.

use std::time::Duration;

use neuroshard_base::LayerRange;

use crate::router::Hop;

/// The inputs one hop accepted, at their absolute start positions, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayLog<I> {
    entries: Vec<(usize, I)>,
}

impl<I> Default for ReplayLog<I> {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
        }
    }
}

impl<I> ReplayLog<I> {
    /// Records `input` accepted at `pos`.
    pub fn push(&mut self, pos: usize, input: I) {
        self.entries.push((pos, input));
    }

    /// Calls recorded.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The recorded calls, oldest first.
    pub fn entries(&self) -> &[(usize, I)] {
        &self.entries
    }
}

/// Whose fault a failed call is, as failover decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The peer failed (an error status, a bad receipt, a failed spot check): replace it.
    Peer,
    /// The peer missed its deadline: replace it, or, if nobody else serves its span, ask it
    /// again with the first-call deadline (slow is not gone).
    Deadline,
    /// The peer could not be reached: replace it, or, if nobody else serves its span, ask it
    /// again after a pause that doubles with each try.
    Unreachable,
    /// The peer no longer serves the layers its listing named: plan around it without counting
    /// a failure.
    StaleListing,
    /// The request itself was refused (bad input): no other peer would do better.
    Request,
}

/// Why the chain could not go on, beyond the errors the driver reports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// An earlier failover could not restore the chain, so some hop lacks its cache.
    #[error("the session is broken: {0}")]
    Broken(String),
    /// A hop replied with something other than its layers produce.
    #[error("{addr} replied with output that does not fit layers {layers}")]
    Misfit {
        /// The peer.
        addr: String,
        /// The layers it was asked to run.
        layers: LayerRange,
    },
    /// The last hop returned hidden states instead of logits.
    #[error("the chain ended without logits")]
    NoLogits,
}

/// A hop's reply, as the driver reads it.
#[derive(Debug, Clone)]
pub enum Reply<I, L> {
    /// Hidden states: the next hop's input.
    Hidden(I),
    /// The model's logits (only the hop ending at the last layer returns them).
    Logits(L),
}

/// What the driver does next.
#[derive(Debug, PartialEq)]
pub enum Action<I, L, E> {
    /// Send `input` at `pos` to hop `hop`; `patient`: with the first-call deadline, since the
    /// peer missed its last one. Answer with [`Chain::replied`] or [`Chain::failed`].
    Call {
        /// Index into [`Chain::hops`].
        hop: usize,
        /// Absolute start position.
        pos: usize,
        /// What to send.
        input: I,
        /// Whether to give the first-call deadline.
        patient: bool,
    },
    /// Hop `hop` failed: count it against the peer (or, for a stale listing, forget the peer
    /// and read the listing again), then plan its span anew. Answer with [`Chain::replanned`].
    Replace {
        /// Index into [`Chain::hops`].
        hop: usize,
        /// The span to plan.
        span: LayerRange,
        /// Whether the failure was a stale listing (not counted as a failure).
        stale: bool,
    },
    /// Nobody else serves hop `hop`'s span: lift the peer's ban, wait `pause`, then
    /// [`Chain::resume`].
    Wait {
        /// Index into [`Chain::hops`].
        hop: usize,
        /// How long to wait first.
        pause: Duration,
    },
    /// The step is done: the logits of its last token.
    Done(L),
    /// The step failed.
    Fail(E),
}

/// What planning a replacement gave.
#[derive(Debug)]
pub enum Replan<E> {
    /// A chain of hops covering the span.
    Hops(Vec<Hop>),
    /// No live peer covers the span.
    NoRoute(E),
    /// Planning failed otherwise (the listing could not be read).
    Failed(E),
}

/// The first pause before asking an unreachable peer that nobody can replace again; it doubles
/// with each try, so the session's failovers (4 by default) cover about 4 s.
pub const UNREACHABLE_PAUSE: Duration = Duration::from_millis(250);

/// One hop of the chain and the inputs it accepted.
#[derive(Debug)]
pub struct Link<I> {
    /// Who runs which layers.
    pub hop: Hop,
    /// What it accepted.
    pub log: ReplayLog<I>,
    /// The peer missed a deadline with nobody to replace it: its next call gets the
    /// first-call deadline.
    patient: bool,
}

impl<I> Link<I> {
    fn new(hop: Hop) -> Self {
        Self {
            hop,
            log: ReplayLog::default(),
            patient: false,
        }
    }
}

/// Inputs on their way through hops `hop..` until the hop ending at layer `stop`: the step's
/// own input (the bottom frame), or a failed hop's log being replayed (the frames above it).
#[derive(Debug)]
struct Frame<I> {
    hop: usize,
    stop: u32,
    pos: usize,
    input: I,
    /// What is left to replay after `input`, oldest first.
    queue: std::vec::IntoIter<(usize, I)>,
}

/// What the machine is waiting for.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Awaiting {
    Nothing,
    Reply,
    Plan { hop: usize, fault: Fault },
    Resume,
}

/// A session's chain and where its current step stands.
#[derive(Debug)]
pub struct Chain<I, L, E> {
    links: Vec<Link<I>>,
    total_layers: u32,
    max_failovers: usize,
    failovers_left: usize,
    frames: Vec<Frame<I>>,
    awaiting: Awaiting,
    /// The error that failed the pending replacement, kept until [`Chain::replanned`] decides.
    pending: Option<E>,
    broken: Option<String>,
    events: Vec<String>,
    _logits: std::marker::PhantomData<L>,
}

impl<I, L, E> Chain<I, L, E>
where
    I: Clone,
    E: std::fmt::Display + From<ChainError>,
{
    /// A chain over `hops` (which cover layers `0..total_layers` in order), allowing
    /// `max_failovers` failovers in each step.
    pub fn new(hops: Vec<Hop>, total_layers: u32, max_failovers: usize) -> Self {
        Self {
            links: hops.into_iter().map(Link::new).collect(),
            total_layers,
            max_failovers,
            failovers_left: max_failovers,
            frames: Vec::new(),
            awaiting: Awaiting::Nothing,
            pending: None,
            broken: None,
            events: Vec::new(),
            _logits: std::marker::PhantomData,
        }
    }

    /// The hops, in layer order, with their logs.
    pub fn links(&self) -> &[Link<I>] {
        &self.links
    }

    /// The hops, in layer order.
    pub fn hops(&self) -> impl Iterator<Item = &Hop> {
        self.links.iter().map(|l| &l.hop)
    }

    /// Sets the hops of a chain that has none yet (its first step plans them).
    pub fn set_hops(&mut self, hops: Vec<Hop>) {
        debug_assert!(self.links.is_empty(), "the chain is planned once");
        self.links = hops.into_iter().map(Link::new).collect();
    }

    /// Takes the hops out, leaving the chain empty.
    pub fn take_hops(&mut self) -> Vec<Hop> {
        std::mem::take(&mut self.links)
            .into_iter()
            .map(|l| l.hop)
            .collect()
    }

    /// Failovers that happened, as readable lines.
    pub fn events(&self) -> &[String] {
        &self.events
    }

    /// Why the chain cannot go on, once a failover failed.
    pub fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    /// Begins a step: `input` at `pos` through the whole chain, with a fresh failover budget.
    pub fn start(&mut self, pos: usize, input: I) -> Action<I, L, E> {
        if let Some(why) = &self.broken {
            return Action::Fail(ChainError::Broken(why.clone()).into());
        }
        self.failovers_left = self.max_failovers;
        self.frames = vec![Frame {
            hop: 0,
            stop: self.total_layers,
            pos,
            input,
            queue: Vec::new().into_iter(),
        }];
        self.call()
    }

    /// The last call's reply.
    pub fn replied(&mut self, reply: Reply<I, L>) -> Action<I, L, E> {
        debug_assert_eq!(self.awaiting, Awaiting::Reply, "a reply nobody asked for");
        let frame = self.frames.last_mut().expect("a step in progress");
        let link = &mut self.links[frame.hop];
        let end = link.hop.layers.end;
        match reply {
            Reply::Logits(logits) if end == self.total_layers => {
                link.log.push(frame.pos, frame.input.clone());
                // Logits only come from the last hop, which is the top frame's stop.
                self.next_input().unwrap_or(Action::Done(logits))
            }
            Reply::Hidden(hidden) if end <= frame.stop => {
                // At the frame's stop the hidden states are dropped: the hop after it already
                // has them (a replay), or there is none (a chain without logits).
                link.log.push(frame.pos, frame.input.clone());
                if end < frame.stop {
                    frame.hop += 1;
                    frame.input = hidden;
                    return self.call();
                }
                match self.next_input() {
                    Some(action) => action,
                    // The whole chain ran and its last hop sent hidden states: the request
                    // fails, the chain's caches are whole.
                    None => Action::Fail(ChainError::NoLogits.into()),
                }
            }
            _ => {
                let misfit = ChainError::Misfit {
                    addr: link.hop.addr.clone(),
                    layers: link.hop.layers,
                };
                self.failed(Fault::Peer, misfit.into())
            }
        }
    }

    /// The top frame reached its stop: go on with the next input it replays, or return to the
    /// frame below (which calls its hop again, now the replacement). `None` when the step's
    /// own frame is done.
    fn next_input(&mut self) -> Option<Action<I, L, E>> {
        let frame = self.frames.last_mut().expect("a step in progress");
        if let Some((pos, input)) = frame.queue.next() {
            // The replay's next entry starts again at the first replacement hop.
            let first = self.replay_start();
            let frame = self.frames.last_mut().expect("a step in progress");
            (frame.hop, frame.pos, frame.input) = (first, pos, input);
            return Some(self.call());
        }
        if self.frames.len() == 1 {
            self.frames.clear();
            self.awaiting = Awaiting::Nothing;
            return None;
        }
        self.frames.pop();
        Some(self.call())
    }

    /// The hop a replay frame starts from: the frame below calls the failed hop's index,
    /// which the first replacement now holds.
    fn replay_start(&self) -> usize {
        self.frames[self.frames.len() - 2].hop
    }

    /// The last call failed with `err`, whose kind is `fault`.
    pub fn failed(&mut self, fault: Fault, err: E) -> Action<I, L, E> {
        let hop = self.frames.last().expect("a step in progress").hop;
        if fault == Fault::Request {
            // Another peer would refuse it too. Inside a replay the chain has lost a cache.
            if self.frames.len() > 1 {
                return self.fail(err);
            }
            self.frames.clear();
            self.awaiting = Awaiting::Nothing;
            return Action::Fail(err);
        }
        if self.failovers_left == 0 {
            return self.fail(err);
        }
        self.failovers_left -= 1;
        self.pending = Some(err);
        self.awaiting = Awaiting::Plan { hop, fault };
        Action::Replace {
            hop,
            span: self.links[hop].hop.layers,
            stale: fault == Fault::StaleListing,
        }
    }

    /// What planning the replacement asked for by [`Action::Replace`] gave.
    pub fn replanned(&mut self, plan: Replan<E>) -> Action<I, L, E> {
        let Awaiting::Plan { hop, fault } = self.awaiting else {
            panic!("a plan nobody asked for");
        };
        let err = self.pending.take().expect("the failure being replaced");
        let hops = match plan {
            Replan::Hops(hops) if !hops.is_empty() => hops,
            Replan::Hops(_) => {
                let why = format!("no replacement planned for {}", self.links[hop].hop.layers);
                return self.fail(ChainError::Broken(why).into());
            }
            Replan::NoRoute(_) if matches!(fault, Fault::Deadline | Fault::Unreachable) => {
                return self.wait_longer(hop, fault, err);
            }
            Replan::NoRoute(e) | Replan::Failed(e) => return self.fail(e),
        };
        let failed = self.links.remove(hop);
        let span = failed.hop.layers;
        self.events.push(format!(
            "hop {span} on {} failed ({err}); replaying {} calls to {}",
            failed.hop.addr,
            failed.log.len(),
            hops.iter()
                .map(|h| format!("{} [{}]", h.addr, h.layers))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        for (offset, h) in hops.into_iter().enumerate() {
            self.links.insert(hop + offset, Link::new(h));
        }
        let mut queue = failed.log.entries.into_iter();
        match queue.next() {
            Some((pos, input)) => {
                self.frames.push(Frame {
                    hop,
                    stop: span.end,
                    pos,
                    input,
                    queue,
                });
                self.call()
            }
            // Nothing to replay: the replacement takes the failed input as it is.
            None => self.call(),
        }
    }

    /// Keeps hop `hop`, whose peer missed its deadline or could not be reached while no other
    /// peer serves its span: a stalled peer (a GPU compiling kernels, a busy home PC) is slow,
    /// not gone, and one behind a restarting relay is back once it has registered again. Each
    /// wait spends one of the step's failovers, so a peer that never answers still ends it.
    fn wait_longer(&mut self, hop: usize, fault: Fault, err: E) -> Action<I, L, E> {
        let link = &mut self.links[hop];
        let span = link.hop.layers;
        link.patient = true;
        // Down for a moment, as when its relay restarts: asked again after a pause that doubles
        // with each try.
        let pause = match fault {
            Fault::Unreachable => {
                let tries = self.max_failovers - self.failovers_left;
                UNREACHABLE_PAUSE * 2u32.pow(tries.saturating_sub(1).min(4) as u32)
            }
            _ => Duration::ZERO,
        };
        self.events.push(format!(
            "hop {span} on {} failed ({err}); no other peer serves {span}, so it is asked \
             again with the first-call deadline",
            link.hop.addr,
        ));
        self.awaiting = Awaiting::Resume;
        Action::Wait { hop, pause }
    }

    /// The wait asked for by [`Action::Wait`] is over.
    pub fn resume(&mut self) -> Action<I, L, E> {
        debug_assert_eq!(self.awaiting, Awaiting::Resume, "a resume nobody asked for");
        self.call()
    }

    /// Calls the top frame's hop with its input.
    fn call(&mut self) -> Action<I, L, E> {
        let frame = self.frames.last().expect("a step in progress");
        let link = &mut self.links[frame.hop];
        self.awaiting = Awaiting::Reply;
        Action::Call {
            hop: frame.hop,
            pos: frame.pos,
            input: frame.input.clone(),
            patient: std::mem::take(&mut link.patient),
        }
    }

    /// Ends the step with `err` and marks the chain broken: some hop may lack its cache.
    fn fail(&mut self, err: E) -> Action<I, L, E> {
        self.broken.get_or_insert_with(|| err.to_string());
        self.frames.clear();
        self.awaiting = Awaiting::Nothing;
        Action::Fail(err)
    }
}

#[cfg(test)]
mod tests;
