//! Integrity failures of open volumes, counted from the kernel log.
//!
//! In the AEAD profile dm-crypt checks every block's tag: a block the host changed fails to read (EIO,
//! or EILSEQ with O_DIRECT) and dm-crypt logs `device-mapper: crypt: dm-N: INTEGRITY AEAD ERROR, sector
//! S`, naming the device below it (the volume's dm-integrity device), while dm-integrity's own mismatch
//! counter stays 0. Nothing else in the kernel counts these, so [`IntegrityFailures`] follows the log
//! ([`KernelLog`]: [`kmsg::Kmsg`] on a node, [`memory::MemoryLog`] in host tests) and counts failure
//! records per device-mapper minor (`dm-N`); a volume's count is that of its two devices.
//!
//! Attribution. Minors are reused: the kernel gives a new device the lowest free one. So whenever
//! sealcsi opens a device it writes an announcement into the same log ([`kmsg::announcement`],
//! `sealcsi: dm-N opened as <name>`): records are ordered, so a failure record before the announcement
//! belongs to the minor's previous holder and one after it to the new one, and the count restarts at
//! the announcement. A follower that starts late (the plugin restarted) reads the ring from its oldest
//! record and so still sees failures from before the restart; if a device's announcement has already
//! left the ring, every failure the ring still holds for that minor is newer than it and is counted.
//! Failures count only from the kernel's own records (facility 0), announcements only from user space,
//! so a user-space writer cannot forge a failure.
//!
//! Limits: the kernel rate-limits these messages (`DMERR_LIMIT`: by default 10 per 5 s), and a reader
//! that falls more than a ring's length behind loses records: the count is a lower bound. Where the
//! announcement cannot be written, the count restarts in memory when the device is opened: failures of
//! the minor's previous holder that the follower had not read yet are then counted for the new device,
//! and after a plugin restart the ring has no boundary for it.
//!
//! Memory is bounded: one entry per minor, at most [`MAX_DEVICES`]. gRPC calls never touch the log:
//! they read counts under a short lock; one thread ([`IntegrityFailures::follow`]) reads the log.

pub mod kmsg;
pub mod memory;

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use crate::dm::{DeviceMapper, DmError, DmName};
use crate::error::{Classify, Kind};
pub use kmsg::Kmsg;
pub use memory::MemoryLog;

/// Most device-mapper minors tracked at once (a node has far fewer devices open).
pub const MAX_DEVICES: usize = 4096;
/// How long the follower waits for a record before it checks whether it is still wanted.
const FOLLOW_WAIT: Duration = Duration::from_millis(500);

/// Errors of the kernel log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// `/dev/kmsg` (or the log standing in for it) could not be opened, read or written.
    #[error("kernel log ({op}): {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

impl LogError {
    fn io(op: &'static str) -> impl FnOnce(io::Error) -> LogError {
        move |source| LogError::Io { op, source }
    }
}

impl Classify for LogError {
    fn kind(&self) -> Kind {
        Kind::Unavailable
    }
}

/// What a reader found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// One raw record (kmsg format, [`kmsg::parse_record`]).
    Record(Vec<u8>),
    /// Records were overwritten before this reader read them; it goes on with the oldest left.
    Lost,
    /// Nothing new now.
    Empty,
}

/// The kernel log: readers from its oldest retained record, and user-space announcements into it.
pub trait KernelLog: Send + Sync {
    fn reader(&self) -> Result<Box<dyn LogReader>, LogError>;
    /// Appends `message` as a user-space record.
    fn announce(&self, message: &str) -> Result<(), LogError>;
}

/// A position in the log. Never blocks in [`LogReader::next`].
pub trait LogReader: Send {
    fn next(&mut self) -> Result<Next, LogError>;
    /// Returns when a record may be there, or after `timeout`.
    fn wait(&mut self, timeout: Duration) -> Result<(), LogError>;
}

#[derive(Debug, Default)]
struct Slot {
    /// Whom the last announcement for this minor named (None: no announcement seen).
    holder: Option<String>,
    failures: u64,
}

