//! The audit trail: every mutation a caller (or the cluster itself) asks for, with who asked,
//! when, the request id and the outcome, as hash-chained entries. Applied on every replica
//! alike (the chain is part of the state hash); the leader seals runs of entries into
//! segments in the store (`audit/`), and the state keeps only their records (first and last
//! seq, last hash), so it stays bounded: past `MAX_SEGMENTS`, the oldest records go and
//! `retained_from` moves on.

use shoal_proto::{command, AuditContext, AuditEntry, AuditSeal, AuditSegment, AuditSegmentFile, AuditState, Message};

use super::{ApplyError, ApplyOutput, ApplyResult, StateMachine};

/// Entries sealed at once at most, and how long one waits for its seal.
pub const SEAL_AT: usize = 256;
pub const SEAL_AFTER_MS: u64 = 2_000;
/// Segment records the state keeps (the oldest go first).
pub const MAX_SEGMENTS: usize = 4096;
/// Unsealed entries the state holds at most (a store that refuses writes): the oldest are
/// dropped, and `retained_from` says so.
pub const MAX_PENDING: usize = 65_536;

/// The folder of the segments in the store.
pub const AUDIT_PREFIX: &str = "audit";

/// An entry's hash: blake3 of its encoding with `hash` empty.
pub fn entry_hash(e: &AuditEntry) -> Vec<u8> {
    let mut e = e.clone();
    e.hash.clear();
    blake3::hash(&e.encode_to_vec()).as_bytes().to_vec()
}

/// The command's name and what it names (its target), when it is a mutation the trail keeps:
/// what callers ask for (data, models, jobs, pipelines, settings, tokens, workers joining).
/// The machine traffic of running jobs (progress, outcomes, checkpoints, metrics, tasks) and
/// a leader's bookkeeping are recorded in the jobs' own state, not here.
pub(super) fn audited(kind: &command::Kind) -> Option<(&'static str, String)> {
    use command::Kind as K;
    Some(match kind {
        K::RegisterDataset(d) => (if d.append { "append_dataset" } else { "import_dataset" }, d.name.clone()),
        K::SetDatasetSettings(r) => ("set_dataset_settings", r.name.clone()),
        K::RegisterModel(r) => ("register_model", format!("{} from job {}", r.name, r.job_id)),
        K::SetModelAlias(r) => ("set_model_alias", format!("{}@{} -> {}", r.name, r.alias, r.version)),
        K::SubmitJob(_) => ("submit_job", String::new()),
        K::ScheduleJob(_) => ("schedule_job", String::new()),
        K::CancelJob(id) => ("cancel_job", format!("job {id}")),
        K::ResumeJob(r) => ("resume_job", format!("job {}", r.id)),
        K::SetSettings(r) => ("set_settings", format!("keep_jobs {:?} keep_days {:?}", r.keep_jobs, r.keep_days)),
        K::PruneJobs(_) => ("prune_jobs", String::new()),
        K::SubmitPipeline(_) => ("submit_pipeline", String::new()),
        K::RunPipeline(r) => ("run_pipeline", r.name.clone()),
        K::CancelPipelineRun(id) => ("cancel_pipeline_run", id.clone()),
        K::ResumePipelineRun(r) => ("resume_pipeline_run", r.id.clone()),
        K::PausePipeline(r) => ("pause_pipeline", format!("{} paused={}", r.name, r.paused)),
        K::BootstrapTokens(b) => ("bootstrap_tokens", format!("{} tokens", b.tokens.len())),
        K::CreateToken(t) => ("create_token", format!("{} ({})", t.id, t.role)),
        K::RevokeToken(id) => ("revoke_token", id.clone()),
        K::RegisterWorker(r) => ("register_worker", r.address.clone()),
        K::SetMembers(m) => ("set_members", format!("{} members", m.members.len())),
        K::StoreRemoved(r) => {
            use shoal_proto::store_removal::Cause;
            let what = match r.cause() {
                Cause::DropImport => "drop_import",
                Cause::CollectDatasets => "collect_datasets",
                Cause::Unspecified => "remove_from_store",
            };
            (what, removed_paths(&r.paths))
        }
        _ => return None,
    })
}

