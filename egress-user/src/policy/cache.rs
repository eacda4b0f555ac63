//! The documents of the last load, reused when they did not change: a reload of a
//! 10,000-rule file in which one rule changed parses and checks that one document again, not
//! ten thousand (issue 19: parsing was two thirds of a reload's own work).
//!
//! A source's text is cut into its documents at their `---` lines (a line that is `---`
//! alone or followed by a space or tab: YAML allows no such line inside a document). A
//! document is reused when the same source had the very same text at the same first line in
//! the last load and came out clean: what [`validate::document`] makes of a document depends
//! on its text, its first line and the source's name alone, and the checks across documents
//! run on every load as before. A document that is new is parsed alone, its lines counted
//! from where it starts.
//!
//! Whenever the cut could differ from reading the whole text, the whole text is read as
//! before, so every message stays exactly what it was: a document with any error or
//! warning, a directive (`%`) or `...` line, a byte-order mark, text that is not UTF-8 or is
//! too large. A source read that way keeps nothing here.
//!
//! Memory: the checked documents of each source's last clean load, each with a 128-bit digest
//! of its text in place of the text (which was 4.5 of the 7 MB this cache held for 10,000
//! Kubernetes objects). The digest is two 64-bit foldhash hashes with seeds drawn at random
//! per process: two texts that differ are told apart but with a chance of 2^-128, and the
//! seeds cannot be known to whoever writes a policy. A source no longer loaded keeps its
//! entry until a load of that name, or until the agent's next whole load ([`retain`], called
//! by [`super::load_read_whole`]).

use std::{
    hash::BuildHasher as _,
    sync::{Mutex, OnceLock, PoisonError},
};

use foldhash::{HashMap, HashMapExt as _};

use super::{
    load::{MAX_FILE_SIZE, parse_source},
    report::Report,
    validate::{self, Item},
    yaml,
};

/// One document of a source's last load.
#[derive(Default)]
struct Cached {
    first_line: usize,
    /// [`digest`] of the document's text.
    digest: u128,
    /// `None`: an empty document (comments only), which the policy skips.
    item: Option<Item>,
}

/// By source name: its documents in the last load that read it in documents.
static LAST: Mutex<Option<HashMap<String, Vec<Cached>>>> = Mutex::new(None);

/// `value` as 128 bits, for telling texts (or other keys) apart without keeping them (see
/// the module documentation): equal values have equal digests within a process.
pub(crate) fn digest<T: std::hash::Hash + ?Sized>(value: &T) -> u128 {
    static SEEDS: OnceLock<[foldhash::quality::RandomState; 2]> = OnceLock::new();
    let [high, low] = SEEDS.get_or_init(Default::default);
    (u128::from(high.hash_one(value)) << 64) | u128::from(low.hash_one(value))
}

/// The checked documents of source `name` (`bytes`), in order, with every problem in
/// `report`: from the last load where a document did not change, as
/// [`validate::document`] of [`parse_source`] otherwise.
pub(super) fn items(name: &str, bytes: &[u8], report: &mut Report) -> Vec<Item> {
    if let Some(items) = by_document(name, bytes) {
        return items;
    }
    forget(name);
    let mut items = Vec::new();
    for root in parse_source(bytes, report) {
        if let Some(item) = validate::document(&root, report) {
            items.push(item);
        }
    }
    items
}

/// Drops the documents of every source whose name `keep` refuses: the agent calls it with
/// the names of its whole policy, so that a source no longer loaded (a removed file, a
/// deleted object, an edited object, whose name carries its resourceVersion) does not keep
/// its documents for the agent's lifetime.
pub(super) fn retain(keep: impl Fn(&str) -> bool) {
    let mut last = LAST.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(sources) = last.as_mut() {
        sources.retain(|name, _| keep(name));
    }
}

/// Whether the documents of source `name` are kept.
#[cfg(test)]
pub(super) fn holds(name: &str) -> bool {
    LAST.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .as_ref()
        .is_some_and(|sources| sources.contains_key(name))
}

fn forget(name: &str) {
    let mut last = LAST.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(sources) = last.as_mut() {
        sources.remove(name);
    }
}

