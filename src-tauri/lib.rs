//! The NeuroShard desktop app: a Tauri shell over the embedded node.
//!
//! [`desktop`] is the core (node, settings, holds, meter, status) and runs without a window;
//! [`commands`] are what the page invokes; [`tray`] and [`status`] are pure views the shell
//! draws; [`layers`] plans which layers to serve and what they cost; [`models`] lists the
//! swarm's models and where to fetch one from; [`chat`] runs the chat page and the loopback
//! API over the swarm.

pub mod chat;
pub mod commands;
pub mod desktop;
pub mod error;
pub mod fullscreen;
pub mod launch;
pub mod layers;
pub mod models;
pub mod notices;
pub mod receipts;
mod shell;
pub mod status;
pub mod storage;
pub mod tray;

pub use shell::{NAVIGATE_EVENT, STATUS_EVENT, run};

#[cfg(test)]
mod tests;
