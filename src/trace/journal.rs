//! A copy of the in-process queue in a memory-mapped file of the node's spool folder, so
//! that events a SIGKILLed process still held reach the index after all.
//!
//! Events wait in memory for up to `trace.publishInterval` plus a broker round trip before
//! they are confirmed or spooled; without a copy, a process killed meanwhile would lose
//! them. Each queued unit ([`EncodedEvents`]) also writes its lines into a slot of this file. The file's pages are the kernel's page cache,
//! which outlives the process: the next start of the same node finds the slots still in
//! use, spools their events for replay, and clears them. A unit frees its slot once its
//! events are confirmed by the broker or written to the spool, so a slot in use on disk
//! always holds events that may not have reached either. A slot freed just after its events
//! were spooled or confirmed, but before the process died, is replayed twice; the indexer
//! creates by `eventId`, so the second copy changes nothing.
//!
//! Nothing is synced: the copy survives the process, not the machine (the spool is not
//! synced either). The file is sparse; only slots in use get pages. A freed slot's pages are
//! unmapped from the process ([`Journal::release_pages`]): they stay in the file and the
//! page cache, but the process's resident memory (`RssFile`) no longer keeps every slot an
//! outage ever filled. A slot holds one unit's
//! worth ([`MESSAGE_BUFFER_BYTES`]), and there is a slot for each buffer the queue may have
//! in use (`trace.bufferMaxBytes`): every unit a SIGKILL can catch in memory, queued or in
//! flight, has its copy, and the file is no larger than that. Events past a full slot (one
//! request larger than a message), and units that find every slot in use, are queued
//! without a copy and counted (`goms_trace_events_unjournaled_total`).
//!
//! Layout: slots of [`SLOT_BYTES`], as many as the file holds, each a 16-byte header
//! (`count: u32`, unused `u32`, `len: u64`, little-endian as the machine writes them)
//! followed by `len` bytes of complete lines. A header is written after the bytes it counts.
//! A run reads every slot the file holds before sizing it for its own bound, so a smaller
//! `trace.bufferMaxBytes` than the previous run's loses nothing.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use super::framing::{self, EncodedEvents, KeepsCopy, MESSAGE_BUFFER_BYTES};
use super::lock;
use super::stats::PublisherStats;

const HEADER_BYTES: usize = 16;
pub const SLOT_BYTES: usize = HEADER_BYTES + MESSAGE_BUFFER_BYTES;
/// The journal's name in the node's spool folder.
pub const JOURNAL_FILE: &str = "queue.journal";

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("trace journal {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("trace journal {path} is in use by another process of the same node")]
    Locked { path: PathBuf },
}

/// The mapped file and its free slots.
pub struct Journal {
    map: Mapping,
    /// Slots in the file.
    slots: usize,
    free: Mutex<Vec<usize>>,
    /// Counts events queued without a copy (`unjournaled`): no slot free, or the unit
    /// outgrew its slot.
    stats: Arc<PublisherStats>,
    path: PathBuf,
    /// Holds the file's lock for as long as the journal lives.
    _file: File,
}

/// What a previous run left in the journal: its events, as the units they were queued in.
pub struct Recovered {
    pub units: Vec<EncodedEvents>,
}

impl Journal {
    /// Opens (or creates) `dir`'s journal with room for `slots` units, takes what a previous
    /// run left in it, and clears it.
    pub fn open(
        dir: &Path,
        slots: usize,
        stats: Arc<PublisherStats>,
    ) -> Result<(Arc<Journal>, Recovered), JournalError> {
        let (file, path, recovered) = open_and_recover(dir, Recovery::Clear)?;
        let io = |source| JournalError::Io {
            path: path.clone(),
            source,
        };
        let slots = slots.max(1);
        let length = slots * SLOT_BYTES;
        file.set_len(length as u64).map_err(io)?;
        let map = Mapping::new(&file, length).map_err(io)?;
        let journal = Journal {
            map,
            slots,
            free: Mutex::new((0..slots).rev().collect()),
            stats,
            path,
            _file: file,
        };
        Ok((Arc::new(journal), recovered))
    }

    /// Reads what `dir`'s journal holds without clearing it: the folder's node is gone and
    /// another adopts its events (`trace::adoption`), which removes the file
    /// ([`LeftOver::remove`]) only once they are spooled.
    pub fn take_over(dir: &Path) -> Result<LeftOver, JournalError> {
        let (file, path, recovered) = open_and_recover(dir, Recovery::Keep)?;
        Ok(LeftOver {
            units: recovered.units,
            path,
            _file: file,
        })
    }

    /// A free slot for a new unit, or `None` when all are in use.
    pub fn acquire(self: &Arc<Self>) -> Option<Slot> {
        let index = lock(&self.free).pop()?;
        Some(Slot {
            journal: self.clone(),
            index,
            len: 0,
            full: false,
        })
    }

