//! Measures the DERP relay's per-packet work on the frame level: decoding a client's
//! `SendPacket` of 1,400 bytes (a full-size WireGuard packet) and encoding the
//! `RecvPacket` the destination gets. `benches/derp` measures the relay end to end.
//!
//! Run: `cargo bench --bench derp_frames`

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hsd::derp::frame::{Frame, HEADER_LEN};

fn bench(c: &mut Criterion) {
    let wire = Frame::SendPacket {
        dst: [7; 32],
        data: vec![0x42; 1400],
    }
    .encode();
    let mut group = c.benchmark_group("derp");
    group.throughput(Throughput::Bytes(1400));
    group.bench_function("relay_frame_1400", |b| {
        b.iter(|| {
            let frame = Frame::decode(wire[0], wire[HEADER_LEN..].to_vec()).expect("valid");
            let Frame::SendPacket { data, .. } = frame else {
                unreachable!("a send packet")
            };
            Frame::RecvPacket { src: [9; 32], data }.encode()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
