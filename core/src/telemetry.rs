//! This process's Prometheus metrics (`prometheus-client`), served at `/metrics` by every
//! coordinator and worker (`shoal serve ... --http-listen`). Names start with `shoal_` and
//! carry their unit; a job's series (labels `job_id`, `rank`, `node`) are removed when its task
//! ends on this process, so the number of series stays bounded by the jobs running here.
//!
//! Recording is a few atomic operations on a series looked up once per task (`JobSeries`), so
//! it never blocks a training step.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
pub use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::histogram::exponential_buckets;
use prometheus_client::registry::Registry;

/// The labels of a job's series on this process.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabels {
    pub job_id: String,
    pub rank: String,
    pub node: String,
}

/// The labels of a process's own series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabels {
    pub node: String,
}

/// A worker's state: one series per state, 1 for the current one.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub node: String,
    pub state: String,
}

/// A coordinator's count of jobs or workers in one state.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CountLabels {
    pub node: String,
    pub state: String,
}

fn histogram() -> Histogram {
    // 1 ms to about 65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

type HistogramFamily = Family<JobLabels, Histogram, fn() -> Histogram>;

/// Every metric this process can export.
pub struct Metrics {
    registry: Registry,
    pub train_samples: Family<JobLabels, Counter>,
    pub train_steps: Family<JobLabels, Counter>,
    pub step_seconds: HistogramFamily,
    pub collective_bytes: Family<JobLabels, Counter>,
    pub checkpoint_seconds: HistogramFamily,
    pub worker_state: Family<StateLabels, Gauge>,
    pub raft_commit_index: Family<NodeLabels, Gauge>,
    pub raft_applied_index: Family<NodeLabels, Gauge>,
    pub raft_term: Family<NodeLabels, Gauge>,
    pub raft_is_leader: Family<NodeLabels, Gauge>,
    pub raft_leader_changes: Family<NodeLabels, Counter>,
    pub jobs: Family<CountLabels, Gauge>,
    pub workers: Family<CountLabels, Gauge>,
    /// The label sets each job created here, to remove when its task ends.
    job_series: Mutex<HashMap<String, Vec<JobLabels>>>,
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::default();
        let m = Metrics {
            registry: Registry::default(),
            train_samples: Family::default(),
            train_steps: Family::default(),
            step_seconds: Family::new_with_constructor(histogram),
            collective_bytes: Family::default(),
            checkpoint_seconds: Family::new_with_constructor(histogram),
            worker_state: Family::default(),
            raft_commit_index: Family::default(),
            raft_applied_index: Family::default(),
            raft_term: Family::default(),
            raft_is_leader: Family::default(),
            raft_leader_changes: Family::default(),
            jobs: Family::default(),
            workers: Family::default(),
            job_series: Mutex::new(HashMap::new()),
        };
        // Counters get `_total` appended by the encoder.
        registry.register("shoal_train_samples", "Training records processed by this rank (its share of each applied step)", m.train_samples.clone());
        registry.register("shoal_train_steps", "Optimizer steps this rank applied", m.train_steps.clone());
        registry.register("shoal_step_seconds", "Wall time of one training step on this rank", m.step_seconds.clone());
        registry.register("shoal_collective_bytes", "Gradient bytes this rank all-reduced", m.collective_bytes.clone());
        registry.register("shoal_checkpoint_seconds", "Time to write this rank's part of a checkpoint", m.checkpoint_seconds.clone());
        registry.register("shoal_worker_state", "1 for the worker's current state (idle, training, batch)", m.worker_state.clone());
        registry.register("shoal_raft_commit_index", "Highest Raft log index known committed on this replica", m.raft_commit_index.clone());
        registry.register("shoal_raft_applied_index", "Highest Raft log index applied to this replica's state", m.raft_applied_index.clone());
        registry.register("shoal_raft_term", "This replica's Raft term", m.raft_term.clone());
        registry.register("shoal_raft_is_leader", "1 while this replica is the Raft leader", m.raft_is_leader.clone());
        registry.register("shoal_raft_leader_changes", "Times this replica saw the Raft leader change", m.raft_leader_changes.clone());
        registry.register("shoal_jobs", "Jobs by state, as this replica's state holds them", m.jobs.clone());
        registry.register("shoal_workers", "Registered workers by state, as this replica's state holds them", m.workers.clone());
        Metrics { registry, ..m }
    }

    /// The series of job `job_id` at `rank` on this process (created on first use; removed by
    /// `end_job`).
    pub fn job(&self, job_id: &str, rank: u32) -> JobSeries {
        let labels = JobLabels { job_id: job_id.to_string(), rank: rank.to_string(), node: crate::node::node() };
        let mut seen = self.job_series.lock().unwrap_or_else(|e| e.into_inner());
        let sets = seen.entry(job_id.to_string()).or_default();
        if !sets.contains(&labels) {
            sets.push(labels.clone());
        }
        JobSeries {
            samples: self.train_samples.get_or_create(&labels).clone(),
            steps: self.train_steps.get_or_create(&labels).clone(),
            step_seconds: self.step_seconds.get_or_create(&labels).clone(),
            collective_bytes: self.collective_bytes.get_or_create(&labels).clone(),
            checkpoint_seconds: self.checkpoint_seconds.get_or_create(&labels).clone(),
        }
    }

    /// Removes every series of job `job_id` on this process.
    pub fn end_job(&self, job_id: &str) {
        let sets = self.job_series.lock().unwrap_or_else(|e| e.into_inner()).remove(job_id).unwrap_or_default();
        for labels in &sets {
            self.train_samples.remove(labels);
            self.train_steps.remove(labels);
            self.step_seconds.remove(labels);
            self.collective_bytes.remove(labels);
            self.checkpoint_seconds.remove(labels);
        }
    }

    /// Sets this worker's state series: 1 for `state`, 0 for the others.
    pub fn set_worker_state(&self, state: &str) {
        let node = crate::node::node();
        for s in ["idle", "training", "batch"] {
            self.worker_state.get_or_create(&StateLabels { node: node.clone(), state: s.into() }).set(i64::from(s == state));
        }
    }

    /// Every metric in Prometheus's text format (0.0.4, what Prometheus scrapes and
    /// `promtool check metrics` reads): the crate's OpenMetrics output with each counter's
    /// HELP and TYPE under its sample name (`x_total`) and without the `# EOF` line.
    pub fn encode(&self) -> String {
        let mut open = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut open, &self.registry);
        let counters: std::collections::HashSet<&str> =
            open.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
        let mut out = String::with_capacity(open.len());
        for line in open.lines() {
            if line == "# EOF" {
                continue;
            }
            let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
                let rest = line.strip_prefix(p)?;
                let (name, tail) = rest.split_once(' ')?;
                counters.contains(name).then(|| format!("{p}{name}_total {tail}"))
            });
            out.push_str(renamed.as_deref().unwrap_or(line));
            out.push('\n');
        }
        out
    }

    /// The node label of this process.
    pub fn node_labels(&self) -> NodeLabels {
        NodeLabels { node: crate::node::node() }
    }
}

