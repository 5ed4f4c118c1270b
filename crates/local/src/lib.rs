//! A whole Flotilla fleet in one process: the one place where services are composed. A
//! [`LocalFleet`] starts a nats-server when it is given no URL, ensures the fleet's topology, and
//! runs services (any [`flotilla_service::Service`]) on connections of their own, each with its own
//! stop token; it stops them in order, drains their connections and then stops the server.
//! `flotilla up` and `flotilla demo` run all four services from the configuration through it
//! ([`LocalFleet::start_all`]), the system tests and the benchmarks the ones they need.

mod fleet;
mod server;
mod whole;

pub use fleet::{LocalFleet, Options, ServiceHandle};
pub use server::{LocalNats, Nats, SERVER_CONF, ServerConfig};
pub use whole::FleetConfig;

/// The agent-runner's fleet file (templates of the agents a runner hosts), for callers that
/// load or edit one before [`LocalFleet::start_all`].
pub use flotilla_agent_runner::FleetFile;
