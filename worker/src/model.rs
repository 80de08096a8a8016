//! The models' layouts: every parameter tensor's name, shape and place in one flat f32 buffer
//! (so gradients are all-reduced and optimizer updates fused over it), their seeded
//! initialization, their PyTorch names, and their reference definition in candle. The passes
//! that train and evaluate are in `net`.

use candle_core::{Device, Tensor};
use shoal_core::rng::SplitMix64;
use shoal_core::spec::{ModelKind, ModelSpec};

use crate::WorkerError;

/// Largest model (in f32 parameters) a worker accepts: 4 GiB of parameters.
pub const MAX_PARAMS: usize = shoal_core::limits::MAX_MODEL_PARAMS as usize;

#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    /// Fan-in for the default init bound 1/sqrt(fan_in) (PyTorch's default for both kinds).
    pub fan_in: usize,
}

impl ParamSpec {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The PyTorch module name of parameter `name` of a `kind` model (README documents the
/// modules): the MLP is `nn.Sequential(Linear, ReLU, ..., Linear)` over flattened inputs, so
/// dense layer i is module 2i; the CNN is `nn.Sequential(Conv2d, ReLU, MaxPool2d, Conv2d,
/// ReLU, MaxPool2d, Flatten, Linear, ReLU, ..., Linear)`, so its convolutions are modules 0
/// and 3 and dense layer i is module 7 + 2i. Weights keep shoal's layout, which is PyTorch's
/// ([out, in] and [out, in, kh, kw]).
pub fn pytorch_name(kind: &str, name: &str) -> Option<String> {
    let (module, field) = name.split_once('.')?;
    let dense_base = match kind {
        "mlp" => 0,
        "cnn" => 7,
        _ => return None,
    };
    let index = match (kind, module) {
        ("cnn", "conv1") => 0,
        ("cnn", "conv2") => 3,
        (_, fc) => dense_base + 2 * fc.strip_prefix("fc")?.parse::<usize>().ok()?,
    };
    Some(format!("{index}.{field}"))
}

#[derive(Clone, Debug)]
pub struct Model {
    pub kind: ModelKind,
    pub params: Vec<ParamSpec>,
    pub input_shape: Vec<usize>,
    pub classes: usize,
    /// Number of dense layers (the last one is the classifier).
    dense_layers: usize,
}

impl Model {
    /// Lays out the parameters for `spec` on inputs of `input_shape` (e.g. [28, 28]).
    pub fn new(spec: &ModelSpec, input_shape: &[usize], classes: usize) -> Result<Model, WorkerError> {
        if classes < 2 {
            return Err(WorkerError::Model(format!("a classifier needs at least 2 classes, dataset has {classes}")));
        }
        let mut params = Vec::new();
        let mut offset = 0;
        let mut push = |name: String, shape: Vec<usize>, fan_in: usize| {
            let p = ParamSpec { name, shape, offset, fan_in };
            offset += p.len();
            params.push(p);
        };
        let kind = spec.model_kind();
        let mut features: usize = input_shape.iter().product();
        if kind == ModelKind::Cnn {
            let [h, w] = match input_shape {
                [h, w] => [*h, *w],
                _ => return Err(WorkerError::Model(format!("cnn needs 2-d inputs, got shape {input_shape:?}"))),
            };
            if h < 4 || w < 4 {
                return Err(WorkerError::Model(format!("cnn inputs must be at least 4x4, got {h}x{w}")));
            }
            let [c1, c2] = spec.conv_channels();
            push("conv1.weight".into(), vec![c1, 1, 3, 3], 9);
            push("conv1.bias".into(), vec![c1], 9);
            push("conv2.weight".into(), vec![c2, c1, 3, 3], c1 * 9);
            push("conv2.bias".into(), vec![c2], c1 * 9);
            features = c2 * (h / 2 / 2) * (w / 2 / 2);
        }
        let mut sizes = spec.hidden_sizes();
        sizes.push(classes);
        for (i, &out) in sizes.iter().enumerate() {
            push(format!("fc{i}.weight"), vec![out, features], features);
            push(format!("fc{i}.bias"), vec![out], features);
            features = out;
        }
        let model = Model { kind, params, input_shape: input_shape.to_vec(), classes, dense_layers: sizes.len() };
        // Checked before any buffer is allocated: a typo in a spec must not abort the worker.
        if model.num_params() > MAX_PARAMS {
            return Err(WorkerError::Model(format!("{} parameters is more than the {MAX_PARAMS} supported", model.num_params())));
        }
        Ok(model)
    }

    pub fn num_params(&self) -> usize {
        self.params.last().map(|p| p.offset + p.len()).unwrap_or(0)
    }

    /// Initial parameters, fixed by `seed`: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), each tensor
    /// from its own stream so adding a layer does not shift the others.
    pub fn init(&self, seed: u64) -> Vec<f32> {
        let mut out = vec![0.0f32; self.num_params()];
        for (i, p) in self.params.iter().enumerate() {
            let mut rng = SplitMix64::derive(seed, 0x1417_0000 + i as u64);
            let bound = 1.0 / (p.fan_in as f32).sqrt();
            for x in &mut out[p.offset..p.offset + p.len()] {
                *x = (rng.next_f32() * 2.0 - 1.0) * bound;
            }
        }
        out
    }

    /// Wraps the flat buffer in candle tensors, for `forward`.
    pub fn tensors(&self, flat: &[f32], dev: &Device) -> Result<Vec<Tensor>, WorkerError> {
        self.params.iter().map(|p| Ok(Tensor::from_slice(&flat[p.offset..p.offset + p.len()], p.shape.as_slice(), dev)?)).collect()
    }

    /// Logits for a batch `x` of shape [batch, features...], in candle: the models'
    /// reference definition (the same function as the PyTorch modules `checkpoint export`
    /// targets), which `net`'s kernels are checked against. Training and evaluation run
    /// `net`.
    pub fn forward(&self, params: &[&Tensor], x: &Tensor) -> Result<Tensor, WorkerError> {
        let batch = x.dim(0)?;
        let mut i = 0;
        let mut h = if self.kind == ModelKind::Cnn {
            let (hh, ww) = (self.input_shape[0], self.input_shape[1]);
            let mut t = x.reshape((batch, 1, hh, ww))?;
            for _ in 0..2 {
                let (w, b) = (params[i], params[i + 1]);
                i += 2;
                let c = w.dim(0)?;
                t = t.conv2d(w, 1, 1, 1, 1)?.broadcast_add(&b.reshape((1, c, 1, 1))?)?.relu()?.max_pool2d(2)?;
            }
            t.flatten_from(1)?
        } else {
            x.reshape((batch, ()))?
        };
        for layer in 0..self.dense_layers {
            let (w, b) = (params[i], params[i + 1]);
            i += 2;
            h = h.matmul(&w.t()?)?.broadcast_add(b)?;
            if layer + 1 < self.dense_layers {
                h = h.relu()?;
            }
        }
        Ok(h)
    }

    /// `mlp` or `cnn`, as in the spec.
    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            ModelKind::Mlp => "mlp",
            ModelKind::Cnn => "cnn",
        }
    }

