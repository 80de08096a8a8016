//! Raft messages between replicas: one sender task per peer, and the receiving service.

use super::*;

/// A sender task for one remote peer, with a bounded queue: a slow peer drops messages (Raft
/// retransmits) instead of blocking the loop. It ends when its queue's sender is dropped.
pub(super) fn spawn_sender(id: u64, addr: &str, cluster_id: &str, cfg: &CoordinatorConfig, inbox: mpsc::Sender<Input>) -> Option<mpsc::Sender<RaftMessage>> {
    let bearer = crate::client::Bearer::new(cfg.peer_token().as_deref()).ok()?;
    let (tx, mut rx) = mpsc::channel::<RaftMessage>(1024);
    let ep = match crate::tls::endpoint(addr, cfg.tls.as_ref()) {
        Ok(ep) => ep,
        Err(e) => {
            tracing::error!(peer = id, %addr, error = %e, "bad peer address");
            return None;
        }
    };
    let channel = ep.with(|ep| ep.connect_timeout(Duration::from_secs(1))).connect_lazy();
    let cluster_id = cluster_id.to_string();
    tokio::spawn(async move {
        let mut client = RaftTransportClient::with_interceptor(channel, bearer).max_encoding_message_size(MAX_MESSAGE);
        // The open stream to the peer: batches go in here; None until (re)opened.
        let mut stream: Option<mpsc::Sender<RaftBatch>> = None;
        let mut last_open = Instant::now() - Duration::from_secs(1);
        while let Some(first) = rx.recv().await {
            // Everything queued for this peer goes as one batch.
            let mut batch = vec![first];
            while batch.len() < RAFT_BATCH {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            let mut messages = Vec::with_capacity(batch.len());
            for m in batch {
                let Ok(bytes) = m.write_to_bytes() else { continue };
                if m.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot {
                    // Streamed in pieces on a call of its own (no message size limit); raft
                    // hears how it went, and sends another after a failure.
                    let chunks: Vec<RaftChunk> = bytes.chunks(SNAPSHOT_PIECE).map(|c| RaftChunk { cluster_id: cluster_id.clone(), data: c.to_vec() }).collect();
                    let sent = tokio::time::timeout(Duration::from_secs(120), client.send_stream(tokio_stream::iter(chunks))).await;
                    let delivered = matches!(sent, Ok(Ok(_)));
                    if !delivered {
                        tracing::warn!(peer = id, bytes = bytes.len(), "snapshot transfer failed");
                    }
                    let _ = inbox.send(Input::SnapshotSent { to: id, delivered }).await;
                } else {
                    messages.push(bytes);
                }
            }
            if messages.is_empty() {
                continue;
            }
            if stream.as_ref().is_none_or(|s| s.is_closed()) {
                // (Re)open at most every 100 ms; meanwhile messages are dropped: raft resends.
                if last_open.elapsed() < Duration::from_millis(100) {
                    continue;
                }
                last_open = Instant::now();
                let (tx, rx) = mpsc::channel::<RaftBatch>(256);
                let mut c = client.clone();
                tokio::spawn(async move {
                    if let Err(e) = c.stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await {
                        tracing::debug!(peer = id, error = %e.message(), "raft stream ended");
                    }
                });
                stream = Some(tx);
            }
            let batch = RaftBatch { cluster_id: cluster_id.clone(), messages };
            // A peer that falls behind slows this task (the Ready loop never waits: its queue
            // to here drops when full); a broken stream is reopened, and raft resends.
            let sent = match stream.as_ref() {
                Some(s) => tokio::time::timeout(Duration::from_secs(1), s.send(batch)).await,
                None => continue,
            };
            if !matches!(sent, Ok(Ok(()))) {
                stream = None;
            }
        }
    });
    Some(tx)
}

/// One sender per other member, following the group as it changes.
pub(super) struct Senders(pub(super) HashMap<u64, (String, mpsc::Sender<RaftMessage>)>);

impl Senders {
    pub(super) fn sync(&mut self, shared: &Shared) {
        let addresses = shared.addresses.read().expect("addresses lock").clone();
        self.0.retain(|id, (addr, _)| addresses.get(id) == Some(addr));
        for (id, addr) in addresses {
            if id != shared.cfg.id && !self.0.contains_key(&id) {
                if let Some(tx) = spawn_sender(id, &addr, &shared.cluster_id, &shared.cfg, shared.inbox.clone()) {
                    self.0.insert(id, (addr, tx));
                }
            }
        }
    }

    pub(super) fn send(&self, m: RaftMessage) {
        if let Some((_, tx)) = self.0.get(&m.to) {
            let _ = tx.try_send(m);
        }
    }
}

impl Api {
    /// Checks a Raft message from a peer and hands it to the Ready loop; anything that is not
    /// a message of this cluster, from a member, for this node, is refused and counted; so is
    /// one whose `from` is not the node whose peer token the connection showed (`peer`; None
    /// without credentials).
    pub(super) fn accept(&self, env: RaftEnvelope, peer: Option<u64>) -> Result<Response<Ack>, Status> {
        let me = self.0.cfg.id;
        let refuse = |why: String| {
            self.0.dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!(%why, "raft message dropped");
            Err(Status::invalid_argument(why))
        };
        if env.cluster_id != self.0.cluster_id {
            return refuse(format!("raft message of cluster {:?}; this is cluster {}", env.cluster_id, self.0.cluster_id));
        }
        let m = match RaftMessage::parse_from_bytes(&env.message) {
            Ok(m) => m,
            Err(e) => return refuse(format!("not a raft message: {e}")),
        };
        if let Some(p) = peer.filter(|p| *p != m.from) {
            return refuse(format!("raft message from node {} on node {p}'s connection", m.from));
        }
        if m.to != me {
            return refuse(format!("raft message for node {}; this is node {me}", m.to));
        }
        if m.from == me || !self.0.addresses.read().expect("addresses lock").contains_key(&m.from) {
            return refuse(format!("raft message from node {}, which is no member of this group", m.from));
        }
        // Before the Ready loop runs (an empty folder waiting to start) nothing is taken, and
        // a full inbox drops the message: Raft retransmits.
        if *self.0.phase.read().expect("phase lock") == Phase::Running {
            let _ = self.0.inbox.try_send(Input::Raft(m));
        }
        Ok(Response::new(Ack {}))
    }
}

/// Snapshot streams received at once.
static SNAPSHOT_STREAMS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

#[tonic::async_trait]
impl RaftTransport for Api {
    async fn hello(&self, r: Request<PeerHello>) -> Result<Response<PeerHello>, Status> {
        let peer = auth::caller(&self.0, &r)?.node;
        let h = r.into_inner();
        if let Some(p) = peer.filter(|p| *p != h.node_id) {
            self.0.dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(Status::permission_denied(format!("a hello from node {} on node {p}'s connection", h.node_id)));
        }
        if h.cluster_id != self.0.cluster_id {
            return Err(Status::invalid_argument(format!("a hello of cluster {:?}; this is cluster {}", h.cluster_id, self.0.cluster_id)));
        }
        let phase = *self.0.phase.read().expect("phase lock");
        // A peer that is fresh while this replica is too: they confirm each other, so when
        // one of them starts on the other's word, the other has its word as well.
        if h.fresh && phase == Phase::Fresh && self.0.cfg.peers.contains_key(&h.node_id) && h.node_id != self.0.cfg.id {
            self.0.fresh_peers.lock().expect("fresh lock").insert(h.node_id);
        }
        let v = self.0.view.read().expect("view lock");
        Ok(Response::new(PeerHello {
            cluster_id: self.0.cluster_id.clone(),
            node_id: self.0.cfg.id,
            fresh: phase == Phase::Fresh,
            term: v.term,
            commit: v.commit,
            last_index: v.last_index,
        }))
    }

    async fn send(&self, r: Request<RaftEnvelope>) -> Result<Response<Ack>, Status> {
        let peer = auth::caller(&self.0, &r)?.node;
        self.accept(r.into_inner(), peer)
    }

    async fn stream(&self, r: Request<tonic::Streaming<RaftBatch>>) -> Result<Response<Ack>, Status> {
        let peer = auth::caller(&self.0, &r)?.node;
        let mut stream = r.into_inner();
        while let Some(batch) = stream.message().await? {
            for message in batch.messages {
                // A bad message is refused and counted; the stream goes on.
                let _ = self.accept(RaftEnvelope { message, cluster_id: batch.cluster_id.clone() }, peer);
            }
        }
        Ok(Response::new(Ack {}))
    }

    async fn send_stream(&self, r: Request<tonic::Streaming<RaftChunk>>) -> Result<Response<Ack>, Status> {
        // One snapshot stream at a time is buffered (a leader sends at most one per follower).
        let Ok(_permit) = SNAPSHOT_STREAMS.try_acquire() else {
            return Err(Status::resource_exhausted("another snapshot is being received; retry"));
        };
        let peer = auth::caller(&self.0, &r)?.node;
        let mut stream = r.into_inner();
        let mut env = RaftEnvelope { cluster_id: self.0.cluster_id.clone(), ..Default::default() };
        while let Some(chunk) = stream.message().await? {
            // Every piece names this cluster, checked before a byte of it is kept.
            if chunk.cluster_id != self.0.cluster_id {
                self.0.dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Err(Status::invalid_argument(format!("raft message of cluster {:?}; this is cluster {}", chunk.cluster_id, self.0.cluster_id)));
            }
            if env.message.len() + chunk.data.len() > MAX_SNAPSHOT {
                self.0.dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Err(Status::invalid_argument(format!("a streamed raft message over {MAX_SNAPSHOT} bytes")));
            }
            env.message.extend_from_slice(&chunk.data);
        }
        self.accept(env, peer)
    }
}
