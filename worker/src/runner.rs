//! The worker process: registers with the coordinator, heartbeats, and runs whatever its
//! assignment says (one training task at a time), reporting progress and the outcome.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use shoal_coordinator::client::WorkerId;
use shoal_coordinator::{Client, ClientError};
use shoal_proto::{
    Assignment, CheckpointCommit, CheckpointError, CheckpointManifest, DeregisterRequest, HeartbeatRequest, JobProgress, OutcomeReport,
    ProgressReport, RankResult, RegisterWorkerRequest,
};

use crate::checkpoint::JobLink;
use crate::collective::secure::DataPlaneTls;
use crate::collective::{host_id, Incoming, Mailbox};
use crate::train::{train, StateSlot, TrainTask};
use crate::WorkerError;

#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub endpoints: Vec<String>,
    /// The data-plane address peers dial; None: the listener's own address.
    pub advertise: Option<String>,
    /// The raw-TCP ring's port, on the data plane's address (0: one the system picks).
    pub ring_port: u16,
    /// The store, with the shard cache of an object store.
    pub store: shoal_core::store::Store,
    pub device: String,
    pub heartbeat: Duration,
    pub collective_timeout: Duration,
    /// The worker token its calls carry (None: a coordinator without credentials).
    pub token: Option<String>,
    /// Its certificate for mutual TLS with the coordinators (None: plaintext).
    pub tls: Option<shoal_coordinator::tls::TlsFiles>,
}

struct Running {
    job: u64,
    generation: u64,
    /// `training` or `batch` (the worker's state in `shoal_worker_state`).
    kind: &'static str,
    cancel: Arc<AtomicBool>,
    handle: tokio::task::JoinHandle<()>,
}

