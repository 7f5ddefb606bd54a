//! Property tests of the log parser and replayer (host tests: they run in `cargo test`).

use proptest::prelude::*;

use super::logwrites::{
    DISCARD, FLUSH, FUA, LogSource, MARK, METADATA, Op, ParseError, PointKind, Replayer, encode,
    parse, replay_points,
};

/// One generated entry: (sector, flags, data, mark), as `encode` takes it.
type Spec = (u64, u64, Vec<u8>, Option<String>);

const TARGET_UNITS: u64 = 64;

fn spec(unit: usize) -> impl Strategy<Value = Spec> {
    let write = (
        0..TARGET_UNITS - 4,
        1usize..4,
        any::<u8>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(move |(sector, n, byte, fua, meta)| {
            let mut flags = if fua { FUA } else { 0 };
            if meta {
                flags |= METADATA;
            }
            let data: Vec<u8> = (0..n * unit).map(|i| byte ^ (i as u8)).collect();
            (sector, flags, data, None)
        });
    let flush = Just((0, FLUSH, Vec::new(), None));
    let discard = (0..TARGET_UNITS - 4, 1usize..4)
        .prop_map(move |(sector, n)| (sector, DISCARD, vec![0u8; n * unit], None));
    let mark = "[a-z0-9:_-]{0,40}".prop_map(|m| (0, MARK, Vec::new(), Some(m)));
    prop_oneof![4 => write, 2 => flush, 1 => discard, 1 => mark]
}

fn log_specs() -> impl Strategy<Value = (u32, Vec<Spec>)> {
    prop_oneof![Just(512u32), Just(4096u32)]
        .prop_flat_map(|s| (Just(s), prop::collection::vec(spec(s as usize), 0..24)))
}

/// The device state after replaying `specs[..n]`, computed directly.
fn model(unit: usize, specs: &[Spec], n: usize) -> Vec<u8> {
    let mut dev = vec![0xAAu8; TARGET_UNITS as usize * unit];
    for (sector, flags, data, mark) in &specs[..n] {
        let at = *sector as usize * unit;
        if mark.is_some() || data.is_empty() {
            continue;
        }
        if flags & DISCARD != 0 {
            dev[at..at + data.len()].fill(0);
        } else {
            dev[at..at + data.len()].copy_from_slice(data);
        }
    }
    dev
}

fn target_file(unit: usize) -> std::fs::File {
    let f = tempfile::tempfile().unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &vec![0xAAu8; TARGET_UNITS as usize * unit], 0)
        .unwrap();
    f
}

fn read_all(f: &std::fs::File) -> Vec<u8> {
    let mut buf = vec![0u8; f.len().unwrap() as usize];
    LogSource::read_at(f, &mut buf, 0).unwrap();
    buf
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Encode → parse gives back every entry, and replaying any prefix gives the model's state.
    #[test]
    fn round_trip_and_replay((unit, specs) in log_specs(), cut in 0usize..25) {
        let bytes = encode(unit, &specs);
        let log = parse(bytes.as_slice()).expect("a well-formed log parses");
        prop_assert_eq!(log.sector_size, unit);
        prop_assert_eq!(log.entries.len(), specs.len());
        for (e, (sector, flags, data, mark)) in log.entries.iter().zip(&specs) {
            prop_assert_eq!(e.flags, *flags);
            match &e.op {
                Op::Mark(m) => prop_assert_eq!(Some(m), mark.as_ref()),
                Op::Flush => prop_assert!(data.is_empty()),
                Op::Discard | Op::Write { .. } => {
                    prop_assert_eq!(e.sector, *sector);
                    prop_assert_eq!(e.nr_sectors as usize * unit as usize, data.len());
                }
            }
        }
        let n = cut.min(specs.len());
        let target = target_file(unit as usize);
        let mut r = Replayer::new(&log, bytes.as_slice(), &target).unwrap();
        r.advance_to(n).unwrap();
        prop_assert!(read_all(&target) == model(unit as usize, &specs, n));
        r.advance_to(specs.len()).unwrap();
        prop_assert!(read_all(&target) == model(unit as usize, &specs, specs.len()));
    }

    /// Cutting a log with entries anywhere short of its end is an error, never a panic.
    #[test]
    fn truncation_is_an_error((unit, specs) in log_specs(), frac in 0.0f64..1.0) {
        prop_assume!(!specs.is_empty());
        let bytes = encode(unit, &specs);
        let cut = (bytes.len() as f64 * frac) as usize;
        prop_assert!(parse(&bytes[..cut]).is_err());
    }

    /// Corrupted bytes anywhere: the parser returns Ok or Err without panicking, every parsed
    /// payload lies inside the log, and replay either works or reports an out-of-range write.
    #[test]
    fn corruption_never_panics(
        (unit, specs) in log_specs(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let mut bytes = encode(unit, &specs);
        for (at, byte) in flips {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        if let Ok(log) = parse(bytes.as_slice()) {
            let unit = u64::from(log.sector_size);
            for e in &log.entries {
                if let Op::Write { payload_offset } = e.op {
                    prop_assert!(payload_offset + e.nr_sectors * unit <= bytes.len() as u64);
                }
            }
            let target = target_file(4096);
            let mut r = Replayer::new(&log, bytes.as_slice(), &target).unwrap();
            let _ = r.advance_to(log.entries.len());
        }
    }

    /// Random bytes are refused (the magic alone makes acceptance vanishingly unlikely).
    #[test]
    fn random_bytes_are_refused(bytes in prop::collection::vec(any::<u8>(), 0..9000)) {
        prop_assert!(parse(bytes.as_slice()).is_err());
    }

    /// Replay points: sorted, distinct, from nothing to everything, every durability point in.
    #[test]
    fn points_cover_every_durability_point((unit, specs) in log_specs(), between in 0usize..3) {
        let log = parse(encode(unit, &specs).as_slice()).unwrap();
        let points = replay_points(&log.entries, between);
        prop_assert_eq!(points.first().map(|p| p.applied), Some(0));
        prop_assert_eq!(points.last().map(|p| p.applied), Some(log.entries.len()));
        prop_assert!(points.windows(2).all(|w| w[0].applied < w[1].applied));
        for e in log.entries.iter().filter(|e| e.is_durability_point()) {
            prop_assert!(points.iter().any(|p| p.applied == e.index + 1));
        }
        if between == 0 {
            prop_assert!(points.iter().all(|p| p.kind != PointKind::Between));
        }
    }
}

#[test]
fn a_header_with_an_absurd_entry_count_is_refused_before_allocating() {
    let mut bytes = encode(512, &[]);
    bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        parse(bytes.as_slice()),
        Err(ParseError::TooManyEntries { .. })
    ));
}

#[test]
fn a_write_beyond_the_target_is_refused() {
    let bytes = encode(512, &[(TARGET_UNITS * 8, 0, vec![1u8; 512], None)]);
    let log = parse(bytes.as_slice()).unwrap();
    let target = target_file(512);
    let mut r = Replayer::new(&log, bytes.as_slice(), &target).unwrap();
    assert!(r.advance_to(1).is_err());
}
