//! Whether a node takes work: serving, draining, paused or stopped, with a watch of its status
//! and a stream of events for the desktop app and the CLI.
//!
//! Every Forward enters through [`Lifecycle::admit`], which counts it in flight before it looks
//! at the state, so [`Lifecycle::drain`] cannot miss a call that slipped in as it began: such a
//! call sees `Draining` and is refused, or was already counted and is waited for.

use tokio::sync::{broadcast, watch};

use neuroshard_net::NodeError;

/// Events kept for a slow subscriber before it starts missing the oldest: state changes are
/// rare, so a few dozen cover any UI that is alive at all.
const EVENT_BACKLOG: usize = 64;

/// Whether the node takes new work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Taking calls.
    Serving,
    /// Refusing new calls until those in flight finish, then pausing.
    Draining,
    /// Refusing calls until resumed; peers fail over to replicas.
    Paused,
    /// Shut down or killed; final.
    Stopped,
}

/// What the status watch holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct NodeStatus {
    /// Whether the node takes work.
    pub state: RunState,
    /// Forward calls being served now.
    pub in_flight: usize,
}

/// Something that happened to the node, for whoever listens.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum NodeEvent {
    /// The run state changed.
    StateChanged {
        /// The new state.
        state: RunState,
    },
}

/// The node's run state, its calls in flight, and the event stream.
#[derive(Debug)]
pub struct Lifecycle {
    status: watch::Sender<NodeStatus>,
    events: broadcast::Sender<NodeEvent>,
}

/// A call counted in flight until dropped.
#[derive(Debug)]
pub struct Admitted<'a>(&'a watch::Sender<NodeStatus>);

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|s| s.in_flight -= 1);
    }
}

impl Lifecycle {
    /// A lifecycle starting in `state`.
    pub fn new(state: RunState) -> Self {
        Self {
            status: watch::Sender::new(NodeStatus {
                state,
                in_flight: 0,
            }),
            events: broadcast::Sender::new(EVENT_BACKLOG),
        }
    }

    /// The state now.
    pub fn state(&self) -> RunState {
        self.status.borrow().state
    }

    /// A watch of the status.
    pub fn watch(&self) -> watch::Receiver<NodeStatus> {
        self.status.subscribe()
    }

    /// The event stream from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<NodeEvent> {
        self.events.subscribe()
    }

    /// Counts a call in flight and lets it in if the node is serving.
    pub fn admit(&self) -> Result<Admitted<'_>, NodeError> {
        self.status.send_modify(|s| s.in_flight += 1);
        let admitted = Admitted(&self.status);
        match self.state() {
            RunState::Serving => Ok(admitted),
            RunState::Stopped => Err(NodeError::ShuttingDown),
            state => Err(NodeError::NotServing {
                draining: state == RunState::Draining,
            }),
        }
    }

    /// Moves to `state` unless stopped (which is final); announces a change.
    pub fn set(&self, state: RunState) {
        self.transition(state, |s| s.state != RunState::Stopped);
    }

    /// Moves to `state` when `allowed` holds for the status now and the state differs;
    /// announces the change.
    fn transition(&self, state: RunState, allowed: impl Fn(&NodeStatus) -> bool) {
        let changed = self.status.send_if_modified(|s| {
            let change = s.state != state && allowed(s);
            if change {
                s.state = state;
            }
            change
        });
        if changed {
            let _ = self.events.send(NodeEvent::StateChanged { state });
        }
    }

    /// Refuses new calls, waits for those in flight, then pauses (unless resumed or stopped
    /// meanwhile).
    pub async fn drain(&self) {
        self.set(RunState::Draining);
        let mut status = self.status.subscribe();
        let _ = status
            .wait_for(|s| s.in_flight == 0 || s.state != RunState::Draining)
            .await;
        self.transition(RunState::Paused, |s| {
            s.state == RunState::Draining && s.in_flight == 0
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_waits_for_calls_in_flight_and_refuses_new_ones() {
        let life = Lifecycle::new(RunState::Serving);
        let mut events = life.subscribe();
        let call = life.admit().unwrap();
        let drain = life.drain();
        tokio::pin!(drain);
        // The drain cannot finish while the call is in flight.
        assert!(futures::poll!(drain.as_mut()).is_pending());
        assert_eq!(life.state(), RunState::Draining);
        assert!(matches!(
            life.admit(),
            Err(NodeError::NotServing { draining: true })
        ));
        drop(call);
        drain.await;
        assert_eq!(
            *life.watch().borrow(),
            NodeStatus {
                state: RunState::Paused,
                in_flight: 0
            }
        );
        let seen: Vec<_> = std::iter::from_fn(|| events.try_recv().ok()).collect();
        assert_eq!(
            seen,
            [RunState::Draining, RunState::Paused].map(|state| NodeEvent::StateChanged { state })
        );
    }

    #[test]
    fn stopped_is_final() {
        let life = Lifecycle::new(RunState::Paused);
        life.set(RunState::Stopped);
        life.set(RunState::Serving);
        assert_eq!(life.state(), RunState::Stopped);
        assert!(matches!(life.admit(), Err(NodeError::ShuttingDown)));
    }
}
