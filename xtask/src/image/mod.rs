//! `cargo xtask image`: the agent's container image, as an OCI archive, built without a
//! Docker engine.
//!
//! This project's machines have a docker client but no engine, so the image is built with
//! buildah from Debian's packages, offline, `FROM scratch`:
//!
//! 1. The agent is built static: release, `--target x86_64-unknown-linux-gnu` with
//!    `+crt-static` (the musl target cannot be installed here). With an explicit target the
//!    flag reaches only the target's code, not build scripts nor the kernel programs' build.
//!    [`elf::require_static`] then checks that it names no loader and no library.
//! 2. buildah, with every piece of its state in `target/image/buildah/` (vfs storage driver,
//!    `--root`, `--runroot`, storage.conf, signature policy, TMPDIR), puts two files in an
//!    empty image: the agent at `/usr/local/bin/egress` and the build machine's CA bundle at
//!    `/etc/ssl/certs/ca-certificates.crt`, one of the files rustls-native-certs looks for
//!    the proxy's TLS roots (Debian 12's bundle gives 144). Each buildah command runs in a
//!    private mount namespace with empty tmpfs over `/var/lib/containers` and
//!    `/var/cache/containers`: buildah 1.28 opens its blob-info cache and short-name lock
//!    there whatever `--root` says, and the machine's copies must not be touched.
//! 3. `buildah commit`, then `buildah push` to `oci-archive:PATH:NAME`, NAME being
//!    `docker.io/library/egress:<version>`, what `egress:<version>` stands for (see
//!    [`REPOSITORY`]); the private storage is removed afterwards (and before, if a failed run
//!    left it), so reruns start clean.
//! 4. [`check::archive`] reads the archive back: exactly those files, the binary static,
//!    entrypoint and command, and `egress --version` run from the unpacked root file system
//!    in a chroot.
//!
//! Name resolution in the static binary: glibc 2.34 and later have the `files` and `dns`
//! NSS modules built in, also into static executables, and with no `/etc/nsswitch.conf`
//! look hosts up in `files` then `dns`; so the proxy's `getaddrinfo` reads `/etc/hosts` and
//! `/etc/resolv.conf` (which the kubelet mounts into the container) with no library in the
//! image. deploy/README.md says what does not work (other NSS modules).

mod check;
mod elf;

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, ensure};
use clap::Args;

use crate::{
    env::{self, ChildEnv},
    setup,
};

/// The package and binary in the image.
const PACKAGE: &str = "egress-user";
const BINARY: &str = "egress";
/// The image's name, tagged with the version, in the archive and in buildah's storage. The
/// form a Docker engine gives `-t egress:<version>`, which is also how the kubelet's
/// `image: egress:<version>` reaches containerd's CRI: `ctr -n k8s.io images import` keeps
/// the name as the archive spells it, and the CRI would not find a bare `egress:<version>`.
const REPOSITORY: &str = "docker.io/library/egress";
/// Where the image holds the agent, and its entrypoint.
const BINARY_PATH: &str = "/usr/local/bin/egress";
/// The CA bundle: taken from the build machine, and put at the same path in the image.
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// The image's default arguments.
const CMD: &[&str] = &["--help"];
/// The image's PATH, so that `kubectl exec ... -- egress status` finds the agent by name
/// (BuildKit would give a scratch image a longer default; this is the only directory).
const PATH_ENV: &str = "PATH=/usr/local/bin";
/// Debian packages the image build needs, with a command each provides (`ca-certificates`
/// brings the bundle; `update-ca-certificates` writes it).
const PACKAGES: &[(&str, &str)] = &[
    ("buildah", "buildah"),
    ("ca-certificates", "update-ca-certificates"),
];
/// Run before each buildah command, in its own mount namespace: empty tmpfs over the
/// directories buildah uses whatever `--root` says, then the command.
const PRIVATE_VAR: &str = r#"
for dir in /var/lib/containers /var/cache/containers; do
  mkdir -p "$dir" && mount -t tmpfs -o mode=0700 egress-image "$dir" || exit 1
done
exec "$@"
"#;

/// Options of `cargo xtask image`.
#[derive(Debug, Args)]
pub struct Options {
    #[command(flatten)]
    setup: setup::Options,

