//! An in-memory [`KernelLog`] for host tests: a bounded ring of records in the kmsg format, which tests
//! fill with kernel lines ([`MemoryLog::kernel`]) and sealcsi with its announcements. Never what a user
//! runs: no kernel writes to it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::{KernelLog, LogError, LogReader, Next};

#[derive(Debug, Default)]
struct Ring {
    /// (sequence number, raw record).
    records: VecDeque<(u64, Vec<u8>)>,
    next_seq: u64,
    capacity: usize,
    fail_announcements: bool,
}

/// The in-memory log. Clones share the ring.
#[derive(Debug, Clone)]
pub struct MemoryLog {
    ring: Arc<Mutex<Ring>>,
}

impl Default for MemoryLog {
    fn default() -> Self {
        Self::with_capacity(1024)
    }
}

impl MemoryLog {
    /// A ring that keeps the newest `capacity` records, as the kernel's keeps the newest bytes.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            ring: Arc::new(Mutex::new(Ring {
                capacity: capacity.max(1),
                ..Ring::default()
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends a raw record (any bytes: the parser must cope).
    pub fn raw(&self, record: &[u8]) {
        let mut ring = self.lock();
        let seq = ring.next_seq;
        ring.next_seq += 1;
        ring.records.push_back((seq, record.to_vec()));
        while ring.records.len() > ring.capacity {
            ring.records.pop_front();
        }
    }

    fn push(&self, prio: u32, message: &str) {
        let seq = self.lock().next_seq;
        self.raw(format!("{prio},{seq},{},-;{message}\n", seq * 1000).as_bytes());
    }

    /// Appends a kernel record (facility 0, level 3 = error) with `message`.
    pub fn kernel(&self, message: &str) {
        self.push(3, message);
    }

    /// Makes [`KernelLog::announce`] fail (as a write to /dev/kmsg that is refused).
    pub fn fail_announcements(&self, fail: bool) {
        self.lock().fail_announcements = fail;
    }
}

impl KernelLog for MemoryLog {
    fn reader(&self) -> Result<Box<dyn LogReader>, LogError> {
        let first = self.lock().records.front().map_or(0, |(s, _)| *s);
        Ok(Box::new(MemoryReader {
            log: self.clone(),
            next: first,
        }))
    }

    fn announce(&self, message: &str) -> Result<(), LogError> {
        if self.lock().fail_announcements {
            return Err(LogError::Io {
                op: "write",
                source: std::io::Error::from_raw_os_error(nix::libc::EPERM),
            });
        }
        self.push(13, message);
        Ok(())
    }
}

struct MemoryReader {
    log: MemoryLog,
    next: u64,
}

impl LogReader for MemoryReader {
    fn next(&mut self) -> Result<Next, LogError> {
        let ring = self.log.lock();
        let Some(&(first, _)) = ring.records.front() else {
            return Ok(Next::Empty);
        };
        if self.next < first {
            // As /dev/kmsg: EPIPE once, then on from the oldest record left.
            self.next = first;
            return Ok(Next::Lost);
        }
        let index = usize::try_from(self.next - first).unwrap_or(usize::MAX);
        match ring.records.get(index) {
            Some((_, record)) => {
                self.next += 1;
                Ok(Next::Record(record.clone()))
            }
            None => Ok(Next::Empty),
        }
    }

    fn wait(&mut self, _timeout: Duration) -> Result<(), LogError> {
        Ok(())
    }
}
