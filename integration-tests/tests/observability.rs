//! deploy/otel: the alert rules and the dashboards' queries are valid PromQL (promtool), the alert
//! rules behave as their unit tests say, and every metric and label they query is emitted by the
//! services (ingest, compactor, executor and two edge gateways) under that name, to a real
//! OTLP/gRPC receiver, with the spans of an ingest request, a compactor flush and commit, and a
//! job run with its DataFusion phases.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fake_opentelemetry_collector::{ExportedMetric, ExportedSpan, FakeCollectorServer};
use serde_json::{Value, json};
use sluice_edge::spool::FullPolicy;
use sluice_executor::runs::{OutcomeStatus, load_windows};
use sluice_integration_tests::{
    Broker, CompactorService, EdgeService, ExecutorService, IngestService, compactor_config, edge_config,
    executor_config, ingest_config, open_local_lake, repo_root, submit_job, telemetry_readings,
    unique_suffix, wait_for_lake_rows, wait_until,
};
use sluice_telemetry::{OtlpProtocol, TelemetryConfig};

const HOUR: i64 = 3_600_000_000;

/// Labels Prometheus adds itself (`le` of histogram buckets) or the collector sets from the
/// resource (`job`, `instance`): not attributes of the data points.
const NON_ATTRIBUTE_LABELS: [&str; 3] = ["le", "job", "instance"];

fn otel_dir() -> PathBuf {
    repo_root().join("deploy/otel")
}

fn promtool() -> PathBuf {
    let output = Command::new(repo_root().join("deploy/local/promtool.sh")).arg("path").output().unwrap();
    assert!(output.status.success(), "promtool.sh: {}", String::from_utf8_lossy(&output.stderr));
    PathBuf::from(String::from_utf8(output.stdout).unwrap().trim())
}

fn run_promtool(args: &[&str], directory: &Path) -> String {
    let output = Command::new(promtool()).args(args).current_dir(directory).output().unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "promtool {args:?}:\n{text}");
    text
}

/// YAML read with PyYAML (from deploy/local/k8s-tools.sh), as JSON.
fn yaml_as_json(path: &Path) -> Value {
    let pythonpath =
        Command::new(repo_root().join("deploy/local/k8s-tools.sh")).arg("pythonpath").output().unwrap();
    assert!(pythonpath.status.success());
    let output = Command::new("python3")
        .args(["-c", "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))"])
        .arg(path)
        .env("PYTHONPATH", String::from_utf8(pythonpath.stdout).unwrap().trim())
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Every PromQL expression of the dashboards (panel targets and variable queries, with Grafana's
/// variables replaced by what Prometheus would receive) and of the alert rules.
fn queries() -> Vec<(String, String)> {
    let mut queries = Vec::new();
    let mut dashboards: Vec<PathBuf> = std::fs::read_dir(otel_dir().join("dashboards"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|extension| extension == "json"))
        .collect();
    dashboards.sort();
    assert_eq!(dashboards.len(), 4, "ingest, compactor, executor and edge dashboards: {dashboards:?}");
    let mut uids = BTreeSet::new();
    for path in dashboards {
        let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let uid = dashboard["uid"].as_str().unwrap().to_string();
        assert!(uids.insert(uid.clone()), "dashboard uid {uid} is unique");
        let variables: Vec<String> = dashboard["templating"]["list"]
            .as_array()
            .unwrap()
            .iter()
            .map(|variable| variable["name"].as_str().unwrap().to_string())
            .collect();
        let panels = dashboard["panels"].as_array().unwrap();
        assert!(!panels.is_empty(), "{uid} has panels");
        for panel in panels {
            let title = panel["title"].as_str().unwrap();
            assert_eq!(
                panel["datasource"]["uid"], "${datasource}",
                "{uid}/{title} uses the datasource variable"
            );
            let targets = panel["targets"].as_array().unwrap();
            assert!(!targets.is_empty(), "{uid}/{title} has queries");
            for target in targets {
                let expr = target["expr"].as_str().unwrap();
                for variable in expr.split('$').skip(1) {
                    let name: String =
                        variable.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                    assert!(
                        name == "__rate_interval" || variables.contains(&name),
                        "{uid}/{title}: ${name} is not a dashboard variable"
                    );
                }
                let mut expr = expr.replace("$__rate_interval", "1m");
                for variable in &variables {
                    expr = expr.replace(&format!("${variable}"), ".*");
                }
                queries.push((format!("{uid}/{title}"), expr));
            }
        }
        for variable in dashboard["templating"]["list"].as_array().unwrap() {
            if let Some(definition) = variable["definition"].as_str() {
                // label_values(metric, label): the metric must exist and carry the label.
                let inner = definition.trim_start_matches("label_values(").trim_end_matches(')');
                let (metric, label) = inner.split_once(',').unwrap();
                queries.push((
                    format!("{uid}/${}", variable["name"]),
                    format!("count by ({}) ({metric})", label.trim()),
                ));
            }
        }
    }
    let rules = yaml_as_json(&otel_dir().join("alerts.yaml"));
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            queries.push((
                format!("alert {}", rule["alert"].as_str().unwrap()),
                rule["expr"].as_str().unwrap().to_string(),
            ));
        }
    }
    queries
}

