//! Server processes the fixtures start: on a port of their own, known to be theirs once ready,
//! with their output in a log that failures show.

use std::net::TcpListener as StdTcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::process::{Child, Command};

/// A port that was free a moment ago on 127.0.0.1. Anyone may bind it before the caller does
/// (the kernel hands out the same range to client sockets), so the fixtures' servers start again
/// on another port when theirs turns out to be taken.
pub fn free_port() -> u16 {
    let mut last_error = String::new();
    for _ in 0..10 {
        match StdTcpListener::bind("127.0.0.1:0").and_then(|listener| listener.local_addr()) {
            // Port 0 is the request for a port, never a port to connect to.
            Ok(address) if address.port() != 0 => return address.port(),
            Ok(address) => last_error = format!("the kernel answered {address}"),
            Err(error) => last_error = error.to_string(),
        }
    }
    panic!("no free port on 127.0.0.1: {last_error}");
}

/// How many ports (or, for a given port, how many times) a server start tries before it gives up.
const START_ATTEMPTS: usize = 5;

/// Lines of a server's log that an error message or a failing test shows.
const LOG_TAIL_LINES: usize = 40;

/// Why a server did not start.
#[derive(Debug)]
pub(crate) enum StartFailure {
    /// The port was not the server's to have: it exited before it was ready (as a server does
    /// when its port is taken), or another process answered on the port. Another try may work.
    PortTaken(anyhow::Error),
    /// Anything else: another try would fail the same way.
    Other(anyhow::Error),
}

impl StartFailure {
    pub(crate) fn into_error(self) -> anyhow::Error {
        match self {
            Self::PortTaken(error) | Self::Other(error) => error,
        }
    }
}

impl From<anyhow::Error> for StartFailure {
    fn from(error: anyhow::Error) -> Self {
        Self::Other(error)
    }
}

/// Starts a server with `start` on a free port, and on another one while the port turns out
/// to be taken.
pub(crate) async fn start_on_a_free_port<T>(
    start: impl AsyncFnMut(u16) -> Result<T, StartFailure>,
) -> anyhow::Result<T> {
    start_with_retries(free_port, start).await
}

/// Starts a server with `start` on `port`, trying again for a while when the port is not free
/// yet (a server killed a moment ago may still hold it, or a client socket may).
pub(crate) async fn start_on_port<T>(
    port: u16,
    start: impl AsyncFnMut(u16) -> Result<T, StartFailure>,
) -> anyhow::Result<T> {
    start_with_retries(|| port, start).await
}

async fn start_with_retries<T>(
    mut next_port: impl FnMut() -> u16,
    mut start: impl AsyncFnMut(u16) -> Result<T, StartFailure>,
) -> anyhow::Result<T> {
    let mut attempt = 1;
    loop {
        let port = next_port();
        match start(port).await {
            Ok(server) => return Ok(server),
            Err(StartFailure::PortTaken(error)) if attempt < START_ATTEMPTS => {
                eprintln!("start attempt {attempt} on port {port} failed, trying again: {error:#}");
                attempt += 1;
                // Pacing between attempts; a port held by a dying process frees up meanwhile.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(failure) => {
                return Err(failure.into_error().context(format!("start attempt {attempt} failed")));
            }
        }
    }
}

/// What a readiness probe found on the server's port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answer {
    /// The server this fixture started answered.
    Ours,
    /// Something answered, but not the server this fixture started: the port is someone else's.
    Another,
    /// Nothing answered (yet).
    Nobody,
}

/// The [`Answer`] when a probe on `port` got through (`answered`), told apart by whether the
/// socket listening on the port is held by the process `pid`.
pub(crate) fn answer_from(pid: u32, port: u16, answered: bool) -> Answer {
    if !answered {
        return Answer::Nobody;
    }
    match holds_listener(pid, port) {
        Some(false) => Answer::Another,
        // Where /proc does not tell (not Linux), the child still running has to do.
        Some(true) | None => Answer::Ours,
    }
}

