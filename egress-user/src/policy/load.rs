//! From files to one [`Policy`]: read each file (bounded), parse its documents, check each,
//! then check what only the whole policy shows (duplicate names, a second EgressConfig, two
//! http rules giving one host's port different protocols).
//!
//! The policy is the union of every document of every file, so splitting a policy over files
//! changes nothing but the file names in messages.

use std::{
    collections::hash_map,
    path::{Path, PathBuf},
    sync::Arc,
};

use foldhash::HashMap;

use super::{
    DEFAULT_POLICY, DEFAULT_POLICY_NAME,
    ca::read_ca_file,
    cache,
    model::{
        Dns, DnsSource, HostPattern, HttpProtocol, HttpRule, Origin, Policy, PolicyErrors,
        default_bypass,
    },
    read::read_bounded,
    report::Report,
    validate::{Config, EgressRule, Item, ServiceKey},
    yaml,
};

/// The largest policy file read, in bytes. Real policies are kilobytes; the cap keeps a
/// mistaken `egress check /var/log/huge.log` (or `/dev/zero`) from eating the agent's memory.
pub const MAX_FILE_SIZE: u64 = 64 * 1024 * 1024;

/// Reads and checks the policy files `paths`, as one policy.
///
/// A file that cannot be read, or is larger than [`MAX_FILE_SIZE`], is an error like any
/// other (reported on line 1), and the other files are still checked, so one run reports
/// everything. A relative `caFiles` path is taken relative to the directory of the file that
/// names it, and made absolute.
///
/// # Errors
/// Every problem in every file, sorted by file (in the order given) and line.
pub fn load_files(paths: &[PathBuf]) -> Result<Policy, PolicyErrors> {
    let sources: Vec<PolicySource> = paths.iter().cloned().map(PolicySource::File).collect();
    load_mixed(&sources)
}

/// Checks policy sources given as `(file name, contents)` pairs, as one policy. The name is
/// only used in messages; `caFiles` paths are kept as written.
///
/// # Errors
/// Every problem in every source, sorted by source (in the order given) and line.
pub fn load_sources(sources: &[(String, Vec<u8>)]) -> Result<Policy, PolicyErrors> {
    load(sources.iter().map(|(name, bytes)| Source {
        name,
        directory: None,
        bytes: Ok(bytes.as_slice()),
    }))
}

/// One input of [`load_mixed`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicySource {
    /// A file, read here (as [`load_files`] does).
    File(PathBuf),
    /// Text already in hand, with the name messages use (as [`load_sources`] takes it).
    Text {
        /// The name.
        name: String,
        /// The contents.
        bytes: Vec<u8>,
    },
}

/// Checks files and texts together, as one policy, in the order given: the agent's policy is
/// its files (or the embedded default) plus the rules made with `egress create`, and a rule
/// about to be created is checked against all of them.
///
/// # Errors
/// Every problem in every source, sorted by source (in the order given) and line.
pub fn load_mixed(sources: &[PolicySource]) -> Result<Policy, PolicyErrors> {
    load_read(&read_sources(sources.iter().cloned()))
}

/// A [`PolicySource`] read: what [`load_read`] checks. The agent reads its sources once per
/// reload, hashes what it read to tell whether anything changed, and checks those same bytes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ReadSource {
    /// The name messages use: the file's path, or the text's name.
    name: String,
    /// The directory relative `caFiles` paths are resolved against, for a file.
    directory: Option<PathBuf>,
    /// The contents, or why the file cannot be read.
    bytes: Result<Vec<u8>, String>,
}

/// Reads every file of `sources` once (bounded, never blocking, see [`read_bounded`]); a file
/// that cannot be read keeps its error, which [`load_read`] reports on its line 1. A text's
/// bytes are moved, not copied (the agent's 10,000 API objects are about 5 MB of text).
#[must_use]
pub fn read_sources(sources: impl IntoIterator<Item = PolicySource>) -> Vec<ReadSource> {
    sources
        .into_iter()
        .map(|source| match source {
            PolicySource::File(path) => ReadSource {
                name: path.display().to_string(),
                directory: Some(path.parent().unwrap_or_else(|| Path::new("")).to_owned()),
                bytes: read_capped(&path),
            },
            PolicySource::Text { name, bytes } => ReadSource {
                name,
                directory: None,
                bytes: Ok(bytes),
            },
        })
        .collect()
}

