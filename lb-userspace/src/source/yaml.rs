//! The YAML config file -> `DesiredState`, with every error located
//! (`file:line:column: field.path: problem; fix`).
//!
//! Two passes: serde-saphyr (streaming; serde_yaml for what it declines,
//! see `streamed`) deserializes into the permissive shapes of `raw` (wide
//! integers, strings for addresses), serde_yaml locating syntax, type and
//! unknown-field errors; then `build` assembles the state, asking `check`
//! for each value (which locates its findings with the field-path index
//! from `locate`) and the model for what belongs to which service.

use std::cell::OnceCell;
use std::ops::RangeInclusive;
use std::path::Path;

use super::locate::{Locations, Position};
pub use super::problem::Problem;
use super::problem::{SYNTAX_FIX, display_problems, error_position};
use crate::model::DesiredState;
use build::Builder;
use check::{Checker, Located};
use raw::RawConfig;

mod build;
mod check;
mod raw;

const EXAMPLE: &str = "config/example.yaml";
/// The top-level field with the services.
const SERVICES: &str = "services";

/// Why a config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{origin}: cannot read the config: {source}; check the path given to --config")]
    Read {
        origin: String,
        #[source]
        source: std::io::Error,
    },
    /// A command-line value that does not fit this node.
    #[error("{flag} {value}: {message}; {fix}")]
    Flag {
        flag: &'static str,
        value: String,
        message: String,
        fix: String,
    },
    /// Every problem found, in document order (one per line when displayed).
    #[error("{}", display_problems(problems))]
    Invalid { problems: Vec<Problem> },
}

/// Settings that come from the command line rather than the file.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--iface`: replaces `node.interfaces` when not empty.
    pub interfaces: Vec<String>,
}

/// A validated config, with what is needed to locate later findings
/// (interfaces missing on this node, ...) in the same file.
#[derive(Clone, Debug)]
pub struct LoadedConfig {
    pub state: DesiredState,
    /// Non-fatal findings, already formatted and located.
    pub warnings: Vec<Problem>,
    origin: String,
    locations: Locations,
    /// Field path of each entry of `state.interfaces` in the file, if it came
    /// from the file rather than `--iface`.
    interface_fields: Vec<Option<String>>,
}

impl LoadedConfig {
    /// A finding about `field`, located in this config's file.
    pub fn problem(&self, field: &str, message: String, fix: String) -> Problem {
        Problem::located(&self.origin, &self.locations, field, message, fix)
    }

    /// Field path that named `state.interfaces[index]`, or `--iface`.
    pub fn interface_field(&self, index: usize) -> String {
        self.interface_fields
            .get(index)
            .cloned()
            .flatten()
            .unwrap_or_else(|| String::from("--iface"))
    }

    /// Field path of `state.node_addresses[index]`.
    pub fn node_address_field(index: usize) -> String {
        format!("node.addresses[{index}]")
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }
}

/// Reads and validates the config at `path`.
pub fn load(path: &Path, overrides: &Overrides) -> Result<LoadedConfig, ConfigError> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        origin: origin.clone(),
        source,
    })?;
    parse(&origin, &text, overrides)
}

