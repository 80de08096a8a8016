//! The size limits of a job, in one place so they agree with each other, checked when a job is
//! submitted (`check_job`) with an error that names the limit.
//!
//! The gRPC ring sends a model of `MAX_MODEL_PARAMS` over 2 ranks in chunks of half the model,
//! which is `MAX_MESSAGE_BYTES`; its mailbox holds two such chunks (one hop's and an early
//! arrival of the next). The shared-memory and TCP transports carry any buffer that fits in
//! memory, so the gRPC ring sets the bound.

use crate::model::{Head, Layout};
use crate::spec::{JobSpec, ModelSpec};

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

/// The number of parameters of `model` on records of `feature_shape` and `classes` classes
/// (the layout of `crate::model::Layout`, presets and layer lists alike). None when the
/// model does not fit the records.
pub fn param_count(model: &ModelSpec, feature_shape: &[u64], head: impl Into<Head>) -> Option<u64> {
    Layout::new(model, feature_shape, head).ok().map(|l| l.param_count())
}

/// Checks a job against the limits, for a dataset of records shaped `feature_shape` with
/// `head` (a number: its classes): first the model's shapes (`Layout::new`: an error names the
/// layer, its kind and the shapes), then the limits (an error names the limit).
pub fn check_job(spec: &JobSpec, feature_shape: &[u64], head: impl Into<Head>) -> Result<(), String> {
    let layout = Layout::new(&spec.model, feature_shape, head).map_err(|e| e.to_string())?;
    check_layout(spec, &layout)
}

/// The limits for a model already laid out (`check_job` without the shape inference).
pub fn check_layout(spec: &JobSpec, layout: &Layout) -> Result<(), String> {
    let params = layout.param_count();
    if params > MAX_MODEL_PARAMS {
        return Err(format!(
            "model: {params} parameters is more than the {MAX_MODEL_PARAMS} a job may train (the collective's limit: {} MiB per message)",
            MAX_MESSAGE_BYTES >> 20
        ));
    }
    // The largest share: the smallest generation the job may run as. Per record, the
    // largest buffer any layer needs (its input, output or im2col).
    let share = (spec.training.batch_size as u64).div_ceil(spec.cluster.min().max(1) as u64);
    let per_record = layout.activation_floats();
    let floats = share.saturating_mul(per_record);
    if floats > MAX_BATCH_FLOATS {
        return Err(format!(
            "training.batch_size: {share} records per worker times {per_record} activation floats per record is {floats}, more than the {MAX_BATCH_FLOATS} limit"
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

    #[test]
    fn activation_floats_of_the_examples_are_todays() {
        // Today's rule: the widest of the features, hidden layers and classes (mlp); the CNN
        // also the first block's planes and the second conv's im2col (32 * 9 x 14 * 14).
        let per_record = |model: &str| Layout::new(&spec(model, 64).model, &[28, 28], 10).unwrap().activation_floats();
        assert_eq!(per_record("kind = \"mlp\""), 784);
        assert_eq!(per_record("kind = \"cnn\""), 32 * 9 * 14 * 14);
        // 1,000,000 records over 2 workers of 512x512 images.
        let e = check_job(&spec("kind = \"mlp\"", 1_000_000), &[512, 512], 10).unwrap_err();
        assert_eq!(e, format!("training.batch_size: 500000 records per worker times 262144 activation floats per record is 131072000000, more than the {MAX_BATCH_FLOATS} limit"));
    }

    #[test]
    fn layer_lists_are_checked_by_the_same_limits() {
        let list = |out: u64| format!("[[model.layers]]\nkind = \"flatten\"\n[[model.layers]]\nkind = \"linear\"\nout = {out}\n[[model.layers]]\nkind = \"relu\"\n[[model.layers]]\nkind = \"linear\"\nout = 10");
        assert_eq!(param_count(&spec(&list(512), 64).model, &[28, 28], 10), Some(784 * 512 + 512 + 512 * 10 + 10));
        assert!(check_job(&spec(&list(512), 64), &[28, 28], 10).is_ok());
        // 65536 wide on 3x512x512 records: 1.7e10 parameters.
        let e = check_job(&spec(&list(65536), 64), &[3, 512, 512], 10).unwrap_err();
        assert!(e.starts_with("model:") && e.contains("parameters"), "{e}");
        // A shape error comes first, naming the layer.
        let e = check_job(&spec(&list(512), 64), &[28, 28], 7).unwrap_err();
        assert!(e.starts_with("model.layers[3] (linear):") && e.contains("7 classes"), "{e}");
        assert_eq!(param_count(&spec(&list(512), 64).model, &[28, 28], 7), None);
        // A wide convolution: its im2col is the largest buffer.
        let conv = "[[model.layers]]\nkind = \"conv2d\"\nout = 64\nkernel = 7\npadding = 3\n[[model.layers]]\nkind = \"flatten\"\n[[model.layers]]\nkind = \"linear\"\nout = 10";
        let l = Layout::new(&spec(conv, 64).model, &[3, 224, 224], 10).unwrap();
        assert_eq!(l.activation_floats(), 3 * 49 * 224 * 224);
        let e = check_job(&spec(conv, 512), &[3, 224, 224], 10).unwrap_err();
        assert!(e.starts_with("training.batch_size: 256 records per worker times 7375872 activation floats"), "{e}");
    }
}
