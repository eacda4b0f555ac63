//! The names of the rules' rows in the last generations, for naming kernel events: an event
//! carries the generation that judged it and a row, and waits in the ring buffer for
//! milliseconds, so a reload in between must not rename it.
//!
//! The agent kept each generation's whole row table for [`NAMED_GENERATIONS`] generations: at
//! 10,000 rules about 1.4 MB each, 20 MB for an agent that reloads often (the Kubernetes API's
//! objects reload it on every burst of changes). Rows are stable (a rule keeps its row across
//! generations, and a freed row is reused only by a later generation, see
//! [`crate::compile::StoredRows::assign`]), so what a generation knew differs from the next
//! only in the rows that changed. [`RowNames`] keeps the newest table whole and, for each
//! older generation, only the rows whose name the next generation changed.

use std::{collections::VecDeque, sync::Arc};

use crate::compile::RowTable;

/// How many generations' names are kept to name events with. Events wait in the ring buffer
/// for milliseconds; one older than this many reloads is named by its row number.
pub const NAMED_GENERATIONS: usize = 16;

/// A row's name in one generation, where the next generation gave it another or none (`None`:
/// the row was free in that generation).
type Changed = (u32, Option<Arc<str>>);

/// The row names of the last [`NAMED_GENERATIONS`] generations.
#[derive(Default)]
pub struct RowNames {
    /// The newest generation and its whole table.
    newest: Option<(u32, Arc<RowTable>)>,
    /// Older generations, oldest first: each with the rows the generation after it changed.
    older: VecDeque<(u32, Vec<Changed>)>,
}

impl RowNames {
    /// Records `table` as the rows of `generation`, the newest. Returns the table it replaces
    /// (the caller frees a 10,000-rule table off the reload's way).
    pub fn push(&mut self, generation: u32, table: Arc<RowTable>) -> Option<Arc<RowTable>> {
        let previous = self.newest.replace((generation, table));
        let (previous_generation, previous_table) = previous?;
        let (_, table) = self.newest.as_ref().expect("just set");
        let changed = if Arc::ptr_eq(&previous_table, table) {
            Vec::new()
        } else {
            let mut changed: Vec<Changed> = previous_table
                .named_rows()
                .filter(|(row, name)| table.name(*row) != Some(&***name))
                .map(|(row, name)| (row, Some(Arc::clone(name))))
                .collect();
            changed.extend(
                table
                    .named_rows()
                    .filter(|(row, _)| previous_table.name(*row).is_none())
                    .map(|(row, _)| (row, None)),
            );
            changed.sort_unstable_by_key(|(row, _)| *row);
            changed
        };
        self.older.push_back((previous_generation, changed));
        if self.older.len() >= NAMED_GENERATIONS {
            self.older.pop_front();
        }
        Some(previous_table)
    }

    /// The name of `row` as `generation` knew it; `None` for a row it did not use, or a
    /// generation older than the last [`NAMED_GENERATIONS`].
    pub fn name(&self, generation: u32, row: u32) -> Option<&str> {
        let (newest_generation, table) = self.newest.as_ref()?;
        let from = if generation == *newest_generation {
            self.older.len()
        } else {
            self.older.iter().position(|(g, _)| *g == generation)?
        };
        // The first change of the row from that generation on tells its name then; with none,
        // it is the name it has now.
        for (_, changed) in self.older.range(from..) {
            if let Ok(i) = changed.binary_search_by_key(&row, |(r, _)| *r) {
                return changed[i].1.as_deref();
            }
        }
        table.name(row)
    }

    /// How many changed rows the older generations keep (for tests).
    #[cfg(test)]
    fn kept(&self) -> usize {
        self.older.iter().map(|(_, changed)| changed.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(rows: &[(u32, &str)]) -> Arc<RowTable> {
        Arc::new(RowTable::of_rows(rows.iter().copied()))
    }

    #[test]
    fn each_generation_names_rows_as_it_knew_them() {
        let mut names = RowNames::default();
        names.push(1, table(&[(10, "a"), (11, "b")]));
        // b deleted; c new.
        names.push(2, table(&[(10, "a"), (12, "c")]));
        // Row 11 reused by d.
        names.push(3, table(&[(10, "a"), (11, "d"), (12, "c")]));
        let at = |g, r| names.name(g, r);
        assert_eq!(
            [at(1, 10), at(1, 11), at(1, 12)],
            [Some("a"), Some("b"), None]
        );
        assert_eq!(
            [at(2, 10), at(2, 11), at(2, 12)],
            [Some("a"), None, Some("c")]
        );
        assert_eq!(
            [at(3, 10), at(3, 11), at(3, 12)],
            [Some("a"), Some("d"), Some("c")]
        );
        assert_eq!(at(4, 10), None, "a generation never seen");
    }

    #[test]
    fn generations_older_than_the_window_are_forgotten() {
        let mut names = RowNames::default();
        for g in 1..=40u32 {
            names.push(g, table(&[(10, &format!("rule-{g}"))]));
        }
        let oldest = 40 - u32::try_from(NAMED_GENERATIONS).expect("16") + 1;
        assert_eq!(names.name(oldest - 1, 10), None);
        assert_eq!(
            names.name(oldest, 10),
            Some(format!("rule-{oldest}").as_str())
        );
        assert_eq!(names.name(40, 10), Some("rule-40"));
    }

    /// Ten thousand rules reloaded sixteen times with one rule changed each time: the older
    /// generations keep two rows each, not ten thousand.
    #[test]
    fn unchanged_rows_are_kept_once() {
        let mut names = RowNames::default();
        let rows: Vec<String> = (0..10_000).map(|i| format!("ns/rule-{i}")).collect();
        for g in 1..=20u32 {
            let mut generation: Vec<(u32, &str)> = rows
                .iter()
                .enumerate()
                .map(|(i, name)| (u32::try_from(i).expect("10,000 rows") + 10, name.as_str()))
                .collect();
            let edited = format!("ns/edited-{g}");
            generation[0].1 = &edited;
            names.push(g, table(&generation));
        }
        assert_eq!(names.kept(), NAMED_GENERATIONS - 1);
        assert_eq!(names.name(20, 10), Some("ns/edited-20"));
        assert_eq!(names.name(19, 10), Some("ns/edited-19"));
        assert_eq!(names.name(6, 10), Some("ns/edited-6"));
        assert_eq!(names.name(6, 9_999 + 10), Some("ns/rule-9999"));
    }
}
