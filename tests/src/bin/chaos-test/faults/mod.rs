//! The faults, one function each, injected while the sale's load runs (see
//! [`crate::system::System::begin`]). Each prints what it did and what it measured, and returns
//! the violations it saw itself (the promises are checked afterwards by [`crate::check`]).
//! [`processes`]: crashes and restarts of allot's own processes; [`outages`]: the services
//! stopped and started; [`messages`]: what reaches the queues (floods, poison, duplicates);
//! [`cluster`]: the cluster form's faults (nodes, instances, rolling restarts).

mod cluster;
mod messages;
mod outages;
mod processes;

pub use cluster::{
    api_instance_crash, majority_lost, node_down, rolling_restart, worker_instance_crash,
};
pub use messages::{duplicates, flood, poison};
pub use outages::{broker_restart, postgres_restart, redis_restart};
pub use processes::{api_crash, api_restart, worker_crash, worker_rolling_restart};

use std::time::Duration;

/// Lets the load run for a while.
pub(super) async fn under_load(duration: Duration) {
    tokio::time::sleep(duration).await;
}
