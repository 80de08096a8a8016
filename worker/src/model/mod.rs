//! Models as layer lists, like `torch.nn.Sequential`: the `Model` trait (the seam a device
//! backend plugs into: the step loop sees only it) and `Sequential`, its CPU implementation
//! over flat f32 buffers on shoal's kernels. One file per layer kind, each with its forward
//! and backward pass; parameters live in one flat buffer (all-reduced and updated as one),
//! named as the Sequential built from the same list names them (`0.weight`, `3.bias`).
//!
//! Layout: a record's tensor of rank 3 ([C, H, W]) travels channel-major, `[C][N][H][W]`, so a
//! convolution over a whole batch is one GEMM; rank 1 ([F]) travels row-major, `[N][F]`.
//! `flatten` turns the one into the other in PyTorch's order.

mod activation;
mod conv2d;
mod dropout;
mod embedding;
mod flatten;
mod layernorm;
mod linear;
mod pool;
#[cfg(test)]
pub(crate) mod reference;
#[cfg(test)]
mod tests;
mod transformer;

use shoal_core::model::Head;
use shoal_core::spec::LayerSpec;
use shoal_core::rng::SplitMix64;
use shoal_core::spec::ModelSpec;
use shoal_kernels::{lanes, nn};

use crate::WorkerError;

/// Largest model (in f32 parameters) a worker accepts.
pub const MAX_PARAMS: usize = shoal_core::limits::MAX_MODEL_PARAMS as usize;

/// One parameter tensor: its name (PyTorch's, `3.weight`), shape and place in the flat
/// buffer.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    /// Fan-in for the init bound 1/sqrt(fan_in) (PyTorch's default for linear and conv).
    pub fan_in: usize,
    /// Initialized to this constant (layernorm's 1 and 0) instead of drawn.
    pub constant: Option<f32>,
    /// Drawn from N(0, EMBEDDING_STD^2) (embeddings) instead of the uniform.
    pub normal: bool,
}

impl ParamSpec {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The parameters of a model: every tensor's name, shape and place in one flat buffer, and
/// what the manifest records of the model (`mlp`, `cnn` or `sequential`).
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    pub kind: String,
    pub params: Vec<ParamSpec>,
}

impl Layout {
    pub fn num_params(&self) -> usize {
        self.params.last().map(|p| p.offset + p.len()).unwrap_or(0)
    }

    /// Initial parameters, fixed by `seed`: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), each tensor
    /// from its own stream (its position in the list) so adding a layer does not shift the
    /// others; a layernorm's weight 1 and bias 0.
    pub fn init(&self, seed: u64) -> Vec<f32> {
        let mut out = vec![0.0f32; self.num_params()];
        for (i, p) in self.params.iter().enumerate() {
            let slice = &mut out[p.offset..p.offset + p.len()];
            if let Some(c) = p.constant {
                slice.fill(c);
                continue;
            }
            let mut rng = SplitMix64::derive(seed, 0x1417_0000 + i as u64);
            if p.normal {
                normal_fill(&mut rng, shoal_core::model::EMBEDDING_STD, slice);
                continue;
            }
            let bound = 1.0 / (p.fan_in as f32).sqrt();
            for x in slice {
                *x = (rng.next_f32() * 2.0 - 1.0) * bound;
            }
        }
        out
    }

    /// The parameter tensor that holds element `i` of the flat buffer.
    pub fn param_at(&self, i: usize) -> Option<&ParamSpec> {
        self.params.iter().find(|p| (p.offset..p.offset + p.len()).contains(&i))
    }
}

/// `out` drawn from N(0, std^2) by Marsaglia's polar method, on `core::stats::ln` (IEEE
/// operations only), so the same seed gives the same bits on every CPU.
fn normal_fill(rng: &mut SplitMix64, std: f32, out: &mut [f32]) {
    let mut spare: Option<f64> = None;
    for x in out {
        let z = match spare.take() {
            Some(z) => z,
            None => loop {
                let u = rng.next_f64() * 2.0 - 1.0;
                let v = rng.next_f64() * 2.0 - 1.0;
                let s = u * u + v * v;
                if s > 0.0 && s < 1.0 {
                    let k = (-2.0 * shoal_core::stats::ln(s) / s).sqrt();
                    spare = Some(v * k);
                    break u * k;
                }
            },
        };
        *x = (z * std as f64) as f32;
    }
}

