//! Where a window's plan runs when its job asks for more than one machine (`engine: ballista`).
//! The catalog holds the engine as a trait object, so that planning and the lake's tables do not
//! depend on a cluster's crates (Ballista's brings its scheduler and executor along).

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::error::DataFusionError;
use datafusion::physical_plan::{ExecutionPlan, SendableRecordBatchStream};
use datafusion::prelude::SessionConfig;

#[async_trait]
pub trait RemoteEngine: Send + Sync + fmt::Debug {
    /// Runs `plan`, made by a session with `session_config`, on the cluster, and streams its
    /// result back.
    async fn execute_stream(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        session_config: &SessionConfig,
    ) -> Result<SendableRecordBatchStream, DataFusionError>;
}