/// Runs a worker until `shutdown` resolves. `listener` is its data-plane socket.
pub async fn run_worker(
    cfg: WorkerConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), WorkerError> {
    shoal_kernels::Device::parse(&cfg.device)?;
    let bound = listener.local_addr().map_err(|e| WorkerError::Io(e.to_string()))?.to_string();
    let address = cfg.advertise.clone().unwrap_or(bound);
    // The raw-TCP ring listens beside the data plane, on the same interface.
    let ring_listener = std::net::TcpListener::bind((listener.local_addr().map_err(|e| WorkerError::Io(e.to_string()))?.ip(), cfg.ring_port))
        .map_err(|e| WorkerError::Io(format!("binding the ring listener (port {}): {e}", cfg.ring_port)))?;
    // With credentials, both of the data plane's listeners speak mutual TLS.
    let tls = cfg.tls.as_ref().map(DataPlaneTls::new).transpose()?.map(Arc::new);
    let incoming = Incoming::start_with(ring_listener, tls.clone()).map_err(|e| WorkerError::Io(format!("ring listener: {e}")))?;
    let ring_port = incoming.address().rsplit(':').next().unwrap_or_default().to_string();
    let ring_address = match address.rsplit_once(':') {
        Some((host, _)) => format!("{host}:{ring_port}"),
        None => incoming.address().to_string(),
    };
    let host = host_id();
    // Segments of generations whose ranks were all killed stay in /dev/shm until someone
    // removes them: a worker that starts does.
    let removed = crate::collective::remove_stale_segments();
    if removed > 0 {
        tracing::info!(removed, "removed stale shared-memory segments of generations that are over");
    }
    let mailbox = Arc::new(Mailbox::default());
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let mut server_stop = stop_rx.clone();
    let stopped = async move {
        let _ = server_stop.changed().await;
    };
    let server = tokio::spawn(crate::collective::grpc::serve(listener, mailbox.clone(), cfg.tls.as_ref(), stopped)?);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });

    let client = Arc::new(Client::new(&cfg.endpoints).and_then(|c| c.with_token(cfg.token.as_deref())).and_then(|c| c.with_tls(cfg.tls.clone())).map_err(|e| WorkerError::Coordinator(e.to_string()))?);
    let mut worker_id: Option<WorkerId> = None;
    // One request id for every attempt of one registration: a retry after a lost reply gets
    // the same worker id back instead of leaving a ghost worker behind.
    let mut registration = shoal_coordinator::client::new_request_id();
    let mut running: Option<Running> = None;
    // A job's state kept across its generations (see TrainTask::retained).
    let retained = StateSlot::default();
    // Tasks told to stop and not yet stopped: the heartbeats go on meanwhile, and the next
    // task starts only when they are gone (they may hold the ring's listener claims).
    let mut stopping: Vec<Running> = Vec::new();
    // The coordinator's lease for this worker (it says so at registration), and when a
    // coordinator last answered a heartbeat.
    let mut lease = Duration::from_secs(5);
    let mut last_contact = std::time::Instant::now();
    let mut ticker = tokio::time::interval(cfg.heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A batch task that reported heartbeats at once: its commit may have handed this worker
    // the next task.
    let wake = Arc::new(tokio::sync::Notify::new());
    // ...or handed it the next task with its reply.
    let (handed_tx, mut handed_rx) = tokio::sync::mpsc::unbounded_channel::<Assignment>();
    let mut handed: Option<Assignment> = None;
    // The newest batch attempt started (job, attempt): an assignment older than it (a reply
    // or heartbeat overtaken by a later one) must not stop it and rerun a finished attempt.
    let mut newest_batch: Option<(u64, u64)> = None;
    let models = crate::batch::ModelCache::default();
    let mut last_learned = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = wake.notified() => {}
            Some(a) = handed_rx.recv() => handed = Some(a),
            _ = stop_rx.changed() => break,
        }
        for r in stopping.iter().filter(|r| r.handle.is_finished()) {
            mailbox.purge(r.job, r.generation);
        }
        stopping.retain(|r| !r.handle.is_finished());
        if last_learned.elapsed() >= Duration::from_secs(5) {
            // The coordinator group can change while this worker runs: keep up with it.
            last_learned = std::time::Instant::now();
            let learner = client.clone();
            tokio::spawn(async move {
                if let Ok(s) = learner.call(|mut c| async move { c.get_status(shoal_proto::StatusRequest { state_hash: false, members_only: true }).await }).await {
                    learner.learn(s.peers.into_iter().map(|p| p.address));
                }
            });
        }
        let id = match &worker_id {
            Some(id) => id.clone(),
            None => {
                let req = RegisterWorkerRequest {
                    address: address.clone(),
                    pid: std::process::id(),
                    device: cfg.device.clone(),
                    request_id: registration.clone(),
                    ring_address: ring_address.clone(),
                    host_id: host.clone(),
                };
                match client.call(|mut c| { let req = req.clone(); async move { c.register_worker(req).await } }).await {
                    Ok(r) => {
                        shoal_core::node::set_node(&r.worker_id);
                        tracing::info!(worker = %r.worker_id, %address, "registered");
                        let id = WorkerId::new(r.worker_id, &r.worker_key);
                        if r.lease_ms > 0 {
                            lease = Duration::from_millis(r.lease_ms);
                        }
                        last_contact = std::time::Instant::now();
                        worker_id = Some(id.clone());
                        id
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "registration failed; retrying");
                        continue;
                    }
                }
            }
        };
        // Bounded by the lease: a coordinator that hangs (rather than refusing) must not hold
        // this loop past the moment the task has to stop.
        let hb = match handed.take() {
            Some(a) => Ok(shoal_proto::HeartbeatResponse { assignment: Some(a), ..Default::default() }),
            None => {
                // What it runs, so an unchanged assignment comes back as a few bytes.
                let (job_id, generation) = running.as_ref().map(|r| (r.job, r.generation)).unwrap_or((0, 0));
                let hb = client.call(|mut c| { let worker_id = id.clone(); async move { c.heartbeat(worker_id.request(HeartbeatRequest { worker_id: worker_id.id.clone(), job_id, generation })).await } });
                match tokio::time::timeout(lease, hb).await {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(_) => Err(format!("no answer in {lease:?}")),
                }
            }
        };
        let hb = match hb {
            Ok(hb) => {
                last_contact = std::time::Instant::now();
                hb
            }
            Err(e) => {
                tracing::warn!(error = %e, "heartbeat failed");
                if last_contact.elapsed() >= lease {
                    // Every coordinator has been silent for a whole lease: they will declare
                    // this worker lost, and its job moves on without it. Training on would
                    // be training a generation that is over.
                    if let Some(r) = running.take() {
                        tracing::warn!(job = r.job, generation = r.generation, silent_for = ?last_contact.elapsed(),
                            "no coordinator answered for a whole lease; stopping the task");
                        r.cancel.store(true, Ordering::Relaxed);
                        stopping.push(r);
                    }
                    if worker_id.is_some() {
                        // The old id is lost by now (or will be); come back as a new worker.
                        worker_id = None;
                        registration = shoal_coordinator::client::new_request_id();
                    }
                }
                continue;
            }
        };
        if hb.unchanged && running.is_some() {
            // Still what it runs: nothing to start or stop.
            continue;
        }
        if hb.unknown_worker {
            tracing::warn!(worker = %id.id, "the coordinator no longer knows this worker; registering again");
            worker_id = None;
            registration = shoal_coordinator::client::new_request_id();
        }
        let want = hb.assignment.filter(|_| !hb.unknown_worker);
        if let (Some(a), Some((job, attempt))) = (&want, newest_batch) {
            if a.task.is_some() && a.job_id == job && a.generation < attempt {
                continue;
            }
        }
        let keep = matches!((&running, &want), (Some(r), Some(a)) if r.job == a.job_id && r.generation == a.generation);
        if !keep {
            if let Some(r) = running.take() {
                tracing::info!(job = r.job, generation = r.generation, "assignment ended; stopping its task");
                r.cancel.store(true, Ordering::Relaxed);
                stopping.push(r);
            }
            match want {
                Some(a) if a.task.is_some() => {
                    newest_batch = Some((a.job_id, a.generation));
                    running = Some(start_batch_task(&cfg, &id, a, client.clone(), models.clone(), wake.clone(), handed_tx.clone()))
                }
                Some(a) if stopping.is_empty() => {
                    running = Some(start_task(&cfg, &id, a, mailbox.clone(), incoming.clone(), tls.clone(), client.clone(), retained.clone()))
                }
                // Started on a later tick, once the stopped tasks are gone.
                Some(a) => tracing::debug!(job = a.job_id, generation = a.generation, "waiting for the previous task to stop"),
                None => {}
            }
        }
        shoal_core::telemetry::metrics().set_worker_state(running.as_ref().map_or("idle", |r| r.kind));
    }
    for r in running.iter().chain(&stopping) {
        r.cancel.store(true, Ordering::Relaxed);
    }
    if let Some(id) = worker_id {
        // Leaving on purpose: say so, so the job is requeued now rather than after the lease.
        let bye = client.call(|mut c| { let worker = id.clone(); async move { c.deregister(worker.request(DeregisterRequest { worker_id: worker.id.clone() })).await } });
        match tokio::time::timeout(Duration::from_secs(2), bye).await {
            Ok(Ok(_)) => tracing::info!(worker = %id.id, "deregistered"),
            Ok(Err(e)) => tracing::warn!(error = %e, "could not deregister"),
            Err(_) => tracing::warn!("could not deregister in time"),
        }
    }
    for r in running.into_iter().chain(stopping) {
        let _ = r.handle.await;
    }
    let _ = server.await;
    Ok(())
}

