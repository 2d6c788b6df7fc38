//! The message brokers a test runs against: the Tansu Kafka-protocol broker and Mosquitto.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, bail};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio::process::Command;

use crate::process::{Answer, ServerProcess, StartFailure, answer_from, start_on_a_free_port, start_on_port};
use crate::{repo_root, unique_suffix};

fn tansu_binary() -> anyhow::Result<PathBuf> {
    static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            // The same install the local run uses; it installs the broker when missing.
            let output = std::process::Command::new("bash")
                .arg(repo_root().join("deploy/local/broker.sh"))
                .arg("path")
                .stderr(Stdio::inherit())
                .output()
                .map_err(|error| format!("failed to run deploy/local/broker.sh: {error}"))?;
            if !output.status.success() {
                return Err("deploy/local/broker.sh path failed".to_string());
            }
            Ok(PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// A Tansu broker on a free port, memory storage, killed on drop.
#[derive(Debug)]
pub struct Broker {
    pub port: u16,
    process_opt: Option<ServerProcess>,
}

impl Broker {
    pub async fn start() -> anyhow::Result<Self> {
        let binary = tansu_binary()?;
        start_on_a_free_port(async |port| Self::start_attempt(&binary, port, None).await).await
    }

    /// A broker whose only advertised listener is `proxy_port`, a TLS proxy's (Tansu serves no
    /// TLS itself): clients bootstrapped there are sent back there for every request. Clients
    /// on the broker's own port get the same metadata, so they need TLS too past bootstrap.
    pub async fn start_advertising(proxy_port: u16) -> anyhow::Result<Self> {
        let binary = tansu_binary()?;
        start_on_a_free_port(async |port| Self::start_attempt(&binary, port, Some(proxy_port)).await).await
    }

    /// Starts on a given port, for tests that bring a broker back where the old one was.
    pub async fn start_on(port: u16) -> anyhow::Result<Self> {
        let binary = tansu_binary()?;
        start_on_port(port, async |port| Self::start_attempt(&binary, port, None).await).await
    }

    async fn start_attempt(
        binary: &Path,
        port: u16,
        advertised_port_opt: Option<u16>,
    ) -> Result<Self, StartFailure> {
        let url = format!("tcp://127.0.0.1:{port}");
        let advertised_url = format!("tcp://127.0.0.1:{}", advertised_port_opt.unwrap_or(port));
        // The broker reports its cluster id in every metadata response: a broker answering with
        // this one is the process started here, not another on the same port.
        let cluster_id = format!("sluice-test-{}", unique_suffix());
        let mut process = ServerProcess::spawn(
            "tansu",
            Command::new(binary)
                .args(["broker", "--listener-url", &url, "--advertised-listener-url", &advertised_url])
                .args(["--cluster-id", &cluster_id])
                .args(["--storage-engine", "memory://tansu/"])
                // Its log is read as text, in error messages.
                .env("NO_COLOR", "1"),
        )?;
        let bootstrap = format!("127.0.0.1:{port}");
        process
            .wait_ready(port, Duration::from_secs(15), || {
                let bootstrap = bootstrap.clone();
                let cluster_id = cluster_id.clone();
                async move {
                    let found_opt =
                        tokio::task::spawn_blocking(move || cluster_id_at(&bootstrap)).await.ok().flatten();
                    match found_opt {
                        Some(found) if found == cluster_id => Answer::Ours,
                        Some(_) => Answer::Another,
                        None => Answer::Nobody,
                    }
                }
            })
            .await?;
        Ok(Self { port, process_opt: Some(process) })
    }

    pub fn bootstrap_servers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The broker's process id while it runs: benchmarks read its memory use and CPU time from /proc.
    pub fn pid(&self) -> Option<u32> {
        self.process_opt.as_ref().and_then(ServerProcess::id)
    }

    /// Kills the broker (SIGKILL), as a crash or network loss would look to clients.
    pub async fn kill(&mut self) {
        if let Some(mut process) = self.process_opt.take() {
            process.kill().await;
        }
    }

    /// Freezes the broker process (SIGSTOP): it keeps its state and its connections but answers
    /// nothing until [`Broker::resume`], as a broker in a long GC pause or a stalled VM would.
    pub fn pause(&self) -> anyhow::Result<()> {
        self.signal("STOP")
    }

    /// Lets a paused broker run again (SIGCONT).
    pub fn resume(&self) -> anyhow::Result<()> {
        self.signal("CONT")
    }

    fn signal(&self, name: &str) -> anyhow::Result<()> {
        let pid =
            self.process_opt.as_ref().and_then(ServerProcess::id).context("the broker is not running")?;
        let status = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .status()
            .context("failed to run kill")?;
        if !status.success() {
            bail!("kill -{name} {pid} failed: {status}");
        }
        Ok(())
    }
}

/// The cluster id of the broker at `bootstrap`, if one answers within half a second.
fn cluster_id_at(bootstrap: &str) -> Option<String> {
    let consumer = ClientConfig::new().set("bootstrap.servers", bootstrap).create::<BaseConsumer>().ok()?;
    consumer.client().fetch_cluster_id(Duration::from_millis(500))
}

/// A Mosquitto MQTT broker on a free port with anonymous access, killed on drop.
#[derive(Debug)]
pub struct Mosquitto {
    pub port: u16,
    /// The TLS listener's port, when started with one.
    pub tls_port: Option<u16>,
    // Dropped before its configuration's directory.
    _process: ServerProcess,
    _directory: tempfile::TempDir,
}

impl Mosquitto {
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with("").await
    }

    /// A Mosquitto on a free port with `extra` lines appended to the test configuration (for
    /// example `allow_anonymous false`, or a `max_packet_size`).
    pub async fn start_with(extra: &str) -> anyhow::Result<Self> {
        let binary = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|path| Path::new(path).exists())
            .context("mosquitto is not installed (apt-get install mosquitto)")?;
        start_on_a_free_port(async |port| Self::start_attempt(binary, port, extra, None).await).await
    }

    /// A Mosquitto with its plain listener (`port`, for test devices) and a second one on
    /// `tls_port` configured by `tls_lines` (`cafile`, `certfile`, `keyfile`, `require_certificate`
    /// and so on), for the client under test.
    pub async fn start_with_tls_listener(tls_lines: &str) -> anyhow::Result<Self> {
        let binary = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|path| Path::new(path).exists())
            .context("mosquitto is not installed (apt-get install mosquitto)")?;
        start_on_a_free_port(async |port| Self::start_attempt(binary, port, "", Some(tls_lines)).await).await
    }

    async fn start_attempt(
        binary: &str,
        port: u16,
        extra: &str,
        tls_lines_opt: Option<&str>,
    ) -> Result<Self, StartFailure> {
        let directory = tempfile::TempDir::new().context("failed to create a temporary directory")?;
        let config_path = directory.path().join("mosquitto.conf");
        let mut config = format!("listener {port} 127.0.0.1\npersistence false\nmax_inflight_messages 20\n");
        if !extra.contains("allow_anonymous") {
            config.push_str("allow_anonymous true\n");
        }
        config.push_str(extra);
        config.push('\n');
        // Settings after a `listener` line are that listener's, so the TLS one goes last. Its
        // port is only probed free: if another process takes it first, Mosquitto fails to start
        // and the attempt is made again on new ports.
        let tls_port_opt = tls_lines_opt.map(|tls_lines| {
            let tls_port = crate::free_port();
            config.push_str(&format!("listener {tls_port} 127.0.0.1\n{tls_lines}\n"));
            tls_port
        });
        std::fs::write(&config_path, config).context("failed to write mosquitto.conf")?;
        let mut process =
            ServerProcess::spawn("mosquitto", Command::new(binary).arg("-c").arg(&config_path))?;
        let pid = process.pid()?;
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        process
            .wait_ready(port, Duration::from_secs(10), || async move {
                answer_from(pid, port, tokio::net::TcpStream::connect(address).await.is_ok())
            })
            .await?;
        Ok(Self { port, tls_port: tls_port_opt, _process: process, _directory: directory })
    }
}