/// A batch cut into lanes: `per` records each, the first being lane `first` of the lane tree,
/// each lane's loss and gradient weighted `scale`.
#[derive(Clone, Copy, Debug)]
pub struct LaneSpan {
    pub per: usize,
    pub first: usize,
    pub scale: f32,
}

/// A batch as the model reads it.
pub struct Batch<'a> {
    /// The records' features, row-major `[N][features...]` as the dataset holds them.
    pub x: &'a [f32],
    /// One per record (all 0 for a regression: the record count is `labels.len()`).
    pub labels: &'a [u32],
    /// A regression's targets, `head.outputs()` per record (empty for a classifier).
    pub targets: &'a [f32],
    /// Their global record indices (dropout's masks are a function of them).
    pub records: &'a [u64],
    /// The global step (dropout draws anew every step).
    pub step: u64,
}

/// What trains: a layout of parameters in one flat buffer, and passes over it. The step loop
/// knows only this; a device backend implements it with its own kernels and buffers.
pub trait Model: Send {
    /// The parameters' layout.
    fn layout(&self) -> &Layout;
    /// What the outputs are: logits over classes, or a regression's targets.
    fn head(&self) -> Head;
    /// Buffer offsets where a layer's parameters start, last layer first: where the backward
    /// pass can hand a finished tail of the buffers over.
    fn layer_starts(&self) -> Vec<usize>;
    /// The batch's loss and its gradients written into `grads` (laid out like the
    /// parameters), both times `scale`. As the backward pass gets past each cut (descending
    /// layer starts ending at 0), it calls `ready(params[cut..end], grads[cut..end])`: those
    /// gradients are final and those parameters are not read again by this pass.
    fn forward_backward<'a>(
        &mut self,
        params: &'a mut [f32],
        batch: &Batch,
        scale: f32,
        grads: &'a mut [f32],
        cuts: &[usize],
        ready: &mut dyn FnMut(&'a mut [f32], &'a mut [f32]),
    ) -> Result<f32, WorkerError>;
    /// `[training] lanes` in one pass, where the model has kernels whose rows do not interact
    /// (dense layers): the batch's consecutive lanes (`span`), each lane's loss and gradients
    /// times `span.scale`, and for each lane-tree node in `nodes` its gradient into `outs`.
    /// None: compute each lane alone (`forward_backward` per lane).
    fn lanes_pass(&mut self, params: &[f32], batch: &Batch, span: LaneSpan, nodes: &[std::ops::Range<usize>], outs: &mut [&mut [f32]]) -> Option<Result<f32, WorkerError>>;
    /// The outputs (logits) of `n` records in evaluation mode (no dropout), `n` rows.
    fn outputs(&mut self, params: &[f32], x: &[f32], n: usize) -> Result<&[f32], WorkerError>;
    /// How many records batch scoring passes to `outputs` at once (None: a whole batch):
    /// a record's outputs may differ in the last bits with the pass's size, so this is fixed
    /// per model.
    fn eval_chunk(&self) -> Option<usize> {
        None
    }
    /// Adds `labels.len()` records' evaluation to `sums` (`targets`: a regression's).
    fn evaluate(&mut self, params: &[f32], x: &[f32], labels: &[u32], targets: &[f32], sums: &mut crate::metrics::EvalSums) -> Result<(), WorkerError> {
        let head = self.head();
        let out = self.outputs(params, x, labels.len())?;
        sums.add(head, out, labels, targets)
    }
}

/// The model `spec` describes, on records of `feature_shape` with outputs read as `head`
/// (a number: a classifier's classes), on this worker's backend: the one place that picks an
/// implementation of `Model` (a device backend would be chosen here; the step loop,
/// evaluation and scoring see only the trait). `seed` is the job's (dropout's masks derive
/// from it).
pub fn build(spec: &ModelSpec, feature_shape: &[usize], head: impl Into<Head>, seed: u64) -> Result<Box<dyn Model>, WorkerError> {
    let shape: Vec<u64> = feature_shape.iter().map(|&d| d as u64).collect();
    Ok(Box::new(Sequential::new(spec, &shape, head.into(), seed)?))
}

/// The index of the first largest value.
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best
}

