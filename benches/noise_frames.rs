//! Measures the ts2021 record layer (ChaCha20-Poly1305 with Tailscale's big-endian nonce):
//! every byte of every netmap a member streams passes through `seal_frame`.
//!
//! Run: `cargo bench --bench noise_frames`

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hsd::control::noise::{CipherState, MAX_PLAINTEXT_BYTES};

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

criterion_group!(benches, bench);
criterion_main!(benches);
