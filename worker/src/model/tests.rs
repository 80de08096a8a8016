//! The presets against today's hand-written models (`reference`), bit for bit; layer lists
//! against the presets they spell out.

use serde::Deserialize;
use shoal_core::rng::SplitMix64;
use shoal_core::spec::{LayerSpec, ModelSpec};

use super::reference::{RefModel, RefNet};
use crate::checkpoint::legacy_name;
use super::*;

/// Runs `f` on a pool of `threads` threads: gemm's bits depend on its thread count, and the
/// comparisons here must hold on every machine.
fn with_threads<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(f)
}

/// The `[model]` section `text` (its keys, then any `[[model.layers]]`).
fn spec(text: &str) -> ModelSpec {
    let mut t: toml::Table = toml::from_str(&format!("[model]\n{text}")).unwrap();
    ModelSpec::deserialize(t.remove("model").unwrap()).unwrap()
}

/// A batch of MNIST-like records: features in [0, 1], labels 0..10.
fn batch(n: usize, features: usize, seed: u64) -> (Vec<f32>, Vec<u32>, Vec<u64>) {
    let mut rng = SplitMix64::new(seed);
    let x = (0..n * features).map(|_| if rng.below(3) == 0 { 0.0 } else { rng.next_f32() }).collect();
    let y = (0..n).map(|_| rng.below(10) as u32).collect();
    (x, y, (0..n as u64).map(|i| i * 13 + seed).collect())
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Three SGD steps of the preset `text` on 28x28 records as a `Sequential` and as the
/// reference: the initial parameters, every step's loss and gradients (handed over in the
/// same buckets), the logits and the counts must be the same bits.
fn preset_matches_reference(text: &str, n: usize) {
    let s = spec(text);
    let reference = RefModel::new(&s, &[28, 28], 10).unwrap();
    let mut seq = Sequential::new(&s, &[28, 28], 10, 7).unwrap();
    let layout = seq.layout().clone();
    let names: Vec<String> = layout.params.iter().map(|p| p.name.clone()).collect();
    assert_eq!(names, reference.pytorch_names(), "{text}: tensor names");
    assert_eq!(layout.params.iter().map(|p| (p.offset, p.shape.clone())).collect::<Vec<_>>(), reference.params.iter().map(|p| (p.offset, p.shape.clone())).collect::<Vec<_>>());
    for (p, r) in layout.params.iter().zip(&reference.params) {
        // The old net's names map (as old checkpoints load) to the Sequential's.
        assert_eq!(legacy_name(reference.kind_name(), &r.name).as_deref(), Some(p.name.as_str()));
    }
    let mut ours = layout.init(7);
    let mut theirs = reference.init(7);
    assert_eq!(bits(&ours), bits(&theirs), "{text}: initial parameters");
    let mut net = RefNet::new(&reference);
    assert_eq!(seq.layer_starts(), net.layer_starts(), "{text}: layer starts");
    let cuts = seq.layer_starts();
    let np = layout.num_params();
    for step in 0..3u64 {
        let (x, y, records) = batch(n, 784, step);
        let b = Batch { x: &x, labels: &y, targets: &[], records: &records, step };
        let (mut g1, mut g2) = (vec![0.0; np], vec![0.0; np]);
        let (mut h1, mut h2) = (Vec::new(), Vec::new());
        let l1 = seq.forward_backward(&mut ours, &b, 0.5, &mut g1, &cuts, &mut |p, g| h1.push((p.len(), g.len()))).unwrap();
        let l2 = net.loss_and_grads_in_buckets(&mut theirs, &x, &y, 0.5, &mut g2, &cuts, &mut |p, g| h2.push((p.len(), g.len()))).unwrap();
        assert_eq!(l1.to_bits(), l2.to_bits(), "{text}: step {step} loss");
        assert_eq!(h1, h2, "{text}: step {step} buckets");
        assert_eq!(bits(&g1), bits(&g2), "{text}: step {step} gradients");
        for (p, g) in ours.iter_mut().zip(&g1) {
            *p -= 0.05 * g;
        }
        for (p, g) in theirs.iter_mut().zip(&g2) {
            *p -= 0.05 * g;
        }
    }
    let (x, y, _) = batch(n, 784, 9);
    let l1 = seq.outputs(&ours, &x, n).unwrap().to_vec();
    let l2 = net.logits(&theirs, &x, n).unwrap().to_vec();
    assert_eq!(bits(&l1), bits(&l2), "{text}: logits");
    let mut sums = crate::metrics::EvalSums::new(seq.head());
    seq.evaluate(&ours, &x, &y, &[], &mut sums).unwrap();
    assert_eq!(sums.correct, net.correct(&theirs, &x, &y).unwrap());
}

#[test]
fn the_demo_mlp_preset_gives_the_reference_bits() {
    with_threads(2, || preset_matches_reference("kind = \"mlp\"\nhidden = [512, 256]", 32));
}

#[test]
fn the_cnn_example_preset_gives_the_reference_bits() {
    with_threads(2, || preset_matches_reference("kind = \"cnn\"\nchannels = [16, 32]\nhidden = [128]", 32));
}

#[test]
fn the_mlp_lanes_pass_gives_the_reference_bits() {
    with_threads(2, || {
        let s = spec("kind = \"mlp\"\nhidden = [64, 32]");
        let reference = RefModel::new(&s, &[28, 28], 10).unwrap();
        let mut net = RefNet::new(&reference);
        let mut seq = Sequential::new(&s, &[28, 28], 10, 7).unwrap();
        let params = reference.init(3);
        let np = params.len();
        let (x, y, records) = batch(24, 784, 5);
        let nodes = [0..2, 2..3];
        let (mut a, mut b) = (vec![vec![0.0; np]; 2], vec![vec![0.0; np]; 2]);
        let mut outs_a: Vec<&mut [f32]> = a.iter_mut().map(|v| &mut v[..]).collect();
        let mut outs_b: Vec<&mut [f32]> = b.iter_mut().map(|v| &mut v[..]).collect();
        let batch = Batch { x: &x, labels: &y, targets: &[], records: &records, step: 0 };
        let l1 = seq.lanes_pass(&params, &batch, LaneSpan { per: 8, first: 0, scale: 0.25 }, &nodes, &mut outs_a).expect("a dense model has a lanes pass").unwrap();
        let l2 = net.mlp_lanes(&params, &x, &y, 8, 0.25, 0, &nodes, &mut outs_b).unwrap();
        assert_eq!(l1.to_bits(), l2.to_bits());
        assert_eq!(a.iter().map(|v| bits(v)).collect::<Vec<_>>(), b.iter().map(|v| bits(v)).collect::<Vec<_>>());
    });
}

#[test]
fn a_layer_list_that_spells_out_the_cnn_preset_gives_its_bits() {
    with_threads(2, || {
        let preset = spec("kind = \"cnn\"\nchannels = [16, 32]\nhidden = [128]");
        let list = preset.layer_list(&[28, 28], 10).unwrap();
        assert!(matches!(list[0], LayerSpec::Conv2d { out: 16, kernel: 3, stride: 1, padding: 1, bias: true }));
        let written = spec(&format!("kind = \"sequential\"\n{}", shoal_core::spec::layers_toml(&list)));
        assert_eq!(written.layers.as_deref(), Some(&list[..]));
        let mut a = Sequential::new(&preset, &[28, 28], 10, 11).unwrap();
        let mut b = Sequential::new(&written, &[28, 28], 10, 11).unwrap();
        assert_eq!(a.layout().params, b.layout().params);
        assert_eq!((a.layout().kind.as_str(), b.layout().kind.as_str()), ("cnn", "sequential"));
        let (mut pa, mut pb) = (a.layout().init(11), b.layout().init(11));
        assert_eq!(bits(&pa), bits(&pb));
        let (x, y, records) = batch(16, 784, 1);
        let batch = Batch { x: &x, labels: &y, targets: &[], records: &records, step: 0 };
        let np = pa.len();
        let (mut ga, mut gb) = (vec![0.0; np], vec![0.0; np]);
        let la = a.forward_backward(&mut pa, &batch, 1.0, &mut ga, &[0], &mut |_, _| {}).unwrap();
        let lb = b.forward_backward(&mut pb, &batch, 1.0, &mut gb, &[0], &mut |_, _| {}).unwrap();
        assert_eq!((la.to_bits(), bits(&ga)), (lb.to_bits(), bits(&gb)));
    });
}

/// Plain f64 loops over PyTorch's layout (`[N][C][H][W]`, `[N][F]`): the reference each layer
/// is checked against, and the function finite differences are taken of.
mod naive {
    use shoal_core::model::LayerShape;
    use shoal_core::spec::{LayerSpec, NormOver};

    /// Layer `l` on `n` records `x`; `p`: its parameters (weight then bias); `mask`: dropout's.
    pub fn layer(l: &LayerShape, p: &[f64], x: &[f64], n: usize, mask: Option<&[f64]>) -> Vec<f64> {
        let (inp, out) = (&l.input, &l.output);
        let size = |s: &[u64]| s.iter().product::<u64>() as usize;
        let (din, dout) = (size(inp), size(out));
        let mut y = vec![0.0; n * dout];
        let dims = |s: &[u64]| (s[0] as usize, s[1] as usize, s[2] as usize);
        match &l.layer {
            LayerSpec::Linear { bias, .. } if inp.len() == 2 => {
                // At every position of a sequence.
                let (t, din, dout) = (inp[0] as usize, inp[1] as usize, out[1] as usize);
                for r in 0..n * t {
                    for o in 0..dout {
                        let mut s = if *bias { p[dout * din + o] } else { 0.0 };
                        for i in 0..din {
                            s += x[r * din + i] * p[o * din + i];
                        }
                        y[r * dout + o] = s;
                    }
                }
            }
            LayerSpec::Embedding { dim, .. } => {
                let d = *dim as usize;
                for (r, &id) in x[..n * din].iter().enumerate() {
                    y[r * d..(r + 1) * d].copy_from_slice(&p[id as usize * d..(id as usize + 1) * d]);
                }
            }
            LayerSpec::PositionEmbedding => {
                for (i, (y, x)) in y.iter_mut().zip(x).enumerate() {
                    *y = x + p[i % din];
                }
            }
            LayerSpec::TransformerBlock { heads, mlp_ratio, .. } => {
                let (t, d) = (inp[0] as usize, inp[1] as usize);
                y = block(x, p, n, t, d, *heads as usize, d * *mlp_ratio as usize);
            }
            LayerSpec::Linear { bias, .. } => {
                for r in 0..n {
                    for o in 0..dout {
                        let mut s = if *bias { p[dout * din + o] } else { 0.0 };
                        for i in 0..din {
                            s += x[r * din + i] * p[o * din + i];
                        }
                        y[r * dout + o] = s;
                    }
                }
            }
            LayerSpec::Conv2d { kernel, stride, padding, bias, .. } => {
                let ((c, h, w), (co, oh, ow)) = (dims(inp), dims(out));
                let (k, s, pad) = (*kernel as usize, *stride as usize, *padding as isize);
                for r in 0..n {
                    for o in 0..co {
                        for i in 0..oh {
                            for j in 0..ow {
                                let mut acc = if *bias { p[co * c * k * k + o] } else { 0.0 };
                                for ci in 0..c {
                                    for a in 0..k {
                                        for b in 0..k {
                                            let (yy, xx) = ((i * s + a) as isize - pad, (j * s + b) as isize - pad);
                                            if yy >= 0 && xx >= 0 && (yy as usize) < h && (xx as usize) < w {
                                                acc += x[r * din + ci * h * w + yy as usize * w + xx as usize] * p[((o * c + ci) * k + a) * k + b];
                                            }
                                        }
                                    }
                                }
                                y[r * dout + (o * oh + i) * ow + j] = acc;
                            }
                        }
                    }
                }
            }
            LayerSpec::MaxPool2d { kernel, stride } | LayerSpec::AvgPool2d { kernel, stride } => {
                let max = matches!(l.layer, LayerSpec::MaxPool2d { .. });
                let ((c, h, w), (_, oh, ow)) = (dims(inp), dims(out));
                let (k, s) = (*kernel as usize, stride.unwrap_or(*kernel) as usize);
                for rc in 0..n * c {
                    for i in 0..oh {
                        for j in 0..ow {
                            let mut acc = if max { f64::NEG_INFINITY } else { 0.0 };
                            for a in 0..k {
                                for b in 0..k {
                                    let v = x[rc * h * w + (i * s + a) * w + j * s + b];
                                    acc = if max { acc.max(v) } else { acc + v };
                                }
                            }
                            y[rc * oh * ow + i * ow + j] = if max { acc } else { acc / (k * k) as f64 };
                        }
                    }
                }
            }
            LayerSpec::Flatten => y.copy_from_slice(&x[..n * din]),
            LayerSpec::Relu => y.iter_mut().zip(x).for_each(|(y, x)| *y = x.max(0.0)),
            LayerSpec::Gelu => y.iter_mut().zip(x).for_each(|(y, x)| *y = 0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))),
            LayerSpec::Tanh => y.iter_mut().zip(x).for_each(|(y, x)| *y = x.tanh()),
            LayerSpec::Sigmoid => y.iter_mut().zip(x).for_each(|(y, x)| *y = 1.0 / (1.0 + (-x).exp())),
            LayerSpec::Dropout { .. } => y.iter_mut().zip(x).zip(mask.expect("dropout needs its mask")).for_each(|((y, x), m)| *y = x * m),
            LayerSpec::LayerNorm { over, eps } => {
                let d = match over {
                    NormOver::Last => *inp.last().unwrap() as usize,
                    NormOver::Chw => din,
                };
                for (xs, ys) in x[..n * din].chunks(d).zip(y.chunks_mut(d)) {
                    let mean = xs.iter().sum::<f64>() / d as f64;
                    let var = xs.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / d as f64;
                    let rstd = 1.0 / (var + *eps).sqrt();
                    for (j, (y, x)) in ys.iter_mut().zip(xs).enumerate() {
                        *y = (x - mean) * rstd * p[j] + p[d + j];
                    }
                }
            }
        }
        y
    }

    /// Rows of `d` normalized, then `w * . + b` (eps 1e-5).
    fn layernorm(x: &[f64], w: &[f64], b: &[f64], d: usize) -> Vec<f64> {
        let mut y = vec![0.0; x.len()];
        for (xs, ys) in x.chunks(d).zip(y.chunks_mut(d)) {
            let mean = xs.iter().sum::<f64>() / d as f64;
            let var = xs.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / d as f64;
            let rstd = 1.0 / (var + 1e-5).sqrt();
            for (j, (y, x)) in ys.iter_mut().zip(xs).enumerate() {
                *y = (x - mean) * rstd * w[j] + b[j];
            }
        }
        y
    }

    /// `x W^T + b` over rows of `din` (W [dout][din] then b [dout] in `p`).
    fn linear(x: &[f64], p: &[f64], din: usize, dout: usize) -> Vec<f64> {
        let rows = x.len() / din;
        let mut y = vec![0.0; rows * dout];
        for r in 0..rows {
            for o in 0..dout {
                y[r * dout + o] = p[dout * din + o] + (0..din).map(|i| x[r * din + i] * p[o * din + i]).sum::<f64>();
            }
        }
        y
    }

    /// A pre-LayerNorm GPT block, as PyTorch computes it, in the tensor order of `infer`:
    /// ln1, qkv, proj, ln2, mlp.0, mlp.2.
    pub fn block(x: &[f64], p: &[f64], n: usize, t: usize, d: usize, heads: usize, hidden: usize) -> Vec<f64> {
        let mut at = 0;
        let mut take = |len: usize| {
            at += len;
            &p[at - len..at]
        };
        let (ln1w, ln1b) = (take(d).to_vec(), take(d).to_vec());
        let qkv_p = take(3 * d * d + 3 * d).to_vec();
        let proj_p = take(d * d + d).to_vec();
        let (ln2w, ln2b) = (take(d).to_vec(), take(d).to_vec());
        let fc1 = take(hidden * d + hidden).to_vec();
        let fc2 = take(d * hidden + d).to_vec();
        let qkv = linear(&layernorm(x, &ln1w, &ln1b, d), &qkv_p, d, 3 * d);
        let hd = d / heads;
        let mut att = vec![0.0; n * t * d];
        for r in 0..n {
            for h in 0..heads {
                for i in 0..t {
                    let q = |j: usize, part: usize, c: usize| qkv[(r * t + j) * 3 * d + part * d + h * hd + c];
                    let scores: Vec<f64> = (0..=i).map(|j| (0..hd).map(|c| q(i, 0, c) * q(j, 1, c)).sum::<f64>() / (hd as f64).sqrt()).collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for c in 0..hd {
                        att[(r * t + i) * d + h * hd + c] = (0..=i).map(|j| e[j] / z * q(j, 2, c)).sum();
                    }
                }
            }
        }
        let x1: Vec<f64> = linear(&att, &proj_p, d, d).iter().zip(x).map(|(a, x)| a + x).collect();
        let f = linear(&layernorm(&x1, &ln2w, &ln2b, d), &fc1, d, hidden);
        let g: Vec<f64> = f.iter().map(|x| 0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))).collect();
        linear(&g, &fc2, hidden, d).iter().zip(&x1).map(|(m, x)| m + x).collect()
    }

    /// Mean cross-entropy of `logits` against `labels`, times `scale` (`softmax_xent`).
    pub fn loss(logits: &[f64], labels: &[u32], classes: usize, scale: f64) -> f64 {
        let n = labels.len();
        let mut total = 0.0;
        for (row, &y) in logits.chunks(classes).zip(labels) {
            let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = row.iter().map(|v| (v - max).exp()).sum::<f64>().ln() + max;
            total += lse - row[y as usize];
        }
        total * scale / n as f64
    }
}

