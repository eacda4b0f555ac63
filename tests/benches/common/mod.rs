//! What every benchmark's report needs: robust statistics over rounds and a description of
//! the machine. Each bench target includes this file with
//! `#[path = "../common/mod.rs"] mod common;`.

// Every bench includes all of this file and uses part of it.
#![allow(dead_code)]

pub mod procfs;

use std::{
    fs,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
};

/// Median, min and max (NaN for none).
pub fn summary(values: impl Iterator<Item = f64>) -> (f64, f64, f64) {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let mid = v.len() / 2;
    let median = if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    };
    (median, v[0], v[v.len() - 1])
}

/// 10000 -> "10,000".
pub fn thousands(n: usize) -> String {
    egress_tests::thousands(n as u64)
}

/// A command's trimmed stdout (for `uname -r` and `date`), or why it did not run.
pub fn command_output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|e| format!("({program}: {e})"))
}

/// A report's line on the machine it ran on: kernel, CPU, CPU count and the date.
pub fn machine_line() -> String {
    format!(
        "- kernel `{}`, CPU {} ({} CPUs), {}\n",
        command_output("uname", &["-r"]),
        cpu_model(),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
    )
}

/// The first `model name` of /proc/cpuinfo.
pub fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")?
                    .split_once(':')
                    .map(|(_, m)| m.trim().to_owned())
            })
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The benchmark's arguments, or the exit code when there is nothing to run: `cargo test
/// --benches` (or `--all-targets`) runs a bench target without `--bench`, which is not an
/// error; a run that is not root is one (`name` goes in the messages).
pub fn bench_args(name: &str) -> Result<Vec<String>, std::process::ExitCode> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        eprintln!("{name}: a benchmark, run it with `cargo xtask bench {name}` (as root)");
        return Err(std::process::ExitCode::SUCCESS);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "bench {name}: must run as root (namespaces, eBPF); use `cargo xtask bench {name}`"
        );
        return Err(std::process::ExitCode::FAILURE);
    }
    Ok(args)
}

/// A benchmark's arguments, read in order: each flag with [`Iterator::next`], its value with
/// [`Flags::value`] or [`Flags::number`]; a missing or malformed value panics naming the flag
/// and the bench's `usage`.
pub struct Flags<'a> {
    args: std::slice::Iter<'a, String>,
    usage: &'a str,
    separators: bool,
}

impl<'a> Flags<'a> {
    pub fn new(args: &'a [String], usage: &'a str) -> Self {
        Self {
            args: args.iter(),
            usage,
            separators: false,
        }
    }

    /// Values may group digits with `_` (`--sizes 1_000,10_000`): it is removed from every
    /// value.
    pub fn with_separators(mut self) -> Self {
        self.separators = true;
        self
    }

    /// The value after `flag`.
    pub fn value(&mut self, flag: &str) -> String {
        let value = self
            .args
            .next()
            .unwrap_or_else(|| panic!("{flag} needs a value; {}", self.usage));
        if self.separators {
            value.replace('_', "")
        } else {
            value.clone()
        }
    }

    /// The directory after `flag` (as given, digit separators or not).
    pub fn dir(&mut self, flag: &str) -> std::path::PathBuf {
        self.args
            .next()
            .unwrap_or_else(|| panic!("{flag} needs a directory; {}", self.usage))
            .into()
    }

    /// `text`, a value of `flag`, as a number.
    pub fn parse<T: std::str::FromStr>(&self, text: &str, flag: &str) -> T
    where
        T::Err: std::fmt::Display,
    {
        text.parse()
            .unwrap_or_else(|e| panic!("{flag} {text}: {e}; {}", self.usage))
    }

    /// The value after `flag`, as a number.
    pub fn number<T: std::str::FromStr>(&mut self, flag: &str) -> T
    where
        T::Err: std::fmt::Display,
    {
        let text = self.value(flag);
        self.parse(&text, flag)
    }
}

impl<'a> Iterator for Flags<'a> {
    type Item = &'a String;

    fn next(&mut self) -> Option<&'a String> {
        self.args.next()
    }
}

/// A benchmark's `main`: [`bench_args`], then `run` on them.
pub fn bench_main(name: &str, run: impl FnOnce(&[String])) -> std::process::ExitCode {
    match bench_args(name) {
        Ok(args) => {
            run(&args);
            std::process::ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// A (median, min, max) summary as a JSON object, for the results file.
pub fn spread((median, min, max): (f64, f64, f64)) -> serde_json::Value {
    serde_json::json!({ "median": median, "min": min, "max": max })
}

/// The machine and the time, for a results file: kernel, CPU model, CPU count, UTC date.
pub fn machine_json() -> serde_json::Value {
    serde_json::json!({
        "kernel": command_output("uname", &["-r"]),
        "cpu": cpu_model(),
        "cpus": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "date": command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
    })
}

/// Prints a benchmark's markdown report and, with `--out DIR`, writes it to `DIR/NAME.md` and
/// its numbers to `DIR/NAME.json` (what `cargo xtask bench` assembles docs/benchmarks.md from).
pub fn publish(
    out: Option<&std::path::Path>,
    name: &str,
    markdown: &str,
    json: &serde_json::Value,
) {
    println!("{markdown}");
    let Some(dir) = out else { return };
    fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    for (file, text) in [
        (format!("{name}.md"), markdown.to_owned()),
        (
            format!("{name}.json"),
            serde_json::to_string_pretty(json).expect("JSON of plain values"),
        ),
    ] {
        let path = dir.join(file);
        fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }
}

/// Set by SIGINT or SIGTERM (after [`catch_interrupts`]): a bench then stops at its next step
/// ([`check_interrupted`]) and, unwinding, stops its agents and removes its sandboxes, rather
/// than die with programs still pinned.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Installs [`on_signal`] for SIGINT and SIGTERM (the processes the bench starts get the
/// default actions back when they exec).
pub fn catch_interrupts() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

/// Panics (and so cleans up) once a SIGINT or SIGTERM came.
pub fn check_interrupted() {
    assert!(
        !INTERRUPTED.load(Ordering::SeqCst),
        "interrupted: stopping the agents and removing the sandboxes"
    );
}

/// Sets this process's nice value (0 leaves it alone); what it starts afterwards inherits it.
pub fn set_nice(nice: i32) {
    if nice == 0 {
        return;
    }
    // SAFETY: setpriority on the calling process (who = 0) has no memory effects.
    let ret = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    assert_eq!(
        ret,
        0,
        "setpriority({nice}): {}",
        std::io::Error::last_os_error()
    );
}
