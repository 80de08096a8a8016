//! The shapes of a model described as a list of layers (`crate::spec::LayerSpec`, presets
//! included): what each layer takes and gives per record, its parameter tensors with their
//! PyTorch names (`i.weight`, `i.bias` for layer i, as `torch.nn.Sequential` names them) and
//! init, and the sizes the limits check. Checked at submission, so a model that does not fit
//! its data is refused naming the layer, its kind and the shapes.
//!
//! **The input-shape rule** (`input_shape`). A record's `feature_shape` becomes the model's
//! input (per record, no batch dimension) like this:
//! - the mlp preset flattens the record: [F] with F the product of the feature shape;
//! - otherwise a 1-d feature shape [F] is a flat vector [F] (tabular data), a 2-d one [H, W]
//!   is an image of 1 channel, [1, H, W], and a 3-d one [C, H, W] is an image of C channels,
//!   as given; a 0-d one is [1], and any other rank is kept as given (a flatten makes it a
//!   vector).
//!
//! So MNIST's [28, 28] records enter a layer list as [1, 28, 28]: a conv2d takes them as they
//! are, and a model of dense layers starts with a flatten. The PyTorch module built from the
//! same list takes inputs of [N] + that shape.

use crate::spec::{LayerSpec, ModelKind, ModelSpec, NormOver};

/// The model's input for records of `feature_shape` (see the module's rule). `preset_mlp`:
/// the mlp preset, which flattens every record.
pub fn input_shape(feature_shape: &[u64], preset_mlp: bool) -> Vec<u64> {
    if preset_mlp {
        return vec![feature_shape.iter().fold(1u64, |a, &d| a.saturating_mul(d))];
    }
    match feature_shape {
        [] => vec![1],
        [h, w] => vec![1, *h, *w],
        other => other.to_vec(),
    }
}

/// How a parameter tensor starts (PyTorch's defaults).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamInit {
    /// U(-1/sqrt(fan_in), 1/sqrt(fan_in)): linear and conv2d weights and biases.
    Uniform { fan_in: u64 },
    /// A layernorm's weight.
    Ones,
    /// A layernorm's bias.
    Zeros,
    /// N(0, EMBEDDING_STD^2): token and position embeddings (GPT-2's init).
    Normal,
}

/// One parameter tensor of a layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamShape {
    /// The PyTorch name: `"{layer}.weight"` or `"{layer}.bias"`.
    pub name: String,
    /// linear [out, in]; conv2d [out, in, kernel, kernel]; biases [out]; layernorm's weight
    /// and bias the normalized shape ([last] or [C, H, W]).
    pub shape: Vec<u64>,
    pub init: ParamInit,
}

impl ParamShape {
    /// The number of values.
    pub fn len(&self) -> u64 {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `weight` or `bias`.
    pub fn suffix(&self) -> &str {
        self.name.rsplit_once('.').map_or(self.name.as_str(), |(_, s)| s)
    }

    /// The fan-in of a uniform init (None for ones and zeros).
    pub fn fan_in(&self) -> Option<u64> {
        match self.init {
            ParamInit::Uniform { fan_in } => Some(fan_in),
            _ => None,
        }
    }
}

/// One layer's shapes, per record.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerShape {
    /// The layer's index in the list (its PyTorch module index).
    pub index: usize,
    pub layer: LayerSpec,
    pub input: Vec<u64>,
    pub output: Vec<u64>,
    /// In PyTorch's order: weight, then bias.
    pub params: Vec<ParamShape>,
    /// The largest buffer this layer needs per record, in floats: its input, its output, or
    /// (conv2d) its im2col matrix [C * k * k, H' * W'].
    pub activation_floats: u64,
}

impl LayerShape {
    pub fn kind(&self) -> &'static str {
        self.layer.kind_name()
    }

    /// The number of parameters of this layer (saturating).
    pub fn param_count(&self) -> u64 {
        self.params.iter().fold(0u64, |a, p| a.saturating_add(p.len()))
    }
}

/// A model that does not fit its input or its classes. Displayed as
/// `model.layers[4] (linear): expects [features] or a sequence [positions, features], got [32, 7, 7]; add a flatten` (for a
/// preset: `model (kind = "cnn", layer 7: linear): ...`; for the model as a whole:
/// `model: ...`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShapeError {
    /// The layer at fault: (index, kind); None for the input or the model as a whole (then
    /// `detail` is the whole message, starting with its key).
    pub layer: Option<(usize, &'static str)>,
    /// Set when the layers are a preset's expansion (the user never wrote them).
    pub preset: Option<&'static str>,
    pub detail: String,
}

impl ShapeError {
    fn at(index: usize, layer: &LayerSpec, detail: impl Into<String>) -> Self {
        ShapeError { layer: Some((index, layer.kind_name())), preset: None, detail: detail.into() }
    }

    fn model(detail: impl std::fmt::Display) -> Self {
        ShapeError { layer: None, preset: None, detail: format!("model: {detail}") }
    }

    /// Marks the error as one of a preset's layers.
    pub fn in_preset(mut self, preset: ModelKind) -> Self {
        self.preset = Some(preset.name());
        self
    }
}

impl std::fmt::Display for ShapeError {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match (self.layer, self.preset) {
            (Some((i, kind)), None) => write!(f, "model.layers[{i}] ({kind}): {}", self.detail),
            (Some((i, kind)), Some(p)) => write!(f, "model (kind = {p:?}, layer {i}: {kind}): {}", self.detail),
            (None, _) => f.write_str(&self.detail),
        }
    }
}

