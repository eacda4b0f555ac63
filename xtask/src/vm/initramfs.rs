//! The guest's root file system: the tests built as static executables, the binaries they run,
//! the host tools they call with their libraries, each kernel's modules, busybox as `/init`'s
//! shell, all in one uncompressed cpio archive.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    fs,
    os::unix::fs::{PermissionsExt as _, symlink},
    path::{Path, PathBuf},
    process::Stdio,
    time::Instant,
};

use anyhow::{Context as _, Result, bail, ensure};

use super::{EXIT_MARKER, SKIPPED_BY_DEFAULT, kernel::KernelImage};
use crate::env::{self, ChildEnv};

/// Host tools the tests call, copied into the guest with their libraries.
const GUEST_TOOLS: &[&str] = &["ip", "nsenter", "unshare", "bpftool", "mount", "umount"];

/// Kernel modules the tests need that Debian's cloud kernels build as modules (`veth`: the
/// sandboxes' links and the XDP tests' pod veths). Loaded in this order.
const MODULES: &[&str] = &["kernel/drivers/net/veth.ko"];

/// A test binary to run in the guest.
pub(super) struct TestBinary {
    pub(super) name: String,
    pub(super) path: PathBuf,
}

/// Everything the tests were built into.
pub(super) struct Built {
    pub(super) tests: Vec<TestBinary>,
    /// The executables the tests run by path (`CARGO_BIN_EXE_*`).
    pub(super) binaries: Vec<PathBuf>,
}

/// Builds `egress-tests` statically and returns its test binaries (all but
/// [`SKIPPED_BY_DEFAULT`], or those `only` names) and the executables they run.
pub(super) fn build_tests(child: &ChildEnv, only: &[String]) -> Result<Built> {
    eprintln!(
        "vm: building the tests as static executables ({}, +crt-static)",
        env::STATIC_TARGET
    );
    let mut command = child.command("cargo");
    command.args(["test", "-p", "egress-tests", "--no-run", "--release"]);
    env::static_target(&mut command)
        .args(["--message-format", "json-render-diagnostics"])
        .stderr(Stdio::inherit());
    let output = command.output().context("running cargo test --no-run")?;
    ensure!(
        output.status.success(),
        "building the static test binaries failed ({})",
        output.status
    );
    let mut tests = Vec::new();
    let mut binaries = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if message["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(executable) = message["executable"].as_str() else {
            continue;
        };
        let kinds = &message["target"]["kind"];
        let is = |kind: &str| {
            kinds
                .as_array()
                .is_some_and(|k| k.iter().any(|v| v == kind))
        };
        let test_profile = message["profile"]["test"] == true;
        let name = message["target"]["name"].as_str().unwrap_or_default();
        if is("test") {
            tests.push(TestBinary {
                name: name.to_owned(),
                path: PathBuf::from(executable),
            });
        } else if is("bin") && !test_profile {
            binaries.push(PathBuf::from(executable));
        }
    }
    let known: BTreeSet<&str> = tests.iter().map(|t| t.name.as_str()).collect();
    if let Some(unknown) = only.iter().find(|name| !known.contains(name.as_str())) {
        bail!(
            "--test {unknown}: egress-tests has no such test binary (it has: {})",
            known.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
    tests.retain(|test| {
        if only.is_empty() {
            !SKIPPED_BY_DEFAULT.contains(&test.name.as_str())
        } else {
            only.contains(&test.name)
        }
    });
    tests.sort_by(|a, b| a.name.cmp(&b.name));
    ensure!(
        !tests.is_empty(),
        "cargo built no test binary for egress-tests"
    );
    Ok(Built { tests, binaries })
}

/// Writes the guest's root file system as a cpio archive (newc, uncompressed: the kernel
/// unpacks it faster than it would decompress it).
pub(super) fn build(
    child: &ChildEnv,
    built: &Built,
    kernels: &[KernelImage],
    test_args: &[String],
    work: &Path,
    out: &Path,
) -> Result<()> {
    let started = Instant::now();
    let root = work.join("root");
    if root.exists() {
        fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    }
    for dir in [
        "bin", "dev", "etc", "proc", "sys", "tmp", "run", "root", "var",
    ] {
        fs::create_dir_all(root.join(dir))?;
    }
    symlink("../run", root.join("var/run"))?;

    let busybox = which(child, "busybox")?;
    copy_file(&busybox, &root.join("bin/busybox"))?;

    // The tests and their binaries, at the paths compiled into the tests, without debug
    // info (a tenth of the size; the guest's RAM holds them).
    for path in built.tests.iter().map(|t| &t.path).chain(&built.binaries) {
        let dest = under(&root, path);
        fs::create_dir_all(dest.parent().expect("absolute path has a parent"))?;
        env::run_streaming(
            child
                .command("objcopy")
                .arg("--strip-debug")
                .arg(path)
                .arg(&dest),
        )?;
    }

    // Host tools and the shared libraries they load, at the same paths.
    let mut libraries = BTreeSet::new();
    for tool in GUEST_TOOLS {
        let path = which(child, tool)?;
        copy_file(&path, &under(&root, &path))?;
        libraries.extend(shared_libraries(child, &path)?);
    }
    for library in &libraries {
        copy_file(library, &under(&root, library))?;
    }

    // Each kernel's modules, under its release (xz-compressed ones unpacked: busybox's
    // insmod does not read them).
    for image in kernels {
        let dir = root.join("lib/modules").join(&image.release);
        fs::create_dir_all(&dir)?;
        for module in MODULES {
            let base = image
                .root
                .join("lib/modules")
                .join(&image.release)
                .join(module);
            let file_name = Path::new(module)
                .file_name()
                .expect("module has a file name");
            let dest = dir.join(file_name);
            let xz = base.with_extension("ko.xz");
            if base.is_file() {
                copy_file(&base, &dest)?;
            } else if xz.is_file() {
                let output = child
                    .command("xz")
                    .arg("-dc")
                    .arg(&xz)
                    .output()
                    .context("running xz")?;
                ensure!(output.status.success(), "xz -dc {} failed", xz.display());
                fs::write(&dest, output.stdout)?;
            } else {
                bail!("kernel {} has no module {module}", image.release);
            }
        }
    }

    fs::write(
        root.join("etc/hosts"),
        "127.0.0.1 localhost\n::1 localhost\n",
    )?;
    fs::write(root.join("etc/nsswitch.conf"), "hosts: files dns\n")?;
    fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    fs::write(root.join("etc/group"), "root:x:0:\n")?;
    let ca = Path::new("/etc/ssl/certs/ca-certificates.crt");
    if ca.is_file() {
        copy_file(ca, &under(&root, ca))?;
    }

    let init = root.join("init");
    fs::write(&init, init_script(built, test_args))?;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755))?;

    let status = child
        .command("sh")
        .arg("-c")
        .arg("cd \"$1\" && find . -print0 | cpio --null -o -H newc --quiet > \"$2\"")
        .arg("sh")
        .arg(&root)
        .arg(out)
        .status()
        .context("running cpio")?;
    ensure!(status.success(), "writing the initramfs with cpio failed");
    let size = fs::metadata(out)?.len();
    fs::remove_dir_all(&root)?;
    eprintln!(
        "vm: initramfs {} ({} MiB, {} test binaries) in {:.1?}",
        out.display(),
        size >> 20,
        built.tests.len(),
        started.elapsed()
    );
    Ok(())
}

