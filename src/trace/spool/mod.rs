//! A disk spool for trace events while the broker is away: append-only segment files of
//! JSON lines, replayed oldest first and deleted only after the broker confirmed them.
//!
//! Segments survive a restart of the process, so events spooled before a crash are sent by
//! the next run. The size cap is the only place events are dropped; the caller counts it.
//!
//! A segment that cannot be read or deleted (a failing disk, permissions changed by hand) is
//! set aside for [`SET_ASIDE_FOR`] and replay goes on with the next one, so one bad file
//! does not hold back every event spooled after it. Nothing is deleted on a read error: a
//! transient one gives the segment back at its next try.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::warn;

use serde::de::IgnoredAny;

use super::framing::{self, EncodedEvents};

mod lock;
pub use lock::{FolderLock, FolderLockError, LOCK_FILE};

/// A segment is closed and a new one started past this size, so replay works in bounded steps.
const SEGMENT_BYTES: u64 = 4 * 1024 * 1024;
/// How long replay leaves alone a segment that could not be read or deleted.
pub const SET_ASIDE_FOR: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("trace spool {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The node's folder is another live process's.
    #[error(transparent)]
    Lock(#[from] FolderLockError),
}

pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    /// Bytes in all segments on disk.
    total_bytes: u64,
    next_sequence: u64,
    current: Option<(PathBuf, File, u64)>,
    /// Segments that failed a read or delete: replay skips them until their time is up.
    set_aside: Vec<SetAside>,
    /// Set when the directory could not be listed: no replay step before then.
    unlisted_until: Option<Instant>,
}

struct SetAside {
    path: PathBuf,
    /// Its size when last listed, so that a spool holding only set-aside segments has
    /// nothing to replay.
    bytes: u64,
    retry_at: Instant,
}

/// One segment read back for replay.
#[derive(Debug)]
pub struct SpooledSegment {
    /// Delete it with [`Spool::remove`] once the broker confirmed its events.
    pub path: PathBuf,
    /// One entry per line.
    pub events: Vec<EncodedEvents>,
    /// Lines that are not JSON (a write cut short by a crash): skipped, to be counted as dropped.
    pub unreadable: usize,
}

/// Outcome of appending a batch.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Appended {
    pub written: usize,
    /// Events refused because the spool is at its cap.
    pub dropped: usize,
}

impl Spool {
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self, SpoolError> {
        let io = |source| SpoolError::Io {
            path: dir.to_path_buf(),
            source,
        };
        fs::create_dir_all(dir).map_err(io)?;
        let mut spool = Spool {
            dir: dir.to_path_buf(),
            max_bytes,
            total_bytes: 0,
            next_sequence: 0,
            current: None,
            set_aside: Vec::new(),
            unlisted_until: None,
        };
        for (sequence, path) in spool.segments().map_err(io)? {
            spool.total_bytes += size_of(&path);
            spool.next_sequence = spool.next_sequence.max(sequence + 1);
        }
        Ok(spool)
    }

    pub fn is_empty(&self) -> bool {
        self.total_bytes == 0
    }

    pub fn bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Whether a replay step would find a segment: the spool holds events outside the
    /// segments set aside.
    pub fn has_replayable(&mut self) -> bool {
        let now = Instant::now();
        self.set_aside.retain(|entry| entry.retry_at > now);
        if self.unlisted_until.is_some_and(|until| until > now) {
            return false;
        }
        let set_aside_bytes: u64 = self.set_aside.iter().map(|entry| entry.bytes).sum();
        self.total_bytes > set_aside_bytes
    }

    fn is_set_aside(&self, path: &Path) -> bool {
        let now = Instant::now();
        self.set_aside
            .iter()
            .any(|entry| entry.path == path && entry.retry_at > now)
    }

    fn set_aside(&mut self, path: &Path) {
        self.set_aside.retain(|entry| entry.path != path);
        self.set_aside.push(SetAside {
            path: path.to_path_buf(),
            bytes: size_of(path),
            retry_at: Instant::now() + SET_ASIDE_FOR,
        });
    }

    fn segments(&self) -> std::io::Result<Vec<(u64, PathBuf)>> {
        segments_in(&self.dir)
    }

    /// Whether `name` is a segment's file name.
    pub fn is_segment_name(name: &str) -> bool {
        segment_sequence(name).is_some()
    }

    /// The segments in `dir`, oldest first.
    pub fn segment_paths(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
        Ok(segments_in(dir)?
            .into_iter()
            .map(|(_, path)| path)
            .collect())
    }

