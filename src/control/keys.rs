//! The server's long-lived keys: load from files, or generate on first start (mode 0600).
//!
//! Key files hold `privkey:<64 hex>` (headscale's format), so a headscale noise key file can
//! be reused. Every member of a cluster must use the same Noise key: clients pin it.

use std::path::{Path, PathBuf};

use sha2::Digest;

use crate::registry::MachineKey;

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("reading key file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing key file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "key file {path} does not hold a 32-byte key (expected `{prefix}` and 64 hex characters)"
    )]
    Malformed { path: PathBuf, prefix: &'static str },
    #[error(
        "config {key}: {path} does not exist; every member of a multi-member cluster must be given the same key file (create one with `hsd cluster init-keys --dir DIR` and copy it to every member)"
    )]
    Missing { key: &'static str, path: PathBuf },
}

/// Loads a key that must already exist (a key every member of a cluster shares).
pub fn load_existing(
    path: &Path,
    prefix: &'static str,
    key: &'static str,
) -> Result<[u8; 32], KeyFileError> {
    if !path.exists() {
        return Err(KeyFileError::Missing {
            key,
            path: path.into(),
        });
    }
    load_or_generate(path, prefix)
}

/// Loads a 32-byte secret written as `<prefix><64 hex>`, or creates one if the file does
/// not exist.
pub fn load_or_generate(path: &Path, prefix: &'static str) -> Result<[u8; 32], KeyFileError> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let hex_part = text.trim().strip_prefix(prefix).unwrap_or(text.trim());
            let mut key = [0u8; 32];
            hex::decode_to_slice(hex_part, &mut key).map_err(|_| KeyFileError::Malformed {
                path: path.into(),
                prefix,
            })?;
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key: [u8; 32] = rand::random();
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|source| KeyFileError::Write {
                    path: path.into(),
                    source,
                })?;
            }
            crate::util::write_private_file(
                path,
                format!("{prefix}{}\n", hex::encode(key)).as_bytes(),
            )
            .map_err(|source| KeyFileError::Write {
                path: path.into(),
                source,
            })?;
            Ok(key)
        }
        Err(source) => Err(KeyFileError::Read {
            path: path.into(),
            source,
        }),
    }
}

pub fn public_key(private: &[u8; 32]) -> [u8; 32] {
    x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(*private)).to_bytes()
}

/// The control server's Noise keys.
pub struct ServerKeys {
    noise_private: [u8; 32],
    pub noise_public: MachineKey,
    /// Sent as `legacyPublicKey` from `/key`. Clients refetch `/key` on every login while
    /// it is zero, so send a stable non-zero key derived from the Noise key (the same on
    /// every member).
    pub legacy_public: MachineKey,
}

impl ServerKeys {
    pub fn new(noise_private: [u8; 32]) -> Self {
        let legacy_private: [u8; 32] = sha2::Sha256::new()
            .chain_update(b"hsd legacy control key")
            .chain_update(noise_private)
            .finalize()
            .into();
        ServerKeys {
            noise_private,
            noise_public: MachineKey(public_key(&noise_private)),
            legacy_public: MachineKey(public_key(&legacy_private)),
        }
    }

    pub fn noise_private(&self) -> &[u8; 32] {
        &self.noise_private
    }
}

impl std::fmt::Debug for ServerKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerKeys")
            .field("noise_public", &self.noise_public)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_key_is_reloaded_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        let a = load_or_generate(&path, "privkey:").unwrap();
        let b = load_or_generate(&path, "privkey:").unwrap();
        assert_eq!(a, b);
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::write(&path, "privkey:zz").unwrap();
        assert!(matches!(
            load_or_generate(&path, "privkey:"),
            Err(KeyFileError::Malformed { .. })
        ));
    }
}
