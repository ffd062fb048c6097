//! X25519 for the Noise handshake from aws-lc (assembly; already linked for rustls). The
//! four Diffie-Hellman operations of the IK handshake are most of what a new connection
//! costs a member; everything else comes from snow's default resolver.

use aws_lc_rs::agreement::{self, PrivateKey, UnparsedPublicKey, X25519};
use snow::params::{CipherChoice, DHChoice, HashChoice};
use snow::resolvers::{CryptoResolver, DefaultResolver};
use snow::types::{Cipher, Dh, Hash, Random};

/// snow's default primitives with aws-lc's X25519.
pub struct Resolver;

impl CryptoResolver for Resolver {
    fn resolve_rng(&self) -> Option<Box<dyn Random>> {
        DefaultResolver.resolve_rng()
    }

    fn resolve_dh(&self, choice: &DHChoice) -> Option<Box<dyn Dh>> {
        match choice {
            DHChoice::Curve25519 => Some(Box::<AwsX25519>::default()),
            _ => DefaultResolver.resolve_dh(choice),
        }
    }

    fn resolve_hash(&self, choice: &HashChoice) -> Option<Box<dyn Hash>> {
        DefaultResolver.resolve_hash(choice)
    }

    fn resolve_cipher(&self, choice: &CipherChoice) -> Option<Box<dyn Cipher>> {
        DefaultResolver.resolve_cipher(choice)
    }
}

#[derive(Default)]
struct AwsX25519 {
    private: [u8; 32],
    public: [u8; 32],
    key: Option<PrivateKey>,
}

impl Dh for AwsX25519 {
    fn name(&self) -> &'static str {
        "25519"
    }

    fn pub_len(&self) -> usize {
        32
    }

    fn priv_len(&self) -> usize {
        32
    }

    fn set(&mut self, privkey: &[u8]) {
        self.private.copy_from_slice(&privkey[..32]);
        self.key = PrivateKey::from_private_key(&X25519, &self.private).ok();
        self.public = [0; 32];
        if let Some(public) = self.key.as_ref().and_then(|k| k.compute_public_key().ok()) {
            self.public.copy_from_slice(public.as_ref());
        }
    }

    fn generate(&mut self, rng: &mut dyn Random) {
        let mut private = [0u8; 32];
        rng.fill_bytes(&mut private);
        self.set(&private);
    }

    fn pubkey(&self) -> &[u8] {
        &self.public
    }

    fn privkey(&self) -> &[u8] {
        &self.private
    }

    fn dh(&self, pubkey: &[u8], out: &mut [u8]) -> Result<(), snow::Error> {
        let key = self.key.as_ref().ok_or(snow::Error::Dh)?;
        // snow may hand over a longer buffer; the key is its first 32 bytes.
        let pubkey = pubkey.get(..32).ok_or(snow::Error::Dh)?;
        agreement::agree(
            key,
            UnparsedPublicKey::new(&X25519, pubkey),
            snow::Error::Dh,
            |secret| {
                out[..secret.len()].copy_from_slice(secret);
                Ok(())
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same keys and shared secrets as curve25519-dalek (what snow uses by default).
    #[test]
    fn agrees_with_the_default_implementation() {
        let (a, b) = ([7u8; 32], [9u8; 32]);
        let ours = |k: [u8; 32]| {
            let mut d = AwsX25519::default();
            d.set(&k);
            d
        };
        let theirs = |k: [u8; 32]| {
            let mut d = DefaultResolver.resolve_dh(&DHChoice::Curve25519).unwrap();
            d.set(&k);
            d
        };
        assert_eq!(ours(a).pubkey(), theirs(a).pubkey());
        let (mut x, mut y) = ([0u8; 32], [0u8; 32]);
        ours(a).dh(theirs(b).pubkey(), &mut x).unwrap();
        theirs(a).dh(ours(b).pubkey(), &mut y).unwrap();
        assert_eq!(x, y);
        assert!(
            ours(a).dh(&[0u8; 32], &mut x).is_err(),
            "a small-order point"
        );
    }
}
