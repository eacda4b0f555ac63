//! The agent's state directory: rules made with `egress create`, kept across restarts.
//!
//! Created documents live in one multi-document YAML file, `created.yaml`, which the agent
//! loads as one more policy file (so its rules go through exactly the checks file rules do,
//! and messages about them name the file and line). Every change replaces the whole file the
//! crash-safe way: write a temporary file in the same directory, fsync it, rename it over the
//! old one, fsync the directory. A crash leaves the old file or the new one, never a mix.

#![forbid(unsafe_code)]

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use crate::policy::{self, Policy, PolicyErrors};

/// The default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/egress";
/// The file of created documents, inside the state directory.
pub const CREATED_FILE: &str = "created.yaml";
/// The file of the Kubernetes API's EgressRule objects last in force.
pub const CLUSTER_RULES_FILE: &str = "egressrules.json";

/// The kind of a created document, as `egress get`/`delete` name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// `kind: EgressRule`.
    EgressRule,
    /// `kind: Service` (an ExternalName alias).
    Service,
}

impl Kind {
    /// Parses what a user types: `egressrule(s)`, `service(s)`, `svc`, any case.
    pub fn parse(word: &str) -> Option<Self> {
        match word.to_ascii_lowercase().as_str() {
            "egressrule" | "egressrules" | "er" => Some(Self::EgressRule),
            "service" | "services" | "svc" => Some(Self::Service),
            _ => None,
        }
    }

    /// The YAML `kind`.
    pub fn yaml_kind(self) -> &'static str {
        match self {
            Self::EgressRule => "EgressRule",
            Self::Service => "Service",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::EgressRule => "egressrule",
            Self::Service => "service",
        })
    }
}

/// One document of a created source: its kind, name and own text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Document {
    /// What it is.
    pub kind: Kind,
    /// `metadata.name`.
    pub name: String,
    /// Its namespace: a rule's, `None` for a node-wide rule; a Service's (`default` when it
    /// names none).
    pub namespace: Option<String>,
    /// The document's YAML text, without its `---` line.
    pub text: String,
}

/// Why a source cannot be split into created documents.
#[derive(Debug, thiserror::Error)]
pub enum SplitError {
    /// The source is not a valid policy on its own.
    #[error("{0}")]
    Invalid(PolicyErrors),
    /// A document that `egress create` does not take (EgressConfig, or nothing).
    #[error("{origin}: {message}")]
    Refused {
        /// `SOURCE:LINE`.
        origin: String,
        /// What is wrong.
        message: String,
    },
}

/// Splits `text` (named `source` in messages) into its documents, each checked on its own and
/// classified. Only EgressRule and Service documents are taken: node settings (EgressConfig)
/// belong in the policy files, not in a rule made at run time.
///
/// A line that starts with `---` (then a space or nothing) at column 0 always separates
/// documents in YAML (the spec forbids it inside any scalar), so splitting at such lines is
/// exact.
pub fn split(source: &str, text: &str) -> Result<Vec<Document>, SplitError> {
    split_in(source, text, None)
}

/// [`split`], with each document that names no namespace put in `namespace` (`egress create
/// -n`): `namespace: NS` is written into its `metadata`, and the document checked again to
/// be sure it now is in that namespace.
///
/// # Errors
/// As [`split`], and a document whose `metadata` is written in a way this cannot add the
/// namespace to.
pub fn split_in(
    source: &str,
    text: &str,
    namespace: Option<&str>,
) -> Result<Vec<Document>, SplitError> {
    // The whole source first: errors then carry the user's own line numbers.
    policy::load_sources(&[(source.to_owned(), text.as_bytes().to_vec())])
        .map_err(SplitError::Invalid)?;
    let mut documents = Vec::new();
    for (first_line, chunk) in chunks(text) {
        let load = |chunk: &str| {
            policy::load_sources(&[(source.to_owned(), chunk.as_bytes().to_vec())])
                .map_err(SplitError::Invalid)
        };
        let mut policy = load(chunk)?;
        let mut chunk = chunk.to_owned();
        if let Some(ns) = namespace
            && let Some((kind, _, found)) = classify(&policy)
        {
            // A rule that names no namespace is node-wide; a Service that names none is in
            // `default`, so its text tells.
            let named = match kind {
                Kind::EgressRule => found.is_some(),
                Kind::Service => chunk.contains("namespace:"),
            };
            if named && found.as_deref() != Some(ns) {
                return Err(SplitError::Refused {
                    origin: format!("{source}:{first_line}"),
                    message: format!(
                        "the document is in namespace `{}`, not `{ns}` as -n says",
                        found.as_deref().unwrap_or("")
                    ),
                });
            }
            if !named {
                let placed = with_namespace(&chunk, ns)
                    .map(|text| (load(&text), text))
                    .filter(|(loaded, _)| {
                        loaded.as_ref().is_ok_and(|p| {
                            classify(p).is_some_and(|(_, _, f)| f.as_deref() == Some(ns))
                        })
                    });
                let Some((loaded, text)) = placed else {
                    return Err(SplitError::Refused {
                        origin: format!("{source}:{first_line}"),
                        message: format!(
                            "cannot put this document in namespace `{ns}`: write \
                             `namespace: {ns}` in its metadata, or leave -n out"
                        ),
                    });
                };
                policy = loaded?;
                chunk = text;
            }
        }
        let (kind, name, namespace) = match classify(&policy) {
            Some(found) => found,
            None if is_blank(&chunk) => continue,
            None => {
                return Err(SplitError::Refused {
                    origin: format!("{source}:{first_line}"),
                    message: "`egress create` takes EgressRule and Service documents; node \
                              settings (EgressConfig) belong in the agent's policy files"
                        .to_owned(),
                });
            }
        };
        documents.push(Document {
            kind,
            name,
            namespace,
            text: chunk.trim_end().to_owned() + "\n",
        });
    }
    Ok(documents)
}

