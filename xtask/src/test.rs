//! `cargo xtask test`: set-up, then the test suite, as a list of steps run in order.
//!
//! The suite is a list of stages, selectable with `--step`: the workspace's tests on this
//! kernel, the deployment manifests, the agent's image, pods under a real container runtime,
//! the agent against a real Kubernetes API, then the kernel matrix under QEMU.

use std::{
    ffi::OsString,
    io::{BufRead as _, BufReader, Write as _},
    process::Stdio,
};

use anyhow::{Context as _, Result, bail};
use clap::{Args, ValueEnum};

use crate::{
    deploy, disk,
    env::{self, ChildEnv},
    image, kube_api, setup,
    tally::Tally,
    vm,
};

/// Options of `cargo xtask test`.
#[derive(Debug, Args)]
pub struct Options {
    #[command(flatten)]
    setup: setup::Options,

    /// Run only this step (repeatable); by default every step runs, in order.
    #[arg(long = "step", value_enum, value_name = "STEP")]
    steps: Vec<Step>,

    /// Extra arguments for `cargo test` (after `--`); with `-p`/`--package` only those
    /// packages are tested instead of the whole workspace.
    #[arg(last = true, value_name = "CARGO_TEST_ARGS")]
    cargo_test_args: Vec<OsString>,
}

/// One stage of the suite. Stages run in declaration order; the first failure stops the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Step {
    /// `cargo test --workspace`: unit tests and the root integration tests on this kernel.
    Workspace,
    /// The Kubernetes manifests in `deploy/`, validated offline (schemas, strict), broken
    /// examples rejected, and the ConfigMap's policy run through `egress check`.
    Deploy,
    /// The agent's container image (`cargo xtask image`): built with buildah, FROM scratch,
    /// then checked: exactly the static agent and the CA bundle, and `egress --version` run
    /// from the unpacked image in a chroot.
    Image,
    /// Pods under a real containerd, created through the CRI, filtered by the agent
    /// (`tests/tests/pods.rs`, feature `pods`); installs the runtime's Debian packages first.
    Pods,
    /// The agent against a real Kubernetes API: etcd and the CRD server
    /// (k8s.io/apiextensions-apiserver), built once from Debian's packaged Go sources and kept
    /// in `~/.cache/egress/kube-api` (`tests/tests/kube_api.rs`, feature `kube-api`).
    KubeApi,
    /// The kernel-facing tests on Debian's 6.1 and 6.12 kernels under QEMU
    /// (`cargo xtask integration-test --kernel all`).
    Kernels,
    /// Performance regressions without timing: the instructions of the proxy's request path
    /// and of a 10,000-rule reload's user-space work, counted by callgrind in the static
    /// release build the kernels step made, against [`BASELINE`]; a count more than 5 % above
    /// it fails. With `EGRESS_RECORD_BASELINE=1` it records the counts there instead.
    Instructions,
}

/// The instruction counts the `instructions` step checks against (workspace-relative).
const BASELINE: &str = "tests/baselines/instructions.json";

/// Unmounts every bpffs stacked on `/sys/fs/bpf` (in the private mount namespace the script
/// runs in), checks that none is left, says so, then runs its arguments.
const WITHOUT_BPFFS: &str = r#"
while mountpoint -q /sys/fs/bpf; do umount -l /sys/fs/bpf || exit 1; done
if [ "$(stat -f -c %T /sys/fs/bpf 2>/dev/null)" = bpf_fs ]; then
  echo "workspace: /sys/fs/bpf is still a bpf filesystem after unmounting it" >&2
  exit 1
fi
echo "workspace: bpffs is not mounted in this mount namespace (as on a fresh machine); the tests mount it themselves"
exec "$@"
"#;

/// `cargo test` as on a machine that never mounted bpffs: in a private mount namespace where
/// it is unmounted, every test that needs bpffs must mount it itself, the way the agent does.
/// The host's mounts are not touched.
fn without_bpffs(child: &ChildEnv) -> std::process::Command {
    let mut command = child.command("unshare");
    command
        .args(["--mount", "--propagation", "private", "--"])
        .args(["sh", "-c", WITHOUT_BPFFS, "sh", "cargo", "test"]);
    command
}