/// Metric names an expression selects (Prometheus names, with `_total`, `_bucket` and so on).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(start) = rest.find("sluice_") {
        let name: String =
            rest[start..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        rest = &rest[start + name.len()..];
        names.insert(name);
    }
    names
}

/// Label names an expression groups, joins or filters by: `by (..)`, `on (..)`, `{name=..}`.
fn label_names(expr: &str) -> BTreeSet<String> {
    let mut labels = BTreeSet::new();
    for keyword in ["by (", "on (", "by(", "on("] {
        for part in expr.split(keyword).skip(1) {
            let list = part.split(')').next().unwrap();
            labels.extend(
                list.split(',').map(|label| label.trim().to_string()).filter(|label| !label.is_empty()),
            );
        }
    }
    for part in expr.split('{').skip(1) {
        let matchers = part.split('}').next().unwrap();
        for matcher in matchers.split(',') {
            let name: String =
                matcher.trim().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if !name.is_empty() {
                labels.insert(name);
            }
        }
    }
    labels.retain(|label| !NON_ATTRIBUTE_LABELS.contains(&label.as_str()));
    labels
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    UpDownCounter,
    Gauge,
    Histogram,
}

/// What the collector's Prometheus exporter turns an OTLP metric into: counters gain `_total`,
/// histograms are read through `_bucket`, `_sum` and `_count`; the rest keep their name.
fn otlp_name(prometheus_name: &str) -> (String, Option<Kind>) {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = prometheus_name.strip_suffix(suffix) {
            return (base.to_string(), Some(Kind::Histogram));
        }
    }
    match prometheus_name.strip_suffix("_total") {
        Some(base) => (base.to_string(), Some(Kind::Counter)),
        None => (prometheus_name.to_string(), None),
    }
}

#[derive(Debug, Default)]
struct Emitted {
    kind_opt: Option<Kind>,
    unit: String,
    attributes: BTreeSet<String>,
    bounds: Vec<f64>,
}

/// What the receiver got, read through its JSON form (the crate does not export its data types).
fn emitted(exports: &[ExportedMetric]) -> BTreeMap<String, Emitted> {
    let mut emitted: BTreeMap<String, Emitted> = BTreeMap::new();
    for export in exports {
        let export = serde_json::to_value(export).unwrap();
        for metric in export["metrics"].as_array().unwrap() {
            let entry = emitted.entry(metric["name"].as_str().unwrap().to_string()).or_default();
            entry.unit = metric["unit"].as_str().unwrap_or_default().to_string();
            let Some((kind, data)) = metric["data"].as_object().and_then(|data| data.iter().next()) else {
                continue;
            };
            entry.kind_opt = match kind.as_str() {
                "Sum" if data["is_monotonic"] == true => Some(Kind::Counter),
                "Sum" => Some(Kind::UpDownCounter),
                "Gauge" => Some(Kind::Gauge),
                "Histogram" => Some(Kind::Histogram),
                _ => None,
            };
            for point in data["data_points"].as_array().into_iter().flatten() {
                if let Some(attributes) = point["attributes"].as_object() {
                    entry.attributes.extend(attributes.keys().cloned());
                }
                if let Some(bounds) = point["explicit_bounds"].as_array() {
                    entry.bounds = bounds.iter().filter_map(Value::as_f64).collect();
                }
            }
        }
    }
    emitted
}

