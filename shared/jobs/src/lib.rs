//! The job contract that the executor and the CLI share: what a job definition says and how it
//! is checked, when its windows are due, the events about its runs, and the records in the lake
//! that make each window run once and say where its results are; who may submit, delete and
//! backfill jobs (signed requests), and the audit trail of those requests.

pub mod audit;
pub mod catch_up;
pub mod cron;
pub mod events;
pub mod job;
pub mod records;
pub mod signing;
