//! The peer comparison: NATS JetStream with file storage, publishes awaiting their acks, the same payloads
//! (the protobuf-encoded events Nerve receives) and the same ids as de-duplication keys (Nats-Msg-Id).

use std::{net::TcpListener, path::PathBuf, process::Stdio, sync::Arc, time::Duration};

use anyhow::{Context as _, Result, anyhow, bail};
use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use prost::Message as _;

use crate::{
    Args,
    procstat::Meter,
    report::Row,
    util::{Call, closed_loop, event, load_row, now_ns},
};

/// Finds nats-server: the flag, PATH, or ~/.cache/nerve-tools/bin.
pub fn find_binary(flag: Option<PathBuf>) -> Option<PathBuf> {
    if let Some(p) = flag {
        return p.is_file().then_some(p);
    }
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("nats-server"))
                .collect()
        })
        .unwrap_or_default();
    candidates.push(PathBuf::from("/usr/sbin/nats-server"));
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".cache/nerve-tools/bin/nats-server"));
    }
    // the newest one found: 2.10+ can fsync before acking
    candidates
        .into_iter()
        .filter(|p| p.is_file())
        .max_by_key(|p| version(p).map(|(major, minor, _)| (major, minor)))
}

/// `nats-server --version`, e.g. "2.10.22".
pub fn version(binary: &std::path::Path) -> Option<(u32, u32, String)> {
    let out = std::process::Command::new(binary)
        .arg("--version")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    // "nats-server: v2.10.22"
    let v = text
        .split_whitespace()
        .last()?
        .trim_start_matches('v')
        .to_owned();
    let mut parts = v.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor, v))
}

/// A nats-server with JetStream on a temp store directory.
pub struct NatsServer {
    child: tokio::process::Child,
    pub url: String,
    _dir: tempfile::TempDir,
}

impl NatsServer {
    /// Starts nats-server on 127.0.0.1; `sync_always` makes JetStream fsync every write before it acks
    /// (`sync_interval: always`, nats-server 2.10+).
    pub async fn start(binary: &std::path::Path, sync_always: bool) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("nerve-bench-nats-")
            .tempdir()?;
        let port = {
            let l = TcpListener::bind("127.0.0.1:0")?;
            l.local_addr()?.port()
        };
        let store = dir.path().join("js");
        let config = dir.path().join("nats.conf");
        let sync = if sync_always {
            "  sync_interval: always\n"
        } else {
            ""
        };
        std::fs::write(
            &config,
            format!(
                "listen: 127.0.0.1:{port}\njetstream {{\n  store_dir: \"{}\"\n{sync}}}\n",
                store.display()
            ),
        )?;
        let child = tokio::process::Command::new(binary)
            .arg("-c")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let url = format!("nats://127.0.0.1:{port}");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                break;
            }
            if std::time::Instant::now() > deadline {
                bail!("nats-server did not listen on {port} within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(NatsServer {
            child,
            url,
            _dir: dir,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// Publish throughput on JetStream for every batch size x publisher count: a batch is `batch`
/// publishes sent back to back whose acks are then awaited together (JetStream has no atomic batch in
/// this client; this is its fastest way to have `batch` messages acknowledged).
pub async fn publish_matrix(
    server: &NatsServer,
    label: &str,
    args: &Args,
    run: &str,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let (payload_size, ids) = (args.payload_size, args.ids);
    let mut clients = Vec::new();
    for _ in 0..args.connections.max(1) {
        clients.push(
            async_nats::connect(&server.url)
                .await
                .map_err(|e| anyhow!("connecting to nats: {e}"))?,
        );
    }
    let js = jetstream::new(clients[0].clone());
    js.create_stream(jetstream::stream::Config {
        name: "BENCH".to_owned(),
        subjects: vec!["bench.>".to_owned()],
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| anyhow!("creating the JetStream stream: {e}"))?;
    let contexts: Arc<Vec<jetstream::Context>> =
        Arc::new(clients.iter().map(|c| jetstream::new(c.clone())).collect());
    for &batch in &args.batch_sizes {
        for &p in &args.publishers {
            let contexts = contexts.clone();
            let prefix = format!("{run}-nats-b{batch}-p{p}");
            let call: Call = Arc::new(move |w, k| {
                let js = contexts[w % contexts.len()].clone();
                let stamp = now_ns();
                let messages: Vec<(String, Bytes)> = (0..batch)
                    .map(|j| {
                        let id = ids.name(|| format!("{prefix}-{w}-{k}-{j}"));
                        let e = event(id.clone(), "bench.publish.v1", k, payload_size, stamp);
                        (id, Bytes::from(e.encode_to_vec()))
                    })
                    .collect();
                Box::pin(async move {
                    let mut acks = Vec::with_capacity(messages.len());
                    for (id, payload) in messages {
                        acks.push(
                            js.send_publish(
                                "bench.publish.v1",
                                PublishMessage::build().payload(payload).message_id(id),
                            )
                            .await
                            .map_err(|e| anyhow!("publish: {e}"))?,
                        );
                    }
                    let n = acks.len() as u64;
                    for ack in acks {
                        ack.await.map_err(|e| anyhow!("publish ack: {e}"))?;
                    }
                    Ok(n)
                })
            });
            let meter = Meter::start(server.pid());
            let r = closed_loop(p, args.duration, call).await;
            let row = Row::new("publish", label, format!("batch={batch} publishers={p}"));
            rows.push(load_row(row, &r, &meter));
        }
    }
    Ok(())
}
