//! The job spec: a TOML file that names the model, the dataset and its record ranges, the
//! training settings and the number of workers. Unknown keys and invalid values are rejected
//! with an error that names the key.

use serde::{Deserialize, Serialize};

use crate::{CoreError, Result};

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub name: String,
    /// `"train"` (the default); batch jobs are `shoal_core::batch::BatchSpec`.
    pub kind: Option<String>,
    /// The experiment the run belongs to (`job list --group`).
    pub group: Option<String>,
    /// Labels of the run, shown with it.
    #[serde(default)]
    pub tags: Vec<String>,
    pub model: ModelSpec,
    pub dataset: DatasetRef,
    pub training: TrainingSpec,
    #[serde(default)]
    pub cluster: ClusterSpec,
    #[serde(default)]
    pub checkpoint: CheckpointSpec,
    #[serde(default)]
    pub aggregation: AggregationSpec,
    /// Warm start: the parameters to begin from.
    pub init: Option<InitSpec>,
    /// `[register] name = "NAME"`: on success the job's model becomes a new version of NAME.
    pub register: Option<RegisterSpec>,
    /// `[trigger] on_append = "DATASET"`: for `shoal job schedule`.
    pub trigger: Option<TriggerSpec>,
    /// `[promote]`: the evaluation gate of the registered model.
    pub promote: Option<PromoteSpec>,
    /// `[notify]`: a webhook told when the job fails, diverges, stalls or succeeds.
    pub notify: Option<NotifySpec>,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifySpec {
    /// `http://HOST:PORT/PATH`: each event is POSTed there as JSON.
    pub webhook: String,
    /// A running job with no step for this many seconds has stalled (default 300).
    #[serde(default = "default_stall_s")]
    pub stall_s: u64,
}

fn default_stall_s() -> u64 {
    300
}