/// [`load_read`] of the agent's whole policy: afterwards the document cache keeps only these
/// sources' documents, so that the sources that are gone (a removed file, a deleted or edited
/// Kubernetes object) do not keep theirs.
///
/// # Errors
/// Every problem in every source, sorted by source (in the order given) and line.
pub fn load_read_whole(read: &[ReadSource]) -> Result<Policy, PolicyErrors> {
    let result = load_read(read);
    let names: foldhash::HashSet<&str> = read.iter().map(|source| source.name.as_str()).collect();
    cache::retain(|name| names.contains(name));
    result
}

/// Checks sources already read (see [`read_sources`]) as one policy, as [`load_mixed`] does.
///
/// # Errors
/// Every problem in every source, sorted by source (in the order given) and line.
pub fn load_read(read: &[ReadSource]) -> Result<Policy, PolicyErrors> {
    load(read.iter().map(|source| Source {
        name: &source.name,
        directory: source.directory.as_deref(),
        bytes: source.bytes.as_deref().map_err(String::as_str),
    }))
}

/// The embedded [`DEFAULT_POLICY`], checked like any file.
///
/// # Panics
/// If the embedded policy is invalid: a bug that the unit tests catch before a release.
#[must_use]
pub fn default_policy() -> Policy {
    load(std::iter::once(Source {
        name: DEFAULT_POLICY_NAME,
        directory: None,
        bytes: Ok(DEFAULT_POLICY.as_bytes()),
    }))
    .unwrap_or_else(|errors| panic!("the embedded default policy is invalid:\n{errors}"))
}

/// A policy file's contents, or why it cannot be had: never blocking on a FIFO or device,
/// never more than [`MAX_FILE_SIZE`] (see [`read_bounded`]).
fn read_capped(path: &Path) -> Result<Vec<u8>, String> {
    read_bounded(path, MAX_FILE_SIZE).map_err(|e| format!("cannot read the policy file: {e}"))
}

/// Parses one source's bytes into document roots.
pub(super) fn parse_source(bytes: &[u8], report: &mut Report) -> Vec<yaml::Node> {
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

/// One policy source as [`load`] takes it.
struct Source<'a> {
    /// The name messages use.
    name: &'a str,
    /// The directory relative `caFiles` paths are resolved against, when the source is a file.
    directory: Option<&'a Path>,
    /// The contents, or why there are none.
    bytes: Result<&'a [u8], &'a str>,
}

