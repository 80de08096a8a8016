//! The size limits of a job, in one place so they agree with each other, checked when a job is
//! submitted (`check_job`) with an error that names the limit.
//!
//! The gRPC ring sends a model of `MAX_MODEL_PARAMS` over 2 ranks in chunks of half the model,
//! which is `MAX_MESSAGE_BYTES`; its mailbox holds two such chunks (one hop's and an early
//! arrival of the next). The shared-memory and TCP transports carry any buffer that fits in
//! memory, so the gRPC ring sets the bound.

use crate::spec::{JobSpec, ModelKind, ModelSpec};

/// The largest model a job may train: 2^28 parameters (1 GiB of f32).
pub const MAX_MODEL_PARAMS: u64 = 1 << 28;
/// The largest data-plane message: one ring chunk of the largest model over 2 ranks.
pub const MAX_MESSAGE_BYTES: usize = 512 << 20;
/// What a worker's data-plane mailbox holds at once, in bytes.
pub const MAILBOX_BYTES: usize = 2 * MAX_MESSAGE_BYTES;
/// The largest activation buffer of one rank's share of a batch, in floats (1 GiB).
pub const MAX_BATCH_FLOATS: u64 = 1 << 28;

const _: () = assert!(MAX_MODEL_PARAMS * 4 / 2 <= MAX_MESSAGE_BYTES as u64, "a chunk of the largest model must fit one message");
const _: () = assert!(MAILBOX_BYTES >= 2 * MAX_MESSAGE_BYTES, "the mailbox must hold two of the largest chunks");

/// The number of parameters of `model` on inputs of `input` and `classes` classes (the same
/// layout the worker builds). None when the shape does not suit the model.
pub fn param_count(model: &ModelSpec, input: &[u64], classes: u64) -> Option<u64> {
    let mut total = 0u64;
    let mut features: u64 = input.iter().try_fold(1u64, |a, &d| a.checked_mul(d))?;
    if model.model_kind() == ModelKind::Cnn {
        let [h, w] = input else { return None };
        let [c1, c2] = model.conv_channels().map(|c| c as u64);
        total += c1 * 9 + c1 + c2 * c1 * 9 + c2;
        features = c2.checked_mul(h / 4)?.checked_mul(w / 4)?;
    }
    for out in model.hidden_sizes().into_iter().map(|h| h as u64).chain([classes]) {
        total = total.checked_add(out.checked_mul(features)?.checked_add(out)?)?;
        features = out;
    }
    Some(total)
}

/// The largest per-record activation buffer, in floats: what a rank allocates per record of
/// its share of the batch.
fn activation_floats(model: &ModelSpec, input: &[u64], classes: u64) -> u64 {
    let features = input.iter().fold(1u64, |a, &d| a.saturating_mul(d));
    let mut widest = model.hidden_sizes().into_iter().map(|h| h as u64).chain([classes, features]).max().unwrap_or(0);
    if let (ModelKind::Cnn, [h, w]) = (model.model_kind(), input) {
        let [c1, _] = model.conv_channels().map(|c| c as u64);
        // The first block's output planes and the second's im2col.
        widest = widest.max(c1.saturating_mul(*h).saturating_mul(*w)).max((c1 * 9).saturating_mul(h / 2).saturating_mul(w / 2));
    }
    widest
}

/// Checks a job against the limits, for a dataset of records shaped `input` with `classes`
/// classes.
pub fn check_job(spec: &JobSpec, input: &[u64], classes: u64) -> Result<(), String> {
    let params = param_count(&spec.model, input, classes).unwrap_or(u64::MAX);
    if params > MAX_MODEL_PARAMS {
        return Err(format!(
            "model: {params} parameters is more than the {MAX_MODEL_PARAMS} a job may train (the collective's limit: {} MiB per message)",
            MAX_MESSAGE_BYTES >> 20
        ));
    }
    // The largest share: the smallest generation the job may run as.
    let share = (spec.training.batch_size as u64).div_ceil(spec.cluster.min().max(1) as u64);
    let floats = share.saturating_mul(activation_floats(&spec.model, input, classes));
    if floats > MAX_BATCH_FLOATS {
        return Err(format!(
            "training.batch_size: {share} records per worker times {} activation floats per record is {floats}, more than the {MAX_BATCH_FLOATS} limit",
            activation_floats(&spec.model, input, classes)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(model: &str, batch: u32) -> JobSpec {
        JobSpec::parse(&format!(
            "name = \"t\"\n[model]\n{model}\n[dataset]\nname = \"d\"\ntrain = [0, 100000000]\n[training]\nepochs = 1\nbatch_size = {batch}\n\
             [training.optimizer]\nkind = \"sgd\"\nlr = 0.1\n[cluster]\nworkers = 2\n"
        ))
        .unwrap()
    }

    #[test]
    fn param_counts_of_the_examples() {
        // 784-512-256-10 and the CNN example (32, 64 channels, 128 hidden) on 28x28.
        assert_eq!(param_count(&spec("kind = \"mlp\"", 64).model, &[28, 28], 10), Some(535_818));
        assert_eq!(param_count(&spec("kind = \"cnn\"", 64).model, &[28, 28], 10), Some(421_642));
    }

    #[test]
    fn limits_name_themselves() {
        assert!(check_job(&spec("kind = \"mlp\"", 64), &[28, 28], 10).is_ok());
        let e = check_job(&spec("kind = \"mlp\"\nhidden = [65536, 65536]", 64), &[28, 28], 10).unwrap_err();
        assert!(e.starts_with("model:") && e.contains(&MAX_MODEL_PARAMS.to_string()), "{e}");
        let e = check_job(&spec("kind = \"mlp\"", 1_000_000), &[512, 512], 10).unwrap_err();
        assert!(e.starts_with("training.batch_size:") && e.contains(&MAX_BATCH_FLOATS.to_string()), "{e}");
        assert!(check_job(&spec("kind = \"mlp\"", 64), &[u64::MAX, 2], 10).is_err(), "overflow is over the limit");
    }
}