    /// Moves a segment of another node's folder into this spool, after this spool's own
    /// segments, if its `bytes` fit under the cap; `Ok(false)` if they do not. A rename, so
    /// the segment is in one folder or the other whatever happens to either process.
    pub fn adopt_segment(&mut self, segment: &Path, bytes: u64) -> Result<bool, SpoolError> {
        if self.total_bytes + bytes > self.max_bytes {
            return Ok(false);
        }
        let path = self
            .dir
            .join(format!("segment-{:016}.jsonl", self.next_sequence));
        fs::rename(segment, &path).map_err(|source| SpoolError::Io {
            path: segment.to_path_buf(),
            source,
        })?;
        self.next_sequence += 1;
        self.total_bytes += bytes;
        Ok(true)
    }

    /// Appends encoded events; a unit that does not fit under the cap is dropped whole (and
    /// reported), so a request's events are spooled together or not at all. A unit from the
    /// trace queue holds up to a message's worth of requests, so near the cap up to one
    /// message more is dropped than strictly had to be: half a megabyte against a cap of
    /// hundreds of megabytes (256 MiB by default), for units that never need cutting.
    pub fn append(&mut self, units: &[EncodedEvents]) -> Result<Appended, SpoolError> {
        let mut outcome = Appended::default();
        for unit in units {
            let lines = unit.as_bytes();
            if self.total_bytes + lines.len() as u64 > self.max_bytes {
                outcome.dropped += unit.count();
                continue;
            }
            self.write_lines(lines)?;
            outcome.written += unit.count();
        }
        if let Some((path, file, _)) = self.current.as_mut() {
            file.flush().map_err(|source| SpoolError::Io {
                path: path.clone(),
                source,
            })?;
        }
        Ok(outcome)
    }

    fn write_lines(&mut self, lines: &[u8]) -> Result<(), SpoolError> {
        let full = self
            .current
            .as_ref()
            .is_some_and(|(_, _, size)| *size >= SEGMENT_BYTES);
        if full {
            self.current = None;
        }
        if self.current.is_none() {
            let path = self
                .dir
                .join(format!("segment-{:016}.jsonl", self.next_sequence));
            self.next_sequence += 1;
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|source| SpoolError::Io {
                    path: path.clone(),
                    source,
                })?;
            self.current = Some((path, file, 0));
        }
        let (path, file, size) = self.current.as_mut().expect("segment open");
        file.write_all(lines).map_err(|source| SpoolError::Io {
            path: path.clone(),
            source,
        })?;
        *size += lines.len() as u64;
        self.total_bytes += lines.len() as u64;
        Ok(())
    }

    /// The oldest segment's events, closing the segment being written if it is the oldest.
    /// Segments set aside are skipped; one that cannot be read is set aside and reported.
    pub fn oldest(&mut self) -> Result<Option<SpooledSegment>, SpoolError> {
        let io = |path: &Path, source| SpoolError::Io {
            path: path.to_path_buf(),
            source,
        };
        let segments = match self.segments() {
            Ok(segments) => segments,
            Err(error) => {
                self.unlisted_until = Some(Instant::now() + SET_ASIDE_FOR);
                return Err(io(&self.dir, error));
            }
        };
        self.count_what_is_on_disk(&segments);
        let Some(path) = segments
            .into_iter()
            .map(|(_, path)| path)
            .find(|path| !self.is_set_aside(path))
        else {
            return Ok(None);
        };
        if self
            .current
            .as_ref()
            .is_some_and(|(current, _, _)| *current == path)
        {
            self.current = None;
        }
        let data = match fs::read(&path) {
            Ok(data) => data,
            Err(error) => {
                self.set_aside(&path);
                return Err(io(&path, error));
            }
        };
        let mut events = Vec::new();
        let mut unreadable = 0;
        for range in framing::lines(&data) {
            let line = &data[range];
            match serde_json::from_slice::<IgnoredAny>(line) {
                Ok(_) => {
                    let mut unit = Vec::with_capacity(line.len() + 1);
                    unit.extend_from_slice(line);
                    unit.push(b'\n');
                    events.push(EncodedEvents::from_lines(unit, 1));
                }
                Err(error) => {
                    unreadable += 1;
                    warn!(message = "Skipping an unreadable spooled trace event.", path = %path.display(), %error);
                }
            }
        }
        Ok(Some(SpooledSegment {
            path,
            events,
            unreadable,
        }))
    }

    /// Deletes a segment whose events the broker confirmed. One that cannot be deleted is
    /// set aside and replayed again later: its events reach the broker twice, and the
    /// consumer's create-by-eventId indexes them once.
    pub fn remove(&mut self, path: &Path) -> Result<(), SpoolError> {
        let size = size_of(path);
        if let Err(source) = fs::remove_file(path) {
            self.set_aside(path);
            return Err(SpoolError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
        self.total_bytes = self.total_bytes.saturating_sub(size);
        Ok(())
    }

    /// Takes the sizes from the listing: segments removed or changed by hand would otherwise
    /// leave counts that make replay look for events forever.
    fn count_what_is_on_disk(&mut self, segments: &[(u64, PathBuf)]) {
        let sizes: Vec<(&PathBuf, u64)> = segments
            .iter()
            .map(|(_, path)| (path, size_of(path)))
            .collect();
        self.total_bytes = sizes.iter().map(|(_, bytes)| bytes).sum();
        self.set_aside.retain_mut(|entry| {
            let listed = sizes.iter().find(|(path, _)| **path == entry.path);
            if let Some((_, bytes)) = listed {
                entry.bytes = *bytes;
            }
            listed.is_some()
        });
    }
}

fn segment_sequence(name: &str) -> Option<u64> {
    name.strip_prefix("segment-")?
        .strip_suffix(".jsonl")?
        .parse()
        .ok()
}

fn segments_in(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut segments: Vec<(u64, PathBuf)> = fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let sequence = segment_sequence(entry.file_name().to_str()?)?;
            Some((sequence, entry.path()))
        })
        .collect();
    segments.sort();
    Ok(segments)
}

