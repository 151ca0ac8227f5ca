//! `wan`: parse the command line, set up logging, run the daemon or a command.

#![deny(clippy::undocumented_unsafe_blocks)]

use std::process::ExitCode;

use clap::Parser;
use wanfs::cli::{Action, Cli, Command, dispatch};
use wanfs::logging::LogConfig;

fn main() -> ExitCode {
    if wanfs::mount_helper::invoked_as_helper() {
        return wanfs::mount_helper::run().unwrap_or_else(|e| {
            eprintln!("mount.fuse.wan: {e:#}");
            ExitCode::from(1)
        });
    }
    let cli = Cli::parse();
    // The daemon logs what it does, as its config says; a command prints its result and logs
    // only problems, to stderr.
    let is_mount = matches!(cli.command, Command::Mount(_));
    if !is_mount {
        // A command piped into `head` should end quietly, like any Unix tool.
        // SAFETY: restoring the default disposition of SIGPIPE before any thread starts; no
        // handler of ours is replaced.
        let _ = unsafe {
            nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGPIPE,
                nix::sys::signal::SigHandler::SigDfl,
            )
        };
        let quiet = LogConfig {
            level: "warn".into(),
            ..LogConfig::default()
        };
        let _ = wanfs::logging::init(&quiet);
    }
    let result = dispatch(cli).and_then(|action| match action {
        Action::Mount(plan) => {
            wanfs::logging::init(&plan.config.log)?;
            for w in wanfs::config::unknown_env(std::env::vars(), &plan.config.http.token_env) {
                tracing::warn!("{w}");
            }
            wanfs::daemon::run(*plan).map(|_| ExitCode::SUCCESS)
        }
        Action::Done(code) => Ok(code),
    });
    match result {
        Ok(code) => code,
        // A usage error found after parsing: clap's form and exit code, as for those it finds.
        Err(e) if e.is::<clap::Error>() => {
            let usage = e.downcast::<clap::Error>().expect("checked");
            let _ = usage.print();
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
