//! `nbdcrypt admin …`: ask a running server, through its control socket,
//! what it serves and how it is doing.

use std::path::PathBuf;

use clap::Subcommand;

use super::{CliResult, Global};
use crate::control::{Client, Request};

#[derive(clap::Args, Debug)]
pub struct AdminArgs {
    /// The control socket of the server (`nbdcrypt serve --control PATH`).
    #[arg(long, value_name = "CTL_SOCKET")]
    server: PathBuf,
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(Subcommand, Debug)]
enum AdminCommand {
    /// The exports served: volume id, size, mode, file.
    ListExports,
    /// Uptime, space used per export, snapshot counters.
    Stats,
}

pub fn run(args: AdminArgs, global: &Global) -> CliResult {
    let mut client = Client::connect(&args.server)?;
    match args.command {
        AdminCommand::ListExports => {
            let result = client.call(&Request::ListExports)?;
            if global.json {
                println!("{result}");
                return Ok(());
            }
            println!("{:<24} {:>14} {:<4} PATH", "EXPORT", "SIZE", "MODE");
            for e in result["exports"].as_array().into_iter().flatten() {
                println!(
                    "{:<24} {:>14} {:<4} {}",
                    e["name"].as_str().unwrap_or_default(),
                    e["size"],
                    if e["read_only"] == true { "ro" } else { "rw" },
                    e["path"].as_str().unwrap_or_default()
                );
            }
        }
        AdminCommand::Stats => {
            let result = client.call(&Request::Stats)?;
            if global.json {
                println!("{result}");
                return Ok(());
            }
            let s = &result["snapshots"];
            println!(
                "pid {}, up {} s, db {}; snapshots: {} taken, {} failed, {} in progress",
                result["pid"],
                result["uptime_seconds"],
                result["db_id"].as_str().unwrap_or_default(),
                s["taken"],
                s["failed"],
                s["in_progress"]
            );
            for e in result["exports"].as_array().into_iter().flatten() {
                println!(
                    "{:<24} {:>14} bytes, {} allocated",
                    e["name"].as_str().unwrap_or_default(),
                    e["size"],
                    e["allocated"]
                );
            }
        }
    }
    Ok(())
}
