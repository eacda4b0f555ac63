//! What every subcommand needs from the host: the workspace root, whether we are root, and
//! a [`ChildEnv`] that starts child processes with the PATH that set-up prepared.

use std::{
    env,
    ffi::{OsStr, OsString},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};

/// The workspace root, one level above this crate's manifest.
///
/// Derived at compile time so that `cargo xtask` works from any sub-directory.
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask's manifest directory has a parent")
}

/// The user's home directory, from `$HOME`.
pub fn home() -> Result<PathBuf> {
    env::var_os("HOME")
        .filter(|home| !home.is_empty())
        .map(PathBuf::from)
        .context("$HOME is not set")
}

/// Cargo's home (`$CARGO_HOME`, else `~/.cargo`), where rustup puts its proxies.
pub fn cargo_home() -> Result<PathBuf> {
    match env::var_os("CARGO_HOME").filter(|dir| !dir.is_empty()) {
        Some(dir) => Ok(PathBuf::from(dir)),
        None => Ok(home()?.join(".cargo")),
    }
}

/// Whether this process runs with effective user id 0.
///
/// Read from `/proc/self/status` (`Uid: real effective saved fs`), which spares a libc
/// dependency for one number.
pub fn is_root() -> Result<bool> {
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .context("no effective uid in /proc/self/status")?;
    Ok(effective == "0")
}

/// Fails with a message naming `what` unless this process runs as root.
pub fn require_root(what: &str) -> Result<()> {
    if !is_root()? {
        bail!(
            "{what} must run as root (loading and attaching eBPF programs needs it); re-run \
             this command as root"
        );
    }
    Ok(())
}

/// The environment for child processes: the inherited one, with `dirs` put first on PATH.
///
/// A fresh shell may not have sourced `~/.cargo/env`, and `cargo run` puts nothing on PATH;
/// without this, `cargo +nightly` and `bpf-linker` would not be found.
#[derive(Debug, Clone)]
pub struct ChildEnv {
    path: OsString,
}

impl ChildEnv {
    /// Puts `dirs` first on PATH, in order, without repeating entries already there.
    pub fn with_path_first(dirs: &[PathBuf]) -> Result<Self> {
        let inherited = env::var_os("PATH").unwrap_or_default();
        let mut entries: Vec<PathBuf> = Vec::new();
        for dir in dirs.iter().cloned().chain(env::split_paths(&inherited)) {
            if !entries.contains(&dir) {
                entries.push(dir);
            }
        }
        let path = env::join_paths(entries).context("building PATH for child processes")?;
        Ok(Self { path })
    }

    /// The directories on the prepared PATH, in order.
    pub fn path_dirs(&self) -> impl Iterator<Item = PathBuf> {
        env::split_paths(&self.path)
    }

    /// A command for `program` (looked up on the prepared PATH), run in the workspace root.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new(program);
        command
            .env("PATH", &self.path)
            .current_dir(workspace_root());
        command
    }
}

/// Runs `command` with inherited stdio and fails unless it exits successfully.
pub fn run_streaming(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("starting {}", describe(command)))?;
    if !status.success() {
        bail!("{} failed ({status})", describe(command));
    }
    Ok(())
}

/// Runs `command`, captures its output, and returns stdout if it exits successfully.
pub fn run_captured(command: &mut Command) -> Result<String> {
    let output = command
        .output()
        .with_context(|| format!("starting {}", describe(command)))?;
    if !output.status.success() {
        bail!(
            "{} failed ({}): {}",
            describe(command),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    String::from_utf8(output.stdout)
        .with_context(|| format!("{} printed non-UTF-8", describe(command)))
}

/// Checks that the tool just installed at `installed` runs and that `version` (which runs it)
/// reads `wanted` from it.
pub fn check_installed(
    installed: &Path,
    wanted: &str,
    version: impl FnOnce(&Path) -> Result<String>,
) -> Result<()> {
    let got = version(installed)
        .with_context(|| format!("the freshly installed {} does not run", installed.display()))?;
    ensure!(
        got == wanted,
        "{} reports version {got} after installing {wanted}",
        installed.display()
    );
    Ok(())
}

/// `program arg1 arg2 ...`, for error messages.
pub fn describe(command: &Command) -> String {
    let mut words = vec![command.get_program().to_string_lossy().into_owned()];
    words.extend(
        command
            .get_args()
            .map(|arg| arg.to_string_lossy().into_owned()),
    );
    format!("`{}`", words.join(" "))
}

/// The target of the static builds (the kernel guests' test binaries, the image's agent, the
/// instruction counts CI checks): the host's, in a directory of its own under `target/` (so
/// the host's own build is not rebuilt), with glibc linked in.
pub const STATIC_TARGET: &str = "x86_64-unknown-linux-gnu";

/// Makes `command` (a `cargo build`, `test` or `bench`, before any `--`) build for
/// [`STATIC_TARGET`] with `+crt-static`: only the target's code; build scripts, proc macros
/// and the kernel programs' nested build (aya-build sets its own flags) keep theirs. Every
/// static build sets the same flags, so they share their dependencies' artifacts.
pub fn static_target(command: &mut Command) -> &mut Command {
    command.args(["--target", STATIC_TARGET]).env(
        "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
        "-C target-feature=+crt-static",
    )
}