/// A model for the layer checks: its layer list on records of `shape`, and the batch.
struct Case {
    name: &'static str,
    shape: Vec<u64>,
    classes: u64,
    n: usize,
    layers: &'static str,
    /// A language model's context (records are windows of context + 1 tokens; `classes` is
    /// the vocabulary); 0: a classifier.
    context: u64,
}

impl Case {
    fn head(&self) -> Head {
        if self.context > 0 {
            Head::Tokens { vocab: self.classes, context: self.context }
        } else {
            Head::Classes(self.classes)
        }
    }
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "kernel 5, 1 channel, batch 1, tanh",
            shape: vec![1, 8, 8],
            classes: 4,
            n: 1,
            context: 0,
            layers: r#"
                [[model.layers]]
                kind = "conv2d"
                out = 3
                kernel = 5
                [[model.layers]]
                kind = "tanh"
                [[model.layers]]
                kind = "flatten"
                [[model.layers]]
                kind = "linear"
                out = 4"#,
        },
        Case {
            name: "3 channels, stride 2, padding 1, no bias, gelu, maxpool, layernorm over C,H,W, sigmoid, dropout",
            shape: vec![3, 9, 7],
            classes: 3,
            n: 3,
            context: 0,
            layers: r#"
                [[model.layers]]
                kind = "conv2d"
                out = 4
                kernel = 3
                stride = 2
                padding = 1
                bias = false
                [[model.layers]]
                kind = "gelu"
                [[model.layers]]
                kind = "maxpool2d"
                kernel = 2
                [[model.layers]]
                kind = "layernorm"
                over = "chw"
                [[model.layers]]
                kind = "flatten"
                [[model.layers]]
                kind = "linear"
                out = 5
                [[model.layers]]
                kind = "sigmoid"
                [[model.layers]]
                kind = "dropout"
                p = 0.3
                [[model.layers]]
                kind = "linear"
                out = 3"#,
        },
        Case {
            name: "2 channels, padding 1, fused relu, avgpool stride 2, dropout on images, maxpool stride 1, layernorm over the last dimension",
            shape: vec![2, 10, 10],
            classes: 3,
            n: 2,
            context: 0,
            layers: r#"
                [[model.layers]]
                kind = "conv2d"
                out = 3
                kernel = 3
                padding = 1
                [[model.layers]]
                kind = "relu"
                [[model.layers]]
                kind = "avgpool2d"
                kernel = 3
                stride = 2
                [[model.layers]]
                kind = "dropout"
                p = 0.5
                [[model.layers]]
                kind = "maxpool2d"
                kernel = 3
                stride = 1
                [[model.layers]]
                kind = "layernorm"
                [[model.layers]]
                kind = "relu"
                [[model.layers]]
                kind = "flatten"
                [[model.layers]]
                kind = "linear"
                out = 3"#,
        },
        Case {
            name: "stride 2, padding 0, sigmoid, two convolutions",
            shape: vec![1, 7, 7],
            classes: 2,
            n: 2,
            context: 0,
            layers: r#"
                [[model.layers]]
                kind = "conv2d"
                out = 2
                kernel = 3
                stride = 2
                [[model.layers]]
                kind = "sigmoid"
                [[model.layers]]
                kind = "conv2d"
                out = 3
                kernel = 3
                padding = 1
                [[model.layers]]
                kind = "relu"
                [[model.layers]]
                kind = "flatten"
                [[model.layers]]
                kind = "dropout"
                p = 0.2
                [[model.layers]]
                kind = "linear"
                out = 2"#,
        },
        Case {
            // 32 input channels: Winograd's path, fused with its ReLU and max pool, on odd
            // sizes; then Winograd without a pool or a bias.
            name: "winograd: 32 channels, 7x5, conv + relu + maxpool fused, conv without bias",
            shape: vec![32, 7, 5],
            classes: 3,
            n: 2,
            context: 0,
            layers: r#"
                [[model.layers]]
                kind = "conv2d"
                out = 32
                kernel = 3
                padding = 1
                [[model.layers]]
                kind = "relu"
                [[model.layers]]
                kind = "maxpool2d"
                kernel = 2
                [[model.layers]]
                kind = "conv2d"
                out = 4
                kernel = 3
                padding = 1
                bias = false
                [[model.layers]]
                kind = "relu"
                [[model.layers]]
                kind = "flatten"
                [[model.layers]]
                kind = "linear"
                out = 3"#,
        },
        Case {
            name: "gpt: embedding, positions, two transformer blocks (2 heads), layernorm, linear head over the vocabulary",
            shape: vec![6],
            classes: 11,
            n: 2,
            context: 5,
            layers: r#"
                [[model.layers]]
                kind = "embedding"
                dim = 8
                [[model.layers]]
                kind = "position_embedding"
                [[model.layers]]
                kind = "transformer_block"
                heads = 2
                mlp_ratio = 2
                [[model.layers]]
                kind = "transformer_block"
                heads = 2
                mlp_ratio = 4
                [[model.layers]]
                kind = "layernorm"
                [[model.layers]]
                kind = "gelu"
                [[model.layers]]
                kind = "linear"
                out = 11
                bias = false"#,
        },
        Case {
            name: "dense: no bias, layernorm, tanh, relu",
            shape: vec![6],
            classes: 3,
            n: 5,
            context: 0,
            layers: r#"
                [[model.layers]]
                kind = "linear"
                out = 7
                [[model.layers]]
                kind = "relu"
                [[model.layers]]
                kind = "linear"
                out = 5
                bias = false
                [[model.layers]]
                kind = "layernorm"
                [[model.layers]]
                kind = "tanh"
                [[model.layers]]
                kind = "linear"
                out = 3"#,
        },
    ]
}

