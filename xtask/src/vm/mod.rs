//! `cargo xtask integration-test --kernel 6.1|6.12|all`: the kernel-facing tests on Debian's
//! long-term kernels, each booted under QEMU.
//!
//! Users run long-term kernels, not only the one this machine boots. Like aya's own CI, this
//! boots each kernel in a virtual machine and runs the `egress-tests` integration tests in
//! it, for real (programs loaded, verified, attached; connections counted at sinks):
//!
//! 1. Kernels come from Debian's archive through their meta-packages (`apt-get download`,
//!    then `dpkg-deb -x` into `target/vm/kernels/<package>/`), so `/boot` is never touched
//!    and a second run downloads nothing.
//! 2. The tests and the binaries they run are built as static executables for
//!    `x86_64-unknown-linux-gnu` with `+crt-static`, so they need no libraries in the guest.
//! 3. One initramfs holds busybox (the guest's `/init` and shell), the tests and binaries at
//!    the same absolute paths as on the host (the tests find them through paths compiled in),
//!    the host tools the tests call (`ip`, `nsenter`, `unshare`, `bpftool`, `mount`) with
//!    their shared libraries, and each kernel's `veth` module.
//! 4. QEMU boots each kernel with that initramfs under software emulation (`-accel tcg`: KVM
//!    does not work in nested VMs such as our CI machines: "KVM internal error"), inside
//!    `timeout`. The guest's `/init` mounts proc, sysfs, devtmpfs, cgroup2 and bpffs, runs
//!    every test binary and prints an exit marker with the result; the run fails on any
//!    failed test, on a missing marker (a guest that crashed or hung) and on a binary that ran
//!    no test.
//!
//! The guest's console goes to `target/vm/<kernel>.log` and, line by line, to stderr.
//!
//! The stages live in files of their own: [`kernel`] (fetch and unpack an image),
//! [`initramfs`] (build the tests, pack the guest), [`boot`] (QEMU, the console, the verdict).

mod boot;
mod initramfs;
mod kernel;

use std::{fs, time::Instant};

use anyhow::{Context as _, Result, bail};
use clap::{Args, ValueEnum};

use crate::{
    env::{self, ChildEnv, workspace_root},
    setup,
};

/// Debian packages the runner needs, with a command each provides.
const PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86", "qemu-system-x86_64"),
    ("busybox-static", "busybox"),
    ("cpio", "cpio"),
    ("xz-utils", "xz"),
];

/// Test binaries of `egress-tests` left out by default: `soak` runs for minutes by design and
/// `exhaustion` holds thousands of connections against the agent's descriptor limit; both
/// exercise user space, not the kernel's features, and would only be slow under emulation.
/// `quickstart` runs the README's walk-through, which needs `python3` and `curl` (the guests have
/// neither) and meets the kernel only as `connect.rs` does; `seeds` runs seed 000's `curl`
/// commands as written, and meets the kernel only as `fqdn.rs` and `http.rs` do. The others
/// are all kernel-facing.
pub(crate) const SKIPPED_BY_DEFAULT: &[&str] = &["soak", "exhaustion", "quickstart", "seeds"];

/// The line /init prints first: `EGRESS-VM-KERNEL <uname -r>`.
pub(crate) const KERNEL_MARKER: &str = "EGRESS-VM-KERNEL ";

/// The line the guest prints last: `EGRESS-VM-EXIT <status>` (0 when every test passed).
pub(crate) const EXIT_MARKER: &str = "EGRESS-VM-EXIT";

/// A kernel of the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kernel {
    /// Debian 12's 6.1 long-term kernel (`linux-image-cloud-amd64`).
    #[value(name = "6.1")]
    V6_1,
    /// Debian 12's backported 6.12 long-term kernel (`linux-image-6.12-cloud-amd64`).
    #[value(name = "6.12")]
    V6_12,
    /// Every kernel above, one after the other.
    All,
}

impl Kernel {
    /// The kernels this choice stands for.
    fn expand(self) -> &'static [Kernel] {
        match self {
            Self::V6_1 => &[Self::V6_1],
            Self::V6_12 => &[Self::V6_12],
            Self::All => &[Self::V6_1, Self::V6_12],
        }
    }

    /// The Debian meta-package that depends on the newest image of this series.
    fn meta_package(self) -> &'static str {
        match self {
            Self::V6_1 => "linux-image-cloud-amd64",
            Self::V6_12 | Self::All => "linux-image-6.12-cloud-amd64",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::V6_1 => "6.1",
            Self::V6_12 => "6.12",
            Self::All => "all",
        }
    }
}

/// Options of `cargo xtask integration-test`.
#[derive(Debug, Args)]
pub struct Options {
    #[command(flatten)]
    setup: setup::Options,

    #[command(flatten)]
    matrix: Matrix,
}

/// What to run on which kernels; `cargo xtask test` runs [`Matrix::all`].
#[derive(Debug, Args)]
pub struct Matrix {
    /// The kernel to boot, or `all` for each in turn.
    #[arg(long, value_enum, default_value = "all")]
    pub kernel: Kernel,

