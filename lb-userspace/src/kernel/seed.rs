//! The flow hash's secret (`--hash-seed-file`): 64 bits every node of a
//! cluster shares, so they choose the same backend for a tuple, and nobody
//! outside can choose tuples that all land on one backend or one masquerade
//! port. Read from a file (in Kubernetes, a mounted Secret); a missing file
//! is created with a fresh random secret, mode 0600.

use std::io::{self, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use crate::kernel::sys;

/// Hex digits a seed file must start with (64 bits).
const SEED_HEX_DIGITS: usize = 16;

/// Where the secret in use came from, for the log.
#[derive(Debug, PartialEq, Eq)]
pub enum SeedOrigin {
    /// Read from the file.
    Read(PathBuf),
    /// The file did not exist and was created.
    Created(PathBuf),
    /// Random for this run only: no file was named, or it could not be
    /// written (`why`).
    Random { why: String },
}

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("cannot read the hash seed file {path}")]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path}: the hash seed must start with {SEED_HEX_DIGITS} hex digits (64 bits); write one with `openssl rand -hex 16 > {path}` and use the same file on every node"
    )]
    Malformed { path: String },
    #[error("cannot get random bytes from the kernel for the hash seed")]
    Random {
        #[source]
        source: io::Error,
    },
}

/// The secret from `path` (created if missing), or a random one when no
/// file is named.
pub fn load(path: Option<&Path>) -> Result<(u64, SeedOrigin), SeedError> {
    let Some(path) = path else {
        let why = "no --hash-seed-file".to_owned();
        return Ok((random_seed()?, SeedOrigin::Random { why }));
    };
    match std::fs::read_to_string(path) {
        Ok(text) => return Ok((parse(path, &text)?, SeedOrigin::Read(path.to_owned()))),
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(SeedError::Read {
                path: path.display().to_string(),
                source,
            });
        }
    }
    let mut bytes = [0u8; 16];
    sys::getrandom(&mut bytes).map_err(|source| SeedError::Random { source })?;
    let text: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
    let seed = parse(path, &text)?;
    let created = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut file| file.write_all(format!("{text}\n").as_bytes()));
    match created {
        Ok(()) => Ok((seed, SeedOrigin::Created(path.to_owned()))),
        // Another agent on this host created it first: use theirs.
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {
            let text = std::fs::read_to_string(path).map_err(|source| SeedError::Read {
                path: path.display().to_string(),
                source,
            })?;
            Ok((parse(path, &text)?, SeedOrigin::Read(path.to_owned())))
        }
        Err(error) => Ok((
            seed,
            SeedOrigin::Random {
                why: format!("cannot create {}: {error}", path.display()),
            },
        )),
    }
}

/// The first 16 hex digits of `text` (after leading white space).
fn parse(path: &Path, text: &str) -> Result<u64, SeedError> {
    let malformed = || SeedError::Malformed {
        path: path.display().to_string(),
    };
    let digits = text
        .trim_start()
        .get(..SEED_HEX_DIGITS)
        .ok_or_else(malformed)?;
    u64::from_str_radix(digits, 16).map_err(|_| malformed())
}

fn random_seed() -> Result<u64, SeedError> {
    let mut bytes = [0u8; 8];
    sys::getrandom(&mut bytes).map_err(|source| SeedError::Random { source })?;
    Ok(u64::from_ne_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xlb-seed-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    #[test]
    fn a_missing_file_is_created_private_and_then_reused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = scratch("create");
        let path = dir.join("seed");
        let first = load(Some(&path)).map_err(|e| e.to_string());
        let Ok((seed, SeedOrigin::Created(_))) = first else {
            panic!("{first:?}");
        };
        let mode = std::fs::metadata(&path)
            .expect("created")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = load(Some(&path)).map_err(|e| e.to_string());
        assert_eq!(again, Ok((seed, SeedOrigin::Read(path.clone()))));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn nodes_with_the_same_file_get_the_same_secret() {
        let dir = scratch("same");
        let path = dir.join("seed");
        std::fs::write(&path, "0123456789abcdef0011223344556677\n").expect("write");
        let read = load(Some(&path)).map_err(|e| e.to_string());
        assert_eq!(
            read,
            Ok((0x0123_4567_89ab_cdef, SeedOrigin::Read(path.clone())))
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_short_or_non_hex_seed_is_refused_with_the_fix() {
        let dir = scratch("bad");
        let path = dir.join("seed");
        for bad in ["", "0123", "not hex at all, sorry"] {
            std::fs::write(&path, bad).expect("write");
            let error = load(Some(&path)).map(|_| ()).map_err(|e| e.to_string());
            let Err(message) = error else {
                panic!("{bad:?} accepted")
            };
            assert!(message.contains("openssl rand -hex 16"), "{message}");
            assert!(message.contains(&path.display().to_string()), "{message}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn without_a_file_the_secret_is_random() {
        let (a, origin) = load(None).expect("random");
        let (b, _) = load(None).expect("random");
        assert!(matches!(origin, SeedOrigin::Random { .. }));
        assert_ne!(a, b);
    }
}
