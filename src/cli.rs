//! The command line: clap definitions, and turning flags into each module's configuration.
//! The only clap user.

use std::path::PathBuf;
use std::process::ExitCode;

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
    /// Print JSON instead of text, on every command that prints a result (for scripts).
    #[arg(long, global = true)]
    pub json: bool,
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
    /// Operate on models: through the running daemon, or on the cache directly if none runs.
    Models(ModelsArgs),
    /// Check a config file.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Cache maintenance (with the daemon stopped).
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Print a shell completion script: `wan completions bash > /etc/bash_completion.d/wan`.
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff): `wan man | man -l -`; with --out DIR, write wan.1 and a page
    /// per subcommand (wan-models.1, …) into DIR.
    Man {
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum CacheCommand {
    /// Rebuild the cache index from the blob files, re-verifying every chunk against the
    /// manifest; nothing is fetched. Stop the daemon first.
    RebuildIndex {
        #[command(flatten)]
        paths: Paths,
    },
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Validate a config file (and WAN_* overrides); exits non-zero naming the bad key.
    Check { file: PathBuf },
}

/// Where the config, manifest and cache are (shared by `mount` and `models`).
#[derive(clap::Args, Debug, Clone)]
pub struct Paths {
    /// Config file (default: /etc/wan22/wan.toml if it exists).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Manifest (default: config `manifest`, else /etc/wan22/models.toml).
    #[arg(long, global = true)]
    pub manifest: Option<PathBuf>,
    /// Cache directory (default: config `cache_dir`, else /var/cache/wan22).
    #[arg(long, global = true)]
    pub cache_dir: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct ModelsArgs {
    #[command(flatten)]
    pub paths: Paths,
    /// The daemon's HTTP address (default: config http.addr, else 127.0.0.1:8000).
    #[arg(long, global = true)]
    pub http: Option<String>,
    #[command(subcommand)]
    pub command: ModelsCommand,
}

/// Which models: `--only a,b`, `--all`, or `--model-list FILE`; one of them is required, so
/// a command never reads "no selection" as "every model".
#[derive(clap::Args, Debug, Default)]
#[group(required = true, multiple = true)]
pub struct Selection {
    /// Model ids, comma separated (repeatable).
    #[arg(long)]
    pub only: Vec<String>,
    /// Every model of the manifest.
    #[arg(long, conflicts_with_all = ["only", "model_list"])]
    pub all: bool,
    /// A file with one model id per line.
    #[arg(long)]
    pub model_list: Option<PathBuf>,
}

/// Which models, by name only: `--only a,b` or `--model-list FILE` (for `mark-corrupted`,
/// where every model at once would drop the whole cache).
#[derive(clap::Args, Debug, Default)]
#[group(required = true, multiple = true)]
pub struct Named {
    /// Model ids, comma separated (repeatable).
    #[arg(long)]
    pub only: Vec<String>,
    /// A file with one model id per line.
    #[arg(long)]
    pub model_list: Option<PathBuf>,
}

impl Selection {
    /// The selection, refused as a usage error of `wan models <command>` if it names no model
    /// (`--only ""`, an empty list file).
    fn selected(&self, command: &str) -> anyhow::Result<crate::control::Selection> {
        if self.all {
            return Ok(crate::control::Selection::All);
        }
        named_ids(
            &self.only,
            self.model_list.as_deref(),
            command,
            "; --all means every model",
        )
        .map(crate::control::Selection::Ids)
    }
}

impl Named {
    fn ids(&self, command: &str) -> anyhow::Result<Vec<String>> {
        named_ids(&self.only, self.model_list.as_deref(), command, "")
    }
}

/// The ids of `--only` and `--model-list`; none is a usage error, whose message ends with
/// `hint` (how to name every model, where the command can).
fn named_ids(
    only: &[String],
    model_list: Option<&std::path::Path>,
    command: &str,
    hint: &str,
) -> anyhow::Result<Vec<String>> {
    let mut ids = crate::cmd::split_ids(only);
    if let Some(f) = model_list {
        ids.extend(crate::cmd::read_model_list(f)?);
    }
    if ids.is_empty() {
        let mut why = Vec::new();
        if !only.is_empty() {
            why.push("--only names none".to_string());
        }
        if let Some(f) = model_list {
            why.push(format!("{} lists none", f.display()));
        }
        return Err(usage_error(
            &["models", command],
            format!("the selection names no model ({}){hint}", why.join(", ")),
        ));
    }
    Ok(ids)
}

/// A usage error of `wan <path…>` found after parsing, in clap's form (message, usage line).
/// `main` prints it and exits 2, as for any usage error clap finds itself.
pub fn usage_error(path: &[&str], message: impl std::fmt::Display) -> anyhow::Error {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    cmd.build();
    let mut sub = &mut cmd;
    for name in path {
        sub = sub.find_subcommand_mut(name).expect("a subcommand of wan");
    }
    sub.error(clap::error::ErrorKind::ValueValidation, message)
        .into()
}

#[derive(Subcommand, Debug)]
pub enum ModelsCommand {
    /// State of each model (exit 1 if any is corrupt or failed).
    Status {
        #[arg(long)]
        only: Vec<String>,
        /// Only pinned (critical) models.
        #[arg(long)]
        critical_only: bool,
        /// Only models that are corrupt or whose last job failed.
        #[arg(long)]
        failed_only: bool,
    },
    /// Fetch and verify every chunk of models now.
    Ensure {
        #[command(flatten)]
        sel: Selection,
        /// Drop what is cached first and fetch everything again.
        #[arg(long)]
        force_redownload: bool,
        /// Print MB/s and time to first byte.
        #[arg(long)]
        benchmark: bool,
    },
    /// Re-read cached chunks and check their sha256; corrupt chunks are fetched again.
    Verify {
        #[command(flatten)]
        sel: Selection,
        /// Only report: mark the model CORRUPT, fetch nothing.
        #[arg(long)]
        report_only: bool,
    },
    /// Evict cached data (least recently used, never pinned models).
    Gc {
        /// Down to the low watermark (default).
        #[arg(long, group = "mode")]
        auto: bool,
        /// Everything not pinned and not open.
        #[arg(long, group = "mode")]
        aggressive: bool,
        /// Aggressive, plus orphan files, re-verify what stays, compact the index.
        #[arg(long, group = "mode")]
        deep_clean: bool,
        /// Print what would be removed, remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Reports from the download and storage history.
    Report {
        /// Downloads, failures, evictions and verifications of the last 24 hours.
        #[arg(long, group = "kind")]
        daily: bool,
        /// Storage use over time.
        #[arg(long, group = "kind")]
        storage: bool,
        /// With --storage: the last 30 days (default).
        #[arg(long)]
        last_30_days: bool,
    },
    /// Mark models corrupt and drop their cached data (fetched and verified again on use).
    MarkCorrupted {
        #[command(flatten)]
        sel: Named,
    },
    /// Never evict this model.
    Pin { id: String },
    /// Let GC evict this model again.
    Unpin { id: String },
    /// Every model of the manifest.
    List,
}

#[derive(clap::Args, Debug)]
pub struct MountArgs {
    /// Where to mount (default: config `mountpoint`, else /data/models).
    pub mountpoint: Option<PathBuf>,
    /// Mount even if the mountpoint holds files, hiding them while mounted (config:
    /// mount.allow_non_empty). Without it such a mountpoint is refused.
    #[arg(long)]
    pub allow_non_empty: bool,
    #[command(flatten)]
    pub paths: Paths,
}

#[derive(Subcommand, Debug)]
pub enum ManifestCommand {
    /// Print the manifest entry (TOML) for a local model tree, a Hub repository
    /// (hf://org/repo@rev, from its API: HF_ENDPOINT, HF_TOKEN) or an S3 prefix
    /// (s3://bucket/prefix: AWS_*).
    Build {
        /// The model's directory, or hf://org/repo@rev, or s3://bucket/prefix.
        dir: PathBuf,
        /// Model id, NAME@X.Y.Z.
        #[arg(long)]
        id: String,
        /// Chunk size in bytes.
        #[arg(long, default_value_t = DEFAULT_CHUNK_SIZE)]
        chunk_size: u64,
        /// Size of each file's first chunk, in bytes (0: none, all chunks --chunk-size).
        /// Default: 1 MiB, or a safetensors header rounded up to 1 MiB, so a loader's first
        /// read waits for one small chunk.
        #[arg(long)]
        head_size: Option<u64>,
        /// A source URL, in priority order (repeatable). Default for a local directory:
        /// file://<its absolute path>.
        #[arg(long = "source")]
        sources: Vec<String>,
        /// List only whole-file digests (files are then fetched whole on first read). For
        /// hf://, s3:// and oci://, the opt-out from the chunk lists a build lists by default
        /// for every file it downloads anyway.
        #[arg(long)]
        whole_only: bool,
        /// For hf:// and oci://: fetch every file once and list its chunk digests (lazy
        /// reads). Without it, files whose sha256 is listed (the Hub's LFS files, OCI layers)
        /// get whole-file digests and no download; the others (all of s3://, the Hub's
        /// git-stored files) are downloaded to be hashed, and get chunk lists anyway.
        #[arg(long, conflicts_with = "whole_only")]
        chunked: bool,
        /// What chunk digests are taken with: blake3-tree (BLAKE3 subtrees on the aligned
        /// power-of-two layout, so a BLAKE3 signature of a file binds its chunk list with no
        /// download; --chunk-size and --head-size powers of two), blake3 (each chunk hashed
        /// alone, several times faster than sha256 where the CPU has AVX-512 or AVX2, see
        /// docs/DESIGN-NOTES.md) or sha256. The whole-file digest is sha256 in every case.
        #[arg(long, default_value = "blake3-tree")]
        chunk_hash: crate::chunk::ChunkHash,
        /// Write each blake3-tree file's outboard (its 64 KiB sub-blocks' BLAKE3 values,
        /// 1/2048 of its size) into DIR as <sha256>.wanobao, from the bytes the build hashes
        /// anyway. `wan mount` looks for them in the manifest's directory's outboards/: a
        /// small read of a cold chunk then fetches 64 KiB, not the chunk (docs/MANIFEST.md).
        #[arg(long, value_name = "DIR")]
        outboards: Option<PathBuf>,
    },
    /// Publish an oci:// model's chunk lists next to it, for the whole fleet: every raw layer
    /// is read once and hashed, and the lists are pushed as an OCI 1.1 referrer of the model's
    /// manifest (artifactType application/vnd.wanfs.chunks.v1+json; under the tag
    /// sha256-<digest> where the registry has no referrers API). `wan manifest build oci://…`
    /// then lists them without reading a layer. Needs push access ([oci] credentials).
    PublishChunks {
        /// oci://registry[:port]/repo:tag or oci://…/repo@sha256:….
        url: String,
        /// Chunk size in bytes.
        #[arg(long, default_value_t = DEFAULT_CHUNK_SIZE)]
        chunk_size: u64,
        /// Size of each file's first chunk, as for `manifest build`.
        #[arg(long)]
        head_size: Option<u64>,
        /// What chunk digests are taken with, as for `manifest build` (a BLAKE3-signed model
        /// needs blake3-tree, the default).
        #[arg(long, default_value = "blake3-tree")]
        chunk_hash: crate::chunk::ChunkHash,
    },
    /// Validate a manifest; exits non-zero listing every problem.
    Check { file: PathBuf },
    /// Internal: validate a manifest and write its compiled form into OUT; prints its sha256.
    /// `wan mount` runs this as a child so the TOML parse's memory never lands in the daemon.
    #[command(hide = true)]
    Compile {
        file: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// The sha256 of the manifest in force: models whose text is unchanged are taken from
        /// its compiled form instead of being parsed again.
        #[arg(long)]
        prev: Option<String>,
    },
}

/// What `main` should do after parsing.
pub enum Action {
    Mount(Box<MountPlan>),
    Done(ExitCode),
}

impl Paths {
    fn load(&self) -> anyhow::Result<(Config, PathBuf, PathBuf)> {
        let config = match &self.config {
            Some(p) => Config::load(p)?,
            None if std::path::Path::new(DEFAULT_CONFIG).exists() => {
                Config::load(std::path::Path::new(DEFAULT_CONFIG))?
            }
            None => Config::default(),
        };
        let config = config.with_env(std::env::vars())?;
        let manifest = self
            .manifest
            .clone()
            .or_else(|| config.manifest.clone())
            .unwrap_or_else(|| DEFAULT_MANIFEST.into());
        let cache_dir = self
            .cache_dir
            .clone()
            .or_else(|| config.cache_dir.clone())
            .unwrap_or_else(|| DEFAULT_CACHE_DIR.into());
        Ok((config, manifest, cache_dir))
    }
}

impl MountArgs {
    fn plan(self) -> anyhow::Result<MountPlan> {
        let (mut config, manifest, cache_dir) = self.paths.load()?;
        let allow_non_empty = self.allow_non_empty;
        config.mount.allow_non_empty |= allow_non_empty;
        let paths = self.paths.clone();
        let reread = Box::new(move || {
            let (mut config, manifest, _) = paths.load()?;
            config.mount.allow_non_empty |= allow_non_empty;
            Ok((config, manifest))
        });
        Ok(MountPlan {
            reread,
            mountpoint: self
                .mountpoint
                .or_else(|| config.mountpoint.clone())
                .unwrap_or_else(|| DEFAULT_MOUNTPOINT.into()),
            manifest,
            cache_dir,
            config,
        })
    }
}

/// `wan.1`: clap's sections, then FILES, ENVIRONMENT and EXIT STATUS, which clap cannot
/// derive (docs/CONFIGURATION.md and docs/CONTROL.md say the same at length).
fn man_page(cmd: clap::Command, w: &mut dyn std::io::Write) -> std::io::Result<()> {
    clap_mangen::Man::new(cmd).render(w)?;
    let overrides: Vec<String> = crate::config::override_vars()
        .iter()
        .map(|v| format!("\\fB{v}\\fR"))
        .collect();
    let extra = MAN_EXTRA.replace("@OVERRIDES@", &overrides.join(", "));
    w.write_all(extra.as_bytes())
}

/// Roff for the sections of `wan.1` that clap does not make.
const MAN_EXTRA: &str = r#".SH FILES
.TP
\fB/etc/wan22/wan.toml\fR
The configuration (\fB\-\-config\fR); checked by \fBwan config check\fR.
.TP
\fB/etc/wan22/models.toml\fR
The manifest: the models served, their files, digests and sources (\fB\-\-manifest\fR, config \fBmanifest\fR); checked by \fBwan manifest check\fR.
.TP
\fB/var/cache/wan22/v1/\fR
The cache (\fB\-\-cache\-dir\fR, config \fBcache_dir\fR): blobs/, index.sqlite, lock, and the compiled manifests.
.TP
\fB/data/models\fR
The default mountpoint (config \fBmountpoint\fR); its control files are in \fB.wan/\fR.
.TP
\fB/etc/wan22/wan.env\fR
Secrets for the systemd unit (\fBEnvironmentFile=\fR), mode 0600.
.SH ENVIRONMENT
.\" Long variable names: ragged right and unhyphenated.
.ad l
.nh
.TP
\fBWAN_\fIKEY\fR, \fBWAN_\fISECTION\fB_\fIKEY\fR
Override a key of the configuration, top-level or of [\fISECTION\fR], with a TOML value (\fBWAN_FETCH_CONNECTIONS=32\fR): @OVERRIDES@. Any other \fBWAN_*\fR name is warned about, with the one probably meant.
.TP
\fBWAN_LOG\fR
A log filter (\fBdebug\fR, \fBwanfs=debug,info\fR) that overrides \fBlog.level\fR; an invalid one is warned about and ignored.
.TP
\fBWAN_HTTP_TOKEN\fR
The bearer token for remote POSTs and peers: the variable \fBhttp.token_env\fR names.
.TP
\fBHF_TOKEN\fR, \fBHF_ENDPOINT\fR
The token and base URL for \fBhf://\fR sources and builds.
.TP
\fBAWS_ACCESS_KEY_ID\fR, \fBAWS_SECRET_ACCESS_KEY\fR, \fBAWS_SESSION_TOKEN\fR, \fBAWS_REGION\fR, \fBAWS_DEFAULT_REGION\fR, \fBAWS_ENDPOINT_URL\fR
Credentials, region and endpoint for \fBs3://\fR sources and builds.
.TP
\fBNOTIFY_SOCKET\fR
Set by systemd (Type=notify): READY once the mount answers.
.ad b
.hy
.SH "EXIT STATUS"
.TP
\fB0\fR
Success.
.TP
\fB1\fR
A failure: a refused config or manifest, a model corrupt or failed, a job that failed, an unknown model id, an error from the daemon.
.TP
\fB2\fR
A usage error: an unknown option or command, or options that conflict.
.SH "SEE ALSO"
docs/CONFIGURATION.md, docs/CONTROL.md, docs/OPERATIONS.md
"#;

fn models(args: ModelsArgs, json: bool) -> anyhow::Result<ExitCode> {
    use crate::cmd::{ModelsOp, Target};
    use crate::control::GcMode;
    let (config, manifest, cache_dir) = args.paths.load()?;
    let http = args.http.unwrap_or_else(|| config.http.addr.clone());
    let op = match args.command {
        ModelsCommand::Status {
            only,
            critical_only,
            failed_only,
        } => ModelsOp::Status {
            only: crate::cmd::split_ids(&only),
            critical_only,
            failed_only,
        },
        ModelsCommand::Ensure {
            sel,
            force_redownload,
            benchmark,
        } => ModelsOp::Ensure {
            sel: sel.selected("ensure")?,
            force: force_redownload,
            benchmark,
        },
        ModelsCommand::Verify { sel, report_only } => ModelsOp::Verify {
            sel: sel.selected("verify")?,
            report_only,
        },
        ModelsCommand::Gc {
            aggressive,
            deep_clean,
            dry_run,
            ..
        } => ModelsOp::Gc {
            mode: if deep_clean {
                GcMode::DeepClean
            } else if aggressive {
                GcMode::Aggressive
            } else {
                GcMode::Auto
            },
            dry_run,
        },
        ModelsCommand::Report { storage, .. } => {
            if storage {
                ModelsOp::ReportStorage {
                    days: crate::control::Request::STORAGE_DAYS,
                }
            } else {
                ModelsOp::ReportDaily
            }
        }
        ModelsCommand::MarkCorrupted { sel } => ModelsOp::MarkCorrupted {
            ids: sel.ids("mark-corrupted")?,
        },
        ModelsCommand::Pin { id } => ModelsOp::Pin { id, pinned: true },
        ModelsCommand::Unpin { id } => ModelsOp::Pin { id, pinned: false },
        ModelsCommand::List => ModelsOp::List,
    };
    crate::cmd::run(
        op,
        Target {
            http,
            manifest,
            cache_dir,
            config,
        },
        json,
    )
}

/// Runs every command that is not the daemon; returns the mount plan for `wan mount`.
pub fn dispatch(cli: Cli) -> anyhow::Result<Action> {
    let json = cli.json;
    match cli.command {
        Command::Mount(args) => Ok(Action::Mount(Box::new(args.plan()?))),
        Command::Models(args) => Ok(Action::Done(models(args, json)?)),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "wan", &mut std::io::stdout());
            Ok(Action::Done(ExitCode::SUCCESS))
        }
        Command::Man { out } => {
            use clap::CommandFactory;
            let cmd = Cli::command();
            match out {
                Some(dir) => {
                    std::fs::create_dir_all(&dir)?;
                    clap_mangen::generate_to(cmd.clone(), &dir)?;
                    // wan.1 again, with the sections clap does not know about.
                    let mut page = std::fs::File::create(dir.join("wan.1"))?;
                    man_page(cmd, &mut page)?;
                    if !json {
                        println!("wrote man pages to {}", dir.display());
                    }
                }
                None => man_page(cmd, &mut std::io::stdout())?,
            }
            Ok(Action::Done(ExitCode::SUCCESS))
        }
        Command::Cache(CacheCommand::RebuildIndex { paths }) => {
            let (_, manifest, cache_dir) = paths.load()?;
            // Opening the store would make an empty cache at a mistyped path and "rebuild" it.
            if !cache_dir.join("v1").is_dir() {
                anyhow::bail!(
                    "{} holds no wan cache (no v1/ directory): check --cache-dir or the \
                     config's cache_dir; there is nothing to rebuild",
                    cache_dir.display()
                );
            }
            let manifest = Manifest::load(&manifest)?;
            let store = crate::store::Store::open_rebuilding(&cache_dir)?;
            let report = store.adopt(manifest.models.values().flat_map(|m| &m.files))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("{report}");
            }
            Ok(Action::Done(ExitCode::SUCCESS))
        }
        Command::Config(ConfigCommand::Check { file }) => {
            let checked = Config::load(&file)
                .and_then(|c| c.with_env(std::env::vars()))
                // `[trust]` names files: read them as the daemon will, so a missing key or a
                // non-PEM file fails here, naming it.
                .and_then(|c| match crate::trust::Anchors::load(&c.trust) {
                    Ok(_) => Ok(c),
                    Err(msg) => Err(crate::config::ConfigError::Invalid {
                        path: file.display().to_string(),
                        msg,
                    }),
                });
            // What the daemon would warn about at start: it starts, so these do not fail the
            // check.
            let token_env = checked.as_ref().map_or_else(
                |_| crate::config::HttpConfig::default().token_env,
                |c| c.http.token_env.clone(),
            );
            let mut warnings = crate::config::unknown_env(std::env::vars(), &token_env);
            for w in &warnings {
                eprintln!("warning: {w}");
            }
            // Already on stderr: logging's set-up reported it.
            warnings.extend(crate::logging::wan_log_problem());
            if json {
                let v = match &checked {
                    Ok(_) => serde_json::json!({"ok": true, "file": file, "warnings": warnings}),
                    Err(e) => serde_json::json!({"ok": false, "file": file,
                        "error": e.to_string(), "warnings": warnings}),
                };
                println!("{v}");
            }
            match checked {
                Ok(_) => {
                    if !json {
                        println!("ok: {}", file.display());
                    }
                    Ok(Action::Done(ExitCode::SUCCESS))
                }
                Err(e) => {
                    eprintln!("{e}");
                    Ok(Action::Done(ExitCode::from(1)))
                }
            }
        }
        Command::Manifest(ManifestCommand::Build {
            dir,
            id,
            chunk_size,
            head_size,
            sources,
            whole_only,
            chunked,
            chunk_hash,
            outboards,
        }) => {
            let remote = dir.to_str().filter(|d| crate::remote::is_remote(d));
            if chunked && remote.is_none() {
                return Err(usage_error(
                    &["manifest", "build"],
                    "--chunked is for hf:// and s3:// models; a local build lists chunk digests unless --whole-only",
                ));
            }
            let opts = BuildOptions {
                id,
                chunk_size,
                head_size,
                sources,
                whole_only: whole_only || (remote.is_some() && !chunked),
                chunk_hash,
                outboards,
            };
            let text = match remote {
                Some(url) => crate::remote::build(url, &opts, !whole_only)?,
                None => crate::manifest::build(&dir, &opts)?,
            };
            if json {
                let table: toml::Table = toml::from_str(&text)?;
                println!("{}", serde_json::to_string_pretty(&table)?);
            } else {
                print!("{text}");
            }
            Ok(Action::Done(ExitCode::SUCCESS))
        }
        Command::Manifest(ManifestCommand::PublishChunks {
            url,
            chunk_size,
            head_size,
            chunk_hash,
        }) => {
            let opts = BuildOptions {
                id: String::new(),
                chunk_size,
                head_size,
                sources: Vec::new(),
                whole_only: false,
                chunk_hash,
                outboards: None,
            };
            println!("{}", crate::remote::publish_chunks(&url, &opts)?);
            Ok(Action::Done(ExitCode::SUCCESS))
        }
        Command::Manifest(ManifestCommand::Compile { file, out, prev }) => {
            // A bad --prev only costs the shortcut.
            let prev = prev.and_then(|p| p.parse().ok());
            match crate::compiled::compile(&file, &out, prev.as_ref()) {
                Ok(sha) => {
                    println!("{sha}");
                    Ok(Action::Done(ExitCode::SUCCESS))
                }
                Err(e) => {
                    // Exactly what `Manifest::load` says: the daemon repeats it as its error.
                    eprintln!("{e}");
                    let code = match e {
                        crate::compiled::CompileError::Write { .. } => {
                            crate::compiled::EXIT_NOT_WRITTEN
                        }
                        crate::compiled::CompileError::Manifest(_) => 1,
                    };
                    Ok(Action::Done(ExitCode::from(code)))
                }
            }
        }
        Command::Manifest(ManifestCommand::Check { file }) => match Manifest::load(&file) {
            // Nothing to serve is almost always a mistake (an entry appended to another
            // file, a build that printed nothing): not `ok: 0 models`.
            Ok(m) if m.models.is_empty() => {
                let problem = format!(
                    "{}: no models (a manifest lists at least one [models.\"NAME@X.Y.Z\"])",
                    file.display()
                );
                if json {
                    let v = serde_json::json!({"ok": false, "file": file, "problems": [problem]});
                    println!("{v}");
                }
                eprintln!("{problem}");
                Ok(Action::Done(ExitCode::from(1)))
            }
            Ok(m) if json => {
                // A JSON number is a double to most readers anyway: past u64 (sizes of up to
                // i64::MAX each add up to more) the total goes as one.
                let bytes = m.total_bytes();
                let bytes: serde_json::Value =
                    u64::try_from(bytes).map_or_else(|_| (bytes as f64).into(), Into::into);
                let v = serde_json::json!({"ok": true, "file": file,
                    "models": m.models.len(), "files": m.file_count(), "bytes": bytes,
                    "notes": crate::trust::bind::notes(m.models.values())});
                println!("{v}");
                Ok(Action::Done(ExitCode::SUCCESS))
            }
            Ok(m) => {
                println!(
                    "ok: {} models, {} files, {} bytes",
                    m.models.len(),
                    m.file_count(),
                    m.total_bytes()
                );
                for n in crate::trust::bind::notes(m.models.values()) {
                    eprintln!("note: {n}");
                }
                Ok(Action::Done(ExitCode::SUCCESS))
            }
            Err(e) => {
                if json {
                    let problems: Vec<String> = e.to_string().lines().map(String::from).collect();
                    let v = serde_json::json!({"ok": false, "file": file, "problems": problems});
                    println!("{v}");
                }
                eprintln!("{e}");
                Ok(Action::Done(ExitCode::from(1)))
            }
        },
    }
}
