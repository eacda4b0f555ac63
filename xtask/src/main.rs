//! `cargo xtask`: the privileged and multi-step jobs of the egress workspace.
//!
//! Each subcommand lives in its own module and owns its options; `main` only parses the
//! command line and dispatches. To add a subcommand, add a module with an
//! `Options` struct and a `run` function, and one variant to [`Command`].

mod bench;
mod deploy;
mod disk;
mod env;
mod image;
mod kube_api;
mod run;
mod setup;
mod tally;
mod test;
mod vm;

use clap::{Parser, Subcommand};

/// Developer tasks for egress (set-up, tests, running the agent).
#[derive(Debug, Parser)]
#[command(name = "xtask", bin_name = "cargo xtask", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install what building and testing need: nightly rust-src, bpf-linker, bpftool and
    /// iproute2. Idempotent; takes about a second when everything is present.
    ///
    /// Example: cargo xtask setup
    Setup(setup::Options),
    /// Run set-up, then the test suite as root: `cargo test --workspace` on this kernel, the
    /// deployment manifests, the agent's image (`cargo xtask image`), pods under containerd,
    /// then the kernel-facing tests on Debian's 6.1 and 6.12 kernels under QEMU
    /// (`integration-test --kernel all`); `--step` picks stages.
    ///
    /// Arguments after `--` go to `cargo test`; `-p PACKAGE` there narrows the run.
    ///
    /// Example: cargo xtask test -- --package egress-tests -- --nocapture
    Test(test::Options),
    /// Run set-up, build the agent (one progress line per stage), then run `egress run` as
    /// root; the agent ends its start-up with the commands to run next.
    ///
    /// Arguments after `--` go to `egress run`.
    ///
    /// Example: cargo xtask run -- --help
    Run(run::Options),
    /// Run set-up, then a benchmark (`cargo bench`, release) as root; it prints a table.
    /// Without a benchmark named, run all of them (about 31 minutes, 17 of them the kube
    /// benchmark's 1,000 pods, plus building the contenders) and write
    /// docs/benchmarks.md with the tables and plots.
    ///
    /// Arguments after `--` go to the named benchmark.
    ///
    /// Example: cargo xtask bench connect -- --rounds 9
    Bench(bench::Options),
    /// Run set-up, then the kernel-facing tests (`egress-tests`) on Debian's 6.1 and 6.12
    /// long-term kernels, each booted under QEMU (software emulation), as root. Downloads and
    /// caches the kernels under target/vm/; fails on any failed test or a guest that does not
    /// finish.
    ///
    /// Arguments after `--` go to every test binary in the guest.
    ///
    /// Example: cargo xtask integration-test --kernel 6.1 --test connect -- allowed
    IntegrationTest(vm::Options),
    /// Run set-up, then build the agent's container image without a Docker engine: the agent
    /// static (release, +crt-static) and the machine's CA bundle, FROM scratch, with buildah
    /// (vfs storage under target/image/, removed afterwards), written as an OCI archive and
    /// checked (exact contents, static binary, `egress --version` in a chroot). As root.
    ///
    /// Example: cargo xtask image --out /tmp/egress.oci.tar
    Image(image::Options),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Setup(options) => setup::run(&options).map(drop),
        Command::Test(options) => test::run(&options),
        Command::Run(options) => run::run(&options),
        Command::Bench(options) => bench::run(&options),
        Command::IntegrationTest(options) => vm::run(&options),
        Command::Image(options) => image::run(&options),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::Cli;

    /// clap checks the command definitions only when a subcommand is parsed; check them all.
    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }
}
