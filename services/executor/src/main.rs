//! `sluice-executor`: not built yet.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("sluice-executor is not implemented yet; see docs/ARCHITECTURE.md for what it will do");
    ExitCode::FAILURE
}
