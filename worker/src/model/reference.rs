//! Today's two models as they were before layer lists: their layout, init and candle
//! forward (`RefModel`), and their hand-written passes (`RefNet`). Test-only: the presets
//! must give these bits, compared in the same run.

#![allow(dead_code)]

use candle_core::{Device, Tensor};
use shoal_core::rng::SplitMix64;
use shoal_core::spec::{ModelKind, ModelSpec};
use shoal_kernels::{lanes, nn};

use crate::WorkerError;

/// Largest model (in f32 parameters) a worker accepts: 4 GiB of parameters.
pub const MAX_PARAMS: usize = shoal_core::limits::MAX_MODEL_PARAMS as usize;

#[derive(Clone, Debug, PartialEq)]
pub struct RefParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    /// Fan-in for the default init bound 1/sqrt(fan_in) (PyTorch's default for both kinds).
    pub fan_in: usize,
}

impl RefParamSpec {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}


#[derive(Clone, Debug)]
pub struct RefModel {
    pub kind: ModelKind,
    pub params: Vec<RefParamSpec>,
    pub input_shape: Vec<usize>,
    pub classes: usize,
    /// Number of dense layers (the last one is the classifier).
    dense_layers: usize,
}

impl RefModel {
    /// Lays out the parameters for `spec` on inputs of `input_shape` (e.g. [28, 28]).
    pub fn new(spec: &ModelSpec, input_shape: &[usize], classes: usize) -> Result<RefModel, WorkerError> {
        if classes < 2 {
            return Err(WorkerError::Model(format!("a classifier needs at least 2 classes, dataset has {classes}")));
        }
        let mut params = Vec::new();
        let mut offset = 0;
        let mut push = |name: String, shape: Vec<usize>, fan_in: usize| {
            let p = RefParamSpec { name, shape, offset, fan_in };
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
        let model = RefModel { kind, params, input_shape: input_shape.to_vec(), classes, dense_layers: sizes.len() };
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
            ModelKind::Gpt => unreachable!("the reference models are the mlp and the cnn"),
        }
    }

    /// The PyTorch names of the parameters, in the layout that `checkpoint export` writes
    /// (see `checkpoint::legacy_name`).
    pub fn pytorch_names(&self) -> Vec<String> {
        self.params.iter().map(|p| crate::checkpoint::legacy_name(self.kind_name(), &p.name).expect("every parameter has a PyTorch name")).collect()
    }
}


/// Buffers for one batch size, grown when a larger batch comes.
#[derive(Default)]
struct Buffers {
    batch: usize,
    /// Dense layers' inputs (the first is the features, or the CNN's flattened output) and
    /// outputs (post-ReLU for hidden layers; logits last).
    acts: Vec<Vec<f32>>,
    /// Gradient with respect to a dense layer's output, and its input's (ping-pong).
    dz: Vec<f32>,
    da: Vec<f32>,
    /// CNN: im2col of each block's input, pre-pool activations, argmaxes, pooled outputs, and
    /// the gradients flowing back through them.
    cols: [Vec<f32>; 2],
    z: [Vec<f32>; 2],
    arg: [Vec<u32>; 2],
    pooled: [Vec<f32>; 2],
    dpool: Vec<f32>,
    dcols: Vec<f32>,
    /// Lanes: transposes of a layer's input and output.
    lanes_scratch: Vec<f32>,
}

fn grow(v: &mut Vec<f32>, n: usize) {
    if v.len() < n {
        v.resize(n, 0.0);
    }
}

/// A model's layer shapes plus its reusable buffers.
pub struct RefNet {
    kind: ModelKind,
    /// Dense widths: input features (after the conv blocks for a CNN), hidden..., classes.
    widths: Vec<usize>,
    /// CNN: input (h, w) and the two blocks' channels.
    image: (usize, usize),
    channels: [usize; 2],
    /// Offsets of each parameter tensor in the flat buffer, in `Model::params` order.
    offsets: Vec<usize>,
    classes: usize,
    bufs: Buffers,
}