/// Up to 8 of the removed folders by name, then how many more.
fn removed_paths(paths: &[String]) -> String {
    let mut s = paths.iter().take(8).cloned().collect::<Vec<_>>().join(", ");
    if paths.len() > 8 {
        s.push_str(&format!(" and {} more", paths.len() - 8));
    }
    s
}

/// What an applied command's outcome adds to its target (the id a submission got).
fn outcome_target(out: &ApplyOutput) -> Option<String> {
    Some(match out {
        ApplyOutput::Job(j) => format!("job {}", j.id),
        ApplyOutput::Template(t) => format!("template {}", t.id),
        ApplyOutput::Pipeline(p) => format!("pipeline {} v{}", p.name, p.version),
        ApplyOutput::PipelineRun(r) => format!("run {}", r.id),
        ApplyOutput::Dataset(d) => format!("{}@{}", d.name, d.version),
        ApplyOutput::WorkerId(w) => w.clone(),
        ApplyOutput::Pruned { jobs, .. } => format!("{} jobs", jobs.len()),
        _ => return None,
    })
}

impl StateMachine {
    /// Appends the entry of an audited command (`what`: its name and target) that was just
    /// applied with `out`.
    pub(super) fn audit(&mut self, index: u64, who: Option<AuditContext>, request_id: &str, what: (&'static str, String), out: &ApplyResult) {
        let who = who.unwrap_or_else(|| AuditContext { actor: "cluster".into(), role: String::new(), method: String::new() });
        // The input's target, made precise by the outcome's (`tiny` -> `tiny@2`, a job's id).
        let target = match out.as_ref().ok().and_then(outcome_target) {
            Some(t) if what.1.is_empty() || t.starts_with(&what.1) => t,
            Some(t) => format!("{} ({t})", what.1),
            None => what.1,
        };
        let a = &mut self.audit;
        let mut e = AuditEntry {
            seq: a.next_seq,
            unix_ms: self.now_ms,
            index,
            actor: who.actor,
            role: who.role,
            method: who.method,
            request_id: request_id.to_string(),
            what: if target.is_empty() { what.0.to_string() } else { format!("{}: {target}", what.0) },
            outcome: match out {
                Ok(_) => "ok".into(),
                Err(e) => e.to_string(),
            },
            prev: a.head.clone(),
            hash: Vec::new(),
        };
        e.hash = entry_hash(&e);
        a.head = e.hash.clone();
        a.next_seq += 1;
        a.pending.push(e);
        if a.pending.len() > MAX_PENDING {
            let dropped = a.pending.remove(0);
            a.retained_from = dropped.seq + 1;
            a.retained_prev = dropped.hash;
            a.segments.clear();
        }
    }

    /// The trail's part of the state.
    pub fn audit_state(&self) -> &AuditState {
        &self.audit
    }

    /// The seal the leader should write and propose now: up to `SEAL_AT` pending entries,
    /// once there are that many or the oldest waited `SEAL_AFTER_MS`.
    pub fn audit_seal_due(&self, now_unix_ms: u64) -> Option<AuditSeal> {
        let pending = &self.audit.pending;
        let first = pending.first()?;
        if pending.len() < SEAL_AT && now_unix_ms < first.unix_ms.saturating_add(SEAL_AFTER_MS) {
            return None;
        }
        let last = &pending[pending.len().min(SEAL_AT) - 1];
        Some(AuditSeal { first_seq: first.seq, last_seq: last.seq, key: segment_key(first.seq, last.seq), last_hash: last.hash.clone() })
    }

    /// The pending entries `seal` covers (None once they are sealed or gone).
    pub fn audit_entries(&self, seal: &AuditSeal) -> Option<Vec<AuditEntry>> {
        let pending = &self.audit.pending;
        let first = pending.first().filter(|f| f.seq == seal.first_seq)?;
        let n = (seal.last_seq.checked_sub(first.seq)? + 1) as usize;
        (n <= pending.len() && pending[n - 1].hash == seal.last_hash).then(|| pending[..n].to_vec())
    }

    /// The leader wrote a segment: its entries leave the state, its record stays.
    pub(super) fn seal_audit(&mut self, s: AuditSeal) -> ApplyResult {
        let a = &mut self.audit;
        let Some(first) = a.pending.first() else { return Err(ApplyError::conflict("no audit entries to seal")) };
        if first.seq != s.first_seq || s.last_seq < s.first_seq || s.key != segment_key(s.first_seq, s.last_seq) {
            return Err(ApplyError::conflict(format!("audit seal {}-{} does not start the pending entries (at {})", s.first_seq, s.last_seq, first.seq)));
        }
        let n = (s.last_seq - s.first_seq + 1) as usize;
        if n > a.pending.len() || a.pending[n - 1].hash != s.last_hash {
            return Err(ApplyError::conflict(format!("audit seal {}-{}: its last hash is not the state's", s.first_seq, s.last_seq)));
        }
        let sealed: Vec<AuditEntry> = a.pending.drain(..n).collect();
        a.segments.push(AuditSegment {
            first_seq: s.first_seq,
            last_seq: s.last_seq,
            key: s.key,
            last_hash: s.last_hash,
            first_unix_ms: sealed[0].unix_ms,
            last_unix_ms: sealed[n - 1].unix_ms,
        });
        if a.segments.len() > MAX_SEGMENTS {
            let gone = a.segments.remove(0);
            a.retained_from = gone.last_seq + 1;
            a.retained_prev = gone.last_hash;
        }
        Ok(ApplyOutput::None)
    }
}

/// A segment's store key: its first and last seq, zero-padded so keys sort by seq.
pub fn segment_key(first: u64, last: u64) -> String {
    format!("{AUDIT_PREFIX}/{first:016}-{last:016}.pb")
}

/// Checks the trail: every retained segment (read by `read`) and the pending entries chain
/// from `retained_prev` to `head`, each entry's hash is its content's, and no seq is missing.
/// Returns (entries checked, segments read, problems).
pub fn verify(state: &AuditState, mut read: impl FnMut(&str) -> Result<Vec<u8>, String>) -> (u64, u64, Vec<String>) {
    let mut problems = Vec::new();
    let (mut checked, mut segments) = (0u64, 0u64);
    let mut prev = state.retained_prev.clone();
    let mut expect = state.retained_from;
    let check = |e: &AuditEntry, prev: &mut Vec<u8>, expect: &mut u64, problems: &mut Vec<String>| {
        if e.seq != *expect {
            if e.seq > *expect {
                problems.push(format!("entries {}-{} are missing (removed)", *expect, e.seq - 1));
            } else {
                problems.push(format!("entry {} is out of order (after {})", e.seq, *expect - 1));
            }
        }
        if entry_hash(e) != e.hash {
            problems.push(format!("entry {} was modified (its hash is not its content's)", e.seq));
        } else if e.prev != *prev {
            problems.push(format!("entry {} does not chain from the entry before it", e.seq));
        }
        *prev = e.hash.clone();
        *expect = e.seq + 1;
    };
    for seg in &state.segments {
        segments += 1;
        let entries = match read(&seg.key).and_then(|b| AuditSegmentFile::decode(&b[..]).map_err(|e| format!("not an audit segment: {e}"))) {
            Ok(f) => f.entries,
            Err(e) => {
                problems.push(format!("segment {} (entries {}-{}) cannot be read: {e}", seg.key, seg.first_seq, seg.last_seq));
                prev = seg.last_hash.clone();
                expect = seg.last_seq + 1;
                continue;
            }
        };
        for e in &entries {
            checked += 1;
            check(e, &mut prev, &mut expect, &mut problems);
        }
        if expect != seg.last_seq + 1 {
            problems.push(format!("segment {} ends at entry {} but the state says {}: entries removed", seg.key, expect.saturating_sub(1), seg.last_seq));
        }
        if prev != seg.last_hash {
            problems.push(format!("segment {}: its last hash is not the one the state recorded (entries modified or removed)", seg.key));
        }
        prev = seg.last_hash.clone();
        expect = seg.last_seq + 1;
    }
    for e in &state.pending {
        checked += 1;
        check(e, &mut prev, &mut expect, &mut problems);
    }
    if prev != state.head {
        problems.push("the last entry is not the state's head".into());
    }
    (checked, segments, problems)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::{cmd, spec, with_dataset};
    use shoal_proto::{Command, SettingsRequest};

    fn settings(sm: &mut StateMachine, index: u64, who: Option<AuditContext>) {
        let c = Command { audit: who, proposed_unix_ms: 1000 + index, ..cmd(command::Kind::SetSettings(SettingsRequest { keep_jobs: Some(10), ..Default::default() })) };
        sm.apply(index, c).unwrap();
    }

    /// Seals what is due and keeps the segment in `store`, as the leader does.
    fn seal(sm: &mut StateMachine, index: u64, store: &mut std::collections::BTreeMap<String, Vec<u8>>) {
        let s = sm.audit_seal_due(u64::MAX).expect("entries to seal");
        let entries = sm.audit_entries(&s).unwrap();
        store.insert(s.key.clone(), AuditSegmentFile { entries }.encode_to_vec());
        sm.apply(index, cmd(command::Kind::SealAudit(s))).unwrap();
    }

    #[test]
    fn entries_chain_seal_into_segments_verify_and_the_state_stays_bounded() {
        let mut sm = with_dataset();
        let who = AuditContext { actor: "0123456789abcdef".into(), role: "operator".into(), method: "SubmitJob".into() };
        let submitted = Command { audit: Some(who.clone()), request_id: "r1".into(), ..cmd(command::Kind::SubmitJob(spec(2))) };
        sm.apply(10, submitted.clone()).unwrap();
        // A retry is not a second mutation; a refused one is kept with why; machine traffic is not kept.
        sm.apply(11, submitted).unwrap();
        assert!(sm.apply(12, cmd(command::Kind::CancelJob(99))).is_err());
        sm.apply(13, cmd(command::Kind::ForgetWorkers(Default::default()))).unwrap();
        let a = sm.audit_state();
        let whats: Vec<&str> = a.pending.iter().map(|e| e.what.as_str()).collect();
        assert_eq!(whats[whats.len() - 2..], ["submit_job: job 1", "cancel_job: job 99"]);
        let submit = &a.pending[a.pending.len() - 2];
        assert_eq!((submit.actor.as_str(), submit.role.as_str(), submit.request_id.as_str(), submit.outcome.as_str()), ("0123456789abcdef", "operator", "r1", "ok"));
        assert!(a.pending.last().unwrap().outcome.contains("99"));
        assert!(sm.audit_seal_due(0).is_none(), "not due before its time");

        let mut store = std::collections::BTreeMap::new();
        seal(&mut sm, 14, &mut store);
        settings(&mut sm, 15, Some(who.clone()));
        let read = |sm: &StateMachine, store: &std::collections::BTreeMap<String, Vec<u8>>| verify(sm.audit_state(), |k| store.get(k).cloned().ok_or_else(|| "not in the store".to_string()));
        let (n, segs, problems) = read(&sm, &store);
        assert_eq!((segs, problems.len()), (1, 0), "{problems:?}");
        assert_eq!(n, sm.audit_state().next_seq);
        // A seal that is not the pending entries' start changes nothing.
        let stale = AuditSeal { first_seq: 0, last_seq: 0, key: segment_key(0, 0), last_hash: vec![] };
        assert!(sm.apply(16, cmd(command::Kind::SealAudit(stale))).is_err());

        // Snapshots carry the trail.
        let restored = StateMachine::from_snapshot(sm.to_snapshot()).unwrap();
        assert_eq!(restored.audit_state(), sm.audit_state());

        // Past MAX_SEGMENTS the oldest records go, and verification starts after them.
        for i in 0..MAX_SEGMENTS as u64 + 2 {
            settings(&mut sm, 100 + 2 * i, Some(who.clone()));
            seal(&mut sm, 101 + 2 * i, &mut store);
        }
        let a = sm.audit_state();
        assert_eq!(a.segments.len(), MAX_SEGMENTS);
        assert_eq!(a.retained_from, a.segments[0].first_seq);
        let (_, segs, problems) = read(&sm, &store);
        assert_eq!((segs as usize, problems.len()), (MAX_SEGMENTS, 0), "{problems:?}");
    }
}
