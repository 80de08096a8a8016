//! The model registry: versions with lineage, aliases, the evaluation gate.

use super::*;

impl StateMachine {
    /// A new version of model `name`: job `job`'s model (its final checkpoint), with its
    /// lineage (spec, dataset version, the model version it warm-started from, accuracy).
    pub(super) fn register_model(&mut self, index: u64, name: &str, job: &JobInfo) -> Result<ModelInfo, String> {
        dataset::validate_name(name).map_err(|e| e.to_string().replace("name", "model name"))?;
        if job.state() != JobState::Succeeded {
            return Err(format!("job {} is {}: only a job that succeeded has a model to register", job.id, job.state().label()));
        }
        let checkpoint = job.checkpoints.last().cloned().ok_or_else(|| format!("job {} has no checkpoint", job.id))?;
        let parent = job
            .init
            .as_ref()
            .and_then(|i| {
                self.models.values().find_map(|m| {
                    let v = m.versions.iter().find(|v| v.checkpoint.as_ref().is_some_and(|c| c.job_id == i.job_id && c.step == i.step))?;
                    Some(format!("{}@{}", m.name, v.version))
                })
            })
            .unwrap_or_default();
        let m = self.models.entry(name.to_string()).or_insert_with(|| ModelInfo { name: name.to_string(), ..Default::default() });
        if let Some(v) = m.versions.iter().find(|v| v.job_id == job.id) {
            return Err(format!("job {} is already version {} of model {name}", job.id, v.version));
        }
        let version = m.versions.last().map(|v| v.version).unwrap_or(0) + 1;
        m.versions.push(ModelVersion {
            version,
            job_id: job.id,
            spec_toml: job.spec_toml.clone(),
            dataset_name: job.dataset_name.clone(),
            dataset_version: job.dataset_version,
            parent,
            checkpoint: Some(checkpoint),
            test_accuracy: job.progress.as_ref().map(|p| p.test_accuracy).unwrap_or(-1.0),
            registered_index: index,
            holdout_accuracy: -1.0,
            holder_accuracy: -1.0,
            ..Default::default()
        });
        Ok(m.clone())
    }

    /// `[register] name`: registers a job that just succeeded, noting the outcome in it.
    pub(super) fn register_on_success(&mut self, index: u64, id: u64) {
        let Some(job) = self.jobs.get(&id).cloned() else { return };
        let Some(name) = JobSpec::parse(&job.spec_toml).ok().and_then(|s| s.register).map(|r| r.name) else { return };
        let outcome = self.register_model(index, &name, &job);
        let version = match &outcome {
            Ok(m) => m.versions.last().map(|v| v.version).unwrap_or(0),
            Err(_) => 0,
        };
        let promotion = match (&outcome, JobSpec::parse(&job.spec_toml).ok().and_then(|s| s.promote)) {
            (Ok(_), Some(p)) => Some(self.promote(&name, version, &p, job.progress.as_ref().cloned().unwrap_or_default())),
            _ => None,
        };
        let Some(job) = self.jobs.get_mut(&id) else { return };
        match outcome {
            Ok(_) => job.registered_model = format!("{name}@{version}"),
            Err(e) => job.register_error = e,
        }
        if let Some(p) = promotion {
            job.promotion = p;
        }
    }

    /// The evaluation gate: moves `p.alias` of model `name` to `version` if rank 0's scores
    /// say the candidate is not worse than the holder it was compared with (by `min_delta`),
    /// and that holder still holds the alias. Records both scores and the decision in the
    /// version; returns the decision in words.
    pub(super) fn promote(&mut self, name: &str, version: u64, p: &shoal_core::spec::PromoteSpec, progress: JobProgress) -> String {
        let Some(m) = self.models.get_mut(name) else { return "not promoted: the model is gone".into() };
        let holder_now = m.aliases.iter().find(|a| a.alias == p.alias).map(|a| a.version).unwrap_or(0);
        let (cand, held, against) = (progress.holdout_accuracy, progress.holder_accuracy, progress.holder_version);
        let decision = if cand < 0.0 {
            Err("the candidate was not scored on the holdout".to_string())
        } else if holder_now != against {
            Err(format!("{name}@{} moved to version {holder_now} while version {against} was being compared", p.alias))
        } else if against == 0 {
            Ok(format!("{name}@{} had no holder", p.alias))
        } else if cand >= held + p.min_delta {
            Ok(format!("holdout accuracy {cand:.4} against version {against}'s {held:.4} (min_delta {})", p.min_delta))
        } else {
            Err(format!("holdout accuracy {cand:.4} is below version {against}'s {held:.4} (min_delta {})", p.min_delta))
        };
        let text = match &decision {
            Ok(why) => {
                m.aliases.retain(|a| a.alias != p.alias);
                m.aliases.push(ModelAlias { alias: p.alias.clone(), version });
                m.aliases.sort_by(|a, b| a.alias.cmp(&b.alias));
                format!("promoted to {name}@{}: {why}", p.alias)
            }
            Err(why) => format!("not promoted to {name}@{}: {why}", p.alias),
        };
        if let Some(v) = m.versions.iter_mut().find(|v| v.version == version) {
            (v.holdout_accuracy, v.holder_accuracy, v.holder_version, v.promotion) = (cand, held, against, text.clone());
        }
        text
    }

    /// Model `name@x` (a version number or an alias).
    pub fn model_version(&self, reference: &str) -> Result<(&ModelInfo, &ModelVersion), String> {
        let (name, x) = reference.split_once('@').ok_or_else(|| format!("{reference:?} is not NAME@VERSION or NAME@ALIAS"))?;
        let m = self.models.get(name).ok_or_else(|| format!("there is no model {name}"))?;
        let version = match x.parse::<u64>() {
            Ok(v) => v,
            Err(_) => m.aliases.iter().find(|a| a.alias == x).map(|a| a.version).ok_or_else(|| format!("model {name} has no alias {x}"))?,
        };
        let v = m.versions.iter().find(|v| v.version == version).ok_or_else(|| format!("model {name} has no version {version}"))?;
        Ok((m, v))
    }

    pub fn models(&self) -> impl Iterator<Item = &ModelInfo> {
        self.models.values()
    }
}