/// Everything about one case: the model, its shapes, parameters, a batch and its masks.
struct Setup {
    seq: Sequential,
    shapes: shoal_core::model::Layout,
    params: Vec<f32>,
    x: Vec<f32>,
    labels: Vec<u32>,
    records: Vec<u64>,
    /// Each dropout layer's mask, in PyTorch's layout (None for other layers).
    masks: Vec<Option<Vec<f64>>>,
}

const SEED: u64 = 5;
const STEP: u64 = 3;

fn setup(c: &Case) -> Setup {
    let spec = spec(&format!("kind = \"sequential\"\n{}", c.layers.replace("\n                ", "\n")));
    let seq = Sequential::new(&spec, &c.shape, c.head(), SEED).unwrap();
    let shapes = shoal_core::model::Layout::new(&spec, &c.shape, c.head()).unwrap();
    let mut params = seq.layout().init(1);
    // Layernorm's affine away from 1 and 0, so its gradients are not special.
    let mut rng = SplitMix64::new(2);
    for p in &seq.layout().params {
        if p.constant.is_some() {
            params[p.offset..p.offset + p.len()].iter_mut().for_each(|v| *v += rng.next_f32() - 0.5);
        }
    }
    let (x, labels) = if c.context > 0 {
        // Token ids in, the next token at every position out.
        let ids = (0..c.n * c.context as usize).map(|_| rng.below(c.classes) as f32).collect();
        (ids, (0..c.n * c.context as usize).map(|_| rng.below(c.classes) as u32).collect())
    } else {
        let features = c.shape.iter().product::<u64>() as usize;
        (
            (0..c.n * features).map(|_| rng.next_f32() * 2.0 - 1.0).collect(),
            (0..c.n).map(|_| rng.below(c.classes) as u32).collect(),
        )
    };
    let records: Vec<u64> = (0..c.n as u64).map(|i| 40 + 3 * i).collect();
    let masks = shapes
        .layers
        .iter()
        .zip(&shapes.shapes)
        .enumerate()
        .map(|(i, (l, s))| match l {
            LayerSpec::Dropout { p } => {
                let per: usize = s.input.iter().product::<u64>() as usize;
                let mut m = vec![0.0f32; c.n * per];
                shoal_kernels::layers::dropout_mask(SEED, STEP, i as u64, &records, per, *p as f32, &mut m).unwrap();
                Some(m.iter().map(|&v| v as f64).collect())
            }
            _ => None,
        })
        .collect();
    Setup { seq, shapes, params, x, labels, records, masks }
}

