//! The command line's grammar: clap's declarations of every command, its arguments and help.
//! `main` dispatches on them; nothing here talks to a cluster except the listing helpers.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use shoal_coordinator::Client;
use shoal_proto::*;

use crate::{access, bench, ops, parse_record_range, pipeline, Conn};
use crate::serve::ServeCmd;

#[derive(Parser)]
#[command(name = "shoal", version, about = "Distributed training and batch processing: a Raft-replicated coordinator and data-parallel workers")]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) cmd: Cmd,
    /// Log lines as `text` (the default) or `json` (one object a line with `node`, and
    /// `job_id`, `rank` on a job's lines); `shoal up` and `worker add` pass it on to the
    /// processes they start.
    #[arg(long, global = true, env = "SHOAL_LOG_FORMAT", value_parser = ["text", "json"])]
    pub(crate) log_format: Option<String>,
}

#[derive(Subcommand)]
pub(crate) enum Cmd {
    /// Start a local cluster (1 coordinator, 2 workers) in a temporary folder, import the
    /// bundled MNIST, train examples/mnist-mlp.toml with a live progress bar, and stop.
    Demo(DemoArgs),
    /// Start a local cluster in the background and return once it is ready.
    Up(UpArgs),
    /// Stop the local cluster recorded in --dir.
    Down(DirArg),
    /// List coordinators (id, address, role, term, commit index, pid) and workers.
    Status {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
    /// Datasets: import, list, show.
    #[command(subcommand)]
    Data(DataCmd),
    /// Jobs: submit, status, list, cancel, resume.
    #[command(subcommand)]
    Job(JobCmd),
    /// Pipelines: a DAG of steps (train, batch, evaluate, register) with conditions, retries
    /// and references to upstream outputs; submit, run, show, list, cancel.
    #[command(subcommand)]
    Pipeline(pipeline::PipelineCmd),
    /// Checkpoints of a job: list, show, export (for PyTorch).
    #[command(subcommand)]
    Checkpoint(CheckpointCmd),
    /// The model registry: register, alias, list, show, lineage, export.
    #[command(subcommand)]
    Model(ModelCmd),
    /// Continue a text prompt with a language model (one trained on a text dataset): byte
    /// tokens sampled at a temperature from a seeded stream, so a seed gives the same text.
    Generate {
        /// NAME@VERSION, NAME@ALIAS or job:ID (its latest checkpoint).
        reference: String,
        #[arg(long)]
        prompt: String,
        /// Tokens (bytes) to generate.
        #[arg(long, default_value_t = 200)]
        tokens: usize,
        /// 0: always the likeliest token; higher: more varied.
        #[arg(long, default_value_t = 0.8)]
        temperature: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
    /// The coordinator group, while it serves: add, remove, transfer-leader.
    #[command(subcommand)]
    Coordinator(CoordinatorCmd),
    /// The worker pool: list, add and remove (on a local cluster).
    #[command(subcommand)]
    Worker(WorkerCmd),
    /// Access tokens: create (with a role: admin, operator, viewer, worker), list, revoke.
    #[command(subcommand)]
    Token(access::TokenCmd),
    /// A cluster's credentials: `init` once in the admin's folder, `issue` a folder for each
    /// coordinator and worker (`shoal up` does both for a local cluster).
    #[command(subcommand)]
    Ca(access::CaCmd),
    /// The audit trail: every mutation, who asked and when (`list`), and a check that no entry
    /// was modified or removed (`verify`).
    #[command(subcommand)]
    Audit(access::AuditCmd),
    /// Checks of a cluster's setup: `security` reports what it exposes (plaintext or
    /// unauthenticated listeners, tokens that never expire, secret files others may read);
    /// exits 1 on a finding that exposes the cluster.
    #[command(subcommand)]
    Doctor(DoctorCmd),
    /// Run one server process in the foreground (what `shoal up` spawns).
    #[command(subcommand)]
    Serve(ServeCmd),
    /// Benchmarks: the all-reduce on its own (allreduce), a training job (train).
    #[command(subcommand)]
    Bench(BenchCmd),
}

#[derive(Subcommand)]
pub(crate) enum DoctorCmd {
    /// What the cluster exposes: each listener's TLS and token checks (and whether it is on
    /// loopback), the workers' data plane and the HTTP listeners, tokens without expiry, and
    /// secret files of the cluster folder that others may read.
    Security {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub(crate) enum BenchCmd {
    /// Time all-reduces of one f32 buffer over WORLD local processes: prints time_ms (median
    /// over --iters after warm-up) and algbw_GBps (the buffer's bytes over that time).
    Allreduce {
        #[command(flatten)]
        a: AllReduceOpts,
        #[arg(long)]
        json: bool,
    },
    /// One rank of `bench allreduce` (started by it).
    #[command(hide = true)]
    AllreduceRank {
        #[command(flatten)]
        a: AllReduceOpts,
        #[arg(long)]
        rank: usize,
        #[arg(long)]
        dir: PathBuf,
        /// The address this rank listens on (what the others dial): a test host's, say.
        #[arg(long, default_value = "127.0.0.1")]
        bind: String,
    },
    /// Train SPEC on a local cluster (the bundled MNIST under the spec's dataset name) and
    /// print samples_per_s, test_accuracy and phase_ms.
    Train {
        spec: PathBuf,
        /// Workers (default: the spec's cluster.workers).
        #[arg(long)]
        workers: Option<u64>,
        /// A cluster without credentials (`up --insecure`): the data plane and every call in
        /// plaintext. What TLS costs is the difference from a run without it.
        #[arg(long)]
        insecure: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Clone)]
pub(crate) struct AllReduceOpts {
    /// Buffer size in bytes (a multiple of 4; K, M and G suffixes are powers of 1024).
    #[arg(long, value_parser = bench::parse_bytes)]
    pub(crate) bytes: u64,
    #[arg(long, default_value_t = 2)]
    pub(crate) world: usize,
    /// tcp, shm or grpc.
    #[arg(long, default_value = "tcp")]
    pub(crate) transport: String,
    /// f32 or bf16 (tcp only).
    #[arg(long, default_value = "f32")]
    pub(crate) wire: String,
    #[arg(long, default_value_t = 20)]
    pub(crate) iters: usize,
    #[arg(long, default_value_t = 3)]
    pub(crate) warmup: usize,
    /// Seconds a rank waits for a peer before failing.
    #[arg(long, default_value_t = 30)]
    pub(crate) timeout_s: u64,
    /// Mutual TLS and membership proofs, as workers with credentials run (a CA made for the
    /// run); the report adds the one-core AES-128-GCM rate (the ring's suite).
    #[arg(long)]
    pub(crate) tls: bool,
}

impl AllReduceOpts {
    pub(crate) fn args(&self) -> bench::AllReduceArgs {
        bench::AllReduceArgs {
            bytes: self.bytes,
            world: self.world,
            transport: self.transport.clone(),
            wire: self.wire.clone(),
            iters: self.iters,
            warmup: self.warmup,
            timeout: Duration::from_secs(self.timeout_s),
            tls: self.tls,
        }
    }
}

/// Which page of a listing: replies hold at most 100 entries, newest first.
#[derive(Args, Clone)]
pub(crate) struct PageArgs {
    /// The page to show: the token a listing printed as its next page.
    #[arg(long, conflicts_with = "all")]
    pub(crate) page: Option<String>,
    /// Every page, one after the other.
    #[arg(long)]
    pub(crate) all: bool,
}

impl PageArgs {
    /// Fetches one page (`--page`, default the first) or, with `--all`, every page, joined.
    pub(crate) async fn fetch<T, F, Fut>(&self, mut get: F) -> Result<(Vec<T>, String)>
    where
        F: FnMut(String) -> Fut,
        Fut: std::future::Future<Output = Result<(Vec<T>, String)>>,
    {
        let (mut items, mut next) = get(self.page.clone().unwrap_or_default()).await?;
        while self.all && !next.is_empty() {
            let (more, after) = get(next).await?;
            items.extend(more);
            next = after;
        }
        Ok((items, next))
    }

    /// The pages of a listing RPC: `call` sends one request with the page token it is given.
    pub(crate) async fn list<R, F, Fut>(&self, client: &Client, call: F) -> Result<(Vec<R::Item>, String)>
    where
        R: Listing,
        F: Fn(shoal_coordinator::client::Rpc, String) -> Fut + Copy,
        Fut: std::future::Future<Output = Result<tonic::Response<R>, tonic::Status>>,
    {
        self.fetch(|page| async move { Ok(client.call(|c| call(c, page.clone())).await?.split()) }).await
    }
}

/// A listing reply: one page of entries and the next page's token.
pub(crate) trait Listing {
    type Item;
    fn split(self) -> (Vec<Self::Item>, String);
}

impl Listing for ListDatasetsResponse {
    type Item = DatasetInfo;
    fn split(self) -> (Vec<DatasetInfo>, String) {
        (self.datasets, self.next_page)
    }
}

impl Listing for ListJobsResponse {
    type Item = JobInfo;
    fn split(self) -> (Vec<JobInfo>, String) {
        (self.jobs, self.next_page)
    }
}

impl Listing for ListTemplatesResponse {
    type Item = JobTemplate;
    fn split(self) -> (Vec<JobTemplate>, String) {
        (self.templates, self.next_page)
    }
}

impl Listing for ListModelsResponse {
    type Item = ModelInfo;
    fn split(self) -> (Vec<ModelInfo>, String) {
        (self.models, self.next_page)
    }
}

/// Says where the listing goes on (on stderr when the output is JSON, so it stays parseable).
pub(crate) fn note_next_page(next: &str, json: bool) {
    if next.is_empty() {
        return;
    }
    if json {
        eprintln!("next page: --page {next} (or --all)");
    } else {
        println!("(more: --page {next}, or --all)");
    }
}

#[derive(Args)]
pub(crate) struct DirArg {
    /// Cluster folder.
    #[arg(long, env = "SHOAL_DIR")]
    pub(crate) dir: Option<PathBuf>,
}

#[derive(Args)]
pub(crate) struct UpArgs {
    /// Number of coordinator replicas (1, 3 or 5 for a quorum that tolerates failures).
    #[arg(long, default_value_t = 1)]
    pub(crate) coordinators: u64,
    /// Number of workers.
    #[arg(long, default_value_t = 2)]
    pub(crate) workers: u64,
    /// Cluster folder: logs, Raft logs and the store.
    #[arg(long, env = "SHOAL_DIR")]
    pub(crate) dir: Option<PathBuf>,
    /// Worker lease in milliseconds: a worker silent this long is declared lost.
    #[arg(long, default_value_t = 5000)]
    pub(crate) lease_ms: u64,
    /// Coordinators snapshot their state and compact their logs every this many entries.
    #[arg(long, default_value_t = shoal_coordinator::server::SNAPSHOT_EVERY)]
    pub(crate) snapshot_every: u64,
    /// The store: s3://BUCKET/PREFIX (credentials from the AWS environment variables, which
    /// the processes inherit). Default: the folder `store` of the cluster folder, or what an
    /// earlier `up` of this folder used.
    #[arg(long)]
    pub(crate) store: Option<String>,
    /// An S3-compatible server's URL, for an s3:// store.
    #[arg(long)]
    pub(crate) store_endpoint: Option<String>,
    /// No CA, no certificates, no tokens: every process starts with --insecure (plaintext,
    /// and anyone who reaches a port may call everything; each logs a warning at start). For
    /// experiments and benchmarks on one machine. A folder keeps the mode of its first `up`.
    #[arg(long)]
    pub(crate) insecure: bool,
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args)]
pub(crate) struct DemoArgs {
    /// Number of workers (default: the spec's cluster.workers; 2 for the bundled spec).
    #[arg(long)]
    pub(crate) workers: Option<u64>,
    /// Train this spec instead of the bundled examples/mnist-mlp.toml.
    #[arg(long)]
    pub(crate) spec: Option<PathBuf>,
    /// Keep the temporary cluster folder (its path is printed).
    #[arg(long)]
    pub(crate) keep: bool,
}

/// The files of a dataset slice and how to read them (`data import`, `data append`).
#[derive(Args)]
pub(crate) struct SliceArgs {
    #[arg(required = true)]
    pub(crate) files: Vec<PathBuf>,
    /// Records per shard file (default: 2048, more for small records, so a shard holds
    /// at least about 1.6 MB).
    #[arg(long)]
    pub(crate) records_per_shard: Option<usize>,
    /// Only records START:END (from START, before END) of the files.
    #[arg(long, value_parser = parse_record_range)]
    pub(crate) records: Option<(usize, usize)>,
    /// idx, csv, npy, safetensors or text (default: by the files' extension; idx otherwise).
    #[arg(long)]
    pub(crate) format: Option<String>,
    /// text: tokens (bytes) the model reads per record; each record is a window of
    /// CONTEXT + 1 (an append takes the dataset's).
    #[arg(long)]
    pub(crate) context: Option<usize>,
    /// text: tokens between the starts of two windows (default: CONTEXT, so an epoch reads
    /// each token once).
    #[arg(long)]
    pub(crate) stride: Option<usize>,
    /// CSV: the label column (integer class ids, or names mapped to class ids).
    #[arg(long, conflicts_with = "target")]
    pub(crate) label: Option<String>,
    /// CSV: the regression target column (a float per record; train with `loss = "mse"`).
    #[arg(long)]
    pub(crate) target: Option<String>,
}

impl SliceArgs {
    pub(crate) fn source(&self) -> ops::Source<'_> {
        ops::Source {
            files: &self.files,
            format: self.format.as_deref(),
            label: self.label.as_deref(),
            target: self.target.as_deref(),
            range: self.records,
            context: self.context,
            stride: self.stride,
        }
    }
}

#[derive(Subcommand)]
pub(crate) enum DataCmd {
    /// Import IDX files (gzip or not; one features file, one labels file), one CSV file (a
    /// header row, numeric feature columns, the label column named by --label or a float
    /// regression target named by --target), two NumPy .npy files (features, and labels:
    /// integers, or float targets), one safetensors file (tensors x and y), or text files
    /// (`--format text --context N`: byte tokens, records of N + 1 tokens) as a new
    /// dataset NAME (version 1): safetensors shards in the store, registered in the
    /// coordinator. An existing NAME is an error: `append` adds to it.
    Import {
        name: String,
        #[command(flatten)]
        slice: SliceArgs,
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
    /// Add files (as `import` reads them) to dataset NAME as a new slice: version v+1 is version v plus these
    /// records (which come after its own). The slice must match the dataset's schema (feature
    /// shape, dtype, labels), else nothing is added.
    Append {
        name: String,
        #[command(flatten)]
        slice: SliceArgs,
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
    /// Drift thresholds for the dataset's next appends: a slice whose label or binned feature
    /// histograms diverge more (Jensen-Shannon, base 2, 0 to 1) is reported, or with `reject`
    /// not added.
    Set {
        name: String,
        #[arg(long)]
        max_label_js: Option<f64>,
        #[arg(long)]
        max_feature_js: Option<f64>,
        /// warn (add the slice, record its drift) or reject (do not add it).
        #[arg(long)]
        on_drift: Option<String>,
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
    /// List datasets: each one's latest version, summarised.
    List {
        #[command(flatten)]
        page: PageArgs,
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
    /// Show one dataset version: its statistics, its slices (100 at a time, newest first)
    /// with their shards, and its versions.
    Show {
        name: String,
        /// Version (default: the latest).
        #[arg(long, default_value_t = 0)]
        version: u64,
        #[command(flatten)]
        page: PageArgs,
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
    /// Remove the store's dataset folders that no committed slice refers to (imports that
    /// were refused or whose outcome was unknown, leftovers of batch jobs), once older than
    /// --min-age-s (an import writes its folder before registering it).
    Gc {
        #[arg(long, default_value_t = 3600)]
        min_age_s: u64,
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub(crate) enum JobCmd {
    /// Register a job template with `[trigger] on_append = "DATASET"`: every new version of
    /// that dataset (`data append`) starts one job from it, exactly once.
    Schedule {
        spec: PathBuf,
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
    /// Job templates and what each new dataset version started.
    Templates {
        #[command(flatten)]
        page: PageArgs,
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
    /// Submit a job spec (TOML).
    Submit {
        spec: PathBuf,
        /// Follow the job with a progress bar until it ends.
        #[arg(long)]
        follow: bool,
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
    /// Show one job.
    Status {
        id: u64,
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
    /// A job's metric history: every step's loss, lr, samples/s, gradient norm and phase times
    /// (per rank), every evaluation's metrics; a point per step.
    Metrics {
        id: u64,
        /// Only these keys (comma-separated), e.g. loss,test_accuracy.
        #[arg(long, value_delimiter = ',')]
        keys: Vec<String>,
        /// Write the points to this Parquet file (columns key, rank, step, unix_ms, value).
        #[arg(long, conflicts_with = "json")]
        parquet: Option<PathBuf>,
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
    /// Runs side by side: the spec keys that differ between them, and their final metrics.
    Compare {
        /// Two or more job ids.
        #[arg(required = true, num_args = 2..)]
        ids: Vec<u64>,
        /// Also draw their loss curves overlaid into this PNG file.
        #[arg(long)]
        plot: Option<PathBuf>,
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
    /// List jobs, newest first (with --group: that experiment's only).
    List {
        /// Only the jobs whose spec says `group = "G"`.
        #[arg(long)]
        group: Option<String>,
        #[command(flatten)]
        page: PageArgs,
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
    /// Apply the retention settings now (`shoal coordinator settings`): finished jobs beyond
    /// them leave the state, then their files leave the store (only after the removal is
    /// committed), as do files of jobs that are gone.
    Prune {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
    /// Cancel a queued or running job.
    Cancel {
        id: u64,
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
    /// Put a failed or cancelled job back in the queue: it continues from its last committed
    /// checkpoint (from step 0 if it has none).
    Resume {
        id: u64,
        /// Continue on this many workers (the same global batches, split over them).
        #[arg(long)]
        workers: Option<u32>,
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub(crate) enum WorkerCmd {
    /// The workers the coordinator knows: id, address, state, job, pid, device.
    List {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
    /// Stop worker ID of the local cluster in --dir: it leaves its job (which goes on without
    /// it, from its last checkpoint, if it still has min_workers) and exits.
    Remove {
        id: String,
        #[command(flatten)]
        dir: DirArg,
        #[arg(long)]
        json: bool,
    },
    /// Start more workers for the local cluster in --dir; returns once they have registered.
    Add {
        /// How many.
        #[arg(long, default_value_t = 1)]
        count: u64,
        #[command(flatten)]
        dir: DirArg,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub(crate) enum CoordinatorCmd {
    /// Add a replica listening at ADDR (HOST:PORT). It joins as a learner and becomes a voter
    /// once it has caught up. With --dir (a local cluster) its process is started too; with
    /// --endpoints, the command to start it is printed.
    Add {
        addr: String,
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
    /// Remove replica ID from the group (a leader hands its role to a live voter that caught
    /// up first); on a local cluster its process stops. Refused if the group left would not
    /// have a quorum of live replicas.
    Remove {
        id: u64,
        /// Disaster recovery only: remove it even if the group left has no live quorum.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
    /// Retention of finished jobs: a finished job is removed once it is neither among the
    /// --keep-jobs newest nor younger than --keep-days (unless a model version, a template's
    /// firing or a warm start refers to it). Without flags: the settings now.
    Settings {
        #[arg(long)]
        keep_jobs: Option<u32>,
        #[arg(long)]
        keep_days: Option<u32>,
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
    /// Make replica ID the leader.
    TransferLeader {
        id: u64,
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub(crate) enum ModelCmd {
    /// A new version of model NAME: job ID's model (its final checkpoint), with lineage.
    Register {
        name: String,
        #[arg(long)]
        job: u64,
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
    /// Point ALIAS of model NAME at VERSION (compare-and-set with --expect: only if the alias
    /// is held by that version now; 0: by none).
    Alias {
        name: String,
        version: u64,
        alias: String,
        #[arg(long)]
        expect: Option<u64>,
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
    /// Every model, with its newest version and its aliases.
    List {
        #[command(flatten)]
        page: PageArgs,
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
    /// A model (NAME: its versions, 100 at a time, newest first) or one version
    /// (NAME@VERSION, NAME@ALIAS) with its lineage.
    Show {
        reference: String,
        #[command(flatten)]
        page: PageArgs,
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
    /// The chain of versions NAME@X descends from (through warm starts), newest first.
    Lineage {
        reference: String,
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
    /// Write model version NAME@X as one safetensors file with PyTorch's names and layout.
    Export {
        reference: String,
        out: PathBuf,
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
    /// Print the PyTorch code of the `torch.nn.Sequential` of model NAME@X (or job:ID's
    /// model): it loads the model's export (`model export`, `checkpoint export`) with
    /// `strict=True` and gives the same outputs, after `preprocess` of raw records.
    Torch {
        /// NAME@VERSION, NAME@ALIAS or job:ID.
        reference: String,
        /// Write the code to this file instead of printing it.
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Subcommand)]
pub(crate) enum CheckpointCmd {
    /// The committed checkpoints of a job: step, epoch, world size, bytes, committed time,
    /// files with their blake3.
    List {
        job: u64,
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
    /// One committed checkpoint (default: the latest) with its whole manifest.
    Show {
        job: u64,
        step: Option<u64>,
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
    /// Write a checkpoint's parameters as one safetensors file with PyTorch's names and
    /// layout (see README), checking every file against the manifest first.
    Export {
        job: u64,
        /// The file to write.
        out: PathBuf,
        /// The checkpoint's step (default: the latest).
        #[arg(long)]
        step: Option<u64>,
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
}