impl std::error::Error for ShapeError {}

impl From<ShapeError> for crate::CoreError {
    fn from(e: ShapeError) -> Self {
        crate::CoreError::Spec(e.to_string())
    }
}

fn numel(shape: &[u64]) -> Option<u64> {
    shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d))
}

/// The [C, H, W] of an image input, or the error of a layer that needs one.
fn image(shape: &[u64], what: &str) -> Result<(u64, u64, u64), String> {
    match *shape {
        [c, h, w] => Ok((c, h, w)),
        _ => Err(format!(
            "{what} an image [channels, height, width], got {shape:?}{}",
            if shape.len() == 1 { "; records of [H, W] or [C, H, W] are images, flat ones and flattened ones are not" } else { "" }
        )),
    }
}

/// Output side of a window of `kernel` with `stride` over `size` (padded): floor mode, as
/// PyTorch's default.
fn windows(size: u64, kernel: u64, stride: u64) -> u64 {
    (size - kernel) / stride.max(1) + 1
}

/// Infers every layer's shapes from the model's `input` (per record, see `input_shape`).
/// Errors name the layer index, its kind and the shapes that do not fit.
pub fn infer(layers: &[LayerSpec], input: &[u64]) -> Result<Vec<LayerShape>, ShapeError> {
    infer_with_vocab(layers, input, None)
}

/// The std of the embeddings' init (GPT-2's).
pub const EMBEDDING_STD: f32 = 0.02;

/// `infer` with the dataset's vocabulary, which an `embedding` without its own `vocab` takes.
pub fn infer_with_vocab(layers: &[LayerSpec], input: &[u64], vocab_hint: Option<u64>) -> Result<Vec<LayerShape>, ShapeError> {
    if input.is_empty() || input.contains(&0) {
        return Err(ShapeError::model(format!("an input of shape {input:?} holds no values")));
    }
    if numel(input).is_none() {
        return Err(ShapeError::model(format!("an input of shape {input:?} is too large")));
    }
    let mut shape = input.to_vec();
    let mut out = Vec::with_capacity(layers.len());
    for (i, layer) in layers.iter().enumerate() {
        let err = |detail: String| ShapeError::at(i, layer, detail);
        let too_large = || err(format!("is too large for an input of {shape:?}"));
        let uniform = |name: &str, shape: Vec<u64>, fan_in: u64| ParamShape { name: format!("{i}.{name}"), shape, init: ParamInit::Uniform { fan_in } };
        let mut scratch = 0u64;
        let mut params = Vec::new();
        let output = match *layer {
            LayerSpec::Linear { out: o, bias } => {
                // [F], or a sequence [T, F] (applied at each position, as PyTorch's is).
                let (lead, n) = match shape[..] {
                    [n] => (None, n),
                    [t, n] => (Some(t), n),
                    _ => return Err(err(format!("expects [features] or a sequence [positions, features], got {shape:?}; add a flatten"))),
                };
                params.push(uniform("weight", vec![o, n], n));
                if bias {
                    params.push(uniform("bias", vec![o], n));
                }
                match lead {
                    Some(t) => vec![t, o],
                    None => vec![o],
                }
            }
            LayerSpec::Embedding { dim, vocab } => {
                let [t] = shape[..] else { return Err(err(format!("reads a record's token ids [positions], got {shape:?}: it must come first, on a text dataset"))) };
                if i != 0 {
                    return Err(err("reads the record's token ids: it must be the first layer".to_string()));
                }
                let v = vocab.or(vocab_hint).ok_or_else(|| err("needs vocab: the dataset is not text".to_string()))?;
                if let (Some(own), Some(data)) = (vocab, vocab_hint) {
                    if own < data {
                        return Err(err(format!("vocab = {own} is smaller than the dataset's {data} token values: a token id would have no row; leave vocab out")));
                    }
                }
                params.push(ParamShape { name: format!("{i}.weight"), shape: vec![v, dim], init: ParamInit::Normal });
                vec![t, dim]
            }
            LayerSpec::PositionEmbedding => {
                let [t, d] = shape[..] else { return Err(err(format!("expects a sequence [positions, features], got {shape:?}; put it after an embedding"))) };
                params.push(ParamShape { name: format!("{i}.weight"), shape: vec![t, d], init: ParamInit::Normal });
                shape.clone()
            }
            LayerSpec::TransformerBlock { heads, mlp_ratio, .. } => {
                let [t, d] = shape[..] else { return Err(err(format!("expects a sequence [positions, features], got {shape:?}; put it after an embedding"))) };
                if !d.is_multiple_of(heads) {
                    return Err(err(format!("heads = {heads} does not divide the width {d} of {shape:?}")));
                }
                let hidden = d.checked_mul(mlp_ratio).ok_or_else(too_large)?;
                let ln = |name: &str| [(format!("{i}.{name}.weight"), ParamInit::Ones), (format!("{i}.{name}.bias"), ParamInit::Zeros)].map(|(name, init)| ParamShape { name, shape: vec![d], init });
                let lin = |name: &str, o: u64, n: u64| [vec![o, n], vec![o]].map(|shape| ParamShape { name: format!("{i}.{name}.{}", if shape.len() == 2 { "weight" } else { "bias" }), shape, init: ParamInit::Uniform { fan_in: n } });
                params.extend(ln("ln1"));
                params.extend(lin("attn.qkv", 3 * d, d));
                params.extend(lin("attn.proj", d, d));
                params.extend(ln("ln2"));
                params.extend(lin("mlp.0", hidden, d));
                params.extend(lin("mlp.2", d, hidden));
                // Kept for backward: ln1, qkv, attention out, x1, ln2 (d each... 3d), the MLP's
                // hidden twice, and the attention's probabilities.
                let per_pos = d.checked_mul(7).and_then(|a| a.checked_add(hidden.checked_mul(2)?)).ok_or_else(too_large)?;
                scratch = t.checked_mul(per_pos).and_then(|a| a.checked_add(heads.checked_mul(t)?.checked_mul(t)?)).ok_or_else(too_large)?;
                shape.clone()
            }
            LayerSpec::Conv2d { out: o, kernel: k, stride, padding: p, bias } => {
                let (c, h, w) = image(&shape, "expects").map_err(err)?;
                let pad = p.checked_mul(2).ok_or_else(too_large)?;
                let (hp, wp) = (h.checked_add(pad).ok_or_else(too_large)?, w.checked_add(pad).ok_or_else(too_large)?);
                if k > hp || k > wp {
                    let padded = if p > 0 { format!(" (padded by {p}: {hp}x{wp})") } else { String::new() };
                    return Err(err(format!("kernel {k} is larger than the input {h}x{w}{padded} of {shape:?}")));
                }
                let (ho, wo) = (windows(hp, k, stride), windows(wp, k, stride));
                let fan_in = numel(&[c, k, k]).ok_or_else(too_large)?;
                params.push(uniform("weight", vec![o, c, k, k], fan_in));
                if bias {
                    params.push(uniform("bias", vec![o], fan_in));
                }
                scratch = numel(&[fan_in, ho, wo]).ok_or_else(too_large)?;
                vec![o, ho, wo]
            }
            LayerSpec::MaxPool2d { kernel: k, stride } | LayerSpec::AvgPool2d { kernel: k, stride } => {
                let (c, h, w) = image(&shape, "expects").map_err(err)?;
                if k > h || k > w {
                    return Err(err(format!("kernel {k} is larger than the input {h}x{w} of {shape:?}")));
                }
                let s = stride.unwrap_or(k);
                vec![c, windows(h, k, s), windows(w, k, s)]
            }
            LayerSpec::Flatten => vec![numel(&shape).ok_or_else(too_large)?],
            LayerSpec::Relu | LayerSpec::Gelu | LayerSpec::Tanh | LayerSpec::Sigmoid | LayerSpec::Dropout { .. } => shape.clone(),
            LayerSpec::LayerNorm { over, .. } => {
                let normalized = match over {
                    NormOver::Last => vec![*shape.last().expect("shapes are never empty")],
                    NormOver::Chw => {
                        let (c, h, w) = image(&shape, "over = \"chw\" expects").map_err(|e| err(format!("{e}; use over = \"last\"")))?;
                        vec![c, h, w]
                    }
                };
                for (name, init) in [("weight", ParamInit::Ones), ("bias", ParamInit::Zeros)] {
                    params.push(ParamShape { name: format!("{i}.{name}"), shape: normalized.clone(), init });
                }
                shape.clone()
            }
        };
        if output.contains(&0) {
            return Err(err(format!("gives an empty output {output:?} from {shape:?}")));
        }
        for p in &params {
            numel(&p.shape).ok_or_else(too_large)?;
        }
        let floats = numel(&output).ok_or_else(too_large)?.max(numel(&shape).unwrap_or(u64::MAX)).max(scratch);
        out.push(LayerShape { index: i, layer: layer.clone(), input: std::mem::replace(&mut shape, output.clone()), output, params, activation_floats: floats });
    }
    Ok(out)
}

