//! `wan`: parse the command line, set up logging, run the daemon or a command.

use std::process::ExitCode;

use clap::Parser;
use wanfs::cli::{Action, Cli, dispatch};

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WAN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let result = dispatch(Cli::parse()).and_then(|action| match action {
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