    /// Write the OCI archive here (default: target/image/egress-<version>.oci.tar).
    #[arg(long, value_name = "PATH")]
    out: Option<PathBuf>,
}

/// Runs set-up, then builds and checks the image.
pub fn run(options: &Options) -> Result<()> {
    require_root()?;
    let child = setup::run(&options.setup)?;
    build_and_check(&child, options.out.as_deref())
}

/// The test step: the image at its default path, built and checked.
pub fn test_step(child: &ChildEnv) -> Result<()> {
    require_root()?;
    build_and_check(child, None)
}

fn require_root() -> Result<()> {
    ensure!(
        env::is_root()?,
        "building the image must run as root: buildah's storage keeps files owned by root, and \
         the check runs the agent in a chroot; re-run this command as root"
    );
    Ok(())
}

/// Builds the static agent, packs it into an OCI archive at `out` (or the default path),
/// and checks the archive.
pub fn build_and_check(child: &ChildEnv, out: Option<&Path>) -> Result<()> {
    let started = Instant::now();
    setup::debian_packages(child, PACKAGES)?;
    let bundle = ca_bundle()?;
    let package = Package::read(child)?;
    let archive = match out {
        Some(path) => {
            std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))?
        }
        None => package
            .target_dir
            .join("image")
            .join(format!("egress-{}.oci.tar", package.version)),
    };
    // buildah reads `oci-archive:PATH:NAME` up to the first `:` after the path.
    ensure!(
        !archive.to_string_lossy().contains(':'),
        "the archive's path {} contains `:`, which buildah's oci-archive:PATH:NAME cannot \
         carry; pick another --out",
        archive.display()
    );

    let binary = build_static(child)?;
    elf::require_static(&binary)?;
    let printed = env::run_captured(Command::new(&binary).arg("--version"))?;
    ensure!(
        printed.trim() == format!("egress {}", package.version),
        "{} --version printed {printed:?}, but {PACKAGE}'s version is {}",
        binary.display(),
        package.version
    );
    report(&format!(
        "{} is static ({:.1} MB)",
        relative(&binary),
        megabytes(&binary)?
    ));

    let packed = Instant::now();
    let work = package.target_dir.join("image");
    pack(child, &work, &package, &binary, &bundle, &archive)?;
    report(&format!(
        "wrote {} ({:.1} MB) in {:.0?}",
        relative(&archive),
        megabytes(&archive)?,
        packed.elapsed()
    ));

    let expected = check::Expected {
        version: &package.version,
        binary: &binary,
        bundle: &bundle,
    };
    check::archive(child, &archive, &work.join("check"), &expected)?;
    report(&format!(
        "ok: {} in {} (built and checked in {:.0?})",
        image_name(&package.version),
        relative(&archive),
        started.elapsed()
    ));
    Ok(())
}

/// The image's name and tag: `docker.io/library/egress:<version>`.
fn image_name(version: &str) -> String {
    format!("{REPOSITORY}:{version}")
}

/// One line of this command's own output.
fn report(line: &str) {
    eprintln!("image: {line}");
}

/// `path` relative to the workspace root, for messages.
fn relative(path: &Path) -> String {
    path.strip_prefix(env::workspace_root())
        .unwrap_or(path)
        .display()
        .to_string()
}

fn megabytes(path: &Path) -> Result<f64> {
    let bytes = fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    #[expect(
        clippy::cast_precision_loss,
        reason = "a size in MB for people, to one decimal"
    )]
    Ok(bytes as f64 / 1e6)
}

/// The machine's CA bundle, which the image carries; it must hold certificates.
fn ca_bundle() -> Result<PathBuf> {
    let path = Path::new(CA_BUNDLE);
    let resolved = fs::canonicalize(path).with_context(|| {
        format!(
            "{CA_BUNDLE} is missing although ca-certificates is installed; run \
             update-ca-certificates"
        )
    })?;
    let text =
        fs::read_to_string(&resolved).with_context(|| format!("reading {}", resolved.display()))?;
    ensure!(
        text.contains("-----BEGIN CERTIFICATE-----"),
        "{CA_BUNDLE} holds no certificate; run update-ca-certificates"
    );
    Ok(resolved)
}

/// What the image takes from egress-user's manifest, and where cargo builds.
struct Package {
    version: String,
    description: Option<String>,
    license: Option<String>,
    repository: Option<String>,
    target_dir: PathBuf,
}