/// A job's series at one rank, looked up once per task.
#[derive(Clone)]
pub struct JobSeries {
    pub samples: Counter,
    pub steps: Counter,
    pub step_seconds: Histogram,
    pub collective_bytes: Counter,
    pub checkpoint_seconds: Histogram,
}

/// The content type `Metrics::encode` writes.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// This process's metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

static READY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether this process serves (a coordinator: its Raft loop runs and it knows a leader), for
/// the HTTP listener's `/ready` (Kubernetes' readiness probe: its gRPC probes cannot speak TLS).
pub fn set_ready(ready: bool) {
    READY.store(ready, std::sync::atomic::Ordering::Relaxed);
}

pub fn ready() -> bool {
    READY.load(std::sync::atomic::Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jobs_series_appear_with_its_labels_and_go_when_it_ends() {
        let m = Metrics::new();
        let s = m.job("j-7", 1);
        s.samples.inc_by(64);
        s.step_seconds.observe(0.02);
        let text = m.encode();
        assert!(text.contains("shoal_train_samples_total{job_id=\"j-7\",rank=\"1\""), "{text}");
        assert!(text.contains("shoal_step_seconds_bucket{"), "{text}");
        assert!(text.contains("# TYPE shoal_train_samples_total counter\n"), "a counter's TYPE names its samples: {text}");
        assert!(!text.contains("# EOF"), "{text}");
        m.job("j-8", 0).samples.inc();
        m.end_job("j-7");
        let text = m.encode();
        assert!(!text.contains("j-7"), "{text}");
        assert!(text.contains("shoal_train_samples_total{job_id=\"j-8\",rank=\"0\""), "another job's series stay: {text}");
    }
}