    pub(super) fn count_unjournaled(&self, events: usize) {
        self.stats
            .unjournaled
            .fetch_add(events as u64, Ordering::Relaxed);
    }

    /// Removes the file on a clean exit, once every slot is free; the next run starts from
    /// an empty folder then.
    pub fn remove_if_clear(&self) {
        if lock(&self.free).len() == self.slots {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    fn slot_ptr(&self, index: usize) -> *mut u8 {
        self.map.slot_ptr(index)
    }

    fn write_header(&self, index: usize, count: usize, len: usize) {
        self.map.write_header(index, count, len)
    }

    /// Unmaps the whole pages of slot `index`'s first `written` bytes (`MADV_DONTNEED` on a
    /// shared file mapping: the data stays in the file and the page cache, and a later write
    /// faults the pages back in from there). Called when a slot is freed: without it, each
    /// outage that held more units than the ones before left its slots resident for good.
    fn release_pages(&self, index: usize, written: usize) {
        let page = page_size();
        let start = self.slot_ptr(index) as usize;
        let from = start.next_multiple_of(page);
        let to = (start + written) / page * page;
        if to > from {
            // In the mapping (the slot's own bytes), page-aligned, and no `Slot` owns the
            // index any more: nothing reads these pages until they are written again.
            unsafe {
                libc::madvise(from as *mut libc::c_void, to - from, libc::MADV_DONTNEED);
            }
        }
    }
}

/// A gone node's journal, read and still locked.
pub struct LeftOver {
    pub units: Vec<EncodedEvents>,
    path: PathBuf,
    _file: File,
}

impl LeftOver {
    /// Deletes the journal: its events are safe elsewhere.
    pub fn remove(self) -> Result<(), JournalError> {
        std::fs::remove_file(&self.path).map_err(|source| JournalError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

/// Whether reading a journal clears the slots it read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Recovery {
    Clear,
    Keep,
}

/// Opens and locks `dir`'s journal file, creating it if need be, and reads every slot's
/// events: the file as a previous run of any size left it.
fn open_and_recover(
    dir: &Path,
    recovery: Recovery,
) -> Result<(File, PathBuf, Recovered), JournalError> {
    let path = dir.join(JOURNAL_FILE);
    let io = |source| JournalError::Io {
        path: path.clone(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    // Two processes of one node (one spool folder) would write the same slots.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(JournalError::Locked { path });
    }
    let slots = file.metadata().map_err(io)?.len() as usize / SLOT_BYTES;
    let recovered = if slots == 0 {
        Recovered { units: Vec::new() }
    } else {
        let map = Mapping::new(&file, slots * SLOT_BYTES).map_err(io)?;
        take_left_over(&map, recovery)
    };
    Ok((file, path, recovered))
}

/// The events of every slot in use, each slot cleared after it is read if so asked.
fn take_left_over(map: &Mapping, recovery: Recovery) -> Recovered {
    let mut units = Vec::new();
    for index in 0..map.slots() {
        let (count, len) = map.header(index);
        if len == 0 {
            continue;
        }
        let data = map.data(index);
        // A header never counts past the slot; one that does is not ours (a damaged
        // file): its slot is cleared and nothing is taken from it.
        if len <= data.len() && count > 0 {
            if let Some(unit) = whole_lines(&data[..len]) {
                units.push(unit);
            }
        }
        if recovery == Recovery::Clear {
            map.write_header(index, 0, 0);
        }
    }
    Recovered { units }
}

/// The complete lines of a slot, as a unit: a slot's bytes end at a line's end, so this
/// only cuts off a line if the file was damaged.
fn whole_lines(bytes: &[u8]) -> Option<EncodedEvents> {
    let end = bytes.iter().rposition(|b| *b == b'\n')? + 1;
    let lines = bytes[..end].to_vec();
    let count = framing::event_count(&lines);
    Some(EncodedEvents::from_lines(lines, count))
}

/// One unit's copy in the journal: the slot is in use until this drops.
pub struct Slot {
    journal: Arc<Journal>,
    index: usize,
    len: usize,
    /// Set once an append did not fit: later ones are not copied either, so the slot holds
    /// a prefix of the unit's events in order.
    full: bool,
}

impl KeepsCopy for Slot {
    /// Copies `lines`, appended to the unit that now holds `count` events in all, then
    /// updates the header.
    fn copy(&mut self, lines: &[u8], appended: usize, count: usize) {
        if self.full || self.len + lines.len() > MESSAGE_BUFFER_BYTES {
            self.full = true;
            self.journal.count_unjournaled(appended);
            return;
        }
        unsafe {
            // In bounds (checked above) and owned: no other `Slot` has this index.
            let to = self
                .journal
                .slot_ptr(self.index)
                .add(HEADER_BYTES + self.len);
            std::ptr::copy_nonoverlapping(lines.as_ptr(), to, lines.len());
        }
        self.len += lines.len();
        self.journal.write_header(self.index, count, self.len);
    }
}

#[cfg(test)]
impl Slot {
    /// What a SIGKILL does to a slot: it is never freed.
    fn die(self) {
        let slot = std::mem::ManuallyDrop::new(self);
        // The journal handle is let go, the slot's header left as it is.
        drop(unsafe { std::ptr::read(&slot.journal) });
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.journal.write_header(self.index, 0, 0);
        self.journal
            .release_pages(self.index, HEADER_BYTES + self.len);
        lock(&self.journal.free).push(self.index);
    }
}

fn page_size() -> usize {
    static PAGE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    // SAFETY: sysconf reads a constant of the system.
    *PAGE.get_or_init(|| {
        usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
    })
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Slot({}, {} bytes)", self.index, self.len)
    }
}

/// A shared, writable mapping of a whole file.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// The mapping is plain memory: slots are disjoint and each is written only by the `Slot`
// that owns it, headers included; the free list is behind a mutex.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(file: &File, len: usize) -> std::io::Result<Mapping> {
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Mapping {
            ptr: ptr.cast(),
            len,
        })
    }
}

impl Mapping {
    fn slots(&self) -> usize {
        self.len / SLOT_BYTES
    }