/// The whole load: per-source checks, then the checks across documents.
fn load<'a>(sources: impl Iterator<Item = Source<'a>>) -> Result<Policy, PolicyErrors> {
    let mut reports: Vec<Report> = Vec::new();
    let mut directories = Vec::new();
    let mut across = Across::default();
    let mut config: Option<(Origin, Option<(usize, Config)>)> = None;
    let mut policy = Policy::default();
    for (index, source) in sources.enumerate() {
        let mut report = Report::new(source.name);
        let items = match source.bytes {
            Err(message) => {
                report.error(1, message);
                Vec::new()
            }
            Ok(bytes) => cache::items(source.name, bytes, &mut report),
        };
        reports.push(report);
        directories.push(source.directory);
        // Taken into the policy source by source, in order: the checks across documents see
        // them as one list.
        for item in items {
            match item {
                Item::Rule { name, rule } => {
                    if let Some((name, line)) = name {
                        across.rule_name(&mut reports, index, name, line);
                    }
                    match rule {
                        Some(EgressRule::Kernel(rule)) => policy.rules.push(rule),
                        Some(EgressRule::Name(rule)) => policy.name_rules.push(*rule),
                        Some(EgressRule::Http { rule, port_lines }) => {
                            across.http_ports(&mut reports[index], &rule, &port_lines);
                            policy.http_rules.push(*rule);
                        }
                        None => {}
                    }
                }
                Item::Service { key, alias } => {
                    if let Some(key) = key {
                        across.service(&mut reports[index], *key);
                    }
                    policy.aliases.extend(alias.map(|alias| *alias));
                }
                Item::Config { line, config: this } => {
                    let report = &mut reports[index];
                    match &config {
                        Some((first, _)) => report.field_error(
                            line,
                            "kind",
                            format!(
                                "a second EgressConfig (the first is at {first}); at most one is \
                                 allowed"
                            ),
                        ),
                        None => config = Some((report.origin(line), this.map(|c| (index, *c)))),
                    }
                }
            }
        }
    }

    // The CA files are read here, where the directory of a relative path is known, and before
    // the verdict, so their errors come out with all the others.
    let ca_files = match &config {
        Some((_, Some((index, config)))) => check_ca_files(
            &mut reports[*index],
            directories[*index],
            config.ca_files.clone().unwrap_or_default(),
        ),
        _ => Vec::new(),
    };
    if reports.iter().any(Report::has_errors) {
        return Err(PolicyErrors(
            reports.into_iter().flat_map(Report::into_sorted).collect(),
        ));
    }
    let mut config_line = None;
    if let Some((origin, Some((index, config)))) = config {
        config_line = Some((index, origin.line));
        policy.mode = config.mode.unwrap_or_default();
        policy.events = config.events.unwrap_or_default();
        policy.bypass = config.bypass.unwrap_or_else(default_bypass);
        policy.proxy = config.proxy.unwrap_or_default();
        policy.ca_files = ca_files;
        policy.hosts = config.hosts.unwrap_or_default();
        policy.allow_sockets = config.allow_sockets.unwrap_or_default();
        if let Some((resolvers, line)) = config.dns {
            policy.dns = Dns {
                resolvers,
                source: DnsSource::Config(reports[index].origin(line)),
            };
        }
    }
    if policy.rules.is_empty()
        && policy.http_rules.is_empty()
        && policy.name_rules.is_empty()
        && policy.aliases.is_empty()
    {
        // Legitimate (deny everything) but more often an empty or wrong file: said, not refused.
        let (index, line) = config_line.unwrap_or((0, 1));
        if let Some(report) = reports.get_mut(index) {
            report.warning(
                line,
                "the policy allows no destination (no EgressRule or Service in any file): every \
                 connection outside the bypass ranges and DNS will be denied",
            );
        }
    }
    policy.warnings = reports.iter_mut().flat_map(Report::take_warnings).collect();
    Ok(policy)
}

/// Resolves (see [`resolve`]) and reads every `caFiles` entry, reporting at its line each one
/// that is not a regular file of bounded size holding PEM certificates; returns the resolved
/// paths.
fn check_ca_files(
    report: &mut Report,
    directory: Option<&Path>,
    ca_files: Vec<(PathBuf, usize)>,
) -> Vec<PathBuf> {
    let mut resolved = Vec::with_capacity(ca_files.len());
    for (i, (written, line)) in ca_files.into_iter().enumerate() {
        let path = format!("spec.caFiles[{i}]");
        if directory.is_none() && written.is_relative() {
            report.field_error(
                line,
                &path,
                format!(
                    "`{}` is relative, and this policy is not a file it could be relative to; \
                     give an absolute path",
                    written.display()
                ),
            );
            continue;
        }
        let full = resolve(directory, written.clone());
        if let Err(e) = read_ca_file(&full) {
            let shown = if full == written {
                format!("`{}`", full.display())
            } else {
                format!("`{}` ({})", written.display(), full.display())
            };
            report.field_error(line, &path, format!("CA file {shown}: {e}"));
        }
        resolved.push(full);
    }
    resolved
}

/// `path` from a `caFiles` list: a relative one is relative to `directory` (the policy file's,
/// when known), made absolute so a later change of working directory does not change it.
fn resolve(directory: Option<&Path>, path: PathBuf) -> PathBuf {
    match directory {
        Some(directory) if path.is_relative() => {
            let joined = directory.join(path);
            std::path::absolute(&joined).unwrap_or(joined)
        }
        _ => path,
    }
}

