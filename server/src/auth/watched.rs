//! A value loaded from files and loaded again when any of them changes (mtime, size or inode).
//!
//! Checks are lazy (on use) and at most once per interval, so a rotated key or certificate takes
//! effect without a restart and without a watcher thread. A file that fails to load keeps the last
//! good value in service and is logged.

use std::{
    os::unix::fs::MetadataExt,
    path::PathBuf,
    sync::{Arc, Mutex, RwLock, TryLockError},
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
    /// file changed. Only `force` waits for a check another caller is making, its load included (so
    /// it gets what that load found, and loads never overwrite each other out of order): the rest
    /// take the value in service, so a flood of forced checks (tokens naming unknown keys) holds up
    /// no one else.
    pub fn get(&self, force: bool) -> Arc<T> {
        let state = if force {
            Some(self.state.lock().unwrap_or_else(|p| p.into_inner()))
        } else {
            match self.state.try_lock() {
                Ok(state) => Some(state),
                Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
                Err(TryLockError::WouldBlock) => None,
            }
        };
        if let Some(mut state) = state
            && (force || state.1.elapsed() >= self.interval)
        {
            state.1 = Instant::now();
            let print = fingerprint(&self.files);
            if print != state.0 {
                state.0 = print;
                // under the check's lock: a forced check waiting for it then sees the new value
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
        }
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lookup does not wait while another caller checks the files (under the check's lock): it
    /// takes the value in service, and the next lookup after the check sees the change.
    #[test]
    fn a_lookup_takes_the_value_in_service_while_a_check_is_made() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("key");
        std::fs::write(&file, "a").expect("write");
        let read = file.clone();
        let watched = Arc::new(
            Watched::new("test key", vec![file.clone()], Duration::ZERO, move || {
                std::fs::read_to_string(&read).map_err(|e| e.to_string())
            })
            .expect("loads"),
        );
        std::fs::write(&file, "bb").expect("rewrite");
        let checking = watched.state.lock().expect("the check's lock");
        let (tx, rx) = std::sync::mpsc::channel();
        let looking = watched.clone();
        std::thread::spawn(move || tx.send(looking.get(false)).expect("send"));
        let got = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the lookup waited for the check in progress");
        assert_eq!(*got, "a");
        drop(checking);
        assert_eq!(*watched.get(false), "bb");
    }

    /// A forced check (a token naming a key just published) made while another caller loads the
    /// changed files waits for that load and gets what it found, instead of finding the files
    /// checked already and taking the old value.
    #[test]
    fn a_forced_check_waits_for_a_load_in_progress_and_gets_its_value() {
        use std::sync::mpsc;
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("key");
        std::fs::write(&file, "a").expect("write");
        type Gate = Option<(mpsc::Sender<()>, mpsc::Receiver<()>)>;
        let gate: Arc<Mutex<Gate>> = Arc::new(Mutex::new(None));
        let (read, held) = (file.clone(), gate.clone());
        let watched = Arc::new(
            Watched::new("test key", vec![file.clone()], Duration::ZERO, move || {
                let taken = held.lock().expect("gate").take();
                if let Some((loading, go)) = taken {
                    loading.send(()).expect("loading");
                    go.recv().expect("go");
                }
                std::fs::read_to_string(&read).map_err(|e| e.to_string())
            })
            .expect("loads"),
        );
        let (loading_tx, loading) = mpsc::channel();
        let (go, go_rx) = mpsc::channel();
        *gate.lock().expect("gate") = Some((loading_tx, go_rx));
        std::fs::write(&file, "bb").expect("rewrite");
        let first = watched.clone();
        std::thread::spawn(move || first.get(false));
        loading
            .recv_timeout(Duration::from_secs(5))
            .expect("the first check loads the change");
        let (tx, forced) = mpsc::channel();
        let second = watched.clone();
        std::thread::spawn(move || tx.send(second.get(true)).expect("send"));
        // a wait cannot be seen not to end: the forced check is given 300 ms with the load held
        let early = forced.recv_timeout(Duration::from_millis(300));
        assert!(
            early.is_err(),
            "the forced check answered during the load: {early:?}"
        );
        go.send(()).expect("go");
        let got = forced
            .recv_timeout(Duration::from_secs(5))
            .expect("the forced check answers once the load ends");
        assert_eq!(*got, "bb");
    }
}
