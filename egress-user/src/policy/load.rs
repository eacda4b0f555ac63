//! From files to one [`Policy`]: read each file (bounded), parse its documents, check each,
//! then check what only the whole policy shows (duplicate names, a second EgressConfig).
//!
//! The policy is the union of every document of every file, so splitting a policy over files
//! changes nothing but the file names in messages.

use std::{
    collections::{HashMap, hash_map},
    fs::File,
    io::Read,
    path::PathBuf,
};

use super::{
    DEFAULT_POLICY, DEFAULT_POLICY_NAME,
    model::{Origin, Policy, PolicyErrors, default_bypass},
    report::Report,
    validate::{self, Config, Item},
    yaml,
};

/// The largest policy file read, in bytes. Real policies are kilobytes; the cap keeps a
/// mistaken `egress check /var/log/huge.log` (or `/dev/zero`) from eating the agent's memory.
pub const MAX_FILE_SIZE: u64 = 64 * 1024 * 1024;

/// Reads and checks the policy files `paths`, as one policy.
///
/// A file that cannot be read, or is larger than [`MAX_FILE_SIZE`], is an error like any
/// other (reported on line 1), and the other files are still checked, so one run reports
/// everything.
///
/// # Errors
/// Every problem in every file, sorted by file (in the order given) and line.
pub fn load_files(paths: &[PathBuf]) -> Result<Policy, PolicyErrors> {
    let sources: Vec<(String, Result<Vec<u8>, String>)> = paths
        .iter()
        .map(|path| (path.display().to_string(), read_capped(path)))
        .collect();
    load(
        sources
            .iter()
            .map(|(name, bytes)| (name.as_str(), bytes.as_deref().map_err(String::as_str))),
    )
}

/// Checks policy sources given as `(file name, contents)` pairs, as one policy. The name is
/// only used in messages.
///
/// # Errors
/// Every problem in every source, sorted by source (in the order given) and line.
pub fn load_sources(sources: &[(String, Vec<u8>)]) -> Result<Policy, PolicyErrors> {
    load(
        sources
            .iter()
            .map(|(name, bytes)| (name.as_str(), Ok(bytes.as_slice()))),
    )
}

/// The embedded [`DEFAULT_POLICY`], checked like any file.
///
/// # Panics
/// If the embedded policy is invalid: a bug that the unit tests catch before a release.
#[must_use]
pub fn default_policy() -> Policy {
    load(std::iter::once((
        DEFAULT_POLICY_NAME,
        Ok(DEFAULT_POLICY.as_bytes()),
    )))
    .unwrap_or_else(|errors| panic!("the embedded default policy is invalid:\n{errors}"))
}

/// A file's contents, or why it cannot be had, read without ever holding more than
/// [`MAX_FILE_SIZE`] + 1 bytes: the size in the metadata is checked first, and the read is
/// bounded too, for files whose metadata says nothing (a pipe, `/dev/zero`, a growing file).
fn read_capped(path: &PathBuf) -> Result<Vec<u8>, String> {
    let too_big = |size: Option<u64>| {
        let size = size.map_or_else(|| "more than that".to_owned(), |s| format!("{s} bytes"));
        format!(
            "the file is too large for a policy file (limit {} MiB, file: {size})",
            MAX_FILE_SIZE / (1024 * 1024)
        )
    };
    let file = File::open(path).map_err(|e| format!("cannot read the file: {e}"))?;
    if let Ok(metadata) = file.metadata()
        && metadata.len() > MAX_FILE_SIZE
    {
        return Err(too_big(Some(metadata.len())));
    }
    let mut bytes = Vec::new();
    file.take(MAX_FILE_SIZE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read the file: {e}"))?;
    if bytes.len() as u64 > MAX_FILE_SIZE {
        return Err(too_big(None));
    }
    Ok(bytes)
}

/// Parses one source's bytes into document roots.
fn parse_source(bytes: &[u8], report: &mut Report) -> Vec<yaml::Node> {
    if bytes.len() as u64 > MAX_FILE_SIZE {
        report.error(
            1,
            format!(
                "the source is too large for a policy file (limit {} MiB, source: {} bytes)",
                MAX_FILE_SIZE / (1024 * 1024),
                bytes.len()
            ),
        );
        return Vec::new();
    }
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => {
            let offset = e.valid_up_to();
            let line = bytes[..offset].iter().filter(|&&b| b == b'\n').count() + 1;
            report.error(
                line,
                format!("invalid UTF-8 at byte offset {offset} (policy files must be UTF-8)"),
            );
            return Vec::new();
        }
    };
    yaml::parse(text, report)
}

/// The whole load: per-source checks, then the checks across documents.
fn load<'a>(
    sources: impl Iterator<Item = (&'a str, Result<&'a [u8], &'a str>)>,
) -> Result<Policy, PolicyErrors> {
    let mut reports = Vec::new();
    let mut items = Vec::new();
    for (index, (name, bytes)) in sources.enumerate() {
        let mut report = Report::new(name);
        match bytes {
            Err(message) => report.error(1, message),
            Ok(bytes) => {
                for root in parse_source(bytes, &mut report) {
                    if let Some(item) = validate::document(&root, &mut report) {
                        items.push((index, item));
                    }
                }
            }
        }
        reports.push(report);
    }

    let mut names: HashMap<String, Origin> = HashMap::new();
    let mut config: Option<(Origin, Option<Config>)> = None;
    let mut rules = Vec::new();
    for (index, item) in items {
        let report = &mut reports[index];
        match item {
            Item::Rule { name, rule } => {
                if let Some((name, line)) = name {
                    match names.entry(name) {
                        hash_map::Entry::Occupied(first) => report.field_error(
                            line,
                            "metadata.name",
                            format!(
                                "duplicate name `{}` (the first is at {})",
                                first.key(),
                                first.get()
                            ),
                        ),
                        hash_map::Entry::Vacant(slot) => {
                            slot.insert(report.origin(line));
                        }
                    }
                }
                rules.extend(rule);
            }
            Item::Config { line, config: this } => match &config {
                Some((first, _)) => report.field_error(
                    line,
                    "kind",
                    format!(
                        "a second EgressConfig (the first is at {first}); at most one is allowed"
                    ),
                ),
                None => config = Some((report.origin(line), this)),
            },
        }
    }

    if reports.iter().any(Report::has_errors) {
        return Err(PolicyErrors(
            reports.into_iter().flat_map(Report::into_sorted).collect(),
        ));
    }
    let config = config.and_then(|(_, config)| config).unwrap_or_default();
    Ok(Policy {
        mode: config.mode.unwrap_or_default(),
        bypass: config.bypass.unwrap_or_else(default_bypass),
        rules,
        ..Policy::default()
    })
}
