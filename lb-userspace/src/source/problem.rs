//! A located finding in a config file or a manifest stream, as a person
//! reads it: `file:line:column: [document N (Kind ns/name): ]field.path:
//! problem; fix`. The YAML config and the manifests report with this one type.

use std::fmt;

use super::locate::{Locations, Position};

/// What the readers say about a YAML syntax error serde_yaml reports.
pub const SYNTAX_FIX: &str = "fix the YAML syntax (indentation, a missing ':' or space after it, an unclosed quote or bracket)";

/// One located finding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// How the file was named to xlb (e.g. `config/demo.yaml`), or `<stdin>`.
    pub origin: String,
    pub line: usize,
    pub column: usize,
    /// In a stream of documents (manifests): which one, 1-based among the
    /// non-empty documents.
    pub document: Option<usize>,
    /// In a stream of documents: `Service default/web`, when the document
    /// got that far.
    pub object: Option<String>,
    /// Field path, e.g. `services[1].backends[0].address`; empty for
    /// document-level problems.
    pub field: String,
    pub message: String,
    /// What to do about it.
    pub fix: String,
}

impl Problem {
    /// A finding at `position` of `origin`, about `field`.
    pub fn new(
        origin: &str,
        Position { line, column }: Position,
        field: impl Into<String>,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            origin: origin.to_owned(),
            line,
            column,
            document: None,
            object: None,
            field: field.into(),
            message: message.into(),
            fix: fix.into(),
        }
    }

    /// A finding about `field`, located with `locations`.
    pub fn located(
        origin: &str,
        locations: &Locations,
        field: &str,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self::new(origin, locations.find(field), field, message, fix)
    }

    /// A YAML alias at `position` (aliases are refused before serde_yaml
    /// sees the text: see `locate::ALIAS_MESSAGE`).
    pub fn alias(origin: &str, position: Position) -> Self {
        Self::new(
            origin,
            position,
            "",
            super::locate::ALIAS_MESSAGE,
            super::locate::ALIAS_FIX,
        )
    }
}

/// Where serde_yaml says `error` is (1:1 when it does not say).
pub fn error_position(error: &serde_yaml::Error) -> Position {
    error
        .location()
        .map_or(Position { line: 1, column: 1 }, |location| Position {
            line: location.line(),
            column: location.column(),
        })
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.origin, self.line, self.column)?;
        if let Some(document) = self.document {
            write!(f, "document {document}")?;
            if let Some(object) = &self.object {
                write!(f, " ({object})")?;
            }
            f.write_str(": ")?;
        }
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)?;
        if !self.fix.is_empty() {
            write!(f, "; {}", self.fix)?;
        }
        Ok(())
    }
}

/// Every problem, one per line (for the errors' `Display`).
pub fn display_problems(problems: &[Problem]) -> String {
    let lines: Vec<String> = problems.iter().map(Problem::to_string).collect();
    lines.join("\n")
}
