//! The command line: clap definitions, and turning flags into each module's configuration.
//! The only clap user.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::daemon::MountPlan;
use crate::manifest::{BuildOptions, DEFAULT_CHUNK_SIZE, Manifest};

/// Where the config file is looked for when `--config` is not given.
pub const DEFAULT_CONFIG: &str = "/etc/wan22/wan.toml";
const DEFAULT_MOUNTPOINT: &str = "/data/models";
const DEFAULT_MANIFEST: &str = "/etc/wan22/models.toml";
const DEFAULT_CACHE_DIR: &str = "/var/cache/wan22";

#[derive(Parser, Debug)]
#[command(
    name = "wan",
    version,
    about = "wanfs: every model mounted at once, fetched lazily and verified"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Mount the models of a manifest and serve them until SIGTERM/SIGINT.
    Mount(MountArgs),
    /// Build or check a manifest.
    #[command(subcommand)]
    Manifest(ManifestCommand),
}

#[derive(clap::Args, Debug)]
pub struct MountArgs {
    /// Where to mount (default: config `mountpoint`, else /data/models).
    pub mountpoint: Option<PathBuf>,
    /// Config file (default: /etc/wan22/wan.toml if it exists).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Manifest (default: config `manifest`, else /etc/wan22/models.toml).
    #[arg(long)]
    pub manifest: Option<PathBuf>,
    /// Cache directory (default: config `cache_dir`, else /var/cache/wan22).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum ManifestCommand {
    /// Print the manifest entry (TOML) for a local model tree.
    Build {
        /// The model's directory.
        dir: PathBuf,
        /// Model id, NAME@X.Y.Z.
        #[arg(long)]
        id: String,
        /// Chunk size in bytes.
        #[arg(long, default_value_t = DEFAULT_CHUNK_SIZE)]
        chunk_size: u64,
        /// A source URL, in priority order (repeatable).
        #[arg(long = "source")]
        sources: Vec<String>,
        /// List only whole-file digests (files are then fetched whole on first read).
        #[arg(long)]
        whole_only: bool,
    },
    /// Validate a manifest; exits non-zero listing every problem.
    Check { file: PathBuf },
}

/// What `main` should do after parsing.
pub enum Action {
    Mount(Box<MountPlan>),
    Done(ExitCode),
}

impl MountArgs {
    fn plan(self) -> anyhow::Result<MountPlan> {
        let config = match &self.config {
            Some(p) => Config::load(p)?,
            None if std::path::Path::new(DEFAULT_CONFIG).exists() => {
                Config::load(std::path::Path::new(DEFAULT_CONFIG))?
            }
            None => Config::default(),
        };
        Ok(MountPlan {
            mountpoint: self
                .mountpoint
                .or_else(|| config.mountpoint.clone())
                .unwrap_or_else(|| DEFAULT_MOUNTPOINT.into()),
            manifest: self
                .manifest
                .or_else(|| config.manifest.clone())
                .unwrap_or_else(|| DEFAULT_MANIFEST.into()),
            cache_dir: self
                .cache_dir
                .or_else(|| config.cache_dir.clone())
                .unwrap_or_else(|| DEFAULT_CACHE_DIR.into()),
            config,
        })
    }
}

/// Runs every command that is not the daemon; returns the mount plan for `wan mount`.
pub fn dispatch(cli: Cli) -> anyhow::Result<Action> {
    match cli.command {
        Command::Mount(args) => Ok(Action::Mount(Box::new(args.plan()?))),
        Command::Manifest(ManifestCommand::Build {
            dir,
            id,
            chunk_size,
            sources,
            whole_only,
        }) => {
            let text = crate::manifest::build(
                &dir,
                &BuildOptions {
                    id,
                    chunk_size,
                    sources,
                    whole_only,
                },
            )
            .with_context(|| format!("building a manifest entry for {}", dir.display()))?;
            print!("{text}");
            Ok(Action::Done(ExitCode::SUCCESS))
        }
        Command::Manifest(ManifestCommand::Check { file }) => match Manifest::load(&file) {
            Ok(m) => {
                println!(
                    "ok: {} models, {} files, {} bytes",
                    m.models.len(),
                    m.file_count(),
                    m.total_bytes()
                );
                Ok(Action::Done(ExitCode::SUCCESS))
            }
            Err(e) => {
                eprintln!("{e}");
                Ok(Action::Done(ExitCode::from(1)))
            }
        },
    }
}