/// How a boundary tensor lies in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Arrangement {
    /// `[N][F]` (per-record shape of rank 1, or any rank below a flatten).
    Rows,
    /// `[C][N][H][W]` (per-record shape [C, H, W]).
    Planes,
}

/// One layer of a `Sequential`.
enum Layer {
    Linear(linear::Linear),
    Conv2d(conv2d::Conv2d),
    MaxPool(pool::MaxPool),
    AvgPool(pool::AvgPool),
    Flatten(flatten::Flatten),
    Act(activation::Activation),
    Dropout(dropout::Dropout),
    LayerNorm(layernorm::LayerNorm),
    Embedding(embedding::Embedding),
    Positions(embedding::PositionEmbedding),
    Block(Box<transformer::Block>),
}

impl Layer {
    fn build(index: usize, spec: &LayerSpec, input: &[usize], output: &[usize], params: &[ParamSpec], fuse_relu: bool) -> Result<Layer, WorkerError> {
        Ok(match spec {
            LayerSpec::Linear { .. } => Layer::Linear(linear::Linear::new(input, output, params, fuse_relu)),
            LayerSpec::Conv2d { kernel, stride, padding, .. } => Layer::Conv2d(conv2d::Conv2d::new(input, output, params, *kernel as usize, *stride as usize, *padding as usize, fuse_relu)),
            LayerSpec::MaxPool2d { kernel, stride } => Layer::MaxPool(pool::MaxPool::new(input, *kernel as usize, stride.unwrap_or(*kernel) as usize)),
            LayerSpec::AvgPool2d { kernel, stride } => Layer::AvgPool(pool::AvgPool::new(input, *kernel as usize, stride.unwrap_or(*kernel) as usize)),
            LayerSpec::Flatten => Layer::Flatten(flatten::Flatten::new(input)),
            LayerSpec::Relu => Layer::Act(activation::Activation::new(activation::Kind::Relu, input)),
            LayerSpec::Gelu => Layer::Act(activation::Activation::new(activation::Kind::Gelu, input)),
            LayerSpec::Tanh => Layer::Act(activation::Activation::new(activation::Kind::Tanh, input)),
            LayerSpec::Sigmoid => Layer::Act(activation::Activation::new(activation::Kind::Sigmoid, input)),
            LayerSpec::Dropout { p } => Layer::Dropout(dropout::Dropout::new(index as u64, *p as f32, input)),
            LayerSpec::LayerNorm { over, eps } => Layer::LayerNorm(layernorm::LayerNorm::new(input, params, *over == shoal_core::spec::NormOver::Chw, *eps as f32)),
            LayerSpec::Embedding { .. } => Layer::Embedding(embedding::Embedding::new(input, params)),
            LayerSpec::PositionEmbedding => Layer::Positions(embedding::PositionEmbedding::new(input, params)),
            LayerSpec::TransformerBlock { heads, mlp_ratio, dropout } => {
                Layer::Block(Box::new(transformer::Block::new(index, input, params, *heads as usize, *mlp_ratio as usize, *dropout as f32)))
            }
        })
    }
}

fn grow(v: &mut Vec<f32>, n: usize) {
    if v.len() < n {
        v.resize(n, 0.0);
    }
}

/// Two distinct elements of `v`, one to read and one to write.
fn pair(v: &mut [Vec<f32>], read: usize, write: usize) -> (&Vec<f32>, &mut Vec<f32>) {
    assert_ne!(read, write, "a layer's input and output share a buffer");
    if read < write {
        let (a, b) = v.split_at_mut(write);
        (&a[read], &mut b[0])
    } else {
        let (a, b) = v.split_at_mut(read);
        (&b[0], &mut a[write])
    }
}

/// A layer list on shoal's CPU kernels.
pub struct Sequential {
    layout: Layout,
    layers: Vec<Layer>,
    /// Per boundary (the input of layer i; the last is the output): per-record size, layout
    /// and the activation buffer that holds it (a ReLU fused into the layer before it shares
    /// that layer's buffer).
    sizes: Vec<usize>,
    layouts: Vec<Arrangement>,
    slot: Vec<usize>,
    /// Layers whose ReLU the layer before carries out (their forward and backward are none).
    fused: Vec<bool>,
    /// The first layer with parameters: no input gradient is needed before it.
    first_param_layer: usize,
    /// Parameter tensors per layer.
    param_counts: Vec<usize>,
    /// The record's shape at the input ([C, H, W] images are made channel-major).
    input: Vec<usize>,
    outputs: usize,
    head: Head,
    seed: u64,
    batch: usize,
    acts: Vec<Vec<f32>>,
    dy: Vec<f32>,
    dx: Vec<f32>,
    lanes_scratch: Vec<f32>,
    /// Per layer, time spent in its forward and its backward passes (benchmarks only).
    profile: Option<Vec<[std::time::Duration; 2]>>,
}

