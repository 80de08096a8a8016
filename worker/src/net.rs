//! The models' forward and backward passes over the flat parameter and gradient buffers, on
//! shoal's own kernels (`shoal_kernels::nn`): GEMMs straight into the gradient buffer, bias and
//! ReLU fused, activations in buffers kept from one step to the next, so a step allocates
//! nothing. The MLP is dense layers; the CNN is two (3x3 conv, ReLU, 2x2 max-pool) blocks in
//! channel-major layout (a batch is one GEMM per layer), then dense layers.

use shoal_core::spec::ModelKind;
use shoal_kernels::{lanes, nn};

use crate::model::Model;
use crate::WorkerError;

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
pub struct Net {
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

impl Net {
    pub fn new(model: &Model) -> Net {
        let offsets = model.params.iter().map(|p| p.offset).collect();
        let (image, channels, dense_first) = match model.kind {
            ModelKind::Cnn => {
                let c = [model.params[0].shape[0], model.params[2].shape[0]];
                ((model.input_shape[0], model.input_shape[1]), c, 4)
            }
            ModelKind::Mlp => ((0, 0), [0, 0], 0),
        };
        let mut widths = vec![model.params[dense_first].shape[1]];
        widths.extend(model.params[dense_first..].iter().step_by(2).map(|p| p.shape[0]));
        Net { kind: model.kind, widths, image, channels, offsets, classes: model.classes, bufs: Buffers::default() }
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

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_core::spec::ModelSpec;

    /// A plain f64 reference of both models' loss (mean cross-entropy), written from their
    /// definitions: direct 3x3 convolutions with zero padding, ReLU, 2x2 max-pooling, dense.
    fn reference_loss(model: &Model, params: &[f64], x: &[f64], labels: &[u32]) -> f64 {
        let n = labels.len();
        let p = |i: usize| &params[model.params[i].offset..model.params[i].offset + model.params[i].len()];
        let mut first_dense = 0;
        let mut feats: Vec<Vec<f64>> = (0..n).map(|i| x[i * x.len() / n..(i + 1) * x.len() / n].to_vec()).collect();
        if model.kind == ModelKind::Cnn {
            first_dense = 4;
            let (mut h, mut w) = (model.input_shape[0], model.input_shape[1]);
            let mut cin = 1;
            for block in 0..2 {
                let (wt, bias) = (p(2 * block), p(2 * block + 1));
                let cout = bias.len();
                for f in feats.iter_mut() {
                    let mut z = vec![0.0; cout * h * w];
                    for o in 0..cout {
                        for yy in 0..h {
                            for xx in 0..w {
                                let mut s = bias[o];
                                for c in 0..cin {
                                    for ky in 0..3 {
                                        for kx in 0..3 {
                                            let (sy, sx) = (yy as isize + ky as isize - 1, xx as isize + kx as isize - 1);
                                            if sy >= 0 && sy < h as isize && sx >= 0 && sx < w as isize {
                                                s += wt[((o * cin + c) * 3 + ky) * 3 + kx] * f[(c * h + sy as usize) * w + sx as usize];
                                            }
                                        }
                                    }
                                }
                                z[(o * h + yy) * w + xx] = s.max(0.0);
                            }
                        }
                    }
                    let (oh, ow) = (h / 2, w / 2);
                    let mut pooled = vec![0.0; cout * oh * ow];
                    for o in 0..cout {
                        for yy in 0..oh {
                            for xx in 0..ow {
                                let at = |dy: usize, dx: usize| z[(o * h + 2 * yy + dy) * w + 2 * xx + dx];
                                pooled[(o * oh + yy) * ow + xx] = at(0, 0).max(at(0, 1)).max(at(1, 0)).max(at(1, 1));
                            }
                        }
                    }
                    *f = pooled;
                }
                (h, w, cin) = (h / 2, w / 2, cout);
            }
        }
        let layers = (model.params.len() - first_dense) / 2;
        let mut loss = 0.0;
        for (f, &y) in feats.iter().zip(labels) {
            let mut a = f.clone();
            for l in 0..layers {
                let (wt, bias) = (p(first_dense + 2 * l), p(first_dense + 2 * l + 1));
                let din = a.len();
                a = (0..bias.len()).map(|o| bias[o] + (0..din).map(|i| wt[o * din + i] * a[i]).sum::<f64>()).map(|z| if l + 1 < layers { z.max(0.0) } else { z }).collect();
            }
            let max = a.iter().cloned().fold(f64::MIN, f64::max);
            let lse = max + a.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
            loss += lse - a[y as usize];
        }
        loss / n as f64
    }

    /// Every gradient of the model against central finite differences of the f64 reference.
    fn check_gradients(spec: ModelSpec, input: &[usize], n: usize) {
        let model = Model::new(&spec, input, 4).unwrap();
        let params = model.init(17);
        let feats: usize = input.iter().product();
        let x: Vec<f32> = (0..n * feats).map(|i| ((i * 7919 % 1009) as f32 / 1009.0) * 2.0 - 0.5).collect();
        let labels: Vec<u32> = (0..n as u32).map(|i| i * 3 % 4).collect();
        let mut net = Net::new(&model);
        let mut grads = vec![0.0f32; params.len()];
        let loss = net.loss_and_grads(&params, &x, &labels, 1.0, &mut grads).unwrap();
        let p64: Vec<f64> = params.iter().map(|&v| v as f64).collect();
        let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let base = reference_loss(&model, &p64, &x64, &labels);
        assert!((loss as f64 - base).abs() < 1e-4 * (1.0 + base.abs()), "loss {loss} vs reference {base}");
        let eps = 1e-5;
        for spec in &model.params {
            for i in spec.offset..spec.offset + spec.len() {
                let mut q = p64.clone();
                q[i] += eps;
                let up = reference_loss(&model, &q, &x64, &labels);
                q[i] -= 2.0 * eps;
                let down = reference_loss(&model, &q, &x64, &labels);
                let fd = (up - down) / (2.0 * eps);
                let g = grads[i] as f64;
                assert!((g - fd).abs() <= 1e-3 * fd.abs() + 2e-5, "{}[{}]: analytic {g}, finite difference {fd}", spec.name, i - spec.offset);
            }
        }
        // Scaling by a rank's share scales loss and gradients alike.
        let mut half = vec![0.0f32; params.len()];
        let l2 = net.loss_and_grads(&params, &x, &labels, 0.5, &mut half).unwrap();
        assert!((l2 - 0.5 * loss).abs() < 1e-6);
        assert!(half.iter().zip(&grads).all(|(h, g)| (h - 0.5 * g).abs() <= 1e-6 * (1.0 + g.abs())));
    }

    /// Every split of the backward pass into buckets gives the same gradients, hands over
    /// tails that tile the buffers from the end, each only once its layers are done.
    fn check_buckets(spec: ModelSpec, input: &[usize], n: usize) {
        let model = Model::new(&spec, input, 4).unwrap();
        let params = model.init(5);
        let x: Vec<f32> = (0..n * input.iter().product::<usize>()).map(|i| (i % 13) as f32 / 13.0).collect();
        let labels: Vec<u32> = (0..n as u32).map(|i| i % 4).collect();
        let mut net = Net::new(&model);
        let mut whole = vec![0.0f32; params.len()];
        net.loss_and_grads(&params, &x, &labels, 1.0, &mut whole).unwrap();
        let starts = net.layer_starts();
        assert_eq!(*starts.last().unwrap(), 0);
        for k in 0..starts.len() {
            // Cut at every start from the k-th on (and always at 0).
            let cuts: Vec<usize> = starts[k..].to_vec();
            let (mut p, mut g) = (params.clone(), vec![f32::NAN; params.len()]);
            let mut tails = Vec::new();
            net.loss_and_grads_in_buckets(&mut p, &x, &labels, 1.0, &mut g, &cuts, &mut |pt, gt| {
                assert_eq!(pt.len(), gt.len());
                assert!(gt.iter().all(|v| v.is_finite()), "a tail is handed over before its gradients are written");
                // Poison the parameters handed over: the rest of the pass must not read them.
                pt.fill(f32::NAN);
                tails.push((gt.len(), gt.to_vec()));
            })
            .unwrap();
            let got: Vec<f32> = tails.iter().rev().flat_map(|(_, t)| t.clone()).collect();
            assert_eq!(got.len(), params.len(), "cuts {cuts:?}: the tails tile the buffer");
            assert!(got.iter().zip(&whole).all(|(a, b)| a.to_bits() == b.to_bits()), "cuts {cuts:?}: same gradients");
            assert_eq!(tails.len(), cuts.len());
        }
        let e = net.loss_and_grads_in_buckets(&mut params.clone(), &x, &labels, 1.0, &mut whole, &[3, 0], &mut |_, _| {}).unwrap_err();
        assert!(e.to_string().contains("bucket cuts"), "{e}");
    }

    #[test]
    fn mlp_buckets_give_the_same_gradients() {
        check_buckets(ModelSpec { kind: "mlp".into(), hidden: Some(vec![6, 5]), channels: None }, &[3, 4], 5);
    }

    #[test]
    fn cnn_buckets_give_the_same_gradients() {
        check_buckets(ModelSpec { kind: "cnn".into(), hidden: Some(vec![5]), channels: Some(vec![2, 3]) }, &[8, 8], 3);
    }

    #[test]
    fn mlp_gradients_match_finite_differences_for_every_layer() {
        check_gradients(ModelSpec { kind: "mlp".into(), hidden: Some(vec![6, 5]), channels: None }, &[3, 4], 5);
    }

    #[test]
    fn cnn_gradients_match_finite_differences_for_every_layer() {
        check_gradients(ModelSpec { kind: "cnn".into(), hidden: Some(vec![5]), channels: Some(vec![2, 3]) }, &[8, 8], 3);
    }

    #[test]
    fn the_forward_pass_is_candles() {
        // The same function as the candle definition in `Model::forward` (and so as the
        // PyTorch modules the export targets).
        use candle_core::{Device, Tensor};
        for spec in [
            ModelSpec { kind: "mlp".into(), hidden: Some(vec![7]), channels: None },
            ModelSpec { kind: "cnn".into(), hidden: Some(vec![6]), channels: Some(vec![3, 4]) },
        ] {
            let model = Model::new(&spec, &[8, 8], 5).unwrap();
            let params = model.init(3);
            let n = 4;
            let x: Vec<f32> = (0..n * 64).map(|i| ((i * 37 % 101) as f32) / 101.0).collect();
            let labels: Vec<u32> = vec![0, 1, 2, 3];
            let mut net = Net::new(&model);
            net.forward(&params, &x, n).unwrap();
            let ours = net.bufs.acts[net.widths.len() - 1][..n * 5].to_vec();
            let dev = Device::Cpu;
            let ts = model.tensors(&params, &dev).unwrap();
            let refs: Vec<&Tensor> = ts.iter().collect();
            let xt = Tensor::from_slice(&x, (n, 8, 8), &dev).unwrap();
            let theirs = model.forward(&refs, &xt).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (a, b) in ours.iter().zip(&theirs) {
                assert!((a - b).abs() < 1e-4, "{}: {a} vs candle {b}", spec.kind);
            }
            assert!(net.correct(&params, &x, &labels).unwrap() <= 4);
        }
    }
}
