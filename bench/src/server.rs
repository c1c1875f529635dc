//! Starts the real `nerve-server` binary as a child process on one backend, and cleans up after it
//! (its temp data directory, or its Postgres schema and Redis keys).

use std::{net::SocketAddr, path::PathBuf, process::Stdio, time::Duration};

use anyhow::{Context as _, Result, anyhow, bail};
use sqlx::Connection as _;
use tokio::io::{AsyncBufReadExt, BufReader};

/// Which backend a server runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite file + in-process streams.
    Embedded,
    /// Postgres event store + Redis Streams.
    Production,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Embedded => "embedded",
            Backend::Production => "postgres+redis",
        }
    }
}

/// A running `nerve-server`.
pub struct ServerProcess {
    child: tokio::process::Child,
    pub addr: SocketAddr,
    pub pid: u32,
    _dir: tempfile::TempDir,
    cleanup: Option<Scratch>,
    /// Postgres + Redis: `synchronous_commit` and `fsync` as the server's connection URL sees them.
    pub commit_settings: Option<String>,
}

/// The Postgres schema and Redis key prefix a production-backend server used.
struct Scratch {
    database_url: String,
    schema: String,
    redis_url: String,
    key_prefix: String,
}

/// Returns `url` with its connections using `schema` (and any extra `-c` settings).
pub fn url_with_options(url: &str, schema: &str, extra: &[(&str, &str)]) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    let mut options = format!("-c%20search_path%3D{schema}");
    for (k, v) in extra {
        options.push_str(&format!("%20-c%20{k}%3D{v}"));
    }
    format!("{url}{separator}options={options}")
}

/// Creates a schema with a generated name; returns the name.
pub async fn create_schema(database_url: &str, prefix: &str) -> Result<String> {
    let schema = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(database_url)
        .await
        .with_context(|| format!("connecting to {}", redact(database_url)))?;
    // the name is generated here, never input
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&mut conn)
        .await
        .context("creating a scratch schema")?;
    Ok(schema)
}

/// Drops a scratch schema and everything in it.
pub async fn drop_schema(database_url: &str, schema: &str) -> Result<()> {
    let mut conn = sqlx::PgConnection::connect(database_url).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS {schema} CASCADE"
    )))
    .execute(&mut conn)
    .await?;
    Ok(())
}

/// Deletes every Redis key that starts with `prefix`.
pub async fn delete_keys(redis_url: &str, prefix: &str) -> Result<u64> {
    let client = redis::Client::open(redis_url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut cursor: u64 = 0;
    let mut deleted = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await?;
        if !keys.is_empty() {
            let n: u64 = redis::cmd("UNLINK")
                .arg(&keys)
                .query_async(&mut conn)
                .await?;
            deleted += n;
        }
        if next == 0 {
            return Ok(deleted);
        }
        cursor = next;
    }
}

/// Reads `synchronous_commit` and `fsync` through `url`, the URL the server is given; refuses both
/// off, as the Postgres floor does: the figures compare durable commits only.
async fn durable_commits(url: &str) -> Result<String> {
    let mut conn = sqlx::PgConnection::connect(url)
        .await
        .with_context(|| format!("connecting to {}", redact(url)))?;
    let (sync, fsync) = crate::baseline::commit_settings(&mut conn).await?;
    let _ = conn.close().await;
    if sync != "on" || fsync != "on" {
        bail!(
            "nerve-server's Postgres connections would have synchronous_commit={sync} fsync={fsync}; \
             both must be on for its commits to be durable (as the raw baseline's and the floor's are)"
        );
    }
    Ok(format!("synchronous_commit={sync} fsync={fsync}"))
}

/// Hides the password of a URL for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Finds the server binary: the flag, or `nerve-server` next to this executable.
pub fn find_binary(flag: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(path) = flag {
        if path.is_file() {
            return Ok(path);
        }
        bail!("nerve-server binary {} does not exist", path.display());
    }
    let exe = std::env::current_exe().context("locating this executable")?;
    let sibling = exe
        .parent()
        .map(|d| d.join("nerve-server"))
        .ok_or_else(|| anyhow!("no parent directory of {}", exe.display()))?;
    if sibling.is_file() {
        return Ok(sibling);
    }
    bail!(
        "nerve-server not found next to {} (build it with `cargo build -p nerve`, or pass --server-bin)",
        exe.display()
    )
}

/// Starts a server process whose stderr announces `addr=<socket address>` on a line containing
/// `announcement` once it listens (other listeners, such as metrics, announce theirs too), and waits
/// for that line; then keeps draining stderr (so the server never blocks on a full pipe), echoing the
/// lines `echo` picks.
pub async fn spawn_listening(
    mut command: tokio::process::Command,
    name: &'static str,
    announcement: &'static str,
    echo: impl Fn(&str) -> bool + Send + 'static,
) -> Result<(tokio::process::Child, u32, SocketAddr)> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    let pid = child.id().ok_or_else(|| anyhow!("{name} exited at once"))?;
    let stderr = child
        .stderr
        .take()
        .ok_or_else(|| anyhow!("no stderr pipe"))?;
    let mut lines = BufReader::new(stderr).lines();
    let mut seen = Vec::new();
    let addr = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(rest) = line
                .contains(announcement)
                .then(|| line.split("addr=").nth(1))
                .flatten()
            {
                let addr = rest.split_whitespace().next().unwrap_or_default();
                return addr
                    .parse::<SocketAddr>()
                    .with_context(|| format!("listen address in {line:?}"));
            }
            seen.push(line);
        }
        bail!("{name} exited before listening:\n{}", seen.join("\n"))
    })
    .await
    .map_err(|_| anyhow!("{name} did not listen within 30 s"))??;
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            if echo(&line) {
                eprintln!("[{name}] {line}");
            }
        }
    });
    Ok((child, pid, addr))
}