impl Step {
    fn run(self, child: &ChildEnv, options: &Options) -> Result<()> {
        match self {
            Self::Workspace => {
                let mut command = without_bpffs(child);
                // cargo ignores `--package` next to `--workspace`; let `-- -p tests` narrow.
                if !selects_packages(&options.cargo_test_args) {
                    command.arg("--workspace");
                }
                run_tallied(command.args(&options.cargo_test_args))
            }
            Self::Deploy => deploy::run(child),
            Self::Image => image::test_step(child),
            Self::Pods => {
                setup::debian_packages(child, setup::POD_PACKAGES)?;
                run_tallied(without_bpffs(child).args([
                    "-p",
                    "egress-tests",
                    "--features",
                    "pods",
                    "--test",
                    "pods",
                ]))
            }
            Self::KubeApi => {
                setup::debian_packages(child, setup::POD_PACKAGES)?;
                let parts = kube_api::prepare(child)?;
                run_tallied(
                    without_bpffs(child)
                        .args([
                            "-p",
                            "egress-tests",
                            "--features",
                            "kube-api",
                            "--test",
                            "kube_api",
                        ])
                        .envs(parts.env()),
                )
            }
            Self::Kernels => vm::run_matrix(child, &vm::Matrix::all()),
            Self::Instructions => instructions(child),
        }
    }

    fn name(self) -> String {
        self.to_possible_value()
            .map_or_else(|| format!("{self:?}"), |value| value.get_name().to_owned())
    }
}

/// The `instructions` step: installs valgrind, then runs the instructions bench (static
/// release build) with `--check` [`BASELINE`], or `--record` it when `EGRESS_RECORD_BASELINE`
/// is `1`.
fn instructions(child: &ChildEnv) -> Result<()> {
    setup::debian_packages(child, &[("valgrind", "valgrind")])?;
    let record = std::env::var_os("EGRESS_RECORD_BASELINE").is_some_and(|v| v == "1");
    let baseline = env::workspace_root().join(BASELINE);
    let mut command = child.command("cargo");
    command.args(["bench", "-p", "egress-tests", "--bench", "instructions"]);
    env::static_target(&mut command)
        .arg("--")
        .arg(if record { "--record" } else { "--check" })
        .arg(&baseline);
    eprintln!("test: {}", env::describe(&command));
    env::run_streaming(&mut command).with_context(|| {
        format!(
            "the instruction counts (tests/benches/instructions) against {}",
            baseline.display()
        )
    })
}

/// Runs `cargo test`, streaming its output, and ends with one plain line that totals every
/// test binary (cargo's own last lines are the doc-test runs, which often have no tests).
fn run_tallied(command: &mut std::process::Command) -> Result<()> {
    let described = env::describe(command);
    let mut child = command
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {described}"))?;
    let mut tally = Tally::default();
    let stdout = child.stdout.take().context("cargo's stdout")?;
    let mut out = std::io::stdout().lock();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo's output")?;
        tally.add(&line);
        writeln!(out, "{line}")?;
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for {described}"))?;
    writeln!(
        out,
        "\ntests: {} passed, {} failed, {} skipped",
        tally.passed, tally.failed, tally.ignored
    )?;
    if !status.success() {
        bail!("{described} failed: {status}");
    }
    Ok(())
}

/// Whether cargo's own arguments (those before a `--`) pick packages with `-p`/`--package`.
fn selects_packages(cargo_args: &[OsString]) -> bool {
    cargo_args
        .iter()
        .map(|arg| arg.to_string_lossy())
        .take_while(|arg| arg != "--")
        .any(|arg| arg.starts_with("-p") || arg == "--package" || arg.starts_with("--package="))
}

/// Runs set-up and then each selected step.
pub fn run(options: &Options) -> Result<()> {
    // Fail before set-up spends a minute building bpf-linker for a run that cannot pass.
    env::require_root("the integration tests")?;
    let child = setup::run(&options.setup)?;
    let target = disk::target_dir(&child)?;
    disk::check_room(
        &target,
        disk::free_bytes(&child, &target)?,
        disk::COLD_TEST_BYTES,
    )?;
    let steps = if options.steps.is_empty() {
        Step::value_variants()
    } else {
        &options.steps
    };
    for &step in steps {
        eprintln!("test: step {}", step.name());
        step.run(&child, options)
            .with_context(|| format!("test step `{}` failed", step.name()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> Vec<OsString> {
        words.iter().map(OsString::from).collect()
    }

    #[test]
    fn tally_sums_every_test_result_line() {
        let mut t = Tally::default();
        for line in [
            "running 3 tests",
            "test result: ok. 101 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; finished in 0.21s",
            "test result: FAILED. 10 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 8s",
            "test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s",
        ] {
            t.add(line);
        }
        assert_eq!(
            t,
            Tally {
                passed: 111,
                failed: 1,
                ignored: 2,
                binaries: 3
            }
        );
    }

    #[test]
    fn package_selection_is_seen_only_before_the_test_binary_separator() {
        assert!(selects_packages(&args(&["-p", "tests"])));
        assert!(selects_packages(&args(&["-ptests"])));
        assert!(selects_packages(&args(&[
            "--package",
            "tests",
            "--",
            "--nocapture"
        ])));
        assert!(selects_packages(&args(&["--package=tests"])));
        assert!(!selects_packages(&args(&[])));
        assert!(!selects_packages(&args(&["policy", "--", "-p"])));
        assert!(!selects_packages(&args(&["--", "--package"])));
    }
}
