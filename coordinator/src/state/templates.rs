//! Job templates fired by dataset appends.

use super::*;

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
                Err(e) => TemplateFiring { dataset_version: version, job_id: 0, error: e },
            };
            self.templates.get_mut(&id).expect("listed above").firings.push(firing);
        }
    }

    pub fn templates(&self) -> impl Iterator<Item = &JobTemplate> {
        self.templates.values()
    }
}
