//! The config file as a source the agent follows: read and parsed whole
//! (`source::yaml`), re-read on SIGHUP or when its content changed and has
//! stayed the same for one poll, so a half-written file is not loaded.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use log::info;

use super::yaml::{self, ConfigError, LoadedConfig, Overrides};

/// How often the config file is checked for changes.
pub const POLL: Duration = Duration::from_secs(1);

/// The config file and what the agent last saw of it.
#[derive(Debug)]
pub struct ConfigFile {
    path: PathBuf,
    overrides: Overrides,
    /// (mtime, length) at the last read.
    stamp: Option<(SystemTime, u64)>,
    /// Content last acted on (applied or rejected).
    handled: Option<Digest>,
    /// Content seen once that differs from `handled`; acted on when the
    /// next poll sees it unchanged, so a half-written file is not loaded.
    candidate: Option<Digest>,
}

/// What the agent keeps of a content it saw: its length and a 128-bit
/// hash, not the text (a config of 10,000 services is 5 MB, held for
/// nothing but this comparison).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Digest {
    len: usize,
    hash: [u64; 2],
}

impl Digest {
    fn of(text: &str) -> Self {
        use std::hash::{DefaultHasher, Hash as _, Hasher as _};
        // Two SipHash runs told apart by a leading byte make 128 bits.
        let hash = [0u8, 1].map(|salt| {
            let mut hasher = DefaultHasher::new();
            salt.hash(&mut hasher);
            text.hash(&mut hasher);
            hasher.finish()
        });
        Self {
            len: text.len(),
            hash,
        }
    }
}

impl ConfigFile {
    /// Reads and parses the file the agent starts with.
    pub fn open(path: &Path, overrides: Overrides) -> Result<(Self, LoadedConfig), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            origin: path.display().to_string(),
            source,
        })?;
        let mut file = Self {
            path: path.to_owned(),
            overrides,
            stamp: None,
            handled: None,
            candidate: None,
        };
        let config = file.parse(&text)?;
        file.stamp = file.stamp();
        file.handled = Some(Digest::of(&text));
        Ok((file, config))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `--iface` override every parse applies.
    pub fn overrides(&self) -> &Overrides {
        &self.overrides
    }

    /// `text` as a config from this file.
    pub fn parse(&self, text: &str) -> Result<LoadedConfig, ConfigError> {
        yaml::parse(&self.path.display().to_string(), text, &self.overrides)
    }

    fn stamp(&self) -> Option<(SystemTime, u64)> {
        let metadata = std::fs::metadata(&self.path).ok()?;
        Some((metadata.modified().ok()?, metadata.len()))
    }

    /// The file's content when it is to be loaded again: always on SIGHUP
    /// (`forced`), otherwise when it changed and has stayed the same for one
    /// poll. An error when it cannot be read (reported once, until it can
    /// be read again).
    pub fn poll(&mut self, forced: bool) -> Option<Result<String, ConfigError>> {
        let origin = self.path.display().to_string();
        let stamp = self.stamp();
        if !forced && stamp == self.stamp && self.candidate.is_none() {
            return None;
        }
        self.stamp = stamp;
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(source) => {
                let report = forced || self.handled.is_some();
                self.handled = None;
                self.candidate = None;
                return report.then_some(Err(ConfigError::Read { origin, source }));
            }
        };
        let digest = Digest::of(&text);
        if !forced {
            if self.handled == Some(digest) {
                self.candidate = None;
                return None;
            }
            if self.candidate != Some(digest) {
                // Act when the next poll sees the same content.
                self.candidate = Some(digest);
                return None;
            }
            info!("{origin} changed: reloading");
        }
        self.candidate = None;
        self.handled = Some(digest);
        Some(Ok(text))
    }
}