/// A dense layer in a lanes pass: in and out widths, weight and bias offsets, a fused ReLU,
/// and the buffers of its input and output.
type DenseAt = (usize, usize, usize, Option<usize>, bool, usize, usize);

/// Records per evaluation pass of a model that is not dense only (batch scoring).
const IMAGE_EVAL_CHUNK: usize = 32;

impl Sequential {
    /// The model `spec` describes, on records of `feature_shape` with outputs read as `head`;
    /// `seed` is the job's (dropout's masks derive from it).
    pub fn new(spec: &ModelSpec, feature_shape: &[u64], head: impl Into<Head>, seed: u64) -> Result<Sequential, WorkerError> {
        let head = head.into();
        let layout = shoal_core::model::Layout::new(spec, feature_shape, head).map_err(|e| WorkerError::Model(e.to_string()))?;
        let mut params = Vec::new();
        let mut offset = 0usize;
        for p in layout.params() {
            let shape: Vec<usize> = p.shape.iter().map(|d| *d as usize).collect();
            let (fan_in, constant, normal) = match p.init {
                shoal_core::model::ParamInit::Uniform { fan_in } => (fan_in as usize, None, false),
                shoal_core::model::ParamInit::Ones => (0, Some(1.0), false),
                shoal_core::model::ParamInit::Zeros => (0, Some(0.0), false),
                shoal_core::model::ParamInit::Normal => (0, None, true),
            };
            let spec = ParamSpec { name: p.name.clone(), shape, offset, fan_in, constant, normal };
            offset = offset.checked_add(spec.len()).ok_or_else(|| WorkerError::Model("the model's size overflows".into()))?;
            if offset > MAX_PARAMS {
                // Checked before any buffer is allocated: a typo in a spec must not abort the worker.
                return Err(WorkerError::Model(format!("{offset} parameters is more than the {MAX_PARAMS} supported")));
            }
            params.push(spec);
        }
        let usize_of = |s: &[u64]| s.iter().map(|d| *d as usize).collect::<Vec<usize>>();
        let n_layers = layout.layers.len();
        let mut layers = Vec::with_capacity(n_layers);
        let mut fused = vec![false; n_layers];
        let mut sizes = vec![usize_of(&layout.input).iter().product()];
        let mut layouts = vec![if layout.input.len() == 3 { Arrangement::Planes } else { Arrangement::Rows }];
        let mut slot = vec![0usize];
        let mut next_slot = 1;
        let mut taken = 0;
        let mut first_param_layer = n_layers;
        for (i, (spec, shape)) in layout.layers.iter().zip(&layout.shapes).enumerate() {
            let own: Vec<ParamSpec> = params[taken..taken + shape.params.len()].to_vec();
            taken += shape.params.len();
            if !own.is_empty() {
                first_param_layer = first_param_layer.min(i);
            }
            // A ReLU right after a linear or conv2d layer runs inside it.
            let relu_next = matches!(layout.layers.get(i + 1), Some(LayerSpec::Relu)) && matches!(spec, LayerSpec::Linear { .. } | LayerSpec::Conv2d { .. });
            let (input, output) = (usize_of(&shape.input), usize_of(&shape.output));
            if fused[i] {
                layers.push(Layer::Act(activation::Activation::new(activation::Kind::Relu, &input)));
                slot.push(slot[i]);
            } else {
                layers.push(Layer::build(i, spec, &input, &output, &own, relu_next)?);
                slot.push(next_slot);
                next_slot += 1;
            }
            if relu_next {
                fused[i + 1] = true;
            }
            sizes.push(output.iter().product());
            layouts.push(if output.len() == 3 { Arrangement::Planes } else { Arrangement::Rows });
        }
        // conv2d + ReLU + 2x2 max pool run as one layer: forward, the convolution writes the
        // pool's output (the activations in between are never written); backward, the pool
        // applies the ReLU's mask as it writes (one pass over the gradient instead of three).
        for i in 2..layers.len() {
            if let (true, [Layer::Conv2d(conv), _, Layer::MaxPool(pool)]) = (fused[i - 1], &mut layers[i - 2..=i]) {
                if conv.relu && pool.is_2x2() {
                    (conv.pooled, pool.relu_before) = (true, true);
                }
            }
        }
        let kind = layout.preset.map(|k| k.name().to_string()).unwrap_or_else(|| "sequential".into());
        Ok(Sequential {
            layout: Layout { kind, params },
            layers,
            sizes,
            layouts,
            slot,
            fused,
            first_param_layer,
            param_counts: layout.shapes.iter().map(|s| s.params.len()).collect(),
            input: usize_of(&layout.input),
            outputs: head.outputs() as usize,
            head,
            seed,
            batch: 0,
            acts: (0..next_slot).map(|_| Vec::new()).collect(),
            dy: Vec::new(),
            dx: Vec::new(),
            lanes_scratch: Vec::new(),
            profile: None,
        })
    }

