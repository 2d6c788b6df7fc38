//! The Helm chart: lint, render with the default values and with the CI values (S3, Ingress,
//! autoscaling, tokens), validate every manifest against the Kubernetes API schemas, and load
//! every rendered service configuration into the service binary that will read it.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sluice_integration_tests::{repo_root, workspace_binary};

fn tool(subcommand: &str) -> PathBuf {
    let output =
        Command::new(repo_root().join("deploy/local/k8s-tools.sh")).arg(subcommand).output().unwrap();
    assert!(output.status.success(), "k8s-tools.sh: {}", String::from_utf8_lossy(&output.stderr));
    PathBuf::from(String::from_utf8(output.stdout).unwrap().trim())
}

fn succeeded(output: &Output, what: &str) -> String {
    assert!(
        output.status.success(),
        "{what}:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

/// Renders with `template`, then validates every manifest against the Kubernetes API schemas:
/// the manifests as text, the directory they were written to, and their file there.
fn render_and_validate(
    bin: &Path,
    template: &mut Command,
    what: &str,
) -> (String, tempfile::TempDir, PathBuf) {
    let rendered = succeeded(&template.output().unwrap(), what);
    let work = tempfile::TempDir::new().unwrap();
    let manifests = work.path().join("rendered.yaml");
    std::fs::write(&manifests, &rendered).unwrap();
    let validate = Command::new(bin.join("kubernetes-validate"))
        .args(["--strict", "--quiet"])
        .arg(&manifests)
        .output()
        .unwrap();
    succeeded(&validate, "kubernetes-validate");
    (rendered, work, manifests)
}

/// Writes each `<service>.toml` found in the rendered ConfigMaps and Secrets into `directory`.
fn extract_configs(manifests: &Path, directory: &Path) -> Vec<PathBuf> {
    let script = r#"
import pathlib, sys, yaml
out = pathlib.Path(sys.argv[2])
for doc in yaml.safe_load_all(open(sys.argv[1])):
    if not doc or doc.get("kind") not in ("ConfigMap", "Secret"):
        continue
    for key, value in {**doc.get("data", {}), **doc.get("stringData", {})}.items():
        if key.endswith(".toml"):
            (out / key).write_text(value)
            print(key)
"#;
    let output = Command::new("python3")
        .args(["-c", script])
        .arg(manifests)
        .arg(directory)
        .env("PYTHONPATH", tool("pythonpath"))
        .output()
        .unwrap();
    succeeded(&output, "extracting configs").lines().map(|name| directory.join(name)).collect()
}

#[test]
fn chart_lints_renders_validates_and_its_configs_load() {
    let bin = tool("bin");
    let helm = bin.join("helm");
    let chart = repo_root().join("helm/sluice");
    let ci_values = chart.join("ci/s3-ingress-hpa-values.yaml");
    for values in [None, Some(&ci_values)] {
        let mut lint = Command::new(&helm);
        lint.arg("lint").arg("--strict").arg(&chart);
        let mut template = Command::new(&helm);
        template.args(["template", "sluice-test"]).arg(&chart);
        if let Some(values) = values {
            lint.arg("-f").arg(values);
            template.arg("-f").arg(values);
        }
        succeeded(&lint.output().unwrap(), "helm lint");
        let (rendered, work, manifests) = render_and_validate(&bin, &mut template, "helm template");

        for kind in ["kind: Deployment", "kind: PodDisruptionBudget", "kind: ConfigMap", "kind: Service\n"] {
            assert!(rendered.contains(kind), "{kind} rendered");
        }
        assert!(rendered.contains("readOnlyRootFilesystem: true") && rendered.contains("runAsNonRoot: true"));
        if values.is_some() {
            for kind in ["kind: Ingress", "kind: HorizontalPodAutoscaler", "kind: NetworkPolicy", "kind: Job"]
            {
                assert!(rendered.contains(kind), "{kind} rendered with the CI values");
            }
            assert!(rendered.contains("eks.amazonaws.com/role-arn"));
            // Column keys reach the compactor and the executors, and nothing else.
            assert_eq!(rendered.matches("mountPath: /etc/sluice-keys").count(), 2, "column keys mounted");
            assert!(rendered.contains("secretName: \"sluice-column-keys\""));
            // The hook signs each job with the key from the Secret the executors trust.
            assert!(
                rendered.contains("--key /etc/sluice-signing/'signing.key' --key-name 'helm-hook'")
                    && rendered.contains("secretName: \"sluice-jobs-key\""),
                "the jobs hook signs"
            );
            for role in ["ballista-scheduler", "ballista-worker"] {
                assert!(
                    rendered.contains(&format!("\"/etc/sluice/executor.toml\", \"{role}\"]")),
                    "{role} rendered"
                );
            }
        }

        let configs = extract_configs(&manifests, work.path());
        assert_eq!(configs.len(), 3, "{configs:?}");
        for config in configs {
            let service = format!("sluice-{}", config.file_stem().unwrap().to_str().unwrap());
            let output = Command::new(workspace_binary(&service))
                .arg("--config")
                .arg(&config)
                .arg("--print-config")
                .output()
                .unwrap();
            let printed = succeeded(
                &output,
                &format!("{service} --print-config with the rendered {}", config.display()),
            );
            if service == "sluice-executor" {
                // The chart enforces signing unless told otherwise.
                assert!(printed.contains("enforce = true"), "{printed}");
            }
            if values.is_some() {
                assert!(printed.contains("otel-collector.observability"), "{service}: {printed}");
                if service != "sluice-ingest" {
                    assert!(
                        printed.contains("key_file = \"/etc/sluice-keys/column-keys.toml\"")
                            && printed.contains("column = \"site\""),
                        "{service}: {printed}"
                    );
                }
                if service == "sluice-executor" {
                    assert!(printed.contains("daily_*"), "{printed}");
                    assert!(printed.contains("http://sluice-test-ballista-scheduler:50050"), "{printed}");
                    assert!(printed.contains("helm-hook") && printed.contains("ops-alice"), "{printed}");
                }
            }
        }
    }
}

/// Jobs in values with signing enforced but no key for the hook would be refused one by one after
/// the release; the chart refuses to render instead, and says what to set.
#[test]
fn jobs_without_a_signing_key_for_the_hook_are_refused_at_render_time() {
    let helm = tool("bin").join("helm");
    let chart = repo_root().join("helm/sluice");
    let work = tempfile::TempDir::new().unwrap();
    let values = work.path().join("values.yaml");
    std::fs::write(
        &values,
        "jobs:\n  hourly: |\n    -- window: 1h\n    SELECT count(*) AS n FROM telemetry\n",
    )
    .unwrap();
    let output = Command::new(&helm)
        .args(["template", "sluice-test"])
        .arg(&chart)
        .arg("-f")
        .arg(&values)
        .output()
        .unwrap();
    assert!(!output.status.success(), "rendered without a hook key");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("signing.hookKey.secretName"), "{stderr}");
    // The local-demo escape hatch: enforcement off, explicitly.
    let output = Command::new(&helm)
        .args(["template", "sluice-test"])
        .arg(&chart)
        .arg("-f")
        .arg(&values)
        .args(["--set", "signing.enforce=false"])
        .output()
        .unwrap();
    let rendered = succeeded(&output, "helm template with signing.enforce=false");
    assert!(rendered.contains("enforce = false") && !rendered.contains("--key "), "{rendered}");
}

/// Device certificates from the chart: ingest serves TLS from one Secret and trusts the device CA
/// (and its revocation list) from another, the probes speak HTTPS, and the rendered ingest.toml
/// loads with mutual TLS on. Without ingest's own TLS the chart refuses, naming the setting.
#[test]
fn device_certificates_mount_their_secrets_probe_over_https_and_load() {
    let bin = tool("bin");
    let chart = repo_root().join("helm/sluice");
    let device_values = [
        "ingest.tls.secretName=ingest-tls",
        "ingest.tls.deviceCaSecretName=device-ca",
        "ingest.tls.deviceRevocationList=true",
    ];
    let mut template = Command::new(bin.join("helm"));
    template.args(["template", "sluice-test"]).arg(&chart);
    for value in device_values {
        template.args(["--set", value]);
    }
    let (rendered, work, manifests) =
        render_and_validate(&bin, &mut template, "helm template with device certificates");
    assert!(
        rendered.contains("secretName: \"ingest-tls\"") && rendered.contains("secretName: \"device-ca\"")
    );
    assert_eq!(rendered.matches("scheme: HTTPS").count(), 2, "ingest's two probes: {rendered}");
    assert_eq!(rendered.matches("scheme: HTTP\n").count(), 4, "the other services' probes");

    let ingest_toml = extract_configs(&manifests, work.path())
        .into_iter()
        .find(|path| path.ends_with("ingest.toml"))
        .unwrap();
    let output = Command::new(workspace_binary("sluice-ingest"))
        .arg("--config")
        .arg(&ingest_toml)
        .arg("--print-config")
        .output()
        .unwrap();
    let printed = succeeded(&output, "sluice-ingest --print-config");
    for line in [
        "tls_cert_path = \"/etc/sluice-tls/tls.crt\"",
        "tls_client_ca_path = \"/etc/sluice-device-ca/ca.crt\"",
        "tls_client_certificates = \"required\"",
        "tls_client_crl_path = \"/etc/sluice-device-ca/ca.crl\"",
    ] {
        assert!(printed.contains(line), "{line} in {printed}");
    }

    let output = Command::new(bin.join("helm"))
        .args(["template", "sluice-test"])
        .arg(&chart)
        .args(["--set", "ingest.tls.deviceCaSecretName=device-ca"])
        .output()
        .unwrap();
    assert!(!output.status.success(), "rendered device certificates without TLS");
    assert!(String::from_utf8_lossy(&output.stderr).contains("ingest.tls.secretName"));
}
