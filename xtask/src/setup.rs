//! `cargo xtask setup`: install what building and testing egress need, idempotently.
//!
//! The starting point is a Debian host with rustup (stable default plus nightly), cargo and
//! gcc. Each item is checked first and installed only when missing, so a second run takes
//! about a second:
//!
//! - `rust-src` for nightly: the eBPF crate is built with `-Z build-std=core`.
//! - `bpf-linker`, built against the LLVM that ships inside the nightly toolchain, so that
//!   it reads the bitcode nightly's rustc writes. crates.io's default feature (`llvm-23`)
//!   does not match rustc's LLVM 22, hence `--no-default-features --features llvm-22`.
//! - the Debian packages the tests call, `bpftool` and `iproute2` (`ip`, `tc`), and
//!   `protobuf-compiler` (protoc), which the agent's CRI client needs to build.

use std::{
    ffi::OsStr,
    fs, io,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context as _, Result, bail, ensure};
use clap::Args;

use crate::env::{self, ChildEnv};

/// The toolchain that builds the kernel programs (and whose LLVM bpf-linker links against).
const NIGHTLY: &str = "nightly";
/// The bpf-linker release we build, and the cargo feature picking its LLVM major version.
const BPF_LINKER_VERSION: &str = "0.13.0";
const BPF_LINKER_LLVM_FEATURE: &str = "llvm-22";
/// Must equal the LLVM major version of [`NIGHTLY`]: bpf-linker links nightly's own
/// `libLLVM.so`, and its feature selects the matching LLVM C API bindings.
const LLVM_MAJOR: &str = "22";
/// Debian packages the tests need, with a command each provides (checked on non-Debian hosts).
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    ("bpftool", "bpftool"),
    ("iproute2", "ip"),
    // The agent's CRI client (crate k8s-cri) generates its gRPC code with protoc at build time.
    ("protobuf-compiler", "protoc"),
];

/// Options of `cargo xtask setup`; `test` and `run` embed them.
#[derive(Debug, Args)]
#[group(id = "setup-options")]
pub struct Options {
    /// Install bpf-linker into DIR/bin instead of cargo's home (`$CARGO_HOME`, else
    /// `~/.cargo`); DIR/bin then goes first on PATH for the build and tests.
    #[arg(long, value_name = "DIR")]
    pub bpf_linker_root: Option<PathBuf>,
}

/// Checks and installs every item, and returns the environment to run builds and tests in.
pub fn run(options: &Options) -> Result<ChildEnv> {
    let cargo_bin = env::cargo_home()?.join("bin");
    let bpf_linker_root = match &options.bpf_linker_root {
        Some(root) => {
            std::path::absolute(root).with_context(|| format!("resolving {}", root.display()))?
        }
        None => env::cargo_home()?,
    };
    let child = ChildEnv::with_path_first(&[bpf_linker_root.join("bin"), cargo_bin])?;

    let nightly = Nightly::probe(&child)?;
    rust_src(&child, &nightly)?;
    let llvm_prefix = llvm_prefix(&nightly)?;
    bpf_linker(
        &child,
        &llvm_prefix,
        &bpf_linker_root,
        options.bpf_linker_root.is_some(),
    )?;
    debian_packages(&child, DEBIAN_PACKAGES)?;
    Ok(child)
}

/// Prints the one line each item gets.
fn report(item: &str, outcome: &str) {
    eprintln!("setup: {item}: {outcome}");
}

/// What set-up needs to know about the nightly toolchain.
struct Nightly {
    sysroot: PathBuf,
}

impl Nightly {
    fn probe(child: &ChildEnv) -> Result<Self> {
        let hint = "the nightly toolchain is needed to build the eBPF programs; install it with \
                    `rustup toolchain install nightly`";
        let version =
            env::run_captured(child.command("rustc").args([&format!("+{NIGHTLY}"), "-vV"]))
                .context(hint)?;
        let llvm = version
            .lines()
            .find_map(|line| line.strip_prefix("LLVM version: "))
            .context("`rustc +nightly -vV` printed no LLVM version")?
            .trim();
        ensure!(
            llvm.split('.').next() == Some(LLVM_MAJOR),
            "nightly rustc uses LLVM {llvm}, but bpf-linker is built here with feature \
             {BPF_LINKER_LLVM_FEATURE} (LLVM {LLVM_MAJOR}); use a nightly with LLVM {LLVM_MAJOR} \
             or update the bpf-linker constants in xtask/src/setup.rs"
        );
        let sysroot = env::run_captured(child.command("rustc").args([
            &format!("+{NIGHTLY}"),
            "--print",
            "sysroot",
        ]))
        .context(hint)?;
        Ok(Self {
            sysroot: PathBuf::from(sysroot.trim()),
        })
    }
}

