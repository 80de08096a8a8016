//! `transformer_block`: a pre-LayerNorm GPT block over rows `[N][T][D]`:
//! `x1 = x + drop(proj(attn(ln1(x))))`, `y = x1 + drop(mlp(ln2(x1)))`, with causal
//! multi-head self-attention (`qkv`: one linear to 3D, split into q, k, v as PyTorch's
//! `split(D, -1)`) and a GELU MLP of `mlp_ratio` x D. Its tensors are named as the module
//! `model torch` prints: `i.ln1.*`, `i.attn.qkv.*`, `i.attn.proj.*`, `i.ln2.*`, `i.mlp.0.*`,
//! `i.mlp.2.*`. Every intermediate the backward pass needs is kept from the forward.

use shoal_kernels::layers::{self, Groups};
use shoal_kernels::{attention, nn};

use super::{grow, ParamSpec};
use crate::WorkerError;

/// Offsets of a weight and its bias in the flat buffer.
#[derive(Clone, Copy)]
struct Pair {
    w: usize,
    b: usize,
}

pub(super) struct Block {
    t: usize,
    d: usize,
    heads: usize,
    hidden: usize,
    eps: f32,
    dropout: f32,
    /// Dropout's layer ids (the mask is a function of them, the step and the record).
    mask_ids: [u64; 2],
    ln1: Pair,
    qkv: Pair,
    proj: Pair,
    ln2: Pair,
    fc1: Pair,
    fc2: Pair,
    // Kept from the forward pass.
    h1: Vec<f32>,
    mean1: Vec<f32>,
    rstd1: Vec<f32>,
    qkv_out: Vec<f32>,
    probs: Vec<f32>,
    att: Vec<f32>,
    x1: Vec<f32>,
    h2: Vec<f32>,
    mean2: Vec<f32>,
    rstd2: Vec<f32>,
    f: Vec<f32>,
    g: Vec<f32>,
    masks: [Vec<f32>; 2],
    /// Whether the last forward pass applied dropout.
    dropped: bool,
    /// Time in the attention kernels, forward and backward (for benchmarks' breakdowns).
    pub(super) attention_time: [std::time::Duration; 2],
    // Backward scratch.
    s_hidden: Vec<f32>,
    s_d: Vec<f32>,
    s_d2: Vec<f32>,
    s_d3: Vec<f32>,
    s_3d: Vec<f32>,
}

impl Block {
    pub(super) fn new(index: usize, input: &[usize], params: &[ParamSpec], heads: usize, mlp_ratio: usize, dropout: f32) -> Block {
        let pair = |i: usize| Pair { w: params[i].offset, b: params[i + 1].offset };
        let (t, d) = (input[0], input[1]);
        Block {
            t,
            d,
            heads,
            hidden: d * mlp_ratio,
            eps: 1e-5,
            dropout,
            mask_ids: [(1 << 32) | ((index as u64) << 8), (1 << 32) | ((index as u64) << 8) | 1],
            ln1: pair(0),
            qkv: pair(2),
            proj: pair(4),
            ln2: pair(6),
            fc1: pair(8),
            fc2: pair(10),
            h1: Vec::new(),
            mean1: Vec::new(),
            rstd1: Vec::new(),
            qkv_out: Vec::new(),
            probs: Vec::new(),
            att: Vec::new(),
            x1: Vec::new(),
            h2: Vec::new(),
            mean2: Vec::new(),
            rstd2: Vec::new(),
            f: Vec::new(),
            g: Vec::new(),
            masks: [Vec::new(), Vec::new()],
            dropped: false,
            attention_time: [std::time::Duration::ZERO; 2],
            s_hidden: Vec::new(),
            s_d: Vec::new(),
            s_d2: Vec::new(),
            s_d3: Vec::new(),
            s_3d: Vec::new(),
        }
    }

    fn prepare(&mut self, n: usize) {
        let (rows, d, h) = (n * self.t, self.d, self.hidden);
        for (v, len) in [
            (&mut self.h1, rows * d),
            (&mut self.mean1, rows),
            (&mut self.rstd1, rows),
            (&mut self.qkv_out, rows * 3 * d),
            (&mut self.probs, n * self.heads * self.t * self.t),
            (&mut self.att, rows * d),
            (&mut self.x1, rows * d),
            (&mut self.h2, rows * d),
            (&mut self.mean2, rows),
            (&mut self.rstd2, rows),
            (&mut self.f, rows * h),
            (&mut self.g, rows * h),
        ] {
            grow(v, len);
        }
    }