    fn prepare(&mut self, n: usize) {
        if n <= self.batch {
            return;
        }
        self.batch = n;
        for (b, size) in self.sizes.iter().enumerate() {
            grow(&mut self.acts[self.slot[b]], n * size);
        }
        let widest = self.sizes.iter().copied().max().unwrap_or(0);
        grow(&mut self.dy, n * widest);
        grow(&mut self.dx, n * widest);
    }

    /// The input batch into the first buffer, in its layout.
    fn load(&mut self, x: &[f32], n: usize) -> Result<(), WorkerError> {
        let size = self.sizes[0];
        if x.len() < n * size {
            return Err(WorkerError::Model(format!("a batch of {n} records of {size} features needs {} floats, got {}", n * size, x.len())));
        }
        let buf = &mut self.acts[self.slot[0]];
        match self.layouts[0] {
            Arrangement::Rows => buf[..n * size].copy_from_slice(&x[..n * size]),
            Arrangement::Planes => {
                // [N][C][P] -> [C][N][P].
                let (c, p) = (self.input[0], self.input[1] * self.input[2]);
                for ni in 0..n {
                    for ci in 0..c {
                        buf[(ci * n + ni) * p..(ci * n + ni + 1) * p].copy_from_slice(&x[ni * size + ci * p..ni * size + (ci + 1) * p]);
                    }
                }
            }
        }
        Ok(())
    }

    /// The forward pass; in training (`records`: the batch's record indices), dropout draws
    /// its masks for `step`.
    fn forward(&mut self, params: &[f32], x: &[f32], n: usize, train: Option<(&[u64], u64)>) -> Result<(), WorkerError> {
        self.prepare(n);
        self.load(x, n)?;
        for i in 0..self.layers.len() {
            if self.fused[i] || matches!(&self.layers[i], Layer::MaxPool(p) if p.relu_before) {
                continue;
            }
            let started = self.profile.is_some().then(std::time::Instant::now);
            if let Layer::Conv2d(conv) = &self.layers[i] {
                if conv.pooled {
                    // Its ReLU (i + 1) and max pool (i + 2) with it, into the pool's output.
                    let (input, out) = pair(&mut self.acts, self.slot[i], self.slot[i + 3]);
                    let (head, tail) = self.layers.split_at_mut(i + 2);
                    if let (Layer::Conv2d(conv), Some(Layer::MaxPool(pool))) = (&mut head[i], tail.first_mut()) {
                        conv.forward_pooled(params, input, out, pool.arg_for(n), n)?;
                    }
                    if let (Some(t), Some(p)) = (started, self.profile.as_mut()) {
                        p[i][0] += t.elapsed();
                    }
                    continue;
                }
            }
            let (input, out) = pair(&mut self.acts, self.slot[i], self.slot[i + 1]);
            match &mut self.layers[i] {
                Layer::Linear(l) => l.forward(params, input, out, n)?,
                Layer::Conv2d(l) => l.forward(params, input, out, n)?,
                Layer::MaxPool(l) => l.forward(input, out, n)?,
                Layer::AvgPool(l) => l.forward(input, out, n)?,
                Layer::Flatten(l) => l.forward(input, out, n),
                Layer::Act(l) => l.forward(input, out, n),
                Layer::Dropout(l) => match train {
                    Some((records, step)) => l.forward(input, out, records, self.seed, step)?,
                    None => out[..n * self.sizes[i]].copy_from_slice(&input[..n * self.sizes[i]]),
                },
                Layer::LayerNorm(l) => l.forward(params, input, out, n)?,
                Layer::Embedding(l) => l.forward(params, input, out, n)?,
                Layer::Positions(l) => l.forward(params, input, out, n)?,
                Layer::Block(l) => l.forward(params, input, out, n, train.map(|(records, step)| (records, step, self.seed)))?,
            }
            if let (Some(t), Some(p)) = (started, self.profile.as_mut()) {
                p[i][0] += t.elapsed();
            }
        }
        Ok(())
    }

