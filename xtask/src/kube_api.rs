//! The real Kubernetes API parts the `kube-api` test step runs: etcd, the CRD server
//! (`k8s.io/apiextensions-apiserver`, the API server's own CRD machinery, standalone) and
//! kubectl.
//!
//! None of them is in Debian bookworm, and there is no Go module proxy here; Debian's
//! unstable suite has them all, the server as packaged Go sources (see
//! ../shared/KUBERNETES.md). So, without touching the host's apt configuration:
//!
//! 1. a private apt configuration (its own sources list, lists and cache under the cache
//!    directory) reads unstable's index and resolves the server's Go source packages (about
//!    320), Go itself, etcd and kubectl;
//! 2. `apt-get download` fetches them (about 300 MB) and `dpkg-deb -x` unpacks them into a
//!    scratch directory, never installing anything;
//! 3. Go builds the server in GOPATH mode, offline (`GO111MODULE=off GOPROXY=off`), in 5 to 8
//!    minutes on 2 CPUs;
//! 4. the three binaries are kept under `~/.cache/egress/kube-api/<versions>/`, named by the
//!    versions they were made from, and the scratch directory (about 2.5 GB) is removed.
//!
//! A later run uses the kept binaries without contacting the mirror; removing the directory
//! forces a fresh build from whatever unstable has then.

