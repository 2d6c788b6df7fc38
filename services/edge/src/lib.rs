//! `sluice-edge`, the gateway a site runs so that readings survive its uplink going down
//! (issue #19). So far its durable spool ([`spool`]); the device API, the forwarder and the
//! binary follow the plan in docs/design/edge-gateway.md.

pub mod spool;
