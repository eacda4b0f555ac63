//! A YAML tree that remembers the line of every node, built from saphyr-parser's event stream.
//!
//! We build our own tree instead of deserialising with serde because validation needs what a
//! serde loader throws away: the line of every key and value (for `FILE:LINE:` messages), and
//! duplicate keys (YAML says they are an error; most loaders silently keep the last one, so a
//! second `service:` would quietly win). Anchors and aliases are reported rather than expanded:
//! a 1 KiB "billion laughs" file expands to gigabytes, and no policy needs them. Tags other
//! than the core `!!str`, `!!map` and `!!seq` are reported too, never silently dropped.
//!
//! Plain scalars are typed by the YAML 1.2 core schema, so `port: "443"` (a string) and
//! `port: 443` (an integer) stay distinguishable, and `yes` is the string it is in YAML 1.2.

use std::{borrow::Cow, collections::HashMap};

use saphyr_parser::{Event, Parser, ScalarStyle, Tag};

use super::report::{Report, join};

/// Deepest nesting of sequences and mappings accepted. A policy needs four levels; the limit
/// keeps a file of 10 million `[` from costing a deep recursion when the tree is dropped.
pub(crate) const MAX_DEPTH: usize = 64;

/// The prefix saphyr-parser resolves `!!` to.
const CORE_TAG_PREFIX: &str = "tag:yaml.org,2002:";

/// One node of a document and the line it starts on.
#[derive(Debug)]
pub(crate) struct Node {
    /// 1-based line of the node's first character.
    pub(crate) line: usize,
    /// What the node holds.
    pub(crate) value: Value,
}

/// The content of a [`Node`].
#[derive(Debug)]
pub(crate) enum Value {
    /// A scalar, typed by the core schema.
    Scalar(Scalar),
    /// A sequence, in file order.
    Seq(Vec<Node>),
    /// A mapping with string keys, in file order, without duplicates.
    Map(Vec<Entry>),
    /// A node already reported as an error (an alias, an unsupported tag): validation skips it
    /// instead of piling a second message onto the same line.
    Invalid,
}

/// One key and value of a mapping.
#[derive(Debug)]
pub(crate) struct Entry {
    /// The key, always a string.
    pub(crate) key: String,
    /// 1-based line of the key.
    pub(crate) key_line: usize,
    /// The value.
    pub(crate) value: Node,
}

/// A scalar's text and its type.
#[derive(Debug)]
pub(crate) struct Scalar {
    /// The text after YAML unquoting and folding.
    pub(crate) text: String,
    /// What the core schema makes of it.
    pub(crate) kind: ScalarKind,
}

/// The YAML 1.2 core schema types of a scalar.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ScalarKind {
    /// Empty, `~` or `null`.
    Null,
    /// `true` or `false`.
    Bool,
    /// `443`, `-1`, `0x1bb`, `0o777`.
    Int,
    /// `443.5`, `1e3`, `.inf`.
    Float,
    /// Anything else, and every quoted or block scalar.
    Str,
}

impl Value {
    /// What this is, for `expected X, found Y` messages.
    pub(crate) fn describe(&self) -> String {
        match self {
            Self::Scalar(s) => match s.kind {
                ScalarKind::Null if s.text.is_empty() => "nothing".to_owned(),
                ScalarKind::Null => "null".to_owned(),
                ScalarKind::Bool => format!("a boolean `{}`", s.text),
                ScalarKind::Int => format!("an integer `{}`", s.text),
                ScalarKind::Float => format!("a float `{}`", s.text),
                ScalarKind::Str => format!("a string \"{}\"", s.text.escape_debug()),
            },
            Self::Seq(_) => "a sequence".to_owned(),
            Self::Map(_) => "a mapping".to_owned(),
            Self::Invalid => "an invalid value".to_owned(),
        }
    }
}

/// The YAML versions a `%YAML` directive may name: the file is read by the 1.2 core schema,
/// which reads 1.1 files the same wherever a policy could tell (and `0443`, where they differ,
/// is refused).
const YAML_VERSIONS: &[&str] = &["1.1", "1.2"];