/// The documents one by one, reusing the unchanged; `None` where the whole text must be read
/// (see the module documentation).
fn by_document(name: &str, bytes: &[u8]) -> Option<Vec<Item>> {
    if bytes.len() as u64 > MAX_FILE_SIZE {
        return None;
    }
    let text = std::str::from_utf8(bytes).ok()?;
    if text.starts_with('\u{feff}') {
        return None;
    }
    let documents = split(text)?;
    let mut last = LAST.lock().unwrap_or_else(PoisonError::into_inner);
    let sources = last.get_or_insert_with(HashMap::new);
    // The last load's documents are moved out, not copied: this load's entry replaces them.
    let mut previous: Vec<Cached> = sources.remove(name).unwrap_or_default();
    // Where each document was in the last load, if it was: looked up by place first
    // (documents mostly stay where they were), by text and line only when that misses. An
    // entry is reused whole (same first line, same text) by one document at most: two never
    // share a first line, and were one taken already, the document would just be checked
    // again.
    let mut taken = vec![false; previous.len()];
    let digests: Vec<u128> = documents.iter().map(|&(_, text)| digest(text)).collect();
    let found: Vec<Option<usize>> = {
        let mut by_text: Option<HashMap<(usize, u128), usize>> = None;
        documents
            .iter()
            .zip(&digests)
            .enumerate()
            .map(|(i, (&(first_line, _), &digest))| {
                let same_place = previous
                    .get(i)
                    .filter(|d| d.first_line == first_line && d.digest == digest)
                    .map(|_| i);
                let k = same_place.or_else(|| {
                    by_text
                        .get_or_insert_with(|| {
                            previous
                                .iter()
                                .enumerate()
                                .map(|(k, d)| ((d.first_line, d.digest), k))
                                .collect()
                        })
                        .get(&(first_line, digest))
                        .copied()
                })?;
                (!std::mem::replace(&mut taken[k], true)).then_some(k)
            })
            .collect()
    };
    let fresh: Vec<(usize, &str)> = documents
        .iter()
        .zip(&found)
        .filter(|(_, k)| k.is_none())
        .map(|(document, _)| *document)
        .collect();
    let mut checked = check_all(name, &fresh)?.into_iter();
    let mut items = Vec::with_capacity(documents.len());
    let next: Vec<Cached> = documents
        .into_iter()
        .zip(digests)
        .zip(found)
        .map(|(((first_line, _), digest), k)| {
            let document = match k {
                // Moved out; what is left in its place is dropped with `previous`.
                Some(k) => std::mem::take(&mut previous[k]),
                None => Cached {
                    first_line,
                    digest,
                    item: checked.next().expect("one checked item per fresh document"),
                },
            };
            items.extend(document.item.clone());
            document
        })
        .collect();
    sources.insert(name.to_owned(), next);
    drop(last);
    Some(items)
}

/// Fewer fresh documents than this are checked on the calling thread alone.
const PARALLEL_MIN: usize = 256;

/// [`check`] of each of `documents` (first line, text), in order; `None` when any has a
/// problem. Many (a whole policy replaced) are checked on every CPU: parsing them is most of
/// such a reload's work (issue 19).
fn check_all(name: &str, documents: &[(usize, &str)]) -> Option<Vec<Option<Item>>> {
    #[cfg(test)]
    tests::CHECKS.with(|n| n.set(n.get() + documents.len()));
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(8);
    if documents.len() < PARALLEL_MIN || threads < 2 {
        return documents
            .iter()
            .map(|&(first_line, text)| check(name, first_line, text))
            .collect();
    }
    let chunk = documents.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let workers: Vec<_> = documents
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .map(|&(first_line, text)| check(name, first_line, text))
                        .collect::<Option<Vec<_>>>()
                })
            })
            .collect();
        let mut all = Vec::with_capacity(documents.len());
        for worker in workers {
            // A panic in a check is a bug: raised here as it would have been on this thread.
            all.extend(
                worker
                    .join()
                    .unwrap_or_else(|e| std::panic::resume_unwind(e))?,
            );
        }
        Some(all)
    })
}

/// Parses and checks one document; `None` when anything was reported (the whole text is
/// then read as before, for the exact messages), `Some(None)` for an empty document.
fn check(name: &str, first_line: usize, text: &str) -> Option<Option<Item>> {
    let mut report = Report::new(name);
    let mut roots = yaml::parse_at(text, first_line, &mut report);
    if report.has_errors() || report.has_warnings() || roots.len() > 1 {
        return None;
    }
    let Some(root) = roots.pop() else {
        return Some(None);
    };
    let item = validate::document(&root, &mut report)?;
    (!report.has_errors() && !report.has_warnings()).then_some(Some(item))
}

