//! Input generation on stable Rust: each input is a seed (a valid message of the decoder's
//! format) mutated a few times — bit flips, random or boundary bytes, inserted, deleted or
//! repeated ranges, splices with another seed, truncation — or, now and then, plain
//! random bytes. Seeded, so a run is reproducible.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Bytes that often sit on a parser's edge cases.
const INTERESTING: &[u8] = &[
    0, 1, 0x7f, 0x80, 0xff, b'"', b'\\', b'{', b'}', b'[', b']', b',', b':', b'\n',
];

pub struct Mutator {
    rng: SmallRng,
    seeds: Vec<Vec<u8>>,
}

impl Mutator {
    pub fn new(seed: u64, seeds: Vec<Vec<u8>>) -> Mutator {
        assert!(!seeds.is_empty(), "every target needs seeds");
        Mutator {
            rng: SmallRng::seed_from_u64(seed),
            seeds,
        }
    }

    /// The next input, written into `out`.
    pub fn next_into(&mut self, out: &mut Vec<u8>) {
        out.clear();
        if self.rng.gen_ratio(1, 50) {
            let len = self.rng.gen_range(0..256);
            out.extend((0..len).map(|_| self.rng.r#gen::<u8>()));
            return;
        }
        let seed = &self.seeds[self.rng.gen_range(0..self.seeds.len())];
        out.extend_from_slice(seed);
        let rounds = 1 + self.rng.gen_range(0..4);
        for _ in 0..rounds {
            self.mutate(out);
        }
    }

    fn mutate(&mut self, b: &mut Vec<u8>) {
        let len = b.len();
        match self.rng.gen_range(0..8) {
            0 if len > 0 => {
                let i = self.rng.gen_range(0..len);
                b[i] ^= 1 << self.rng.gen_range(0..8);
            }
            1 if len > 0 => {
                let i = self.rng.gen_range(0..len);
                b[i] = INTERESTING[self.rng.gen_range(0..INTERESTING.len())];
            }
            2 if len > 0 => {
                let i = self.rng.gen_range(0..len);
                b[i] = self.rng.r#gen();
            }
            3 => {
                let at = self.rng.gen_range(0..=len);
                let n = self.rng.gen_range(1..16);
                let bytes: Vec<u8> = (0..n).map(|_| self.rng.r#gen()).collect();
                b.splice(at..at, bytes);
            }
            4 if len > 1 => {
                let start = self.rng.gen_range(0..len);
                let end = (start + self.rng.gen_range(1..32)).min(len);
                b.drain(start..end);
            }
            5 if len > 1 => {
                let start = self.rng.gen_range(0..len);
                let end = (start + self.rng.gen_range(1..64)).min(len);
                let chunk = b[start..end].to_vec();
                let at = self.rng.gen_range(0..=len);
                b.splice(at..at, chunk);
            }
            6 => {
                let other = &self.seeds[self.rng.gen_range(0..self.seeds.len())];
                if !other.is_empty() {
                    let from = self.rng.gen_range(0..other.len());
                    let at = self.rng.gen_range(0..=len);
                    b.truncate(at);
                    b.extend_from_slice(&other[from..]);
                }
            }
            _ if len > 0 => b.truncate(self.rng.gen_range(0..len)),
            _ => b.push(self.rng.r#gen()),
        }
    }
}
