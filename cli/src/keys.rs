//! `sluice keys ...`: make and read the Ed25519 keys that job requests are signed with.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Subcommand;
use sluice_jobs::signing::SigningKey;

#[derive(Debug, Subcommand)]
pub(crate) enum KeysCommand {
    /// Write a new private key (readable by its owner only) and print its public key, for the
    /// executors' signing.trusted_keys.
    #[command(after_help = "Example:\n  sluice keys generate --out ~/.sluice/ops-alice.key")]
    Generate {
        /// Where to write the private key (PKCS#8 PEM); an existing file is kept unless --force.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// The key's name in signing.trusted_keys [default: the file's name without extension].
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        force: bool,
    },
    /// Print the public key of a private key file.
    Public {
        #[arg(value_name = "FILE")]
        key: PathBuf,
    },
}

pub(crate) fn run(command: KeysCommand) -> anyhow::Result<ExitCode> {
    match command {
        KeysCommand::Generate { out, name, force } => {
            let name = name.unwrap_or_else(|| default_name(&out));
            let (pem, public_key) = SigningKey::generate()?;
            if force {
                // A new file renamed over the old one: nothing that had the old file open (or a
                // symlink at its place pointing elsewhere) gets to see the new key.
                let unique = format!(".{}-{}.tmp", std::process::id(), sluice_clock::now_micros());
                let temporary = out.with_file_name(format!(
                    "{}{unique}",
                    out.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default()
                ));
                write_private(&temporary, &pem)?;
                if let Err(error) = std::fs::rename(&temporary, &out) {
                    // The new private key must not stay behind under another name.
                    let _ = std::fs::remove_file(&temporary);
                    return Err(error).with_context(|| format!("cannot replace {}", out.display()));
                }
            } else {
                write_private(&out, &pem)
                    .with_context(|| format!("{} (--force replaces an existing key)", out.display()))?;
            }
            outln!("wrote the private key to {} (mode 0600); keep it secret", out.display());
            outln!("public key: {public_key}");
            outln!();
            outln!("Trust it in the executors' configuration (executor.toml):");
            outln!("[[signing.trusted_keys]]");
            outln!("name = \"{name}\"");
            outln!("public_key = \"{public_key}\"");
            outln!("jobs = [\"*\"]                       # the job names (globs) it may act on");
            outln!("actions = [\"submit\", \"delete\", \"backfill\"]");
            Ok(ExitCode::SUCCESS)
        }
        KeysCommand::Public { key } => {
            let key = load_key(&key, None)?;
            outln!("{}", key.public_key());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Creates a file that must not exist yet (a symlink there counts), readable by its owner only.
fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()?;
    Ok(())
}

fn default_name(path: &Path) -> String {
    path.file_stem().map(|stem| stem.to_string_lossy().into_owned()).unwrap_or_default()
}

/// The key in a PEM file, named `name_opt` or after the file.
pub(crate) fn load_key(path: &Path, name_opt: Option<&str>) -> anyhow::Result<SigningKey> {
    let metadata =
        std::fs::metadata(path).with_context(|| format!("cannot read the key {}", path.display()))?;
    // Group access is allowed: Kubernetes mounts a Secret readable by the pod's fsGroup.
    if metadata.permissions().mode() & 0o007 != 0 {
        eprintln!(
            "sluice: warning: the private key {} can be read by any user (mode {:o}); chmod 600 it",
            path.display(),
            metadata.permissions().mode() & 0o777
        );
    }
    let pem =
        std::fs::read_to_string(path).with_context(|| format!("cannot read the key {}", path.display()))?;
    let name = name_opt.map_or_else(|| default_name(path), str::to_string);
    if name.is_empty() {
        bail!("the key needs a name: --key-name NAME");
    }
    SigningKey::from_pem(&name, &pem)
        .with_context(|| format!("{} is not a usable signing key", path.display()))
}