    /// The forward pass; in training (`train`: the batch's record indices, the step and the
    /// job's seed), dropout draws its masks.
    pub(super) fn forward(&mut self, p: &[f32], x: &[f32], y: &mut [f32], n: usize, train: Option<(&[u64], u64, u64)>) -> Result<(), WorkerError> {
        self.prepare(n);
        let (t, d, hd, rows) = (self.t, self.d, self.hidden, n * self.t);
        let m = rows * d;
        let groups = Groups::dense(rows, d);
        let (x, y) = (&x[..m], &mut y[..m]);
        layers::layernorm(x, &groups, &p[self.ln1.w..self.ln1.w + d], &p[self.ln1.b..self.ln1.b + d], self.eps, &mut self.h1[..m], &mut self.mean1[..rows], &mut self.rstd1[..rows])?;
        let qkv = &mut self.qkv_out[..rows * 3 * d];
        nn::matmul(qkv, &self.h1[..m], &p[self.qkv.w..self.qkv.w + 3 * d * d], rows, d, 3 * d, false, true, false)?;
        nn::bias_act(qkv, &p[self.qkv.b..self.qkv.b + 3 * d], false);
        let started = std::time::Instant::now();
        attention::causal_attention(qkv, n, t, self.heads, d, &mut self.probs[..n * self.heads * t * t], &mut self.att[..m])?;
        self.attention_time[0] += started.elapsed();
        let a = &mut self.x1[..m];
        nn::matmul(a, &self.att[..m], &p[self.proj.w..self.proj.w + d * d], rows, d, d, false, true, false)?;
        nn::bias_act(a, &p[self.proj.b..self.proj.b + d], false);
        self.dropped = false;
        if let (Some((records, step, seed)), true) = (train, self.dropout > 0.0) {
            self.dropped = true;
            for (mask, id) in self.masks.iter_mut().zip(self.mask_ids) {
                grow(mask, m);
                layers::dropout_mask(seed, step, id, records, t * d, self.dropout, &mut mask[..m])?;
            }
            scale_in_place(a, &self.masks[0][..m]);
        }
        add_in_place(a, x);
        let x1 = &self.x1[..m];
        layers::layernorm(x1, &groups, &p[self.ln2.w..self.ln2.w + d], &p[self.ln2.b..self.ln2.b + d], self.eps, &mut self.h2[..m], &mut self.mean2[..rows], &mut self.rstd2[..rows])?;
        let f = &mut self.f[..rows * hd];
        nn::matmul(f, &self.h2[..m], &p[self.fc1.w..self.fc1.w + hd * d], rows, d, hd, false, true, false)?;
        nn::bias_act(f, &p[self.fc1.b..self.fc1.b + hd], false);
        layers::gelu(f, &mut self.g[..rows * hd]);
        nn::matmul(y, &self.g[..rows * hd], &p[self.fc2.w..self.fc2.w + d * hd], rows, hd, d, false, true, false)?;
        nn::bias_act(y, &p[self.fc2.b..self.fc2.b + d], false);
        if self.dropped {
            scale_in_place(y, &self.masks[1][..m]);
        }
        add_in_place(y, x1);
        Ok(())
    }