/// The training task's line to the coordinator, for one job generation.
struct CoordinatorLink {
    client: Arc<Client>,
    rt: tokio::runtime::Handle,
    worker: WorkerId,
    job: u64,
    generation: u64,
}

impl JobLink for CoordinatorLink {
    fn progress(&self, p: &JobProgress) {
        let report = ProgressReport { worker_id: self.worker.id.clone(), job_id: self.job, generation: self.generation, progress: Some(p.clone()) };
        let (c, worker) = (self.client.clone(), self.worker.clone());
        // Progress is best effort: a lost report is replaced by the next one.
        self.rt.spawn(async move {
            let _ = c.call(|mut c| { let r = worker.request(report.clone()); async move { c.report_progress(r).await } }).await;
        });
    }

    fn commit_checkpoint(&self, manifest: CheckpointManifest) -> Result<Vec<u64>, String> {
        let req = CheckpointCommit { worker_id: self.worker.id.clone(), job_id: self.job, generation: self.generation, manifest: Some(manifest) };
        let reply = self.rt.block_on(self.client.call(|mut c| { let r = self.worker.request(req.clone()); async move { c.commit_checkpoint(r).await } }));
        reply.map(|r| r.kept_steps).map_err(|e| e.to_string())
    }

    fn record_metrics(&self, chunk: shoal_proto::MetricChunkRef, dropped: u64) -> Result<(), String> {
        let req = shoal_proto::MetricChunkReport { worker_id: self.worker.id.clone(), job_id: self.job, chunk: Some(chunk), dropped };
        let reply = self.rt.block_on(self.client.call(|mut c| { let r = self.worker.request(req.clone()); async move { c.record_metrics(r).await } }));
        reply.map(|_| ()).map_err(|e| e.to_string())
    }

