//! The faults real fleets have: how often each strikes, from the flags, and the malformed readings
//! ingest must refuse. `Fleet::tick` applies them to each reading.

use rand::Rng;
use rand::rngs::StdRng;
use serde_json::{Value, json};

use super::fleet::Device;

#[derive(Debug, Clone, Copy, Default)]
pub(super) struct FaultRates {
    pub(super) invalid: f64,
    pub(super) late: f64,
    pub(super) late_by_micros: i64,
    pub(super) out_of_order: f64,
    pub(super) duplicates: f64,
    pub(super) anomalies: f64,
}

/// A reading ingest must refuse, one of the mistakes device firmware makes.
pub(super) fn invalid_reading(rng: &mut StdRng, device: &Device, reported_ts: i64) -> Value {
    match rng.random_range(0..3) {
        0 => json!({"device_id": device.id, "ts": reported_ts, "seq": device.seq, "temperature": "hot"}),
        1 => json!({"device_id": device.id, "ts": reported_ts, "site": device.site}),
        _ => json!({"device_id": device.id, "ts": "noon", "seq": device.seq}),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::simulate::fleet::Fleet;
    use crate::simulate::parse_args as args;

    #[test]
    fn faults_come_at_their_rates_and_lose_no_reading() {
        let args = args(&["--devices", "20", "--history", "1h", "--seed", "7"]);
        let rates = FaultRates {
            invalid: 0.05,
            late: 0.1,
            late_by_micros: 300_000_000,
            out_of_order: 0.1,
            duplicates: 0.05,
            anomalies: 0.01,
        };
        let mut fleet = Fleet::new(&args, false, rates);
        let mut messages = Vec::new();
        for step in 0..500 {
            messages.extend(fleet.tick(step * 1_000_000));
        }
        messages.extend(fleet.drain());
        let count = |fault: &str| messages.iter().filter(|message| message.faults.contains(&fault)).count();
        let readings = 20 * 500;
        for (fault, rate) in [("invalid", 0.05), ("late", 0.1), ("duplicate", 0.05), ("anomaly", 0.01)] {
            let share = count(fault) as f64 / readings as f64;
            assert!((share - rate).abs() < rate * 0.3, "{fault}: {share} for {rate}");
        }
        assert!(count("out_of_order") > 500, "{}", count("out_of_order"));
        // Every (device, seq) is sent, once more for each duplicate.
        let distinct: BTreeSet<(String, i64)> = messages
            .iter()
            .filter_map(|message| Some((message.device_id.clone(), message.body["seq"].as_i64()?)))
            .collect();
        let missing_seq = messages.iter().filter(|message| message.body["seq"].is_null()).count();
        assert_eq!(distinct.len() + missing_seq, readings);
        assert_eq!(messages.len(), readings + count("duplicate"));
        // Out of order: some device sends a higher seq before a lower one.
        let mut reordered = false;
        let mut last: BTreeMap<&str, i64> = BTreeMap::new();
        for message in &messages {
            if let Some(seq) = message.body["seq"].as_i64() {
                if last.get(message.device_id.as_str()).is_some_and(|&previous| previous > seq) {
                    reordered = true;
                }
                last.insert(&message.device_id, seq);
            }
        }
        assert!(reordered);
    }
}