/// `rust-src` for nightly, which `-Z build-std=core` compiles for `bpfel-unknown-none`.
fn rust_src(child: &ChildEnv, nightly: &Nightly) -> Result<()> {
    let item = "rust-src (nightly)";
    if nightly
        .sysroot
        .join("lib/rustlib/src/rust/library")
        .is_dir()
    {
        report(item, "ok (present)");
        return Ok(());
    }
    let started = Instant::now();
    env::run_streaming(child.command("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        NIGHTLY,
    ]))?;
    report(
        item,
        &format!("installed with rustup in {:.0?}", started.elapsed()),
    );
    Ok(())
}

/// A directory laid out as bpf-linker's build expects `LLVM_PREFIX` to be: `lib/libLLVM.so`
/// and `lib/libLLVM.so.<version>`, both symlinks to the `libLLVM.so.<version>` file in
/// nightly's sysroot.
///
/// It lives under `~/.cache/egress/llvm` and must stay: the linker's RUNPATH points at its
/// `lib/`. Re-linking here after a nightly update keeps the linker loadable as long as the
/// library's file name is unchanged; when it changes the linker no longer starts, and
/// [`bpf_linker`] rebuilds it.
fn llvm_prefix(nightly: &Nightly) -> Result<PathBuf> {
    let item = "LLVM prefix for bpf-linker";
    let sysroot_lib = nightly.sysroot.join("lib");
    let mut libraries = Vec::new();
    for entry in
        fs::read_dir(&sysroot_lib).with_context(|| format!("listing {}", sysroot_lib.display()))?
    {
        let name = entry?.file_name();
        if name.to_string_lossy().starts_with("libLLVM.so.") {
            libraries.push(name);
        }
    }
    let [library] = libraries.as_slice() else {
        bail!(
            "expected one libLLVM.so.* file in {}, found {libraries:?}",
            sysroot_lib.display()
        );
    };
    let target = sysroot_lib.join(library);

    let prefix = env::home()?.join(".cache/egress/llvm");
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    let mut changed = false;
    for name in [OsStr::new("libLLVM.so"), library.as_os_str()] {
        changed |= ensure_symlink(&lib.join(name), &target)?;
    }
    if changed {
        report(
            item,
            &format!(
                "linked {}/libLLVM.so* -> {}",
                lib.display(),
                target.display()
            ),
        );
    } else {
        report(item, "ok (present)");
    }
    Ok(prefix)
}

/// Makes `link` a symlink to `target`; returns whether anything changed.
///
/// Replaces an existing link atomically (a new link renamed over it), because an installed
/// bpf-linker may be loading the library through it at this moment.
fn ensure_symlink(link: &Path, target: &Path) -> Result<bool> {
    if fs::read_link(link).is_ok_and(|current| current == target) {
        return Ok(false);
    }
    let file_name = link.file_name().context("symlink path has no file name")?;
    let temporary = link.with_file_name(format!(
        ".{}.tmp-{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    match fs::remove_file(&temporary) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => {
            return Err(error).with_context(|| format!("removing {}", temporary.display()));
        }
        _ => {}
    }
    symlink(target, &temporary)
        .with_context(|| format!("creating symlink {}", temporary.display()))?;
    fs::rename(&temporary, link).with_context(|| format!("replacing {}", link.display()))?;
    Ok(true)
}

/// bpf-linker, built with cargo against nightly's LLVM through `llvm_prefix`.
///
/// With an explicit `root` only `root/bin/bpf-linker` counts; otherwise whichever
/// `bpf-linker` comes first on the prepared PATH, since that is the one builds will use.
fn bpf_linker(
    child: &ChildEnv,
    llvm_prefix: &Path,
    root: &Path,
    explicit_root: bool,
) -> Result<()> {
    let item = format!("bpf-linker {BPF_LINKER_VERSION}");
    let installed = root.join("bin/bpf-linker");
    let probe: &Path = if explicit_root {
        &installed
    } else {
        Path::new("bpf-linker")
    };
    let why = match bpf_linker_version(child, probe) {
        Ok(version) if version == BPF_LINKER_VERSION => {
            report(&item, "ok (present)");
            return Ok(());
        }
        Ok(version) => format!("found {version}"),
        Err(error) => format!("{error:#}"),
    };
    report(
        &item,
        &format!("building into {} (about a minute): {why}", root.display()),
    );

    let started = Instant::now();
    // `--force`: we only get here when the installed one is missing, another version, or no
    // longer starts (e.g. nightly's libLLVM was renamed); cargo would otherwise refuse to
    // reinstall the same version.
    env::run_streaming(
        child
            .command("cargo")
            .arg(format!("+{NIGHTLY}"))
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--locked", "--force", "--quiet", "--no-default-features"])
            .args(["--features", BPF_LINKER_LLVM_FEATURE])
            .arg("--root")
            .arg(root)
            .env("LLVM_PREFIX", llvm_prefix),
    )?;
    env::check_installed(&installed, BPF_LINKER_VERSION, |l| {
        bpf_linker_version(child, l)
    })?;
    report(
        &item,
        &format!(
            "installed in {:.0?} ({})",
            started.elapsed(),
            installed.display()
        ),
    );
    Ok(())
}

