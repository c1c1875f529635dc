//! The gRPC floors: servers of Nerve's own `EventBus` protocol that check nothing and hand every
//! published event to every open subscription from memory. The latency scenario runs against them
//! unchanged, over Publish calls or a PublishStream as it does against Nerve.
//! - [`SYSTEM`] stores nothing: what tonic, HTTP/2 and this tool cost on this machine before any bus
//!   work.
//! - [`DURABLE_SYSTEM`] also group-commits: one thread appends each batch of waiting publishes to a log
//!   file (one `pwrite` into a preallocated region, so no commit changes the file's size) and
//!   `fdatasync`s it once, then hands their events on and answers the publishes. That is the least a
//!   durable event bus served over gRPC does, with no index, no sequence bookkeeping and no checks.
//!
//! Each runs in a process of its own (this executable, started with `--serve-grpc-floor`), as
//! `nerve-server` does, so it does not share the tool's runtime.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use anyhow::{Context as _, Result};
use futures::Stream;
use nerve::api::pb::{
    self,
    event_bus_server::{EventBus, EventBusServer},
    subscribe_request::Action,
    subscribe_response::Message,
};
use tokio::{
    net::TcpListener,
    sync::{broadcast, mpsc, oneshot},
};
use tokio_stream::{
    StreamExt as _,
    wrappers::{ReceiverStream, TcpListenerStream},
};
use tonic::{Request, Response, Status, Streaming};

/// The row name of the in-memory floor's measurements.
pub const SYSTEM: &str = "grpc floor (raw)";
/// The row name of the group-committing floor's measurements.
pub const DURABLE_SYSTEM: &str = "grpc floor + fdatasync (raw)";

/// Bytes of the durable floor's log region, written round and round.
const LOG_REGION: u64 = 64 << 20;

/// Published events waiting for slow subscriptions; a subscription further behind ends with an error
/// (Nerve has flow control instead; the latency scenario's one reader keeps up, or the row says so).
const BACKLOG: usize = 65_536;

#[derive(Clone)]
struct Floor {
    events: broadcast::Sender<Arc<pb::Event>>,
    sequence: Arc<AtomicU64>,
    /// The durable floor's log thread.
    log: Option<std::sync::mpsc::Sender<Append>>,
}

/// Published events waiting for the log.
struct Append {
    events: Vec<pb::Event>,
    done: oneshot::Sender<()>,
}

/// The durable floor's group commit: takes every waiting publish, writes their events with one
/// `pwrite`, syncs once, then hands the events on and answers the publishes.
fn log_thread(
    log: std::fs::File,
    appends: std::sync::mpsc::Receiver<Append>,
    events: broadcast::Sender<Arc<pb::Event>>,
) -> std::io::Result<()> {
    use prost::Message as _;
    use std::os::unix::fs::FileExt as _;
    let mut at = 0u64;
    let mut buf = Vec::new();
    while let Ok(first) = appends.recv() {
        let mut batch = vec![first];
        batch.extend(appends.try_iter());
        buf.clear();
        for append in &batch {
            for event in &append.events {
                event.encode_length_delimited(&mut buf)?;
            }
        }
        // a batch above the whole region (64 MiB of events at once) would grow the file; the
        // latency scenario's batches are a few KiB
        if at + buf.len() as u64 > LOG_REGION {
            at = 0;
        }
        log.write_all_at(&buf, at)?;
        log.sync_data()?;
        at += buf.len() as u64;
        for append in batch {
            for event in append.events {
                let _ = events.send(Arc::new(event));
            }
            let _ = append.done.send(());
        }
    }
    Ok(())
}

impl Floor {
    /// Numbers a batch and hands it to the log (or straight on, in memory); the future answers it once
    /// it is stored.
    fn queue(
        &self,
        events: Vec<pb::Event>,
    ) -> Result<
        impl std::future::Future<Output = Result<pb::PublishResponse, Status>> + use<>,
        Status,
    > {
        let first = self
            .sequence
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        let results = events
            .iter()
            .zip(first + 1..)
            .map(|(event, sequence)| pb::PublishResult {
                id: event.id.clone(),
                sequence,
                duplicate: false,
            })
            .collect();
        let stored = match &self.log {
            Some(log) => {
                let (done, stored) = oneshot::channel();
                log.send(Append { events, done })
                    .map_err(|_| Status::unavailable("the log thread stopped"))?;
                Some(stored)
            }
            None => {
                for event in events {
                    // no subscription open is not an error: the event is simply not delivered
                    let _ = self.events.send(Arc::new(event));
                }
                None
            }
        };
        Ok(async move {
            if let Some(stored) = stored {
                stored
                    .await
                    .map_err(|_| Status::unavailable("the log thread failed"))?;
            }
            Ok(pb::PublishResponse { results })
        })
    }
}

