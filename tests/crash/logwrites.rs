//! A reader and replayer for the write log that the kernel's dm-log-writes target records
//! (Documentation/admin-guide/device-mapper/log-writes.rst; the on-disk layout is the one
//! described at the top of drivers/md/dm-log-writes.c). Written from that description; it does
//! not use xfstests' replay-log.
//!
//! Layout, all integers little-endian, `S` = the logged device's logical block size:
//!
//! ```text
//! byte 0:  super    { magic u64, version u64, nr_entries u64, sectorsize u32 }, padded to S
//! then nr_entries times:
//!          entry    { sector u64, nr_sectors u64, flags u64, data_len u64 }, padded to S
//!                   (a mark's text follows the 32 bytes, in the same block)
//!          payload  nr_sectors * S bytes of written data (none for discards, flushes, marks)
//! ```
//!
//! `sector` and `nr_sectors` count units of `S`. The log is bytes from a device we do not fully
//! trust (a bug in the workload, a full log device, a torn super), so the parser checks every
//! field and length before it allocates or seeks, and returns an error instead of panicking.
#![allow(dead_code)]

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

pub const MAGIC: u64 = 0x006a_7366_7773_6872;
pub const VERSION: u64 = 1;
/// Bytes of the super and of an entry header before their padding.
const SUPER_LEN: usize = 28;
const ENTRY_LEN: usize = 32;

pub const FLUSH: u64 = 1 << 0;
pub const FUA: u64 = 1 << 1;
pub const DISCARD: u64 = 1 << 2;
pub const MARK: u64 = 1 << 3;
pub const METADATA: u64 = 1 << 4;
const KNOWN_FLAGS: u64 = FLUSH | FUA | DISCARD | MARK | METADATA;

/// The text dm-log-writes appends when the target is removed.
pub const END_MARK: &str = "dm-log-writes-end";

/// Random access to the log's bytes (a file, or a buffer in the unit tests).
pub trait LogSource {
    fn len(&self) -> io::Result<u64>;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl LogSource for [u8] {
    fn len(&self) -> io::Result<u64> {
        Ok(<[u8]>::len(self) as u64)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let end = start
            .checked_add(buf.len())
            .filter(|&e| e <= <[u8]>::len(self))
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(&self[start..end]);
        Ok(())
    }
}

impl LogSource for File {
    fn len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_exact_at(buf, offset)
    }
}

/// What one entry records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Data written at `sector`; the bytes are at `payload_offset` in the log.
    Write { payload_offset: u64 },
    /// The range was discarded (replayed as zeros: a loop device over a file punches a hole).
    Discard,
    /// A label sent with `dmsetup message <dev> 0 mark <text>`.
    Mark(String),
    /// An empty flush (no data).
    Flush,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Position in the log, from 0.
    pub index: usize,
    /// First unit written (units of the log's sector size).
    pub sector: u64,
    pub nr_sectors: u64,
    pub flags: u64,
    pub op: Op,
}