/// The naive forward pass in f64 of `n` records `x` from parameters `p`: the logits.
fn naive_pass(shapes: &shoal_core::model::Layout, x: &[f32], p: &[f64], n: usize, masks: &[Option<Vec<f64>>]) -> Vec<f64> {
    let mut at: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let mut offset = 0;
    for (i, l) in shapes.shapes.iter().enumerate() {
        let count = l.param_count() as usize;
        at = naive::layer(l, &p[offset..offset + count], &at, n, masks[i].as_deref());
        offset += count;
    }
    at
}

impl Setup {
    fn n(&self) -> usize {
        self.records.len()
    }

    fn loss(&self, p: &[f64]) -> f64 {
        let logits = naive_pass(&self.shapes, &self.x, p, self.n(), &self.masks);
        naive::loss(&logits, &self.labels, *self.shapes.shapes.last().unwrap().output.last().unwrap() as usize, 0.5)
    }

    /// Our values at boundary `b` after a forward pass, in PyTorch's layout.
    fn ours(&self, b: usize) -> Vec<f64> {
        let n = self.n();
        let buf = &self.seq.acts[self.seq.slot[b]];
        let shape = if b == 0 { &self.shapes.input } else { &self.shapes.shapes[b - 1].output };
        let size = self.seq.sizes[b];
        match self.seq.layouts[b] {
            Arrangement::Rows => buf[..n * size].iter().map(|&v| v as f64).collect(),
            Arrangement::Planes => {
                let (c, p) = (shape[0] as usize, (shape[1] * shape[2]) as usize);
                let mut out = vec![0.0; n * size];
                for ni in 0..n {
                    for ci in 0..c {
                        for pi in 0..p {
                            out[ni * c * p + ci * p + pi] = buf[(ci * n + ni) * p + pi] as f64;
                        }
                    }
                }
                out
            }
        }
    }
}