/// Whether process `pid` holds the socket that listens on `port` of this host, from
/// /proc/net/tcp{,6} (the listening socket's inode) and /proc/<pid>/fd; `None` when /proc does
/// not tell.
fn holds_listener(pid: u32, port: u16) -> Option<bool> {
    let mut sockets = Vec::new();
    let mut readable = false;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else { continue };
        readable = true;
        // Fields: sl, local_address (ADDRESS:PORT in hex), rem_address, st (0A is LISTEN), ...,
        // and the inode tenth.
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) = (fields.get(1), fields.get(3), fields.get(9))
            else {
                continue;
            };
            let local_port = local.rsplit_once(':').and_then(|(_, port)| u16::from_str_radix(port, 16).ok());
            if *state == "0A" && local_port == Some(port) {
                sockets.push(format!("socket:[{inode}]"));
            }
        }
    }
    if !readable {
        return None;
    }
    let descriptors = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    Some(descriptors.flatten().any(|descriptor| {
        std::fs::read_link(descriptor.path()).is_ok_and(|target| {
            target.to_str().is_some_and(|target| sockets.iter().any(|socket| socket == target))
        })
    }))
}

/// A server process a fixture started, killed on drop. Its stdout and stderr go to a log file
/// of its own: the tail of it is in the error when the server does not start, and printed (to
/// the test's captured output) when a test panics while the server runs.
#[derive(Debug)]
pub(crate) struct ServerProcess {
    name: &'static str,
    child: Child,
    log_path: PathBuf,
    // Dropped after the child: the log outlives the process writing it.
    _log_dir: tempfile::TempDir,
}

