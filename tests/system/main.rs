//! Cross-service system tests: the real services (in process or as child processes) against a
//! fresh nats-server per test.
//!
//! One test binary for all of them (each file is a module): linking a dozen binaries that each
//! carry every service costs minutes and gigabytes of disk on a two-core CI machine.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod support;

mod agent_loop;
mod any_client;
mod approval;
mod audit;
mod autoscale;
mod bad_input;
mod budgets;
mod dashboard;
mod deadlocks;
mod dedupe;
mod drain;
mod failover;
mod fleet_changes;
mod genai_traces;
mod known_outcomes;
mod long_call;
mod messages;
mod observability;
mod prefixes;
mod real_model;
mod recovery;
mod retries;
mod roles;
mod runner_crash;
mod scale_out;
mod scheduling;
mod tls;
mod trace_propagation;
mod transcripts;
