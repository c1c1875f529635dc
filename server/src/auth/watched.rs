//! A value loaded from files and loaded again when any of them changes (mtime, size or inode).
//!
//! Checks are lazy (on use) and at most once per interval, so a rotated key or certificate takes
//! effect without a restart and without a watcher thread. A file that fails to load keeps the last
//! good value in service and is logged.

use std::{
    os::unix::fs::MetadataExt,
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant, SystemTime},
};

type Fingerprint = Vec<Option<(SystemTime, u64, u64)>>;

type Loader<T> = Box<dyn Fn() -> Result<T, String> + Send + Sync>;

/// A value derived from files, reloaded when they change.
pub struct Watched<T> {
    what: &'static str,
    files: Vec<PathBuf>,
    load: Loader<T>,
    interval: Duration,
    current: RwLock<Arc<T>>,
    state: Mutex<(Fingerprint, Instant)>,
}

impl<T> std::fmt::Debug for Watched<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watched")
            .field("what", &self.what)
            .field("files", &self.files)
            .finish()
    }
}

fn fingerprint(files: &[PathBuf]) -> Fingerprint {
    files
        .iter()
        .map(|f| {
            let m = std::fs::metadata(f).ok()?;
            Some((m.modified().ok()?, m.len(), m.ino()))
        })
        .collect()
}

impl<T> Watched<T> {
    /// Loads the value now; fails when the files do not load.
    pub fn new(
        what: &'static str,
        files: Vec<PathBuf>,
        interval: Duration,
        load: impl Fn() -> Result<T, String> + Send + Sync + 'static,
    ) -> Result<Self, String> {
        let print = fingerprint(&files);
        let value = load().map_err(|e| format!("{what}: {e}"))?;
        Ok(Watched {
            what,
            files,
            load: Box::new(load),
            interval,
            current: RwLock::new(Arc::new(value)),
            state: Mutex::new((print, Instant::now())),
        })
    }

    /// The current value, reloaded first when the check interval has passed (or `force`) and a
    /// file changed.
    pub fn get(&self, force: bool) -> Arc<T> {
        let changed = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if force || state.1.elapsed() >= self.interval {
                state.1 = Instant::now();
                let print = fingerprint(&self.files);
                if print != state.0 {
                    state.0 = print;
                    true
                } else {
                    false
                }
            } else {
                false
            }
        };
        if changed {
            match (self.load)() {
                Ok(value) => {
                    tracing::info!(what = self.what, files = ?self.files, "reloaded");
                    *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(value);
                }
                Err(error) => {
                    tracing::error!(what = self.what, %error, "reload failed; keeping the previous version");
                }
            }
        }
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
