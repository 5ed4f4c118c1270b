//! The one shape every service runs in: a value of its own (its settings, and whatever else it
//! needs that is not NATS), the fleet's connection and topology, and a shutdown token. The
//! service binaries, the one-process fleet and the tests all start services through it.

use std::future::Future;

use tokio_util::sync::CancellationToken;

use crate::{Fleet, Topology};

/// A Flotilla service, ready to run.
pub trait Service: Send + 'static {
    /// The service's name, one of `flotilla_protocol::names::service`.
    const NAME: &'static str;

    /// Runs until `shutdown` is cancelled, then stops in order (intake first, in-flight work
    /// finished or handed back); returns an error only when the service cannot go on.
    fn run(
        self,
        fleet: Fleet,
        topology: Topology,
        shutdown: CancellationToken,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
}
