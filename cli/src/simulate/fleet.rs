//! The fleet: devices with their own sites, transports, batteries and clocks, and the readings
//! they take, with the faults of `faults` applied.

use std::collections::BTreeSet;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use super::SimulateArgs;
use super::faults::{FaultRates, invalid_reading};

const DAY_MICROS: f64 = 86_400_000_000.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Transport {
    Http,
    Mqtt,
}

/// One message a device sends: a valid reading, or an invalid one.
#[derive(Debug, Clone)]
pub(super) struct Outgoing {
    pub(super) device_id: String,
    pub(super) transport: Transport,
    pub(super) body: Value,
    pub(super) faults: Vec<&'static str>,
}

impl Outgoing {
    pub(super) fn is_invalid(&self) -> bool {
        self.faults.contains(&"invalid")
    }
}

#[derive(Debug)]
pub(super) struct Device {
    pub(super) id: String,
    pub(super) site: String,
    transport: Transport,
    pub(super) seq: i64,
    battery: f64,
    skew_micros: i64,
    base_temperature: f64,
    rssi_base: i32,
    held_back_opt: Option<Outgoing>,
}

/// The fleet: devices and their signals, with faults applied. Pure: the caller decides the event
/// times and sends what comes out.
pub(super) struct Fleet {
    devices: Vec<Device>,
    rng: StdRng,
    faults: FaultRates,
}

impl Fleet {
    pub(super) fn new(args: &SimulateArgs, use_mqtt: bool, faults: FaultRates) -> Self {
        let mut rng = StdRng::seed_from_u64(args.seed);
        let num_mqtt = if use_mqtt { (args.devices as f64 * args.mqtt_share).round() as usize } else { 0 };
        let skew_micros = i64::try_from(args.clock_skew.as_micros()).unwrap_or(i64::MAX / 4);
        // Which devices use MQTT: a seeded shuffle, so that both transports serve every site.
        let mut order: Vec<usize> = (0..args.devices).collect();
        for index in (1..order.len()).rev() {
            order.swap(index, rng.random_range(0..=index));
        }
        let mqtt_devices: BTreeSet<usize> = order.into_iter().take(num_mqtt).collect();
        let devices = (0..args.devices)
            .map(|index| {
                let site = index % args.sites.max(1);
                Device {
                    id: format!("{}-{}-{index:04}", args.device_prefix, site + 1),
                    site: format!("site-{}", site + 1),
                    transport: if mqtt_devices.contains(&index) { Transport::Mqtt } else { Transport::Http },
                    seq: 0,
                    battery: rng.random_range(0.5..1.0),
                    skew_micros: if skew_micros > 0 {
                        rng.random_range(-skew_micros..=skew_micros)
                    } else {
                        0
                    },
                    base_temperature: 12.0 + 3.0 * site as f64 + rng.random_range(-1.0..1.0),
                    rssi_base: -55 - 5 * (site as i32 % 6),
                    held_back_opt: None,
                }
            })
            .collect();
        Self { devices, rng, faults }
    }

    pub(super) fn num_mqtt_devices(&self) -> usize {
        self.devices.iter().filter(|device| device.transport == Transport::Mqtt).count()
    }

    /// Every device's messages for one reading taken at `event_time_micros` (true time; the
    /// device's clock skew is added to what it reports).
    pub(super) fn tick(&mut self, event_time_micros: i64) -> Vec<Outgoing> {
        let mut out = Vec::with_capacity(self.devices.len());
        let faults = self.faults;
        for index in 0..self.devices.len() {
            let rng = &mut self.rng;
            let device = &mut self.devices[index];
            device.seq += 1;
            let mut message_faults = Vec::new();
            let mut reported_ts = event_time_micros + device.skew_micros;
            if device.skew_micros != 0 {
                message_faults.push("clock_skew");
            }
            if rng.random_bool(faults.late.clamp(0.0, 1.0)) {
                reported_ts -= faults.late_by_micros;
                message_faults.push("late");
            }
            let body = if rng.random_bool(faults.invalid.clamp(0.0, 1.0)) {
                message_faults.push("invalid");
                invalid_reading(rng, device, reported_ts)
            } else {
                let anomaly = rng.random_bool(faults.anomalies.clamp(0.0, 1.0));
                if anomaly {
                    message_faults.push("anomaly");
                }
                reading(rng, device, event_time_micros, reported_ts, anomaly)
            };
            let message = Outgoing {
                device_id: device.id.clone(),
                transport: device.transport,
                body,
                faults: message_faults,
            };
            // A held-back reading goes out right after this one: out of order.
            let held_back_opt = device.held_back_opt.take();
            if held_back_opt.is_none() && rng.random_bool(faults.out_of_order.clamp(0.0, 1.0)) {
                let mut held = message;
                held.faults.push("out_of_order");
                device.held_back_opt = Some(held);
            } else {
                let duplicate = rng.random_bool(faults.duplicates.clamp(0.0, 1.0));
                if duplicate && !message.is_invalid() {
                    let mut retry = message.clone();
                    retry.faults.push("duplicate");
                    out.push(message);
                    out.push(retry);
                } else {
                    out.push(message);
                }
            }
            if let Some(held) = held_back_opt {
                out.push(held);
            }
        }
        out
    }

