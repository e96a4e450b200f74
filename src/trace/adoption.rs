//! Who owns a node's spool folder, and the adoption of folders whose node is gone.
//!
//! Each node spools into a folder of its own under the shared `trace.spoolDir`, named after
//! its node id. A node id follows its address, so a node that is scaled away, recreated
//! with a new address or restarted on another port never comes back to its folder. Every
//! live node therefore holds an exclusive `flock` on `owner.lock` in its folder
//! ([`FolderLock`], with the spool), and any node adopts the sibling folders whose lock is free
//! ([`adopt_orphans`]): at its start and then every [`ADOPT_EVERY`].
//!
//! Adopting a folder moves its events into the adopter's own spool, and the adopter's
//! publisher replays them with its own. The journal's events are spooled, each segment is
//! renamed into the adopter's folder (one filesystem, so each move is atomic: a segment is
//! in exactly one folder whatever happens to either process), and the empty folder is
//! removed. A lock held while moving keeps two adopters apart. A crash mid-adoption leaves
//! the rest where another adopter finds it; the consumer indexes by `eventId`, so the one
//! overlap possible (journal events spooled, the journal not yet deleted) is harmless.
//!
//! The lock cannot live in the journal: there is none with `trace.journal` off, and it is
//! deleted on a clean exit.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use super::framing;
use super::journal::{Journal, JournalError, JOURNAL_FILE};
use super::lock;
use super::spool::{FolderLock, Spool, SpoolError, LOCK_FILE};
use super::stats::PublisherStats;

/// How often a node looks for folders to adopt, after the first look at its start.
pub const ADOPT_EVERY: Duration = Duration::from_secs(60);

/// What one look for orphaned folders did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Adopted {
    pub folders: u64,
    pub events: u64,
}

/// Adopts every folder under `root` other than `own`'s that looks like a node's spool
/// folder and whose lock is free: moves its events into `spool` (counted in `stats`), then
/// removes it. A folder whose events do not fit under the spool's cap is adopted as far as
/// they fit; the rest waits for the next look, or for another node.
pub fn adopt_orphans(
    root: &Path,
    own: &Path,
    spool: &std::sync::Mutex<Spool>,
    stats: &std::sync::Arc<PublisherStats>,
) -> Adopted {
    let mut adopted = Adopted::default();
    let entries = match fs::read_dir(root) {
        Ok(entries) => entries,
        Err(error) => {
            warn!(message = "Cannot list the trace spool root to adopt orphaned folders.", root = %root.display(), %error);
            return adopted;
        }
    };
    for entry in entries.filter_map(Result::ok) {
        let dir = entry.path();
        if dir == own || !entry.file_type().is_ok_and(|kind| kind.is_dir()) {
            continue;
        }
        if !looks_like_a_node_folder(&dir) {
            continue;
        }
        match adopt_folder(&dir, spool, stats) {
            Ok(Some(moved)) => {
                adopted.events += moved.events;
                if moved.whole {
                    adopted.folders += 1;
                    info!(message = "Adopted the trace spool folder of a node that is gone; its events are replayed with this node's.", folder = %dir.display(), events = moved.events);
                } else {
                    warn!(message = "Adopted part of an orphaned trace spool folder; the rest does not fit under trace.spoolMaxBytes and waits.", folder = %dir.display(), events = moved.events);
                }
            }
            Ok(None) => {}
            Err(error) => {
                warn!(message = "Could not adopt an orphaned trace spool folder; it is tried again later.", folder = %dir.display(), %error);
            }
        }
    }
    stats
        .folders_adopted
        .fetch_add(adopted.folders, Ordering::Relaxed);
    stats.adopted.fetch_add(adopted.events, Ordering::Relaxed);
    adopted
}

/// Only folders holding nothing but a spool's files are adopted: `trace.spoolDir` pointed at
/// a shared directory must not cost anyone their files.
fn looks_like_a_node_folder(dir: &Path) -> bool {
    let Ok(entries) = fs::read_dir(dir) else {
        return false;
    };
    entries.filter_map(Result::ok).all(|entry| {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        name == LOCK_FILE || name == JOURNAL_FILE || Spool::is_segment_name(&name)
    })
}

#[derive(Debug, thiserror::Error)]
enum AdoptError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error(transparent)]
    Journal(#[from] JournalError),
}

/// What adopting one folder moved.
struct Moved {
    events: u64,
    /// Everything moved and the folder removed; otherwise the rest waits for the next look.
    whole: bool,
}

/// Adopts one folder if its lock is free; `None` if its node is alive (or another node is
/// adopting it).
fn adopt_folder(
    dir: &Path,
    spool: &std::sync::Mutex<Spool>,
    stats: &std::sync::Arc<PublisherStats>,
) -> Result<Option<Moved>, AdoptError> {
    let io = |source| AdoptError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let Some(folder_lock) = FolderLock::try_take(dir).map_err(io)? else {
        return Ok(None);
    };
    let mut events = adopt_journal(dir, spool, stats)?;
    let mut whole = true;
    for segment in Spool::segment_paths(dir).map_err(io)? {
        let data = fs::read(&segment).map_err(|source| AdoptError::Io {
            path: segment.clone(),
            source,
        })?;
        let count = framing::event_count(&data) as u64;
        if !lock(spool).adopt_segment(&segment, data.len() as u64)? {
            whole = false;
            break;
        }
        events += count;
    }
    if whole {
        folder_lock.release();
        // Fails only if something was added meanwhile, which the next look adopts.
        let _ = fs::remove_dir(dir);
    }
    Ok(Some(Moved { events, whole }))
}

