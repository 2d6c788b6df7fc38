//! SQL over the lake: each stream a table of one Delta version's files, limited to a window where
//! a run asks for one, the reference tables, the rules a query must follow and the limits a run
//! stays within. The executor runs jobs with it and the CLI validates and queries with it; a
//! cluster that runs plans elsewhere is behind [`engine::RemoteEngine`], so nothing here
//! depends on one.

pub mod catalog;
pub mod encryption;
pub mod engine;
mod join_order;
pub mod limits;
pub mod plan_stats;
pub mod result_types;
pub mod settings;
mod small_files;
pub mod sql_depth;
pub mod tables;
pub mod validate;
mod window_bounds;
pub mod window_read;

pub use crate::catalog::{Catalog, CatalogError, QueryError, Scope, Snapshot, plan_query};
pub use crate::encryption::Reader;
pub use crate::settings::{OpenCatalogError, QueryConfig, open_catalog};
pub use crate::validate::{ValidatedJob, ValidationError, validate_job};