    /// Starts timing each layer's forward and backward passes (a fused ReLU counts in the
    /// layer before it), from zero.
    pub fn start_profile(&mut self) {
        self.profile = Some(vec![[std::time::Duration::ZERO; 2]; self.layers.len()]);
    }

    /// Time in the attention kernels of every transformer block, forward and backward, since
    /// the model was built.
    pub fn attention_time(&self) -> [std::time::Duration; 2] {
        let mut t = [std::time::Duration::ZERO; 2];
        for l in &self.layers {
            if let Layer::Block(b) = l {
                t[0] += b.attention_time[0];
                t[1] += b.attention_time[1];
            }
        }
        t
    }

    /// The times since `start_profile`, per layer: (index, forward, backward).
    pub fn profile(&self) -> Vec<(usize, std::time::Duration, std::time::Duration)> {
        self.profile.iter().flatten().enumerate().map(|(i, [f, b])| (i, *f, *b)).collect()
    }

    /// The outputs of the last forward pass.
    fn last(&self, n: usize) -> &[f32] {
        let b = self.layers.len();
        &self.acts[self.slot[b]][..n * self.sizes[b]]
    }

    /// The loss of the last forward pass's records `rows` (of `batch`) times `scale`, its
    /// gradient (times `scale`) into the same rows of `dy`: cross-entropy over the logits,
    /// or mean squared error against the targets.
    fn head_loss(&mut self, batch: &Batch, rows: std::ops::Range<usize>, scale: f32) -> Result<f32, WorkerError> {
        // Per position: a language model's loss is the mean over every position's next token.
        let positions = self.head.positions() as usize;
        let rows = rows.start * positions..rows.end * positions;
        let k = self.outputs;
        let span = rows.start * k..rows.end * k;
        let out = &self.acts[self.slot[self.layers.len()]][span.clone()];
        let dy = &mut self.dy[span.clone()];
        Ok(match self.head {
            Head::Classes(_) | Head::Tokens { .. } => nn::softmax_xent(out, &batch.labels[rows], k, scale, dy)?.0,
            Head::Targets(_) => {
                let t = batch.targets.get(span).ok_or_else(|| WorkerError::Model(format!("a batch of {} records has {} targets, {k} each expected", batch.labels.len(), batch.targets.len())))?;
                shoal_kernels::layers::mse(out, t, rows.len(), k, scale, dy)?
            }
        })
    }

    /// A dense-only model (linear layers with biases, ReLUs between them): `lanes_pass`
    /// applies (a layer without a bias takes the general path, a lane at a time).
    fn is_dense(&self) -> bool {
        self.layers.iter().enumerate().all(|(i, l)| matches!(l, Layer::Linear(d) if d.b.is_some()) || (self.fused[i] && matches!(l, Layer::Act(_))))
            && self.layouts[0] == Arrangement::Rows
    }
}

impl Model for Sequential {
    fn layout(&self) -> &Layout {
        &self.layout
    }

    fn head(&self) -> Head {
        self.head
    }

    fn layer_starts(&self) -> Vec<usize> {
        let mut starts = Vec::new();
        let mut taken = 0;
        for &count in &self.param_counts {
            if count > 0 {
                starts.push(self.layout.params[taken].offset);
            }
            taken += count;
        }
        starts.reverse();
        starts
    }