impl RefNet {
    pub fn new(model: &RefModel) -> RefNet {
        let offsets = model.params.iter().map(|p| p.offset).collect();
        let (image, channels, dense_first) = match model.kind {
            ModelKind::Cnn => {
                let c = [model.params[0].shape[0], model.params[2].shape[0]];
                ((model.input_shape[0], model.input_shape[1]), c, 4)
            }
            ModelKind::Mlp | ModelKind::Gpt => ((0, 0), [0, 0], 0),
        };
        let mut widths = vec![model.params[dense_first].shape[1]];
        widths.extend(model.params[dense_first..].iter().step_by(2).map(|p| p.shape[0]));
        RefNet { kind: model.kind, widths, image, channels, offsets, classes: model.classes, bufs: Buffers::default() }
    }

    fn dense_first(&self) -> usize {
        if self.kind == ModelKind::Cnn {
            4
        } else {
            0
        }
    }

    fn prepare(&mut self, batch: usize) {
        if batch <= self.bufs.batch {
            return;
        }
        let b = &mut self.bufs;
        b.batch = batch;
        b.acts.resize_with(self.widths.len(), Vec::new);
        for (a, &w) in b.acts.iter_mut().zip(&self.widths) {
            grow(a, batch * w);
        }
        let widest = self.widths.iter().copied().max().unwrap_or(0);
        grow(&mut b.dz, batch * widest);
        grow(&mut b.da, batch * widest);
        if self.kind == ModelKind::Cnn {
            let (h, w) = self.image;
            let [c1, c2] = self.channels;
            let (h2, w2) = (h / 2, w / 2);
            grow(&mut b.cols[0], 9 * batch * h * w);
            grow(&mut b.cols[1], c1 * 9 * batch * h2 * w2);
            grow(&mut b.z[0], c1 * batch * h * w);
            grow(&mut b.z[1], c2 * batch * h2 * w2);
            b.arg[0].resize(c1 * batch * h2 * w2, 0);
            b.arg[1].resize(c2 * batch * (h2 / 2) * (w2 / 2), 0);
            grow(&mut b.pooled[0], c1 * batch * h2 * w2);
            grow(&mut b.pooled[1], c2 * batch * (h2 / 2) * (w2 / 2));
            grow(&mut b.dpool, c1.max(c2) * batch * h * w);
            grow(&mut b.dcols, c1 * 9 * batch * h2 * w2);
            grow(&mut b.da, c1 * batch * h2 * w2);
        }
    }

    /// Runs the forward pass of `n` records (`x`: their features, flattened) and leaves the
    /// logits in the last activation buffer.
    fn forward(&mut self, params: &[f32], x: &[f32], n: usize) -> Result<(), WorkerError> {
        self.prepare(n);
        let layers = self.widths.len() - 1;
        let first = self.dense_first();
        let b = &mut self.bufs;
        if self.kind == ModelKind::Cnn {
            let (h, w) = self.image;
            let [c1, c2] = self.channels;
            let (h2, w2, h4, w4) = (h / 2, w / 2, h / 4, w / 4);
            let o = &self.offsets;
            // Block 1: the images are [N][H][W], which is [C=1][N][H][W].
            nn::im2col3(x, 1, n, h, w, &mut b.cols[0])?;
            nn::matmul(&mut b.z[0], &params[o[0]..], &b.cols[0], c1, 9, n * h * w, false, false, false)?;
            nn::bias_act_planes(&mut b.z[0][..c1 * n * h * w], &params[o[1]..o[1] + c1], n * h * w, true);
            nn::maxpool2(&b.z[0], c1 * n, h, w, &mut b.pooled[0], &mut b.arg[0])?;
            // Block 2.
            nn::im2col3(&b.pooled[0], c1, n, h2, w2, &mut b.cols[1])?;
            nn::matmul(&mut b.z[1], &params[o[2]..], &b.cols[1], c2, c1 * 9, n * h2 * w2, false, false, false)?;
            nn::bias_act_planes(&mut b.z[1][..c2 * n * h2 * w2], &params[o[3]..o[3] + c2], n * h2 * w2, true);
            nn::maxpool2(&b.z[1], c2 * n, h2, w2, &mut b.pooled[1], &mut b.arg[1])?;
            // Flatten to [N][C*P], PyTorch's order.
            let p = h4 * w4;
            let flat = &mut b.acts[0];
            for ni in 0..n {
                for ci in 0..c2 {
                    flat[ni * c2 * p + ci * p..ni * c2 * p + (ci + 1) * p].copy_from_slice(&b.pooled[1][(ci * n + ni) * p..(ci * n + ni + 1) * p]);
                }
            }
        } else {
            b.acts[0][..x.len()].copy_from_slice(x);
        }
        for l in 0..layers {
            let (din, dout) = (self.widths[l], self.widths[l + 1]);
            let (w, bias) = (self.offsets[first + 2 * l], self.offsets[first + 2 * l + 1]);
            let (inputs, outputs) = b.acts.split_at_mut(l + 1);
            nn::matmul(&mut outputs[0], &inputs[l], &params[w..w + dout * din], n, din, dout, false, true, false)?;
            nn::bias_act(&mut outputs[0][..n * dout], &params[bias..bias + dout], l + 1 < layers);
        }
        Ok(())
    }