/// What a model's output is read as: logits over a dataset's classes (cross-entropy), a
/// regression's float targets of some width (mean squared error), or a language model's
/// logits over its vocabulary at each of `context` positions (per-token cross-entropy
/// against the next token).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Head {
    Classes(u64),
    Targets(u64),
    Tokens { vocab: u64, context: u64 },
}

impl Head {
    /// Values the model gives per position: per record, except `Tokens`, which gives this
    /// many at each of its `context` positions.
    pub fn outputs(self) -> u64 {
        match self {
            Head::Classes(n) | Head::Targets(n) | Head::Tokens { vocab: n, .. } => n,
        }
    }

    /// Positions per record: a language model's context, else 1.
    pub fn positions(self) -> u64 {
        match self {
            Head::Tokens { context, .. } => context,
            _ => 1,
        }
    }

    /// The head for a dataset of `classes` classes, targets of `target_width` (0: it has
    /// class labels) or text windows of `context` tokens (0: not text) trained with `loss`;
    /// an error says what does not match.
    pub fn of(loss: crate::spec::Loss, classes: u64, target_width: u64, context: u64) -> Result<Head, String> {
        use crate::spec::Loss;
        if context > 0 {
            return match loss {
                Loss::CrossEntropy => Ok(Head::Tokens { vocab: classes, context }),
                Loss::Mse => Err("training.loss: \"mse\" needs float targets, but the dataset is text (the model predicts each next token): use loss = \"cross_entropy\"".into()),
            };
        }
        match (loss, target_width) {
            (Loss::CrossEntropy, 0) => Ok(Head::Classes(classes)),
            (Loss::Mse, w) if w > 0 => Ok(Head::Targets(w)),
            (Loss::CrossEntropy, w) => Err(format!(
                "training.loss: the dataset has float targets ({w} per record), not class labels; set loss = \"mse\" for a regression (class labels are imported from an integer y: save y as integers, or a CSV column with --label)"
            )),
            (Loss::Mse, _) => Err(format!(
                "training.loss: \"mse\" needs float targets, but the dataset has class labels ({classes} classes); import a regression target with `--target COL` (CSV) or a float y, or use loss = \"cross_entropy\""
            )),
        }
    }
}