type Deliveries = Pin<Box<dyn Stream<Item = Result<pb::SubscribeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl EventBus for Floor {
    async fn publish(
        &self,
        request: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        Ok(Response::new(
            self.queue(request.into_inner().events)?.await?,
        ))
    }

    type PublishStreamStream =
        Pin<Box<dyn Stream<Item = Result<pb::PublishStreamResponse, Status>> + Send>>;

    async fn publish_stream(
        &self,
        request: Request<Streaming<pb::PublishStreamRequest>>,
    ) -> Result<Response<Self::PublishStreamStream>, Status> {
        let mut inbound = request.into_inner();
        let floor = self.clone();
        let (tx, rx) = mpsc::channel(256);
        // as Nerve does: requests queued in the order read, answered in that order as they are stored
        tokio::spawn(async move {
            let mut queued = futures::stream::FuturesOrdered::new();
            let mut reading = true;
            loop {
                tokio::select! {
                    message = inbound.message(), if reading && queued.len() < 1024 => match message {
                        Ok(Some(request)) => {
                            let request_id = request.request_id;
                            let stored = floor.queue(request.events);
                            queued.push_back(async move {
                                let published = match stored {
                                    Ok(stored) => stored.await,
                                    Err(status) => Err(status),
                                };
                                nerve::api::convert::publish_answer(request_id, published)
                            });
                        }
                        Ok(None) => reading = false,
                        Err(_) => return,
                    },
                    Some(answer) = queued.next() => {
                        if tx.send(Ok(answer)).await.is_err() {
                            return;
                        }
                    }
                    else => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type SubscribeStream = Deliveries;

    async fn subscribe(
        &self,
        request: Request<Streaming<pb::SubscribeRequest>>,
    ) -> Result<Response<Deliveries>, Status> {
        let mut inbound = request.into_inner();
        match inbound.message().await? {
            Some(pb::SubscribeRequest {
                action: Some(Action::Open(_)),
            }) => {}
            _ => return Err(Status::invalid_argument("the first message must be open")),
        }
        let mut events = self.events.subscribe();
        let (tx, rx) = mpsc::channel(1024);
        let subscribed = pb::SubscribeResponse {
            message: Some(Message::Subscribed(pb::Subscribed::default())),
        };
        let _ = tx.send(Ok(subscribed)).await;
        // acks and credits are read and dropped: nothing is held for redelivery
        tokio::spawn(async move { while let Ok(Some(_)) = inbound.message().await {} });
        tokio::spawn(async move {
            let mut n = 0u64;
            loop {
                let event = match events.recv().await {
                    Ok(event) => event,
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        let _ = tx
                            .send(Err(Status::resource_exhausted(format!(
                                "subscriber fell {missed} events behind"
                            ))))
                            .await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                n += 1;
                let delivery = pb::SubscribeResponse {
                    message: Some(Message::Delivery(pb::Delivery {
                        event: Some((*event).clone()),
                        delivery_id: n.to_string(),
                        attempt: 1,
                        ack_deadline: None,
                    })),
                };
                if tx.send(Ok(delivery)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn request(
        &self,
        _: Request<pb::RequestRequest>,
    ) -> Result<Response<pb::RequestResponse>, Status> {
        Err(unserved())
    }

    async fn reply(
        &self,
        _: Request<pb::ReplyRequest>,
    ) -> Result<Response<pb::ReplyResponse>, Status> {
        Err(unserved())
    }

    type ReplayStream = Pin<Box<dyn Stream<Item = Result<pb::ReplayResponse, Status>> + Send>>;

    async fn replay(
        &self,
        _: Request<pb::ReplayRequest>,
    ) -> Result<Response<Self::ReplayStream>, Status> {
        Err(unserved())
    }
}

/// Serves a floor on a free loopback port until killed; prints `addr=<address>` on stderr once it
/// listens, as `nerve-server` does. With `log_dir`, the durable floor, its log file in that directory.
pub async fn serve(log_dir: Option<&std::path::Path>) -> Result<()> {
    let (events, _) = broadcast::channel(BACKLOG);
    let log = match log_dir {
        Some(dir) => {
            // unnamed: gone with the process, which the tool kills
            let file = tempfile::tempfile_in(dir).context("creating the floor's log")?;
            crate::baseline::preallocate(&file, LOG_REGION)?;
            let (tx, rx) = std::sync::mpsc::channel();
            let events = events.clone();
            std::thread::spawn(move || {
                if let Err(e) = log_thread(file, rx, events) {
                    eprintln!("the log thread failed: {e}");
                }
            });
            Some(tx)
        }
        None => None,
    };
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    eprintln!("listening addr={}", listener.local_addr()?);
    let floor = Floor {
        events,
        sequence: Arc::new(AtomicU64::new(0)),
        log,
    };
    tonic::transport::Server::builder()
        .add_service(
            EventBusServer::new(floor)
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
        )
        .serve_with_incoming(TcpListenerStream::new(listener).map(|tcp| {
            // as nerve-server does: small messages leave at once
            if let Ok(tcp) = &tcp {
                let _ = tcp.set_nodelay(true);
            }
            tcp
        }))
        .await?;
    Ok(())
}

/// The answer to every call but Publish and Subscribe.
fn unserved() -> Status {
    Status::unimplemented("the gRPC floor serves Publish and Subscribe only")
}

/// A running floor server.
pub struct FloorProcess {
    _child: tokio::process::Child,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its process id, for its CPU and RSS.
    pub pid: u32,
}

impl FloorProcess {
    /// Starts this executable as a floor server and waits until it listens; `durable` for the
    /// group-committing one, its log in the temporary directory (where the embedded server's data is).
    pub async fn spawn(durable: bool) -> Result<Self> {
        let exe = std::env::current_exe().context("locating this executable")?;
        let mut command = tokio::process::Command::new(exe);
        command.arg("--serve-grpc-floor");
        if durable {
            command.arg("--floor-log-dir").arg(std::env::temp_dir());
        }
        let (child, pid, addr) =
            crate::server::spawn_listening(command, "grpc floor", |_| true).await?;
        Ok(FloorProcess {
            _child: child,
            addr,
            pid,
        })
    }
}