    /// The parameters' gradients into `grads` (laid out like the parameters) and, if asked
    /// for, the input's into `dx`, from the output's `dy` and the input `x`.
    pub(super) fn backward(&mut self, p: &[f32], grads: &mut [f32], x: &[f32], dy: &[f32], dx: Option<&mut [f32]>, n: usize) -> Result<(), WorkerError> {
        let (t, d, hd, rows) = (self.t, self.d, self.hidden, n * self.t);
        let m = rows * d;
        let groups = Groups::dense(rows, d);
        for (v, len) in [(&mut self.s_hidden, rows * hd), (&mut self.s_d, m), (&mut self.s_d2, m), (&mut self.s_d3, m), (&mut self.s_3d, rows * 3 * d)] {
            grow(v, len);
        }
        let dy = &dy[..m];
        // The MLP's branch: dm = dy through its dropout.
        let dm: &[f32] = if self.dropped {
            mul_into(&mut self.s_d[..m], dy, &self.masks[1][..m]);
            &self.s_d[..m]
        } else {
            dy
        };
        let g2 = self.fc2;
        nn::matmul(&mut grads[g2.w..g2.w + d * hd], dm, &self.g[..rows * hd], d, rows, hd, true, false, false)?;
        nn::column_sums(&mut grads[g2.b..g2.b + d], dm, false);
        let dg = &mut self.s_hidden[..rows * hd];
        nn::matmul(dg, dm, &p[g2.w..g2.w + d * hd], rows, d, hd, false, false, false)?;
        // df overwrites the GELU's output, which dW2 was the last to read.
        let df = &mut self.g[..rows * hd];
        layers::gelu_backward(dg, &self.f[..rows * hd], df);
        let g1 = self.fc1;
        nn::matmul(&mut grads[g1.w..g1.w + hd * d], df, &self.h2[..m], hd, rows, d, true, false, false)?;
        nn::column_sums(&mut grads[g1.b..g1.b + hd], df, false);
        let dh2 = &mut self.s_d2[..m];
        nn::matmul(dh2, df, &p[g1.w..g1.w + hd * d], rows, hd, d, false, false, false)?;
        let dx1 = &mut self.s_d3[..m];
        layernorm_grads(grads, self.ln2, d, |dgamma, dbeta| layers::layernorm_backward(dh2, &self.x1[..m], &groups, &p[self.ln2.w..self.ln2.w + d], &self.mean2[..rows], &self.rstd2[..rows], dx1, dgamma, dbeta))?;
        add_in_place(dx1, dy);
        // The attention's branch: da = dx1 through its dropout.
        let da: &[f32] = if self.dropped {
            mul_into(&mut self.s_d[..m], dx1, &self.masks[0][..m]);
            &self.s_d[..m]
        } else {
            dx1
        };
        let pr = self.proj;
        nn::matmul(&mut grads[pr.w..pr.w + d * d], da, &self.att[..m], d, rows, d, true, false, false)?;
        nn::column_sums(&mut grads[pr.b..pr.b + d], da, false);
        let datt = &mut self.s_d2[..m];
        nn::matmul(datt, da, &p[pr.w..pr.w + d * d], rows, d, d, false, false, false)?;
        let dqkv = &mut self.s_3d[..rows * 3 * d];
        let started = std::time::Instant::now();
        attention::causal_attention_backward(&self.qkv_out[..rows * 3 * d], &self.probs[..n * self.heads * t * t], datt, n, t, self.heads, d, dqkv)?;
        self.attention_time[1] += started.elapsed();
        let q = self.qkv;
        nn::matmul(&mut grads[q.w..q.w + 3 * d * d], dqkv, &self.h1[..m], 3 * d, rows, d, true, false, false)?;
        nn::column_sums(&mut grads[q.b..q.b + 3 * d], dqkv, false);
        let dh1 = &mut self.s_d2[..m];
        nn::matmul(dh1, dqkv, &p[q.w..q.w + 3 * d * d], rows, 3 * d, d, false, false, false)?;
        let dx = match dx {
            Some(dx) => &mut dx[..m],
            // Its ln1's weights still need their gradients.
            None => &mut self.s_d[..m],
        };
        layernorm_grads(grads, self.ln1, d, |dgamma, dbeta| layers::layernorm_backward(dh1, &x[..m], &groups, &p[self.ln1.w..self.ln1.w + d], &self.mean1[..rows], &self.rstd1[..rows], dx, dgamma, dbeta))?;
        add_in_place(dx, dx1);
        Ok(())
    }
}

/// Runs a layernorm's backward with its weight and bias gradients zeroed first.
fn layernorm_grads(
    grads: &mut [f32],
    ln: Pair,
    d: usize,
    run: impl FnOnce(&mut [f32], &mut [f32]) -> Result<(), shoal_kernels::KernelError>,
) -> Result<(), WorkerError> {
    let (head, tail) = grads.split_at_mut(ln.b);
    let (dgamma, dbeta) = (&mut head[ln.w..ln.w + d], &mut tail[..d]);
    dgamma.fill(0.0);
    dbeta.fill(0.0);
    run(dgamma, dbeta)?;
    Ok(())
}

fn add_in_place(y: &mut [f32], x: &[f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += x;
    }
}

fn scale_in_place(y: &mut [f32], mask: &[f32]) {
    for (y, &m) in y.iter_mut().zip(mask) {
        *y *= m;
    }
}

fn mul_into(out: &mut [f32], a: &[f32], b: &[f32]) {
    for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
        *o = a * b;
    }
}
