//! `wan`: parse the command line, set up logging, run the daemon or a command.

use std::process::ExitCode;

use clap::Parser;
use wanfs::cli::{Action, Cli, Command, dispatch};

fn main() -> ExitCode {
    if wanfs::mount_helper::invoked_as_helper() {
        return wanfs::mount_helper::run().unwrap_or_else(|e| {
            eprintln!("mount.fuse.wan: {e:#}");
            ExitCode::from(1)
        });
    }
    let cli = Cli::parse();
    // The daemon logs what it does; a command prints its result and logs only problems.
    let default = match cli.command {
        Command::Mount(_) => "info",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("WAN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let result = dispatch(cli).and_then(|action| match action {
        Action::Mount(plan) => wanfs::daemon::run(*plan).map(|_| ExitCode::SUCCESS),
        Action::Done(code) => Ok(code),
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