#[derive(Debug, Default)]
struct State {
    slots: BTreeMap<u32, Slot>,
    last_seq: Option<u64>,
    /// Records the ring overwrote before they were read (sequence gaps).
    lost: u64,
    /// Failure records for minors beyond [`MAX_DEVICES`] tracked ones.
    untracked: u64,
    /// Records that did not parse.
    malformed: u64,
    /// The reader reported lost records since the last record.
    loss_pending: bool,
}

/// Totals of the follower, for the logs and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub lost: u64,
    pub untracked: u64,
    pub malformed: u64,
}

/// Integrity failures per open device-mapper device, from the kernel log.
pub struct IntegrityFailures {
    dm: Arc<dyn DeviceMapper>,
    log: Arc<dyn KernelLog>,
    reader: Mutex<Box<dyn LogReader>>,
    state: Mutex<State>,
}

impl std::fmt::Debug for IntegrityFailures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntegrityFailures")
            .field("totals", &self.totals())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl IntegrityFailures {
    /// Counts from `log`'s oldest retained record on; minors are resolved through `dm`. Nothing is read
    /// until [`Self::pump`] or [`Self::follow`].
    pub fn new(dm: Arc<dyn DeviceMapper>, log: Arc<dyn KernelLog>) -> Result<Arc<Self>, LogError> {
        let reader = log.reader()?;
        Ok(Arc::new(Self {
            dm,
            log,
            reader: Mutex::new(reader),
            state: Mutex::new(State::default()),
        }))
    }

    /// Applies every record the log holds now; returns how many were read.
    pub fn pump(&self) -> Result<usize, LogError> {
        let mut reader = lock(&self.reader);
        let mut n = 0;
        loop {
            match reader.next()? {
                Next::Record(bytes) => {
                    n += 1;
                    self.apply(&bytes);
                }
                // The gap shows in the next record's sequence number (if one was read before).
                Next::Lost => lock(&self.state).loss_pending = true,
                Next::Empty => return Ok(n),
            }
        }
    }

    fn apply(&self, bytes: &[u8]) {
        let mut st = lock(&self.state);
        let record = match kmsg::parse_record(bytes) {
            Ok(r) => r,
            Err(_) => {
                st.malformed += 1;
                return;
            }
        };
        let gap = match st.last_seq {
            Some(last) => record.seq.saturating_sub(last.saturating_add(1)),
            None => 0,
        };
        // Without an earlier record the size of the loss is unknown: at least one.
        st.lost += if st.loss_pending { gap.max(1) } else { gap };
        st.loss_pending = false;
        st.last_seq = Some(record.seq);
        let (minor, opened) = match kmsg::event(&record) {
            None => return,
            Some(kmsg::Event::Failure { minor }) => (minor, None),
            Some(kmsg::Event::Opened { minor, name }) => (minor, Some(name)),
        };
        if !st.slots.contains_key(&minor) && st.slots.len() >= MAX_DEVICES {
            if opened.is_none() {
                st.untracked += 1;
            }
            return;
        }
        let slot = st.slots.entry(minor).or_default();
        match opened {
            Some(name) => {
                *slot = Slot {
                    holder: Some(name.to_string()),
                    failures: 0,
                }
            }
            None => slot.failures += 1,
        }
    }

    /// Follows the log on a thread of its own until this is dropped.
    pub fn follow(self: &Arc<Self>) -> io::Result<()> {
        let weak: Weak<Self> = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("sealcsi-kmsg".into())
            .spawn(move || {
                loop {
                    let Some(me) = weak.upgrade() else { return };
                    let step = me.pump().and_then(|_| lock(&me.reader).wait(FOLLOW_WAIT));
                    if let Err(e) = step {
                        tracing::error!(error = %e, "stopped counting integrity failures: the kernel log cannot be read");
                        return;
                    }
                }
            })
            .map(drop)
    }

    /// Announces that sealcsi just opened the devices `names` (restarting their counts). A device that
    /// does not exist is skipped; a failed write is logged, not returned: the volume is open and usable.
    pub fn opened(&self, names: &[&DmName]) {
        for name in names {
            let minor = match self.dm.info(name) {
                Ok(Some(info)) => info.minor,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(dm.name = %name, error = %e, "cannot announce an opened device");
                    continue;
                }
            };
            if let Err(e) = self.log.announce(&kmsg::announcement(minor, name)) {
                tracing::warn!(dm.name = %name, error = %e, "cannot announce an opened device in the kernel log: \
                    its count restarts now, and failures of the minor's previous holder not yet read may be counted for it");
                // Second best: restart the count at what the follower has read so far.
                let mut st = lock(&self.state);
                if st.slots.contains_key(&minor) || st.slots.len() < MAX_DEVICES {
                    st.slots.insert(
                        minor,
                        Slot {
                            holder: Some(name.to_string()),
                            failures: 0,
                        },
                    );
                }
            }
        }
    }

    /// Failures counted for the open devices `names` since they were opened (0 for a device that is
    /// not open). A lower bound: see the module documentation.
    pub fn count(&self, names: &[&DmName]) -> Result<u64, DmError> {
        let mut minors = Vec::with_capacity(names.len());
        for name in names {
            if let Some(info) = self.dm.info(name)? {
                minors.push((info.minor, name.as_str()));
            }
        }
        let st = lock(&self.state);
        Ok(minors
            .into_iter()
            .filter_map(|(minor, name)| st.slots.get(&minor).map(|s| (s, name)))
            .filter(|(s, name)| s.holder.as_deref().is_none_or(|h| h == *name))
            .map(|(s, _)| s.failures)
            .sum())
    }

    /// What [`Self::count`] means for a volume's condition, if anything.
    pub fn problem(&self, names: &[&DmName]) -> Result<Option<String>, DmError> {
        Ok(failure_problem(self.count(names)?))
    }

    pub fn totals(&self) -> Totals {
        let st = lock(&self.state);
        Totals {
            lost: st.lost,
            untracked: st.untracked,
            malformed: st.malformed,
        }
    }
}