    /// The PyTorch names of the parameters, in the layout that `checkpoint export` writes
    /// (see `pytorch_name`).
    pub fn pytorch_names(&self) -> Vec<String> {
        self.params.iter().map(|p| pytorch_name(self.kind_name(), &p.name).expect("every parameter has a PyTorch name")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mlp() -> ModelSpec {
        ModelSpec { kind: "mlp".into(), hidden: Some(vec![8]), channels: None }
    }

    #[test]
    fn layout_and_init_are_deterministic() {
        let m = Model::new(&mlp(), &[2, 3], 4).unwrap();
        assert_eq!(m.num_params(), 6 * 8 + 8 + 8 * 4 + 4);
        assert_eq!(m.init(1), m.init(1));
        assert_ne!(m.init(1), m.init(2));
        let bound = 1.0 / 6f32.sqrt();
        assert!(m.init(3)[..48].iter().all(|x| x.abs() <= bound));
    }

    #[test]
    fn pytorch_names_follow_the_sequential_layouts() {
        let m = Model::new(&ModelSpec { kind: "mlp".into(), hidden: Some(vec![8, 4]), channels: None }, &[2, 3], 3).unwrap();
        assert_eq!(m.pytorch_names(), ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]);
        let c = Model::new(&ModelSpec { kind: "cnn".into(), hidden: Some(vec![6]), channels: Some(vec![2, 3]) }, &[8, 8], 3).unwrap();
        assert_eq!(c.pytorch_names(), ["0.weight", "0.bias", "3.weight", "3.bias", "7.weight", "7.bias", "9.weight", "9.bias"]);
    }

    #[test]
    fn rejects_cnn_on_flat_inputs() {
        let spec = ModelSpec { kind: "cnn".into(), hidden: None, channels: None };
        assert!(Model::new(&spec, &[784], 10).is_err());
        assert!(Model::new(&mlp(), &[784], 1).is_err());
        let huge = ModelSpec { kind: "mlp".into(), hidden: Some(vec![65536, 65536]), channels: None };
        assert!(Model::new(&huge, &[784], 10).unwrap_err().to_string().contains("parameters"));
    }
}