impl ServerProcess {
    /// Starts a server on the given backend and waits until it listens.
    pub async fn spawn(
        binary: &std::path::Path,
        backend: Backend,
        database_url: Option<&str>,
        redis_url: Option<&str>,
        show_logs: bool,
    ) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("nerve-bench-")
            .tempdir()
            .context("creating a data directory")?;
        let mut command = tokio::process::Command::new(binary);
        command
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(dir.path())
            .env("NERVE_LOG_LEVEL", "info")
            .env_remove("RUST_LOG")
            // recording metrics costs the server CPU: every figure is measured without them
            .env_remove("NERVE_METRICS__LISTEN");
        let mut cleanup = None;
        let mut commit_settings = None;
        if backend == Backend::Production {
            let database_url = database_url.ok_or_else(|| {
                anyhow!(
                    "the postgres+redis backend needs --database-url (or NERVE_TEST_DATABASE_URL)"
                )
            })?;
            let redis_url = redis_url.ok_or_else(|| {
                anyhow!("the postgres+redis backend needs --redis-url (or NERVE_TEST_REDIS_URL)")
            })?;
            let schema = create_schema(database_url, "nerve_bench").await?;
            // as the raw baseline's and the floor's connections: every commit waits for its WAL flush
            let store_url =
                url_with_options(database_url, &schema, &[("synchronous_commit", "on")]);
            let settings = match durable_commits(&store_url).await {
                Ok(settings) => settings,
                Err(e) => {
                    let _ = drop_schema(database_url, &schema).await;
                    return Err(e);
                }
            };
            commit_settings = Some(settings);
            let key_prefix = format!("nerve-bench:{}", uuid::Uuid::new_v4().simple());
            command
                .arg("--store")
                .arg(&store_url)
                .arg("--streams")
                .arg(redis_url)
                .env("NERVE_REDIS__KEY_PREFIX", &key_prefix);
            cleanup = Some(Scratch {
                database_url: database_url.to_owned(),
                schema,
                redis_url: redis_url.to_owned(),
                key_prefix,
            });
        }
        let (child, pid, addr) =
            spawn_listening(command, "nerve-server", "nerve listening", move |line| {
                show_logs || line.contains("ERROR") || line.contains(" WARN")
            })
            .await
            .with_context(|| binary.display().to_string())?;
        Ok(ServerProcess {
            child,
            addr,
            pid,
            _dir: dir,
            cleanup,
            commit_settings,
        })
    }

    /// Postgres + Redis: the database URL and the schema the server stores in.
    pub fn store_schema(&self) -> Option<(&str, &str)> {
        self.cleanup
            .as_ref()
            .map(|s| (s.database_url.as_str(), s.schema.as_str()))
    }

    /// Stops the server with SIGTERM (SIGKILL after 15 s), then removes its schema and keys.
    pub async fn stop(mut self) -> Result<()> {
        let _ = tokio::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .status()
            .await;
        if tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .is_err()
        {
            eprintln!(
                "nerve-bench: server {} ignored SIGTERM; killing it",
                self.pid
            );
            self.child.start_kill()?;
            self.child.wait().await?;
        }
        if let Some(s) = self.cleanup.take() {
            drop_schema(&s.database_url, &s.schema)
                .await
                .with_context(|| format!("dropping schema {}", s.schema))?;
            delete_keys(&s.redis_url, &s.key_prefix)
                .await
                .with_context(|| format!("deleting redis keys {}*", s.key_prefix))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_address_is_read_from_the_line_that_announces_the_server() {
        // nerve-server with metrics on announces the metrics listener first
        let mut command = tokio::process::Command::new("sh");
        command.arg("-c").arg(
            "echo 'INFO metrics listening on /metrics addr=127.0.0.1:9001' >&2; \
             echo 'INFO nerve listening addr=127.0.0.1:9002 tls=false' >&2; sleep 30",
        );
        let (_child, _pid, addr) = spawn_listening(command, "sh", "nerve listening", |_| false)
            .await
            .expect("spawn");
        assert_eq!(addr, SocketAddr::from(([127, 0, 0, 1], 9002)));
    }

    /// Needs NERVE_TEST_DATABASE_URL (scripts/test.sh starts Postgres and sets it).
    #[tokio::test]
    async fn a_server_url_whose_commits_do_not_wait_for_the_wal_is_refused() {
        let url = std::env::var("NERVE_TEST_DATABASE_URL")
            .expect("NERVE_TEST_DATABASE_URL is not set: run scripts/test.sh");
        let on = url_with_options(&url, "public", &[("synchronous_commit", "on")]);
        assert_eq!(
            durable_commits(&on).await.expect("durable"),
            "synchronous_commit=on fsync=on"
        );
        let off = url_with_options(&url, "public", &[("synchronous_commit", "off")]);
        let refused = durable_commits(&off).await.expect_err("refused");
        assert!(
            refused.to_string().contains("synchronous_commit=off"),
            "{refused}"
        );
    }
}