    fn checkpoint_failed(&self, step: u64, message: String, corrupt: bool) {
        let report = CheckpointError { worker_id: self.worker.id.clone(), job_id: self.job, generation: self.generation, step, message, corrupt };
        let (c, worker) = (self.client.clone(), self.worker.clone());
        self.rt.spawn(async move {
            if let Err(e) = c.call(|mut c| { let r = worker.request(report.clone()); async move { c.report_checkpoint_error(r).await } }).await {
                tracing::warn!(error = %e, "could not report a checkpoint error");
            }
        });
    }
}

#[allow(clippy::too_many_arguments)]
fn start_task(
    cfg: &WorkerConfig,
    worker: &WorkerId,
    a: Assignment,
    mailbox: Arc<Mailbox>,
    incoming: Arc<Incoming>,
    tls: Option<Arc<DataPlaneTls>>,
    client: Arc<Client>,
    retained: StateSlot,
) -> Running {
    let cancel = Arc::new(AtomicBool::new(false));
    let (job, generation, rank) = (a.job_id, a.generation, a.rank);
    tracing::info!(job, generation, rank, world = a.world_size, "starting task");
    let rt = tokio::runtime::Handle::current();
    let (wid, worker) = (worker.id.clone(), worker.clone());
    let link = Arc::new(CoordinatorLink { client: client.clone(), rt: rt.clone(), worker: worker.clone(), job, generation });
    let task = TrainTask {
        store: cfg.store.clone(),
        assignment: a,
        mailbox,
        incoming: Some(incoming),
        tls,
        cancel: cancel.clone(),
        collective_timeout: cfg.collective_timeout,
        link,
        report_every: Duration::from_millis(250),
        retained,
    };
    let cancel_flag = cancel.clone();
    let handle = tokio::task::spawn_blocking(move || {
        // A bug must fail the job (and say so), not leave it running with a dead thread.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| train(task, &rt))).unwrap_or_else(|panic| {
            let what = panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
            Err(WorkerError::Panicked(what.unwrap_or_else(|| "unknown panic".into())))
        });
        let report = match outcome {
            Err(WorkerError::Cancelled) => return,
            Err(e) if cancel_flag.load(Ordering::Relaxed) => {
                tracing::info!(error = %e, "task stopped after cancellation");
                return;
            }
            Ok(o) => {
                tracing::info!(job, rank, hash = %o.param_blake3, "task finished");
                OutcomeReport {
                    worker_id: wid.clone(),
                    job_id: job,
                    generation,
                    ok: true,
                    error: String::new(),
                    result: Some(RankResult { rank, worker_id: wid.clone(), param_blake3: o.param_blake3, model_path: o.model_path }),
                    progress: Some(o.progress),
                    peer_failure: false,
                    diverged: false,
                }
            }
            Err(e) => {
                let peer_failure = matches!(e, WorkerError::PeerGone(_));
                if peer_failure {
                    tracing::warn!(job, rank, error = %e, "a peer is gone; telling the coordinator");
                } else {
                    tracing::error!(job, rank, error = %e, "task failed");
                }
                let diverged = matches!(e, WorkerError::Diverged(_));
                OutcomeReport { worker_id: wid.clone(), job_id: job, generation, ok: false, error: e.to_string(), result: None, progress: None, peer_failure, diverged }
            }
        };
        rt.block_on(report_outcome(&client, &worker, report, &cancel_flag));
    });
    Running { job, generation, kind: "training", cancel, handle }
}

