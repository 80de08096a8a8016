//! Where checkpoints live in the store and what a well-formed manifest looks like. The files
//! themselves are written and read by the worker; the coordinator only checks manifests.

use shoal_proto::CheckpointManifest;

/// `jobs/<job>/checkpoints`, relative to the store.
pub fn job_checkpoints_dir(job: u64) -> String {
    format!("jobs/{job}/checkpoints")
}

/// `jobs/<job>/checkpoints/step-<step>`, relative to the store.
pub fn checkpoint_dir(job: u64, step: u64) -> String {
    format!("{}/step-{step}", job_checkpoints_dir(job))
}

/// The step of a `step-<N>` folder name.
pub fn parse_step_dir(name: &str) -> Option<u64> {
    name.strip_prefix("step-")?.parse().ok()
}

/// The safetensors part that rank `rank` writes.
pub fn part_file(rank: u32) -> String {
    format!("part-{rank}.safetensors")
}

pub const MANIFEST_FILE: &str = "manifest.pb";

/// Checks that a manifest describes a checkpoint of `job` at its own folder, with plain file
/// names (no path can escape the folder). The error says what is wrong.
pub fn validate_manifest(m: &CheckpointManifest, job: u64) -> Result<(), String> {
    if m.job_id != job {
        return Err(format!("checkpoint manifest is for job {}, not job {job}", m.job_id));
    }
    let dir = checkpoint_dir(job, m.step);
    if m.dir != dir {
        return Err(format!("checkpoint of step {} must live in {dir}, manifest says {:?}", m.step, m.dir));
    }
    if m.files.is_empty() {
        return Err(format!("checkpoint of step {} lists no files", m.step));
    }
    for f in &m.files {
        let plain = !f.name.is_empty() && f.name.len() <= 128 && f.name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) && !f.name.starts_with('.');
        if !plain {
            return Err(format!("checkpoint of step {}: file name {:?} is not a plain name", m.step, f.name));
        }
        if f.blake3.len() != 64 || !f.blake3.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!("checkpoint of step {}: file {} has no valid blake3", m.step, f.name));
        }
    }
    if m.world_size == 0 {
        return Err(format!("checkpoint of step {} has world size 0", m.step));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_proto::CheckpointFile;

    #[test]
    fn manifests_must_stay_in_their_folder() {
        let ok = CheckpointManifest {
            job_id: 3,
            step: 20,
            world_size: 2,
            dir: checkpoint_dir(3, 20),
            files: vec![CheckpointFile { name: part_file(0), bytes: 10, blake3: "a".repeat(64), rank: 0 }],
            ..Default::default()
        };
        validate_manifest(&ok, 3).unwrap();
        assert!(validate_manifest(&ok, 4).is_err());
        let mut bad = ok.clone();
        bad.files[0].name = "../../x".into();
        assert!(validate_manifest(&bad, 3).unwrap_err().contains("plain"));
        let mut bad = ok.clone();
        bad.dir = "jobs/3/checkpoints/step-21".into();
        assert!(validate_manifest(&bad, 3).is_err());
        let mut bad = ok;
        bad.files[0].blake3 = "zz".into();
        assert!(validate_manifest(&bad, 3).is_err());
        assert_eq!(parse_step_dir("step-42"), Some(42));
        assert_eq!(parse_step_dir("step-x"), None);
    }
}
