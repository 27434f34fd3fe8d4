//! The `ringcast` binary: parse the command line, run, map the outcome to
//! an exit code (0 ok, 1 runtime failure, 2 usage or settings error).

use std::process::ExitCode;

use clap::Parser;
use ringcast::cli::{Cli, Failure};

#[global_allocator]
static GLOBAL: ringcast::sys::Allocator = ringcast::sys::Allocator;

fn main() -> ExitCode {
    match ringcast::cli::run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(e)) => {
            eprintln!("ringcast: {e:#}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(e)) => {
            eprintln!("ringcast: {e:#}");
            ExitCode::from(1)
        }
    }
}