fn close(a: f64, b: f64, abs: f64, rel: f64) -> bool {
    (a - b).abs() <= abs + rel * a.abs().max(b.abs())
}

#[test]
fn every_layer_kind_matches_a_plain_f64_reference_forward() {
    for c in cases() {
        let mut s = setup(&c);
        let n = c.n;
        let params = s.params.clone();
        s.seq.forward(&params, &s.x.clone(), n, Some((&s.records.clone(), STEP))).unwrap();
        let p64: Vec<f64> = params.iter().map(|&v| v as f64).collect();
        let mut offset = 0;
        // The reference's output of a layer whose buffer is never written (a convolution with
        // a fused max pool, and its ReLU), carried to the next layer.
        let mut carried: Option<Vec<f64>> = None;
        for (i, l) in s.shapes.shapes.iter().enumerate() {
            let count = l.param_count() as usize;
            // Each layer from our own input to it, so errors do not pile up.
            let input = carried.take().unwrap_or_else(|| s.ours(i));
            let mut want = naive::layer(l, &p64[offset..offset + count], &input, n, s.masks[i].as_deref());
            offset += count;
            if s.seq.fused.get(i + 1) == Some(&true) {
                // Its ReLU runs inside it: the buffer holds the ReLU's output.
                want.iter_mut().for_each(|v| *v = v.max(0.0));
            }
            let pooled_conv = |k: usize| matches!(s.seq.layers.get(k), Some(Layer::Conv2d(conv)) if conv.pooled);
            if pooled_conv(i) || (i > 0 && pooled_conv(i - 1)) {
                carried = Some(want);
                continue;
            }
            let got = s.ours(i + 1);
            assert_eq!(got.len(), want.len(), "{}: layer {i} ({})", c.name, l.kind());
            for (j, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(close(*g, *w, 1e-5, 1e-5), "{}: layer {i} ({}) output {j}: {g} vs the reference's {w}", c.name, l.kind());
            }
        }
        // Evaluation skips dropout: the naive pass without masks.
        let logits = s.seq.outputs(&params, &s.x.clone(), n).unwrap().to_vec();
        let mut eval = s.masks.clone();
        eval.iter_mut().flatten().for_each(|m| m.fill(1.0));
        let want = naive_pass(&s.shapes, &s.x, &p64, n, &eval);
        for (g, w) in logits.iter().zip(&want) {
            assert!(close(*g as f64, *w, 1e-4, 1e-4), "{}: evaluation logits {g} vs {w}", c.name);
        }
    }
}