impl NotifySpec {
    /// The webhook's `HOST:PORT` and path (`/` when none).
    pub fn target(&self) -> Option<(String, String)> {
        let rest = self.webhook.strip_prefix("http://")?;
        let (host, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (name, port) = host.rsplit_once(':')?;
        (!name.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) && path.chars().all(|c| c.is_ascii_graphic())).then(|| (host.to_string(), path.to_string()))
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromoteSpec {
    /// The alias of the `[register]` model to move to the new version if it passes.
    pub alias: String,
    /// `test_accuracy` or `test_r2` (higher is better), `test_loss` or `test_rmse` (lower is
    /// better), on the holdout records.
    #[serde(default = "default_metric")]
    pub metric: String,
    /// The candidate must score at least the holder's plus this.
    #[serde(default)]
    pub min_delta: f64,
    /// `"DATASET"` or `"DATASET@VERSION"`: its records are the holdout, scored for both.
    pub holdout: String,
}

fn default_metric() -> String {
    "test_accuracy".into()
}

/// Whether a larger value of `[promote] metric` is better (None: not a metric the gate knows).
/// `min_delta` is read in the metric's direction: the candidate must beat the holder by it.
pub fn metric_higher_is_better(metric: &str) -> Option<bool> {
    match metric {
        "test_accuracy" | "test_r2" => Some(true),
        "test_loss" | "test_rmse" | "test_bpb" => Some(false),
        _ => None,
    }
}

impl PromoteSpec {
    /// (dataset, version; None: the latest at submission).
    pub fn holdout_ref(&self) -> Result<(String, Option<u64>)> {
        match self.holdout.split_once('@') {
            Some((n, v)) => Ok((n.to_string(), Some(v.parse().map_err(|_| bad("promote.holdout", format!("{:?} is not DATASET or DATASET@VERSION", self.holdout)))?))),
            None => Ok((self.holdout.clone(), None)),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerSpec {
    /// Every new version of this dataset starts one job from the template.
    pub on_append: String,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterSpec {
    pub name: String,
}

/// `[init]`: where a job's parameters start (its optimizer starts fresh).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitSpec {
    /// `"JOB"` (that job's model: its final checkpoint) or `"JOB@STEP"` (a committed checkpoint
    /// of a job that succeeded).
    pub checkpoint: Option<String>,
    /// `"NAME@VERSION"` or `"NAME@ALIAS"` of the model registry.
    pub model: Option<String>,
}

/// Salt of the replay sample's permutation (epochs, numbered below 2^32, use their own numbers).
const REPLAY_TAG: u64 = 1 << 48;

/// The preset architectures (`[model] kind = "mlp" | "cnn"`), which expand to layer lists
/// (`ModelSpec::layer_list`). A spec with `[[model.layers]]` is neither (`ModelSpec::preset`
/// is None).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelKind {
    Mlp,
    Cnn,
    /// A GPT-style decoder over a text dataset's byte tokens.
    Gpt,
}

impl ModelKind {
    /// `mlp` or `cnn`, as in the spec.
    pub fn name(self) -> &'static str {
        match self {
            ModelKind::Mlp => "mlp",
            ModelKind::Cnn => "cnn",
            ModelKind::Gpt => "gpt",
        }
    }
}

/// Errors of the `[model]` section and its layer list: `CoreError::Spec`, naming the key.
pub type SpecError = CoreError;

/// `[model]`: a preset (`kind = "mlp"` or `"cnn"`, sized by `hidden` and `channels`) or a list
/// of layers (`[[model.layers]]`, with `kind = "sequential"` or no kind) that mirrors
/// `torch.nn.Sequential` one to one: layer i is module i, so its tensors are `i.weight` and
/// `i.bias`. `layer_list` gives either as a list; `crate::model::Layout` infers its shapes.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// `mlp`, `cnn` (presets) or `sequential` (the default: needs `layers`).
    #[serde(default = "default_model_kind")]
    pub kind: String,
    /// Hidden dense layer sizes (presets). Default: [512, 256] for mlp, [128] for cnn.
    pub hidden: Option<Vec<usize>>,
    /// Output channels of the two conv + pool blocks (cnn only). Default: [32, 64].
    pub channels: Option<Vec<usize>>,
    /// The layers, in order (`kind = "sequential"` only).
    #[serde(default, deserialize_with = "de_layers")]
    pub layers: Option<Vec<LayerSpec>>,
    /// gpt: transformer blocks (default 2).
    pub blocks: Option<u64>,
    /// gpt: attention heads per block (default 4); `d_model` must be a multiple.
    pub heads: Option<u64>,
    /// gpt: the width of every token's vector (default 64).
    pub d_model: Option<u64>,
    /// gpt: tokens per window; must equal the text dataset's `--context`.
    pub context: Option<u64>,
    /// gpt: the MLP's hidden width over d_model (default 4).
    pub mlp_ratio: Option<u64>,
    /// gpt: dropout after the embeddings and in every block (default 0).
    pub dropout: Option<f64>,
}

fn default_model_kind() -> String {
    "sequential".into()
}

impl Default for ModelSpec {
    /// A sequential model with no layers yet (invalid until `layers` is set); for struct
    /// literals: `ModelSpec { kind: "mlp".into(), hidden: Some(vec![8]), ..Default::default() }`.
    fn default() -> Self {
        ModelSpec { kind: default_model_kind(), hidden: None, channels: None, layers: None, blocks: None, heads: None, d_model: None, context: None, mlp_ratio: None, dropout: None }
    }
}

/// Widest dense layer a spec may ask for (guards against absurd allocations).
const MAX_LAYER: usize = 1 << 16;
/// Most output channels of a convolution.
const MAX_CHANNELS: u64 = 4096;
/// Largest kernel, stride and padding of a convolution or pooling window.
const MAX_WINDOW: u64 = 256;
/// Most layers in a list.
const MAX_LAYERS: usize = 256;

impl ModelSpec {
    /// The preset, or None for a layer list.
    pub fn preset(&self) -> Option<ModelKind> {
        match self.kind.as_str() {
            "mlp" => Some(ModelKind::Mlp),
            "cnn" => Some(ModelKind::Cnn),
            "gpt" => Some(ModelKind::Gpt),
            _ => None,
        }
    }

    /// The preset's kind (used by the presets' code paths; a layer list answers `Mlp`: use
    /// `preset` or `layer_list` to tell them apart).
    pub fn model_kind(&self) -> ModelKind {
        self.preset().unwrap_or(ModelKind::Mlp)
    }

    /// The presets' hidden dense layer sizes, defaults filled in.
    pub fn hidden_sizes(&self) -> Vec<usize> {
        match (&self.hidden, self.model_kind()) {
            (Some(h), _) => h.clone(),
            (None, ModelKind::Mlp) => vec![512, 256],
            (None, ModelKind::Cnn) => vec![128],
            (None, ModelKind::Gpt) => vec![],
        }
    }

    /// The cnn preset's two conv channel counts, defaults filled in.
    pub fn conv_channels(&self) -> [usize; 2] {
        match &self.channels {
            Some(c) if c.len() == 2 => [c[0], c[1]],
            _ => [32, 64],
        }
    }

    /// The model as a list of layers (what `torch.nn.Sequential` holds, in order): the
    /// user's `layers` as given, or the preset expanded. Presets (their output is `classes`
    /// logits):
    /// - mlp, hidden [h1, h2, ...]: linear(h1), relu, linear(h2), relu, ..., linear(classes),
    ///   on the record flattened (`crate::model::input_shape(_, true)`), so dense layer i is
    ///   module 2i;
    /// - cnn, channels [c1, c2], hidden [h...]: conv2d(c1, kernel 3, padding 1), relu,
    ///   maxpool2d(2), conv2d(c2, 3, padding 1), relu, maxpool2d(2), flatten, linear(h1), relu,
    ///   ..., linear(classes): convolutions are modules 0 and 3, dense layer i is 7 + 2i.
    /// - gpt, blocks B, heads H, d_model D, mlp_ratio R, dropout p: embedding(D),
    ///   position_embedding, dropout(p) (only if p > 0), B x transformer_block(H, R, p),
    ///   layernorm, linear(classes, no bias): the logits of the next token at every position.
    ///
    /// The expansion does not depend on `feature_shape` (the shapes are `crate::model`'s);
    /// it is taken so that a preset may. Errors: the `[model]` section is invalid (see
    /// `validate`; a parsed spec is already valid).
    pub fn layer_list(&self, feature_shape: &[u64], classes: u64) -> Result<Vec<LayerSpec>, SpecError> {
        let _ = feature_shape;
        self.validate()?;
        let mut list = Vec::new();
        match self.preset() {
            None => return Ok(self.layers.clone().unwrap_or_default()),
            Some(ModelKind::Gpt) => {
                let g = self.gpt();
                list.push(LayerSpec::Embedding { dim: g.d_model, vocab: None });
                list.push(LayerSpec::PositionEmbedding);
                if g.dropout > 0.0 {
                    list.push(LayerSpec::Dropout { p: g.dropout });
                }
                for _ in 0..g.blocks {
                    list.push(LayerSpec::TransformerBlock { heads: g.heads, mlp_ratio: g.mlp_ratio, dropout: g.dropout });
                }
                list.push(LayerSpec::LayerNorm { over: NormOver::Last, eps: default_eps() });
                list.push(LayerSpec::Linear { out: classes, bias: false });
                return Ok(list);
            }
            Some(ModelKind::Mlp) => {}
            Some(ModelKind::Cnn) => {
                for c in self.conv_channels() {
                    list.push(LayerSpec::Conv2d { out: c as u64, kernel: 3, stride: 1, padding: 1, bias: true });
                    list.push(LayerSpec::Relu);
                    list.push(LayerSpec::MaxPool2d { kernel: 2, stride: None });
                }
                list.push(LayerSpec::Flatten);
            }
        }
        for h in self.hidden_sizes() {
            list.push(LayerSpec::Linear { out: h as u64, bias: true });
            list.push(LayerSpec::Relu);
        }
        list.push(LayerSpec::Linear { out: classes, bias: true });
        Ok(list)
    }

    /// The gpt preset's sizes, defaults filled in.
    pub fn gpt(&self) -> GptSizes {
        GptSizes {
            blocks: self.blocks.unwrap_or(2),
            heads: self.heads.unwrap_or(4),
            d_model: self.d_model.unwrap_or(64),
            context: self.context,
            mlp_ratio: self.mlp_ratio.unwrap_or(4),
            dropout: self.dropout.unwrap_or(0.0),
        }
    }

    /// Checks the `[model]` section alone (`JobSpec::validate` calls it). Errors name the key.
    pub fn validate(&self) -> Result<()> {
        let gpt_keys = [("blocks", self.blocks.is_some()), ("heads", self.heads.is_some()), ("d_model", self.d_model.is_some()), ("context", self.context.is_some()), ("mlp_ratio", self.mlp_ratio.is_some()), ("dropout", self.dropout.is_some())];
        if self.kind != "gpt" {
            if let Some((key, _)) = gpt_keys.iter().find(|(_, set)| *set) {
                return Err(bad(&format!("model.{key}"), "applies to kind = \"gpt\" only (a layer list sets it on its transformer_block or embedding layers)"));
            }
        }
        match (self.kind.as_str(), &self.layers) {
            ("gpt", None) => {
                let g = self.gpt();
                let range = |key: &str, v: u64, lo: u64, hi: u64| {
                    if (lo..=hi).contains(&v) { Ok(()) } else { Err(bad(&format!("model.{key}"), format!("must be {lo} to {hi}, got {v}"))) }
                };
                range("blocks", g.blocks, 1, 64)?;
                range("heads", g.heads, 1, 256)?;
                range("d_model", g.d_model, 1, MAX_LAYER as u64)?;
                range("mlp_ratio", g.mlp_ratio, 1, 16)?;
                if let Some(c) = g.context {
                    range("context", c, 1, MAX_CONTEXT)?;
                }
                if !g.d_model.is_multiple_of(g.heads) {
                    return Err(bad("model.d_model", format!("{} is not a multiple of heads = {}: each head takes d_model / heads of every vector", g.d_model, g.heads)));
                }
                check_range("model.dropout", Some(g.dropout), 0.0, 1.0, false)?;
                if self.hidden.is_some() || self.channels.is_some() {
                    return Err(bad(if self.hidden.is_some() { "model.hidden" } else { "model.channels" }, "applies to kind = \"mlp\" or \"cnn\" only"));
                }
                return Ok(());
            }
            ("gpt", Some(_)) => {
                return Err(bad("model.layers", "kind = \"gpt\" is a preset and a layer list is its own model: give one or the other (a layer list is kind = \"sequential\", or no kind)"));
            }
            ("mlp" | "cnn", None) => {}
            ("mlp" | "cnn", Some(_)) => {
                return Err(bad(
                    "model.layers",
                    format!("kind = {:?} is a preset and a layer list is its own model: give one or the other (a layer list is kind = \"sequential\", or no kind)", self.kind),
                ))
            }
            ("sequential", Some(layers)) => {
                if layers.is_empty() {
                    return Err(bad("model.layers", "must hold at least one layer"));
                }
                if layers.len() > MAX_LAYERS {
                    return Err(bad("model.layers", format!("{} layers is more than the {MAX_LAYERS} supported", layers.len())));
                }
                for (i, l) in layers.iter().enumerate() {
                    l.validate(i)?;
                }
            }
            ("sequential", None) => {
                return Err(bad(
                    "model.layers",
                    "kind = \"sequential\" (the default) needs a list of layers ([[model.layers]] tables); or set kind = \"mlp\" or \"cnn\"",
                ))
            }
            (other, _) => {
                return Err(bad("model.kind", format!("unknown model kind {other:?} (expected \"mlp\", \"cnn\", \"gpt\", or \"sequential\" with [[model.layers]])")))
            }
        }
        if let Some(h) = &self.hidden {
            if self.preset().is_none() {
                return Err(bad("model.hidden", "applies to kind = \"mlp\" or \"cnn\" only (a layer list gives each linear layer's out)"));
            }
            if h.iter().any(|&n| n == 0 || n > MAX_LAYER) {
                return Err(bad("model.hidden", format!("layer sizes must be 1 to {MAX_LAYER}, got {h:?}")));
            }
            if h.len() > 64 {
                return Err(bad("model.hidden", format!("{} layers is more than the 64 supported", h.len())));
            }
        }
        if let Some(c) = &self.channels {
            if self.preset() != Some(ModelKind::Cnn) {
                return Err(bad("model.channels", "applies to kind = \"cnn\" only"));
            }
            if c.len() != 2 || c.iter().any(|&n| n == 0 || n as u64 > MAX_CHANNELS) {
                return Err(bad("model.channels", format!("must be two channel counts of 1 to {MAX_CHANNELS}, got {c:?}")));
            }
        }
        Ok(())
    }
}

/// One layer of `[[model.layers]]`, tagged by `kind`; each is the `torch.nn` module of the
/// same name (`Linear`, `Conv2d`, `MaxPool2d`, `AvgPool2d`, `Flatten`, `ReLU`, `GELU`, `Tanh`,
/// `Sigmoid`, `Dropout`, `LayerNorm`). Shapes are per record (no batch dimension); images
/// are [channels, height, width]. Unknown keys are refused, naming them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum LayerSpec {
    /// [in] -> [out] (`nn.Linear(in, out, bias)`; weight [out, in]).
    Linear {
        out: u64,
        #[serde(default = "yes")]
        bias: bool,
    },
    /// [C, H, W] -> [out, H', W'], square kernel, any number of input channels
    /// (`nn.Conv2d(C, out, kernel, stride, padding, bias)`; weight [out, C, kernel, kernel]).
    Conv2d {
        out: u64,
        kernel: u64,
        #[serde(default = "one")]
        stride: u64,
        #[serde(default)]
        padding: u64,
        #[serde(default = "yes")]
        bias: bool,
    },
    /// [C, H, W] -> [C, H', W'], windows of kernel x kernel, stride = kernel by default
    /// (`nn.MaxPool2d(kernel, stride)`, floor mode).
    #[serde(rename = "maxpool2d")]
    MaxPool2d {
        kernel: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stride: Option<u64>,
    },
    /// As `MaxPool2d`, averaging (`nn.AvgPool2d(kernel, stride)`).
    #[serde(rename = "avgpool2d")]
    AvgPool2d {
        kernel: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stride: Option<u64>,
    },
    /// Any shape -> [product] (`nn.Flatten()`).
    Flatten,
    Relu,
    /// The exact (erf) GELU, PyTorch's default.
    Gelu,
    Tanh,
    Sigmoid,
    /// Zeroes each value with probability p while training, scaling the rest by 1/(1-p); the
    /// identity when evaluating (`nn.Dropout(p)`).
    Dropout { p: f64 },
    /// Normalizes over the last dimension (`over = "last"`: `nn.LayerNorm(shape[-1], eps)`)
    /// or over a whole image (`over = "chw"`: `nn.LayerNorm([C, H, W], eps)`), with a weight
    /// (ones) and bias (zeros) of the normalized shape.
    #[serde(rename = "layernorm")]
    LayerNorm {
        #[serde(default)]
        over: NormOver,
        #[serde(default = "default_eps")]
        eps: f64,
    },
    /// Token ids [T] -> [T, dim] (`nn.Embedding(vocab, dim)`; weight [vocab, dim]). It must
    /// come first: it reads the record's tokens. `vocab` defaults to the dataset's (256 bytes).
    Embedding {
        dim: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vocab: Option<u64>,
    },
    /// [T, D] -> [T, D] plus a learned vector per position (weight [T, D]).
    #[serde(rename = "position_embedding")]
    PositionEmbedding,
    /// [T, D] -> [T, D]: x + attn(ln1(x)), then + mlp(ln2(.)): pre-LayerNorm, causal
    /// multi-head self-attention (`heads`), a GELU MLP of `mlp_ratio` x D, dropout `dropout`
    /// after the attention's projection and after the MLP.
    #[serde(rename = "transformer_block")]
    TransformerBlock {
        heads: u64,
        #[serde(default = "four")]
        mlp_ratio: u64,
        #[serde(default)]
        dropout: f64,
    },
}

/// The gpt preset's sizes (`ModelSpec::gpt`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GptSizes {
    pub blocks: u64,
    pub heads: u64,
    pub d_model: u64,
    /// None: the dataset's.
    pub context: Option<u64>,
    pub mlp_ratio: u64,
    pub dropout: f64,
}