/// Validates config `text`; `origin` names it in messages.
pub fn parse(origin: &str, text: &str, overrides: &Overrides) -> Result<LoadedConfig, ConfigError> {
    if !has_content(text) {
        return Err(ConfigError::Invalid {
            problems: vec![Problem::new(
                origin,
                Position { line: 1, column: 1 },
                "",
                "the config is empty",
                format!("describe the node and its services; start from {EXAMPLE}"),
            )],
        });
    }
    // The position index (which also finds aliases) and the streaming
    // read are two passes over the whole text, about as long each: on
    // two threads. The streaming read refuses aliases itself, so a
    // document of them costs it nothing either.
    let (mut locations, streamed) = std::thread::scope(|scope| {
        let indexing = scope.spawn(|| Locations::index_skipping(text, Some(SERVICES)));
        let streamed = streamed(text);
        match indexing.join() {
            Ok(locations) => (locations, streamed),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    });
    if let Some(position) = locations.first_alias() {
        return Err(ConfigError::Invalid {
            problems: vec![Problem::alias(origin, position)],
        });
    }
    let raw = match streamed {
        Some(raw) => raw,
        None => read_classic(origin, text)?,
    };
    let located = Located {
        text,
        outside: &locations,
        services: OnceCell::new(),
    };
    let mut builder = Builder::new(Checker {
        origin,
        locations: &located,
        problems: Vec::new(),
        warnings: Vec::new(),
    });
    let (state, interface_fields) = builder.config(raw, overrides);
    let Checker {
        problems, warnings, ..
    } = builder.check;
    match state {
        Some(state) if problems.is_empty() => Ok(LoadedConfig {
            locations: {
                // Later findings are about the node's settings; the services'
                // positions (most of a big file) are not kept.
                locations.retain(|path| !path.starts_with(SERVICES));
                locations
            },
            state,
            warnings,
            origin: origin.to_owned(),
            interface_fields,
        }),
        _ => Err(ConfigError::Invalid { problems }),
    }
}

/// The config as written, read by serde_yaml where serde-saphyr declined
/// it (see [`streamed`]).
fn read_classic(origin: &str, text: &str) -> Result<RawConfig, ConfigError> {
    serde_yaml::from_str(text).map_err(|error| ConfigError::Invalid {
        problems: vec![serde_problem(origin, &error)],
    })
}

/// The config as written, if serde-saphyr accepts it. It streams the text
/// (serde_yaml holds every event of the document first: 100 MB for the
/// 5 MB of 10,000 services), told to be at least as strict as serde_yaml:
/// no unquoted number or boolean where a string belongs, only
/// `true`/`false` for booleans, no duplicate keys, no alias (the position
/// index reports those). Whatever it does not accept, serde_yaml reads as
/// before ([`read_classic`]), so a config's errors keep their wording and
/// positions, and what serde_yaml accepts is never refused.
fn streamed(text: &str) -> Option<RawConfig> {
    let mut options = serde_saphyr::Options::default();
    options.no_schema = true;
    options.strict_booleans = true;
    options.duplicate_keys = serde_saphyr::DuplicateKeyPolicy::Error;
    // Its default budget stops at 250,000 nodes (a quarter of 10,000
    // services); the depth limit stays, and the first alias stops it (it
    // reads while the index looks for aliases, so it must not expand any).
    let mut budget = serde_saphyr::Budget::default();
    budget.max_events = usize::MAX;
    budget.max_nodes = usize::MAX;
    budget.max_aliases = 0;
    options.budget = Some(budget);
    serde_saphyr::from_str_with_options(text, options).ok()
}

/// Whether `text` has anything but blank lines, comments and `---`.
fn has_content(text: &str) -> bool {
    text.lines().any(|line| {
        let line = line.trim();
        !(line.is_empty() || line.starts_with('#') || line == "---" || line == "...")
    })
}

/// A serde_yaml error as a `Problem`: its path, its message without the
/// position (which moves into the prefix), and a fix chosen by its kind.
fn serde_problem(origin: &str, error: &serde_yaml::Error) -> Problem {
    let position = error_position(error);
    let Position { line, column } = position;
    let mut message = error.to_string();
    let suffix = format!(" at line {line} column {column}");
    if let Some(at) = message.find(&suffix) {
        message.replace_range(at..at + suffix.len(), "");
    }
    let mut field = String::new();
    if let Some((head, rest)) = message.split_once(": ") {
        let is_path = !head.is_empty()
            && head
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '[' | ']' | '_' | '-'));
        if is_path {
            field = head.to_owned();
            message = rest.to_owned();
        }
    }
    let fix = if message.contains("is not a number") {
        String::from("write a plain number (named ports are not supported)")
    } else if message.starts_with("unknown field") {
        format!("remove it or correct its spelling; keys are camelCase as in {EXAMPLE}")
    } else if message.starts_with("missing field") {
        format!("add it (see {EXAMPLE})")
    } else if message.starts_with("duplicate field") {
        String::from("keep only one of them")
    } else if message.starts_with("invalid type") || message.starts_with("invalid value") {
        format!("write the value as {EXAMPLE} does")
    } else {
        String::from(SYNTAX_FIX)
    };
    Problem::new(origin, position, field, message, fix)
}

/// A warning when the masquerade port range overlaps the kernel's ephemeral
/// port range (`net.ipv4.ip_local_port_range`): a local socket and a
/// masqueraded flow could then pick the same source port.
pub fn ephemeral_overlap(
    config: &LoadedConfig,
    ephemeral: &RangeInclusive<u16>,
) -> Option<Problem> {
    let ports = &config.state.masquerade_ports;
    if ports.end() < ephemeral.start() || ephemeral.end() < ports.start() {
        return None;
    }
    let field = "masquerade.portRange";
    let default = if config.locations.contains(field) {
        ""
    } else {
        " (the default)"
    };
    Some(config.problem(
        field,
        format!(
            "{}-{}{default} overlaps the kernel's ephemeral ports {}-{} (net.ipv4.ip_local_port_range)",
            ports.start(),
            ports.end(),
            ephemeral.start(),
            ephemeral.end()
        ),
        String::from(
            "move one of them so they do not overlap, e.g. sysctl net.ipv4.ip_local_port_range=\"32768 60999\"",
        ),
    ))
}

#[cfg(test)]
mod tests;