/// The guest's `/init`: mounts what the tests need, runs each test binary, prints the exit
/// marker, powers off.
fn init_script(built: &Built, test_args: &[String]) -> String {
    let args: Vec<String> = test_args.iter().map(|a| shell_quote(a)).collect();
    let mut script = String::from(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# The root is the unpacked initramfs, in RAM and writable: /tmp and /run stay on it, since
# the tests live at their host paths, which may be under /tmp (a CI clone).
mkdir -p /sys/fs/cgroup /sys/fs/bpf /dev/pts /dev/shm
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
ip link set lo up
release=$(uname -r)
for m in /lib/modules/$release/*.ko; do insmod "$m" || echo "insmod $m failed"; done
echo
echo "EGRESS-VM-KERNEL $release"
status=0
"#,
    );
    for test in &built.tests {
        let dir = test
            .path
            .parent()
            .and_then(Path::parent)
            .map_or_else(|| "/".to_owned(), |d| d.display().to_string());
        let _ = writeln!(
            script,
            "echo \"EGRESS-VM-TEST {name}\"\n(cd {dir} && RUST_BACKTRACE=1 {path} {args}) || status=1",
            name = test.name,
            dir = shell_quote(&dir),
            path = shell_quote(&test.path.display().to_string()),
            args = args.join(" "),
        );
    }
    let _ = writeln!(script, "echo \"{EXIT_MARKER} $status\"\nsync\npoweroff -f");
    script
}

/// `path` re-rooted under `root`.
fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// Copies `from` (following symbolic links) to `to`, creating its directory.
fn copy_file(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to.parent().expect("destination has a parent"))?;
    fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}

/// Where `program` is on the prepared PATH or in the sbin directories.
fn which(child: &ChildEnv, program: &str) -> Result<PathBuf> {
    child
        .path_dirs()
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
        .with_context(|| format!("`{program}` is not installed"))
}

/// The shared libraries `program` loads (and its ELF interpreter), from `ldd`.
fn shared_libraries(child: &ChildEnv, program: &Path) -> Result<Vec<PathBuf>> {
    let output = child
        .command("ldd")
        .arg(program)
        .output()
        .context("running ldd")?;
    // ldd exits 1 for a static executable ("not a dynamic executable"): nothing to copy.
    Ok(parse_ldd(&String::from_utf8_lossy(&output.stdout)))
}

/// The absolute paths in `ldd` output: `name => /path (addr)` and `/path (addr)` lines.
fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.trim(),
                None => line,
            };
            path.split_whitespace()
                .next()
                .filter(|p| p.starts_with('/'))
                .map(PathBuf::from)
        })
        .collect()
}

/// `word` quoted for the guest's shell.
fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_library_paths() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibelf.so.1 => /lib/x86_64-linux-gnu/libelf.so.1 (0x00007f1)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f2)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f3)\n";
        assert_eq!(
            parse_ldd(text),
            [
                "/lib/x86_64-linux-gnu/libelf.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
    }

    #[test]
    fn shell_quoting_survives_quotes() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
