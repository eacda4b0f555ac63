//! Room on disk for a build: checked before a cold `cargo xtask test`, so that a full disk is
//! a clear message at the start and not the linker dying with `Bus error` half an hour in.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};

use crate::env::{self, ChildEnv};

/// What a cold `cargo xtask test` needs free for its target directory: its peak there was
/// 9.8 GiB (`du` every minute through a cold run from a fresh clone, 2026-12-07; 8.1 GiB of it
/// `target/debug`), with a margin for what grows beside it.
pub const COLD_TEST_BYTES: u64 = 12 * GIB;

const GIB: u64 = 1 << 30;

/// Cargo's target directory for this workspace (`CARGO_TARGET_DIR`, config and all), as
/// `cargo metadata` reports it.
pub fn target_dir(child: &ChildEnv) -> Result<PathBuf> {
    let mut command = child.command("cargo");
    command.args(["metadata", "--no-deps", "--format-version", "1"]);
    let json = env::run_captured(&mut command)?;
    let metadata: serde_json::Value =
        serde_json::from_str(&json).context("parsing `cargo metadata`'s output")?;
    metadata["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .context("`cargo metadata` printed no target_directory")
}

/// Bytes free to an unprivileged writer on the file system that holds `path` (or, when `path`
/// does not exist yet, its nearest existing ancestor), from `df -Pk`.
pub fn free_bytes(child: &ChildEnv, path: &Path) -> Result<u64> {
    let existing = path
        .ancestors()
        .find(|dir| dir.exists())
        .context("no ancestor of the target directory exists")?;
    let mut command = child.command("df");
    command.arg("-Pk").arg(existing);
    let output = env::run_captured(&mut command)?;
    let kib = parse_df_available_kib(&output)
        .with_context(|| format!("reading the free space from `df -Pk`: {output:?}"))?;
    Ok(kib.saturating_mul(1024))
}

/// The "Available" column (1024-byte blocks) of `df -P`'s one data line.
///
/// POSIX fixes the columns: file system, total, used, available, capacity, mount point. The
/// file system's name may hold spaces, so the columns are counted from the right: available
/// is the third from the end, before the capacity ("12%") and the mount point (which may hold
/// spaces too, so the capacity is found as the last field ending in `%`).
fn parse_df_available_kib(output: &str) -> Result<u64> {
    let line = output
        .lines()
        .skip(1)
        .find(|line| !line.trim().is_empty())
        .context("no data line")?;
    let fields: Vec<&str> = line.split_whitespace().collect();
    let capacity = fields
        .iter()
        .rposition(|field| field.ends_with('%'))
        .context("no capacity column (a field ending in %)")?;
    let available = capacity
        .checked_sub(1)
        .and_then(|i| fields.get(i))
        .context("no available column before the capacity")?;
    available
        .parse()
        .with_context(|| format!("available column {available:?} is not a number"))
}

/// Fails when a cold build (no `debug` directory in `target` yet) would not fit in the free
/// space; a warm one only gets a warning, since it writes far less.
pub fn check_room(target: &Path, free: u64, cold_need: u64) -> Result<()> {
    if free >= cold_need {
        return Ok(());
    }
    let where_ = target.display();
    let (free_gib, need_gib) = (gib(free), gib(cold_need));
    if target.join("debug").is_dir() {
        eprintln!(
            "test: warning: {free_gib:.1} GiB free for {where_}; a cold run needs about \
             {need_gib:.0} GiB, a warm one less. If linking fails with `Bus error`, the disk \
             is full"
        );
        return Ok(());
    }
    bail!(
        "only {free_gib:.1} GiB free for {where_}, and a cold `cargo xtask test` writes about \
         {need_gib:.0} GiB there (the linker dies with `Bus error` when the disk fills); free \
         some space or point CARGO_TARGET_DIR at a larger disk"
    )
}

#[expect(
    clippy::cast_precision_loss,
    reason = "a GiB figure with one decimal for a message"
)]
fn gib(bytes: u64) -> f64 {
    bytes as f64 / GIB as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_available_from_posix_df() {
        let out = "Filesystem     1024-blocks     Used Available Capacity Mounted on\n\
                   /dev/vda         263174212 13000000 82477320      14% /\n";
        assert_eq!(parse_df_available_kib(out).unwrap(), 82_477_320);
    }

    #[test]
    fn counts_columns_from_the_capacity_when_names_hold_spaces() {
        let out = "Filesystem 1024-blocks Used Available Capacity Mounted on\n\
                   my disk 1000 400 600 40% /mnt/a dir\n";
        assert_eq!(parse_df_available_kib(out).unwrap(), 600);
    }

    #[test]
    fn rejects_output_without_a_data_line_or_number() {
        let header = "Filesystem 1024-blocks Used Available Capacity Mounted on\n";
        assert!(parse_df_available_kib(header).is_err());
        let garbled = format!("{header}/dev/vda 10 5 lots 50% /\n");
        let err = parse_df_available_kib(&garbled).unwrap_err();
        assert!(format!("{err:#}").contains("\"lots\""), "{err:#}");
    }

    #[test]
    fn a_cold_target_without_room_fails_and_a_warm_one_warns() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        // Enough room: fine either way.
        check_room(&target, 20 * GIB, 12 * GIB).unwrap();
        // Cold (no target/debug), short of room: a clear error naming the sizes.
        let err = check_room(&target, 5 * GIB, 12 * GIB).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("5.0 GiB free") && msg.contains("about 12 GiB"),
            "{msg}"
        );
        // Warm: a warning only.
        std::fs::create_dir_all(target.join("debug")).unwrap();
        check_room(&target, 5 * GIB, 12 * GIB).unwrap();
    }
}