    /// Run only this test binary of `egress-tests` (repeatable; a file name in `tests/tests/`
    /// without `.rs`). By default every one but `soak`, `exhaustion` and `quickstart`.
    #[arg(long = "test", value_name = "NAME")]
    pub tests: Vec<String>,

    /// Give up on a kernel's run (and fail) after this many minutes.
    #[arg(long, value_name = "MINUTES", default_value_t = 25)]
    pub timeout_min: u64,

    /// Guest memory in MiB (the initramfs, with every test binary, lives in it).
    #[arg(long, value_name = "MIB", default_value_t = 3072)]
    pub memory_mib: u32,

    /// Arguments for every test binary in the guest (after `--`), such as a test name filter
    /// or `--test-threads=1`.
    #[arg(last = true, value_name = "TEST_ARGS")]
    pub test_args: Vec<String>,
}

/// Runs the selected kernels one after the other; fails if any of them fails.
pub fn run(options: &Options) -> Result<()> {
    env::require_root("the kernel matrix (QEMU, and the tests it runs)")?;
    let child = setup::run(&options.setup)?;
    run_matrix(&child, &options.matrix)
}

/// [`run`] after set-up, for `cargo xtask test`.
pub fn run_matrix(child: &ChildEnv, options: &Matrix) -> Result<()> {
    setup::debian_packages(child, PACKAGES)?;
    let work = workspace_root().join("target").join("vm");
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;

    let kernels = options
        .kernel
        .expand()
        .iter()
        .map(|&kernel| kernel::fetch(child, kernel, &work.join("kernels")))
        .collect::<Result<Vec<_>>>()?;
    let built = initramfs::build_tests(child, &options.tests)?;
    let initramfs = work.join("initramfs.cpio");
    initramfs::build(
        child,
        &built,
        &kernels,
        &options.test_args,
        &work,
        &initramfs,
    )?;

    // The guests run side by side, one vCPU each (a host thread each under TCG): on a 2-CPU
    // machine that halves the step. Their console lines carry the kernel's name.
    let results = std::thread::scope(|scope| {
        let guests: Vec<_> = kernels
            .iter()
            .map(|image| {
                scope.spawn(|| run_guest(image, &initramfs, &work, options, built.tests.len()))
            })
            .collect();
        guests
            .into_iter()
            .map(|guest| guest.join().expect("a guest's thread panicked"))
            .collect::<Result<Vec<_>>>()
    })?;
    let mut failures = Vec::new();
    let mut summary = String::new();
    for (image, (line, failed)) in kernels.iter().zip(results) {
        summary.push_str(&line);
        if failed {
            failures.push(image.kernel.name());
        }
    }
    eprint!("\n{summary}");
    if !failures.is_empty() {
        bail!("the kernel matrix failed on {}", failures.join(", "));
    }
    Ok(())
}

/// Boots one kernel (twice if it dies before `/init` runs) and returns its summary line and
/// whether it failed.
fn run_guest(
    image: &kernel::KernelImage,
    initramfs: &std::path::Path,
    work: &std::path::Path,
    options: &Matrix,
    binaries: usize,
) -> Result<(String, bool)> {
    let started = Instant::now();
    let log = work.join(format!("{}.log", image.kernel.name()));
    let mut outcome = boot::boot(image, initramfs, &log, options)?;
    let mut note = "";
    if outcome.release.is_none() {
        // The guest died before /init printed its first line: a boot failure under
        // emulation, not a test result. Keep that console and boot once more.
        let first = work.join(format!("{}.boot-failure.log", image.kernel.name()));
        fs::rename(&log, &first)?;
        eprintln!(
            "vm: {} died before /init ran (console in {}); booting it once more",
            image.release,
            first.display()
        );
        outcome = boot::boot(image, initramfs, &log, options)?;
        note = " (second boot: the first died before /init ran)";
    }
    let verdict = outcome.verdict(binaries);
    let line = format!(
        "kernel {} ({}): {} passed, {} failed, {} skipped in {} test binaries, {:.0?}{note}: {}\n",
        image.kernel.name(),
        outcome.release.as_deref().unwrap_or(&image.release),
        outcome.tally.passed,
        outcome.tally.failed,
        outcome.tally.ignored,
        outcome.tally.binaries,
        started.elapsed(),
        match &verdict {
            Ok(()) => "ok".to_owned(),
            Err(why) => format!("FAILED: {why} (console: {})", log.display()),
        }
    );
    Ok((line, verdict.is_err()))
}

impl Matrix {
    /// Every kernel, every test binary but [`SKIPPED_BY_DEFAULT`], the default limits.
    pub fn all() -> Self {
        Self {
            kernel: Kernel::All,
            tests: Vec::new(),
            timeout_min: 25,
            memory_mib: 3072,
            test_args: Vec::new(),
        }
    }
}
