//! Header decode + copy selection + unseal (KEK derivation with HKDF-SHA256, AES-256-GCM-SIV unwrap):
//! everything `volume open` does between reading the 8 KiB header region and having the volume key,
//! with the simulated sealing source (its secret comes from a seed file read once at open; the hardware
//! sources add their own report/quote latency, which is not measured here). Target: under 50 µs.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use sealcsi::dm::MemoryDm;
use sealcsi::header::{self, FsKind, HEADER_SIZE, Header, Journal, Profile};
use sealcsi::keys::VolumeKey;
use sealcsi::sealing::SimSource;
use sealcsi::volume::Volumes;

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = SimSource::open(dir.path(), "bench-identity").expect("sim source");
    let dm = MemoryDm::default();
    let volumes = Volumes::new(&dm, &source);
    let profile = Profile::AeadHmacSha256 {
        journal: Journal::Journal,
    };
    let mut h = Header::new([0x5e; 16], profile, FsKind::Ext4, 1_700_000_000);
    let key = VolumeKey::generate(profile.key_len()).expect("key");
    h.keyslots[0] = Some(volumes.seal_keyslot(&h, &key).expect("seal"));
    let mut region = Vec::with_capacity(2 * HEADER_SIZE);
    region.extend_from_slice(&h.encode());
    region.extend_from_slice(&h.encode());

    c.bench_function("header_select", |b| {
        b.iter(|| header::select(black_box(&region)).expect("select"))
    });
    let active = header::select(&region).expect("select");
    c.bench_function("unseal_only", |b| {
        b.iter(|| volumes.unseal(black_box(&active.header)).expect("unseal"))
    });
    c.bench_function("decode_select_unseal", |b| {
        b.iter(|| {
            let active = header::select(black_box(&region)).expect("select");
            let (slot, key) = volumes.unseal(&active.header).expect("unseal");
            black_box((slot, key.len()))
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