#[test]
fn every_layer_kind_has_gradients_that_match_finite_differences_in_f64() {
    for c in cases() {
        let mut s = setup(&c);
        let np = s.params.len();
        let (mut params, mut grads) = (s.params.clone(), vec![0.0f32; np]);
        let (x, labels, records) = (s.x.clone(), s.labels.clone(), s.records.clone());
        let batch = Batch { x: &x, labels: &labels, targets: &[], records: &records, step: STEP };
        let loss = s.seq.forward_backward(&mut params, &batch, 0.5, &mut grads, &[0], &mut |_, _| {}).unwrap();
        let p64: Vec<f64> = s.params.iter().map(|&v| v as f64).collect();
        assert!(close(loss as f64, s.loss(&p64), 1e-5, 1e-5), "{}: loss {loss} vs {}", c.name, s.loss(&p64));
        let h = 1e-6;
        let mut rng = SplitMix64::new(9);
        for t in &s.seq.layout().params.clone() {
            // Every element of small tensors, a sample of large ones.
            let picks: Vec<usize> = if t.len() <= 24 { (0..t.len()).collect() } else { (0..24).map(|_| rng.below(t.len() as u64) as usize).collect() };
            for k in picks {
                let i = t.offset + k;
                let mut q = p64.clone();
                q[i] += h;
                let up = s.loss(&q);
                q[i] -= 2.0 * h;
                let down = s.loss(&q);
                let fd = (up - down) / (2.0 * h);
                let g = grads[i] as f64;
                assert!(close(g, fd, 2e-5, 2e-3), "{}: d loss / d {}[{k}] = {g}, finite differences say {fd}", c.name, t.name);
            }
        }
    }
}

/// Layer `l` in candle (f32, on the CPU), where candle has the op; None where it does not.
fn candle_layer(l: &shoal_core::model::LayerShape, p: &[f32], x: &[f32], n: usize) -> Option<Vec<f32>> {
    use candle_core::{Device, Tensor};
    let dev = Device::Cpu;
    let dims = |s: &[u64]| std::iter::once(n).chain(s.iter().map(|&d| d as usize)).collect::<Vec<usize>>();
    let t = Tensor::from_slice(x, dims(&l.input), &dev).unwrap();
    let w = |shape: Vec<usize>, at: usize| Tensor::from_slice(&p[at..at + shape.iter().product::<usize>()], shape, &dev).unwrap();
    let y = match &l.layer {
        LayerSpec::Linear { .. } if l.input.len() == 2 => return None,
        LayerSpec::Embedding { .. } | LayerSpec::PositionEmbedding | LayerSpec::TransformerBlock { .. } => return None,
        LayerSpec::Linear { out, bias } => {
            let (o, i) = (*out as usize, l.input[0] as usize);
            let y = t.matmul(&w(vec![o, i], 0).t().unwrap()).unwrap();
            if *bias {
                y.broadcast_add(&w(vec![o], o * i)).unwrap()
            } else {
                y
            }
        }
        LayerSpec::Conv2d { out, kernel, stride, padding, bias } => {
            let (o, c, k) = (*out as usize, l.input[0] as usize, *kernel as usize);
            let y = t.conv2d(&w(vec![o, c, k, k], 0), *padding as usize, *stride as usize, 1, 1).unwrap();
            if *bias {
                y.broadcast_add(&w(vec![o], o * c * k * k).reshape((1, o, 1, 1)).unwrap()).unwrap()
            } else {
                y
            }
        }
        LayerSpec::MaxPool2d { kernel, stride } => {
            let (k, s) = (*kernel as usize, stride.unwrap_or(*kernel) as usize);
            t.max_pool2d_with_stride((k, k), (s, s)).unwrap()
        }
        LayerSpec::AvgPool2d { kernel, stride } => {
            let (k, s) = (*kernel as usize, stride.unwrap_or(*kernel) as usize);
            t.avg_pool2d_with_stride((k, k), (s, s)).unwrap()
        }
        LayerSpec::Relu => t.relu().unwrap(),
        LayerSpec::Gelu => t.gelu_erf().unwrap(),
        LayerSpec::Tanh => t.tanh().unwrap(),
        LayerSpec::Sigmoid => candle_nn::ops::sigmoid(&t).unwrap(),
        LayerSpec::LayerNorm { over, eps } => {
            let d = match over {
                shoal_core::spec::NormOver::Last => *l.input.last().unwrap() as usize,
                shoal_core::spec::NormOver::Chw => l.input.iter().product::<u64>() as usize,
            };
            let rows = t.reshape(((), d)).unwrap();
            candle_nn::ops::layer_norm(&rows, &w(vec![d], 0), &w(vec![d], d), *eps as f32).unwrap()
        }
        LayerSpec::Flatten | LayerSpec::Dropout { .. } => return None,
    };
    Some(y.flatten_all().unwrap().to_vec1::<f32>().unwrap())
}

#[test]
fn every_layer_candle_has_matches_candle() {
    let mut checked = std::collections::BTreeSet::new();
    for c in cases() {
        let mut s = setup(&c);
        let params = s.params.clone();
        s.seq.forward(&params, &s.x.clone(), c.n, Some((&s.records.clone(), STEP))).unwrap();
        let mut offset = 0;
        // As in the f64 reference test: what candle computed for a buffer never written.
        let mut carried: Option<Vec<f32>> = None;
        for (i, l) in s.shapes.shapes.iter().enumerate() {
            let count = l.param_count() as usize;
            let input: Vec<f32> = carried.take().unwrap_or_else(|| s.ours(i).iter().map(|&v| v as f32).collect());
            let theirs = candle_layer(l, &params[offset..offset + count], &input, c.n);
            offset += count;
            let Some(mut want) = theirs else { continue };
            if s.seq.fused.get(i + 1) == Some(&true) {
                want.iter_mut().for_each(|v| *v = v.max(0.0));
            }
            checked.insert(l.kind());
            let pooled_conv = |k: usize| matches!(s.seq.layers.get(k), Some(Layer::Conv2d(conv)) if conv.pooled);
            if pooled_conv(i) || (i > 0 && pooled_conv(i - 1)) {
                carried = Some(want);
                continue;
            }
            let got = s.ours(i + 1);
            assert_eq!(got.len(), want.len(), "{}: layer {i} ({})", c.name, l.kind());
            for (j, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(close(*g, *w as f64, 1e-5, 1e-5), "{}: layer {i} ({}) output {j}: {g}, candle says {w}", c.name, l.kind());
            }
        }
    }
    let want = ["avgpool2d", "conv2d", "gelu", "layernorm", "linear", "maxpool2d", "relu", "sigmoid", "tanh"];
    assert_eq!(checked.into_iter().collect::<Vec<_>>(), want, "every kind candle has is checked");
}

