//! Reads an image archive back and checks that it is what it says: one image, named
//! `docker.io/library/egress:<version>`, every blob matching its digest, the entrypoint,
//! command and PATH, exactly the agent and the CA bundle (owned by root, with their modes),
//! the agent static and the very binary that was built, and `egress --version` and the
//! default `--help` working from the unpacked root file system, run in a chroot in a private
//! mount and network namespace.

use std::{
    collections::BTreeMap,
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;

use super::{BINARY_PATH, CA_BUNDLE, CMD, PATH_ENV, elf, image_name, relative, report};
use crate::env::{self, ChildEnv};

/// What the archive must hold.
pub struct Expected<'a> {
    /// egress-user's version: the image's tag, label and `egress --version`.
    pub version: &'a str,
    /// The agent that was built.
    pub binary: &'a Path,
    /// The CA bundle that was copied in.
    pub bundle: &'a Path,
}

/// One entry of the image's root file system: its kind and mode, and its owner.
#[derive(Debug, PartialEq, Eq)]
struct Entry {
    kind: &'static str,
    mode: u32,
    owner: (u32, u32),
}

/// Checks `archive`, unpacking it under `work` (removed afterwards unless a check fails).
pub fn archive(child: &ChildEnv, archive: &Path, work: &Path, expected: &Expected) -> Result<()> {
    if work.exists() {
        fs::remove_dir_all(work).with_context(|| format!("removing {}", work.display()))?;
    }
    let layout = work.join("oci");
    let rootfs = work.join("rootfs");
    for dir in [&layout, &rootfs] {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    untar(child, archive, &layout)?;
    let oci = Layout { dir: layout };

    let oci_layout = oci.json(&oci.dir.join("oci-layout"))?;
    ensure!(
        oci_layout["imageLayoutVersion"] == "1.0.0",
        "oci-layout: {oci_layout}"
    );
    let index = oci.json(&oci.dir.join("index.json"))?;
    let [manifest] = index["manifests"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    else {
        bail!("index.json must list exactly one image: {index}");
    };
    let name = image_name(expected.version);
    ensure!(
        manifest["annotations"]["org.opencontainers.image.ref.name"] == name.as_str(),
        "the archive's image is not named {name}: {manifest}"
    );
    let manifest = oci.blob_json(child, manifest)?;
    let config = oci.blob_json(child, &manifest["config"])?;
    check_config(&config, expected.version)?;

    let layers = manifest["layers"].as_array().cloned().unwrap_or_default();
    ensure!(!layers.is_empty(), "the image has no layer: {manifest}");
    for layer in &layers {
        let media_type = layer["mediaType"].as_str().unwrap_or_default();
        ensure!(
            media_type.starts_with("application/vnd.oci.image.layer.v1.tar"),
            "unexpected layer type {media_type}"
        );
        untar(child, &oci.blob(child, layer)?, &rootfs)?;
    }

    let found = walk(&rootfs)?;
    let wanted = wanted_entries();
    if found != wanted {
        bail!(
            "the image's files differ from what it should hold\n  found:  {found:?}\n  wanted: \
             {wanted:?}"
        );
    }
    for (inside, outside) in [(BINARY_PATH, expected.binary), (CA_BUNDLE, expected.bundle)] {
        let unpacked = under(&rootfs, inside);
        ensure!(
            same_contents(&unpacked, outside)?,
            "{inside} in the image differs from {}",
            outside.display()
        );
    }
    elf::require_static(&under(&rootfs, BINARY_PATH))?;

    let version = in_chroot(child, &rootfs, &["--version"])?;
    ensure!(
        version.trim() == format!("egress {}", expected.version),
        "`egress --version` in the image printed {version:?}"
    );
    let help = in_chroot(child, &rootfs, CMD)?;
    ensure!(
        help.contains("Usage: egress"),
        "the image's default command ({}) printed no usage: {help:?}",
        CMD.join(" ")
    );
    report(&format!(
        "checked {}: one image {name}, digests match, exactly {} and {} (static, as built), \
         entrypoint, cmd and PATH; in a chroot `--help` works and `--version` prints `{}`",
        relative(archive),
        BINARY_PATH,
        CA_BUNDLE,
        version.trim()
    ));
    fs::remove_dir_all(work).with_context(|| format!("removing {}", work.display()))
}

/// The image's root file system: the two files, their directories, all root's.
fn wanted_entries() -> BTreeMap<String, Entry> {
    let entry = |kind, mode| Entry {
        kind,
        mode,
        owner: (0, 0),
    };
    let mut wanted = BTreeMap::new();
    for file in [BINARY_PATH, CA_BUNDLE] {
        let mut dir = Path::new(file).parent();
        while let Some(path) = dir.filter(|d| *d != Path::new("/")) {
            wanted.insert(path.display().to_string(), entry("dir", 0o755));
            dir = path.parent();
        }
    }
    wanted.insert(BINARY_PATH.to_owned(), entry("file", 0o755));
    wanted.insert(CA_BUNDLE.to_owned(), entry("file", 0o644));
    wanted
}

/// Every entry under `root`, by its absolute path inside it.
fn walk(root: &Path) -> Result<BTreeMap<String, Entry>> {
    let mut found = BTreeMap::new();
    let mut pending = vec![root.to_owned()];
    while let Some(dir) = pending.pop() {
        for item in fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
            let path = item?.path();
            let meta = fs::symlink_metadata(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let kind = if meta.is_dir() {
                pending.push(path.clone());
                "dir"
            } else if meta.is_file() {
                "file"
            } else if meta.is_symlink() {
                "symlink"
            } else {
                "special"
            };
            let inside = Path::new("/").join(path.strip_prefix(root)?);
            found.insert(
                inside.display().to_string(),
                Entry {
                    kind,
                    mode: meta.mode() & 0o7777,
                    owner: (meta.uid(), meta.gid()),
                },
            );
        }
    }
    Ok(found)
}

/// The image configuration: platform, entrypoint, command and version label.
fn check_config(config: &Value, version: &str) -> Result<()> {
    ensure!(
        config["os"] == "linux" && config["architecture"] == "amd64",
        "the image is not linux/amd64: {config}"
    );
    let run = &config["config"];
    ensure!(
        run["Entrypoint"] == serde_json::json!([BINARY_PATH]),
        "entrypoint {} instead of [{BINARY_PATH:?}]",
        run["Entrypoint"]
    );
    ensure!(
        run["Cmd"] == serde_json::json!(CMD),
        "cmd {} instead of {CMD:?}",
        run["Cmd"]
    );
    ensure!(
        run["Env"] == serde_json::json!([PATH_ENV]),
        "env {} instead of [{PATH_ENV:?}]",
        run["Env"]
    );
    ensure!(
        run["Labels"]["org.opencontainers.image.version"] == version,
        "label org.opencontainers.image.version is {} instead of {version}",
        run["Labels"]["org.opencontainers.image.version"]
    );
    Ok(())
}

/// An unpacked OCI image layout.
struct Layout {
    dir: PathBuf,
}

impl Layout {
    fn json(&self, path: &Path) -> Result<Value> {
        let text =
            fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// The file of a descriptor's blob, after checking its size and sha256 digest.
    fn blob(&self, child: &ChildEnv, descriptor: &Value) -> Result<PathBuf> {
        let digest = descriptor["digest"].as_str().unwrap_or_default();
        let hex = digest
            .strip_prefix("sha256:")
            .filter(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
            .with_context(|| format!("descriptor without a sha256 digest: {descriptor}"))?;
        let path = self.dir.join("blobs/sha256").join(hex);
        let size = fs::metadata(&path)
            .with_context(|| format!("blob {digest} is missing from the archive"))?
            .len();
        ensure!(
            Some(size) == descriptor["size"].as_u64(),
            "blob {digest} has {size} bytes, its descriptor says {}",
            descriptor["size"]
        );
        let sum = env::run_captured(child.command("sha256sum").arg(&path))?;
        ensure!(
            sum.split_whitespace().next() == Some(hex),
            "blob {digest} does not match its digest (sha256sum: {sum})"
        );
        Ok(path)
    }

    fn blob_json(&self, child: &ChildEnv, descriptor: &Value) -> Result<Value> {
        self.json(&self.blob(child, descriptor)?)
    }
}

/// Unpacks the tar file `archive` (gzip'd or not) into `into`, owners and modes as recorded.
fn untar(child: &ChildEnv, archive: &Path, into: &Path) -> Result<()> {
    env::run_captured(
        child
            .command("tar")
            .args([
                "--extract",
                "--numeric-owner",
                "--same-permissions",
                "--file",
            ])
            .arg(archive)
            .arg("--directory")
            .arg(into),
    )
    .map(drop)
}

/// `path` (absolute inside the image) under `root`.
fn under(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

fn same_contents(a: &Path, b: &Path) -> Result<bool> {
    let read = |p: &Path| fs::read(p).with_context(|| format!("reading {}", p.display()));
    Ok(read(a)? == read(b)?)
}

/// Runs the image's agent with `args` as a container would: chrooted into the unpacked root
/// file system, in a private mount namespace and an empty network namespace; returns stdout.
fn in_chroot(child: &ChildEnv, rootfs: &Path, args: &[&str]) -> Result<String> {
    env::run_captured(
        child
            .command("unshare")
            .args(["--mount", "--net", "--propagation", "private", "--"])
            .arg("chroot")
            .arg(rootfs)
            .arg(BINARY_PATH)
            .args(args),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_image_holds_two_files_and_their_directories() {
        let wanted = wanted_entries();
        let paths: Vec<&str> = wanted.keys().map(String::as_str).collect();
        assert_eq!(
            paths,
            [
                "/etc",
                "/etc/ssl",
                "/etc/ssl/certs",
                "/etc/ssl/certs/ca-certificates.crt",
                "/usr",
                "/usr/local",
                "/usr/local/bin",
                "/usr/local/bin/egress",
            ]
        );
        assert_eq!(wanted["/usr/local/bin/egress"].mode, 0o755);
        assert_eq!(wanted["/etc/ssl/certs/ca-certificates.crt"].mode, 0o644);
    }

    #[test]
    fn the_config_must_name_the_entrypoint_cmd_and_version() {
        let good = serde_json::json!({
            "os": "linux",
            "architecture": "amd64",
            "config": {
                "Entrypoint": ["/usr/local/bin/egress"],
                "Cmd": ["--help"],
                "Env": ["PATH=/usr/local/bin"],
                "Labels": {"org.opencontainers.image.version": "1.2.3"}
            }
        });
        check_config(&good, "1.2.3").unwrap();
        assert!(check_config(&good, "1.2.4").is_err());
        let mut shell_form = good.clone();
        shell_form["config"]["Entrypoint"] =
            serde_json::json!(["/bin/sh", "-c", "/usr/local/bin/egress"]);
        assert!(check_config(&shell_form, "1.2.3").is_err());
        let mut arm = good;
        arm["architecture"] = "arm64".into();
        assert!(check_config(&arm, "1.2.3").is_err());
    }
}