/// Longest text window a model takes.
pub const MAX_CONTEXT: u64 = 4096;

fn four() -> u64 {
    4
}

/// What a `layernorm` normalizes over.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NormOver {
    /// The last dimension.
    #[default]
    Last,
    /// Channels, height and width of an image.
    Chw,
}

fn yes() -> bool {
    true
}

fn one() -> u64 {
    1
}

fn default_eps() -> f64 {
    1e-5
}

impl LayerSpec {
    /// Every layer kind, as spelled in a spec.
    pub const KINDS: [&'static str; 14] =
        ["linear", "conv2d", "maxpool2d", "avgpool2d", "flatten", "relu", "gelu", "tanh", "sigmoid", "dropout", "layernorm", "embedding", "position_embedding", "transformer_block"];

    /// The kind, as spelled in a spec.
    pub fn kind_name(&self) -> &'static str {
        match self {
            LayerSpec::Linear { .. } => "linear",
            LayerSpec::Conv2d { .. } => "conv2d",
            LayerSpec::MaxPool2d { .. } => "maxpool2d",
            LayerSpec::AvgPool2d { .. } => "avgpool2d",
            LayerSpec::Flatten => "flatten",
            LayerSpec::Relu => "relu",
            LayerSpec::Gelu => "gelu",
            LayerSpec::Tanh => "tanh",
            LayerSpec::Sigmoid => "sigmoid",
            LayerSpec::Dropout { .. } => "dropout",
            LayerSpec::LayerNorm { .. } => "layernorm",
            LayerSpec::Embedding { .. } => "embedding",
            LayerSpec::PositionEmbedding => "position_embedding",
            LayerSpec::TransformerBlock { .. } => "transformer_block",
        }
    }

    /// Checks the values (the keys were checked when parsing). `i`: the layer's index.
    pub fn validate(&self, i: usize) -> Result<()> {
        let range = |key: &str, v: u64, lo: u64, hi: u64| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(bad(&format!("model.layers[{i}].{key}"), format!("must be {lo} to {hi} for {}, got {v}", self.kind_name())))
            }
        };
        match *self {
            LayerSpec::Linear { out, .. } => range("out", out, 1, MAX_LAYER as u64),
            LayerSpec::Conv2d { out, kernel, stride, padding, .. } => {
                range("out", out, 1, MAX_CHANNELS)?;
                range("kernel", kernel, 1, MAX_WINDOW)?;
                range("stride", stride, 1, MAX_WINDOW)?;
                range("padding", padding, 0, MAX_WINDOW)
            }
            LayerSpec::MaxPool2d { kernel, stride } | LayerSpec::AvgPool2d { kernel, stride } => {
                range("kernel", kernel, 1, MAX_WINDOW)?;
                range("stride", stride.unwrap_or(kernel), 1, MAX_WINDOW)
            }
            LayerSpec::Dropout { p } => check_range(&format!("model.layers[{i}].p"), Some(p), 0.0, 1.0, false),
            LayerSpec::LayerNorm { eps, .. } => {
                if eps.is_finite() && eps > 0.0 && (eps as f32) > 0.0 && (eps as f32).is_finite() {
                    Ok(())
                } else {
                    Err(bad(&format!("model.layers[{i}].eps"), format!("must be a positive number (an f32), got {eps}")))
                }
            }
            LayerSpec::Embedding { dim, vocab } => {
                range("dim", dim, 1, MAX_LAYER as u64)?;
                vocab.map_or(Ok(()), |v| range("vocab", v, 2, 1 << 20))
            }
            LayerSpec::TransformerBlock { heads, mlp_ratio, dropout } => {
                range("heads", heads, 1, 256)?;
                range("mlp_ratio", mlp_ratio, 1, 16)?;
                check_range(&format!("model.layers[{i}].dropout"), Some(dropout), 0.0, 1.0, false)
            }
            LayerSpec::Flatten | LayerSpec::Relu | LayerSpec::Gelu | LayerSpec::Tanh | LayerSpec::Sigmoid | LayerSpec::PositionEmbedding => Ok(()),
        }
    }

    /// Layer `i` from its TOML table, with errors that name `model.layers[i]` and the key.
    fn from_toml(i: usize, v: toml::Value) -> std::result::Result<LayerSpec, String> {
        let at = format!("model.layers[{i}]");
        let toml::Value::Table(t) = &v else { return Err(format!("{at}: must be a table with a kind ([[model.layers]]), got {v}")) };
        let kind = match t.get("kind") {
            Some(toml::Value::String(k)) => k.as_str(),
            Some(other) => return Err(format!("{at}.kind: must be a string, got {other}")),
            None => return Err(format!("{at}: has no kind (one of {})", LayerSpec::KINDS.join(", "))),
        };
        if kind == "batchnorm2d" {
            return Err(format!(
                "{at} (batchnorm2d): not supported: its batch statistics would have to be synchronized across the ranks at every step (each rank sees only its share of the batch), which shoal does not do; use layernorm (over = \"chw\" normalizes each image over its channels and pixels)"
            ));
        }
        if !LayerSpec::KINDS.contains(&kind) {
            return Err(format!("{at}.kind: unknown layer kind {kind:?} (expected one of {})", LayerSpec::KINDS.join(", ")));
        }
        if matches!(kind, "flatten" | "relu" | "gelu" | "tanh" | "sigmoid" | "position_embedding") {
            // serde lets a unit variant's extra keys pass.
            if let Some(extra) = t.keys().find(|k| *k != "kind") {
                return Err(format!("{at} ({kind}): unknown field `{extra}` ({kind} takes no keys besides kind)"));
            }
        }
        let kind = kind.to_string();
        LayerSpec::deserialize(v).map_err(|e| format!("{at} ({kind}): {}", e.to_string().trim()))
    }
}

/// `[[model.layers]]`: each table parsed by `LayerSpec::from_toml`, so errors name the index.
fn de_layers<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<Vec<LayerSpec>>, D::Error> {
    let raw = Vec::<toml::Value>::deserialize(d)?;
    raw.into_iter().enumerate().map(|(i, v)| LayerSpec::from_toml(i, v).map_err(serde::de::Error::custom)).collect::<std::result::Result<Vec<_>, _>>().map(Some)
}

/// `layers` as `[[model.layers]]` tables (every key written, defaults included, except a
/// pool's stride when it is the kernel), which `JobSpec::parse` reads back as the same list.
pub fn layers_toml(layers: &[LayerSpec]) -> String {
    #[derive(Serialize)]
    struct Model<'a> {
        layers: &'a [LayerSpec],
    }
    #[derive(Serialize)]
    struct Doc<'a> {
        model: Model<'a>,
    }
    toml::to_string(&Doc { model: Model { layers } }).expect("layers serialize to TOML")
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetRef {
    pub name: String,
    /// Dataset version; absent means the latest at submission.
    pub version: Option<u64>,
    /// Training records, as a half-open range `[start, end)` of record indices. Absent:
    /// every record of the pinned version that is not in `test` (a retraining template then
    /// trains on all of each version it fires for).
    pub train: Option<[u64; 2]>,
    /// Test records, `[start, end)`; evaluated at the end of each epoch.
    pub test: Option<[u64; 2]>,
    /// `"all"` (default): every record of `train`. `"new"`: only those added since the
    /// dataset version the `[init]` model was trained on (within `train`), plus `replay`.
    pub slices: Option<String>,
    /// With `slices = "new"`: add this fraction (of the new records' count) of records drawn
    /// by the seed from the older ones (within `train`), against forgetting.
    pub replay: Option<f64>,
    /// What a missing feature value (NaN, e.g. an empty CSV cell) becomes when a worker reads
    /// a record. Absent: a dataset with missing values is refused for training.
    pub fill_missing: Option<FillMissing>,
    /// The pinned version's record count, which a default `train` needs: not part of the
    /// spec, filled in by whoever knows the version (`JobSpec::pin_records`).
    #[serde(skip)]
    pub records: Option<u64>,
}

/// `[dataset] fill_missing = "mean" | NUMBER`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FillMissing {
    /// The feature's mean over the pinned dataset version (the sum of its slices' statistics).
    Mean,
    /// This constant, for every feature.
    Value(f64),
}

impl<'de> Deserialize<'de> for FillMissing {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = FillMissing;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("\"mean\" or a number")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<FillMissing, E> {
                match v {
                    "mean" => Ok(FillMissing::Mean),
                    // The value is gone after parsing, so the key is named here.
                    other => Err(E::custom(format!("dataset.fill_missing: unknown value {other:?} (expected \"mean\" or a number)"))),
                }
            }

