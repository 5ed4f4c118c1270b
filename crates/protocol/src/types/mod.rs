//! Wire types, one module per domain, all re-exported here (and from the crate root). Fields are
//! only ever added, with defaults.

mod agent;
mod budget;
mod common;
mod control;
mod message;
mod stats;
mod task;
mod task_record;
mod transcript;

pub use agent::*;
pub use budget::*;
pub use common::*;
pub use control::*;
pub use message::*;
pub use stats::*;
pub use task::*;
pub use task_record::*;
pub use transcript::*;
