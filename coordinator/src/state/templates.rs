//! Job templates fired by dataset appends.

use super::*;

/// Firings a template keeps (its newest).
const FIRINGS_KEPT: usize = PAGE;

impl StateMachine {
    /// Starts one job from every template that dataset `name`'s new `version` fires. Part of
    /// the apply of the append itself, so each (template, version) fires exactly once, on
    /// every replica alike, whatever leader proposed it or took over after.
    pub(super) fn fire_templates(&mut self, _index: u64, name: &str, version: u64) {
        let due: Vec<u64> = self.templates.values().filter(|t| t.on_append == name).map(|t| t.id).collect();
        for id in due {
            let toml = self.templates[&id].spec_toml.clone();
            let firing = match self.submit(toml) {
                Ok(job) => {
                    let j = self.jobs.get_mut(&job.id).expect("just submitted");
                    (j.template_id, j.trigger_version) = (id, version);
                    TemplateFiring { dataset_version: version, job_id: job.id, error: String::new() }
                }
                Err(e) => TemplateFiring { dataset_version: version, job_id: 0, error: e.to_string() },
            };
            let t = self.templates.get_mut(&id).expect("listed above");
            t.firings.push(firing);
            // Bounded: the newest firings are kept (a firing happens inside its append's
            // apply, so nothing depends on the record for exactly-once).
            if t.firings.len() > FIRINGS_KEPT {
                let extra = t.firings.len() - FIRINGS_KEPT;
                t.firings.drain(..extra);
            }
        }
    }

    pub fn templates(&self) -> impl Iterator<Item = &JobTemplate> {
        self.templates.values()
    }

    pub(super) fn schedule_job(&mut self, toml: String) -> ApplyResult {
        let spec = JobSpec::parse(&toml).map_err(ApplyError::invalid)?;
        let on_append = spec.trigger.as_ref().map(|t| t.on_append.clone()).ok_or_else(|| ApplyError::invalid("a template needs [trigger] on_append = \"DATASET\""))?;
        if on_append != spec.dataset.name {
            return Err(ApplyError::invalid(format!("trigger.on_append: {on_append:?} is not the dataset the job trains ({:?})", spec.dataset.name)));
        }
        let id = self.templates.keys().next_back().copied().unwrap_or(0) + 1;
        let t = JobTemplate { id, name: spec.name.clone(), spec_toml: toml, on_append, firings: Vec::new() };
        self.templates.insert(id, t.clone());
        Ok(ApplyOutput::Template(Box::new(t)))
    }

    /// One page of the templates, newest first, and the next page's token.
    pub fn templates_page(&self, page: usize) -> (Vec<&JobTemplate>, String) {
        let (range, next) = page_range(self.templates.len(), page);
        (self.templates.values().skip(range.start).take(range.len()).rev().collect(), next)
    }
}