impl Package {
    /// From `cargo metadata`, which knows the workspace's inheritance and `CARGO_TARGET_DIR`.
    fn read(child: &ChildEnv) -> Result<Self> {
        let text = env::run_captured(child.command("cargo").args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
        ]))?;
        let metadata: serde_json::Value =
            serde_json::from_str(&text).context("reading cargo metadata's output")?;
        let package = metadata["packages"]
            .as_array()
            .and_then(|packages| packages.iter().find(|p| p["name"] == PACKAGE))
            .with_context(|| format!("cargo metadata lists no package {PACKAGE}"))?;
        let text_of = |key: &str| package[key].as_str().map(str::to_owned);
        Ok(Self {
            version: text_of("version").context("egress-user has no version")?,
            description: text_of("description"),
            license: text_of("license"),
            repository: text_of("repository"),
            target_dir: PathBuf::from(
                metadata["target_directory"]
                    .as_str()
                    .context("cargo metadata names no target directory")?,
            ),
        })
    }
}

/// Builds the agent static and returns the binary's path (from cargo's JSON messages).
fn build_static(child: &ChildEnv) -> Result<PathBuf> {
    report(&format!(
        "building {BINARY} static (release, {}, +crt-static; minutes when cold)",
        env::STATIC_TARGET
    ));
    let started = Instant::now();
    let mut command = child.command("cargo");
    command
        .args(["build", "--release", "--locked", "--package", PACKAGE])
        .args(["--bin", BINARY]);
    env::static_target(&mut command)
        .arg("--message-format=json-render-diagnostics")
        // RUSTFLAGS would override the target's flags.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .stderr(Stdio::inherit());
    let output = command.output().context("running cargo build")?;
    ensure!(
        output.status.success(),
        "building the static {BINARY} failed ({})",
        output.status
    );
    let mut found = None;
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if message["reason"] == "compiler-artifact"
            && message["target"]["name"] == BINARY
            && let Some(executable) = message["executable"].as_str()
        {
            found = Some(PathBuf::from(executable));
        }
    }
    let binary = found.with_context(|| format!("cargo reported no {BINARY} executable"))?;
    report(&format!(
        "built {} in {:.0?}",
        relative(&binary),
        started.elapsed()
    ));
    Ok(binary)
}

/// buildah with all its state in one directory, removed when this value is dropped.
struct Buildah<'a> {
    child: &'a ChildEnv,
    dir: PathBuf,
}

impl<'a> Buildah<'a> {
    /// Makes a fresh state directory `dir`, removing what a failed run left there.
    fn new(child: &'a ChildEnv, dir: PathBuf) -> Result<Self> {
        remove_dir(&dir)?;
        for sub in ["root", "run", "tmp"] {
            let path = dir.join(sub);
            fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        }
        let buildah = Self { child, dir };
        // The machine's storage.conf could name another driver's options or extra stores.
        let storage = format!(
            "[storage]\ndriver = \"vfs\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
            buildah.dir.join("root").display(),
            buildah.dir.join("run").display()
        );
        buildah.write("storage.conf", &storage)?;
        // Nothing is pulled; the push to a local archive still reads a policy.
        buildah.write(
            "policy.json",
            "{\"default\": [{\"type\": \"insecureAcceptAnything\"}]}\n",
        )?;
        Ok(buildah)
    }

    fn write(&self, name: &str, contents: &str) -> Result<()> {
        let path = self.dir.join(name);
        fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))
    }

    /// Runs `buildah ARGS` and returns what it printed on stdout, trimmed.
    fn run(&self, args: &[&str]) -> Result<String> {
        let mut command = self.child.command("unshare");
        command
            .args(["--mount", "--propagation", "private", "--"])
            .args(["sh", "-c", PRIVATE_VAR, "sh", "buildah"])
            .env("CONTAINERS_STORAGE_CONF", self.dir.join("storage.conf"))
            .env("TMPDIR", self.dir.join("tmp"))
            .args(["--storage-driver", "vfs", "--root"])
            .arg(self.dir.join("root"))
            .arg("--runroot")
            .arg(self.dir.join("run"))
            .args(args);
        Ok(env::run_captured(&mut command)?.trim().to_owned())
    }

    fn policy(&self) -> String {
        self.dir.join("policy.json").display().to_string()
    }
}