    fn slot_ptr(&self, index: usize) -> *mut u8 {
        assert!(index < self.slots());
        // In bounds: the mapping holds `slots()` whole slots.
        unsafe { self.ptr.add(index * SLOT_BYTES) }
    }

    fn header(&self, index: usize) -> (usize, usize) {
        let slot = self.slot_ptr(index);
        // The header is 16 bytes at the start of the slot; slots start at multiples of
        // SLOT_BYTES (a multiple of 8) from a page-aligned mapping.
        unsafe {
            let count = std::ptr::read_volatile(slot.cast::<u32>());
            let len = std::ptr::read_volatile(slot.add(8).cast::<u64>());
            (count as usize, len as usize)
        }
    }

    fn write_header(&self, index: usize, count: usize, len: usize) {
        let slot = self.slot_ptr(index);
        unsafe {
            std::ptr::write_volatile(slot.cast::<u32>(), count as u32);
            std::ptr::write_volatile(slot.add(8).cast::<u64>(), len as u64);
        }
    }

    fn data(&self, index: usize) -> &[u8] {
        // Read only while no `Slot` owns the index (at open, before any is handed out).
        unsafe {
            std::slice::from_raw_parts(self.slot_ptr(index).add(HEADER_BYTES), MESSAGE_BUFFER_BYTES)
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SLOTS: usize = 8;

    fn line(n: usize) -> Vec<u8> {
        format!("{{\"eventId\":\"e{n}\"}}\n").into_bytes()
    }

    fn ids(units: &[EncodedEvents]) -> Vec<String> {
        units
            .iter()
            .flat_map(|unit| {
                let data = unit.as_bytes();
                framing::lines(data)
                    .map(|range| String::from_utf8(data[range].to_vec()).unwrap())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// A process that dies holding slots leaves them for the next open; a freed slot
    /// leaves nothing.
    #[test]
    fn slots_in_use_when_the_process_dies_are_recovered_and_cleared() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (journal, recovered) = Journal::open(dir.path(), SLOTS, Arc::default()).unwrap();
            assert!(recovered.units.is_empty());
            let mut held = journal.acquire().unwrap();
            held.copy(&line(1), 1, 1);
            held.copy(&line(2), 1, 2);
            let mut freed = journal.acquire().unwrap();
            freed.copy(&line(3), 1, 1);
            drop(freed);
            held.die();
        }
        let (journal, recovered) = Journal::open(dir.path(), SLOTS, Arc::default()).unwrap();
        assert_eq!(
            ids(&recovered.units),
            ["{\"eventId\":\"e1\"}", "{\"eventId\":\"e2\"}"]
        );
        assert_eq!(recovered.units[0].count(), 2);
        drop(journal);
        let (_journal, again) = Journal::open(dir.path(), SLOTS, Arc::default()).unwrap();
        assert!(again.units.is_empty(), "recovered slots are cleared");
    }

    #[test]
    fn a_unit_that_outgrows_its_slot_keeps_the_prefix_and_counts_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::open(dir.path(), SLOTS, Arc::default()).unwrap();
        let mut slot = journal.acquire().unwrap();
        slot.copy(&line(1), 1, 1);
        let big = vec![b'x'; MESSAGE_BUFFER_BYTES];
        slot.copy(&big, 1, 2);
        slot.copy(&line(3), 1, 3);
        assert_eq!(journal.stats.unjournaled.load(Ordering::Relaxed), 2);
        slot.die();
        drop(journal);
        let (_, recovered) = Journal::open(dir.path(), SLOTS, Arc::default()).unwrap();
        assert_eq!(ids(&recovered.units), ["{\"eventId\":\"e1\"}"]);
    }

    /// The resident size of the mapping that holds `address`, from /proc/self/smaps, in KiB.
    fn resident_kib_of_mapping(address: usize) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut lines = smaps.lines();
        while let Some(line) = lines.next() {
            let Some((range, _)) = line.split_once(' ') else {
                continue;
            };
            let Some((start, end)) = range.split_once('-') else {
                continue;
            };
            let (Ok(start), Ok(end)) = (
                usize::from_str_radix(start, 16),
                usize::from_str_radix(end, 16),
            ) else {
                continue;
            };
            if (start..end).contains(&address) {
                let rss = lines.find(|l| l.starts_with("Rss:")).unwrap();
                return rss.split_whitespace().nth(1).unwrap().parse().unwrap();
            }
        }
        panic!("no mapping holds {address:#x}");
    }

    #[test]
    fn a_freed_slot_leaves_the_processs_resident_memory_and_keeps_nothing_for_the_next_run() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::open(dir.path(), SLOTS, Arc::default()).unwrap();
        let address = journal.map.ptr as usize;
        let before = resident_kib_of_mapping(address);
        let mut slot = journal.acquire().unwrap();
        // Some 380 KiB: past what reading the headers at open mapped around each one.
        let lines: Vec<u8> = (0..20_000).flat_map(line).collect();
        slot.copy(&lines, 20_000, 20_000);
        let held = resident_kib_of_mapping(address);
        assert!(held >= before + 256, "{before} -> {held} KiB while in use");
        drop(slot);
        let freed = resident_kib_of_mapping(address);
        assert!(
            freed <= before + 8,
            "{before} -> {held} -> {freed} KiB after it was freed"
        );
        let mut again = journal.acquire().unwrap();
        again.copy(&line(1), 1, 1);
        again.die();
        drop(journal);
        let (_, recovered) = Journal::open(dir.path(), SLOTS, Arc::default()).unwrap();
        assert_eq!(
            ids(&recovered.units),
            ["{\"eventId\":\"e1\"}"],
            "a reused slot holds only its new unit"
        );
    }