/// A regression head: mean squared error over records and outputs, and its gradient through a
/// linear layer, against the closed form in f64.
#[test]
fn a_regression_head_trains_mean_squared_error() {
    let (n, f, w) = (5usize, 3usize, 2usize);
    let s = spec("[[model.layers]]\nkind = \"linear\"\nout = 2\n");
    let mut seq = Sequential::new(&s, &[f as u64], Head::Targets(w as u64), 3).unwrap();
    assert_eq!(seq.head(), Head::Targets(2));
    let mut params = seq.layout().init(3);
    let mut rng = SplitMix64::new(11);
    let x: Vec<f32> = (0..n * f).map(|_| rng.next_f32() * 2.0 - 1.0).collect();
    let t: Vec<f32> = (0..n * w).map(|_| rng.next_f32() * 10.0).collect();
    let records: Vec<u64> = (0..n as u64).collect();
    let labels = vec![0u32; n];
    let mut grads = vec![0f32; params.len()];
    let batch = Batch { x: &x, labels: &labels, targets: &t, records: &records, step: 0 };
    let loss = seq.forward_backward(&mut params.clone(), &batch, 1.0, &mut grads, &[0], &mut |_, _| {}).unwrap();
    // out = x W^T + b; loss = mean (out - t)^2; dW = dy^T x, db = sum dy, dy = 2 (out - t) / (n w).
    let (wt, b) = (&params[..w * f], &params[w * f..]);
    let (mut want_loss, mut gw, mut gb) = (0f64, vec![0f64; w * f], vec![0f64; w]);
    for r in 0..n {
        for o in 0..w {
            let out = b[o] as f64 + (0..f).map(|k| wt[o * f + k] as f64 * x[r * f + k] as f64).sum::<f64>();
            let d = out - t[r * w + o] as f64;
            want_loss += d * d / (n * w) as f64;
            let dy = 2.0 * d / (n * w) as f64;
            gb[o] += dy;
            for k in 0..f {
                gw[o * f + k] += dy * x[r * f + k] as f64;
            }
        }
    }
    assert!(close(loss as f64, want_loss, 1e-4, 1e-5), "loss {loss} against {want_loss}");
    for (i, (&g, want)) in grads.iter().zip(gw.iter().chain(&gb)).enumerate() {
        assert!(close(g as f64, *want, 1e-5, 1e-4), "gradient {i}: {g} against {want}");
    }
    let mut sums = crate::metrics::EvalSums::default();
    seq.evaluate(&params, &x, &labels, &t, &mut sums).unwrap();
    assert!(close(sums.metrics(seq.head()).loss.unwrap(), want_loss, 1e-4, 1e-5));
    // Targets missing from a batch: an error, not a panic.
    let short = Batch { x: &x, labels: &labels, targets: &t[..3], records: &records, step: 0 };
    assert!(seq.forward_backward(&mut params, &short, 1.0, &mut grads, &[0], &mut |_, _| {}).is_err());
}

/// The CNN preset's pass through `Sequential` against the reference's, timed in one thread
/// (run with `cargo test --release -p shoal-worker -- --ignored preset_pass_times`).
#[test]
#[ignore]
fn preset_pass_times() {
    with_threads(1, || {
        let s = spec("kind = \"cnn\"\nchannels = [16, 32]\nhidden = [128]");
        let reference = RefModel::new(&s, &[28, 28], 10).unwrap();
        let mut seq = Sequential::new(&s, &[28, 28], 10, 7).unwrap();
        let mut net = RefNet::new(&reference);
        let np = seq.layout().num_params();
        let cuts = seq.layer_starts();
        let (mut p1, mut p2) = (seq.layout().init(7), reference.init(7));
        let (x, y, records) = batch(64, 784, 1);
        let b = Batch { x: &x, labels: &y, targets: &[], records: &records, step: 0 };
        let (mut g1, mut g2) = (vec![0.0; np], vec![0.0; np]);
        let (mut t1, mut t2) = (std::time::Duration::MAX, std::time::Duration::MAX);
        if std::env::var_os("AFTER_EVAL").is_some() {
            // As after an epoch's evaluation: a pass of 512 records first.
            let (xe, _, _) = batch(512, 784, 2);
            seq.outputs(&p1, &xe, 512).unwrap();
            net.logits(&p2, &xe, 512).unwrap();
        }
        for _ in 0..15 {
            let t = std::time::Instant::now();
            for _ in 0..10 {
                seq.forward_backward(&mut p1, &b, 1.0, &mut g1, &cuts, &mut |_, _| {}).unwrap();
            }
            t1 = t1.min(t.elapsed() / 10);
            let t = std::time::Instant::now();
            for _ in 0..10 {
                net.loss_and_grads_in_buckets(&mut p2, &x, &y, 1.0, &mut g2, &cuts, &mut |_, _| {}).unwrap();
            }
            t2 = t2.min(t.elapsed() / 10);
        }
        seq.start_profile();
        for _ in 0..20 {
            seq.forward_backward(&mut p1, &b, 1.0, &mut g1, &cuts, &mut |_, _| {}).unwrap();
        }
        eprintln!("sequential {t1:?}  reference {t2:?}  ratio {:.3}", t1.as_secs_f64() / t2.as_secs_f64());
        for (i, f, b) in seq.profile() {
            eprintln!("  layer {i}: fwd {:?} bwd {:?}", f / 20, b / 20);
        }
    });
}

