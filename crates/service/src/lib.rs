//! Plumbing every Flotilla service shares: layered configuration, telemetry, shutdown, the NATS
//! connection, idempotent creation of streams / consumers / buckets, publishing and acking.

pub mod accounts;
pub mod ack;
pub mod attest;
pub mod auth;
pub mod bootstrap;
pub mod budget;
pub mod config;
pub mod consume;
pub mod follow;
pub mod health;
pub mod lease;
pub mod local_server;
pub mod nats;
pub mod run;
pub mod shutdown;
pub mod telemetry;
pub mod topology;
pub mod trace;

pub use ack::AckGuard;
pub use config::{ClientAuth, CommonConfig, StreamSettings};
pub use nats::Fleet;
pub use run::Service;
pub use topology::{Mode, Topology};
