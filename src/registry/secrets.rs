//! Pre-auth key and API key secrets: `hskey-<kind>-<prefix>-<secret>`.
//!
//! Only the prefix (public, for lookup and listings) and the SHA-256 of the whole key are
//! stored; the full key is shown once, when it is created.

use rand::Rng;

use super::types::SecretHash;

const PREFIX_LEN: usize = 12;
const SECRET_LEN: usize = 48;
const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecretKind {
    PreAuth,
    Api,
}

impl SecretKind {
    fn tag(self) -> &'static str {
        match self {
            SecretKind::PreAuth => "auth",
            SecretKind::Api => "api",
        }
    }
}

/// A freshly generated secret: show `full` once, store `prefix` and `hash`.
pub struct NewSecret {
    pub full: String,
    pub prefix: String,
    pub hash: SecretHash,
}

fn random_string(len: usize) -> String {
    let mut rng = rand::thread_rng();
    (0..len)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

pub fn generate(kind: SecretKind) -> NewSecret {
    let prefix = random_string(PREFIX_LEN);
    let full = format!(
        "hskey-{}-{}-{}",
        kind.tag(),
        prefix,
        random_string(SECRET_LEN)
    );
    NewSecret {
        hash: SecretHash::of(&full),
        prefix,
        full,
    }
}

/// Splits a presented key into (prefix, hash). `None` if it is not of our form; callers
/// answer that exactly like an unknown key, so probing learns nothing.
pub fn parse(kind: SecretKind, full: &str) -> Option<(String, SecretHash)> {
    let rest = full
        .strip_prefix("hskey-")?
        .strip_prefix(kind.tag())?
        .strip_prefix('-')?;
    let (prefix, secret) = rest.split_once('-')?;
    let valid =
        |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_alphanumeric());
    if !valid(prefix, PREFIX_LEN) || !valid(secret, SECRET_LEN) {
        return None;
    }
    Some((prefix.to_string(), SecretHash::of(full)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_back_to_their_prefix_and_hash() {
        for kind in [SecretKind::PreAuth, SecretKind::Api] {
            let key = generate(kind);
            let (prefix, hash) = parse(kind, &key.full).unwrap();
            assert_eq!(prefix, key.prefix);
            assert!(hash.matches(&key.hash));
        }
    }

    #[test]
    fn malformed_or_wrong_kind_keys_are_refused() {
        let key = generate(SecretKind::PreAuth);
        assert!(parse(SecretKind::Api, &key.full).is_none());
        assert!(parse(SecretKind::PreAuth, "").is_none());
        assert!(parse(SecretKind::PreAuth, "hskey-auth-short-x").is_none());
        assert!(parse(SecretKind::PreAuth, &key.full[..key.full.len() - 1]).is_none());
        assert!(
            parse(
                SecretKind::PreAuth,
                &format!("{}é", &key.full[..key.full.len() - 2])
            )
            .is_none()
        );
    }
}