use std::{
    fs,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::env::{self, ChildEnv};

/// The Debian suite the parts come from.
const SUITE: &str = "sid";
/// The package whose Go sources are the CRD server (its dependencies are the rest).
const SERVER_SOURCES: &str = "golang-k8s-apiextensions-apiserver-dev";
/// The Go package the server is known to build with (../shared/KUBERNETES.md); when unstable
/// no longer has it, the Go that its `golang-go` depends on is used instead.
const GO_PACKAGE: &str = "golang-1.26-go";
/// The binaries kept, and the Debian package each comes from (`None`: built here).
const BINARIES: &[(&str, Option<&str>)] = &[
    ("etcd", Some("etcd-server")),
    ("kubectl", Some("kubectl")),
    ("apiextensions-apiserver", None),
];

/// Where the kept binaries are.
#[derive(Debug, Clone)]
pub struct Parts {
    /// etcd 3.5.
    pub etcd: PathBuf,
    /// The CRD server.
    pub server: PathBuf,
    /// kubectl.
    pub kubectl: PathBuf,
    /// What they were made from, one `package version` per line.
    pub versions: String,
}

impl Parts {
    fn in_dir(dir: &Path) -> Result<Self> {
        let versions = fs::read_to_string(dir.join("versions.txt"))
            .with_context(|| format!("reading {}/versions.txt", dir.display()))?;
        let parts = Self {
            etcd: dir.join("etcd"),
            server: dir.join("apiextensions-apiserver"),
            kubectl: dir.join("kubectl"),
            versions,
        };
        for binary in [&parts.etcd, &parts.server, &parts.kubectl] {
            ensure!(binary.is_file(), "{} is missing", binary.display());
        }
        Ok(parts)
    }

    /// The versions of the server's sources, Go, etcd and kubectl, for the log.
    pub fn summary(&self) -> String {
        self.versions
            .lines()
            .filter(|l| {
                let name = l.split(' ').next().unwrap_or("");
                name == SERVER_SOURCES
                    || name.starts_with("golang-1.") && name.ends_with("-go")
                    || BINARIES.iter().any(|(_, p)| *p == Some(name))
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The environment variables the test step passes them in.
    pub fn env(&self) -> [(&'static str, &Path); 3] {
        [
            ("EGRESS_TEST_ETCD", &self.etcd),
            ("EGRESS_TEST_APISERVER", &self.server),
            ("EGRESS_TEST_KUBECTL", &self.kubectl),
        ]
    }
}

fn report(outcome: &str) {
    eprintln!("setup: kubernetes API parts (etcd, CRD server, kubectl): {outcome}");
}

/// The kept parts, building them first when there are none.
pub fn prepare(child: &ChildEnv) -> Result<Parts> {
    let cache = env::home()?.join(".cache/egress/kube-api");
    let current = cache.join("current");
    if let Ok(name) = fs::read_to_string(&current)
        && let Ok(parts) = Parts::in_dir(&cache.join(name.trim()))
    {
        report(&format!(
            "ok (cached in {}: {})",
            cache.join(name.trim()).display(),
            parts.summary()
        ));
        return Ok(parts);
    }
    let started = Instant::now();
    let apt = Apt::new(&cache.join("apt"))?;
    apt.update(child)?;
    let go = apt.go_package(child)?;
    let mut packages = apt.go_sources(child)?;
    packages.push(go.clone());
    let go_src = go.strip_suffix("-go").map(|v| format!("{v}-src"));
    packages.extend(go_src);
    packages.extend(
        BINARIES
            .iter()
            .filter_map(|(_, package)| package.map(str::to_owned)),
    );
    let versions = apt.versions(child, &packages)?;
    // Named by what the binaries are made from: a changed package makes a new directory.
    let key = format!("{:016x}", fnv1a(versions.as_bytes()));
    let dir = cache.join(&key);
    let scratch = cache.join(format!("scratch-{}", std::process::id()));
    let _ = fs::remove_dir_all(&scratch);
    let built = build(child, &apt, &packages, &go, &scratch, &dir, &versions);
    // Removed whatever happened: it is 2.5 GB.
    let _ = fs::remove_dir_all(&scratch);
    built?;
    fs::write(&current, &key).with_context(|| format!("writing {}", current.display()))?;
    let parts = Parts::in_dir(&dir)?;
    report(&format!(
        "built in {:.0?} into {} from {} packages of Debian {SUITE}: {}",
        started.elapsed(),
        dir.display(),
        packages.len(),
        parts.summary()
    ));
    Ok(parts)
}

/// Downloads and unpacks `packages` under `scratch`, builds the server, and keeps the
/// binaries in `dir`.
fn build(
    child: &ChildEnv,
    apt: &Apt,
    packages: &[String],
    go: &str,
    scratch: &Path,
    dir: &Path,
    versions: &str,
) -> Result<()> {
    let debs = scratch.join("debs");
    let root = scratch.join("root");
    fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
    fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let started = Instant::now();
    env::run_captured(
        apt.command(child, "apt-get")
            .arg("download")
            .args(packages)
            .current_dir(&debs),
    )
    .context("downloading the packages")?;
    for deb in fs::read_dir(&debs).with_context(|| format!("listing {}", debs.display()))? {
        let deb = deb?.path();
        env::run_captured(child.command("dpkg-deb").arg("-x").arg(&deb).arg(&root))
            .with_context(|| format!("unpacking {}", deb.display()))?;
    }
    report(&format!(
        "downloaded and unpacked {} packages in {:.0?}; building the CRD server (5-8 minutes)",
        packages.len(),
        started.elapsed()
    ));

    let started = Instant::now();
    let go_version = go
        .strip_prefix("golang-")
        .and_then(|v| v.strip_suffix("-go"))
        .context("unexpected Go package name")?;
    let goroot = root.join(format!("usr/lib/go-{go_version}"));
    let out = scratch.join("apiextensions-apiserver");
    env::run_streaming(
        child
            .command(goroot.join("bin/go"))
            .args(["build", "-trimpath", "-o"])
            .arg(&out)
            .arg("k8s.io/apiextensions-apiserver")
            .env("GOROOT", &goroot)
            .env("GOPATH", root.join("usr/share/gocode"))
            .env("GOCACHE", scratch.join("gocache"))
            .env("GO111MODULE", "off")
            .env("GOPROXY", "off")
            .env("GOTOOLCHAIN", "local")
            .env("GOFLAGS", "")
            .env("CGO_ENABLED", "0"),
    )
    .context("building k8s.io/apiextensions-apiserver")?;
    report(&format!("CRD server built in {:.0?}", started.elapsed()));

    let partial = dir.with_extension("partial");
    let _ = fs::remove_dir_all(&partial);
    fs::create_dir_all(&partial).with_context(|| format!("creating {}", partial.display()))?;
    for (name, package) in BINARIES {
        let from = match package {
            Some(_) => root.join("usr/bin").join(name),
            None => out.clone(),
        };
        fs::copy(&from, partial.join(name))
            .with_context(|| format!("keeping {}", from.display()))?;
    }
    fs::write(partial.join("versions.txt"), versions)?;
    let _ = fs::remove_dir_all(dir);
    fs::rename(&partial, dir).with_context(|| format!("renaming into {}", dir.display()))?;
    Ok(())
}

/// A private apt configuration: its own sources list, lists and archives under `dir`, and no
/// effect on the host's.
struct Apt {
    config: PathBuf,
}

impl Apt {
    fn new(dir: &Path) -> Result<Self> {
        for sub in ["lists/partial", "archives/partial", "cache"] {
            fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        let sources = dir.join("sources.list");
        fs::write(
            &sources,
            format!(
                "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] \
                 http://deb.debian.org/debian {SUITE} main\n"
            ),
        )?;
        let status = dir.join("status");
        if !status.exists() {
            fs::write(&status, "")?;
        }
        let d = dir.display();
        let config = dir.join("apt.conf");
        fs::write(
            &config,
            format!(
                "Dir::Etc::SourceList \"{d}/sources.list\";\n\
                 Dir::Etc::SourceParts \"{d}/no-parts\";\n\
                 Dir::Etc::Preferences \"{d}/no-preferences\";\n\
                 Dir::Etc::PreferencesParts \"{d}/no-parts\";\n\
                 Dir::State::Lists \"{d}/lists\";\n\
                 Dir::State::status \"{d}/status\";\n\
                 Dir::Cache \"{d}/cache\";\n\
                 Dir::Cache::archives \"{d}/archives\";\n\
                 APT::Sandbox::User \"root\";\n\
                 APT::Get::AllowUnauthenticated \"false\";\n"
            ),
        )?;
        Ok(Self { config })
    }

    fn command(&self, child: &ChildEnv, program: &str) -> std::process::Command {
        let mut command = child.command(program);
        command.env("APT_CONFIG", &self.config);
        command
    }

    fn update(&self, child: &ChildEnv) -> Result<()> {
        env::run_captured(self.command(child, "apt-get").args(["update", "-q"]))
            .with_context(|| format!("reading Debian {SUITE}'s package index"))?;
        Ok(())
    }

    /// [`GO_PACKAGE`], or the Go that unstable's `golang-go` depends on.
    fn go_package(&self, child: &ChildEnv) -> Result<String> {
        if self.has(child, GO_PACKAGE) {
            return Ok(GO_PACKAGE.to_owned());
        }
        let depends = env::run_captured(
            self.command(child, "apt-cache")
                .args(["depends", "--recurse", "--no-recommends", "--no-suggests"])
                .arg("golang-go"),
        )?;
        depends
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with("golang-1.") && l.ends_with("-go"))
            .map(str::to_owned)
            .with_context(|| format!("neither {GO_PACKAGE} nor a Go that golang-go depends on"))
    }

    fn has(&self, child: &ChildEnv, package: &str) -> bool {
        env::run_captured(
            self.command(child, "apt-cache")
                .args(["show", "--no-all-versions"])
                .arg(package),
        )
        .is_ok_and(|out| !out.trim().is_empty())
    }

    /// The Go source packages of the server and of everything it imports.
    fn go_sources(&self, child: &ChildEnv) -> Result<Vec<String>> {
        let depends = env::run_captured(
            self.command(child, "apt-cache")
                .args(["depends", "--recurse", "--no-recommends", "--no-suggests"])
                .args([
                    "--no-conflicts",
                    "--no-breaks",
                    "--no-replaces",
                    "--no-enhances",
                ])
                .arg(SERVER_SOURCES),
        )
        .with_context(|| format!("resolving the dependencies of {SERVER_SOURCES}"))?;
        let mut packages: Vec<String> = depends
            .lines()
            .filter(|l| !l.starts_with(' '))
            .filter(|l| l.starts_with("golang-") && l.ends_with("-dev"))
            .map(str::to_owned)
            .collect();
        packages.sort();
        packages.dedup();
        ensure!(
            packages.iter().any(|p| p == SERVER_SOURCES),
            "Debian {SUITE} has no {SERVER_SOURCES}"
        );
        Ok(packages)
    }

    /// `package version` of each, one per line, sorted.
    fn versions(&self, child: &ChildEnv, packages: &[String]) -> Result<String> {
        let out = env::run_captured(
            self.command(child, "apt-cache")
                .args(["show", "--no-all-versions"])
                .args(packages),
        )?;
        let mut lines = Vec::new();
        let mut name = None;
        for line in out.lines() {
            if let Some(n) = line.strip_prefix("Package: ") {
                name = Some(n.trim().to_owned());
            } else if let Some(v) = line.strip_prefix("Version: ")
                && let Some(n) = name.take()
            {
                lines.push(format!("{n} {}", v.trim()));
            }
        }
        lines.sort();
        if lines.len() != packages.len() {
            bail!(
                "apt-cache show gave {} versions for {} packages",
                lines.len(),
                packages.len()
            );
        }
        Ok(lines.join("\n") + "\n")
    }
}

/// FNV-1a, 64 bits: a stable name for a set of versions (std's hasher may change between
/// Rust releases, and the name must not).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
