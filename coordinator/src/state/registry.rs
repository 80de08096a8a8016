//! The model registry: versions with lineage, aliases, the evaluation gate.

use super::*;

impl StateMachine {
    /// A new version of model `name`: job `job`'s model (its final checkpoint), with its
    /// lineage (spec, dataset version, the model version it warm-started from, accuracy).
    pub(super) fn register_model(&mut self, index: u64, name: &str, job: &JobInfo) -> Result<ModelInfo, ApplyError> {
        dataset::validate_name(name).map_err(|e| e.to_string().replace("name", "model name"))?;
        if job.state() != JobState::Succeeded {
            return Err(format!("job {} is {}: only a job that succeeded has a model to register", job.id, job.state().label()).into());
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
            return Err(format!("job {} is already version {} of model {name}", job.id, v.version).into());
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
            test_loss: job.progress.as_ref().and_then(|p| p.test_loss),
            test_rmse: job.progress.as_ref().and_then(|p| p.test_rmse),
            test_r2: job.progress.as_ref().and_then(|p| p.test_r2),
            test_bpb: job.progress.as_ref().and_then(|p| p.test_bpb),
            registered_index: index,
            holdout_accuracy: -1.0,
            holder_accuracy: -1.0,
            ..Default::default()
        });
        let name = m.name.clone();
        Ok(self.model_page(&name, 0).expect("just registered"))
    }

    /// `[register] name`: registers a job that just succeeded, noting the outcome in it.
    pub(super) fn register_on_success(&mut self, index: u64, id: u64) {
        let Some(job) = self.jobs.get(&id).cloned() else { return };
        let plan = job.plan.clone().unwrap_or_default();
        let name = plan.register_name.clone();
        if name.is_empty() {
            return;
        }
        let outcome = self.register_model(index, &name, &job);
        let version = match &outcome {
            // The page lists the newest version first.
            Ok(m) => m.versions.first().map(|v| v.version).unwrap_or(0),
            Err(_) => 0,
        };
        let promotion = match (&outcome, plan.promote.as_ref()) {
            (Ok(_), Some(p)) => Some(self.promote(&name, version, p, job.progress.as_ref().cloned().unwrap_or_default())),
            _ => None,
        };
        let Some(job) = self.jobs.get_mut(&id) else { return };
        match outcome {
            Ok(_) => job.registered_model = format!("{name}@{version}"),
            Err(e) => job.register_error = e.to_string(),
        }
        if let Some(p) = promotion {
            job.promotion = p;
        }
    }

    /// The evaluation gate: moves `p.alias` of model `name` to `version` if rank 0's scores
    /// say the candidate is not worse than the holder it was compared with (by `min_delta`),
    /// and that holder still holds the alias. Records both scores and the decision in the
    /// version; returns the decision in words.
    pub(super) fn promote(&mut self, name: &str, version: u64, p: &shoal_proto::PromotePlan, progress: JobProgress) -> String {
        let Some(m) = self.models.get_mut(name) else { return "not promoted: the model is gone".into() };
        let holder_now = m.aliases.iter().find(|a| a.alias == p.alias).map(|a| a.version).unwrap_or(0);
        let metric = if p.metric.is_empty() { "test_accuracy" } else { p.metric.as_str() };
        let higher = shoal_core::spec::metric_higher_is_better(metric).unwrap_or(true);
        // Scores of the gate's metric; a log from before there were others has the accuracy only.
        let accuracy = |a: f64| (a >= 0.0).then_some(a);
        let (cand, held) = match metric {
            "test_accuracy" => (progress.holdout_score.or(accuracy(progress.holdout_accuracy)), progress.holder_score.or(accuracy(progress.holder_accuracy))),
            _ => (progress.holdout_score, progress.holder_score),
        };
        let against = progress.holder_version;
        let what = metric.strip_prefix("test_").unwrap_or(metric);
        let decision = match (cand, held) {
            (None, _) => Err("the candidate was not scored on the holdout".to_string()),
            _ if holder_now != against => Err(format!("{name}@{} moved to version {holder_now} while version {against} was being compared", p.alias)),
            _ if against == 0 => Ok(format!("{name}@{} had no holder", p.alias)),
            (Some(c), None) => Err(format!("holdout {what} {c:.4}: version {against} was not scored")),
            (Some(c), Some(h)) => {
                let passes = if higher { c >= h + p.min_delta } else { c <= h - p.min_delta };
                let (better, worse) = if higher { ("above", "below") } else { ("below", "above") };
                if passes {
                    Ok(format!("holdout {what} {c:.4} against version {against}'s {h:.4} ({better} by at least min_delta {})", p.min_delta))
                } else {
                    Err(format!("holdout {what} {c:.4} is {worse} version {against}'s {h:.4} by more than min_delta {} allows", p.min_delta))
                }
            }
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
            (v.holdout_accuracy, v.holder_accuracy, v.holder_version, v.promotion) = (progress.holdout_accuracy, progress.holder_accuracy, against, text.clone());
            // As reported (a log from before these fields replays to what a snapshot holds).
            (v.metric, v.holdout_score, v.holder_score) = (p.metric.clone(), progress.holdout_score, progress.holder_score);
        }
        text
    }

    /// Model `name@x` (a version number or an alias).
    pub fn model_version(&self, reference: &str) -> Result<(&ModelInfo, &ModelVersion), ApplyError> {
        let (name, x) = reference.split_once('@').ok_or_else(|| format!("{reference:?} is not NAME@VERSION or NAME@ALIAS"))?;
        let m = self.models.get(name).ok_or_else(|| ApplyError::not_found(format!("there is no model {name}")))?;
        let version = match x.parse::<u64>() {
            Ok(v) => v,
            Err(_) => m.aliases.iter().find(|a| a.alias == x).map(|a| a.version).ok_or_else(|| ApplyError::not_found(format!("model {name} has no alias {x}")))?,
        };
        let v = m.versions.iter().find(|v| v.version == version).ok_or_else(|| ApplyError::not_found(format!("model {name} has no version {version}")))?;
        Ok((m, v))
    }

    pub fn models(&self) -> impl Iterator<Item = &ModelInfo> {
        self.models.values()
    }

    pub(super) fn set_model_alias(&mut self, r: shoal_proto::ModelAliasRequest) -> ApplyResult {
        dataset::validate_name(&r.alias).map_err(|_| ApplyError::invalid(format!("alias {:?} must be 1-128 of [A-Za-z0-9._-]", r.alias)))?;
        if r.alias.parse::<u64>().is_ok() {
            return Err(ApplyError::invalid(format!("alias {:?} is a number: it would read as a version", r.alias)));
        }
        let m = self.models.get_mut(&r.name).ok_or_else(|| ApplyError::not_found(format!("there is no model {}", r.name)))?;
        if !m.versions.iter().any(|v| v.version == r.version) {
            return Err(ApplyError::not_found(format!("model {} has no version {}", r.name, r.version)));
        }
        let holder = m.aliases.iter().find(|a| a.alias == r.alias).map(|a| a.version).unwrap_or(0);
        if let Some(expect) = r.expect {
            if holder != expect {
                let now = if holder == 0 { "no version".to_string() } else { format!("version {holder}") };
                let wanted = if expect == 0 { "no version".to_string() } else { format!("version {expect}") };
                return Err(ApplyError::conflict(format!("alias {} of model {} is held by {now}, not {wanted}: not moved", r.alias, r.name)));
            }
        }
        m.aliases.retain(|a| a.alias != r.alias);
        m.aliases.push(ModelAlias { alias: r.alias, version: r.version });
        m.aliases.sort_by(|a, b| a.alias.cmp(&b.alias));
        let name = r.name;
        Ok(ApplyOutput::Model(Box::new(self.model_page(&name, 0).expect("exists"))))
    }

    /// Model `name` with one page of its versions, newest first (`PAGE` at most).
    pub fn model_page(&self, name: &str, page: usize) -> Option<ModelInfo> {
        let m = self.models.get(name)?;
        let (range, next) = page_range(m.versions.len(), page);
        Some(ModelInfo {
            name: m.name.clone(),
            versions: m.versions[range].iter().rev().cloned().collect(),
            aliases: m.aliases.clone(),
            next_page: next,
            version_count: m.versions.len() as u32,
        })
    }

    /// One page of the models by name, each with its newest version only, and the next
    /// page's token.
    pub fn models_page(&self, page: usize) -> (Vec<ModelInfo>, String) {
        let skip = page.saturating_mul(PAGE);
        let list = self
            .models
            .values()
            .skip(skip)
            .take(PAGE)
            .map(|m| ModelInfo { name: m.name.clone(), versions: m.versions.last().cloned().into_iter().collect(), aliases: m.aliases.clone(), next_page: String::new(), version_count: m.versions.len() as u32 })
            .collect();
        let next = if self.models.len() > skip + PAGE { (page + 1).to_string() } else { String::new() };
        (list, next)
    }
}
