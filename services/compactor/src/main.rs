//! `sluice-compactor`: not built yet.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("sluice-compactor is not implemented yet; see docs/ARCHITECTURE.md for what it will do");
    ExitCode::FAILURE
}
