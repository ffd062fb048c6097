//! Measures ts2021's Noise: the server side of the IK handshake (what every client
//! connection costs a member; target ≥ 3,900 per second per core) and the record layer
//! (ChaCha20-Poly1305 with Tailscale's big-endian nonce: every byte of every netmap a
//! member streams is sealed here).
//!
//! Run: `cargo bench --bench noise_frames`

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hsd::control::keys::public_key;
use hsd::control::noise::{self, CipherState, Initiation, MAX_PLAINTEXT_BYTES};

fn handshake(c: &mut Criterion) {
    let server_private = [11u8; 32];
    let server_public = public_key(&server_private);
    // Distinct clients, as a member sees them.
    let inits: Vec<Initiation> = (0..64u8)
        .map(|i| {
            let (bytes, _) = noise::initiate(&server_public, &[i + 1; 32], 125).unwrap();
            Initiation::parse(&bytes).unwrap()
        })
        .collect();
    let mut group = c.benchmark_group("noise");
    group.throughput(Throughput::Elements(1));
    let mut i = 0;
    group.bench_function("ik_handshake_server", |b| {
        b.iter(|| {
            i = (i + 1) % inits.len();
            noise::accept(&server_private, &inits[i]).expect("valid initiation")
        })
    });
    group.finish();
}

fn bench(c: &mut Criterion) {
    let plaintext = vec![0x5au8; MAX_PLAINTEXT_BYTES];
    let mut group = c.benchmark_group("noise");
    group.throughput(Throughput::Bytes(plaintext.len() as u64));
    group.bench_function("seal_full_frame", |b| {
        let mut tx = CipherState::new(&[7u8; 32]);
        b.iter(|| {
            tx.seal_frame(&plaintext)
                .expect("counter far from exhaustion")
        })
    });
    group.bench_function("seal_and_open_full_frame", |b| {
        let mut tx = CipherState::new(&[7u8; 32]);
        let mut rx = CipherState::new(&[7u8; 32]);
        b.iter(|| {
            let frame = tx
                .seal_frame(&plaintext)
                .expect("counter far from exhaustion");
            rx.open(frame[3..].to_vec()).expect("own frame decrypts")
        })
    });
    group.finish();
}

criterion_group!(benches, handshake, bench);
criterion_main!(benches);