/// What only the whole policy shows: names used twice, and proxy routes that contradict each
/// other.
#[derive(Default)]
struct Across {
    /// EgressRule names: unique among EgressRules; with the index of the source and the line
    /// of the first (an [`Origin`] is made only for a duplicate's message).
    rule_names: HashMap<Arc<str>, (usize, usize)>,
    /// Services by (namespace, name): unique, as in Kubernetes.
    services: HashMap<(String, String), Origin>,
    /// Services by name alone: the short host name (`httpbin`) of two Services in different
    /// namespaces would be the same, and the proxy cannot know the client's namespace.
    short_names: HashMap<String, (String, Origin)>,
    /// The protocol of each (host, port) of the http rules, with the rule's name and where.
    http_ports: HashMap<(HostPattern, u16), (HttpProtocol, String, Origin)>,
}

impl Across {
    /// Records the name of an EgressRule of source `index` at `line`, reporting a duplicate.
    fn rule_name(&mut self, reports: &mut [Report], index: usize, name: Arc<str>, line: usize) {
        match self.rule_names.entry(name) {
            hash_map::Entry::Occupied(first) => {
                let (first_index, first_line) = *first.get();
                let message = format!(
                    "duplicate name `{}` (the first is at {})",
                    first.key(),
                    reports[first_index].origin(first_line)
                );
                reports[index].field_error(line, "metadata.name", message);
            }
            hash_map::Entry::Vacant(slot) => {
                slot.insert((index, line));
            }
        }
    }

    /// Records a Service, reporting a duplicate in its namespace or a short name taken in
    /// another namespace.
    fn service(&mut self, report: &mut Report, key: ServiceKey) {
        let ServiceKey {
            name,
            namespace,
            line,
            ..
        } = key;
        let origin = report.origin(line);
        match self.services.entry((namespace.clone(), name.clone())) {
            hash_map::Entry::Occupied(first) => {
                report.field_error(
                    line,
                    "metadata.name",
                    format!(
                        "duplicate Service `{name}` in namespace `{namespace}` (the first is at \
                         {})",
                        first.get()
                    ),
                );
                return;
            }
            hash_map::Entry::Vacant(slot) => {
                slot.insert(origin.clone());
            }
        }
        match self.short_names.entry(name) {
            hash_map::Entry::Occupied(first) => {
                let (first_namespace, first_origin) = first.get();
                report.field_error(
                    line,
                    "metadata.name",
                    format!(
                        "Service `{}` in namespace `{namespace}` would answer to the host name \
                         `{}`, which the Service in namespace `{first_namespace}` (at \
                         {first_origin}) already does; the proxy cannot tell a client's \
                         namespace, so give one of them another name",
                        first.key(),
                        first.key()
                    ),
                );
            }
            hash_map::Entry::Vacant(slot) => {
                slot.insert((namespace, origin));
            }
        }
    }

    /// Records an http rule's ports, reporting a (host, port) that another rule gives the
    /// other protocol: the proxy could not know whether to originate TLS.
    fn http_ports(&mut self, report: &mut Report, rule: &HttpRule, port_lines: &[usize]) {
        for (i, (port, line)) in rule.ports.iter().zip(port_lines).enumerate() {
            let key = (rule.host.clone(), port.port);
            match self.http_ports.entry(key) {
                hash_map::Entry::Occupied(first) => {
                    let (protocol, name, origin) = first.get();
                    if *protocol != port.protocol {
                        report.field_error(
                            *line,
                            &format!("spec.ports[{i}]"),
                            format!(
                                "{} port {} is {} here but {protocol} in rule `{name}` (at \
                                 {origin}); a host's port has one protocol",
                                rule.host, port.port, port.protocol
                            ),
                        );
                    }
                }
                hash_map::Entry::Vacant(slot) => {
                    slot.insert((port.protocol, rule.name.clone(), report.origin(*line)));
                }
            }
        }
    }
}