/// A language model is causal: a token changes the logits at its own position and after,
/// never before (bit for bit), and the loss at position i sends no gradient into a later
/// token's embedding row.
#[test]
fn a_gpt_is_causal_forward_and_backward() {
    let s = spec("kind = \"gpt\"\nblocks = 2\nheads = 2\nd_model = 8\n");
    let (t, vocab) = (6usize, 256u64);
    let head = Head::Tokens { vocab, context: t as u64 };
    let mut seq = Sequential::new(&s, &[t as u64 + 1], head, 1).unwrap();
    let mut params = seq.layout().init(4);
    let ids: Vec<f32> = [10.0, 200.0, 3.0, 77.0, 9.0, 150.0].to_vec();
    let base = seq.outputs(&params, &ids, 1).unwrap().to_vec();
    for j in 0..t {
        let mut changed = ids.clone();
        changed[j] = 42.0;
        let out = seq.outputs(&params, &changed, 1).unwrap().to_vec();
        let v = vocab as usize;
        assert_eq!(bits(&out[..j * v]), bits(&base[..j * v]), "changing token {j} changed an earlier position's logits");
        assert_ne!(bits(&out[j * v..(j + 1) * v]), bits(&base[j * v..(j + 1) * v]), "token {j} must change its own position's logits");
    }
    // Only position 0's target has a loss: then no later token's embedding row moves.
    let np = params.len();
    let mut grads = vec![0.0f32; np];
    let mut one_token = Sequential::new(&s, &[t as u64 + 1], Head::Tokens { vocab, context: t as u64 }, 1).unwrap();
    let labels = vec![5u32; t];
    let b = Batch { x: &ids, labels: &labels, targets: &[], records: &[0], step: 0 };
    one_token.forward_backward(&mut params, &b, 1.0, &mut grads, &[0], &mut |_, _| {}).unwrap();
    let d = 8;
    let row = |g: &[f32], id: usize| g[id * d..(id + 1) * d].iter().any(|&v| v != 0.0);
    assert!(ids.iter().all(|&id| row(&grads, id as usize)), "every token of a full loss gets a gradient");
    // A loss on position 0 alone: mask the others by a batch whose dy we cannot set directly,
    // so compare against the model cut to its first position (a context of 1 sees token 0 only).
    let s1 = spec("kind = \"gpt\"\nblocks = 2\nheads = 2\nd_model = 8\n");
    let mut first = Sequential::new(&s1, &[2], Head::Tokens { vocab, context: 1 }, 1).unwrap();
    let mut p1 = first.layout().init(4);
    let mut g1 = vec![0.0f32; p1.len()];
    let b1 = Batch { x: &ids[..1], labels: &labels[..1], targets: &[], records: &[0], step: 0 };
    first.forward_backward(&mut p1, &b1, 1.0, &mut g1, &[0], &mut |_, _| {}).unwrap();
    assert!(row(&g1, 10) && !row(&g1, 200) && !row(&g1, 3), "position 0's loss reaches token 0's row only");
}

/// A transformer block with dropout: in training its masks (a function of the seed, step,
/// layer and record) change the forward pass and its backward pass is the gradient of that
/// same pass (central differences over the same masks); in evaluation it is off.
#[test]
fn a_transformer_blocks_dropout_is_masked_consistently_and_off_in_evaluation() {
    let with = spec("kind = \"gpt\"\nblocks = 1\nheads = 2\nd_model = 8\ndropout = 0.3\n");
    let without = spec("kind = \"gpt\"\nblocks = 1\nheads = 2\nd_model = 8\n");
    let (t, vocab) = (4usize, 256u64);
    let head = Head::Tokens { vocab, context: t as u64 };
    let mut a = Sequential::new(&with, &[t as u64 + 1], head, 3).unwrap();
    let mut b = Sequential::new(&without, &[t as u64 + 1], head, 3).unwrap();
    // The same tensors (the preset with dropout adds a dropout layer after the embeddings,
    // which has none): copy by name.
    let pa = a.layout().init(5);
    let mut pb = vec![0.0f32; b.layout().num_params()];
    for p in &b.layout().params.clone() {
        // Module k of the list without dropout is module k + 1 of the other from the block on.
        let (k, rest) = p.name.split_once('.').unwrap();
        let k: usize = k.parse().unwrap();
        let name = format!("{}.{rest}", if k >= 2 { k + 1 } else { k });
        let q = a.layout().params.iter().find(|q| q.name == name).unwrap();
        pb[p.offset..p.offset + p.len()].copy_from_slice(&pa[q.offset..q.offset + q.len()]);
    }
    let ids: Vec<f32> = vec![3.0, 100.0, 7.0, 42.0, 9.0, 11.0, 250.0, 0.0];
    let labels: Vec<u32> = vec![1, 2, 3, 4, 5, 6, 7, 8];
    assert_eq!(bits(a.outputs(&pa, &ids, 2).unwrap()), bits(b.outputs(&pb, &ids, 2).unwrap()), "evaluation ignores dropout");
    let batch = Batch { x: &ids, labels: &labels, targets: &[], records: &[10, 11], step: 4 };
    let loss = |m: &mut Sequential, p: &[f32]| {
        let mut p = p.to_vec();
        let mut g = vec![0.0f32; p.len()];
        let l = m.forward_backward(&mut p, &batch, 1.0, &mut g, &[0], &mut |_, _| {}).unwrap();
        (l, g)
    };
    let (la, ga) = loss(&mut a, &pa);
    let (lb, _) = loss(&mut b, &pb);
    assert_ne!(la.to_bits(), lb.to_bits(), "training draws masks");
    assert_eq!(la.to_bits(), loss(&mut a, &pa).0.to_bits(), "the same step and records, the same masks");
    // Central differences of the masked loss (f32, so a loose tolerance) on a sample of
    // every tensor of the block.
    let mut rng = SplitMix64::new(3);
    for p in a.layout().params.clone().iter().filter(|p| p.name.starts_with("3.")) {
        for _ in 0..3 {
            let i = p.offset + rng.below(p.len() as u64) as usize;
            let h = 1e-2f32;
            let (mut up, mut down) = (pa.clone(), pa.clone());
            up[i] += h;
            down[i] -= h;
            let fd = (loss(&mut a, &up).0 as f64 - loss(&mut a, &down).0 as f64) / (2.0 * h as f64);
            let g = ga[i] as f64;
            assert!((g - fd).abs() <= 2e-3 + 0.05 * g.abs().max(fd.abs()), "{}: {g} against finite differences {fd}", p.name);
        }
    }
}