/// A plain number is a classifier's number of classes.
impl From<u64> for Head {
    fn from(classes: u64) -> Head {
        Head::Classes(classes)
    }
}

/// Checks that the model gives one logit per class (the last layer's output is `[classes]`;
/// for a linear last layer, its `out` is the dataset's number of classes), or one value per
/// target.
pub fn check_output(shapes: &[LayerShape], head: Head) -> Result<(), ShapeError> {
    let Some(last) = shapes.last() else { return Err(ShapeError::model("has no layers")) };
    let classes = match head {
        Head::Classes(c) => c,
        Head::Tokens { vocab, context } => {
            if last.output == [context, vocab] {
                return Ok(());
            }
            let detail = match (&last.layer, &last.output[..]) {
                (LayerSpec::Linear { out, .. }, [_, _]) => format!("the last layer gives {out} outputs per position, but the vocabulary has {vocab} tokens; set out = {vocab}"),
                (_, o) => format!("the model's output is {o:?}, but a language model's must be [{context}, {vocab}] (the next token's logits at every position); end with a linear of out = {vocab}"),
            };
            return Err(ShapeError::at(last.index, &last.layer, detail));
        }
        Head::Targets(w) => {
            if last.output == [w] {
                return Ok(());
            }
            let detail = match (&last.layer, &last.output[..]) {
                (LayerSpec::Linear { out, .. }, _) => format!("the last layer gives {out} outputs, but the dataset has {w} target(s) per record; set out = {w}"),
                (_, o) => format!("the model's output is {o:?}, but it must be [{w}] (one value per target); end with a linear of out = {w}"),
            };
            return Err(ShapeError::at(last.index, &last.layer, detail));
        }
    };
    if classes < 2 {
        return Err(ShapeError::model(format!("a classifier needs at least 2 classes, the dataset has {classes}")));
    }
    if last.output == [classes] {
        return Ok(());
    }
    let detail = match (&last.layer, &last.output[..]) {
        (LayerSpec::Linear { out, .. }, _) => format!("the last layer gives {out} outputs, but the dataset has {classes} classes; set out = {classes}"),
        (_, [n]) => format!("the model's output is [{n}], but the dataset has {classes} classes: it needs one logit per class"),
        (_, o) => format!("the model's output is {o:?}, but it must be [{classes}] (one logit per class); end with a flatten and a linear of out = {classes}"),
    };
    Err(ShapeError::at(last.index, &last.layer, detail))
}

/// The number of parameters (saturating).
pub fn param_count(shapes: &[LayerShape]) -> u64 {
    shapes.iter().fold(0u64, |a, l| a.saturating_add(l.param_count()))
}

/// The largest buffer any layer needs per record, in floats (what `crate::limits` multiplies
/// by a rank's share of the batch).
pub fn activation_floats(shapes: &[LayerShape]) -> u64 {
    shapes.iter().map(|l| l.activation_floats).max().unwrap_or(0)
}

/// Every layer's output floats per record, summed (what a backward pass keeps between the
/// forward and the backward, besides the input).
pub fn kept_activation_floats(shapes: &[LayerShape]) -> u64 {
    shapes.iter().fold(0u64, |a, l| a.saturating_add(l.output.iter().fold(1u64, |x, &d| x.saturating_mul(d))))
}

/// A model's layers with their shapes, for records of a dataset's `feature_shape` and
/// `classes`: what the coordinator checks at submission and the worker lays out.
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    /// The preset the layers expand, or None for a layer list.
    pub preset: Option<ModelKind>,
    /// The model's input per record (`input_shape`).
    pub input: Vec<u64>,
    pub layers: Vec<LayerSpec>,
    /// One per layer.
    pub shapes: Vec<LayerShape>,
}

impl Layout {
    /// `spec`'s layers (`ModelSpec::layer_list`), their shapes (`infer`) and the output
    /// check (`check_output`) for `head` (a number: a classifier's classes).
    pub fn new(spec: &ModelSpec, feature_shape: &[u64], head: impl Into<Head>) -> Result<Layout, ShapeError> {
        let head = head.into();
        let classes = head.outputs();
        let preset = spec.preset();
        if feature_shape.contains(&0) {
            return Err(ShapeError::model(format!("records of shape {feature_shape:?} hold no values")));
        }
        let layers = spec.layer_list(feature_shape, classes).map_err(|e| ShapeError {
            layer: None,
            preset: None,
            detail: match e {
                crate::CoreError::Spec(m) => m,
                other => other.to_string(),
            },
        })?;
        let mark = |e: ShapeError| match preset {
            Some(p) => e.in_preset(p),
            None => e,
        };
        let (input, vocab) = match head {
            Head::Tokens { vocab, context } => {
                if feature_shape != [context + 1] {
                    return Err(ShapeError::model(format!("text records of shape {feature_shape:?} are not windows of context + 1 = {} tokens", context + 1)));
                }
                if let Some(c) = spec.context.filter(|&c| c != context) {
                    return Err(ShapeError::model(format!("model.context = {c}, but the dataset's windows are {context} tokens (its --context): set context = {context} or leave it out")));
                }
                (vec![context], Some(vocab))
            }
            _ => {
                if preset == Some(ModelKind::Gpt) {
                    return Err(ShapeError::model("model: kind = \"gpt\" trains on a text dataset (`shoal data import NAME FILES --format text --context N`); this one holds records of features and labels"));
                }
                (input_shape(feature_shape, preset == Some(ModelKind::Mlp)), None)
            }
        };
        let shapes = infer_with_vocab(&layers, &input, vocab).map_err(mark)?;
        check_output(&shapes, head).map_err(mark)?;
        Ok(Layout { preset, input, layers, shapes })
    }