    fn forward_backward<'a>(
        &mut self,
        params: &'a mut [f32],
        batch: &Batch,
        scale: f32,
        grads: &'a mut [f32],
        cuts: &[usize],
        ready: &mut dyn FnMut(&'a mut [f32], &'a mut [f32]),
    ) -> Result<f32, WorkerError> {
        let starts = self.layer_starts();
        if cuts.last() != Some(&0) || cuts.windows(2).any(|w| w[0] <= w[1]) || cuts.iter().any(|c| !starts.contains(c)) {
            return Err(WorkerError::Model(format!("bucket cuts {cuts:?} are not descending layer starts ending at 0")));
        }
        let n = batch.records.len();
        if batch.labels.len() != n * self.head.positions() as usize {
            return Err(WorkerError::Model(format!("a batch of {} labels names {n} records", batch.labels.len())));
        }
        self.forward(params, batch.x, n, Some((batch.records, batch.step)))?;
        let loss = self.head_loss(batch, 0..n, scale)?;
        // What is not handed over yet: a prefix of each buffer.
        let (mut p_rest, mut g_rest) = (params, grads);
        let mut cuts = cuts.iter().copied().peekable();
        let mut hand_over = |at: usize, p_rest: &mut &'a mut [f32], g_rest: &mut &'a mut [f32]| {
            if cuts.peek() == Some(&at) {
                cuts.next();
                let (p_head, p_tail) = std::mem::take(p_rest).split_at_mut(at);
                let (g_head, g_tail) = std::mem::take(g_rest).split_at_mut(at);
                (*p_rest, *g_rest) = (p_head, g_head);
                ready(p_tail, g_tail);
            }
        };
        for i in (0..self.layers.len()).rev() {
            if self.fused[i] {
                continue;
            }
            let want_dx = i > self.first_param_layer;
            let started = self.profile.is_some().then(std::time::Instant::now);
            let x = &self.acts[self.slot[i]];
            let y = &self.acts[self.slot[i + 1]];
            let (dy, dx) = (&mut self.dy, &mut self.dx);
            let first_param = match &mut self.layers[i] {
                Layer::Linear(l) => {
                    l.backward((p_rest, g_rest), x, y, dy, want_dx.then_some(&mut dx[..]), n)?;
                    Some(l.w)
                }
                Layer::Conv2d(l) => {
                    l.backward(p_rest, g_rest, x, y, dy, want_dx.then_some(&mut dx[..]), n)?;
                    Some(l.w)
                }
                Layer::LayerNorm(l) => {
                    l.backward(p_rest, g_rest, x, dy, dx, n)?;
                    Some(l.w)
                }
                Layer::Embedding(l) => {
                    l.backward(g_rest, x, dy, n)?;
                    Some(l.w)
                }
                Layer::Positions(l) => {
                    l.backward(g_rest, dy, want_dx.then_some(&mut dx[..]), n)?;
                    Some(l.w)
                }
                Layer::Block(l) => {
                    l.backward(p_rest, g_rest, x, dy, want_dx.then_some(&mut dx[..]), n)?;
                    Some(self.layout.params[self.param_start(i)].offset)
                }
                Layer::MaxPool(l) if want_dx => {
                    l.backward(y, dy, dx, n)?;
                    None
                }
                Layer::AvgPool(l) if want_dx => {
                    l.backward(dy, dx, n)?;
                    None
                }
                Layer::Flatten(l) if want_dx => {
                    l.backward(dy, dx, n);
                    None
                }
                Layer::Act(l) if want_dx => {
                    l.backward(x, y, dy, dx, n);
                    None
                }
                Layer::Dropout(l) if want_dx => {
                    l.backward(dy, dx, n);
                    None
                }
                _ => None,
            };
            std::mem::swap(&mut self.dy, &mut self.dx);
            if let (Some(t), Some(p)) = (started, self.profile.as_mut()) {
                p[i][1] += t.elapsed();
            }
            if let Some(at) = first_param {
                hand_over(at, &mut p_rest, &mut g_rest);
            }
        }
        Ok(loss)
    }

    fn lanes_pass(&mut self, params: &[f32], batch: &Batch, span: LaneSpan, nodes: &[std::ops::Range<usize>], outs: &mut [&mut [f32]]) -> Option<Result<f32, WorkerError>> {
        if !self.is_dense() {
            return None;
        }
        Some(self.dense_lanes(params, batch, span, nodes, outs))
    }

    fn outputs(&mut self, params: &[f32], x: &[f32], n: usize) -> Result<&[f32], WorkerError> {
        self.forward(params, x, n, None)?;
        Ok(self.last(n))
    }

    fn eval_chunk(&self) -> Option<usize> {
        // A convolution's im2col over many images overflows the caches.
        (!self.is_dense()).then_some(IMAGE_EVAL_CHUNK)
    }

    fn evaluate(&mut self, params: &[f32], x: &[f32], labels: &[u32], targets: &[f32], sums: &mut crate::metrics::EvalSums) -> Result<(), WorkerError> {
        // In passes of `eval_chunk` records: a sequence model's buffers grow with the pass.
        let head = self.head;
        let positions = head.positions() as usize;
        let n = labels.len() / positions.max(1);
        let chunk = self.eval_chunk().unwrap_or(n).max(1);
        let (f, k) = (self.sizes[0], self.outputs * positions);
        let t_width = if matches!(head, Head::Targets(_)) { k } else { 0 };
        let mut at = 0;
        while at < n {
            let end = (at + chunk).min(n);
            let out = self.outputs(params, &x[at * f..end * f], end - at)?;
            sums.add(head, out, &labels[at * positions..end * positions], &targets[(at * t_width).min(targets.len())..(end * t_width).min(targets.len())])?;
            at = end;
        }
        Ok(())
    }
}