            fn visit_f64<E: serde::de::Error>(self, v: f64) -> std::result::Result<FillMissing, E> {
                Ok(FillMissing::Value(v))
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<FillMissing, E> {
                Ok(FillMissing::Value(v as f64))
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<FillMissing, E> {
                Ok(FillMissing::Value(v as f64))
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingSpec {
    pub epochs: u32,
    /// Global batch size: every step consumes this many records, split over the workers as
    /// evenly as it goes.
    pub batch_size: u32,
    #[serde(default)]
    pub seed: u64,
    pub optimizer: OptimizerSpec,
    /// Cut the global batch into this many fixed lanes, combined by one fixed reduction tree
    /// over lane ids: the parameters then come out bitwise the same whatever the number of
    /// workers (and however it changed during the run). Absent: the fast path, whose
    /// results depend on the world size.
    pub lanes: Option<u32>,
    /// `"cross_entropy"` (the default: class labels) or `"mse"` (float targets: a regression).
    pub loss: Option<String>,
    /// `[training.schedule]`: how the learning rate moves over the steps (absent: constant).
    pub schedule: Option<ScheduleSpec>,
    /// Scale the gradient down to this global L2 norm when it is longer (after the
    /// all-reduce, so every rank clips the same sum identically; PyTorch's
    /// `clip_grad_norm_`).
    pub clip_norm: Option<f64>,
}

/// `[training.schedule]`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    /// `"constant"`, `"step"`, `"cosine"` or `"linear"`.
    pub kind: String,
    /// Steps of linear warmup from lr / warmup_steps up to lr, before the decay starts.
    pub warmup_steps: Option<u64>,
    /// `step`: multiply the rate by `gamma` (default 0.1) every `every` steps.
    pub every: Option<u64>,
    pub gamma: Option<f64>,
    /// `cosine` and `linear`: the rate at the last step (default 0).
    pub min_lr: Option<f64>,
}

/// The loss a job trains with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loss {
    CrossEntropy,
    Mse,
}

impl Loss {
    pub fn name(self) -> &'static str {
        match self {
            Loss::CrossEntropy => "cross_entropy",
            Loss::Mse => "mse",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerSpec {
    /// `sgd` (with optional momentum) or `adamw`.
    pub kind: String,
    pub lr: f64,
    pub momentum: Option<f64>,
    pub weight_decay: Option<f64>,
    pub beta1: Option<f64>,
    pub beta2: Option<f64>,
    pub eps: Option<f64>,
}

/// The optimizer with every default filled in.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Optimizer {
    Sgd { lr: f32, momentum: f32, weight_decay: f32 },
    AdamW { lr: f32, beta1: f32, beta2: f32, eps: f32, weight_decay: f32 },
}

impl Optimizer {
    /// The base learning rate.
    pub fn lr(&self) -> f32 {
        match *self {
            Optimizer::Sgd { lr, .. } | Optimizer::AdamW { lr, .. } => lr,
        }
    }
}

impl OptimizerSpec {
    pub fn resolve(&self) -> Optimizer {
        let lr = self.lr as f32;
        if self.kind == "adamw" {
            Optimizer::AdamW {
                lr,
                beta1: self.beta1.unwrap_or(0.9) as f32,
                beta2: self.beta2.unwrap_or(0.999) as f32,
                eps: self.eps.unwrap_or(1e-8) as f32,
                weight_decay: self.weight_decay.unwrap_or(0.01) as f32,
            }
        } else {
            Optimizer::Sgd {
                lr,
                momentum: self.momentum.unwrap_or(0.0) as f32,
                weight_decay: self.weight_decay.unwrap_or(0.0) as f32,
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    /// The target.
    pub workers: u32,
    /// The job starts (or goes on after losing workers) once this many are free; default
    /// `workers`.
    pub min_workers: Option<u32>,
    /// A generation uses up to this many free workers; default `workers`.
    pub max_workers: Option<u32>,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        ClusterSpec { workers: 1, min_workers: None, max_workers: None }
    }
}

impl ClusterSpec {
    pub fn min(&self) -> u32 {
        self.min_workers.unwrap_or(self.workers)
    }

    pub fn max(&self) -> u32 {
        self.max_workers.unwrap_or(self.workers)
    }
}

/// When to write checkpoints besides the final one every job writes (which is its model).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSpec {
    /// Every this many optimizer steps.
    pub every_steps: Option<u64>,
    /// Every this many seconds of training (rank 0's clock; all ranks agree on the step).
    pub every_seconds: Option<f64>,
    /// Committed checkpoints kept; older ones are deleted once a newer one is committed.
    #[serde(default = "default_keep")]
    pub keep: u32,
}

fn default_keep() -> u32 {
    3
}

impl Default for CheckpointSpec {
    fn default() -> Self {
        CheckpointSpec { every_steps: None, every_seconds: None, keep: default_keep() }
    }
}

/// How the ranks sum their gradients.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregationSpec {
    /// `auto` (shared memory when every rank is on one host; `hierarchical` when the ranks span
    /// hosts and some host has several; else raw TCP), `shm`, `tcp` (a flat ring even across
    /// hosts), `hierarchical` (shm within a host, tcp between hosts) or `grpc` (the ring over
    /// the data-plane service; slower, kept for comparison).
    #[serde(default = "default_transport")]
    pub transport: String,
    /// `f32`, or `bf16`: cast when sending over the network, added in f32 (tcp only; shared
    /// memory moves no bytes over a wire).
    #[serde(default = "default_wire")]
    pub wire: String,
    /// Gradient bucket size in MiB: a bucket is all-reduced (and its parameters updated) as
    /// soon as its layers' backward is done, while earlier layers' backward runs. 0: one
    /// bucket after the whole backward.
    #[serde(default = "default_bucket_mb")]
    pub bucket_mb: f64,
}

fn default_transport() -> String {
    "auto".into()
}

fn default_wire() -> String {
    "f32".into()
}

fn default_bucket_mb() -> f64 {
    4.0
}

impl Default for AggregationSpec {
    fn default() -> Self {
        AggregationSpec { transport: default_transport(), wire: default_wire(), bucket_mb: default_bucket_mb() }
    }
}

/// The global batch is split over the ranks as evenly as it goes (rank r takes records
/// [r*B/W, (r+1)*B/W) of it), so every rank needs at least one record.
fn check_batch_split(batch: u32, workers: u32) -> Result<()> {
    if batch < workers {
        return Err(bad("training.batch_size", format!("must be at least the number of workers ({workers}), got {batch}")));
    }
    Ok(())
}

fn bad(key: &str, msg: impl std::fmt::Display) -> CoreError {
    CoreError::Spec(format!("{key}: {msg}"))
}

fn check_positive(key: &str, v: f64) -> Result<()> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(bad(key, format!("must be a positive number, got {v}")))
    }
}

fn check_range(key: &str, v: Option<f64>, lo: f64, hi: f64, hi_inclusive: bool) -> Result<()> {
    if let Some(v) = v {
        let ok = v.is_finite() && v >= lo && if hi_inclusive { v <= hi } else { v < hi };
        if !ok {
            let close = if hi_inclusive { ']' } else { ')' };
            return Err(bad(key, format!("must be in [{lo}, {hi}{close}, got {v}")));
        }
    }
    Ok(())
}

impl JobSpec {
    /// Parses and validates a spec. The error names the offending key.
    pub fn parse(text: &str) -> Result<JobSpec> {
        let spec: JobSpec = toml::from_str(text).map_err(|e| CoreError::Spec(e.to_string().trim().to_string()))?;
        spec.validate()?;
        Ok(spec)
    }