    /// Readings still held back for reordering, sent at the end so that none is lost.
    pub(super) fn drain(&mut self) -> Vec<Outgoing> {
        self.devices.iter_mut().filter_map(|device| device.held_back_opt.take()).collect()
    }
}

/// Standard normal noise (Box-Muller); rand's own distributions crate is not worth a dependency.
fn gaussian(rng: &mut StdRng) -> f64 {
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random_range(0.0..1.0);
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn round(value: f64, decimals: i32) -> f64 {
    let factor = 10f64.powi(decimals);
    (value * factor).round() / factor
}

fn reading(
    rng: &mut StdRng,
    device: &mut Device,
    event_time_micros: i64,
    reported_ts: i64,
    anomaly: bool,
) -> Value {
    // Daily cycle: coolest around 03:00 UTC, warmest around 15:00.
    let day_fraction = event_time_micros.rem_euclid(DAY_MICROS as i64) as f64 / DAY_MICROS;
    let cycle = (std::f64::consts::TAU * (day_fraction - 0.375)).sin();
    let mut temperature = device.base_temperature + 6.0 * cycle + 0.3 * gaussian(rng);
    if anomaly {
        temperature += rng.random_range(15.0..25.0);
    }
    let humidity =
        (65.0 - 2.0 * (temperature - device.base_temperature) + 2.0 * gaussian(rng)).clamp(5.0, 100.0);
    device.battery -= 0.0004 + 0.0001 * rng.random_range(0.0..1.0);
    if device.battery < 0.05 {
        // Someone swapped the battery.
        device.battery = 1.0;
    }
    let status = if anomaly {
        "FAULT"
    } else if device.battery < 0.2 {
        "WARN"
    } else {
        "OK"
    };
    json!({
        "device_id": device.id,
        "ts": reported_ts,
        "seq": device.seq,
        "site": device.site,
        "temperature": round(temperature, 2),
        "humidity": round(humidity, 1),
        "battery": round(device.battery, 4),
        "rssi": device.rssi_base - rng.random_range(0..20),
        "status": status,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::simulate::parse_args as args;

    #[test]
    fn signals_stay_in_physical_ranges_and_sequences_increase() {
        let args = args(&["--devices", "8", "--sites", "3", "--history", "1h"]);
        let mut fleet = Fleet::new(&args, false, FaultRates::default());
        let mut last_seq: BTreeMap<String, i64> = BTreeMap::new();
        let start = 1_764_144_000_000_000; // 2025-11-26T08:00:00Z
        for step in 0..2_000 {
            for message in fleet.tick(start + step * 60_000_000) {
                let reading = &message.body;
                let temperature = reading["temperature"].as_f64().unwrap();
                assert!((-10.0..45.0).contains(&temperature), "{reading}");
                let battery = reading["battery"].as_f64().unwrap();
                assert!((0.0..=1.0).contains(&battery), "{reading}");
                let humidity = reading["humidity"].as_f64().unwrap();
                assert!((5.0..=100.0).contains(&humidity), "{reading}");
                let seq = reading["seq"].as_i64().unwrap();
                let previous = last_seq.insert(message.device_id.clone(), seq).unwrap_or(0);
                assert_eq!(seq, previous + 1, "{reading}");
                assert_eq!(reading["ts"].as_i64().unwrap(), start + step * 60_000_000);
            }
        }
        let sites: BTreeSet<&str> = fleet.devices.iter().map(|device| device.site.as_str()).collect();
        assert_eq!(sites.len(), 3);
    }

    #[test]
    fn mqtt_devices_are_the_asked_share_and_spread_over_sites() {
        let args = args(&["--devices", "40", "--sites", "4", "--mqtt-share", "0.25", "--history", "1m"]);
        let fleet = Fleet::new(&args, true, FaultRates::default());
        assert_eq!(fleet.num_mqtt_devices(), 10);
        let mqtt_sites: BTreeSet<&str> = fleet
            .devices
            .iter()
            .filter(|device| device.transport == Transport::Mqtt)
            .map(|device| device.site.as_str())
            .collect();
        assert!(mqtt_sites.len() >= 2, "{mqtt_sites:?}");
        assert_eq!(Fleet::new(&args, false, FaultRates::default()).num_mqtt_devices(), 0);
    }
}