/// The condition message for `n` failures (counts only, never data).
pub fn failure_problem(n: u64) -> Option<String> {
    (n > 0).then(|| {
        format!(
            "{n} integrity failure(s) since the volume was staged (a lower bound: the kernel rate-limits \
             its reports): blocks failed authentication, changed outside the node (or never written), and \
             reads of them fail with EIO"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dm::MemoryDm;
    use crate::dm::table::{IntegrityTarget, JournalMode, Target, TargetLine};

    fn name(s: &str) -> DmName {
        DmName::try_from(s).unwrap()
    }

    fn line() -> Vec<TargetLine> {
        vec![TargetLine {
            start: 0,
            length: 8,
            target: Target::Integrity(IntegrityTarget {
                device: "/dev/loop0".into(),
                offset_sectors: 0,
                tag_size: 48,
                mode: JournalMode::Journal,
                block_size: 4096,
                fix_padding: true,
                journal_sectors: None,
            }),
        }]
    }

    fn aead(minor: u32) -> String {
        format!("device-mapper: crypt: dm-{minor}: INTEGRITY AEAD ERROR, sector 40")
    }

    struct Fx {
        dm: Arc<MemoryDm>,
        log: MemoryLog,
        failures: Arc<IntegrityFailures>,
    }

    fn fx(capacity: usize) -> Fx {
        let dm = Arc::new(MemoryDm::new());
        let log = MemoryLog::with_capacity(capacity);
        let failures = IntegrityFailures::new(dm.clone(), Arc::new(log.clone())).unwrap();
        Fx { dm, log, failures }
    }

    impl Fx {
        fn open(&self, n: &DmName, uuid: &str) -> u32 {
            let info = self.dm.create(n, uuid, &line()).unwrap();
            self.failures.opened(&[n]);
            info.minor
        }
        fn count(&self, n: &DmName) -> u64 {
            self.failures.pump().unwrap();
            self.failures.count(&[n]).unwrap()
        }
    }

    #[test]
    fn counts_failures_of_the_device_that_holds_the_minor() {
        let f = fx(1024);
        let (a, b) = (name("sealcsi-a"), name("sealcsi-b"));
        let ma = f.open(&a, "A");
        let mb = f.open(&b, "B");
        assert_eq!(f.count(&a), 0);
        f.log.kernel(&aead(ma));
        f.log.kernel(&aead(ma));
        f.log.kernel("device-mapper: crypt: something else");
        assert_eq!(f.count(&a), 2);
        assert_eq!(f.count(&b), 0, "a sibling is not charged");
        assert_eq!(f.failures.count(&[&a, &b]).unwrap(), 2);
        let problem = f.failures.problem(&[&a]).unwrap().unwrap();
        assert!(
            problem.starts_with("2 integrity failure(s) since the volume was staged"),
            "{problem}"
        );
        assert!(problem.contains("EIO"), "{problem}");
        // Conditions join problems with "; ": one problem holds none.
        assert!(!problem.contains(';'), "{problem}");
        assert_eq!(f.failures.problem(&[&b]).unwrap(), None);
        f.log.kernel(&format!(
            "device-mapper: integrity: dm-{mb}: Checksum failed at sector 0x10"
        ));
        assert_eq!(f.count(&b), 1);
    }

    #[test]
    fn a_reused_minor_does_not_inherit_old_failures() {
        let f = fx(1024);
        let (a, b) = (name("sealcsi-a"), name("sealcsi-b"));
        let ma = f.open(&a, "A");
        f.log.kernel(&aead(ma));
        assert_eq!(f.count(&a), 1);
        f.dm.remove(&a).unwrap();
        // The kernel (and MemoryDm) give the next device the lowest free minor: a's.
        let mb = f.open(&b, "B");
        assert_eq!(mb, ma);
        assert_eq!(f.count(&b), 0, "b inherited a's failure");
        f.log.kernel(&aead(mb));
        assert_eq!(f.count(&b), 1);
    }

    #[test]
    fn failures_logged_before_the_announcement_belong_to_the_previous_holder() {
        let f = fx(1024);
        let (a, b) = (name("sealcsi-a"), name("sealcsi-b"));
        let ma = f.open(&a, "A");
        f.dm.remove(&a).unwrap();
        // a's last failure is logged, and b opened on the same minor, before the follower reads either.
        f.log.kernel(&aead(ma));
        let mb = f.open(&b, "B");
        assert_eq!(mb, ma);
        assert_eq!(f.count(&b), 0);
    }

    #[test]
    fn a_late_reader_sees_failures_from_before_it_started() {
        let dm = Arc::new(MemoryDm::new());
        let log = MemoryLog::default();
        let a = name("sealcsi-a");
        let minor = dm.create(&a, "A", &line()).unwrap().minor;
        log.announce(&kmsg::announcement(minor, &a)).unwrap();
        log.kernel(&aead(minor));
        // The plugin (re)starts now.
        let failures = IntegrityFailures::new(dm.clone(), Arc::new(log.clone())).unwrap();
        failures.pump().unwrap();
        assert_eq!(failures.count(&[&a]).unwrap(), 1);
    }

    #[test]
    fn an_announcement_that_left_the_ring_still_counts_what_the_ring_holds() {
        let f = fx(4);
        let a = name("sealcsi-a");
        let minor = f.open(&a, "A");
        for _ in 0..6 {
            f.log.kernel(&aead(minor));
        }
        // A new reader of the rotated ring: the announcement is gone, four failures are left.
        let late = IntegrityFailures::new(f.dm.clone(), Arc::new(f.log.clone())).unwrap();
        late.pump().unwrap();
        assert_eq!(late.count(&[&a]).unwrap(), 4);
        // The first reader read nothing yet: it lost records (sequence gap) and counts what is left.
        assert_eq!(f.count(&a), 4);
        assert!(f.failures.totals().lost > 0, "{:?}", f.failures.totals());
    }

    #[test]
    fn another_holders_announcement_hides_the_minor_from_this_name() {
        let f = fx(1024);
        let a = name("sealcsi-a");
        let minor = f.open(&a, "A");
        f.log
            .announce(&kmsg::announcement(minor, &name("someone-else")))
            .unwrap();
        f.log.kernel(&aead(minor));
        assert_eq!(f.count(&a), 0);
    }

    #[test]
    fn closed_devices_count_nothing_and_forged_or_malformed_records_are_ignored() {
        let f = fx(1024);
        let a = name("sealcsi-a");
        let minor = f.open(&a, "A");
        f.log.raw(b"garbage without a prefix");
        f.log
            .raw(format!("11,999,1,-;{}\n", aead(minor)).as_bytes());
        f.log.kernel(&aead(minor));
        assert_eq!(
            f.count(&a),
            1,
            "the user-space record (facility 1) was counted"
        );
        assert_eq!(f.failures.totals().malformed, 1);
        f.dm.remove(&a).unwrap();
        assert_eq!(f.count(&a), 0);
    }

    #[test]
    fn without_an_announcement_the_count_restarts_in_memory() {
        let f = fx(1024);
        let (a, b) = (name("sealcsi-a"), name("sealcsi-b"));
        let ma = f.open(&a, "A");
        f.log.kernel(&aead(ma));
        assert_eq!(f.count(&a), 1);
        f.dm.remove(&a).unwrap();
        f.log.fail_announcements(true);
        let mb = f.open(&b, "B");
        assert_eq!(mb, ma);
        assert_eq!(f.count(&b), 0, "b inherited a's failure");
        f.log.kernel(&aead(mb));
        assert_eq!(f.count(&b), 1, "b's own failure was not counted");
    }

    #[derive(Debug, Clone)]
    enum Op {
        Open(usize),
        Close(usize),
        Fail(usize),
        /// A failure line for a minor nobody holds now (a late line of a closed device).
        FailFree(u32),
        Pump,
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            (0..3usize).prop_map(Op::Open),
            (0..3usize).prop_map(Op::Close),
            (0..3usize).prop_map(Op::Fail),
            (0..8u32).prop_map(Op::FailFree),
            Just(Op::Pump),
        ]
    }

    proptest::proptest! {
        /// Against a model: a volume's count is the failures logged on its minor since it was opened,
        /// whatever reuse of minors and however far behind the follower is.
        #[test]
        fn counts_match_the_model(ops in proptest::collection::vec(op(), 0..60)) {
            let f = fx(4096);
            let names: Vec<DmName> = (0..3).map(|i| name(&format!("sealcsi-v{i}"))).collect();
            let mut model: [Option<u64>; 3] = [None; 3];
            for op in ops {
                match op {
                    Op::Open(i) if model[i].is_none() => {
                        f.open(&names[i], &format!("U{i}"));
                        model[i] = Some(0);
                    }
                    Op::Close(i) if model[i].is_some() => {
                        f.dm.remove(&names[i]).unwrap();
                        model[i] = None;
                    }
                    Op::Fail(i) => {
                        if let Some(n) = model[i].as_mut() {
                            let minor = f.dm.info(&names[i]).unwrap().unwrap().minor;
                            f.log.kernel(&aead(minor));
                            *n += 1;
                        }
                    }
                    Op::FailFree(minor) => {
                        let held = f.dm.list().unwrap().iter().any(|d| d.minor == minor);
                        if !held {
                            f.log.kernel(&aead(minor));
                        }
                    }
                    Op::Pump => {
                        f.failures.pump().unwrap();
                    }
                    _ => {}
                }
            }
            f.failures.pump().unwrap();
            for (i, want) in model.iter().enumerate() {
                proptest::prop_assert_eq!(f.failures.count(&[&names[i]]).unwrap(), want.unwrap_or(0), "volume {}", i);
            }
        }
    }

    #[test]
    fn memory_is_bounded() {
        let f = fx(2 * MAX_DEVICES + 8);
        for minor in 0..(MAX_DEVICES as u32 + 5) {
            f.log.kernel(&aead(minor));
        }
        f.failures.pump().unwrap();
        assert_eq!(lock(&f.failures.state).slots.len(), MAX_DEVICES);
        assert_eq!(f.failures.totals().untracked, 5);
    }
}