    pub fn validate(&self) -> Result<()> {
        if self.name.trim().is_empty() {
            return Err(bad("name", "must not be empty"));
        }
        if self.kind.as_deref().is_some_and(|k| k != "train") {
            return Err(bad("kind", format!("a training job is kind = \"train\" (batch jobs have [input], [operator] and [output]), got {:?}", self.kind.as_deref().unwrap_or_default())));
        }
        let label = |s: &str| !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/' | ':'));
        if let Some(g) = self.group.as_deref().filter(|g| !label(g)) {
            return Err(bad("group", format!("{g:?} must be 1-64 of [A-Za-z0-9._/:-]")));
        }
        if self.tags.len() > 32 {
            return Err(bad("tags", format!("{} tags; at most 32", self.tags.len())));
        }
        if let Some(t) = self.tags.iter().find(|t| !label(t)) {
            return Err(bad("tags", format!("{t:?} must be 1-64 of [A-Za-z0-9._/:-]")));
        }
        self.model.validate()?;
        if self.dataset.name.trim().is_empty() {
            return Err(bad("dataset.name", "must not be empty"));
        }
        if self.dataset.version == Some(0) {
            return Err(bad("dataset.version", "versions start at 1"));
        }
        if let Some([a, b]) = self.dataset.train {
            if a >= b {
                return Err(bad("dataset.train", format!("range [{a}, {b}) is empty")));
            }
        }
        if let Some([a, b]) = self.dataset.test {
            if a >= b {
                return Err(bad("dataset.test", format!("range [{a}, {b}) is empty")));
            }
        }
        let t = &self.training;
        if t.epochs == 0 {
            return Err(bad("training.epochs", "must be at least 1"));
        }
        let workers = self.cluster.workers;
        if workers == 0 {
            return Err(bad("cluster.workers", "must be at least 1"));
        }
        if workers > 1024 {
            return Err(bad("cluster.workers", format!("{workers} is more than the 1024 supported")));
        }
        check_batch_split(t.batch_size, workers)?;
        let (min, max) = (self.cluster.min(), self.cluster.max());
        if min == 0 || min > workers {
            return Err(bad("cluster.min_workers", format!("must be 1 to cluster.workers ({workers}), got {min}")));
        }
        if max < workers || max > 1024 {
            return Err(bad("cluster.max_workers", format!("must be cluster.workers ({workers}) to 1024, got {max}")));
        }
        if t.batch_size < max {
            // Every generation, whatever its size, splits the global batch.
            return Err(bad("cluster.max_workers", format!("{max} is more than training.batch_size ({}): every worker needs a share of each batch", t.batch_size)));
        }
        if let Some(k) = t.lanes {
            if k == 0 || k > 1024 {
                return Err(bad("training.lanes", format!("must be 1 to 1024, got {k}")));
            }
            if !t.batch_size.is_multiple_of(k) {
                return Err(bad("training.lanes", format!("{k} does not divide training.batch_size ({})", t.batch_size)));
            }
            if max > k {
                return Err(bad("cluster.max_workers", format!("{max} is more than training.lanes ({k}): every worker needs a lane")));
            }
        }
        match (self.dataset.slices.as_deref(), &self.init) {
            (None | Some("all"), _) => {
                if self.dataset.replay.is_some() {
                    return Err(bad("dataset.replay", "applies to slices = \"new\" only"));
                }
            }
            (Some("new"), Some(_)) => {}
            (Some("new"), None) => return Err(bad("dataset.slices", "\"new\" needs an [init] model: new since the dataset version it was trained on")),
            (Some(other), _) => return Err(bad("dataset.slices", format!("must be \"all\" or \"new\", not {other:?}"))),
        }
        check_range("dataset.replay", self.dataset.replay, 0.0, 1.0, true)?;
        if let Some(FillMissing::Value(v)) = self.dataset.fill_missing {
            // Features are f32: the constant must be one.
            if !(v as f32).is_finite() {
                return Err(bad("dataset.fill_missing", format!("must be \"mean\" or a finite f32 number, got {v}")));
            }
        }
        if let Some(t) = &self.trigger {
            crate::dataset::validate_name(&t.on_append).map_err(|e| bad("trigger.on_append", e))?;
            if self.dataset.version.is_some() {
                return Err(bad("dataset.version", "a triggered job trains the version that fired it: leave the version out"));
            }
        }
        if let Some(n) = &self.notify {
            if n.target().is_none() {
                return Err(bad("notify.webhook", format!("{:?} is not http://HOST:PORT/PATH (plain HTTP, a port, a path without spaces)", n.webhook)));
            }
            if n.stall_s == 0 {
                return Err(bad("notify.stall_s", "must be at least 1"));
            }
        }
        if let Some(p) = &self.promote {
            if self.register.is_none() {
                return Err(bad("promote", "promotes the [register] model: add [register] name = \"NAME\""));
            }
            let Some(higher) = metric_higher_is_better(&p.metric) else {
                return Err(bad("promote.metric", format!("{:?} is not one of test_accuracy, test_r2 (higher is better), test_loss, test_rmse, test_bpb (lower is better)", p.metric)));
            };
            let regression = self.loss() == Loss::Mse;
            if regression && p.metric == "test_accuracy" {
                return Err(bad("promote.metric", "test_accuracy needs class labels; a regression (loss = \"mse\") is gated on test_r2, test_loss or test_rmse"));
            }
            if !regression && matches!(p.metric.as_str(), "test_r2" | "test_rmse") {
                return Err(bad("promote.metric", format!("{} is a regression's metric; a classifier is gated on test_accuracy or test_loss", p.metric)));
            }
            // Accuracy and R² are at most 1; a loss has no upper bound.
            let bound = if higher { 1.0 } else { f64::MAX };
            check_range("promote.min_delta", Some(p.min_delta), -bound, bound, true)?;
            let (name, _) = p.holdout_ref()?;
            crate::dataset::validate_name(&name).map_err(|e| bad("promote.holdout", e))?;
            crate::dataset::validate_name(&p.alias).map_err(|e| bad("promote.alias", e))?;
        }
        if let Some(r) = &self.register {
            crate::dataset::validate_name(&r.name).map_err(|e| bad("register.name", e))?;
        }
        if let Some(init) = &self.init {
            match (&init.checkpoint, &init.model) {
                (Some(_), None) => {
                    self.init_checkpoint()?;
                }
                (None, Some(m)) => {
                    let ok = m.split_once('@').is_some_and(|(n, x)| crate::dataset::validate_name(n).is_ok() && !x.is_empty());
                    if !ok {
                        return Err(bad("init.model", format!("{m:?} is not NAME@VERSION or NAME@ALIAS")));
                    }
                }
                _ => return Err(bad("init", "give one of checkpoint = \"JOB[@STEP]\" or model = \"NAME@VERSION\"")),
            }
        }
        if let Some([a, b]) = self.dataset.train {
            if t.batch_size as u64 > b - a {
                return Err(bad("training.batch_size", format!("{} is larger than the training range ({} records)", t.batch_size, b - a)));
            }
        }
        match t.loss.as_deref() {
            None | Some("cross_entropy" | "mse") => {}
            Some(other) => return Err(bad("training.loss", format!("unknown loss {other:?} (expected \"cross_entropy\" or \"mse\")"))),
        }
        if let Some(c) = t.clip_norm {
            check_positive("training.clip_norm", c)?;
        }
        if let Some(s) = &t.schedule {
            let only = |key: &str, set: bool, kinds: &str| if set { Err(bad(&format!("training.schedule.{key}"), format!("applies to kind = {kinds} only"))) } else { Ok(()) };
            match s.kind.as_str() {
                "constant" => {
                    only("every", s.every.is_some(), "\"step\"")?;
                    only("gamma", s.gamma.is_some(), "\"step\"")?;
                    only("min_lr", s.min_lr.is_some(), "\"cosine\" or \"linear\"")?;
                }
                "step" => {
                    only("min_lr", s.min_lr.is_some(), "\"cosine\" or \"linear\"")?;
                    match s.every {
                        None => return Err(bad("training.schedule.every", "kind = \"step\" needs every = STEPS")),
                        Some(0) => return Err(bad("training.schedule.every", "must be at least 1")),
                        Some(_) => {}
                    }
                    check_range("training.schedule.gamma", s.gamma, 0.0, 1.0, false)?;
                }
                "cosine" | "linear" => {
                    only("every", s.every.is_some(), "\"step\"")?;
                    only("gamma", s.gamma.is_some(), "\"step\"")?;
                    if let Some(m) = s.min_lr {
                        if !(m.is_finite() && m >= 0.0 && m <= t.optimizer.lr) {
                            return Err(bad("training.schedule.min_lr", format!("must be 0 to training.optimizer.lr ({}), got {m}", t.optimizer.lr)));
                        }
                    }
                }
                other => return Err(bad("training.schedule.kind", format!("unknown schedule {other:?} (expected \"constant\", \"step\", \"cosine\" or \"linear\")"))),
            }
        }
        let o = &t.optimizer;
        check_positive("training.optimizer.lr", o.lr)?;
        check_range("training.optimizer.weight_decay", o.weight_decay, 0.0, 1.0, false)?;
        match o.kind.as_str() {
            "sgd" => {
                check_range("training.optimizer.momentum", o.momentum, 0.0, 1.0, false)?;
                for (k, v) in [("beta1", o.beta1), ("beta2", o.beta2), ("eps", o.eps)] {
                    if v.is_some() {
                        return Err(bad(&format!("training.optimizer.{k}"), "applies to kind = \"adamw\" only"));
                    }
                }
            }
            "adamw" => {
                if o.momentum.is_some() {
                    return Err(bad("training.optimizer.momentum", "applies to kind = \"sgd\" only (adamw uses beta1)"));
                }
                check_range("training.optimizer.beta1", o.beta1, 0.0, 1.0, false)?;
                check_range("training.optimizer.beta2", o.beta2, 0.0, 1.0, false)?;
                if let Some(eps) = o.eps {
                    check_positive("training.optimizer.eps", eps)?;
                }
            }
            other => {
                return Err(bad("training.optimizer.kind", format!("unknown optimizer {other:?} (expected \"sgd\" or \"adamw\")")))
            }
        }
        let c = &self.checkpoint;
        if c.keep == 0 {
            return Err(bad("checkpoint.keep", "must be at least 1 (the last checkpoint is the job's model)"));
        }
        if c.keep > 1000 {
            return Err(bad("checkpoint.keep", format!("{} is more than the 1000 supported", c.keep)));
        }
        if c.every_steps == Some(0) {
            return Err(bad("checkpoint.every_steps", "must be at least 1"));
        }
        if let Some(s) = c.every_seconds {
            check_positive("checkpoint.every_seconds", s)?;
        }
        let g = &self.aggregation;
        if !matches!(g.transport.as_str(), "auto" | "shm" | "tcp" | "grpc" | "hierarchical") {
            return Err(bad("aggregation.transport", format!("unknown transport {:?} (expected \"auto\", \"shm\", \"tcp\", \"hierarchical\" or \"grpc\")", g.transport)));
        }
        match g.wire.as_str() {
            "f32" => {}
            "bf16" if matches!(g.transport.as_str(), "auto" | "tcp" | "hierarchical") => {}
            "bf16" => return Err(bad("aggregation.wire", format!("bf16 applies to the tcp transport (and between hosts in hierarchical) only, not {:?}", g.transport))),
            other => return Err(bad("aggregation.wire", format!("unknown wire format {other:?} (expected \"f32\" or \"bf16\")"))),
        }
        if t.lanes.is_some() && g.wire != "f32" {
            // Rounding on the wire depends on who holds which sum: no fixed tree survives it.
            return Err(bad("aggregation.wire", format!("{:?} cannot carry lanes exactly; use \"f32\" with training.lanes", g.wire)));
        }
        if !(g.bucket_mb.is_finite() && (0.0..=1024.0).contains(&g.bucket_mb)) {
            return Err(bad("aggregation.bucket_mb", format!("must be 0 to 1024, got {}", g.bucket_mb)));
        }
        Ok(())
    }

    /// Checks that `workers` ranks can split this spec's global batch (for `job resume
    /// --workers`, which changes the world size of a submitted job).
    pub fn check_world_size(&self, workers: u32) -> Result<()> {
        if workers == 0 || workers > 1024 {
            return Err(bad("workers", format!("must be 1 to 1024, got {workers}")));
        }
        check_batch_split(self.training.batch_size, workers)?;
        match self.training.lanes {
            Some(k) if workers > k => Err(bad("training.lanes", format!("{workers} workers is more than the {k} lanes: every worker needs a lane"))),
            _ => Ok(()),
        }
    }

    /// `[init] checkpoint`: (job, step), the step None for the job's final checkpoint.
    pub fn init_checkpoint(&self) -> Result<Option<(u64, Option<u64>)>> {
        let Some(text) = self.init.as_ref().and_then(|i| i.checkpoint.as_deref()) else { return Ok(None) };
        let parse = |s: &str| s.trim().parse::<u64>().map_err(|_| bad("init.checkpoint", format!("{text:?} is not JOB or JOB@STEP")));
        Ok(Some(match text.split_once('@') {
            Some((job, step)) => (parse(job)?, Some(parse(step)?)),
            None => (parse(text)?, None),
        }))
    }

    fn only_new(&self) -> bool {
        self.dataset.slices.as_deref() == Some("new")
    }

    /// The loss the spec trains with.
    pub fn loss(&self) -> Loss {
        match self.training.loss.as_deref() {
            Some("mse") => Loss::Mse,
            _ => Loss::CrossEntropy,
        }
    }

    /// Records the pinned dataset version's size, which a default `train` (every record not
    /// in `test`) is made of.
    pub fn pin_records(&mut self, records: u64) {
        self.dataset.records = Some(records);
    }