    /// Every parameter tensor, in layout order (layer by layer, weight before bias).
    pub fn params(&self) -> impl Iterator<Item = &ParamShape> {
        self.shapes.iter().flat_map(|l| &l.params)
    }

    pub fn param_count(&self) -> u64 {
        param_count(&self.shapes)
    }

    pub fn activation_floats(&self) -> u64 {
        activation_floats(&self.shapes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::JobSpec;

    fn spec(model: &str) -> ModelSpec {
        JobSpec::parse(&format!(
            "name = \"t\"\n[model]\n{model}\n[dataset]\nname = \"d\"\ntrain = [0, 1000]\n[training]\nepochs = 1\nbatch_size = 8\n\
             [training.optimizer]\nkind = \"sgd\"\nlr = 0.1\n"
        ))
        .unwrap_or_else(|e| panic!("{e}"))
        .model
    }

    /// (name, shape, fan_in) of every parameter, in layout order.
    fn params(l: &Layout) -> Vec<(String, Vec<u64>, Option<u64>)> {
        l.params().map(|p| (p.name.clone(), p.shape.clone(), p.fan_in())).collect()
    }

    fn p(name: &str, shape: &[u64], fan_in: u64) -> (String, Vec<u64>, Option<u64>) {
        (name.to_string(), shape.to_vec(), Some(fan_in))
    }

    fn layers(list: &[&str]) -> String {
        list.iter().map(|l| format!("[[model.layers]]\n{}\n", l.replace("; ", "\n"))).collect()
    }

    #[test]
    fn input_shape_rule() {
        assert_eq!(input_shape(&[28, 28], true), [784]);
        assert_eq!(input_shape(&[3, 32, 32], true), [3072]);
        assert_eq!(input_shape(&[13], true), [13]);
        assert_eq!(input_shape(&[13], false), [13]);
        assert_eq!(input_shape(&[28, 28], false), [1, 28, 28]);
        assert_eq!(input_shape(&[3, 32, 32], false), [3, 32, 32]);
        assert_eq!(input_shape(&[], false), [1]);
        assert_eq!(input_shape(&[2, 3, 4, 5], false), [2, 3, 4, 5]);
    }

    /// worker::model::Model::new's layout (conv1, conv2, fc0, fc1, ...), renamed by its
    /// `pytorch_name`: the presets must lay out exactly these tensors, in this order.
    #[test]
    fn presets_expand_to_todays_layouts() {
        // The demo MLP: 784-512-256-10, dense layer i is module 2i.
        let mlp = Layout::new(&spec("kind = \"mlp\""), &[28, 28], 10).unwrap();
        assert_eq!(mlp.input, [784]);
        assert_eq!(
            params(&mlp),
            [
                p("0.weight", &[512, 784], 784),
                p("0.bias", &[512], 784),
                p("2.weight", &[256, 512], 512),
                p("2.bias", &[256], 512),
                p("4.weight", &[10, 256], 256),
                p("4.bias", &[10], 256),
            ]
        );
        assert_eq!(mlp.param_count(), 535_818);
        let kinds: Vec<_> = mlp.layers.iter().map(LayerSpec::kind_name).collect();
        assert_eq!(kinds, ["linear", "relu", "linear", "relu", "linear"]);
        // worker/src/model.rs's own test: hidden [8, 4] on [2, 3], 3 classes.
        let small = Layout::new(&spec("kind = \"mlp\"\nhidden = [8, 4]"), &[2, 3], 3).unwrap();
        assert_eq!(params(&small), [p("0.weight", &[8, 6], 6), p("0.bias", &[8], 6), p("2.weight", &[4, 8], 8), p("2.bias", &[4], 8), p("4.weight", &[3, 4], 4), p("4.bias", &[3], 4)]);

        // The CNN example: convs 0 and 3, dense 7 and 9.
        let cnn = Layout::new(&spec("kind = \"cnn\""), &[28, 28], 10).unwrap();
        assert_eq!(cnn.input, [1, 28, 28]);
        assert_eq!(
            params(&cnn),
            [
                p("0.weight", &[32, 1, 3, 3], 9),
                p("0.bias", &[32], 9),
                p("3.weight", &[64, 32, 3, 3], 288),
                p("3.bias", &[64], 288),
                p("7.weight", &[128, 3136], 3136),
                p("7.bias", &[128], 3136),
                p("9.weight", &[10, 128], 128),
                p("9.bias", &[10], 128),
            ]
        );
        assert_eq!(cnn.param_count(), 421_642);
        let kinds: Vec<_> = cnn.layers.iter().map(LayerSpec::kind_name).collect();
        assert_eq!(kinds, ["conv2d", "relu", "maxpool2d", "conv2d", "relu", "maxpool2d", "flatten", "linear", "relu", "linear"]);
        assert_eq!(cnn.layers[0], LayerSpec::Conv2d { out: 32, kernel: 3, stride: 1, padding: 1, bias: true });
        assert_eq!(cnn.layers[2], LayerSpec::MaxPool2d { kernel: 2, stride: None });
        let out: Vec<_> = cnn.shapes.iter().map(|s| s.output.clone()).collect();
        assert_eq!(out[2], [32, 14, 14]);
        assert_eq!(out[5], [64, 7, 7]);
        assert_eq!(out[6], [3136]);
        // worker/src/model.rs's test: channels [2, 3], hidden [6] on 8x8 (odd sizes floor
        // like today's h / 2 / 2: 9x9 gives 2x2).
        let c = Layout::new(&spec("kind = \"cnn\"\nhidden = [6]\nchannels = [2, 3]"), &[9, 9], 3).unwrap();
        assert_eq!(
            params(&c),
            [p("0.weight", &[2, 1, 3, 3], 9), p("0.bias", &[2], 9), p("3.weight", &[3, 2, 3, 3], 18), p("3.bias", &[3], 18), p("7.weight", &[6, 12], 12), p("7.bias", &[6], 12), p("9.weight", &[3, 6], 6), p("9.bias", &[3], 6)]
        );
        // Written out as a layer list, the CNN preset is the same model.
        let written = spec(&layers(&[
            "kind = \"conv2d\"; out = 32; kernel = 3; padding = 1",
            "kind = \"relu\"",
            "kind = \"maxpool2d\"; kernel = 2",
            "kind = \"conv2d\"; out = 64; kernel = 3; padding = 1",
            "kind = \"relu\"",
            "kind = \"maxpool2d\"; kernel = 2",
            "kind = \"flatten\"",
            "kind = \"linear\"; out = 128",
            "kind = \"relu\"",
            "kind = \"linear\"; out = 10",
        ]));
        let w = Layout::new(&written, &[28, 28], 10).unwrap();
        assert_eq!((w.preset, &w.layers, &w.shapes), (None, &cnn.layers, &cnn.shapes));
        // The CNN preset on a too small image fails like today's 4x4 minimum.
        let e = Layout::new(&spec("kind = \"cnn\""), &[3, 3], 10).unwrap_err().to_string();
        assert_eq!(e, "model (kind = \"cnn\", layer 5: maxpool2d): kernel 2 is larger than the input 1x1 of [64, 1, 1]");
        assert!(Layout::new(&spec("kind = \"cnn\""), &[4, 4], 10).is_ok());
        // An invalid [model] (a struct literal: a parsed spec is valid) keeps its key.
        let e = Layout::new(&ModelSpec::default(), &[4, 4], 10).unwrap_err().to_string();
        assert!(e.starts_with("model.layers: kind = \"sequential\" (the default) needs a list of layers"), "{e}");
    }

    #[test]
    fn five_wrong_specs_name_the_layer_and_the_shapes() {
        let err = |list: &[&str], feature: &[u64], classes: u64| Layout::new(&spec(&layers(list)), feature, classes).unwrap_err().to_string();
        // A linear layer on an image without a flatten.
        let e = err(
            &[
                "kind = \"conv2d\"; out = 32; kernel = 3; padding = 1",
                "kind = \"relu\"",
                "kind = \"maxpool2d\"; kernel = 2",
                "kind = \"maxpool2d\"; kernel = 2",
                "kind = \"linear\"; out = 10",
            ],
            &[28, 28],
            10,
        );
        assert_eq!(e, "model.layers[4] (linear): expects [features] or a sequence [positions, features], got [32, 7, 7]; add a flatten");
        // A convolution on flat (tabular) features.
        let e = err(&["kind = \"conv2d\"; out = 8; kernel = 3", "kind = \"flatten\"", "kind = \"linear\"; out = 3"], &[13], 3);
        assert!(e.starts_with("model.layers[0] (conv2d): expects an image [channels, height, width], got [13]"), "{e}");
        // A kernel of 5 on a 3x3 input.
        let e = err(&["kind = \"conv2d\"; out = 4; kernel = 5", "kind = \"flatten\"", "kind = \"linear\"; out = 2"], &[3, 3], 2);
        assert_eq!(e, "model.layers[0] (conv2d): kernel 5 is larger than the input 3x3 of [1, 3, 3]");
        let e = err(&["kind = \"conv2d\"; out = 4; kernel = 3; stride = 2", "kind = \"conv2d\"; out = 4; kernel = 5; padding = 1", "kind = \"flatten\"", "kind = \"linear\"; out = 2"], &[5, 5], 2);
        assert_eq!(e, "model.layers[1] (conv2d): kernel 5 is larger than the input 2x2 (padded by 1: 4x4) of [4, 2, 2]");
        // The last layer with the wrong number of classes.
        let e = err(&["kind = \"flatten\"", "kind = \"linear\"; out = 64", "kind = \"relu\"", "kind = \"linear\"; out = 12"], &[28, 28], 10);
        assert_eq!(e, "model.layers[3] (linear): the last layer gives 12 outputs, but the dataset has 10 classes; set out = 10");
        let e = err(&["kind = \"conv2d\"; out = 4; kernel = 3"], &[28, 28], 10);
        assert!(e.starts_with("model.layers[0] (conv2d): the model's output is [4, 26, 26], but it must be [10]"), "{e}");
        // layernorm over an image's C, H, W on flat features.
        let e = err(&["kind = \"linear\"; out = 16", "kind = \"layernorm\"; over = \"chw\"", "kind = \"linear\"; out = 3"], &[13], 3);
        assert!(e.starts_with("model.layers[1] (layernorm): over = \"chw\" expects an image [channels, height, width], got [16]"), "{e}");
        // A pool on a flat vector, after a flatten.
        let e = err(&["kind = \"flatten\"", "kind = \"avgpool2d\"; kernel = 2", "kind = \"linear\"; out = 3"], &[8, 8], 3);
        assert!(e.starts_with("model.layers[1] (avgpool2d): expects an image [channels, height, width], got [64]"), "{e}");
        // Records without values, a classifier of one class.
        let e = Layout::new(&spec("kind = \"mlp\""), &[0, 5], 10).unwrap_err().to_string();
        assert_eq!(e, "model: records of shape [0, 5] hold no values");
        let e = Layout::new(&spec(&layers(&["kind = \"linear\"; out = 1"])), &[4], 1).unwrap_err().to_string();
        assert!(e.starts_with("model: a classifier needs at least 2 classes"), "{e}");
        // batchnorm2d is refused when parsing: the fifth wrong spec (see spec's tests too).
        let e = JobSpec::parse(&format!(
            "name = \"t\"\n[model]\n{}[dataset]\nname = \"d\"\ntrain = [0, 10]\n[training]\nepochs = 1\nbatch_size = 8\n[training.optimizer]\nkind = \"sgd\"\nlr = 0.1\n",
            layers(&["kind = \"conv2d\"; out = 4; kernel = 3", "kind = \"batchnorm2d\"", "kind = \"flatten\"", "kind = \"linear\"; out = 2"])
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("model.layers[1] (batchnorm2d): not supported") && e.contains("synchronized across the ranks"), "{e}");
    }

    #[test]
    fn three_conv_blocks_infer_shapes_and_parameters() {
        let mut list = Vec::new();
        for c in [32, 64, 128] {
            list.push(format!("kind = \"conv2d\"; out = {c}; kernel = 3; padding = 1"));
            list.push("kind = \"relu\"".into());
            list.push("kind = \"maxpool2d\"; kernel = 2".into());
        }
        list.push("kind = \"dropout\"; p = 0.25".into());
        list.push("kind = \"layernorm\"; over = \"chw\"".into());
        list.push("kind = \"flatten\"".into());
        list.push("kind = \"linear\"; out = 256".into());
        list.push("kind = \"gelu\"".into());
        list.push("kind = \"layernorm\"".into());
        list.push("kind = \"dropout\"; p = 0.5".into());
        list.push("kind = \"linear\"; out = 10".into());
        let list: Vec<&str> = list.iter().map(String::as_str).collect();
        let l = Layout::new(&spec(&layers(&list)), &[1, 28, 28], 10).unwrap();
        let shapes: Vec<(&str, Vec<u64>)> = l.shapes.iter().map(|s| (s.kind(), s.output.clone())).collect();
        let want: Vec<(&str, Vec<u64>)> = vec![
            ("conv2d", vec![32, 28, 28]),
            ("relu", vec![32, 28, 28]),
            ("maxpool2d", vec![32, 14, 14]),
            ("conv2d", vec![64, 14, 14]),
            ("relu", vec![64, 14, 14]),
            ("maxpool2d", vec![64, 7, 7]),
            ("conv2d", vec![128, 7, 7]),
            ("relu", vec![128, 7, 7]),
            ("maxpool2d", vec![128, 3, 3]),
            ("dropout", vec![128, 3, 3]),
            ("layernorm", vec![128, 3, 3]),
            ("flatten", vec![1152]),
            ("linear", vec![256]),
            ("gelu", vec![256]),
            ("layernorm", vec![256]),
            ("dropout", vec![256]),
            ("linear", vec![10]),
        ];
        assert_eq!(shapes, want);
        assert_eq!(l.shapes[0].input, [1, 28, 28]);
        let names: Vec<_> = l.params().map(|p| (p.name.as_str(), p.shape.clone(), p.init)).collect();
        use ParamInit::*;
        assert_eq!(
            names,
            [
                ("0.weight", vec![32, 1, 3, 3], Uniform { fan_in: 9 }),
                ("0.bias", vec![32], Uniform { fan_in: 9 }),
                ("3.weight", vec![64, 32, 3, 3], Uniform { fan_in: 288 }),
                ("3.bias", vec![64], Uniform { fan_in: 288 }),
                ("6.weight", vec![128, 64, 3, 3], Uniform { fan_in: 576 }),
                ("6.bias", vec![128], Uniform { fan_in: 576 }),
                ("10.weight", vec![128, 3, 3], Ones),
                ("10.bias", vec![128, 3, 3], Zeros),
                ("12.weight", vec![256, 1152], Uniform { fan_in: 1152 }),
                ("12.bias", vec![256], Uniform { fan_in: 1152 }),
                ("14.weight", vec![256], Ones),
                ("14.bias", vec![256], Zeros),
                ("16.weight", vec![10, 256], Uniform { fan_in: 256 }),
                ("16.bias", vec![10], Uniform { fan_in: 256 }),
            ]
        );
        let convs = (32 * 9 + 32) + (64 * 32 * 9 + 64) + (128 * 64 * 9 + 128);
        let want = convs + 2 * 1152 + (256 * 1152 + 256) + 2 * 256 + (10 * 256 + 10);
        assert_eq!(l.param_count(), want);
        assert_eq!(want, 393_226);
        // The largest buffer: the second conv's im2col, 32*9 x 14*14.
        assert_eq!(l.activation_floats(), 32 * 9 * 14 * 14);
        // The same on [28, 28] records (a 1-channel image by the rule); 3 channels widen only
        // the first convolution.
        assert_eq!(Layout::new(&spec(&layers(&list)), &[28, 28], 10).unwrap().shapes, l.shapes);
        let rgb = Layout::new(&spec(&layers(&list)), &[3, 28, 28], 10).unwrap();
        assert_eq!(rgb.params().next().unwrap().shape, [32, 3, 3, 3]);
        assert_eq!(rgb.param_count(), want + 2 * 32 * 9);
    }

    #[test]
    fn strides_padding_and_bias_free_layers() {
        let list = layers(&[
            "kind = \"conv2d\"; out = 5; kernel = 5; stride = 2; padding = 1; bias = false",
            "kind = \"avgpool2d\"; kernel = 3; stride = 1",
            "kind = \"maxpool2d\"; kernel = 2",
            "kind = \"tanh\"",
            "kind = \"flatten\"",
            "kind = \"linear\"; out = 3; bias = false",
            "kind = \"sigmoid\"",
        ]);
        let l = Layout::new(&spec(&list), &[2, 13, 11], 3).unwrap();
        // (13 + 2 - 5) / 2 + 1 = 6, (11 + 2 - 5) / 2 + 1 = 5; avg 3/1: 4x3; max 2: 2x1.
        let out: Vec<_> = l.shapes.iter().map(|s| s.output.clone()).collect();
        assert_eq!(out, [vec![5, 6, 5], vec![5, 4, 3], vec![5, 2, 1], vec![5, 2, 1], vec![10], vec![3], vec![3]]);
        assert_eq!(params(&l), [p("0.weight", &[5, 2, 5, 5], 50), p("5.weight", &[3, 10], 10)]);
        assert_eq!(l.shapes[0].activation_floats, 50 * 6 * 5);
        assert_eq!(kept_activation_floats(&l.shapes), 150 + 60 + 10 + 10 + 10 + 3 + 3);
    }

    #[test]
    fn the_gpt_preset_lays_out_a_decoder_over_the_text_windows() {
        let s = spec("kind = \"gpt\"\nblocks = 2\nheads = 4\nd_model = 64\ncontext = 64");
        let tokens = Head::Tokens { vocab: 256, context: 64 };
        let l = Layout::new(&s, &[65], tokens).unwrap();
        assert_eq!(l.preset, Some(ModelKind::Gpt));
        let kinds: Vec<_> = l.shapes.iter().map(|s| s.kind()).collect();
        assert_eq!(kinds, ["embedding", "position_embedding", "transformer_block", "transformer_block", "layernorm", "linear"]);
        assert_eq!((l.input.clone(), l.shapes.last().unwrap().output.clone()), (vec![64], vec![64, 256]));
        let block = 2 * 64 + (3 * 64 * 64 + 3 * 64) + (64 * 64 + 64) + 2 * 64 + (256 * 64 + 256) + (64 * 256 + 64);
        assert_eq!(l.param_count(), 256 * 64 + 64 * 64 + 2 * block + 2 * 64 + 256 * 64);
        let names: Vec<_> = l.shapes[2].params.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names[..4], ["2.ln1.weight", "2.ln1.bias", "2.attn.qkv.weight", "2.attn.qkv.bias"]);
        assert_eq!(names[8..], ["2.mlp.0.weight", "2.mlp.0.bias", "2.mlp.2.weight", "2.mlp.2.bias"]);
        // Errors name what does not fit.
        let e = Layout::new(&s, &[33], Head::Tokens { vocab: 256, context: 32 }).unwrap_err().to_string();
        assert!(e.contains("model.context = 64") && e.contains("32 tokens"), "{e}");
        let e = Layout::new(&s, &[28, 28], 10).unwrap_err().to_string();
        assert!(e.contains("text dataset") && e.contains("--format text"), "{e}");
        let bad = crate::spec::JobSpec::parse("name = \"t\"\n[model]\nkind = \"gpt\"\nd_model = 30\nheads = 4\n[dataset]\nname = \"d\"\n[training]\nepochs = 1\nbatch_size = 8\n[training.optimizer]\nkind = \"sgd\"\nlr = 0.1\n");
        let e = bad.unwrap_err().to_string();
        assert!(e.contains("model.d_model") && e.contains("multiple of heads"), "{e}");
        let bad = crate::spec::JobSpec::parse("name = \"t\"\n[model]\nkind = \"mlp\"\nblocks = 2\n[dataset]\nname = \"d\"\n[training]\nepochs = 1\nbatch_size = 8\n[training.optimizer]\nkind = \"sgd\"\nlr = 0.1\n");
        assert!(bad.unwrap_err().to_string().contains("model.blocks"));
        // An embedding reads token ids: it must come first, on a sequence of ids.
        let list = layers(&["kind = \"linear\"; out = 4", "kind = \"embedding\"; dim = 4"]);
        let e = Layout::new(&spec(&list), &[9], Head::Tokens { vocab: 256, context: 8 }).unwrap_err().to_string();
        assert!(e.contains("model.layers[1] (embedding)"), "{e}");
        // An embedding with fewer rows than the data has token values.
        let list = layers(&["kind = \"embedding\"; dim = 4; vocab = 100", "kind = \"linear\"; out = 256"]);
        let e = Layout::new(&spec(&list), &[9], Head::Tokens { vocab: 256, context: 8 }).unwrap_err().to_string();
        assert!(e.contains("vocab = 100") && e.contains("256"), "{e}");
        // A linear head over the vocabulary that is too narrow.
        let list = layers(&["kind = \"embedding\"; dim = 4", "kind = \"linear\"; out = 100"]);
        let e = Layout::new(&spec(&list), &[9], Head::Tokens { vocab: 256, context: 8 }).unwrap_err().to_string();
        assert!(e.contains("out = 256"), "{e}");
    }
}
