//! Gate steps: `[promote]`'s rule between two registered versions. An attempt scores the
//! candidate on the holdout (one batch job), then the alias's holder as it was when the step
//! started (a second job, unless there is none or it is the candidate), then decides in the
//! apply that ended the last job: the alias moves only if the candidate is not worse by the
//! metric (by `min_delta`) and the holder still holds it.

use shoal_core::pipeline::Gate;
use shoal_proto::StepOutput;

use super::*;

fn out(key: &str, value: impl Into<String>) -> StepOutput {
    StepOutput { key: key.into(), value: value.into() }
}

impl StateMachine {
    /// Starts a gate attempt: notes the candidate and the alias's holder, and submits the
    /// candidate's score job.
    pub(super) fn start_gate(&mut self, seq: u64, i: usize, text: &str) -> Result<u64, String> {
        let g = Gate::parse(text)?;
        let (name, version) = g.candidate()?;
        let (m, _) = self.model_version(&g.model).map_err(|e| format!("model: {e}"))?;
        let holder = m.aliases.iter().find(|a| a.alias == g.alias).map(|a| a.version).unwrap_or(0);
        let job = self.submit_step_job(seq, i, g.score_spec(&format!("gate-{name}-{version}"), &g.model)?)?;
        let s = &mut self.pipeline_runs.get_mut(&seq).expect("a run").steps[i];
        s.outputs = vec![out("holder_version", holder.to_string()), out("model", g.model.clone())];
        Ok(job)
    }

    /// A gate's score job succeeded with `scored`: the holder's score job next (its id), or
    /// the decision (the step's outputs set, None).
    pub(super) fn gate_scored(&mut self, seq: u64, i: usize, scored: &[StepOutput]) -> Result<Option<u64>, String> {
        let g = Gate::parse(&self.rendered_step(seq, i)?)?;
        let (name, version) = g.candidate()?;
        let so_far = self.pipeline_runs[&seq].steps[i].outputs.clone();
        let get = |k: &str| so_far.iter().find(|o| o.key == k).map(|o| o.value.clone());
        let score = scored.iter().find(|o| o.key == g.metric).and_then(|o| o.value.parse::<f64>().ok()).ok_or_else(|| {
            let has: Vec<&str> = scored.iter().filter(|o| o.key.starts_with("test_")).map(|o| o.key.as_str()).collect();
            format!("metric: the holdout score reported no {} (it has {})", g.metric, has.join(", "))
        })?;
        let holder: u64 = get("holder_version").and_then(|v| v.parse().ok()).unwrap_or(0);
        let (candidate, held) = match get("candidate_score") {
            None => {
                let s = &mut self.pipeline_runs.get_mut(&seq).expect("a run").steps[i];
                s.outputs.push(out("candidate_score", format!("{score}")));
                if holder != 0 && holder != version {
                    let job = self.submit_step_job(seq, i, g.score_spec(&format!("gate-{name}-{holder}"), &format!("{name}@{holder}"))?)?;
                    return Ok(Some(job));
                }
                (score, None)
            }
            Some(c) => (c.parse::<f64>().map_err(|_| format!("candidate_score {c:?} is not a number"))?, Some(score)),
        };
        let now_held = self.models.get(&name).and_then(|m| m.aliases.iter().find(|a| a.alias == g.alias)).map(|a| a.version).unwrap_or(0);
        let what = g.metric.strip_prefix("test_").unwrap_or(&g.metric).to_string();
        let decision: Result<String, String> = match held {
            _ if now_held != holder => Err(format!("{name}@{} moved to version {now_held} while version {holder} was being compared", g.alias)),
            _ if holder == version => Err(format!("version {version} already holds {name}@{}", g.alias)),
            None => Ok(format!("{name}@{} had no holder", g.alias)),
            Some(h) if g.passes(candidate, h) => Ok(format!("holdout {what} {candidate:.4} against version {holder}'s {h:.4} (min_delta {})", g.min_delta)),
            Some(h) => Err(format!("holdout {what} {candidate:.4} against version {holder}'s {h:.4}: not within min_delta {}", g.min_delta)),
        };
        let promoted = decision.is_ok();
        if promoted {
            self.set_model_alias(shoal_proto::ModelAliasRequest { name: name.clone(), alias: g.alias.clone(), version, ..Default::default() }).map_err(|e| e.to_string())?;
        }
        let text = match decision {
            Ok(why) => format!("promoted to {name}@{}: {why}", g.alias),
            Err(why) => format!("not promoted to {name}@{}: {why}", g.alias),
        };
        if let Some(v) = self.models.get_mut(&name).and_then(|m| m.versions.iter_mut().find(|v| v.version == version)) {
            v.promotion = text.clone();
        }
        let mut outputs = vec![
            out("candidate_score", format!("{candidate}")),
            out("decision", text),
            out("holder_version", holder.to_string()),
            out("model", g.model.clone()),
            out("promoted", promoted.to_string()),
        ];
        if let Some(h) = held {
            outputs.push(out("holder_score", format!("{h}")));
        }
        outputs.sort_by(|a, b| a.key.cmp(&b.key));
        self.pipeline_runs.get_mut(&seq).expect("a run").steps[i].outputs = outputs;
        Ok(None)
    }
}
