//! Where each field of a YAML document is: field path (`services[1].nodePort`)
//! to line and column, so semantic errors can point at the text that caused
//! them. serde_yaml locates only syntax and type errors.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// A position in the config text, 1-based.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

/// Field path -> position of its value (or of its key, when the value is
/// empty). Paths use serde_yaml's spelling: `a.b[2].c`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Locations {
    values: HashMap<String, Position>,
    /// Where the first alias (`*name`) is, if the text has one.
    first_alias: Option<Position>,
}

/// What the config readers say about a YAML alias: aliases are refused
/// before serde_yaml sees the text, because each one copies its anchored
/// node again and a few hundred lines of them expand to gigabytes.
pub const ALIAS_MESSAGE: &str =
    "YAML aliases (*name) are not accepted: each one copies its anchored node again";
pub const ALIAS_FIX: &str =
    "write the value out in full where the alias stands (generate the file if it is repetitive)";

impl Locations {
    /// Indexes `text`. A document this parser rejects yields an empty index
    /// (serde_yaml reports the syntax error itself).
    pub fn index(text: &str) -> Self {
        Self::index_skipping(text, None)
    }

    /// [`Locations::index`] without what is inside the top-level field
    /// `skip` (its own position is kept): a big config is mostly its
    /// services, and indexing every one of their fields costs more than
    /// reading the file. Aliases are found everywhere.
    pub fn index_skipping(text: &str, skip: Option<&str>) -> Self {
        let mut indexer = Indexer {
            skip: skip.map(str::to_owned),
            ..Indexer::default()
        };
        let mut parser = Parser::new_from_str(text);
        if parser.load(&mut indexer, false).is_err() {
            return Self::default();
        }
        Self {
            values: indexer.values,
            first_alias: indexer.first_alias,
        }
    }

    /// Where the text's first alias (`*name`) is, if it has one. Found in
    /// one pass over the events, without expanding anything.
    pub fn first_alias(&self) -> Option<Position> {
        self.first_alias
    }

    /// Keeps only the positions of fields for which `keep` is true (a
    /// validated config keeps those later findings may point at).
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.values.retain(|path, _| keep(path));
        self.values.shrink_to_fit();
    }

    /// Position of `path`, or of its nearest ancestor that is in the text
    /// (a defaulted field points at the object that lacks it).
    pub fn find(&self, path: &str) -> Position {
        let mut path = path;
        loop {
            if let Some(position) = self.values.get(path) {
                return *position;
            }
            match parent(path) {
                Some(up) => path = up,
                None => return Position { line: 1, column: 1 },
            }
        }
    }

    /// Whether `path` is written in the document.
    pub fn contains(&self, path: &str) -> bool {
        self.values.contains_key(path)
    }
}

/// `a.b[2].c` -> `a.b[2]` -> `a.b` -> `a` -> `` -> None.
fn parent(path: &str) -> Option<&str> {
    if path.is_empty() {
        return None;
    }
    let cut = path.rfind(['.', '[']).unwrap_or(0);
    Some(&path[..cut])
}

enum Frame {
    Map {
        path: String,
        /// The key whose value comes next; `None` while a key is expected.
        key: Option<String>,
    },
    Seq {
        path: String,
        next_index: usize,
    },
}

#[derive(Default)]
struct Indexer {
    stack: Vec<Frame>,
    values: HashMap<String, Position>,
    /// Key positions, used for values that have no text of their own.
    keys: HashMap<String, Position>,
    first_alias: Option<Position>,
    /// Top-level field whose contents are not indexed.
    skip: Option<String>,
    /// Collections open inside the skipped field (0: not inside it).
    skipping: usize,
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

impl Indexer {
    /// If the next node is a mapping key, records it and returns `None`;
    /// otherwise returns the path the node (a value) lives at.
    fn place(&mut self, event: &Event, position: Position) -> Option<String> {
        match self.stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Seq { path, next_index }) => {
                let child = format!("{path}[{next_index}]");
                *next_index += 1;
                Some(child)
            }
            Some(Frame::Map { path, key }) => match key.take() {
                Some(key) => Some(join(path, &key)),
                None => {
                    let name = match event {
                        Event::Scalar(text, ..) => text.clone(),
                        _ => String::from("?"),
                    };
                    // A block mapping's start event is marked at its first
                    // key's ':'; the key itself is where a reader looks.
                    if let Some(start) = self.values.get_mut(path.as_str())
                        && (position.line, position.column) < (start.line, start.column)
                    {
                        *start = position;
                    }
                    self.keys.insert(join(path, &name), position);
                    *key = Some(name);
                    None
                }
            },
        }
    }

    fn record(&mut self, path: String, position: Position, empty: bool) {
        let position = match (empty, self.keys.get(&path)) {
            (true, Some(key)) => *key,
            _ => position,
        };
        self.values.insert(path, position);
    }
}