impl Sequential {
    /// The index in `layout.params` of layer `i`'s first tensor.
    fn param_start(&self, i: usize) -> usize {
        self.param_counts[..i].iter().sum()
    }

    /// `lanes_pass` of a dense-only model, on `shoal_kernels::lanes` (whose row results do not
    /// depend on the row count).
    fn dense_lanes(&mut self, params: &[f32], batch: &Batch, span: LaneSpan, nodes: &[std::ops::Range<usize>], outs: &mut [&mut [f32]]) -> Result<f32, WorkerError> {
        let LaneSpan { per, first, scale } = span;
        let n = batch.labels.len();
        if per == 0 || !n.is_multiple_of(per) || nodes.len() != outs.len() {
            return Err(WorkerError::Model(format!("lanes pass of {n} records in lanes of {per} for {} nodes does not fit", nodes.len())));
        }
        self.prepare(n);
        self.load(batch.x, n)?;
        let dense: Vec<DenseAt> = self
            .layers
            .iter()
            .enumerate()
            .filter_map(|(i, l)| match l {
                Layer::Linear(l) if !self.fused[i] => Some((l.din, l.dout, l.w, l.b, l.relu, self.slot[i], self.slot[i + 1])),
                _ => None,
            })
            .collect();
        for &(din, dout, w, b, relu, src, dst) in &dense {
            let (input, output) = pair(&mut self.acts, src, dst);
            lanes::dense_forward(&mut output[..n * dout], &input[..n * din], &params[w..w + dout * din], &mut self.lanes_scratch, n, din, dout)?;
            match b {
                Some(b) => nn::bias_act(&mut output[..n * dout], &params[b..b + dout], relu),
                None if relu => activation::relu(&mut output[..n * dout]),
                None => {}
            }
        }
        let mut loss = 0.0;
        for rows in (0..n).step_by(per) {
            loss += self.head_loss(batch, rows..rows + per, scale)?;
        }
        for (k, &(din, dout, w, b, relu, src, dst)) in dense.iter().enumerate().rev() {
            if relu {
                nn::relu_backward(&mut self.dy[..n * dout], &self.acts[dst][..n * dout]);
            }
            for (node, out) in nodes.iter().zip(outs.iter_mut()) {
                let bias = b.ok_or_else(|| WorkerError::Model("lanes need dense layers with biases".into()))?;
                let (head, tail) = out.split_at_mut(bias);
                lanes::lane_tree_grads(&mut head[w..w + dout * din], &mut tail[..dout], &self.dy[..n * dout], &self.acts[src][..n * din], per, first, node.start, node.end, dout, din)?;
            }
            if k > 0 {
                lanes::dense_input_grad(&mut self.dx[..n * din], &self.dy[..n * dout], &params[w..w + dout * din], n, dout, din)?;
                std::mem::swap(&mut self.dy, &mut self.dx);
            }
        }
        Ok(loss)
    }
}