/// Reports a `%YAML` directive naming any other version (`%YAML 9.9`): a file that says it is
/// written in another language than the one it will be read as. saphyr-parser reads the
/// directive and throws the version away, so directives are found here, as the lines that start
/// with `%YAML` (a directive starts at column 0, where no content line can begin with `%`).
fn check_version_directives(text: &str, offset: usize, report: &mut Report) {
    for (i, line) in text.lines().enumerate() {
        let Some(rest) = line.strip_prefix("%YAML") else {
            continue;
        };
        if !rest.starts_with([' ', '\t']) {
            continue;
        }
        let version = rest.split_whitespace().next().unwrap_or_default();
        if !YAML_VERSIONS.contains(&version) {
            report.error(
                i + 1 + offset,
                format!(
                    "`%YAML {}`: policy files are YAML 1.2 (a `%YAML` directive may name 1.1 or \
                     1.2)",
                    version.escape_debug()
                ),
            );
        }
    }
}

/// Types a plain (unquoted) scalar by the YAML 1.2 core schema.
fn resolve_plain(text: &str) -> ScalarKind {
    fn digits(s: &str, radix: u32) -> bool {
        !s.is_empty() && s.chars().all(|c| c.is_digit(radix))
    }
    let unsigned = text.strip_prefix(['-', '+']).unwrap_or(text);
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return ScalarKind::Null,
        "true" | "True" | "TRUE" | "false" | "False" | "FALSE" => return ScalarKind::Bool,
        ".nan" | ".NaN" | ".NAN" => return ScalarKind::Float,
        _ => {}
    }
    if digits(unsigned, 10)
        || text.strip_prefix("0o").is_some_and(|s| digits(s, 8))
        || text.strip_prefix("0x").is_some_and(|s| digits(s, 16))
    {
        return ScalarKind::Int;
    }
    if matches!(unsigned, ".inf" | ".Inf" | ".INF") {
        return ScalarKind::Float;
    }
    // [0-9]*(\.[0-9]*)?([eE][-+]?[0-9]+)? with at least one digit before the exponent.
    let (mantissa, exponent) = match unsigned.split_once(['e', 'E']) {
        Some((m, e)) => (m, Some(e)),
        None => (unsigned, None),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let mantissa_ok = (digits(whole, 10) || digits(fraction, 10))
        && (whole.is_empty() || digits(whole, 10))
        && (fraction.is_empty() || digits(fraction, 10));
    let exponent_ok = exponent.is_none_or(|e| digits(e.strip_prefix(['-', '+']).unwrap_or(e), 10));
    if mantissa_ok && exponent_ok {
        ScalarKind::Float
    } else {
        ScalarKind::Str
    }
}

/// A tag as the user wrote it: `!!int` rather than `tag:yaml.org,2002:int`.
fn show_tag(tag: &Tag) -> String {
    if tag.handle == CORE_TAG_PREFIX {
        format!("!!{}", tag.suffix)
    } else {
        format!("{}{}", tag.handle, tag.suffix)
    }
}

/// Checks a node's tag: the only ones accepted are those that say what the node already is
/// (`!!str` also turns `!!str 443` into a string). Returns whether the tag is acceptable.
/// `path` gives the node's field path, only needed for the message.
fn tag_ok(
    tag: Option<&Tag>,
    allowed: &str,
    line: usize,
    path: impl FnOnce() -> String,
    report: &mut Report,
) -> bool {
    match tag {
        None => true,
        Some(tag) if tag.handle == CORE_TAG_PREFIX && tag.suffix == allowed => true,
        Some(tag) => {
            report.field_error(
                line,
                &path(),
                format!(
                    "YAML tag `{}` is not supported here (only !!str on a scalar, !!seq on a \
                     sequence and !!map on a mapping)",
                    show_tag(tag)
                ),
            );
            false
        }
    }
}

/// Mappings with at most this many keys find a duplicate key by scanning their entries; larger
/// ones keep an index, so a mapping of 100,000 keys is not checked in O(n²). Policy mappings
/// have two to six keys, and a hash map for each cost more than the scan.
const SCANNED_KEYS: usize = 8;

/// A sequence or mapping whose end has not been seen yet.
///
/// It does not store its field path: paths are only needed for messages, so [`next_path`]
/// builds one from the open frames when something is reported. A frame's path is its parent's
/// [`Frame::child_path`], which stays the same while the frame is open (the parent gets no new
/// item or key until this one is finished).
struct Frame {
    /// 1-based line of its start.
    line: usize,
    /// Already reported (bad tag): the finished node becomes [`Value::Invalid`].
    invalid: bool,
    /// What it holds so far.
    kind: FrameKind,
}

