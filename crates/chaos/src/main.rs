//! `twinhub-chaos`: reliability campaigns against a real `twinhub serve` process, driven with
//! the workspace's own SDK (`DeviceClient` over MQTT/TLS, `ServiceClient` over HTTPS).
//!
//! - `kill`: crash durability. Each trial loads a fresh hub with acknowledged writes of four
//!   kinds, SIGKILLs it at a random moment, restarts it on the same data dir (timing the
//!   restart) and checks that every write the hub acknowledged is there. See [`kill`].
//! - `soak`: many devices connected for a long time under a steady mix of direct methods,
//!   reported and desired patches, with the hub's resident memory sampled. See [`soak`].
//! - `slow-consumer`: method latency on healthy devices alone and beside a device that
//!   stopped reading, and how soon the hub drops that device. See [`slow`].
//!
//! Both start the hub as a child process on 127.0.0.1 with ports the system picks
//! ([`hub`]), so they need no root, no fixed ports and no cleanup, and exit non-zero when
//! the campaign found a problem. `scripts/chaos` and `scripts/soak` build and run them.

mod devices;
mod hub;
mod kill;
mod rng;
mod slow;
mod soak;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "twinhub-chaos",
    version,
    about = "Reliability campaigns against twinhub: SIGKILL under load, and long soaks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// SIGKILL the hub under durable load, restart it, and check every acknowledged write
    Kill(kill::KillArgs),
    /// Keep many devices busy for a long time and sample the hub's memory
    Soak(soak::SoakArgs),
    /// Measure method latency beside a device that stopped reading, and when it is dropped
    SlowConsumer(slow::SlowArgs),
}

/// Raises the soft open-file limit to the hard limit (the hub, started afterwards, inherits
/// it) and returns the limit now in force.
pub(crate) fn raise_nofile_limit() -> u64 {
    rlimit::increase_nofile_limit(u64::MAX)
        .or_else(|_| rlimit::Resource::NOFILE.get().map(|(soft, _)| soft))
        .unwrap_or(1024)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        match cli.command {
            Command::Kill(args) => {
                raise_nofile_limit();
                kill::run(args).await
            }
            Command::Soak(args) => soak::run(args).await,
            Command::SlowConsumer(args) => slow::run(args).await,
        }
    });
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