/// The version `bpf-linker --version` prints (`bpf-linker 0.13.0`).
fn bpf_linker_version(child: &ChildEnv, program: &Path) -> Result<String> {
    let output = env::run_captured(child.command(program).arg("--version"))?;
    output
        .split_whitespace()
        .nth(1)
        .map(str::to_owned)
        .with_context(|| format!("unexpected `bpf-linker --version` output: {output:?}"))
}

/// Installs the missing ones of `packages` (a Debian package and a command it provides, which
/// is all that is checked on a host without dpkg); `apt-get` runs only when one is missing.
/// Set-up passes [`DEBIAN_PACKAGES`]; `bench` and `integration-test` pass their own.
pub fn debian_packages(child: &ChildEnv, packages: &[(&str, &str)]) -> Result<()> {
    let mut missing = Vec::new();
    for &(package, command) in packages {
        match deb_installed(child, package) {
            Ok(true) => report(package, "ok (present)"),
            Ok(false) => missing.push(package),
            // No dpkg: not Debian. Accept the tool if it is there; we cannot install it.
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                ensure!(
                    on_path(child, command),
                    "`{command}` (Debian package {package}) is missing and this host has no \
                     dpkg; install it with the system's package manager"
                );
                report(
                    package,
                    &format!("ok (`{command}` present; not a Debian host)"),
                );
            }
            Err(error) => return Err(error).context("running dpkg-query"),
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing.join(" ");
    if !env::is_root()? {
        bail!(
            "Debian packages missing: {list}; installing them needs root: run \
             `apt-get install {list}` as root, or run this command as root"
        );
    }

    let started = Instant::now();
    env::run_streaming(child.command("apt-get").args(["update", "-q"]))?;
    env::run_streaming(
        child
            .command("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing),
    )?;
    for package in missing {
        ensure!(
            deb_installed(child, package).context("running dpkg-query")?,
            "apt-get succeeded but {package} is still not installed"
        );
        report(
            package,
            &format!("installed with apt-get in {:.0?}", started.elapsed()),
        );
    }
    Ok(())
}

/// Whether dpkg reports `package` as installed; `Err(NotFound)` when there is no dpkg.
fn deb_installed(child: &ChildEnv, package: &str) -> io::Result<bool> {
    let output = child
        .command("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()?;
    // dpkg-query exits 1 for a package it has never heard of.
    Ok(output.status.success() && output.stdout == b"install ok installed")
}

/// Whether `command` is an executable file on the prepared PATH or in the sbin directories,
/// which a non-root user's PATH often lacks.
fn on_path(child: &ChildEnv, command: &str) -> bool {
    use std::os::unix::fs::PermissionsExt as _;

    child
        .path_dirs()
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(command))
        .any(|file| {
            file.metadata()
                .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        })
}

/// The Debian packages of real pods, for the pods test step and the HTTP benchmark's pod
/// contender (and a command each provides): the container
/// runtime, its CNI plugins, buildah for the images and busybox for what runs in them
/// (set-up installs protoc, which the CRI client's generated code needs).
pub const POD_PACKAGES: &[(&str, &str)] = &[
    ("containerd", "containerd"),
    ("runc", "runc"),
    ("containernetworking-plugins", "/usr/lib/cni/ptp"),
    ("buildah", "buildah"),
    ("busybox-static", "busybox"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ensure_symlink_creates_then_keeps_then_replaces() {
        let tmp = tempfile::Builder::new()
            .prefix("xtask-symlink-")
            .tempdir()
            .unwrap();
        let dir = tmp.path();
        let link = dir.join("libLLVM.so");
        let (first, second) = (dir.join("a"), dir.join("b"));

        assert!(ensure_symlink(&link, &first).unwrap());
        assert!(!ensure_symlink(&link, &first).unwrap());
        assert!(ensure_symlink(&link, &second).unwrap());
        assert_eq!(fs::read_link(&link).unwrap(), second);
        assert_eq!(
            fs::read_dir(dir).unwrap().count(),
            1,
            "no temporary link left behind"
        );
    }
}