    /// The training records as half-open ranges, in order: `train`, or by default every
    /// record of the pinned version (`pin_records`; none before it is known) outside `test`.
    pub fn train_ranges(&self) -> Vec<[u64; 2]> {
        if let Some(t) = self.dataset.train {
            return vec![t];
        }
        let all = self.dataset.records.unwrap_or(0);
        let ranges = match self.dataset.test {
            None => vec![[0, all]],
            Some([a, b]) => vec![[0, a.min(all)], [b.min(all), all]],
        };
        ranges.into_iter().filter(|[a, b]| a < b).collect()
    }

    /// The training records, in a fixed order: `train_ranges`, or with `slices = "new"` the
    /// records from `new_from` (the first index the `[init]` model did not see) plus the
    /// replay sample of the older ones.
    pub fn train_indices(&self, new_from: Option<u64>) -> Vec<u64> {
        let ranges = self.train_ranges();
        let all = || ranges.iter().flat_map(|&[a, b]| a..b);
        match new_from.filter(|_| self.only_new()) {
            Some(n) => {
                let old: Vec<u64> = all().filter(|&i| i < n).collect();
                let new = all().filter(|&i| i >= n);
                let replay = self.replayed(new.clone().count() as u64, old.len() as u64);
                let pick = crate::rng::epoch_permutation(old.len(), self.training.seed, REPLAY_TAG);
                new.chain(pick[..replay as usize].iter().map(|&i| old[i as usize])).collect()
            }
            None => all().collect(),
        }
    }

    /// Older records replayed beside `new` new ones, out of `old`.
    fn replayed(&self, new: u64, old: u64) -> u64 {
        ((self.dataset.replay.unwrap_or(0.0) * new as f64).round() as u64).min(old)
    }

    /// How many records `train_indices` holds (without building it).
    pub fn train_len(&self, new_from: Option<u64>) -> u64 {
        let ranges = self.train_ranges();
        let total: u64 = ranges.iter().map(|[a, b]| b - a).sum();
        match new_from.filter(|_| self.only_new()) {
            Some(n) => {
                let old: u64 = ranges.iter().map(|&[a, b]| n.min(b).saturating_sub(a)).sum();
                let new = total - old;
                new + self.replayed(new, old)
            }
            None => total,
        }
    }

    /// Optimizer steps per epoch: full global batches only (the remainder is dropped; the
    /// permutation changes every epoch, so every record is still seen). `new_from`: see
    /// `train_indices`.
    pub fn steps_per_epoch_from(&self, new_from: Option<u64>) -> u64 {
        self.train_len(new_from) / self.training.batch_size as u64
    }

    pub fn total_steps_from(&self, new_from: Option<u64>) -> u64 {
        self.steps_per_epoch_from(new_from) * self.training.epochs as u64
    }

    pub fn steps_per_epoch(&self) -> u64 {
        self.steps_per_epoch_from(None)
    }

