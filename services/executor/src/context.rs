//! What the scheduling loop and the attempts it starts share, behind one `Arc`: this replica's
//! identity, the catalog, the threads runs execute on, the event publisher, the metrics and
//! the clock every time-dependent decision reads.

use std::sync::Arc;

use sluice_clock::Clock;
use sluice_lake::Lake;
use sluice_query::Catalog;

use crate::config::ExecutorConfig;
use crate::job_auth::JobAuth;
use crate::metrics::ExecutorMetrics;
use crate::publisher::EventPublisher;
use crate::runs::RunRuntime;
use crate::validation_markers::ValidationMarkers;
use crate::window_step::Replica;

#[derive(Debug)]
pub(crate) struct ExecutorContext {
    pub(crate) config: ExecutorConfig,
    pub(crate) catalog: Catalog,
    /// Where window runs execute, apart from the loop's runtime.
    pub(crate) run_runtime: RunRuntime,
    pub(crate) markers: ValidationMarkers,
    pub(crate) events: EventPublisher,
    pub(crate) metrics: Arc<ExecutorMetrics>,
    /// Due windows, leases and backoffs are decided by this clock, not the machine's directly.
    pub(crate) clock: Arc<dyn Clock>,
    /// Names this replica in claims and events (`executor.instance_id`, or a random one).
    pub(crate) instance_id: String,
    /// This process of the replica: a claim of the same replica by another incarnation is one a
    /// previous process left when it died.
    pub(crate) incarnation: String,
    /// Whether a job request may act; remembers the audit table's decisions.
    pub(crate) auth: JobAuth,
}

impl ExecutorContext {
    pub(crate) fn lake(&self) -> &Lake {
        self.catalog.lake()
    }

    pub(crate) fn replica(&self) -> Replica<'_> {
        Replica { instance_id: &self.instance_id, incarnation: &self.incarnation }
    }
}
