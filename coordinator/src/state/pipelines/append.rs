//! Append steps: new files under the store's `incoming/` prefix become a slice of a dataset.
//! Listing the store is not for apply: the attempt waits (`incoming` = the prefix) until the
//! leader lists it and proposes `PipelineIncoming`; that apply leaves out the files already in
//! one of the dataset's slices and submits a batch import of the rest (one task per file, on
//! the workers), whose end adds them as one slice, through the same checks as `data append`.
//! A file is therefore added once, whoever leads and however often the listing is proposed.

use shoal_core::pipeline::Append;
use shoal_proto::{PipelineIncoming, StepOutput};

use super::*;

/// Most files one append step takes (the rest wait for the next run).
const FILES_PER_APPEND: usize = 1000;

impl StateMachine {
    /// Starts an append attempt: it waits for the leader's listing of its prefix.
    pub(super) fn start_append(&mut self, seq: u64, i: usize, text: &str) -> Result<(), String> {
        let a = Append::parse(text)?;
        if !self.has_dataset(&a.dataset) {
            return Err(format!("dataset: there is no dataset {:?} (an append adds to one; import it first)", a.dataset));
        }
        self.pipeline_runs.get_mut(&seq).expect("a run").steps[i].incoming = a.prefix();
        Ok(())
    }

    /// Append steps waiting for a listing: (what to propose, the prefix to list).
    pub fn incoming_checks(&self) -> Vec<(PipelineIncoming, String)> {
        self.waiting_steps(|s| !s.incoming.is_empty())
            .into_iter()
            .map(|(run, s)| (PipelineIncoming { run: run.id.clone(), step: s.name.clone(), attempt: s.attempts, ..Default::default() }, s.incoming.clone()))
            .collect()
    }

    /// The leader's listing for an append attempt: the new files' import starts (or, none
    /// new, the step succeeds with nothing added).
    pub(crate) fn pipeline_incoming(&mut self, index: u64, l: PipelineIncoming) -> ApplyResult {
        let (seq, i) = self.current_attempt(&l.run, &l.step, l.attempt, |s| !s.incoming.is_empty(), "waiting for a listing in")?;
        let started = self.import_new_files(seq, i, &l);
        self.pipeline_runs.get_mut(&seq).expect("looked up").steps[i].incoming.clear();
        self.settle_start(seq, i, started);
        self.advance_run(index, seq);
        Ok(ApplyOutput::PipelineRun(Box::new(self.pipeline_runs[&seq].clone())))
    }

    /// The import job of the listed files not yet in the dataset, or None (and the step's
    /// outputs set) when there are none.
    fn import_new_files(&mut self, seq: u64, i: usize, l: &PipelineIncoming) -> Result<Option<u64>, String> {
        if !l.error.is_empty() {
            return Err(format!("listing the incoming files: {}", l.error));
        }
        let a = Append::parse(&self.rendered_step(seq, i)?)?;
        let prefix = a.prefix();
        let taken = self.dataset_sources(&a.dataset);
        let mut files: Vec<String> = l.files.iter().filter(|f| f.starts_with(&prefix) && a.reads(f) && !taken.contains(f.as_str())).cloned().collect();
        files.sort();
        files.truncate(FILES_PER_APPEND);
        if files.is_empty() {
            let (version, records) = self.version_records(&a.dataset, 0).ok_or_else(|| format!("dataset: there is no dataset {:?}", a.dataset))?;
            self.pipeline_runs.get_mut(&seq).expect("a run").steps[i].outputs = append_outputs(&a.dataset, version, records, 0, 0, None);
            return Ok(None);
        }
        let name = self.pipeline_runs[&seq].steps[i].name.clone();
        self.submit_step_job(seq, i, a.batch_spec(&name, &files)?).map(Some)
    }

    /// An append step's outputs once its import job succeeded.
    pub(super) fn append_job_outputs(&self, job: &JobInfo) -> Vec<StepOutput> {
        let b = job.batch.clone().unwrap_or_default();
        let records = self.version_records(&b.output_dataset, b.output_version).map(|(_, r)| r).unwrap_or(0);
        let added = b.tasks.iter().filter_map(|t| t.result.as_ref()).map(|r| r.records_out).sum();
        append_outputs(&b.output_dataset, b.output_version, records, added, b.tasks.len(), Some(job.id))
    }
}

fn append_outputs(dataset: &str, version: u64, records: u64, added: u64, files: usize, job: Option<u64>) -> Vec<StepOutput> {
    let out = |k: &str, v: String| StepOutput { key: k.into(), value: v };
    let mut outputs = vec![
        out("dataset", format!("{dataset}@{version}")),
        out("files", files.to_string()),
        out("new_records", added.to_string()),
        out("records", records.to_string()),
        out("version", version.to_string()),
    ];
    if let Some(j) = job {
        outputs.insert(1, out("job", j.to_string()));
    }
    outputs
}