impl Drop for Buildah<'_> {
    fn drop(&mut self) {
        if let Err(error) = remove_dir(&self.dir) {
            report(&format!("warning: {error:#}"));
        }
    }
}

fn remove_dir(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
            Err(error).with_context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// The image from scratch: the binary, the CA bundle, entrypoint, command and labels;
/// committed, then pushed to `archive`.
fn pack(
    child: &ChildEnv,
    work: &Path,
    package: &Package,
    binary: &Path,
    bundle: &Path,
    archive: &Path,
) -> Result<()> {
    let buildah = Buildah::new(child, work.join("buildah"))?;
    let name = image_name(&package.version);
    let container = buildah.run(&["from", "--name", "egress-image", "scratch"])?;
    let path = |p: &Path| p.display().to_string();
    buildah.run(&[
        "copy",
        "--chown",
        "0:0",
        "--chmod",
        "0755",
        &container,
        &path(binary),
        BINARY_PATH,
    ])?;
    buildah.run(&[
        "copy",
        "--chown",
        "0:0",
        "--chmod",
        "0644",
        &container,
        &path(bundle),
        CA_BUNDLE,
    ])?;

    let entrypoint = serde_json::to_string(&[BINARY_PATH])?;
    let cmd = serde_json::to_string(CMD)?;
    let mut config: Vec<String> = [
        "config",
        "--os",
        "linux",
        "--arch",
        "amd64",
        "--entrypoint",
        &entrypoint,
        "--cmd",
        &cmd,
        "--env",
        PATH_ENV,
        "--created-by",
        "cargo xtask image",
    ]
    .map(str::to_owned)
    .to_vec();
    for (key, value) in labels(child, package) {
        config.push("--label".to_owned());
        config.push(format!("org.opencontainers.image.{key}={value}"));
    }
    config.push(container.clone());
    buildah.run(&config.iter().map(String::as_str).collect::<Vec<_>>())?;

    // --identity-label=false: no io.buildah.version label; the image says what it is.
    buildah.run(&[
        "commit",
        "--rm",
        "--quiet",
        "--identity-label=false",
        &container,
        &name,
    ])?;
    if let Some(parent) = archive.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    remove_file(archive)?;
    buildah.run(&[
        "push",
        "--quiet",
        "--signature-policy",
        &buildah.policy(),
        &name,
        &format!("oci-archive:{}:{name}", archive.display()),
    ])?;
    buildah.run(&["rmi", &name])?;
    Ok(())
}

fn remove_file(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
            Err(error).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// The OCI annotations the image carries as labels (`org.opencontainers.image.<key>`).
fn labels(child: &ChildEnv, package: &Package) -> Vec<(&'static str, String)> {
    let mut labels = vec![
        ("title", BINARY.to_owned()),
        ("version", package.version.clone()),
    ];
    let optional = [
        ("description", package.description.clone()),
        ("licenses", package.license.clone()),
        ("source", package.repository.clone()),
        ("revision", revision(child)),
    ];
    labels.extend(
        optional
            .into_iter()
            .filter_map(|(key, value)| Some((key, value?))),
    );
    labels
}

/// The commit the image is built from, `-dirty` when the work tree differs from it; none
/// outside a git checkout.
fn revision(child: &ChildEnv) -> Option<String> {
    let head = env::run_captured(child.command("git").args(["rev-parse", "HEAD"])).ok()?;
    let changes = env::run_captured(child.command("git").args(["status", "--porcelain"])).ok()?;
    let dirty = if changes.trim().is_empty() {
        ""
    } else {
        "-dirty"
    };
    Some(format!("{}{dirty}", head.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_image_name_and_labels_carry_egress_users_version() {
        let child = ChildEnv::with_path_first(&[]).unwrap();
        let package = Package::read(&child).unwrap();
        assert!(
            package.target_dir.is_absolute(),
            "{}",
            package.target_dir.display()
        );
        let labels = labels(&child, &package);
        assert!(labels.contains(&("version", package.version.clone())));
        assert!(labels.contains(&("title", "egress".to_owned())));
        assert!(
            fs::read_to_string(env::workspace_root().join("egress-user/Cargo.toml"))
                .unwrap()
                .contains(&format!("\nversion = \"{}\"\n", package.version))
        );
    }
}
