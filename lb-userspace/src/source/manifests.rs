//! Kubernetes manifests (Service and EndpointSlice YAML or JSON, one file,
//! a directory, or a multi-document stream such as `kubectl kustomize`
//! output) -> `ClusterSnapshot`, so GitOps output can drive a node without a
//! cluster (`xlb run --manifests PATH|-`). The translation to a
//! `DesiredState` is the Kubernetes source's (`super::kube`).
//!
//! Every error is located: `file:line:column: document N (Kind ns/name):
//! field.path: problem; fix`. Other kinds (Deployments, ConfigMaps, ...) are
//! skipped, so a whole application's output can be piped in. Unknown fields
//! are errors, as with `kubectl apply`'s strict validation: a misspelt
//! `nodeport` must not silently become "no NodePort".

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use super::cluster::ClusterSnapshot;
use super::locate::Position;
use super::problem::{Problem, display_problems};
use stream::Checker;

mod objects;
mod stream;

/// Names manifests read from standard input in messages.
pub const STDIN_ORIGIN: &str = "<stdin>";
/// File name endings read from a directory.
pub const EXTENSIONS: [&str; 3] = ["yaml", "yml", "json"];

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{origin}: cannot read the manifests: {source}; check the path given to --manifests")]
    Read {
        origin: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{origin}: no manifest files (*.yaml, *.yml, *.json) in this directory; check the path \
         given to --manifests"
    )]
    EmptyDirectory { origin: String },
    /// Every problem found (one per line when displayed).
    #[error("{}", display_problems(problems))]
    Invalid { problems: Vec<Problem> },
}

/// Loaded manifests: the objects xlb uses, and findings that do not stop it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Manifests {
    pub snapshot: ClusterSnapshot,
    pub warnings: Vec<Problem>,
    /// Objects of other kinds, by `apiVersion/kind`, and how many.
    pub skipped: BTreeMap<String, usize>,
}

/// The manifest files at `path`: the file itself, or a directory's `*.yaml`,
/// `*.yml` and `*.json` files (not recursive), sorted by name.
pub fn files(path: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    let read_failed = |source| ManifestError::Read {
        origin: path.display().to_string(),
        source,
    };
    let metadata = std::fs::metadata(path).map_err(read_failed)?;
    if !metadata.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(read_failed)? {
        let entry = entry.map_err(read_failed)?;
        let file = entry.path();
        let wanted = file
            .extension()
            .and_then(|extension| extension.to_str())
            .is_some_and(|extension| EXTENSIONS.contains(&extension));
        if wanted && file.is_file() {
            files.push(file);
        }
    }
    if files.is_empty() {
        return Err(ManifestError::EmptyDirectory {
            origin: path.display().to_string(),
        });
    }
    files.sort();
    Ok(files)
}

/// Reads and checks the manifests at `path` (a file or a directory).
pub fn load(path: &Path) -> Result<Manifests, ManifestError> {
    let mut texts = Vec::new();
    for file in files(path)? {
        let origin = file.display().to_string();
        let text = std::fs::read_to_string(&file).map_err(|source| ManifestError::Read {
            origin: origin.clone(),
            source,
        })?;
        texts.push((origin, text));
    }
    parse_all(&texts)
}

/// Reads and checks a manifest stream from standard input, to its end.
pub fn read_stdin() -> Result<Manifests, ManifestError> {
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .map_err(|source| ManifestError::Read {
            origin: STDIN_ORIGIN.to_owned(),
            source,
        })?;
    parse_all(&[(STDIN_ORIGIN.to_owned(), text)])
}

/// Checks one manifest text; `origin` names it in messages.
pub fn parse(origin: &str, text: &str) -> Result<Manifests, ManifestError> {
    parse_all(&[(origin.to_owned(), text.to_owned())])
}

/// Checks several manifest texts as one set of objects: `(origin, text)`.
pub fn parse_all(texts: &[(String, String)]) -> Result<Manifests, ManifestError> {
    let mut checker = Checker::default();
    for (origin, text) in texts {
        for document in split_documents(text) {
            checker.document(origin, &document);
        }
    }
    checker.cross_check();
    if checker.problems.is_empty() {
        Ok(Manifests {
            snapshot: checker.snapshot,
            warnings: checker.warnings,
            skipped: checker.skipped,
        })
    } else {
        Err(ManifestError::Invalid {
            problems: checker.problems,
        })
    }
}

/// One YAML document of a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Document {
    /// 1-based among non-empty documents.
    index: usize,
    /// Line of the document's first line in the file, minus one.
    line_offset: usize,
    text: String,
}

impl Document {
    /// `problem`, found in this document's own text, placed in the stream.
    fn place(&self, problem: Problem) -> Problem {
        Problem {
            document: Some(self.index),
            line: problem.line + self.line_offset,
            ..problem
        }
    }

    /// A finding at `position` of this document's text.
    fn problem(
        &self,
        origin: &str,
        position: Position,
        field: impl Into<String>,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> Problem {
        self.place(Problem::new(origin, position, field, message, fix))
    }
}

/// Splits a stream at `---` and `...` lines. The marker is blanked rather
/// than removed, so that columns on its line stay true (`--- {a: 1}`).
/// Documents of only blanks and comments are dropped.
fn split_documents(text: &str) -> Vec<Document> {
    let mut documents = Vec::new();
    let mut current = String::new();
    let mut start = 0;
    let finish = |current: &mut String, start: usize, documents: &mut Vec<Document>| {
        let has_content = current.lines().any(|line| {
            let line = line.trim();
            !line.is_empty() && !line.starts_with('#')
        });
        if has_content {
            documents.push(Document {
                index: documents.len() + 1,
                line_offset: start,
                text: std::mem::take(current),
            });
        }
        current.clear();
    };
    for (number, line) in text.lines().enumerate() {
        let marker = ["---", "..."].into_iter().find(|marker| {
            line.strip_prefix(marker)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
        });
        match marker {
            Some(marker) => {
                finish(&mut current, start, &mut documents);
                start = number;
                let rest = &line[marker.len()..];
                current.push_str(&" ".repeat(marker.len()));
                current.push_str(rest);
                current.push('\n');
            }
            None => {
                current.push_str(line);
                current.push('\n');
            }
        }
    }
    finish(&mut current, start, &mut documents);
    documents
}
