//! One kernel's run: QEMU boots it with the initramfs under emulation, its console is kept in
//! a log and read line by line into an [`Outcome`], which says whether the run passed.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result};

use super::{EXIT_MARKER, KERNEL_MARKER, Matrix, kernel::KernelImage};
use crate::{env, tally::Tally};

/// What one kernel's run came to.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Outcome {
    /// The guest's exit status from the marker line; `None` when the marker never came.
    pub(super) status: Option<i32>,
    /// The tests' `test result:` lines, summed.
    pub(super) tally: Tally,
    /// `uname -r` as the guest printed it.
    pub(super) release: Option<String>,
}

impl Outcome {
    /// Adds what one line of the guest's console says.
    pub(super) fn add(&mut self, line: &str) {
        let line = line.trim();
        // Markers are found anywhere in the line: the first one the guest prints shares its
        // line with the firmware's terminal escapes (`ESC c ESC [?7l ESC [2J`).
        if let Some((_, rest)) = line.split_once(EXIT_MARKER) {
            self.status = rest.trim().parse().ok();
        } else if let Some((_, rest)) = line.split_once(KERNEL_MARKER) {
            self.release = Some(rest.trim().to_owned());
        } else {
            self.tally.add(line);
        }
    }

    /// Why this run failed, if it did. `expected` is the number of test binaries run.
    pub(super) fn verdict(&self, expected: usize) -> Result<(), String> {
        let Some(status) = self.status else {
            return Err(format!(
                "no `{EXIT_MARKER}` line: the guest crashed, hung or was killed by the timeout"
            ));
        };
        if self.tally.failed > 0 {
            return Err(format!("{} test(s) failed", self.tally.failed));
        }
        if status != 0 {
            return Err(format!(
                "a test binary exited with a failure (guest status {status})"
            ));
        }
        if self.tally.binaries < expected as u64 {
            return Err(format!(
                "only {} of {expected} test binaries reported a result",
                self.tally.binaries
            ));
        }
        if self.tally.passed == 0 {
            return Err("no test passed".to_owned());
        }
        Ok(())
    }
}

/// Boots `image` with `initramfs` and follows its console until the guest powers off or the
/// timeout kills QEMU.
pub(super) fn boot(
    image: &KernelImage,
    initramfs: &Path,
    log: &Path,
    options: &Matrix,
) -> Result<Outcome> {
    let timeout = Duration::from_secs(options.timeout_min * 60);
    eprintln!(
        "vm: booting {} under QEMU (TCG), at most {} min; console in {}",
        image.release,
        options.timeout_min,
        log.display()
    );
    let mut command = Command::new("timeout");
    command
        .args(["--kill-after=10", &format!("{}", timeout.as_secs())])
        .arg("qemu-system-x86_64")
        // KVM dies in this nested VM ("KVM internal error. Suberror: 1"): emulate. One vCPU:
        // with two, 6.12 sometimes died at boot with "Oops: int3" in code the kernel had just
        // patched (a stale breakpoint of text_poke_bp seen by the other vCPU under TCG); the
        // tests attach programs all the time, which patches static keys the same way.
        .args(["-accel", "tcg", "-cpu", "max", "-smp", "1"])
        .args(["-m", &options.memory_mib.to_string()])
        .args([
            "-nographic",
            "-no-reboot",
            "-serial",
            "stdio",
            "-monitor",
            "none",
        ])
        .args(["-nic", "none"])
        .arg("-kernel")
        .arg(image.vmlinuz())
        .arg("-initrd")
        .arg(initramfs)
        .args([
            "-append",
            "console=ttyS0 panic=-1 quiet loglevel=3 rdinit=/init",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut qemu = command
        .spawn()
        .with_context(|| format!("starting {}", env::describe(&command)))?;
    let mut file = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut outcome = Outcome::default();
    let stdout = qemu.stdout.take().context("QEMU's stdout")?;
    let prefix = format!("[{}] ", image.kernel.name());
    for line in BufReader::new(stdout).split(b'\n') {
        let line = line.context("reading the guest's console")?;
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches('\r');
        writeln!(file, "{text}")?;
        eprintln!("{prefix}{text}");
        outcome.add(text);
    }
    let status = qemu.wait().context("waiting for QEMU")?;
    if status.code() == Some(124) || status.code() == Some(137) {
        eprintln!(
            "vm: {} killed after {} min",
            image.release, options.timeout_min
        );
    } else if !status.success() {
        eprintln!("vm: QEMU exited with {status}");
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_counts_results_and_reads_the_marker() {
        let mut o = Outcome::default();
        for line in [
            "\u{1b}c\u{1b}[?7l\u{1b}[2JEGRESS-VM-KERNEL 6.1.0-57-cloud-amd64\r",
            "test result: ok. 13 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 9.1s",
            "[   12.3] veth: something the kernel said",
            "test result: ok. 4 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 2s",
            "EGRESS-VM-EXIT 0",
        ] {
            o.add(line);
        }
        assert_eq!(o.release.as_deref(), Some("6.1.0-57-cloud-amd64"));
        assert_eq!(
            (
                o.tally.passed,
                o.tally.failed,
                o.tally.ignored,
                o.tally.binaries
            ),
            (17, 0, 1, 2)
        );
        assert_eq!(o.verdict(2), Ok(()));
        assert!(o.verdict(3).unwrap_err().contains("only 2 of 3"));
    }

    #[test]
    fn a_missing_marker_or_a_failure_fails_the_run() {
        let mut o = Outcome::default();
        o.add("test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out");
        assert!(o.verdict(1).unwrap_err().contains("no `EGRESS-VM-EXIT`"));
        o.add("test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out");
        o.add("EGRESS-VM-EXIT 1");
        assert!(o.verdict(2).unwrap_err().contains("1 test(s) failed"));
        let mut panicked = Outcome::default();
        panicked.add("test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out");
        panicked.add("EGRESS-VM-EXIT 1");
        assert!(panicked.verdict(1).unwrap_err().contains("guest status 1"));
        let mut empty = Outcome::default();
        empty.add("test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out");
        empty.add("EGRESS-VM-EXIT 0");
        assert_eq!(empty.verdict(1).unwrap_err(), "no test passed");
    }
}
