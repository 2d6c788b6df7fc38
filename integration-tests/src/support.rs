//! Paths, arguments, names and waiting: what every other fixture builds on.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Root of the repository, for schemas/ and deploy/.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// A workspace binary (`sluice-compactor`, `sluice`, ...) next to the running test's executable:
/// cargo builds every binary of the workspace before its tests.
pub fn workspace_binary(name: &str) -> PathBuf {
    let binary = std::env::current_exe()
        .ok()
        .and_then(|test| Some(test.parent()?.parent()?.join(name)))
        .unwrap_or_else(|| PathBuf::from(name));
    assert!(binary.exists(), "{} is missing; build the workspace first", binary.display());
    binary
}

/// A workspace binary in the running benchmark's profile directory (`target/release` for
/// `cargo bench`), when it was built: benchmarks run the binaries `cargo build --profile bench`
/// made, and say so when one is missing instead of building it.
pub fn release_binary(name: &str) -> Option<PathBuf> {
    std::env::current_exe()
        .ok()
        .and_then(|bench| Some(bench.parent()?.parent()?.join(name)))
        .filter(|path| path.exists())
}

/// A `--name value` number from a benchmark's command line, or `default`.
pub fn bench_arg(name: &str, default: usize) -> usize {
    bench_text_arg(name).and_then(|value| value.parse().ok()).unwrap_or(default)
}

/// A `--name value` argument from a benchmark's command line, as given.
pub fn bench_text_arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|candidate| candidate == name).and_then(|index| args.get(index + 1).cloned())
}

/// A short random suffix for topic prefixes, MQTT client ids and file names.
pub fn unique_suffix() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// Polls `condition` until it holds or `timeout` passes.
pub async fn wait_until<F, Fut>(timeout: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
