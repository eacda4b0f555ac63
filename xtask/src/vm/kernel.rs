//! The kernels of the matrix: the newest image of each series from Debian's archive,
//! downloaded once and unpacked under `target/vm/kernels/`, never into `/boot`.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail, ensure};

use super::Kernel;
use crate::env::{self, ChildEnv};

/// A kernel image unpacked from its Debian package.
pub(super) struct KernelImage {
    pub(super) kernel: Kernel,
    /// `uname -r` of this kernel, e.g. `6.1.0-57-cloud-amd64`.
    pub(super) release: String,
    /// The unpacked package's root (with `boot/` and `lib/modules/`).
    pub(super) root: PathBuf,
}

impl KernelImage {
    pub(super) fn vmlinuz(&self) -> PathBuf {
        self.root
            .join("boot")
            .join(format!("vmlinuz-{}", self.release))
    }
}

/// Downloads (once) and unpacks the newest image of `kernel`'s series into `cache`.
pub(super) fn fetch(child: &ChildEnv, kernel: Kernel, cache: &Path) -> Result<KernelImage> {
    let meta = kernel.meta_package();
    let mut refreshed = false;
    loop {
        let package = match image_package(child, meta)? {
            Some(package) => package,
            None if !refreshed => {
                // A fresh machine's package lists may predate the package; refresh once.
                env::run_streaming(child.command("apt-get").args(["update", "-q"]))?;
                refreshed = true;
                continue;
            }
            None => bail!("apt knows no package {meta}, even after apt-get update"),
        };
        let image = KernelImage {
            kernel,
            release: package
                .strip_prefix("linux-image-")
                .with_context(|| format!("{meta} depends on {package}, not a linux-image package"))?
                .to_owned(),
            root: cache.join(&package),
        };
        if image.vmlinuz().is_file() {
            eprintln!("vm: kernel {}: {package} (cached)", kernel.name());
            return Ok(image);
        }
        match download_image(child, &package, cache, &image) {
            Ok(()) => return Ok(image),
            // Stale lists name an image the archive has since dropped: refresh and retry.
            Err(error) if !refreshed => {
                eprintln!("vm: {error:#}; refreshing the package lists and retrying");
                env::run_streaming(child.command("apt-get").args(["update", "-q"]))?;
                refreshed = true;
            }
            Err(error) => return Err(error),
        }
    }
}

/// Downloads `package` and unpacks it at `image.root`.
fn download_image(
    child: &ChildEnv,
    package: &str,
    cache: &Path,
    image: &KernelImage,
) -> Result<()> {
    let download = cache.join("download");
    let _ = fs::remove_dir_all(&download);
    fs::create_dir_all(&download).with_context(|| format!("creating {}", download.display()))?;
    eprintln!("vm: kernel {}: downloading {package}", image.kernel.name());
    env::run_streaming(
        child
            .command("apt-get")
            .current_dir(&download)
            .args(["download", "-q", package]),
    )?;
    let deb = fs::read_dir(&download)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .find(|path| path.extension().is_some_and(|ext| ext == "deb"))
        .with_context(|| format!("apt-get download {package} left no .deb"))?;
    // Unpack beside the final place and rename, so an interrupted run leaves no half tree.
    let partial = cache.join(format!("{package}.partial"));
    let _ = fs::remove_dir_all(&partial);
    env::run_streaming(child.command("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
    fs::rename(&partial, &image.root)
        .with_context(|| format!("renaming {} into place", partial.display()))?;
    fs::remove_dir_all(&download)?;
    ensure!(
        image.vmlinuz().is_file(),
        "{package} has no {}",
        image.vmlinuz().display()
    );
    Ok(())
}

/// The concrete image package `meta` depends on in its candidate version, if apt knows `meta`.
fn image_package(child: &ChildEnv, meta: &str) -> Result<Option<String>> {
    let output = child
        .command("apt-cache")
        .args(["show", "--no-all-versions", meta])
        .output()
        .context("running apt-cache")?;
    if !output.status.success() {
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(depends_on_image(&text))
}

/// The first `linux-image-*` package in the `Depends:` field of an `apt-cache show` record.
fn depends_on_image(record: &str) -> Option<String> {
    let depends = record
        .lines()
        .find_map(|line| line.strip_prefix("Depends:"))?;
    depends
        .split([',', '|'])
        .filter_map(|dep| dep.split_whitespace().next())
        .find(|name| name.starts_with("linux-image-"))
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_image_package_comes_from_the_meta_packages_depends() {
        let record = "Package: linux-image-cloud-amd64\nVersion: 6.1.192-3\n\
                      Depends: linux-image-6.1.0-57-cloud-amd64 (= 6.1.192-3)\nDescription: x\n";
        assert_eq!(
            depends_on_image(record).as_deref(),
            Some("linux-image-6.1.0-57-cloud-amd64")
        );
        assert_eq!(depends_on_image("Package: x\n"), None);
    }
}