impl MarkedEventReceiver for Indexer {
    fn on_event(&mut self, event: Event, mark: Marker) {
        let position = Position {
            line: mark.line(),
            column: mark.col() + 1,
        };
        if matches!(event, Event::Alias(..)) && self.first_alias.is_none() {
            self.first_alias = Some(position);
        }
        if self.skipping > 0 {
            match &event {
                Event::MappingStart(..) | Event::SequenceStart(..) => self.skipping += 1,
                Event::MappingEnd | Event::SequenceEnd => {
                    self.skipping -= 1;
                    if self.skipping == 0 {
                        // The skipped field's own collection ends.
                        self.stack.pop();
                    }
                }
                _ => {}
            }
            return;
        }
        match &event {
            Event::Scalar(..) | Event::Alias(..) => {
                if let Some(path) = self.place(&event, position) {
                    let empty = matches!(&event, Event::Scalar(text, ..) if text.is_empty());
                    self.record(path, position, empty);
                }
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                // A collection used as a mapping key is not something a config
                // has; give it a placeholder name and index inside it anyway.
                let path = match self.place(&event, position) {
                    Some(path) => path,
                    None => match self.stack.last_mut() {
                        Some(Frame::Map { path, key }) => {
                            let inner = join(path, "?");
                            *key = None;
                            inner
                        }
                        _ => String::from("?"),
                    },
                };
                self.record(path.clone(), position, false);
                if self.stack.len() == 1 && self.skip.as_deref() == Some(path.as_str()) {
                    self.skipping = 1;
                }
                self.stack.push(match event {
                    Event::MappingStart(..) => Frame::Map { path, key: None },
                    _ => Frame::Seq {
                        path,
                        next_index: 0,
                    },
                });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "\
node:
  interfaces: [a, b]
services:
  - name: one
    nodePort: 30000
    backends:
      - address: 10.0.0.1
      - address: 10.0.0.2
        port: 80
  - name: two
    backends: []
    empty:
";

    fn at(line: usize, column: usize) -> Position {
        Position { line, column }
    }

    #[test]
    fn finds_nested_list_fields() {
        let locations = Locations::index(DOC);
        assert_eq!(locations.find("node.interfaces[1]"), at(2, 19));
        assert_eq!(locations.find("services[0].nodePort"), at(5, 15));
        assert_eq!(locations.find("services[0].backends[1].address"), at(8, 18));
        assert_eq!(locations.find("services[0].backends[1].port"), at(9, 15));
        assert_eq!(locations.find("services[1].name"), at(10, 11));
    }

    #[test]
    fn missing_field_points_at_its_parent() {
        let locations = Locations::index(DOC);
        assert_eq!(
            locations.find("services[0].backends[0].weight"),
            locations.find("services[0].backends[0]")
        );
        assert_eq!(locations.find("services[0].backends[0]"), at(7, 9));
        assert_eq!(locations.find("nowhere.at.all"), at(1, 1));
    }

    #[test]
    fn empty_value_points_at_its_key() {
        let locations = Locations::index(DOC);
        assert_eq!(locations.find("services[1].empty"), at(12, 5));
    }

    #[test]
    fn aliases_are_found_without_expanding_them() {
        assert_eq!(Locations::index(DOC).first_alias(), None);
        let anchored = "a: &x [1, 2]\nb: 3\nc: *x\n";
        assert_eq!(Locations::index(anchored).first_alias(), Some(at(3, 4)));
        // The classic bomb: nine levels of ten aliases each is 10^9 nodes
        // when expanded; the index reads it as the few hundred events it is.
        let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for level in 1..10 {
            let previous = format!("*a{}", level - 1);
            let list = [previous.as_str(); 10].join(", ");
            bomb.push_str(&format!("a{level}: &a{level} [{list}]\n"));
        }
        let started = std::time::Instant::now();
        assert_eq!(Locations::index(&bomb).first_alias(), Some(at(2, 10)));
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }

    /// Skipping a field's contents changes no other position.
    #[test]
    fn skipping_keeps_everything_else() {
        let doc = format!("{DOC}after:\n  key: [1, {{a: b}}]\n");
        let full = Locations::index(&doc);
        let mut skipped = Locations::index_skipping(&doc, Some("services"));
        assert!(!skipped.contains("services[0].nodePort"));
        assert_eq!(skipped.find("services"), full.find("services"));
        let mut outside = full.clone();
        outside.retain(|path| !path.starts_with("services[") && !path.starts_with("services."));
        skipped.retain(|_| true);
        assert_eq!(skipped, outside);
        assert_eq!(skipped.find("after.key[1].a"), full.find("after.key[1].a"));
        let aliased = "services:\n  - &x {a: 1}\n  - *x\n";
        assert_eq!(
            Locations::index_skipping(aliased, Some("services")).first_alias(),
            Some(at(3, 5))
        );
    }

    #[test]
    fn parent_paths() {
        assert_eq!(parent("a.b[2].c"), Some("a.b[2]"));
        assert_eq!(parent("a.b[2]"), Some("a.b"));
        assert_eq!(parent("a"), Some(""));
        assert_eq!(parent(""), None);
    }
}