    pub fn total_steps(&self) -> u64 {
        self.total_steps_from(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "t"
[model]
kind = "mlp"
hidden = [32]
[dataset]
name = "mnist"
train = [0, 1000]
test = [1000, 1200]
[training]
epochs = 2
batch_size = 64
seed = 1
[training.optimizer]
kind = "sgd"
lr = 0.05
momentum = 0.9
[cluster]
workers = 2
"#;

    #[test]
    fn parses_good_spec_with_defaults() {
        let s = JobSpec::parse(GOOD).unwrap();
        assert_eq!(s.model.hidden_sizes(), vec![32]);
        assert_eq!(s.steps_per_epoch(), 15);
        assert_eq!(s.training.optimizer.resolve(), Optimizer::Sgd { lr: 0.05, momentum: 0.9, weight_decay: 0.0 });
    }

    fn err_of(text: &str) -> String {
        JobSpec::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn train_defaults_to_every_record_outside_test_of_the_pinned_version() {
        let mut s = JobSpec::parse(&GOOD.replace("train = [0, 1000]\n", "")).unwrap();
        assert_eq!((s.train_ranges(), s.total_steps()), (vec![], 0), "nothing before the version is known");
        s.pin_records(1500);
        assert_eq!(s.train_ranges(), vec![[0, 1000], [1200, 1500]]);
        assert_eq!((s.train_len(None), s.steps_per_epoch()), (1300, 20));
        let idx = s.train_indices(None);
        assert_eq!((idx.len(), idx[999], idx[1000]), (1300, 999, 1200));
        // New records since 1100 (the [init] model saw [0, 1100)), half as many replayed.
        s.dataset.slices = Some("new".into());
        s.dataset.replay = Some(0.5);
        let idx = s.train_indices(Some(1100));
        assert_eq!(idx.len() as u64, s.train_len(Some(1100)));
        assert_eq!((&idx[..2], idx.len()), (&[1200, 1201][..], 300 + 150));
        assert!(idx[300..].iter().all(|&i| i < 1000), "replayed records are old ones");
        // No test range: everything; a test range at the start: the rest.
        let mut t = JobSpec::parse(&GOOD.replace("train = [0, 1000]\n", "").replace("test = [1000, 1200]\n", "")).unwrap();
        t.pin_records(640);
        assert_eq!(t.train_ranges(), vec![[0, 640]]);
        let mut u = JobSpec::parse(&GOOD.replace("train = [0, 1000]\n", "").replace("test = [1000, 1200]", "test = [0, 100]")).unwrap();
        u.pin_records(640);
        assert_eq!(u.train_ranges(), vec![[100, 640]]);
    }

    #[test]
    fn schedules_losses_and_clipping_are_checked_naming_the_key() {
        let with = |extra: &str| GOOD.replace("seed = 1\n", &format!("seed = 1\n{extra}\n"));
        let s = JobSpec::parse(&with("loss = \"mse\"\nclip_norm = 1.0\n[training.schedule]\nkind = \"step\"\nevery = 10\ngamma = 0.5")).unwrap();
        assert_eq!((s.loss(), s.training.clip_norm), (Loss::Mse, Some(1.0)));
        assert_eq!(JobSpec::parse(GOOD).unwrap().loss(), Loss::CrossEntropy);
        for (extra, want) in [
            ("loss = \"hinge\"", "training.loss: unknown loss \"hinge\""),
            ("clip_norm = 0", "training.clip_norm"),
            ("[training.schedule]\nkind = \"exp\"", "training.schedule.kind: unknown schedule \"exp\""),
            ("[training.schedule]\nkind = \"step\"", "training.schedule.every: kind = \"step\" needs every"),
            ("[training.schedule]\nkind = \"step\"\nevery = 5\ngamma = 2.0", "training.schedule.gamma"),
            ("[training.schedule]\nkind = \"cosine\"\nevery = 5", "training.schedule.every: applies to kind = \"step\" only"),
            ("[training.schedule]\nkind = \"linear\"\nmin_lr = 0.5", "training.schedule.min_lr: must be 0 to training.optimizer.lr"),
            ("[training.schedule]\nkind = \"constant\"\ngamma = 0.5", "training.schedule.gamma"),
            ("[training.schedule]\nkind = \"cosine\"\nwarmup = 5", "warmup"),
        ] {
            let e = err_of(&with(extra));
            assert!(e.contains(want), "{extra}: {e}");
        }
    }

    #[test]
    fn a_pool_range_defaults_to_the_target_and_is_checked() {
        let s = JobSpec::parse(GOOD).unwrap();
        assert_eq!((s.cluster.min(), s.cluster.max()), (2, 2));
        let s = JobSpec::parse(&GOOD.replace("workers = 2", "workers = 2\nmin_workers = 1\nmax_workers = 4")).unwrap();
        assert_eq!((s.cluster.min(), s.cluster.workers, s.cluster.max()), (1, 2, 4));
        for (extra, key) in [("min_workers = 3", "cluster.min_workers"), ("min_workers = 0", "cluster.min_workers"), ("max_workers = 1", "cluster.max_workers"), ("max_workers = 65", "cluster.max_workers")] {
            let e = err_of(&GOOD.replace("workers = 2", &format!("workers = 2\n{extra}")));
            assert!(e.contains(key), "{extra}: {e}");
        }
    }

    #[test]
    fn the_gate_takes_the_metrics_of_its_loss_in_their_direction() {
        let gated = |metric: &str, loss: &str, delta: f64| {
            GOOD.replace("seed = 1", &format!("seed = 1\nloss = \"{loss}\""))
                + &format!("[register]\nname = \"m\"\n[promote]\nalias = \"prod\"\nmetric = \"{metric}\"\nmin_delta = {delta}\nholdout = \"h\"\n")
        };
        for (metric, loss) in [("test_accuracy", "cross_entropy"), ("test_loss", "cross_entropy"), ("test_r2", "mse"), ("test_rmse", "mse"), ("test_loss", "mse")] {
            JobSpec::parse(&gated(metric, loss, 0.0)).unwrap_or_else(|e| panic!("{metric} with {loss}: {e}"));
        }
        // A loss has no upper bound: a delta of 5 RMSE units is a fair ask; 5 in accuracy is not.
        JobSpec::parse(&gated("test_rmse", "mse", 5.0)).unwrap();
        assert!(err_of(&gated("test_accuracy", "cross_entropy", 5.0)).contains("promote.min_delta"));
        assert!(err_of(&gated("auc", "cross_entropy", 0.0)).contains("promote.metric: \"auc\" is not one of"));
        assert!(err_of(&gated("test_accuracy", "mse", 0.0)).contains("test_accuracy needs class labels"));
        assert!(err_of(&gated("test_r2", "cross_entropy", 0.0)).contains("test_r2 is a regression's metric"));
        assert_eq!((metric_higher_is_better("test_r2"), metric_higher_is_better("test_rmse"), metric_higher_is_better("x")), (Some(true), Some(false), None));
    }

    #[test]
    fn a_group_and_tags_are_labels() {
        let s = JobSpec::parse(&GOOD.replace("name = \"t\"", "name = \"t\"\ngroup = \"lr-sweep\"\ntags = [\"baseline\", \"adam\"]")).unwrap();
        assert_eq!((s.group.as_deref(), s.tags.clone()), (Some("lr-sweep"), vec!["baseline".to_string(), "adam".to_string()]));
        assert!(err_of(&GOOD.replace("name = \"t\"", "name = \"t\"\ngroup = \"a b\"")).contains("group: \"a b\" must be"));
        assert!(err_of(&GOOD.replace("name = \"t\"", "name = \"t\"\ntags = [\"\"]")).contains("tags"));
    }

    #[test]
    fn rejects_unknown_key_naming_it() {
        let e = err_of(&GOOD.replace("seed = 1", "seed = 1\nwarmup = 3"));
        assert!(e.contains("warmup"), "{e}");
    }

    #[test]
    fn rejects_unknown_model_kind() {
        let e = err_of(&GOOD.replace("kind = \"mlp\"", "kind = \"transformer\""));
        assert!(e.contains("model.kind") && e.contains("transformer"), "{e}");
    }

    #[test]
    fn rejects_negative_lr() {
        let e = err_of(&GOOD.replace("lr = 0.05", "lr = -0.05"));
        assert!(e.contains("training.optimizer.lr"), "{e}");
    }

    #[test]
    fn new_slices_with_replay_train_the_new_records_and_a_fixed_sample_of_the_old() {
        let warm = GOOD.replace("test = [1000, 1200]", "test = [1000, 1200]\nslices = \"new\"\nreplay = 0.25") + "[init]\ncheckpoint = \"3@40\"\n";
        let s = JobSpec::parse(&warm).unwrap();
        assert_eq!(s.init_checkpoint().unwrap(), Some((3, Some(40))));
        // train = [0, 1000), the model saw [0, 600): 400 new, 100 replayed.
        let idx = s.train_indices(Some(600));
        assert_eq!((idx.len() as u64, s.train_len(Some(600))), (500, 500));
        assert!(idx[..400].iter().copied().eq(600..1000) && idx[400..].iter().all(|&i| i < 600));
        assert_eq!(idx, s.train_indices(Some(600)), "the sample is fixed by the seed");
        assert_eq!(s.steps_per_epoch_from(Some(600)), 500 / 64);
        assert_eq!(s.train_indices(None).len(), 1000, "no base: every record");
        for (bad, key) in [
            (GOOD.replace("test = [1000, 1200]", "test = [1000, 1200]\nslices = \"new\""), "dataset.slices"),
            (GOOD.replace("test = [1000, 1200]", "test = [1000, 1200]\nreplay = 0.5"), "dataset.replay"),
            (warm.replace("replay = 0.25", "replay = 1.5"), "dataset.replay"),
            (warm.replace("checkpoint = \"3@40\"", "checkpoint = \"three\""), "init.checkpoint"),
            (warm.replace("checkpoint = \"3@40\"", "model = \"m\""), "init.model"),
            (GOOD.to_string() + "[register]\nname = \"a b\"\n", "register.name"),
        ] {
            let e = err_of(&bad);
            assert!(e.contains(key), "{key}: {e}");
        }
    }

    #[test]
    fn lanes_must_divide_the_batch_and_cover_every_worker() {
        let with = |lanes: &str| GOOD.replace("seed = 1", &format!("seed = 1\n{lanes}"));
        let s = JobSpec::parse(&with("lanes = 8")).unwrap();
        assert_eq!(s.training.lanes, Some(8));
        assert!(s.check_world_size(8).is_ok());
        assert!(s.check_world_size(9).unwrap_err().to_string().contains("training.lanes"));
        for (bad, key) in [("lanes = 0", "training.lanes"), ("lanes = 5", "training.lanes"), ("lanes = 2048", "training.lanes")] {
            let e = err_of(&with(bad));
            assert!(e.contains(key), "{bad}: {e}");
        }
        let e = err_of(&with("lanes = 2").replace("workers = 2", "workers = 2\nmax_workers = 4"));
        assert!(e.contains("cluster.max_workers") && e.contains("training.lanes"), "{e}");
        let e = err_of(&(with("lanes = 8") + "[aggregation]\ntransport = \"tcp\"\nwire = \"bf16\"\n"));
        assert!(e.contains("aggregation.wire") && e.contains("lanes"), "{e}");
    }

    #[test]
    fn rejects_batch_smaller_than_workers() {
        let e = err_of(&GOOD.replace("batch_size = 64", "batch_size = 1"));
        assert!(e.contains("training.batch_size"), "{e}");
        // An uneven split is fine: 65 records over 2 ranks are 32 + 33.
        assert!(JobSpec::parse(&GOOD.replace("batch_size = 64", "batch_size = 65")).is_ok());
        let s = JobSpec::parse(GOOD).unwrap();
        assert!(s.check_world_size(3).is_ok());
        assert!(s.check_world_size(65).unwrap_err().to_string().contains("training.batch_size"));
        assert!(s.check_world_size(0).is_err());
    }

    #[test]
    fn checkpoint_settings_default_and_validate() {
        let s = JobSpec::parse(GOOD).unwrap();
        assert_eq!(s.checkpoint, CheckpointSpec { every_steps: None, every_seconds: None, keep: 3 });
        let s = JobSpec::parse(&format!("{GOOD}[checkpoint]\nevery_steps = 10\nevery_seconds = 2.5\nkeep = 2\n")).unwrap();
        assert_eq!(s.checkpoint, CheckpointSpec { every_steps: Some(10), every_seconds: Some(2.5), keep: 2 });
        let e = err_of(&format!("{GOOD}[checkpoint]\nkeep = 0\n"));
        assert!(e.contains("checkpoint.keep") && e.contains("at least 1"), "{e}");
        let e = err_of(&format!("{GOOD}[checkpoint]\nevery_steps = 0\n"));
        assert!(e.contains("checkpoint.every_steps"), "{e}");
        let e = err_of(&format!("{GOOD}[checkpoint]\nevery_seconds = -1\n"));
        assert!(e.contains("checkpoint.every_seconds"), "{e}");
        let e = err_of(&format!("{GOOD}[checkpoint]\nevery_step = 3\n"));
        assert!(e.contains("every_step"), "{e}");
    }

    #[test]
    fn aggregation_settings_default_and_validate() {
        let s = JobSpec::parse(GOOD).unwrap();
        assert_eq!(s.aggregation, AggregationSpec { transport: "auto".into(), wire: "f32".into(), bucket_mb: 4.0 });
        let s = JobSpec::parse(&format!("{GOOD}[aggregation]\ntransport = \"tcp\"\nwire = \"bf16\"\nbucket_mb = 0\n")).unwrap();
        assert_eq!((s.aggregation.transport.as_str(), s.aggregation.wire.as_str(), s.aggregation.bucket_mb), ("tcp", "bf16", 0.0));
        for (extra, key) in [
            ("transport = \"udp\"", "aggregation.transport"),
            ("wire = \"fp8\"", "aggregation.wire"),
            ("transport = \"shm\"\nwire = \"bf16\"", "aggregation.wire"),
            ("bucket_mb = -1", "aggregation.bucket_mb"),
        ] {
            let e = err_of(&format!("{GOOD}[aggregation]\n{extra}\n"));
            assert!(e.contains(key), "{extra}: {e}");
        }
    }

    #[test]
    fn fill_missing_takes_mean_or_a_number_and_names_the_key_otherwise() {
        let with = |v: &str| GOOD.replace("test = [1000, 1200]", &format!("test = [1000, 1200]\nfill_missing = {v}"));
        assert_eq!(JobSpec::parse(GOOD).unwrap().dataset.fill_missing, None);
        assert_eq!(JobSpec::parse(&with("\"mean\"")).unwrap().dataset.fill_missing, Some(FillMissing::Mean));
        assert_eq!(JobSpec::parse(&with("0")).unwrap().dataset.fill_missing, Some(FillMissing::Value(0.0)));
        assert_eq!(JobSpec::parse(&with("-2.5")).unwrap().dataset.fill_missing, Some(FillMissing::Value(-2.5)));
        for bad in ["\"median\"", "\"Mean\"", "nan", "inf", "1e39", "true", "[1]"] {
            let e = err_of(&with(bad));
            assert!(e.contains("fill_missing"), "{bad}: {e}");
        }
        let e = err_of(&with("\"median\""));
        assert!(e.contains("dataset.fill_missing") && e.contains("median") && e.contains("\"mean\" or a number"), "{e}");
    }

    #[test]
    fn rejects_momentum_with_adamw() {
        let e = err_of(&GOOD.replace("kind = \"sgd\"", "kind = \"adamw\""));
        assert!(e.contains("training.optimizer.momentum"), "{e}");
    }

    /// GOOD with its `[model]` replaced.
    fn with_model(model: &str) -> String {
        GOOD.replace("[model]\nkind = \"mlp\"\nhidden = [32]\n", &format!("[model]\n{model}\n"))
    }

    const EVERY_KIND: &str = r#"
[[model.layers]]
kind = "conv2d"
out = 8
kernel = 3
[[model.layers]]
kind = "conv2d"
out = 4
kernel = 5
stride = 2
padding = 1
bias = false
[[model.layers]]
kind = "maxpool2d"
kernel = 2
[[model.layers]]
kind = "maxpool2d"
kernel = 3
stride = 1
[[model.layers]]
kind = "avgpool2d"
kernel = 2
[[model.layers]]
kind = "avgpool2d"
kernel = 2
stride = 1
[[model.layers]]
kind = "layernorm"
over = "chw"
eps = 1e-3
[[model.layers]]
kind = "layernorm"
[[model.layers]]
kind = "relu"
[[model.layers]]
kind = "gelu"
[[model.layers]]
kind = "tanh"
[[model.layers]]
kind = "sigmoid"
[[model.layers]]
kind = "dropout"
p = 0
[[model.layers]]
kind = "flatten"
[[model.layers]]
kind = "dropout"
p = 0.25
[[model.layers]]
kind = "linear"
out = 16
bias = false
[[model.layers]]
kind = "linear"
out = 10
[[model.layers]]
kind = "embedding"
dim = 16
[[model.layers]]
kind = "embedding"
dim = 8
vocab = 300
[[model.layers]]
kind = "position_embedding"
[[model.layers]]
kind = "transformer_block"
heads = 2
[[model.layers]]
kind = "transformer_block"
heads = 4
mlp_ratio = 2
dropout = 0.1
"#;

    #[test]
    fn layers_parse_every_kind_with_its_defaults_and_round_trip() {
        let s = JobSpec::parse(&with_model(EVERY_KIND)).unwrap();
        assert_eq!((s.model.kind.as_str(), s.model.preset()), ("sequential", None));
        let layers = s.model.layers.clone().unwrap();
        use LayerSpec::*;
        assert_eq!(
            layers,
            [
                Conv2d { out: 8, kernel: 3, stride: 1, padding: 0, bias: true },
                Conv2d { out: 4, kernel: 5, stride: 2, padding: 1, bias: false },
                MaxPool2d { kernel: 2, stride: None },
                MaxPool2d { kernel: 3, stride: Some(1) },
                AvgPool2d { kernel: 2, stride: None },
                AvgPool2d { kernel: 2, stride: Some(1) },
                LayerNorm { over: NormOver::Chw, eps: 1e-3 },
                LayerNorm { over: NormOver::Last, eps: 1e-5 },
                Relu,
                Gelu,
                Tanh,
                Sigmoid,
                Dropout { p: 0.0 },
                Flatten,
                Dropout { p: 0.25 },
                Linear { out: 16, bias: false },
                Linear { out: 10, bias: true },
                Embedding { dim: 16, vocab: None },
                Embedding { dim: 8, vocab: Some(300) },
                PositionEmbedding,
                TransformerBlock { heads: 2, mlp_ratio: 4, dropout: 0.0 },
                TransformerBlock { heads: 4, mlp_ratio: 2, dropout: 0.1 },
            ]
        );
        let kinds: std::collections::BTreeSet<_> = layers.iter().map(LayerSpec::kind_name).collect();
        assert_eq!(kinds, LayerSpec::KINDS.into_iter().collect(), "every kind is tested");
        assert_eq!(s.model.layer_list(&[28, 28], 10).unwrap(), layers, "a layer list is taken as given");
        // Written back (defaults spelled out), the same list; `kind = "sequential"` is the
        // same as no kind.
        let text = layers_toml(&layers);
        assert!(text.contains("[[model.layers]]\nkind = \"conv2d\"\nout = 8\nkernel = 3\nstride = 1\npadding = 0\nbias = true\n"), "{text}");
        assert!(text.contains("[[model.layers]]\nkind = \"layernorm\"\nover = \"last\"\neps = 0.00001\n"), "{text}");
        assert!(text.contains("[[model.layers]]\nkind = \"maxpool2d\"\nkernel = 2\n\n"), "a pool's default stride stays implicit: {text}");
        let back = JobSpec::parse(&with_model(&format!("kind = \"sequential\"\n{text}"))).unwrap();
        assert_eq!(back.model.layers.as_ref(), Some(&layers), "{text}");
        assert_eq!(layers_toml(back.model.layers.as_ref().unwrap()), text);
        // Inline tables work too.
        let inline = JobSpec::parse(&with_model("layers = [{ kind = \"flatten\" }, { kind = \"linear\", out = 3 }]")).unwrap();
        assert_eq!(inline.model.layers, Some(vec![Flatten, Linear { out: 3, bias: true }]));
    }

    #[test]
    fn layer_keys_and_values_are_checked_naming_the_layer() {
        let one = |layer: &str| err_of(&with_model(&format!("[[model.layers]]\nkind = \"flatten\"\n[[model.layers]]\n{layer}\n")));
        for (layer, want) in [
            // Unknown keys, named.
            ("kind = \"conv2d\"\nout = 8\nkernel = 3\nstrid = 2", "model.layers[1] (conv2d): unknown field `strid`, expected one of `out`, `kernel`, `stride`, `padding`, `bias`"),
            ("kind = \"linear\"\nout = 8\nactivation = \"relu\"", "model.layers[1] (linear): unknown field `activation`"),
            ("kind = \"maxpool2d\"\nkernel = 2\npadding = 1", "model.layers[1] (maxpool2d): unknown field `padding`"),
            ("kind = \"relu\"\ninplace = true", "model.layers[1] (relu): unknown field `inplace`"),
            ("kind = \"dropout\"\np = 0.1\nrate = 0.1", "model.layers[1] (dropout): unknown field `rate`"),
            ("kind = \"layernorm\"\nover = \"all\"", "model.layers[1] (layernorm): unknown variant `all`, expected `last` or `chw`"),
            // Missing keys and wrong types.
            ("kind = \"linear\"", "model.layers[1] (linear): missing field `out`"),
            ("kind = \"conv2d\"\nout = 8", "model.layers[1] (conv2d): missing field `kernel`"),
            ("kind = \"dropout\"", "model.layers[1] (dropout): missing field `p`"),
            ("kind = \"linear\"\nout = -3", "model.layers[1] (linear): invalid value: integer `-3`, expected u64"),
            ("kind = \"linear\"\nout = \"ten\"", "model.layers[1] (linear): invalid type: string \"ten\", expected u64"),
            // Kinds.
            ("out = 3", "model.layers[1]: has no kind (one of linear, conv2d,"),
            ("kind = \"conv3d\"", "model.layers[1].kind: unknown layer kind \"conv3d\" (expected one of linear, conv2d,"),
            ("kind = 3", "model.layers[1].kind: must be a string"),
            ("kind = \"batchnorm2d\"", "model.layers[1] (batchnorm2d): not supported: its batch statistics would have to be synchronized across the ranks"),
            // Values.
            ("kind = \"linear\"\nout = 0", "model.layers[1].out: must be 1 to 65536 for linear, got 0"),
            ("kind = \"conv2d\"\nout = 8\nkernel = 0", "model.layers[1].kernel: must be 1 to 256 for conv2d, got 0"),
            ("kind = \"conv2d\"\nout = 5000\nkernel = 3", "model.layers[1].out: must be 1 to 4096 for conv2d, got 5000"),
            ("kind = \"conv2d\"\nout = 8\nkernel = 3\nstride = 0", "model.layers[1].stride: must be 1 to 256"),
            ("kind = \"avgpool2d\"\nkernel = 2\nstride = 0", "model.layers[1].stride: must be 1 to 256 for avgpool2d, got 0"),
            ("kind = \"dropout\"\np = 1", "model.layers[1].p: must be in [0, 1), got 1"),
            ("kind = \"dropout\"\np = -0.1", "model.layers[1].p: must be in [0, 1)"),
            ("kind = \"layernorm\"\neps = 0", "model.layers[1].eps: must be a positive number"),
            ("kind = \"layernorm\"\neps = 1e-60", "model.layers[1].eps: must be a positive number (an f32)"),
        ] {
            let e = one(layer);
            assert!(e.contains(want), "{layer}: {e}");
        }
        let e = err_of(&with_model("layers = [3]"));
        assert!(e.contains("model.layers[0]: must be a table with a kind"), "{e}");
    }

    #[test]
    fn presets_and_layer_lists_exclude_each_other() {
        let list = "[[model.layers]]\nkind = \"flatten\"\n[[model.layers]]\nkind = \"linear\"\nout = 10";
        assert!(JobSpec::parse(&with_model(list)).is_ok());
        assert!(JobSpec::parse(&with_model(&format!("kind = \"sequential\"\n{list}"))).is_ok());
        for (model, want) in [
            (format!("kind = \"mlp\"\n{list}"), "model.layers: kind = \"mlp\" is a preset"),
            (format!("kind = \"cnn\"\n{list}"), "model.layers: kind = \"cnn\" is a preset"),
            (format!("hidden = [32]\n{list}"), "model.hidden: applies to kind = \"mlp\" or \"cnn\" only"),
            (format!("channels = [8, 16]\n{list}"), "model.channels: applies to kind = \"cnn\" only"),
            ("kind = \"sequential\"".to_string(), "model.layers: kind = \"sequential\" (the default) needs a list of layers"),
            ("hidden = [32]".to_string(), "model.layers: kind = \"sequential\" (the default) needs a list of layers"),
            ("layers = []".to_string(), "model.layers: must hold at least one layer"),
            ("kind = \"mlp\"\nchannels = [8, 16]".to_string(), "model.channels: applies to kind = \"cnn\" only"),
        ] {
            let e = err_of(&with_model(&model));
            assert!(e.contains(want), "{model}: {e}");
        }
        let many = "[[model.layers]]\nkind = \"relu\"\n".repeat(257);
        assert!(err_of(&with_model(&many)).contains("257 layers is more than the 256 supported"));
        // An empty [model] keeps naming what is missing.
        assert!(err_of(&with_model("")).contains("model.layers"));
    }

    #[test]
    fn preset_keys_keep_their_defaults() {
        let m = JobSpec::parse(&with_model("kind = \"cnn\"")).unwrap().model;
        assert_eq!((m.preset(), m.model_kind(), m.hidden_sizes(), m.conv_channels(), m.layers.as_ref()), (Some(ModelKind::Cnn), ModelKind::Cnn, vec![128], [32, 64], None));
        let m = JobSpec::parse(&with_model("kind = \"mlp\"")).unwrap().model;
        assert_eq!((m.preset(), m.hidden_sizes()), (Some(ModelKind::Mlp), vec![512, 256]));
        let lit = ModelSpec { kind: "mlp".into(), hidden: Some(vec![8]), ..Default::default() };
        assert_eq!(
            lit.layer_list(&[4], 3).unwrap(),
            [LayerSpec::Linear { out: 8, bias: true }, LayerSpec::Relu, LayerSpec::Linear { out: 3, bias: true }]
        );
        assert!(ModelSpec::default().layer_list(&[4], 3).unwrap_err().to_string().contains("model.layers"));
    }

    #[test]
    fn rejects_wrong_type_naming_key() {
        let e = err_of(&GOOD.replace("epochs = 2", "epochs = \"two\""));
        assert!(e.contains("epochs"), "{e}");
    }
}