/// Runs one attempt of a batch task and reports it; an output the coordinator refuses (the
/// task was committed by another attempt) is removed.
fn start_batch_task(
    cfg: &WorkerConfig,
    worker: &WorkerId,
    a: Assignment,
    client: Arc<Client>,
    models: crate::batch::ModelCache,
    wake: Arc<tokio::sync::Notify>,
    handed: tokio::sync::mpsc::UnboundedSender<Assignment>,
) -> Running {
    let cancel = Arc::new(AtomicBool::new(false));
    let (job, generation) = (a.job_id, a.generation);
    let task = a.task.as_ref().map(|t| t.index).unwrap_or_default();
    tracing::info!(job, attempt = generation, task, "starting batch task");
    let rt = tokio::runtime::Handle::current();
    let (store, worker, cancel_flag) = (cfg.store.clone(), worker.clone(), cancel.clone());
    let handle = tokio::task::spawn_blocking(move || {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| crate::batch::run_task(&store, &a, &models, &cancel_flag))).unwrap_or_else(|panic| {
            let what = panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
            Err(WorkerError::Panicked(what.unwrap_or_else(|| "unknown panic".into())))
        });
        let (report, file) = match outcome {
            Err(_) if cancel_flag.load(Ordering::Relaxed) => return,
            Ok(o) => (o.report, o.file),
            Err(e) => {
                tracing::warn!(job, attempt = generation, task, error = %e, "batch task failed");
                (shoal_proto::TaskReport { job_id: job, attempt: generation, task, ok: false, error: e.to_string(), ..Default::default() }, None)
            }
        };
        let report = shoal_proto::TaskReport { worker_id: worker.id.clone(), ..report };
        let mut pause = Duration::from_millis(100);
        let mut tries_after_cancel = 0;
        loop {
            if cancel_flag.load(Ordering::Relaxed) {
                // Stopped: a report is owed only for an output written (it may be committed
                // yet); past a few tries the job's tidying removes it if it was not.
                tries_after_cancel += 1;
                if file.is_none() || tries_after_cancel > 5 {
                    return;
                }
            }
            match rt.block_on(client.call(|mut c| { let r = worker.request(report.clone()); async move { c.report_task(r).await } })) {
                Ok(reply) => {
                    if reply.job_ended {
                        crate::batch::tidy_output(&store, &reply.output_folder, &reply.keep);
                    }
                    match reply.next {
                        Some(next) => drop(handed.send(next)),
                        None => wake.notify_one(),
                    }
                    return;
                }
                // Refused for good (only the attempt that committed is ever answered OK; a
                // revoked token or a key for an id the worker no longer has is not retried).
                Err(ClientError::Rpc(s)) if matches!(s.code(), tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument | tonic::Code::NotFound | tonic::Code::Unimplemented | tonic::Code::PermissionDenied) => {
                    tracing::info!(job, attempt = generation, task, reason = %s.message(), "output not committed; removing it");
                    if let Some(f) = &file {
                        crate::batch::drop_output(&store, f);
                    }
                    if report.ok {
                        // A success the coordinator will not take is a failed attempt: said
                        // so (retried elsewhere, or the job fails naming why), never left
                        // running. Refused too if the attempt is not running (a copy won).
                        let failed = shoal_proto::TaskReport { ok: false, result: None, error: format!("its report was refused: {}", s.message()), ..report.clone() };
                        if let Err(e) = rt.block_on(client.call(|mut c| { let r = worker.request(failed.clone()); async move { c.report_task(r).await } })) {
                            tracing::debug!(error = %e, "the failure report was not taken");
                        }
                    }
                    wake.notify_one();
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "batch task report failed; retrying");
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            }
        }
    });
    Running { job, generation, kind: "batch", cancel, handle }
}

/// Delivers an outcome, retrying through coordinator failovers until it is accepted or
/// rejected for good.
async fn report_outcome(client: &Client, worker: &WorkerId, report: OutcomeReport, cancel: &AtomicBool) {
    // No attempt limit: a job waits for this report, so giving up would leave it running
    // forever. It ends when the report lands or is refused, or when the heartbeat sees the
    // assignment gone (the job moved on without it) and sets `cancel`.
    let mut pause = Duration::from_millis(200);
    for attempt in 0u64.. {
        if cancel.load(Ordering::Relaxed) {
            return;
        }
        match client.call(|mut c| { let r = worker.request(report.clone()); async move { c.report_outcome(r).await } }).await {
            Ok(_) => return,
            // Refused for good: the job moved on (or finished and was removed), or the caller
            // may not report for this worker.
            Err(ClientError::Rpc(s)) if matches!(s.code(), tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument | tonic::Code::NotFound | tonic::Code::PermissionDenied) => {
                tracing::warn!(error = %s.message(), "outcome rejected");
                return;
            }
            Err(e) => {
                tracing::warn!(attempt, error = %e, "outcome report failed; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        }
    }
}