#[test]
fn alert_rules_pass_their_unit_tests_and_every_query_is_valid_promql() {
    let directory = otel_dir();
    run_promtool(&["check", "rules", "alerts.yaml"], &directory);
    let tested = run_promtool(&["test", "rules", "alerts.test.yaml"], &directory);
    assert!(tested.contains("SUCCESS"), "{tested}");
    run_promtool(&["check", "config", "prometheus.yaml"], &directory);

    // promtool parses recording rules' expressions: every dashboard query goes through it.
    let scratch = tempfile::TempDir::new().unwrap();
    let mut rules = String::from("groups:\n  - name: dashboard-queries\n    rules:\n");
    for (index, (_, expr)) in queries().iter().enumerate() {
        rules.push_str(&format!(
            "      - record: dashboard_query_{index}\n        expr: {}\n",
            serde_json::to_string(expr).unwrap()
        ));
    }
    std::fs::write(scratch.path().join("queries.yaml"), rules).unwrap();
    let checked = run_promtool(&["check", "rules", "queries.yaml"], scratch.path());
    assert!(checked.contains(&format!("SUCCESS: {} rules found", queries().len())), "{checked}");

    // The collector's pipelines use only what it defines, and Prometheus scrapes its exporter.
    let collector = yaml_as_json(&directory.join("collector.yaml"));
    for (signal, pipeline) in collector["service"]["pipelines"].as_object().unwrap() {
        for (role, section) in
            [("receivers", "receivers"), ("processors", "processors"), ("exporters", "exporters")]
        {
            for component in pipeline[role].as_array().unwrap() {
                let component = component.as_str().unwrap();
                assert!(
                    collector[section].get(component).is_some(),
                    "{signal} pipeline: {component} is not defined"
                );
            }
        }
    }
    assert!(
        collector["service"]["pipelines"]["metrics"]["exporters"]
            .as_array()
            .unwrap()
            .iter()
            .any(|exporter| exporter == "prometheus"),
        "metrics reach Prometheus"
    );
    let exporter_port = collector["exporters"]["prometheus"]["endpoint"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    let prometheus = yaml_as_json(&directory.join("prometheus.yaml"));
    let target = prometheus["scrape_configs"][0]["static_configs"][0]["targets"][0].as_str().unwrap();
    assert!(
        target.ends_with(&format!(":{exporter_port}")),
        "Prometheus scrapes {target}, the exporter listens on {exporter_port}"
    );
}

/// Two gateways in front of `ingest`, so that every edge metric has data points: one forwards its
/// readings (and refuses an invalid one); the other has a `forward.url` central does not serve
/// (404, a `config` failure) and a spool of about two megabytes that fills up and drops its
/// oldest batches. Their spools are under `spools_dir`. Returns them, still running, and how many
/// readings the first forwarded.
async fn edge_gateways(
    ingest: &IngestService,
    client: &reqwest::Client,
    spools_dir: &Path,
    ts: i64,
) -> (EdgeService, EdgeService, usize) {
    let mut forwarding = edge_config(&spools_dir.join("forwarding"));
    forwarding.forward.url = ingest.base_url.clone();
    let forwarding = EdgeService::start(forwarding).await.unwrap();
    let readings: Vec<Value> =
        (0..10).map(|seq| json!({"device_id": "edge-0001", "ts": ts, "seq": seq})).collect();
    let response = client.post(forwarding.records_url("telemetry")).json(&readings).send().await.unwrap();
    assert!(response.status().is_success(), "{}", response.text().await.unwrap());
    let refused = client
        .post(forwarding.records_url("telemetry"))
        .json(&json!({"device_id": "edge-0001", "ts": "yesterday"}))
        .send()
        .await
        .unwrap();
    assert!(refused.status().is_client_error());

    let mut misrouted = edge_config(&spools_dir.join("misrouted"));
    misrouted.forward.url = format!("{}/not-ingest", ingest.base_url);
    misrouted.http.max_body_bytes = 64 * 1024;
    misrouted.spool.segment_bytes = 1024 * 1024;
    misrouted.spool.max_bytes = 2 * (misrouted.spool.segment_bytes + misrouted.http.max_body_bytes as u64);
    misrouted.spool.full_policy = FullPolicy::DropOldest;
    let misrouted = EdgeService::start(misrouted).await.unwrap();
    let site = "s".repeat(400);
    let num_requests = 80;
    for request in 0..num_requests {
        let readings: Vec<Value> = (0..100)
            .map(|index| json!({"device_id": "edge-0002", "ts": ts, "seq": request * 100 + index, "site": site}))
            .collect();
        let response = client.post(misrouted.records_url("telemetry")).json(&readings).send().await.unwrap();
        assert!(response.status().is_success(), "request {request}: {}", response.text().await.unwrap());
    }
    let (_, num_spooled) = misrouted.running().unwrap().spool().usage();
    assert!(
        num_spooled < num_requests,
        "the oldest batches were dropped: {num_spooled} of {num_requests} left"
    );

    let forwarded = wait_until(Duration::from_secs(30), || async {
        forwarding.running().unwrap().spool().usage().1 == 0
    })
    .await;
    assert!(forwarded, "the forwarding gateway's spool drained");
    (forwarding, misrouted, readings.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_and_label_the_dashboards_and_alerts_query_is_emitted() {
    let queries = queries();
    let collector = FakeCollectorServer::start().await.unwrap();
    let telemetry_config = TelemetryConfig {
        otlp_endpoint: collector.endpoint(),
        otlp_protocol: OtlpProtocol::Grpc,
        metrics_interval_ms: 200,
        ..TelemetryConfig::default()
    };
    // The services share this process and its exporters; nextest gives the test its own.
    let telemetry = sluice_telemetry::init(&telemetry_config, "sluice-observability-test", "test").unwrap();
    // The receiver's channels are bounded: drain them while the services run.
    let metrics: Arc<Mutex<Vec<ExportedMetric>>> = Arc::default();
    let spans: Arc<Mutex<Vec<ExportedSpan>>> = Arc::default();
    let draining = {
        let metrics = Arc::clone(&metrics);
        let spans = Arc::clone(&spans);
        let mut collector = collector;
        tokio::spawn(async move {
            loop {
                let exported = collector.exported_metrics(1, Duration::from_millis(50)).await;
                metrics.lock().unwrap().extend(exported);
                let exported = collector.exported_spans(1, Duration::from_millis(50)).await;
                spans.lock().unwrap().extend(exported);
            }
        })
    };

    let broker = Broker::start().await.unwrap();
    let prefix = format!("test-{}", unique_suffix());
    let lake_dir = tempfile::TempDir::new().unwrap();
    let mut ingest = ingest_config(&broker);
    ingest.kafka.topic_prefix = prefix.clone();
    let ingest = IngestService::start(ingest).await.unwrap();
    let mut compactor = compactor_config(&broker, &prefix, lake_dir.path());
    compactor.watermark.interval_ms = 200;
    compactor.watermark.allowed_lateness_ms = 1_000;
    // Lag comes from librdkafka statistics; every second rather than every ten.
    compactor.kafka.client.0.insert("statistics.interval.ms".into(), "1000".into());
    let compactor = CompactorService::start(compactor).await.unwrap();
    let executor = ExecutorService::start(executor_config(&broker, &prefix, lake_dir.path()));

    let readings = telemetry_readings(2_000, 20, 2 * HOUR);
    let client = reqwest::Client::new();
    for chunk in readings.chunks(500) {
        let response = client.post(ingest.records_url("telemetry")).json(&chunk).send().await.unwrap();
        assert!(response.status().is_success(), "{}", response.text().await.unwrap());
    }
    let refused = client
        .post(ingest.records_url("telemetry"))
        .json(&json!({"device_id": "dev-0001", "ts": "yesterday"}))
        .send()
        .await
        .unwrap();
    assert!(refused.status().is_client_error());

    // Edge readings at the earliest event time, so that they do not move the watermark.
    let first_ts = readings.iter().map(|reading| reading["ts"].as_i64().unwrap()).min().unwrap();
    let spools_dir = tempfile::TempDir::new().unwrap();
    let (forwarding, misrouted, num_forwarded) =
        edge_gateways(&ingest, &client, spools_dir.path(), first_ts).await;
    let expected_rows = readings.len() + num_forwarded;
    wait_for_lake_rows(lake_dir.path(), "telemetry", expected_rows, Duration::from_secs(60)).await;

    let first_hour = first_ts.div_euclid(HOUR) * HOUR;
    let job = format!(
        "-- name: hourly_counts\n-- window: 1h\n-- lateness: 0s\n-- start: {}\n\
         SELECT device_id, count(*) AS readings FROM telemetry GROUP BY device_id\n",
        sluice_executor::job::format_micros(first_hour)
    );
    submit_job(&broker.bootstrap_servers(), &prefix, "hourly_counts", Some(&job)).await.unwrap();
    let lake = open_local_lake(lake_dir.path());
    let ran = wait_until(Duration::from_secs(90), || {
        let lake = lake.clone();
        async move {
            load_windows(&lake, "hourly_counts").await.unwrap().get(&first_hour).is_some_and(|state| {
                state.outcome_opt.as_ref().is_some_and(|outcome| outcome.status == OutcomeStatus::Succeeded)
            })
        }
    })
    .await;
    assert!(ran, "the first window of hourly_counts ran");

    // Everything queried appears within a few export intervals (lag needs a statistics tick).
    let queried: BTreeSet<String> = queries.iter().flat_map(|(_, expr)| metric_names(expr)).collect();
    let wanted: BTreeSet<String> = queried.iter().map(|name| otlp_name(name).0).collect();
    let all_seen = wait_until(Duration::from_secs(30), || {
        let seen = emitted(&metrics.lock().unwrap());
        let wanted = wanted.clone();
        async move { wanted.iter().all(|name| seen.contains_key(name)) }
    })
    .await;
    let seen = emitted(&metrics.lock().unwrap());
    assert!(
        all_seen,
        "not emitted: {:?}",
        wanted.iter().filter(|name| !seen.contains_key(*name)).collect::<Vec<_>>()
    );

    for (source, expr) in &queries {
        let labels = label_names(expr);
        for name in metric_names(expr) {
            let (otlp, kind_opt) = otlp_name(&name);
            let metric = &seen[&otlp];
            match kind_opt {
                Some(kind) => {
                    assert_eq!(metric.kind_opt, Some(kind), "{source}: {name} is read as a {kind:?}")
                }
                None => assert!(
                    matches!(metric.kind_opt, Some(Kind::Gauge | Kind::UpDownCounter)),
                    "{source}: {name} has no suffix, so it must be a gauge; it is a {:?}",
                    metric.kind_opt
                ),
            }
            for label in &labels {
                assert!(
                    metric.attributes.contains(label),
                    "{source}: {otlp} has no label {label}; it has {:?}",
                    metric.attributes
                );
            }
        }
    }
    // Names carry their unit, so the exporter adds none, and buckets fit the unit.
    for (name, metric) in &seen {
        match metric.unit.as_str() {
            "s" => assert!(name.ends_with("_seconds"), "{name}"),
            "By" => assert!(name.contains("bytes"), "{name}"),
            _ => {}
        }
        if metric.kind_opt == Some(Kind::Histogram) {
            let first = metric.bounds.first().copied().unwrap_or_default();
            let last = metric.bounds.last().copied().unwrap_or_default();
            match metric.unit.as_str() {
                "s" => assert!(first <= 0.01 && last >= 10.0, "{name} buckets {:?}", metric.bounds),
                "By" => assert!(last >= 128.0 * 1024.0 * 1024.0, "{name} buckets {:?}", metric.bounds),
                unit => panic!("{name}: histogram of unexpected unit {unit}"),
            }
        }
    }

    misrouted.stop().await.unwrap();
    forwarding.stop().await.unwrap();
    executor.stop().await.unwrap();
    compactor.stop().await.unwrap();
    ingest.stop().await.unwrap();
    telemetry.shutdown();
    let wanted_spans = [
        // ingest: a request and the batch it produced
        ("ingest_records", None),
        ("produce_batch", Some("ingest_records")),
        // compactor: a flush and its phases
        ("flush", None),
        ("encode_parquet", Some("flush")),
        ("upload", Some("flush")),
        ("commit", Some("flush")),
        // executor: a run and its DataFusion phases
        ("job_run", None),
        ("snapshot", Some("job_run")),
        ("logical_plan", Some("job_run")),
        ("physical_plan", Some("job_run")),
        ("execute", Some("job_run")),
        ("write_result", Some("execute")),
        ("commit_result", Some("job_run")),
    ];
    let complete = wait_until(Duration::from_secs(10), || {
        let names: BTreeSet<String> = spans.lock().unwrap().iter().map(|span| span.name.clone()).collect();
        async move { wanted_spans.iter().all(|(name, _)| names.contains(*name)) }
    })
    .await;
    draining.abort();
    let spans = spans.lock().unwrap();
    let by_id: BTreeMap<&str, &ExportedSpan> =
        spans.iter().map(|span| (span.span_id.as_str(), span)).collect();
    assert!(complete, "spans: {:?}", spans.iter().map(|span| &span.name).collect::<BTreeSet<_>>());
    for (name, parent_opt) in wanted_spans {
        let Some(parent) = parent_opt else { continue };
        assert!(
            spans.iter().filter(|span| span.name == name).any(|span| {
                by_id.get(span.parent_span_id.as_str()).is_some_and(|candidate| candidate.name == parent)
            }),
            "a {name} span is a child of {parent}"
        );
    }
}