impl Entry {
    /// A point the device promised durability at: a flush, or a write with FUA.
    pub fn is_durability_point(&self) -> bool {
        self.flags & (FLUSH | FUA) != 0
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Log {
    pub sector_size: u32,
    pub entries: Vec<Entry>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum ParseError {
    Io(String),
    TooShort {
        len: u64,
    },
    BadMagic(u64),
    BadVersion(u64),
    BadSectorSize(u32),
    TooManyEntries {
        nr_entries: u64,
        room: u64,
    },
    UnknownFlags {
        index: usize,
        flags: u64,
    },
    BadMark {
        index: usize,
        why: &'static str,
    },
    /// A non-mark entry with inline data (only DAX writes produce it; we never log DAX).
    InlineData {
        index: usize,
    },
    RangeOverflow {
        index: usize,
    },
    PastEnd {
        index: usize,
        needed: u64,
        len: u64,
    },
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::Io(e) => write!(f, "reading the log: {e}"),
            ParseError::TooShort { len } => write!(f, "log of {len} bytes has no room for a super"),
            ParseError::BadMagic(m) => write!(f, "bad magic {m:#x} (want {MAGIC:#x})"),
            ParseError::BadVersion(v) => write!(f, "unsupported log version {v}"),
            ParseError::BadSectorSize(s) => write!(f, "invalid sector size {s}"),
            ParseError::TooManyEntries { nr_entries, room } => {
                write!(
                    f,
                    "super claims {nr_entries} entries, the log has room for {room}"
                )
            }
            ParseError::UnknownFlags { index, flags } => {
                write!(f, "entry {index}: unknown flags {flags:#x}")
            }
            ParseError::BadMark { index, why } => write!(f, "entry {index}: bad mark: {why}"),
            ParseError::InlineData { index } => {
                write!(
                    f,
                    "entry {index}: inline data on a non-mark entry is not supported"
                )
            }
            ParseError::RangeOverflow { index } => write!(f, "entry {index}: range overflows"),
            ParseError::PastEnd { index, needed, len } => write!(
                f,
                "entry {index} needs the log up to byte {needed}, the log has {len}"
            ),
        }
    }
}

impl std::error::Error for ParseError {}

impl From<io::Error> for ParseError {
    fn from(e: io::Error) -> Self {
        ParseError::Io(e.to_string())
    }
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Parses the super and every entry header; payloads stay in the log (their offsets are kept).
pub fn parse<S: LogSource + ?Sized>(src: &S) -> Result<Log, ParseError> {
    let len = src.len()?;
    if len < 512 {
        return Err(ParseError::TooShort { len });
    }
    let mut sup = [0u8; SUPER_LEN];
    src.read_at(&mut sup, 0)?;
    let magic = le64(&sup, 0);
    if magic != MAGIC {
        return Err(ParseError::BadMagic(magic));
    }
    let version = le64(&sup, 8);
    if version != VERSION {
        return Err(ParseError::BadVersion(version));
    }
    let nr_entries = le64(&sup, 16);
    let sector_size = u32::from_le_bytes(sup[24..28].try_into().expect("4 bytes"));
    if !sector_size.is_power_of_two() || !(512..=65536).contains(&sector_size) {
        return Err(ParseError::BadSectorSize(sector_size));
    }
    let unit = u64::from(sector_size);
    // Every entry takes at least one block: bound the count before allocating for it.
    let room = (len / unit).saturating_sub(1);
    if nr_entries > room {
        return Err(ParseError::TooManyEntries { nr_entries, room });
    }
    let mut entries = Vec::with_capacity(nr_entries as usize);
    let mut pos = unit;
    let mut block = vec![0u8; sector_size as usize];
    for index in 0..nr_entries as usize {
        let header_end = pos
            .checked_add(unit)
            .ok_or(ParseError::RangeOverflow { index })?;
        if header_end > len {
            return Err(ParseError::PastEnd {
                index,
                needed: header_end,
                len,
            });
        }
        src.read_at(&mut block, pos)?;
        let (entry, payload_len) = decode_entry(index, &block, header_end)?;
        pos = header_end
            .checked_add(payload_len)
            .ok_or(ParseError::RangeOverflow { index })?;
        if pos > len {
            return Err(ParseError::PastEnd {
                index,
                needed: pos,
                len,
            });
        }
        entries.push(entry);
    }
    Ok(Log {
        sector_size,
        entries,
    })
}

/// One entry header (a whole block); returns the entry and the payload bytes that follow it.
fn decode_entry(
    index: usize,
    block: &[u8],
    payload_offset: u64,
) -> Result<(Entry, u64), ParseError> {
    let sector = le64(block, 0);
    let nr_sectors = le64(block, 8);
    let flags = le64(block, 16);
    let data_len = le64(block, 24);
    if flags & !KNOWN_FLAGS != 0 {
        return Err(ParseError::UnknownFlags { index, flags });
    }
    let unit = block.len() as u64;
    let bytes = nr_sectors
        .checked_mul(unit)
        .ok_or(ParseError::RangeOverflow { index })?;
    sector
        .checked_add(nr_sectors)
        .ok_or(ParseError::RangeOverflow { index })?;
    let (op, payload_len) = if flags & MARK != 0 {
        (Op::Mark(decode_mark(index, block, data_len)?), 0)
    } else if data_len != 0 {
        return Err(ParseError::InlineData { index });
    } else if flags & DISCARD != 0 {
        (Op::Discard, 0)
    } else if nr_sectors == 0 {
        (Op::Flush, 0)
    } else {
        (Op::Write { payload_offset }, bytes)
    };
    let entry = Entry {
        index,
        sector,
        nr_sectors,
        flags,
        op,
    };
    Ok((entry, payload_len))
}

fn decode_mark(index: usize, block: &[u8], data_len: u64) -> Result<String, ParseError> {
    let room = (block.len() - ENTRY_LEN) as u64;
    if data_len > room {
        return Err(ParseError::BadMark {
            index,
            why: "longer than its block",
        });
    }
    let text = &block[ENTRY_LEN..ENTRY_LEN + data_len as usize];
    String::from_utf8(text.to_vec()).map_err(|_| ParseError::BadMark {
        index,
        why: "not UTF-8",
    })
}

/// Why a replay point was chosen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PointKind {
    /// Nothing replayed: the device as it was before the workload.
    Start,
    /// Just after a flush or FUA entry.
    Durable,
    /// Part-way through the writes between two durability points (a crash with some of the
    /// unflushed writes on the disk, in completion order).
    Between,
    /// The whole log.
    End,
}

/// A state to check: the first `applied` entries replayed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Point {
    pub applied: usize,
    pub kind: PointKind,
}