/// The two kinds of [`Frame`].
enum FrameKind {
    /// A sequence's items so far.
    Seq(Vec<Node>),
    /// A mapping's entries so far.
    Map {
        /// Entries with distinct keys.
        entries: Vec<Entry>,
        /// Line of each key in `entries`, to name the first one of a duplicate in O(1); only
        /// once there are more than [`SCANNED_KEYS`] entries.
        seen: Option<HashMap<String, usize>>,
        /// After a key and before its value: the key and its line, or `None` if the key was
        /// rejected (then the value is dropped).
        pending_key: Option<Option<(String, usize)>>,
    },
}

impl Frame {
    /// The path of the node that comes next inside this collection, when this collection's
    /// own path is `path`.
    fn child_path(&self, path: &str) -> String {
        match &self.kind {
            FrameKind::Seq(items) => format!("{path}[{}]", items.len()),
            FrameKind::Map {
                pending_key: Some(Some((key, _))),
                ..
            } => join(path, key),
            // A key (or the value of a rejected key): the mapping's own path is the best guess.
            FrameKind::Map { .. } => path.to_owned(),
        }
    }

    /// The finished node.
    fn finish(self) -> Node {
        let value = match self.kind {
            _ if self.invalid => Value::Invalid,
            FrameKind::Seq(items) => Value::Seq(items),
            FrameKind::Map { entries, .. } => Value::Map(entries),
        };
        Node {
            line: self.line,
            value,
        }
    }
}

/// The field path of the node that comes next inside the innermost open collection of
/// `stack` (`""` at the top of a document).
fn next_path(stack: &[Frame]) -> String {
    stack
        .iter()
        .fold(String::new(), |path, frame| frame.child_path(&path))
}

/// The line of the key `key` among a mapping's `entries`, if it is there.
fn first_line(
    entries: &[Entry],
    seen: Option<&HashMap<String, usize>>,
    key: &str,
) -> Option<usize> {
    match seen {
        Some(seen) => seen.get(key).copied(),
        None => entries.iter().find(|e| e.key == key).map(|e| e.key_line),
    }
}

/// Adds a finished node to the innermost open collection of `stack`: an item, a key, or the
/// value of the pending key.
fn push(stack: &mut [Frame], node: Node, report: &mut Report) {
    let Some(top) = stack.last() else {
        return;
    };
    let FrameKind::Map {
        entries,
        seen,
        pending_key,
    } = &top.kind
    else {
        if let Some(Frame {
            kind: FrameKind::Seq(items),
            ..
        }) = stack.last_mut()
        {
            items.push(node);
        }
        return;
    };
    let (key, key_line) = match pending_key {
        // The node is a key.
        None => {
            let key = key_of(node, || next_path(stack), report);
            set_pending(stack, Some(key));
            return;
        }
        // The value of a rejected key.
        Some(None) => {
            set_pending(stack, None);
            return;
        }
        Some(Some((key, key_line))) => (key, *key_line),
    };
    if let Some(first) = first_line(entries, seen.as_ref(), key) {
        report.field_error(
            key_line,
            &next_path(stack),
            format!("duplicate key (the first `{key}` is on line {first})"),
        );
        set_pending(stack, None);
        return;
    }
    if let Some(Frame {
        kind:
            FrameKind::Map {
                entries,
                seen,
                pending_key,
            },
        ..
    }) = stack.last_mut()
        && let Some(Some((key, key_line))) = pending_key.take()
    {
        match seen {
            Some(seen) => {
                seen.insert(key.clone(), key_line);
            }
            None if entries.len() >= SCANNED_KEYS => {
                let mut index: HashMap<String, usize> = entries
                    .iter()
                    .map(|e| (e.key.clone(), e.key_line))
                    .collect();
                index.insert(key.clone(), key_line);
                *seen = Some(index);
            }
            None => {}
        }
        entries.push(Entry {
            key,
            key_line,
            value: node,
        });
    }
}

/// Sets the pending key of the mapping at the top of `stack`.
fn set_pending(stack: &mut [Frame], key: Option<Option<(String, usize)>>) {
    if let Some(Frame {
        kind: FrameKind::Map { pending_key, .. },
        ..
    }) = stack.last_mut()
    {
        *pending_key = key;
    }
}