impl ServerProcess {
    /// Spawns `command` (kill on drop) as the server `name`, its output in a new log file.
    pub(crate) fn spawn(name: &'static str, command: &mut Command) -> anyhow::Result<Self> {
        let log_dir = tempfile::Builder::new()
            .prefix(&format!("sluice-{name}-"))
            .tempdir()
            .with_context(|| format!("failed to create the log directory of {name}"))?;
        let log_path = log_dir.path().join(format!("{name}.log"));
        let stdout = std::fs::File::create(&log_path)
            .with_context(|| format!("failed to create {}", log_path.display()))?;
        // One file description for both streams: their lines interleave as written.
        let stderr = stdout.try_clone().with_context(|| format!("failed to share the log of {name}"))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!("failed to start {name} ({})", command.as_std().get_program().to_string_lossy())
            })?;
        Ok(Self { name, child, log_path, _log_dir: log_dir })
    }

    /// The process id, while the process runs (and has not been waited for).
    pub(crate) fn id(&self) -> Option<u32> {
        self.child.id()
    }

    /// The process id of a server just started, for [`answer_from`].
    pub(crate) fn pid(&self) -> Result<u32, StartFailure> {
        self.child.id().with_context(|| format!("{} exited at once", self.name)).map_err(StartFailure::Other)
    }

    /// Kills the process (SIGKILL) and waits for it to exit.
    pub(crate) async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Waits until `probe` finds this process answering. Fails as soon as the process exits
    /// (with the tail of its log), and when `timeout` passes: as [`StartFailure::PortTaken`] if
    /// another process answered on the port meanwhile.
    pub(crate) async fn wait_ready<F, Fut>(
        &mut self,
        port: u16,
        timeout: Duration,
        mut probe: F,
    ) -> Result<(), StartFailure>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Answer>,
    {
        let deadline = Instant::now() + timeout;
        let mut another_answered = false;
        loop {
            self.fail_if_exited(port)?;
            match probe().await {
                // The answer can only have come from this process if it still runs: a server
                // that lost its port to another process exits.
                Answer::Ours => {
                    self.fail_if_exited(port)?;
                    return Ok(());
                }
                Answer::Another => another_answered = true,
                Answer::Nobody => {}
            }
            if Instant::now() >= deadline {
                let error = anyhow::anyhow!(
                    "{} on port {port} did not answer within {timeout:?}{}; {}",
                    self.name,
                    if another_answered { " (another process answered there)" } else { "" },
                    self.log_tail()
                );
                return Err(if another_answered {
                    StartFailure::PortTaken(error)
                } else {
                    StartFailure::Other(error)
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn fail_if_exited(&mut self, port: u16) -> Result<(), StartFailure> {
        let status_opt = self
            .child
            .try_wait()
            .with_context(|| format!("failed to poll {}", self.name))
            .map_err(StartFailure::Other)?;
        match status_opt {
            Some(status) => Err(StartFailure::PortTaken(anyhow::anyhow!(
                "{} on port {port} exited ({status}) before it was ready; {}",
                self.name,
                self.log_tail()
            ))),
            None => Ok(()),
        }
    }

    /// The last lines of the log, for error messages.
    pub(crate) fn log_tail(&self) -> String {
        let bytes = std::fs::read(&self.log_path).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        let lines: Vec<&str> = text.lines().collect();
        if lines.is_empty() {
            return format!("{} wrote nothing to its log", self.name);
        }
        let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
        format!("the last {} lines of the log of {}:\n{}", tail.len(), self.name, tail.join("\n"))
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        // The log file goes with the fixture: a failing test shows what the server said.
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail());
        }
    }
}

/// How a [`ServiceBinary`] shows that it is ready on its port.
#[derive(Debug, Clone, Copy)]
pub enum Readiness {
    /// `GET http://127.0.0.1:<port><path>` answers 200.
    HttpOk(&'static str),
    /// The port accepts a TCP connection (gRPC servers).
    Listening,
}

/// One of this workspace's binaries run as its own process on a port of its own, killed on
/// drop; for tests that need a real process (its memory, its exit status, a cluster of them).
#[derive(Debug)]
pub struct ServiceBinary {
    pub port: u16,
    process: ServerProcess,
}

impl ServiceBinary {
    /// Starts `command(port)` on a free port, and again on another one while the port turns out
    /// to be taken (the process exits before it is ready, or another process answers there).
    pub async fn start(
        name: &'static str,
        readiness: Readiness,
        mut command: impl FnMut(u16) -> anyhow::Result<Command>,
    ) -> anyhow::Result<Self> {
        start_on_a_free_port(async |port| {
            let mut process = ServerProcess::spawn(name, &mut command(port)?)?;
            let pid = process.pid()?;
            let client = reqwest::Client::new();
            process
                .wait_ready(port, Duration::from_secs(60), || {
                    let client = client.clone();
                    async move {
                        let answered = match readiness {
                            Readiness::HttpOk(path) => client
                                .get(format!("http://127.0.0.1:{port}{path}"))
                                .send()
                                .await
                                .is_ok_and(|response| response.status().is_success()),
                            Readiness::Listening => {
                                tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
                            }
                        };
                        answer_from(pid, port, answered)
                    }
                })
                .await?;
            Ok(Self { port, process })
        })
        .await
    }

    /// The process id while it runs.
    /// [`ServiceBinary::start`] for a service that reads its settings from a file: writes
    /// `config(port)` to `config_path` before each attempt and runs `binary --config config_path`.
    pub async fn start_with_config(
        name: &'static str,
        readiness: Readiness,
        binary: &Path,
        config_path: &Path,
        config: impl Fn(u16) -> String,
    ) -> anyhow::Result<Self> {
        Self::start(name, readiness, |port| {
            std::fs::write(config_path, config(port))
                .with_context(|| format!("failed to write {}", config_path.display()))?;
            let mut command = Command::new(binary);
            command.arg("--config").arg(config_path);
            Ok(command)
        })
        .await
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.id()
    }

    /// Kills the process with SIGKILL, as a power cut or the OOM killer would, and waits for it
    /// to be gone.
    pub async fn kill(mut self) {
        self.process.kill().await;
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The last lines of its log, for failure messages.
    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listening_socket_is_found_in_the_process_holding_it_only() {
        let listener = StdTcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        // Only where /proc tells (Linux).
        if let Some(held) = holds_listener(std::process::id(), port) {
            assert!(held);
            assert_eq!(answer_from(std::process::id(), port, true), Answer::Ours);
            assert_eq!(holds_listener(std::process::id(), free_port()), Some(false));
        }
        assert_eq!(answer_from(std::process::id(), port, false), Answer::Nobody);
    }
}