/// The start, every durability point, `between` evenly spaced points inside each run of two or
/// more writes between durability points, and the end; sorted, each prefix length once.
pub fn replay_points(entries: &[Entry], between: usize) -> Vec<Point> {
    let mut points = vec![Point {
        applied: 0,
        kind: PointKind::Start,
    }];
    let mut run_start = 0;
    let push_between = |points: &mut Vec<Point>, from: usize, to: usize| {
        let writes = to - from;
        if writes >= 2 {
            for k in 1..=between {
                let applied = from + writes * k / (between + 1);
                if applied > from && applied < to {
                    points.push(Point {
                        applied,
                        kind: PointKind::Between,
                    });
                }
            }
        }
    };
    for e in entries {
        if e.is_durability_point() {
            push_between(&mut points, run_start, e.index);
            points.push(Point {
                applied: e.index + 1,
                kind: PointKind::Durable,
            });
            run_start = e.index + 1;
        }
    }
    push_between(&mut points, run_start, entries.len());
    points.push(Point {
        applied: entries.len(),
        kind: PointKind::End,
    });
    points.sort_by_key(|p| p.applied);
    // Keep the first kind seen for a prefix length (Durable wins over End at the same length).
    points.dedup_by_key(|p| p.applied);
    points
}

/// The marks among the first `applied` entries, in order.
pub fn marks_before(entries: &[Entry], applied: usize) -> Vec<&str> {
    entries[..applied.min(entries.len())]
        .iter()
        .filter_map(|e| match &e.op {
            Op::Mark(m) => Some(m.as_str()),
            _ => None,
        })
        .collect()
}

/// Replays a log onto a target file, entry by entry, forwards only.
pub struct Replayer<'a, S: LogSource + ?Sized> {
    log: &'a Log,
    src: &'a S,
    target: &'a File,
    target_len: u64,
    applied: usize,
}

impl<'a, S: LogSource + ?Sized> Replayer<'a, S> {
    pub fn new(log: &'a Log, src: &'a S, target: &'a File) -> io::Result<Self> {
        let target_len = target.metadata()?.len();
        Ok(Replayer {
            log,
            src,
            target,
            target_len,
            applied: 0,
        })
    }

    pub fn applied(&self) -> usize {
        self.applied
    }

    /// Replays entries until the first `applied` of them are on the target.
    pub fn advance_to(&mut self, applied: usize) -> io::Result<()> {
        assert!(applied >= self.applied && applied <= self.log.entries.len());
        while self.applied < applied {
            self.apply(&self.log.entries[self.applied])?;
            self.applied += 1;
        }
        Ok(())
    }

    fn apply(&self, e: &Entry) -> io::Result<()> {
        if matches!(e.op, Op::Mark(_) | Op::Flush) {
            return Ok(());
        }
        let unit = u64::from(self.log.sector_size);
        // Checked: a corrupt entry may name a range whose byte offset does not fit in a u64.
        let range = e
            .sector
            .checked_mul(unit)
            .zip(e.nr_sectors.checked_mul(unit))
            .and_then(|(offset, len)| Some((offset, len, offset.checked_add(len)?)));
        let (offset, len) = match range {
            Some((offset, len, end)) if end <= self.target_len => (offset, len),
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "entry {} writes units {}+{} of {unit} bytes, past the {}-byte target",
                        e.index, e.sector, e.nr_sectors, self.target_len
                    ),
                ));
            }
        };
        match &e.op {
            Op::Write { payload_offset } => self.copy(*payload_offset, offset, len),
            Op::Discard => self.zero(offset, len),
            Op::Mark(_) | Op::Flush => Ok(()),
        }
    }

    fn copy(&self, from: u64, to: u64, len: u64) -> io::Result<()> {
        const CHUNK: u64 = 1 << 20;
        let mut buf = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = CHUNK.min(len - done) as usize;
            self.src.read_at(&mut buf[..n], from + done)?;
            self.target.write_all_at(&buf[..n], to + done)?;
            done += n as u64;
        }
        Ok(())
    }

    fn zero(&self, at: u64, len: u64) -> io::Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = CHUNK.min(len - done) as usize;
            self.target.write_all_at(&zeros[..n], at + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

/// Builds a log in the kernel's layout (for the unit tests: round trips and mutations).
pub fn encode(sector_size: u32, entries: &[(u64, u64, Vec<u8>, Option<String>)]) -> Vec<u8> {
    let unit = sector_size as usize;
    let mut out = vec![0u8; unit];
    out[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    out[8..16].copy_from_slice(&VERSION.to_le_bytes());
    out[16..24].copy_from_slice(&(entries.len() as u64).to_le_bytes());
    out[24..28].copy_from_slice(&sector_size.to_le_bytes());
    for (sector, flags, data, mark) in entries {
        let mut block = vec![0u8; unit];
        let nr_sectors = (data.len() / unit) as u64;
        block[0..8].copy_from_slice(&sector.to_le_bytes());
        block[8..16].copy_from_slice(&nr_sectors.to_le_bytes());
        block[16..24].copy_from_slice(&flags.to_le_bytes());
        if let Some(m) = mark {
            block[24..32].copy_from_slice(&(m.len() as u64).to_le_bytes());
            block[ENTRY_LEN..ENTRY_LEN + m.len()].copy_from_slice(m.as_bytes());
        }
        out.extend_from_slice(&block);
        if flags & DISCARD == 0 {
            out.extend_from_slice(data);
        }
    }
    out
}
