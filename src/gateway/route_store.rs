//! The route table in force, swapped atomically when the route file changes.
//!
//! Requests read the table through an [`ArcSwap`] (no lock, no clone), so a reload never
//! blocks or drops an in-flight request: a request keeps the table it started with. An
//! edit that does not validate is logged as `file:line: reason` and the previous table
//! keeps serving.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use super::rate_limit::RateLimits;
use crate::config::{ConfigError, RouteDefaults, RouteTable, ServiceRoutes};

/// Where the routes came from.
#[derive(Debug, Clone)]
pub enum RouteSource {
    /// A route file, watched for edits.
    File(PathBuf),
    /// The `services` section of goms.yml (goms kept routes there); not watched.
    Inline(ServiceRoutes),
}

pub struct RouteStore {
    table: ArcSwap<RouteTable>,
    /// The buckets of the routes with a `rateLimit`, following the table.
    pub rate_limits: RateLimits,
    source: RouteSource,
    defaults: RouteDefaults,
    /// Text of the last file accepted or refused, to skip no-op events.
    last_text: std::sync::Mutex<String>,
}

/// How often the file is re-read even without a notification (bind mounts on some
/// platforms do not deliver inotify events).
const POLL_INTERVAL: Duration = Duration::from_secs(2);
/// Editors write in several steps; wait for the burst to settle.
const SETTLE: Duration = Duration::from_millis(150);

impl RouteStore {
    pub fn load(source: RouteSource, defaults: RouteDefaults) -> Result<Self, ConfigError> {
        let (spec, text) = match &source {
            RouteSource::File(path) => {
                let text = read(path)?;
                (crate::config::parse_routes(path, &text)?, text)
            }
            RouteSource::Inline(spec) => (spec.clone(), String::new()),
        };
        let table = RouteTable::build(&spec, defaults);
        let rate_limits = RateLimits::default();
        rate_limits.follow(&table);
        Ok(RouteStore {
            table: ArcSwap::from_pointee(table),
            rate_limits,
            source,
            defaults,
            last_text: std::sync::Mutex::new(text),
        })
    }

    /// The table in force; cheap enough for every request.
    pub fn current(&self) -> arc_swap::Guard<Arc<RouteTable>> {
        self.table.load()
    }

    pub fn source(&self) -> &RouteSource {
        &self.source
    }

    /// Re-reads the file if it changed; applies it if valid, logs and keeps the old table if not.
    pub fn reload_if_changed(&self) {
        let RouteSource::File(path) = &self.source else {
            return;
        };
        let text = match read(path) {
            Ok(text) => text,
            Err(error) => {
                warn!(message = "Route file unreadable; previous routes keep serving.", %error);
                return;
            }
        };
        {
            let mut last = self.last_text.lock().expect("route text lock");
            if *last == text {
                return;
            }
            *last = text.clone();
        }
        match crate::config::parse_routes(path, &text) {
            Ok(spec) => {
                let table = RouteTable::build(&spec, self.defaults);
                let routes = table.route_count();
                self.rate_limits.follow(&table);
                self.table.store(Arc::new(table));
                info!(message = "Route file reloaded.", path = %path.display(), routes);
            }
            Err(error) => {
                error!(message = "Route file refused; previous routes keep serving.", %error);
            }
        }
    }

    /// Reloads on file events and on a slow poll until `shutdown` flips.
    pub async fn watch(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let RouteSource::File(path) = self.source.clone() else {
            return;
        };
        let (events, mut notified) = mpsc::unbounded_channel();
        let _watcher = match file_watcher(&path, events) {
            Ok(watcher) => Some(watcher),
            Err(error) => {
                warn!(message = "Cannot watch the route file; polling only.", path = %path.display(), %error);
                None
            }
        };
        let mut poll = tokio::time::interval(POLL_INTERVAL);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = poll.tick() => {}
                Some(()) = notified.recv() => {
                    tokio::time::sleep(SETTLE).await;
                    while notified.try_recv().is_ok() {}
                }
            }
            self.reload_if_changed();
        }
    }
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Watches the file's folder (editors and `kubectl`-style updates replace the file).
fn file_watcher(
    path: &Path,
    events: mpsc::UnboundedSender<()>,
) -> notify::Result<notify::RecommendedWatcher> {
    let name = path.file_name().map(|n| n.to_os_string());
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        let relevant = matches!(
            event.kind,
            EventKind::Modify(_) | EventKind::Create(_) | EventKind::Remove(_)
        ) && event
            .paths
            .iter()
            .any(|p| p.file_name().map(|n| n.to_os_string()) == name);
        if relevant {
            let _ = events.send(());
        }
    })?;
    let folder = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    watcher.watch(&folder, RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

/// Loads the routes for a gateway: the route file if it exists, else goms.yml's `services`.
pub fn route_source(routes_path: &Path, inline: Option<&ServiceRoutes>) -> RouteSource {
    match inline {
        Some(spec) if !routes_path.exists() => RouteSource::Inline(spec.clone()),
        _ => RouteSource::File(routes_path.to_path_buf()),
    }
}