/// Spools what the folder's journal still holds (the dead node's in-memory queue), then
/// deletes the journal.
fn adopt_journal(
    dir: &Path,
    spool: &std::sync::Mutex<Spool>,
    stats: &std::sync::Arc<PublisherStats>,
) -> Result<u64, AdoptError> {
    let path = dir.join(JOURNAL_FILE);
    if !path.exists() {
        return Ok(0);
    }
    let left_over = Journal::take_over(dir)?;
    let events: u64 = left_over.units.iter().map(|unit| unit.count() as u64).sum();
    if events > 0 {
        let appended = lock(spool).append(&left_over.units)?;
        if appended.dropped > 0 {
            stats
                .dropped
                .fetch_add(appended.dropped as u64, Ordering::Relaxed);
            warn!(
                message = "Trace spool full; events from an adopted folder's journal dropped.",
                dropped = appended.dropped
            );
        }
    }
    left_over.remove()?;
    Ok(events)
}

/// Adopts at once and then every [`ADOPT_EVERY`] until `stopped` flips. The file work runs
/// on a blocking thread: a slow disk must not hold the publisher's runtime.
pub async fn run(
    root: PathBuf,
    own: PathBuf,
    spool: std::sync::Arc<std::sync::Mutex<Spool>>,
    stats: std::sync::Arc<PublisherStats>,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        let (root, own, spool, stats) = (root.clone(), own.clone(), spool.clone(), stats.clone());
        let _ =
            tokio::task::spawn_blocking(move || adopt_orphans(&root, &own, &spool, &stats)).await;
        tokio::select! {
            _ = tokio::time::sleep(ADOPT_EVERY) => {}
            _ = stopped.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::event::test_event as event;
    use crate::trace::framing::EncodedEvents;
    use std::sync::{Arc, Mutex};

    fn spool_with(dir: &Path, events: usize) {
        let mut spool = Spool::open(dir, 1 << 20).unwrap();
        let units: Vec<_> = (0..events)
            .map(|n| EncodedEvents::from_events([&event(n)]))
            .collect();
        spool.append(&units).unwrap();
    }

    #[test]
    fn a_folder_whose_lock_is_free_is_adopted_and_removed() {
        let root = tempfile::tempdir().unwrap();
        let own = root.path().join("gateway-a");
        let gone = root.path().join("gateway-b");
        spool_with(&gone, 3);
        drop(FolderLock::take_own(&gone).unwrap());
        let _mine = FolderLock::take_own(&own).unwrap();
        let spool = Mutex::new(Spool::open(&own, 1 << 20).unwrap());
        let stats = Arc::<PublisherStats>::default();

        let adopted = adopt_orphans(root.path(), &own, &spool, &stats);

        assert_eq!(
            adopted,
            Adopted {
                folders: 1,
                events: 3
            }
        );
        assert!(!gone.exists(), "the adopted folder is removed");
        let segment = lock(&spool).oldest().unwrap().unwrap();
        assert_eq!(segment.events.len(), 3);
        assert_eq!(stats.adopted.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn a_folder_whose_node_holds_its_lock_is_left_alone() {
        let root = tempfile::tempdir().unwrap();
        let own = root.path().join("gateway-a");
        let alive = root.path().join("gateway-b");
        spool_with(&alive, 2);
        let _held = FolderLock::take_own(&alive).unwrap();
        let spool = Mutex::new(Spool::open(&own, 1 << 20).unwrap());

        let adopted = adopt_orphans(root.path(), &own, &spool, &Arc::default());

        assert_eq!(adopted, Adopted::default());
        assert_eq!(Spool::segment_paths(&alive).unwrap().len(), 1);
    }

    #[test]
    fn a_folder_holding_other_files_is_not_a_spool_folder() {
        let root = tempfile::tempdir().unwrap();
        let own = root.path().join("gateway-a");
        let other = root.path().join("photos");
        spool_with(&other, 1);
        fs::write(other.join("holiday.jpg"), b"not ours").unwrap();
        let spool = Mutex::new(Spool::open(&own, 1 << 20).unwrap());

        let adopted = adopt_orphans(root.path(), &own, &spool, &Arc::default());

        assert_eq!(adopted, Adopted::default());
        assert!(other.join("holiday.jpg").exists());
    }

    #[test]
    fn what_does_not_fit_under_the_cap_stays_for_later() {
        let root = tempfile::tempdir().unwrap();
        let own = root.path().join("gateway-a");
        let gone = root.path().join("gateway-b");
        spool_with(&gone, 3);
        let spool = Mutex::new(Spool::open(&own, 16).unwrap());

        let adopted = adopt_orphans(root.path(), &own, &spool, &Arc::default());

        assert_eq!(
            adopted,
            Adopted {
                folders: 0,
                events: 0
            }
        );
        assert_eq!(Spool::segment_paths(&gone).unwrap().len(), 1);
        assert!(
            FolderLock::try_take(&gone).unwrap().is_some(),
            "the lock is let go for the next look"
        );
    }

    #[test]
    fn a_second_process_of_the_same_node_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("gateway-a");
        let _first = FolderLock::try_take(&dir).unwrap().unwrap();
        assert!(FolderLock::try_take(&dir).unwrap().is_none());
    }
}