    #[test]
    fn every_slot_in_use_means_no_copy() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::open(dir.path(), SLOTS, Arc::default()).unwrap();
        let held: Vec<Slot> = (0..SLOTS).map(|_| journal.acquire().unwrap()).collect();
        assert!(journal.acquire().is_none());
        drop(held);
        assert!(journal.acquire().is_some());
    }

    #[test]
    fn a_run_with_fewer_slots_recovers_every_slot_the_last_run_held_and_sizes_the_file() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (journal, _) = Journal::open(dir.path(), SLOTS, Arc::default()).unwrap();
            let held: Vec<Slot> = (0..SLOTS).map(|_| journal.acquire().unwrap()).collect();
            for (n, mut slot) in held.into_iter().enumerate() {
                slot.copy(&line(n), 1, 1);
                slot.die();
            }
        }
        let (journal, recovered) = Journal::open(dir.path(), 2, Arc::default()).unwrap();
        assert_eq!(ids(&recovered.units).len(), SLOTS, "the last slot too");
        let length = std::fs::metadata(dir.path().join(JOURNAL_FILE))
            .unwrap()
            .len();
        assert_eq!(length, 2 * SLOT_BYTES as u64);
        let _held = (journal.acquire().unwrap(), journal.acquire().unwrap());
        assert!(journal.acquire().is_none());
    }

    #[test]
    fn a_gone_nodes_journal_is_read_whole_and_kept_until_removed() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (journal, _) = Journal::open(dir.path(), SLOTS, Arc::default()).unwrap();
            let mut slot = journal.acquire().unwrap();
            slot.copy(&line(7), 1, 1);
            slot.die();
        }
        let left_over = Journal::take_over(dir.path()).unwrap();
        assert_eq!(ids(&left_over.units), ["{\"eventId\":\"e7\"}"]);
        drop(left_over);
        let again = Journal::take_over(dir.path()).unwrap();
        assert_eq!(ids(&again.units).len(), 1, "kept until removed");
        again.remove().unwrap();
        assert!(!dir.path().join(JOURNAL_FILE).exists());
    }

    #[test]
    fn a_second_process_of_the_same_node_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_journal, _) = Journal::open(dir.path(), SLOTS, Arc::default()).unwrap();
        // flock locks belong to the open file, so a second open in this process is refused
        // as another process's would be.
        assert!(matches!(
            Journal::open(dir.path(), SLOTS, Arc::default()),
            Err(JournalError::Locked { .. })
        ));
    }
}
