//! What the simulator sent and what ingest answered, counted as it goes and summed up at the end.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};

use super::SimulateArgs;
use super::fleet::Outgoing;

/// What was sent and what came of it.
#[derive(Debug, Default)]
pub(super) struct Report {
    pub(super) http_sent: u64,
    pub(super) http_accepted: u64,
    pub(super) http_rejected: u64,
    pub(super) mqtt_published: u64,
    pub(super) rejected_by_reason: BTreeMap<String, u64>,
    pub(super) faults: BTreeMap<&'static str, u64>,
    pub(super) first_event_time_opt: Option<i64>,
    pub(super) last_event_time_opt: Option<i64>,
    pub(super) http_requests: u64,
    pub(super) http_retries: u64,
    pub(super) elapsed: Duration,
}

impl Report {
    /// Counts a message about to be sent: its faults and its event time.
    pub(super) fn count_outgoing(&mut self, message: &Outgoing) {
        for fault in &message.faults {
            *self.faults.entry(fault).or_default() += 1;
        }
        if let Some(ts) = message.body["ts"].as_i64() {
            let first = self.first_event_time_opt.get_or_insert(ts);
            *first = (*first).min(ts);
            let last = self.last_event_time_opt.get_or_insert(ts);
            *last = (*last).max(ts);
        }
    }

    pub(super) fn to_json(&self, args: &SimulateArgs, num_mqtt_devices: usize) -> Value {
        json!({
            "devices": args.devices,
            "mqtt_devices": num_mqtt_devices,
            "sites": args.sites,
            "sent": self.http_sent + self.mqtt_published,
            "http": {
                "sent": self.http_sent,
                "accepted": self.http_accepted,
                "rejected": self.http_rejected,
                "requests": self.http_requests,
                "retries": self.http_retries,
            },
            "mqtt": {"published": self.mqtt_published},
            "rejected_by_reason": self.rejected_by_reason,
            "faults": self.faults,
            "first_event_time": self.first_event_time_opt.map(sluice_clock::format_micros),
            "last_event_time": self.last_event_time_opt.map(sluice_clock::format_micros),
            "elapsed_seconds": self.elapsed.as_secs_f64(),
            "readings_per_second": self.readings_per_second(),
        })
    }

    /// Sending rate over the whole run, answers included: with history, ingest's throughput.
    fn readings_per_second(&self) -> f64 {
        (self.http_sent + self.mqtt_published) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub(super) fn print_text(&self, args: &SimulateArgs, num_mqtt_devices: usize) -> anyhow::Result<()> {
        outln!(
            "sent {} readings from {} devices at {} sites ({} over MQTT) in {:.1} s, {:.0} readings/s",
            self.http_sent + self.mqtt_published,
            args.devices,
            args.sites,
            num_mqtt_devices,
            self.elapsed.as_secs_f64(),
            self.readings_per_second()
        );
        outln!(
            "  HTTP: {} sent, {} accepted, {} rejected ({} requests, {} retried)",
            self.http_sent,
            self.http_accepted,
            self.http_rejected,
            self.http_requests,
            self.http_retries
        );
        for (reason, count) in &self.rejected_by_reason {
            outln!("    rejected {count}: {reason}");
        }
        if self.mqtt_published > 0 {
            outln!(
                "  MQTT: {} published and acknowledged by the MQTT broker (invalid ones go to the dead-letter topic)",
                self.mqtt_published
            );
        }
        if !self.faults.is_empty() {
            let faults: Vec<String> =
                self.faults.iter().map(|(fault, count)| format!("{fault} {count}")).collect();
            outln!("  faults: {}", faults.join(", "));
        }
        if let (Some(first), Some(last)) = (self.first_event_time_opt, self.last_event_time_opt) {
            outln!(
                "  event times {} to {}",
                sluice_clock::format_micros(first),
                sluice_clock::format_micros(last)
            );
        }
        Ok(())
    }
}