/// Whether `line` is the marker `marker` (`---` or `...`): alone, or followed by a space or
/// a tab.
fn is_marker(line: &str, marker: &str) -> bool {
    line.strip_prefix(marker)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
}

/// `text` cut before each `---` line, with the line each piece starts on; `None` when it has
/// a directive or a `...` line (the cut would not follow them).
fn split(text: &str) -> Option<Vec<(usize, &str)>> {
    let bytes = text.as_bytes();
    // Only a line starting with one of `-`, `.` and `%` can be a marker or a directive: those
    // line starts are found by a vectorised search, not by visiting every line.
    let mut candidates: Vec<usize> = Vec::new();
    if matches!(bytes.first(), Some(b'-' | b'.' | b'%')) {
        candidates.push(0);
    }
    for needle in [&b"\n-"[..], b"\n.", b"\n%"] {
        candidates.extend(memchr::memmem::find_iter(bytes, needle).map(|i| i + 1));
    }
    candidates.sort_unstable();
    let mut documents = Vec::new();
    let (mut start, mut start_line) = (0, 1);
    // The line of `counted`: newlines are counted from one candidate to the next.
    let (mut counted, mut line) = (0, 1);
    for at in candidates {
        line += bytes[counted..at].iter().filter(|&&b| b == b'\n').count();
        counted = at;
        let end = memchr::memchr(b'\n', &bytes[at..]).map_or(bytes.len(), |i| at + i + 1);
        let bare = text[at..end].trim_end_matches(['\n', '\r']);
        if bare.starts_with('%') || is_marker(bare, "...") {
            return None;
        }
        if is_marker(bare, "---") && at > start {
            documents.push((start_line, &text[start..at]));
            (start, start_line) = (at, line);
        }
    }
    if bytes.len() > start {
        documents.push((start_line, &text[start..]));
    }
    Some(documents)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{DEFAULT_POLICY, seeds};

    thread_local! {
        /// Documents this thread's test parsed and checked alone.
        pub(super) static CHECKS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    fn checks() -> usize {
        CHECKS.with(std::cell::Cell::take)
    }

    #[test]
    fn a_reload_checks_only_the_documents_that_changed() {
        let name = "a-reload-checks-only.yaml";
        let text = rules(300, 443);
        assert!(cached(name, &text).is_ok());
        assert_eq!(checks(), 300);
        assert_eq!(cached(name, &text), whole(name, &text));
        assert_eq!(checks(), 0);
        let edited = text.replacen("port: 443\n", "port: 8443\n", 1);
        assert_eq!(cached(name, &edited), whole(name, &edited));
        assert_eq!(checks(), 1, "one document changed");
        // A line more in the first document moves every later one: all read again.
        let moved = edited.replacen("# rule 0\n", "# rule 0\n# moved\n", 1);
        assert_eq!(cached(name, &moved), whole(name, &moved));
        assert_eq!(checks(), 300);
    }

    /// The documents, or the messages.
    fn outcome(report: Report, items: &[Item]) -> Result<String, Vec<String>> {
        if report.has_errors() {
            Err(report
                .into_sorted()
                .iter()
                .map(ToString::to_string)
                .collect())
        } else {
            Ok(format!("{items:?}"))
        }
    }

    /// What the whole text gives.
    fn whole(name: &str, text: &str) -> Result<String, Vec<String>> {
        let mut report = Report::new(name);
        let items: Vec<Item> = parse_source(text.as_bytes(), &mut report)
            .iter()
            .filter_map(|root| validate::document(root, &mut report))
            .collect();
        outcome(report, &items)
    }

    /// What [`items`] gives, with the cache as earlier loads left it.
    fn cached(name: &str, text: &str) -> Result<String, Vec<String>> {
        let mut report = Report::new(name);
        let items = items(name, text.as_bytes(), &mut report);
        outcome(report, &items)
    }

    fn rules(n: usize, port: u16) -> String {
        (0..n)
            .map(|i| {
                format!(
                    "---\n# rule {i}\nkind: EgressRule\nmetadata:\n  name: r{i}\nspec:\n  destination:\n    service: 198.18.{}.{}/32\n  ports:\n  - port: {port}\n    protocol: tcp\n",
                    i / 250,
                    i % 250 + 1
                )
            })
            .collect()
    }

    #[test]
    fn documents_read_one_by_one_or_reused_are_what_the_whole_text_gives() {
        let edited = rules(200, 443).replacen("name: r7\n", "name: r7-edited\n", 1);
        let longer = rules(200, 443).replacen("# rule 7\n", "# rule 7\n# and a line more\n", 1);
        let texts = [
            seeds::TCP.to_owned(),
            seeds::SERVICES.to_owned(),
            DEFAULT_POLICY.to_owned(),
            rules(200, 443),
            // One document changed, in place and with a line more: the rest reused.
            edited,
            longer,
            rules(200, 443).replace('\n', "\r\n"),
            // No leading marker, comments, empty documents, a trailing marker.
            "# top\nkind: EgressRule\nmetadata: {name: a}\nspec:\n  destination: {service: 192.0.2.1}\n  ports: [{port: 80, protocol: tcp}]\n---\n# nothing\n---\n---\n".to_owned(),
            "--- {kind: EgressRule, metadata: {name: b}, spec: {destination: {service: 192.0.2.2}, ports: [{port: 81, protocol: tcp}]}}\n--- # end\n".to_owned(),
        ];
        let name = "documents-read-one-by-one.yaml";
        for text in &texts {
            let expected = whole(name, text);
            assert!(expected.is_ok(), "{expected:?}\n{text}");
            // Read by document, then again with every document reused.
            assert_eq!(cached(name, text), expected, "{text}");
            assert_eq!(cached(name, text), expected, "{text}");
        }
    }

    #[test]
    fn a_document_with_a_problem_gets_the_whole_texts_messages() {
        let name = "a-document-with-a-problem.yaml";
        let good = rules(20, 443);
        assert!(cached(name, &good).is_ok());
        for bad in [
            good.replacen("port: 443", "port: 70000", 1),
            good.replacen("protocol: tcp", "protocol: [tcp", 1),
            good.replacen("kind: EgressRule", "kind: EgressRul", 1),
            format!("%YAML 1.3\n{good}"),
            format!("{good}...\n"),
            // A duplicate name: each document is clean, the check across them is not.
            format!("{good}{}", rules(1, 80)),
        ] {
            let expected = whole(name, &bad);
            let got = cached(name, &bad);
            match (&expected, &got) {
                // The duplicate is found by the checks across documents, after this step.
                (Ok(_), Ok(_)) => assert_eq!(got, expected),
                _ => assert_eq!(got, expected, "{bad}"),
            }
            // And the good text after it is read right again.
            assert_eq!(cached(name, &good), whole(name, &good));
        }
        // A whole policy replaced is checked on every CPU: a problem in its last document
        // still gets the whole text's messages, and the good one is read in full.
        checks();
        let mut many = rules(2 * PARALLEL_MIN, 8443);
        let at = many.rfind("port: 8443").expect("a port");
        many.replace_range(at..at + "port: 8443".len(), "port: 70000");
        let expected = whole(name, &many);
        assert!(expected.is_err(), "{expected:?}");
        assert_eq!(cached(name, &many), expected);
        let many = rules(2 * PARALLEL_MIN, 8443);
        assert_eq!(cached(name, &many), whole(name, &many));
        assert_eq!(
            checks(),
            2 * PARALLEL_MIN * 2,
            "every document checked, both times"
        );
    }

    #[test]
    fn documents_are_cut_at_their_markers_with_their_lines() {
        let text = "a: 1\n---\nb: 2\n--- # c\nc: 3\n---x: no marker\n";
        assert_eq!(
            split(text).unwrap(),
            [
                (1, "a: 1\n"),
                (2, "---\nb: 2\n"),
                (4, "--- # c\nc: 3\n---x: no marker\n")
            ]
        );
        assert_eq!(split("---\na: 1").unwrap(), [(1, "---\na: 1")]);
        assert!(split("%YAML 1.2\n---\na: 1\n").is_none());
        assert!(split("a: 1\n...\n---\nb: 2\n").is_none());
        assert_eq!(split("").unwrap(), []);
        // Lines that start with a candidate byte and are no marker; CRLF; a marker at the end.
        assert_eq!(
            split("a:\n- 1\n-\n---\r\nb: 2\r\n.x: 3\n--\n---").unwrap(),
            [
                (1, "a:\n- 1\n-\n"),
                (4, "---\r\nb: 2\r\n.x: 3\n--\n"),
                (8, "---")
            ]
        );
        assert!(split("a: 1\n%TAG ! x\n").is_none());
        assert!(split("...").is_none());
    }
}