/// The kind, name and namespace of the one rule or alias a single document's policy holds.
fn classify(policy: &Policy) -> Option<(Kind, String, Option<String>)> {
    if let Some(rule) = policy.rules.first() {
        return Some((Kind::EgressRule, rule.name.clone(), rule.scope.clone()));
    }
    if let Some(rule) = policy.http_rules.first() {
        return Some((Kind::EgressRule, rule.name.clone(), rule.scope.clone()));
    }
    policy.aliases.first().map(|alias| {
        (
            Kind::Service,
            alias.name.clone(),
            Some(alias.namespace.clone()),
        )
    })
}

/// `chunk` with `namespace: NS` added to its block `metadata:` mapping, indented as the
/// mapping's first entry; `None` when there is no such mapping at the top level.
fn with_namespace(chunk: &str, namespace: &str) -> Option<String> {
    let lines: Vec<&str> = chunk.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.trim_end() == "metadata:" || l.starts_with("metadata: #"))?;
    let indent = lines[at + 1..]
        .iter()
        .find(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(|l| &l[..l.len() - l.trim_start().len()])
        .filter(|i| !i.is_empty())?;
    let mut out: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
    out.insert(at + 1, format!("{indent}namespace: {namespace}"));
    Some(out.join("\n") + "\n")
}

/// Comments and blank lines only.
fn is_blank(chunk: &str) -> bool {
    chunk
        .lines()
        .map(str::trim)
        .all(|l| l.is_empty() || l.starts_with('#') || l == "---" || l == "...")
}

/// The documents of `text` with the line each starts on, split at `---` lines; the marker line
/// itself is dropped unless it carries content (`--- {kind: ...}`), which stays.
fn chunks(text: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut start_line = 1;
    let mut offset = 0;
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let bare = line.trim_end_matches(['\n', '\r']);
        let marker = bare == "---" || bare.starts_with("--- ") || bare.starts_with("---\t");
        if marker {
            out.push((start_line, &text[start..offset]));
            // Keep an inline document (`--- {...}`); drop a bare marker line.
            if bare.len() > 3 && !bare[3..].trim().is_empty() {
                start = offset + 3;
                start_line = index + 1;
            } else {
                start = offset + line.len();
                start_line = index + 2;
            }
        }
        offset += line.len();
    }
    out.push((start_line, &text[start..]));
    out.retain(|(_, chunk)| !chunk.trim().is_empty());
    out
}

/// Joins documents into one multi-document YAML text.
pub fn join(documents: &[Document]) -> String {
    let mut out = String::from("# Rules made with `egress create`; managed by the agent.\n");
    for d in documents {
        out.push_str("---\n");
        out.push_str(&d.text);
    }
    out
}

/// The file name of the `egress events` history in the state directory.
pub const HISTORY_FILE: &str = "events.jsonl";

/// The state directory.
#[derive(Clone, Debug)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// The store in `dir`, created (mode 0700) if missing.
    ///
    /// # Errors
    /// The directory cannot be created or is not a directory.
    pub fn open(dir: &Path) -> io::Result<Self> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// The file of `egress events` history, [`HISTORY_FILE`] (the control socket's
    /// `history` module writes and reads it).
    pub fn history_path(&self) -> PathBuf {
        self.dir.join(HISTORY_FILE)
    }

    /// The EgressRule objects of the Kubernetes API last in force (JSON), which a restarted
    /// agent enforces until the API answers (see [`crate::cluster`]).
    pub fn cluster_rules_path(&self) -> PathBuf {
        self.dir.join(CLUSTER_RULES_FILE)
    }

    /// The file of created documents (it may not exist yet).
    pub fn created_path(&self) -> PathBuf {
        self.dir.join(CREATED_FILE)
    }

    /// The created documents; none when the file does not exist.
    ///
    /// # Errors
    /// The file cannot be read or is not a valid set of created documents.
    pub fn documents(&self) -> Result<Vec<Document>, String> {
        let path = self.created_path();
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        split(&path.display().to_string(), &text).map_err(|e| e.to_string())
    }

    /// Replaces the created documents with `documents`, crash-safely (see the module docs).
    /// With none, the file is removed.
    ///
    /// # Errors
    /// Any step fails; the old file is then still in place.
    pub fn save(&self, documents: &[Document]) -> io::Result<()> {
        let path = self.created_path();
        if documents.is_empty() {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            }
        } else {
            write_atomic(&path, join(documents).as_bytes())?;
        }
        sync_dir(&self.dir)
    }
}