/// A mapping key as a string, or `None` (reported) when it is not one. Keys must be strings:
/// every key a policy knows is one, and `1: x` or `[a]: x` is a mistake better named than
/// reported later as an unknown field. `map_path` gives the mapping's path, for messages.
fn key_of(
    node: Node,
    map_path: impl FnOnce() -> String,
    report: &mut Report,
) -> Option<(String, usize)> {
    match node.value {
        Value::Scalar(Scalar {
            text,
            kind: ScalarKind::Str,
        }) => Some((text, node.line)),
        Value::Scalar(Scalar { ref text, kind }) => {
            let message = if kind == ScalarKind::Null && text.is_empty() {
                "a mapping key is empty".to_owned()
            } else {
                format!(
                    "key `{text}` is {}, not a string (quote it if you mean the text)",
                    match kind {
                        ScalarKind::Null => "null",
                        ScalarKind::Bool => "a boolean",
                        ScalarKind::Int => "an integer",
                        ScalarKind::Float => "a float",
                        ScalarKind::Str => "a string",
                    }
                )
            };
            report.field_error(node.line, &map_path(), message);
            None
        }
        Value::Seq(_) | Value::Map(_) => {
            report.field_error(
                node.line,
                &map_path(),
                format!(
                    "mapping keys must be strings, found {}",
                    node.value.describe()
                ),
            );
            None
        }
        Value::Invalid => None,
    }
}

/// Parses every document of `text`. Returns the root of each non-empty document; an empty
/// one (a trailing `---`, comments only, or `~`) is skipped. Every problem goes to `report`.
/// After a syntax error the documents completed before it are still returned, so their own
/// errors are reported too; the document it is in is dropped.
pub(crate) fn parse(text: &str, report: &mut Report) -> Vec<Node> {
    parse_at(text, 1, report)
}

/// [`parse`], for `text` found at line `first_line` of its source: every line reported and
/// kept is the source's.
pub(crate) fn parse_at(text: &str, first_line: usize, report: &mut Report) -> Vec<Node> {
    let offset = first_line.saturating_sub(1);
    check_version_directives(text, offset, report);
    let mut documents = Vec::new();
    let mut stack: Vec<Frame> = Vec::new();
    let mut parser = Parser::new_from_str(text);
    while let Some(next) = parser.next_event() {
        if report.is_full() {
            break;
        }
        let (event, span) = match next {
            Ok(event) => event,
            Err(e) => {
                report.error(
                    e.marker().line() + offset,
                    format!(
                        "invalid YAML: {} (column {})",
                        e.info(),
                        e.marker().col() + 1
                    ),
                );
                break;
            }
        };
        let line = span.start.line() + offset;
        let anchored = match &event {
            Event::Scalar(_, _, anchor, _)
            | Event::SequenceStart(anchor, _)
            | Event::MappingStart(anchor, _) => *anchor != 0,
            _ => false,
        };
        if anchored {
            report.field_error(line, &next_path(&stack), "YAML anchors are not supported");
        }
        let is_seq = matches!(event, Event::SequenceStart(..));
        let finished = match event {
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => None,
            Event::DocumentStart(_) => {
                stack.clear();
                None
            }
            Event::Alias(_) => {
                report.field_error(line, &next_path(&stack), "YAML aliases are not supported");
                Some(Node {
                    line,
                    value: Value::Invalid,
                })
            }
            Event::Scalar(text, style, _, tag) => {
                let path = || next_path(&stack);
                let value = if tag_ok(tag.as_deref(), "str", line, path, report) {
                    let kind = match (style, tag) {
                        (ScalarStyle::Plain, None) => resolve_plain(&text),
                        _ => ScalarKind::Str,
                    };
                    Value::Scalar(Scalar {
                        text: Cow::into_owned(text),
                        kind,
                    })
                } else {
                    Value::Invalid
                };
                Some(Node { line, value })
            }
            Event::SequenceStart(_, tag) | Event::MappingStart(_, tag) => {
                if stack.len() >= MAX_DEPTH {
                    report.field_error(
                        line,
                        &next_path(&stack),
                        format!("nesting is deeper than {MAX_DEPTH} levels"),
                    );
                    break;
                }
                let allowed = if is_seq { "seq" } else { "map" };
                let path = || next_path(&stack);
                let invalid = !tag_ok(tag.as_deref(), allowed, line, path, report);
                let kind = if is_seq {
                    FrameKind::Seq(Vec::new())
                } else {
                    FrameKind::Map {
                        entries: Vec::new(),
                        seen: None,
                        pending_key: None,
                    }
                };
                stack.push(Frame {
                    line,
                    invalid,
                    kind,
                });
                None
            }
            Event::SequenceEnd | Event::MappingEnd => stack.pop().map(Frame::finish),
        };
        if let Some(node) = finished {
            match stack.last() {
                Some(_) => push(&mut stack, node, report),
                None if matches!(
                    node.value,
                    Value::Scalar(Scalar {
                        kind: ScalarKind::Null,
                        ..
                    })
                ) => {}
                None => documents.push(node),
            }
        }
    }
    documents
}