fn size_of(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::event::test_event as event;

    #[test]
    fn replays_in_order_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        let events: Vec<_> = (0..5).map(event).collect();
        let units = [
            EncodedEvents::from_events(&events[..2]),
            EncodedEvents::from_events(&events[2..]),
        ];
        assert_eq!(spool.append(&units).unwrap().written, 5);
        drop(spool);
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert!(!spool.is_empty());
        let segment = spool.oldest().unwrap().unwrap();
        assert_eq!(segment.unreadable, 0);
        let expected: Vec<_> = events
            .iter()
            .map(|e| EncodedEvents::from_events([e]))
            .collect();
        assert_eq!(segment.events, expected);
        spool.remove(&segment.path).unwrap();
        assert!(spool.is_empty());
        assert!(spool.oldest().unwrap().is_none());
    }

    #[test]
    fn drops_beyond_the_cap_a_whole_unit_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let pair = |n: usize| EncodedEvents::from_events([&event(n), &event(n + 1)]);
        let mut spool = Spool::open(dir.path(), pair(0).as_bytes().len() as u64 * 2 + 10).unwrap();
        let outcome = spool.append(&[pair(0), pair(2), pair(4)]).unwrap();
        assert_eq!(
            outcome,
            Appended {
                written: 4,
                dropped: 2
            }
        );
    }

    #[test]
    fn a_line_cut_short_by_a_crash_is_skipped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        spool
            .append(&[EncodedEvents::from_events([&event(0)])])
            .unwrap();
        drop(spool);
        let segment = std::fs::read_dir(dir.path())
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let mut file = OpenOptions::new().append(true).open(&segment).unwrap();
        file.write_all(b"{\"eventId\":\"e1\",\"requ").unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        let segment = spool.oldest().unwrap().unwrap();
        assert_eq!((segment.events.len(), segment.unreadable), (1, 1));
    }

    #[test]
    fn an_unreadable_segment_is_set_aside_and_the_next_one_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let unreadable = dir.path().join(format!("segment-{:016}.jsonl", 0));
        std::fs::create_dir(&unreadable).unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        spool
            .append(&[EncodedEvents::from_events([&event(0), &event(1)])])
            .unwrap();

        let error = spool.oldest().unwrap_err();
        assert!(
            error.to_string().contains("segment-0000000000000000"),
            "{error}"
        );
        assert!(spool.has_replayable(), "the segment after it must not wait");
        let next = spool.oldest().unwrap().unwrap();
        assert_eq!(next.events.len(), 2);
        spool.remove(&next.path).unwrap();

        assert!(
            !spool.has_replayable(),
            "only the set-aside segment is left: replay would look for it in a loop"
        );
        assert!(spool.oldest().unwrap().is_none());
        assert!(unreadable.exists(), "a read error must not delete anything");
        assert!(!spool.is_empty(), "its bytes still count against the cap");
    }

    #[test]
    fn a_spool_directory_that_cannot_be_listed_pauses_replay() {
        let dir = tempfile::tempdir().unwrap();
        let spool_dir = dir.path().join("spool");
        let mut spool = Spool::open(&spool_dir, 1 << 20).unwrap();
        spool
            .append(&[EncodedEvents::from_events([&event(0)])])
            .unwrap();
        std::fs::remove_dir_all(&spool_dir).unwrap();

        assert!(spool.oldest().is_err());
        assert!(
            !spool.has_replayable(),
            "replay would list the directory again in a loop"
        );
    }

    #[test]
    fn segments_removed_by_hand_leave_an_empty_spool() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        spool
            .append(&[EncodedEvents::from_events([&event(0)])])
            .unwrap();
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            std::fs::remove_file(entry.unwrap().path()).unwrap();
        }
        assert!(spool.oldest().unwrap().is_none());
        assert!(
            spool.is_empty(),
            "the publisher would try to replay forever"
        );
    }
}