/// Writes `bytes` to `path` through a temporary file in the same directory: write, fsync,
/// rename. The caller fsyncs the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut file = create_private(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(|e| io::Error::new(e.kind(), format!("writing {}: {e}", path.display())))
}

/// Creates `path` for writing, or empties it, readable and writable by its owner only (0600):
/// the temporary file a private file is written through before it is renamed into place.
///
/// # Errors
/// The file cannot be opened.
pub fn create_private(path: &Path) -> io::Result<fs::File> {
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// fsyncs a directory, so a rename or unlink in it is on disk.
fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io::Error::new(e.kind(), format!("syncing {}: {e}", dir.display())))
}

/// Makes `dir` private to its owner (0700), for directories holding root-only things.
///
/// # Errors
/// The permissions cannot be set.
pub fn make_private(dir: &Path) -> io::Result<()> {
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TempDir;

    const TWO: &str = "\
kind: EgressRule
metadata: {name: one}
spec:
  destination: {service: 192.0.2.0/24}
  ports: [{port: 443, protocol: tcp}]
---
# a comment
kind: Service
apiVersion: v1
metadata: {name: bin, namespace: default}
spec: {type: ExternalName, externalName: httpbin.test, ports: [{port: 80}]}
";

    #[test]
    fn split_finds_each_document_with_its_kind_and_name() {
        let docs = split("-", TWO).unwrap();
        let got: Vec<_> = docs.iter().map(|d| (d.kind, d.name.as_str())).collect();
        assert_eq!(got, [(Kind::EgressRule, "one"), (Kind::Service, "bin")]);
        assert!(docs[1].text.starts_with("# a comment\nkind: Service"));
        // Joined and split again: the same documents.
        assert_eq!(split("created.yaml", &join(&docs)).unwrap(), docs);
    }

    #[test]
    fn minus_n_puts_documents_that_name_no_namespace_in_it() {
        const BLOCK: &str = "kind: EgressRule\nmetadata:\n  name: range1\nspec:\n  destination:\n    service: 192.0.2.0/24\n  ports:\n  - port: 443\n    protocol: tcp\n";
        let docs = split_in("-", BLOCK, Some("team-a")).unwrap();
        assert_eq!(docs[0].namespace.as_deref(), Some("team-a"));
        assert!(
            docs[0].text.contains("  namespace: team-a\n  name: range1"),
            "{}",
            docs[0].text
        );
        // Kept as written, and read back in it.
        assert_eq!(split("created.yaml", &join(&docs)).unwrap(), docs);
        // Without -n: node-wide.
        assert_eq!(split("-", BLOCK).unwrap()[0].namespace, None);
        // A document in another namespace than -n says, and flow-style metadata, are refused
        // rather than put anywhere else.
        let other = BLOCK.replace("  name: range1", "  name: range1\n  namespace: b");
        let err = split_in("-", &other, Some("team-a"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("in namespace `b`, not `team-a`"), "{err}");
        let err = split_in("-", TWO, Some("team-a")).unwrap_err().to_string();
        assert!(
            err.starts_with("-:1: cannot put this document in namespace `team-a`"),
            "{err}"
        );
    }

    #[test]
    fn split_reports_errors_with_the_sources_own_lines() {
        let bad = TWO.replace("192.0.2.0/24", "192.0.2.0/33");
        let err = split("rules.yaml", &bad).unwrap_err().to_string();
        assert!(err.starts_with("rules.yaml:4: "), "{err}");
    }

    #[test]
    fn split_refuses_egress_config() {
        let text = "kind: EgressConfig\nspec: {mode: audit}\n";
        let err = split("-", text).unwrap_err().to_string();
        assert!(
            err.starts_with("-:1: ") && err.contains("EgressConfig"),
            "{err}"
        );
        let mixed = format!("{TWO}---\nkind: EgressConfig\n");
        assert!(split("-", &mixed).is_err());
    }

    #[test]
    fn chunks_keep_inline_documents_and_line_numbers() {
        let text = "--- \n---\n--- {kind: EgressRule}\n# c\n---\nx: 1\n";
        let c = chunks(text);
        assert_eq!(c, [(3, " {kind: EgressRule}\n# c\n"), (6, "x: 1\n")]);
    }

    #[test]
    fn save_replaces_the_file_and_an_empty_set_removes_it() {
        let dir = TempDir::new("state");
        let store = Store::open(&dir).unwrap();
        assert_eq!(store.documents().unwrap(), []);
        let docs = split("-", TWO).unwrap();
        store.save(&docs).unwrap();
        assert_eq!(store.documents().unwrap(), docs);
        let mode = fs::metadata(store.created_path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        store.save(&docs[..1]).unwrap();
        assert_eq!(store.documents().unwrap(), docs[..1]);
        store.save(&[]).unwrap();
        assert!(!store.created_path().exists());
        let leftovers: Vec<_> = fs::read_dir(&dir.0).unwrap().collect();
        assert!(leftovers.is_empty(), "no temporary file is left behind");
    }
}