    /// The loss of a batch, and its gradients written into `grads` (laid out like the
    /// parameters), both multiplied by `scale` (a rank's share of the global batch).
    pub fn loss_and_grads(&mut self, params: &[f32], x: &[f32], labels: &[u32], scale: f32, grads: &mut [f32]) -> Result<f32, WorkerError> {
        let mut params = params.to_vec();
        self.loss_and_grads_in_buckets(&mut params, x, labels, scale, grads, &[0], &mut |_, _| {})
    }

    /// The parameter offsets at which a layer starts, last layer first: where the backward
    /// pass can hand over a finished tail of the buffers.
    pub fn layer_starts(&self) -> Vec<usize> {
        let first = self.dense_first();
        let layers = self.widths.len() - 1;
        let mut starts: Vec<usize> = (0..layers).rev().map(|l| self.offsets[first + 2 * l]).collect();
        if self.kind == ModelKind::Cnn {
            starts.extend([self.offsets[2], self.offsets[0]]);
        }
        starts
    }

    /// `loss_and_grads`, handing over the buffers' tails as the backward pass finishes them.
    /// `cuts` are layer starts (from `layer_starts`), descending, ending with 0. When the
    /// backward pass is past the layer starting at `cut`, it calls `ready(params[cut..end],
    /// grads[cut..end])` (`end`: the previous cut, or the buffers' end): those gradients are
    /// final and those parameters are not read again by this pass, so the caller may reduce
    /// the one and update the other while the earlier layers' backward runs.
    #[allow(clippy::too_many_arguments)]
    pub fn loss_and_grads_in_buckets<'a>(
        &mut self,
        params: &'a mut [f32],
        x: &[f32],
        labels: &[u32],
        scale: f32,
        grads: &'a mut [f32],
        cuts: &[usize],
        ready: &mut dyn FnMut(&'a mut [f32], &'a mut [f32]),
    ) -> Result<f32, WorkerError> {
        let starts = self.layer_starts();
        if cuts.last() != Some(&0) || cuts.windows(2).any(|w| w[0] <= w[1]) || cuts.iter().any(|c| !starts.contains(c)) {
            return Err(WorkerError::Model(format!("bucket cuts {cuts:?} are not descending layer starts ending at 0")));
        }
        let n = labels.len();
        self.forward(params, x, n)?;
        let layers = self.widths.len() - 1;
        let first = self.dense_first();
        let classes = self.classes;
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
        let b = &mut self.bufs;
        let (loss, _) = nn::softmax_xent(&b.acts[layers][..n * classes], labels, classes, scale, &mut b.dz)?;
        // Dense layers, last to first. The CNN also needs the gradient of the first dense
        // layer's input (its conv blocks'); the MLP's first input is the data.
        for l in (0..layers).rev() {
            let (din, dout) = (self.widths[l], self.widths[l + 1]);
            let (w, bias) = (self.offsets[first + 2 * l], self.offsets[first + 2 * l + 1]);
            nn::matmul(&mut g_rest[w..w + dout * din], &b.dz, &b.acts[l], dout, n, din, true, false, false)?;
            nn::column_sums(&mut g_rest[bias..bias + dout], &b.dz[..n * dout], false);
            if l > 0 || self.kind == ModelKind::Cnn {
                nn::matmul(&mut b.da, &b.dz, &p_rest[w..w + dout * din], n, dout, din, false, false, false)?;
                if l > 0 {
                    nn::relu_backward(&mut b.da[..n * din], &b.acts[l][..n * din]);
                }
                std::mem::swap(&mut b.dz, &mut b.da);
            }
            hand_over(w, &mut p_rest, &mut g_rest);
        }
        if self.kind == ModelKind::Cnn {
            let (h, w) = self.image;
            let [c1, c2] = self.channels;
            let (h2, w2, h4, w4) = (h / 2, w / 2, h / 4, w / 4);
            let p = h4 * w4;
            let o = &self.offsets;
            // Unflatten the dense input's gradient (in dz) to [C2][N][P].
            for ni in 0..n {
                for ci in 0..c2 {
                    b.da[(ci * n + ni) * p..(ci * n + ni + 1) * p].copy_from_slice(&b.dz[ni * c2 * p + ci * p..ni * c2 * p + (ci + 1) * p]);
                }
            }
            // Block 2: pool, ReLU, then the weights' gradient and the input's (via col2im).
            let plane2 = n * h2 * w2;
            nn::maxpool2_backward(&b.da, &b.arg[1], c2 * n, h2, w2, &mut b.dpool)?;
            nn::relu_backward(&mut b.dpool[..c2 * plane2], &b.z[1][..c2 * plane2]);
            nn::matmul(&mut g_rest[o[2]..o[2] + c2 * c1 * 9], &b.dpool, &b.cols[1], c2, plane2, c1 * 9, false, true, false)?;
            nn::plane_sums(&mut g_rest[o[3]..o[3] + c2], &b.dpool[..c2 * plane2], plane2);
            nn::matmul(&mut b.dcols, &p_rest[o[2]..o[2] + c2 * c1 * 9], &b.dpool, c1 * 9, c2, plane2, true, false, false)?;
            hand_over(o[2], &mut p_rest, &mut g_rest);
            b.da[..c1 * plane2].fill(0.0);
            nn::col2im3_add(&b.dcols, c1, n, h2, w2, &mut b.da)?;
            // Block 1: no gradient for the images themselves.
            let plane1 = n * h * w;
            nn::maxpool2_backward(&b.da, &b.arg[0], c1 * n, h, w, &mut b.dpool)?;
            nn::relu_backward(&mut b.dpool[..c1 * plane1], &b.z[0][..c1 * plane1]);
            nn::matmul(&mut g_rest[o[0]..o[0] + c1 * 9], &b.dpool, &b.cols[0], c1, plane1, 9, false, true, false)?;
            nn::plane_sums(&mut g_rest[o[1]..o[1] + c1], &b.dpool[..c1 * plane1], plane1);
            hand_over(o[0], &mut p_rest, &mut g_rest);
        }
        Ok(loss)
    }

    pub fn is_mlp(&self) -> bool {
        self.kind == ModelKind::Mlp
    }

    /// `[training] lanes` for the MLP, on `shoal_kernels::lanes` (whose row results do not
    /// depend on the row count): the forward and backward passes of the consecutive lanes
    /// from lane `first`, `per` records each (`x`, `labels`: their records in lane order), each
    /// lane's loss and gradient scaled by `scale` (its share of the global batch), and for
    /// each lane-tree node in `nodes` (global lane ids among those lanes) its gradient,
    /// written into the matching buffer of `outs` (laid out like the parameters). Returns the
    /// lanes' summed loss.
    #[allow(clippy::too_many_arguments)]
    pub fn mlp_lanes(
        &mut self,
        params: &[f32],
        x: &[f32],
        labels: &[u32],
        per: usize,
        scale: f32,
        first: usize,
        nodes: &[std::ops::Range<usize>],
        outs: &mut [&mut [f32]],
    ) -> Result<f32, WorkerError> {
        let n = labels.len();
        if self.kind != ModelKind::Mlp || per == 0 || !n.is_multiple_of(per) || nodes.len() != outs.len() {
            return Err(WorkerError::Model(format!("lanes pass of {n} records in lanes of {per} for {} nodes does not fit", nodes.len())));
        }
        self.prepare(n);
        let layers = self.widths.len() - 1;
        let classes = self.classes;
        let b = &mut self.bufs;
        b.acts[0][..x.len()].copy_from_slice(x);
        for l in 0..layers {
            let (din, dout) = (self.widths[l], self.widths[l + 1]);
            let (w, bias) = (self.offsets[2 * l], self.offsets[2 * l + 1]);
            let (inputs, outputs) = b.acts.split_at_mut(l + 1);
            lanes::dense_forward(&mut outputs[0][..n * dout], &inputs[l][..n * din], &params[w..w + dout * din], &mut b.lanes_scratch, n, din, dout)?;
            nn::bias_act(&mut outputs[0][..n * dout], &params[bias..bias + dout], l + 1 < layers);
        }
        let mut loss = 0.0;
        for rows in (0..n).step_by(per) {
            let span = rows * classes..(rows + per) * classes;
            let (l, _) = nn::softmax_xent(&b.acts[layers][span.clone()], &labels[rows..rows + per], classes, scale, &mut b.dz[span])?;
            loss += l;
        }
        for l in (0..layers).rev() {
            let (din, dout) = (self.widths[l], self.widths[l + 1]);
            let (w, bias) = (self.offsets[2 * l], self.offsets[2 * l + 1]);
            for (node, out) in nodes.iter().zip(outs.iter_mut()) {
                let (head, tail) = out.split_at_mut(bias);
                lanes::lane_tree_grads(&mut head[w..w + dout * din], &mut tail[..dout], &b.dz[..n * dout], &b.acts[l][..n * din], per, first, node.start, node.end, dout, din)?;
            }
            if l > 0 {
                lanes::dense_input_grad(&mut b.da[..n * din], &b.dz[..n * dout], &params[w..w + dout * din], n, dout, din)?;
                nn::relu_backward(&mut b.da[..n * din], &b.acts[l][..n * din]);
                std::mem::swap(&mut b.dz, &mut b.da);
            }
        }
        Ok(loss)
    }

    /// The logits of `n` records (`x`: their features, flattened), `n` rows of `classes`.
    pub fn logits(&mut self, params: &[f32], x: &[f32], n: usize) -> Result<&[f32], WorkerError> {
        self.forward(params, x, n)?;
        Ok(&self.bufs.acts[self.widths.len() - 1][..n * self.classes])
    }

    /// How many of `labels` the model predicts (argmax of the logits, first on ties).
    pub fn correct(&mut self, params: &[f32], x: &[f32], labels: &[u32]) -> Result<u64, WorkerError> {
        let n = labels.len();
        self.forward(params, x, n)?;
        let logits = &self.bufs.acts[self.widths.len() - 1];
        let mut right = 0;
        for (i, &y) in labels.iter().enumerate() {
            let row = &logits[i * self.classes..(i + 1) * self.classes];
            let best = (0..self.classes).fold(0, |b, j| if row[j] > row[b] { j } else { b });
            right += (best == y as usize) as u64;
        }
        Ok(right)
    }
}

