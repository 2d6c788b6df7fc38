//! Telemetry readings as devices would send them.

use crate::now_micros;

/// Telemetry readings for tests: `num_devices` devices, `seq` counting per device, event times
/// spread over `span_micros` ending an hour ago, shuffled a little so some arrive late.
pub fn telemetry_readings(
    num_records: usize,
    num_devices: usize,
    span_micros: i64,
) -> Vec<serde_json::Value> {
    let end = now_micros() - 3_600_000_000;
    let start = end - span_micros;
    let step = (span_micros / num_records.max(1) as i64).max(1);
    (0..num_records)
        .map(|index| {
            let device = index % num_devices;
            // Every 7th reading is two steps late relative to its neighbours.
            let lateness = if index % 7 == 0 { 2 * step * num_devices as i64 } else { 0 };
            serde_json::json!({
                "device_id": format!("dev-{device:04}"),
                "ts": (start + index as i64 * step - lateness).max(start),
                "seq": (index / num_devices) as i64,
                "temperature": (index % 50) as f64 / 2.0,
            })
        })
        .collect()
}
