//! The multilayer perceptron used for every model of the paper.

use crate::{Error, Result};
use tch::{nn, Device, Kind, Tensor};

/// Prefix of the checkpoint entries that hold the configuration rather than weights.
pub const CONFIG_PREFIX: &str = "__config__.";
const SIZES_KEY: &str = "__config__.sizes";
const DROPOUT_KEY: &str = "__config__.dropout";
const MAX_NORM_KEY: &str = "__config__.max_norm";

/// Shape and regularization of an [`Mlp`].
///
/// `sizes` lists every layer's width, input first and classes last, e.g. `[784, 1200, 1200, 10]`.
/// Dropout rates are probabilities of dropping a unit in `[0, 1)`; `max_norm = Some(c)` bounds
/// the L2 norm of each unit's incoming weight vector by `c` (see [`Mlp::apply_max_norm`]).
#[derive(Clone, Debug, PartialEq)]
pub struct MlpConfig {
    /// Layer widths: input, hidden layers, classes.
    pub sizes: Vec<i64>,
    /// Dropout probability on the input units (training only).
    pub input_dropout: f64,
    /// Dropout probability on every hidden layer's units (training only).
    pub hidden_dropout: f64,
    /// Max-norm bound on each unit's incoming weights, if any.
    pub max_norm: Option<f64>,
}

impl Default for MlpConfig {
    /// The paper's unregularized MNIST student, 784-800-800-10.
    fn default() -> Self {
        Self::mnist_student()
    }
}

impl MlpConfig {
    /// A plain ReLU network with no dropout and no weight constraint.
    pub fn plain(sizes: impl Into<Vec<i64>>) -> Self {
        MlpConfig { sizes: sizes.into(), input_dropout: 0.0, hidden_dropout: 0.0, max_norm: None }
    }

    /// The paper's MNIST teacher: 784-1200-1200-10 with 20% input dropout, 50% hidden dropout
    /// and max-norm 3.5 (the recipe of Hinton et al. 2012, arXiv 1207.0580; the paper does not
    /// give the values).
    pub fn mnist_teacher() -> Self {
        MlpConfig { sizes: vec![784, 1200, 1200, 10], input_dropout: 0.2, hidden_dropout: 0.5, max_norm: Some(3.5) }
    }

    /// The paper's MNIST student: 784-800-800-10, no regularization.
    pub fn mnist_student() -> Self {
        Self::plain([784, 800, 800, 10])
    }

    /// The paper's acoustic model: 26 frames x 40 filterbanks in, 8 hidden layers of 2560 ReLU,
    /// a softmax over 14,000 tied HMM states (about 85M parameters).
    pub fn acoustic_dnn() -> Self {
        let mut sizes = vec![26 * 40];
        sizes.extend([2560; 8]);
        sizes.push(14_000);
        Self::plain(sizes)
    }

    /// Number of input features.
    pub fn input_dim(&self) -> i64 {
        self.sizes.first().copied().unwrap_or(0)
    }

    /// Number of classes (width of the output layer).
    pub fn num_classes(&self) -> i64 {
        self.sizes.last().copied().unwrap_or(0)
    }

    /// Number of trainable parameters: `sum_l (n_{l-1} + 1) n_l`.
    pub fn num_params(&self) -> i64 {
        self.sizes.windows(2).map(|w| (w[0] + 1) * w[1]).sum()
    }

    /// Checks the sizes and rates, naming the offending field.
    pub fn validate(&self) -> Result<()> {
        if self.sizes.len() < 2 {
            return Err(Error::Config(format!(
                "sizes must list at least an input and an output width, got {:?}",
                self.sizes
            )));
        }
        if let Some(bad) = self.sizes.iter().find(|&&s| s <= 0) {
            return Err(Error::Config(format!("every layer width must be positive, got {bad} in {:?}", self.sizes)));
        }
        for (name, p) in [("input_dropout", self.input_dropout), ("hidden_dropout", self.hidden_dropout)] {
            if !(0.0..1.0).contains(&p) {
                return Err(Error::Config(format!("{name} must be in [0, 1), got {p}")));
            }
        }
        if let Some(c) = self.max_norm {
            if !(c.is_finite() && c > 0.0) {
                return Err(Error::Config(format!("max_norm must be positive, got {c}")));
            }
        }
        Ok(())
    }

    /// `784-1200-1200-10` style description.
    pub fn describe(&self) -> String {
        self.sizes.iter().map(i64::to_string).collect::<Vec<_>>().join("-")
    }
}

/// A ReLU multilayer perceptron with dropout and a max-norm constraint.
///
/// Layers live under named sub-paths `hidden1`, `hidden2`, ..., `output`, so checkpoint keys
/// (`hidden1.weight`, `output.bias`, ...) never depend on construction order.
#[derive(Debug)]
pub struct Mlp {
    hidden: Vec<nn::Linear>,
    output: nn::Linear,
    config: MlpConfig,
    compute: Kind,
}

impl Mlp {
    /// Builds the network under `vs` with PyTorch's default initialization of linear layers.
    pub fn new(vs: &nn::Path, config: MlpConfig) -> Result<Self> {
        config.validate()?;
        let n = config.sizes.len();
        let hidden = (1..n - 1)
            .map(|l| nn::linear(vs / format!("hidden{l}"), config.sizes[l - 1], config.sizes[l], Default::default()))
            .collect();
        let output = nn::linear(vs / "output", config.sizes[n - 2], config.sizes[n - 1], Default::default());
        Ok(Mlp { hidden, output, config, compute: Kind::Float })
    }

    /// Runs the forward pass in `kind` (e.g. `Kind::BFloat16`) while the weights stay in their
    /// own kind (f32 master weights): inputs and weights are cast at each layer, gradients flow
    /// back through the casts to the f32 weights, and the logits come back as f32.
    ///
    /// ```
    /// use kd_models::{Mlp, MlpConfig};
    /// use tch::{nn, nn::ModuleT, Device, Kind, Tensor};
    /// let vs = nn::VarStore::new(Device::Cpu);
    /// let net = Mlp::new(&vs.root(), MlpConfig::plain([4, 8, 3]))?.with_compute_kind(Kind::BFloat16);
    /// let logits = net.forward_t(&Tensor::ones([2, 4], (Kind::Float, Device::Cpu)), false);
    /// assert_eq!(logits.kind(), Kind::Float);
    /// # Ok::<(), kd_models::Error>(())
    /// ```
    pub fn with_compute_kind(mut self, kind: Kind) -> Self {
        self.compute = kind;
        self
    }

    /// A copy of this network for inference (a teacher, an ensemble member, an evaluation pass)
    /// whose weights are converted to the compute kind once, detached, instead of at every
    /// layer of every forward pass: `W_k = W.to(compute kind)`, then `forward_t` uses `W_k` as
    /// it is. Its outputs equal this network's bit for bit.
    ///
    /// Take it while the weights are fixed: in f32 it shares their storage (no copy), in bf16 it
    /// is a snapshot (half the weights' memory again). It has no gradients and no `VarStore`.
    ///
    /// ```
    /// use kd_models::{Mlp, MlpConfig};
    /// use tch::{nn, nn::ModuleT, Device, Kind, Tensor};
    /// let vs = nn::VarStore::new(Device::Cpu);
    /// let net = Mlp::new(&vs.root(), MlpConfig::plain([4, 8, 3]))?.with_compute_kind(Kind::BFloat16);
    /// let frozen = net.frozen();
    /// let x = Tensor::ones([2, 4], (Kind::Float, Device::Cpu));
    /// assert!(frozen.forward_t(&x, false).equal(&net.forward_t(&x, false)));
    /// # Ok::<(), kd_models::Error>(())
    /// ```
    pub fn frozen(&self) -> Mlp {
        let k = self.compute;
        let cast = |t: &Tensor| if t.kind() == k { t.detach() } else { t.detach().to_kind(k) };
        let layer = |l: &nn::Linear| nn::Linear { ws: cast(&l.ws), bs: l.bs.as_ref().map(cast) };
        Mlp {
            hidden: self.hidden.iter().map(layer).collect(),
            output: layer(&self.output),
            config: self.config.clone(),
            compute: k,
        }
    }

    /// The kind the forward pass computes in.
    pub fn compute_kind(&self) -> Kind {
        self.compute
    }

    /// Multiply-adds of one forward pass per example, `sum_l n_{l-1} n_l` over the layers
    /// (one per weight; biases and ReLUs are additions and comparisons): what inference costs,
    /// the figure to set against accuracy when a distilled network replaces a larger one. A
    /// training step costs about three times that in multiply-adds (forward, and the two
    /// products of the backward pass), so `6 * forward_macs` floating-point operations.
    ///
    /// ```
    /// use kd_models::{Mlp, MlpConfig};
    /// let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    /// let student = Mlp::new(&vs.root(), MlpConfig::mnist_student())?;
    /// assert_eq!(student.forward_macs(), 784 * 800 + 800 * 800 + 800 * 10);
    /// # Ok::<(), kd_models::Error>(())
    /// ```
    pub fn forward_macs(&self) -> i64 {
        self.config.sizes.windows(2).map(|w| w[0] * w[1]).sum()
    }

    /// The configuration this network was built from.
    pub fn config(&self) -> &MlpConfig {
        &self.config
    }

    /// Number of trainable parameters.
    pub fn num_params(&self) -> i64 {
        self.config.num_params()
    }

    fn layers(&self) -> impl Iterator<Item = &nn::Linear> {
        self.hidden.iter().chain(std::iter::once(&self.output))
    }

    /// Projects each unit's incoming weight vector onto the ball of radius `c`:
    /// `W[j, :] <- W[j, :] * min(1, c / ||W[j, :]||_2)`, for every layer. Call it after each
    /// optimizer step; it does nothing when the config has no `max_norm`.
    ///
    /// On the CPU, where reading a value costs no device synchronization, a layer whose rows
    /// are all inside the ball is left untouched, which saves a write pass over its weights.
    pub fn apply_max_norm(&self) {
        let Some(c) = self.config.max_norm else { return };
        tch::no_grad(|| {
            for layer in self.layers() {
                let mut w = layer.ws.shallow_clone();
                if w.device() == Device::Cpu {
                    let largest = w.norm_scalaropt_dim(2, [1], false).max();
                    if f64::try_from(&largest).is_ok_and(|n| n <= c) {
                        continue;
                    }
                }
                let _ = w.renorm_(2.0, 0, c);
            }
        });
    }

    /// The weights plus the configuration as named tensors, ready for `Tensor::write_safetensors`.
    pub fn to_tensors(&self, vs: &nn::VarStore) -> Vec<(String, Tensor)> {
        let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let c = &self.config;
        named.push((SIZES_KEY.into(), Tensor::from_slice(&c.sizes)));
        named.push((DROPOUT_KEY.into(), Tensor::from_slice(&[c.input_dropout, c.hidden_dropout])));
        named.push((MAX_NORM_KEY.into(), Tensor::from_slice(&[c.max_norm.unwrap_or(0.0)])));
        named
    }

    /// Reads the configuration stored by [`Mlp::to_tensors`].
    pub fn config_from_tensors(named: &[(String, Tensor)]) -> Result<MlpConfig> {
        let get = |key: &str| {
            named
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, t)| t)
                .ok_or_else(|| Error::Checkpoint(format!("no `{key}` entry: not a kd-models MLP checkpoint")))
        };
        let sizes = Vec::<i64>::try_from(get(SIZES_KEY)?.f_to_kind(Kind::Int64)?)?;
        let dropout = Vec::<f64>::try_from(get(DROPOUT_KEY)?.f_to_kind(Kind::Double)?)?;
        let max_norm = Vec::<f64>::try_from(get(MAX_NORM_KEY)?.f_to_kind(Kind::Double)?)?;
        let (&[input_dropout, hidden_dropout], &[max_norm]) = (dropout.as_slice(), max_norm.as_slice()) else {
            return Err(Error::Checkpoint(format!(
                "malformed config entries: dropout {dropout:?}, max_norm {max_norm:?}"
            )));
        };
        let config = MlpConfig { sizes, input_dropout, hidden_dropout, max_norm: (max_norm > 0.0).then_some(max_norm) };
        config.validate().map_err(|e| Error::Checkpoint(e.to_string()))?;
        Ok(config)
    }

    /// Builds a network from a checkpoint made by [`Mlp::to_tensors`], on `device`.
    ///
    /// Fails, listing them, if any weight is missing, has the wrong shape, or if the checkpoint
    /// holds entries the network does not have: a model is never left half-initialized. The
    /// shapes are checked against the stored configuration before the network is allocated, so
    /// a corrupt configuration claiming huge layers is an error, not an allocation.
    pub fn from_tensors(named: &[(String, Tensor)], device: Device) -> Result<(nn::VarStore, Mlp)> {
        let config = Self::config_from_tensors(named)?;
        check_entries(&config, named)?;
        let vs = nn::VarStore::new(device);
        let net = Mlp::new(&vs.root(), config)?;
        load_into(&vs, named)?;
        Ok((vs, net))
    }
}

/// The name and shape of every weight of a network with `config`, as [`Mlp::new`] makes them.
fn weight_shapes(config: &MlpConfig) -> Vec<(String, Vec<i64>)> {
    let s = &config.sizes;
    let n = s.len();
    let layer = |name: String, fan_in: i64, fan_out: i64| {
        [(format!("{name}.weight"), vec![fan_out, fan_in]), (format!("{name}.bias"), vec![fan_out])]
    };
    let mut out: Vec<_> = (1..n - 1).flat_map(|l| layer(format!("hidden{l}"), s[l - 1], s[l])).collect();
    out.extend(layer("output".into(), s[n - 2], s[n - 1]));
    out
}

/// Fails, listing them, on entries of `named` that are missing, unexpected or misshapen for a
/// network with `config` (a validated one: at least two sizes).
fn check_entries(config: &MlpConfig, named: &[(String, Tensor)]) -> Result<()> {
    let mut want: std::collections::HashMap<String, Vec<i64>> = weight_shapes(config).into_iter().collect();
    let mut problems = Vec::new();
    for (name, value) in named.iter().filter(|(k, _)| !k.starts_with(CONFIG_PREFIX)) {
        match want.remove(name) {
            None => problems.push(format!("unexpected entry `{name}`")),
            Some(shape) if value.size() == shape => {}
            Some(shape) => problems
                .push(format!("`{name}` has shape {:?} in the checkpoint but {shape:?} in the model", value.size())),
        }
    }
    let mut missing: Vec<_> = want.keys().map(|k| format!("missing entry `{k}`")).collect();
    missing.sort();
    problems.extend(missing);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Checkpoint(problems.join("; ")))
    }
}

/// Copies `named`, checked by [`check_entries`], into the variables of `vs`.
fn load_into(vs: &nn::VarStore, named: &[(String, Tensor)]) -> Result<()> {
    let vars = vs.variables();
    tch::no_grad(|| {
        for (name, value) in named.iter().filter(|(k, _)| !k.starts_with(CONFIG_PREFIX)) {
            let mut var =
                vars.get(name).ok_or_else(|| Error::Checkpoint(format!("unexpected entry `{name}`")))?.shallow_clone();
            var.f_copy_(value)?;
        }
        Ok(())
    })
}

/// Which rows of a larger batch a forward pass holds: rows `start ..` of a batch of `batch`
/// examples, as a rank of data-parallel training holds its share of the global batch.
///
/// With it, [`Mlp::forward_rows`] draws each dropout mask `m ~ Bernoulli(1 - p)` for the whole
/// `[batch, width]` and keeps the rows it holds, so that ranks sharing one random stream draw
/// exactly the masks one process training on the whole batch would, and results do not depend
/// on how many ranks share a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchRows {
    /// The first row held.
    pub start: i64,
    /// Rows of the whole batch.
    pub batch: i64,
}

/// `h * m / (1 - p)` with `m ~ Bernoulli(1 - p)` drawn for all of `rows`' batch (libtorch's
/// dropout draws `m` for `h` alone; on a CPU both draw the same values for a whole batch).
fn dropout_rows(h: &Tensor, p: f64, rows: BatchRows) -> Tensor {
    let (n, width) = (h.size()[0], h.size()[1]);
    let mut noise = Tensor::empty([rows.batch, width], (h.kind(), h.device()));
    let _ = noise.bernoulli_float_(1.0 - p);
    // A copy of the rows held, so that backward keeps `[n, width]` alive, not the whole batch's.
    let noise = noise.narrow(0, rows.start, n).copy() / (1.0 - p);
    h * noise
}

impl Mlp {
    /// [`nn::ModuleT::forward_t`] for rows `rows` of a larger batch (`None`: `xs` is the whole
    /// batch): the same logits, with dropout masks drawn for the whole batch (see
    /// [`BatchRows`]).
    ///
    /// ```
    /// use kd_models::{BatchRows, Mlp, MlpConfig};
    /// use tch::{nn, Device, Kind, Tensor};
    ///
    /// let vs = nn::VarStore::new(Device::Cpu);
    /// let config = MlpConfig { hidden_dropout: 0.5, ..MlpConfig::plain(vec![4, 8, 3]) };
    /// let net = Mlp::new(&vs.root(), config).unwrap();
    /// let x = Tensor::randn([6, 4], (Kind::Float, Device::Cpu));
    /// tch::manual_seed(7);
    /// let whole = net.forward_rows(&x, true, Some(BatchRows { start: 0, batch: 6 }));
    /// tch::manual_seed(7);
    /// let last = net.forward_rows(&x.narrow(0, 4, 2), true, Some(BatchRows { start: 4, batch: 6 }));
    /// assert!(whole.narrow(0, 4, 2).allclose(&last, 1e-6, 1e-6, false));
    /// ```
    pub fn forward_rows(&self, xs: &Tensor, train: bool, rows: Option<BatchRows>) -> Tensor {
        self.forward_cut(xs, train, rows, false).logits
    }

    /// The trainable tensors of each layer, `[weight, bias]`, from the first hidden layer to the
    /// output layer: the order in which [`LayerwiseForward::backward`] hands over gradients
    /// (reversed).
    pub fn layer_parameters(&self) -> Vec<Vec<Tensor>> {
        self.layers().map(|l| std::iter::once(&l.ws).chain(&l.bs).map(Tensor::shallow_clone).collect()).collect()
    }

    /// [`Mlp::forward_rows`] cut at every layer's input, so that the backward pass can run one
    /// layer at a time (see [`LayerwiseForward`]). The logits are the same.
    ///
    /// ```
    /// use kd_models::{Mlp, MlpConfig};
    /// use tch::{nn, Device, Kind, Tensor};
    ///
    /// let vs = nn::VarStore::new(Device::Cpu);
    /// let net = Mlp::new(&vs.root(), MlpConfig::plain([4, 8, 8, 3]))?;
    /// let x = Tensor::randn([5, 4], (Kind::Float, Device::Cpu));
    /// let forward = net.forward_layerwise(&x, true, None);
    /// let loss = forward.logits().square().mean(Kind::Float);
    /// let mut seen = vec![];
    /// forward.backward(&loss, |layer, grads| {
    ///     // Update layer `layer` here: its gradients are dropped when this returns.
    ///     assert_eq!(grads.len(), 2);
    ///     seen.push(layer);
    ///     Ok::<(), tch::TchError>(())
    /// })?;
    /// assert_eq!(seen, [2, 1, 0]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn forward_layerwise(&self, xs: &Tensor, train: bool, rows: Option<BatchRows>) -> LayerwiseForward {
        self.forward_cut(xs, train, rows, true)
    }

    /// The forward pass; with `cut`, each layer after the first reads a detached copy of the
    /// previous layer's output that requires a gradient (a leaf), and the segments are kept.
    fn forward_cut(&self, xs: &Tensor, train: bool, rows: Option<BatchRows>, cut: bool) -> LayerwiseForward {
        let drop = |h: Tensor, p: f64| -> Tensor {
            if !train || p <= 0.0 {
                return h;
            }
            match rows {
                Some(rows) => dropout_rows(&h, p, rows),
                None => h.dropout(p, true),
            }
        };
        let c = &self.config;
        let k = self.compute;
        // On the CPU, layers of a large enough batch run their forward product on oneDNN with
        // the ReLU fused (kd_native::linear), with PyTorch's backward pass.
        let linear = |h: &Tensor, layer: &nn::Linear, relu: bool| -> Tensor {
            if k == layer.ws.kind() {
                kd_native::linear::linear(h, &layer.ws, layer.bs.as_ref(), relu)
            } else {
                let bias = layer.bs.as_ref().map(|b| b.to_kind(k));
                kd_native::linear::linear(h, &layer.ws.to_kind(k), bias.as_ref(), relu)
            }
        };
        let xs = if xs.kind() == k { xs.shallow_clone() } else { xs.to_kind(k) };
        let mut h = drop(xs, c.input_dropout);
        let mut segments = Vec::new();
        let mut leaf = None;
        for layer in &self.hidden {
            h = drop(linear(&h, layer, true), c.hidden_dropout);
            if cut {
                let next = h.detach().set_requires_grad(true);
                segments.push(Segment { input: leaf.replace(next.shallow_clone()), output: h });
                h = next;
            }
        }
        let logits = linear(&h, &self.output, false);
        let logits = if logits.kind() == Kind::Float { logits } else { logits.to_kind(Kind::Float) };
        if cut {
            segments.push(Segment { input: leaf, output: logits.shallow_clone() });
        }
        LayerwiseForward { logits, segments, params: if cut { self.layer_parameters() } else { vec![] } }
    }
}

/// A forward pass cut at every layer ([`Mlp::forward_layerwise`]), whose backward pass runs one
/// layer at a time, from the output layer down, handing each layer's gradients over before the
/// next layer's are computed.
///
/// Layer `l` maps its input `h_{l-1}` to `h_l`; the backward pass computes
/// `(dL/dW_l, dL/db_l, dL/dh_{l-1})` from `dL/dh_l` with autograd on that layer's piece of the
/// graph alone, then frees the piece. A caller that applies the optimizer to layer `l` as its
/// gradients arrive (the optimizer step fused into the backward pass) holds one layer's
/// gradients at a time instead of the whole network's: for the 8 x 2560 / 14,000-state network
/// the output layer's 35.9M of 84.4M parameters. The gradients equal those of one backward pass
/// through the uncut graph, value for value: `dL/dh_{l-1}` is computed before `W_l` is updated.
pub struct LayerwiseForward {
    logits: Tensor,
    segments: Vec<Segment>,
    params: Vec<Vec<Tensor>>,
}

/// One layer's piece of the graph: from its input (a leaf; `None` for the first layer, whose
/// input needs no gradient) to its output (the logits for the last layer).
struct Segment {
    input: Option<Tensor>,
    output: Tensor,
}

impl LayerwiseForward {
    /// The logits `[batch, classes]`, f32, attached to the last layer's piece of the graph.
    pub fn logits(&self) -> &Tensor {
        &self.logits
    }

    /// Backpropagates `loss` (a scalar computed from [`LayerwiseForward::logits`]) one layer at
    /// a time, from the output layer to the first hidden layer, calling `update(l, grads)` with
    /// layer `l`'s gradients in the order of [`Mlp::layer_parameters`]`()[l]` (`[dW_l, db_l]`).
    /// `update` may change layer `l`'s parameters in place: no later piece of the backward pass
    /// reads them. The pass stops at the first error `update` returns.
    pub fn backward<E: From<tch::TchError>>(
        self,
        loss: &Tensor,
        mut update: impl FnMut(usize, Vec<Tensor>) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        let LayerwiseForward { logits, segments, params } = self;
        drop(logits);
        let mut upstream: Option<Tensor> = None;
        for (l, (segment, params)) in segments.into_iter().zip(params).enumerate().rev() {
            // dL/dh_l enters as the gradient of <h_l, dL/dh_l>, whose gradient is exactly it.
            let root = match upstream.take() {
                None => loss.shallow_clone(),
                Some(g) => (&segment.output * g).sum(segment.output.kind()),
            };
            let mut wrt: Vec<&Tensor> = params.iter().collect();
            wrt.extend(&segment.input);
            let mut grads = Tensor::f_run_backward(&[root], &wrt, false, false)?;
            if segment.input.is_some() {
                upstream = grads.pop();
            }
            drop(segment);
            update(l, grads)?;
        }
        Ok(())
    }
}

impl nn::ModuleT for Mlp {
    /// Logits `[batch, classes]` for inputs `[batch, input_dim]`; dropout only when `train`.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.forward_rows(xs, train, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::ModuleT;

    #[test]
    fn bf16_compute_tracks_f32_and_trains_the_f32_weights() {
        let _generator = kd_core::seed_global_generator(3);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = Mlp::new(&vs.root(), MlpConfig::plain([20, 64, 64, 5])).unwrap();
        let x = Tensor::randn([16, 20], (Kind::Float, Device::Cpu));
        let exact = net.forward_t(&x, false);
        let net = net.with_compute_kind(Kind::BFloat16);
        let low = net.forward_t(&x, false);
        assert_eq!(low.kind(), Kind::Float);
        let gap = f64::try_from((&low - &exact).abs().max()).unwrap();
        let scale = f64::try_from(exact.abs().max()).unwrap();
        assert!(gap > 0.0 && gap < 0.03 * scale, "bf16 rounds, but stays close: {gap} vs {scale}");
        low.sum(Kind::Float).backward();
        for (name, w) in vs.variables() {
            assert_eq!(w.kind(), Kind::Float, "{name} stays f32");
            assert_eq!(w.grad().kind(), Kind::Float, "{name} gets an f32 gradient");
            assert!(f64::try_from(w.grad().abs().sum(Kind::Float)).unwrap() > 0.0, "{name}");
        }
        // (20*64) + (64*64) + (64*5) multiply-adds per example.
        assert_eq!(net.forward_macs(), 1280 + 4096 + 320);
    }

    #[test]
    fn forward_macs_match_the_weights_and_pytorchs_flop_counter() {
        // Building a network draws its initial weights from libtorch's global generator.
        let _generator = kd_core::lock_global_generator();
        // PyTorch's own count of the same networks (nn.Sequential of Linear and ReLU), half its
        // FLOP count (an addmm of [1, m] x [m, n] counts 2 m n):
        //   with torch.utils.flop_counter.FlopCounterMode(display=False) as f, torch.inference_mode():
        //       net(torch.rand(1, sizes[0]))
        //   f.get_total_flops() // 2
        let cases = [
            (MlpConfig::mnist_teacher(), 2_392_800),
            (MlpConfig::mnist_student(), 1_275_200),
            (MlpConfig::plain([784, 128, 128, 10]), 118_016),
            (MlpConfig::plain([784, 32, 32, 10]), 26_432),
        ];
        for (config, pytorch) in cases {
            let vs = nn::VarStore::new(Device::Cpu);
            let net = Mlp::new(&vs.root(), config.clone()).unwrap();
            assert_eq!(net.forward_macs(), pytorch, "{}", config.describe());
            // One multiply-add per weight-matrix entry and example: the weights the network holds.
            let weights: i64 = net.layers().map(|l| l.ws.numel() as i64).sum();
            assert_eq!(net.forward_macs(), weights, "{}", config.describe());
            // Biases are parameters too, but additions alone.
            let biases: i64 = net.layers().map(|l| l.bs.as_ref().map_or(0, |b| b.numel() as i64)).sum();
            assert_eq!(net.num_params(), weights + biases);
        }
    }

    #[test]
    fn layerwise_backward_gives_the_gradients_of_one_backward_pass() {
        let _generator = kd_core::lock_global_generator();
        // Dropout on the input and hidden layers (the same masks from the same seed), f32 and
        // bf16 compute: the cut graph's gradients, layer by layer, equal the uncut graph's.
        let config = MlpConfig { input_dropout: 0.2, hidden_dropout: 0.5, ..MlpConfig::plain([12, 16, 16, 16, 5]) };
        let x = Tensor::randn([9, 12], (Kind::Float, Device::Cpu));
        let target = Tensor::randn([9, 5], (Kind::Float, Device::Cpu));
        for kind in [Kind::Float, Kind::BFloat16] {
            tch::manual_seed(11);
            let vs = nn::VarStore::new(Device::Cpu);
            let net = Mlp::new(&vs.root(), config.clone()).unwrap().with_compute_kind(kind);
            let params: Vec<Tensor> = net.layer_parameters().into_iter().flatten().collect();
            tch::manual_seed(5);
            let logits = net.forward_t(&x, true);
            let loss = (&logits - &target).square().mean(Kind::Float);
            let whole = Tensor::run_backward(&[&loss], &params, false, false);
            tch::manual_seed(5);
            let forward = net.forward_layerwise(&x, true, None);
            assert!(forward.logits().equal(&logits), "{kind:?}: same logits");
            let loss = (forward.logits() - &target).square().mean(Kind::Float);
            let mut order = vec![];
            forward
                .backward(&loss, |l, grads| {
                    order.push(l);
                    for (j, g) in grads.iter().enumerate() {
                        let want = &whole[2 * l + j];
                        assert!(
                            g.equal(want),
                            "{kind:?}: layer {l} tensor {j} differs by {:?}",
                            (g - want).abs().max()
                        );
                    }
                    Ok::<(), tch::TchError>(())
                })
                .unwrap();
            assert_eq!(order, [3, 2, 1, 0]);
        }
    }

    #[test]
    fn frozen_copy_holds_compute_kind_weights_and_gives_the_same_outputs() {
        let _generator = kd_core::lock_global_generator();
        let x = Tensor::randn([8, 10], (Kind::Float, Device::Cpu));
        for kind in [Kind::Float, Kind::BFloat16] {
            let vs = nn::VarStore::new(Device::Cpu);
            let net = Mlp::new(&vs.root(), MlpConfig::plain([10, 32, 16, 6])).unwrap().with_compute_kind(kind);
            let frozen = net.frozen();
            assert!(frozen.layers().all(|l| l.ws.kind() == kind && !l.ws.requires_grad()), "{kind:?}");
            assert!(frozen.forward_t(&x, false).equal(&net.forward_t(&x, false)), "{kind:?}: same outputs");
        }
    }

    #[test]
    fn preset_parameter_counts() {
        // (784*1200 + 1200) + (1200*1200 + 1200) + (1200*10 + 10)
        assert_eq!(MlpConfig::mnist_teacher().num_params(), 2_395_210);
        // (784*800 + 800) + (800*800 + 800) + (800*10 + 10)
        assert_eq!(MlpConfig::mnist_student().num_params(), 1_276_810);
        // (1040*2560 + 2560) + 7 (2560*2560 + 2560) + (2560*14000 + 14000)
        assert_eq!(MlpConfig::acoustic_dnn().num_params(), 84_412_080);
        assert_eq!(MlpConfig::acoustic_dnn().sizes.len(), 10);
    }

    #[test]
    fn built_network_has_the_counted_parameters_and_named_layers() {
        let _generator = kd_core::lock_global_generator();
        let vs = nn::VarStore::new(Device::Cpu);
        let net = Mlp::new(&vs.root(), MlpConfig::mnist_teacher()).unwrap();
        let counted: i64 = vs.trainable_variables().iter().map(Tensor::numel).sum::<usize>() as i64;
        assert_eq!(counted, net.num_params());
        let mut names: Vec<_> = vs.variables().into_keys().collect();
        names.sort();
        assert_eq!(
            names,
            ["hidden1.bias", "hidden1.weight", "hidden2.bias", "hidden2.weight", "output.bias", "output.weight"]
        );
        assert_eq!(vs.variables()["hidden2.weight"].size(), [1200, 1200]);
    }

    #[test]
    fn invalid_configs_are_rejected_naming_the_field() {
        let _generator = kd_core::lock_global_generator();
        let cases: [(MlpConfig, &str); 5] = [
            (MlpConfig::plain([784]), "at least an input and an output"),
            (MlpConfig::plain([784, 0, 10]), "positive"),
            (MlpConfig { input_dropout: 1.0, ..MlpConfig::mnist_student() }, "input_dropout"),
            (MlpConfig { hidden_dropout: -0.1, ..MlpConfig::mnist_student() }, "hidden_dropout"),
            (MlpConfig { max_norm: Some(0.0), ..MlpConfig::mnist_student() }, "max_norm"),
        ];
        for (config, expected) in cases {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(expected), "{config:?}: {err}");
        }
    }

    #[test]
    fn dropout_is_active_only_in_training() {
        let _generator = kd_core::lock_global_generator();
        let vs = nn::VarStore::new(Device::Cpu);
        let config = MlpConfig { input_dropout: 0.5, hidden_dropout: 0.5, ..MlpConfig::plain([20, 30, 5]) };
        let net = Mlp::new(&vs.root(), config).unwrap();
        let x = Tensor::ones([8, 20], (Kind::Float, Device::Cpu));
        let eval1 = net.forward_t(&x, false);
        let eval2 = net.forward_t(&x, false);
        assert!(eval1.equal(&eval2), "evaluation must be deterministic");
        let train = net.forward_t(&x, true);
        assert!(!train.allclose(&eval1, 1e-6, 1e-6, false), "training forward must apply dropout");
    }

    #[test]
    fn max_norm_bounds_every_row_and_leaves_small_rows_alone() {
        let _generator = kd_core::lock_global_generator();
        let vs = nn::VarStore::new(Device::Cpu);
        let config = MlpConfig { max_norm: Some(1.0), ..MlpConfig::plain([4, 3, 2]) };
        let net = Mlp::new(&vs.root(), config).unwrap();
        let mut w = vs.variables()["hidden1.weight"].shallow_clone();
        let rows = Tensor::from_slice(&[3.0f32, 4.0, 0.0, 0.0, 0.1, 0.2, 0.2, 0.4, 0.0, 0.0, 0.0, 2.0]).view([3, 4]);
        tch::no_grad(|| w.copy_(&rows));
        net.apply_max_norm();
        let norms = Vec::<f32>::try_from(w.norm_scalaropt_dim(2, [1], false)).unwrap();
        // Row 0 has norm 5 -> scaled to 1; row 1 has norm 0.5 -> untouched; row 2 has norm 2 -> 1.
        assert!((norms[0] - 1.0).abs() < 1e-5 && (norms[1] - 0.5).abs() < 1e-6 && (norms[2] - 1.0).abs() < 1e-5);
        let row0 = Vec::<f32>::try_from(w.get(0)).unwrap();
        assert!((row0[0] - 0.6).abs() < 1e-5 && (row0[1] - 0.8).abs() < 1e-5, "direction kept: {row0:?}");
        let out_norms =
            Vec::<f32>::try_from(vs.variables()["output.weight"].norm_scalaropt_dim(2, [1], false)).unwrap();
        assert!(out_norms.iter().all(|&n| n <= 1.0 + 1e-5));
    }

    #[test]
    fn checkpoint_round_trip_restores_config_and_outputs() {
        let _generator = kd_core::lock_global_generator();
        tch::no_grad(|| {
            let vs = nn::VarStore::new(Device::Cpu);
            let config = MlpConfig {
                input_dropout: 0.2,
                hidden_dropout: 0.5,
                max_norm: Some(3.5),
                ..MlpConfig::plain([6, 5, 4, 3])
            };
            let net = Mlp::new(&vs.root(), config.clone()).unwrap();
            let named = net.to_tensors(&vs);
            let (_vs2, net2) = Mlp::from_tensors(&named, Device::Cpu).unwrap();
            assert_eq!(net2.config(), &config);
            let x = Tensor::from_slice(&[0.5f32; 12]).view([2, 6]);
            assert!(net.forward_t(&x, false).equal(&net2.forward_t(&x, false)));
        });
    }

    #[test]
    fn loading_reports_missing_unexpected_and_misshapen_entries() {
        let _generator = kd_core::lock_global_generator();
        let vs = nn::VarStore::new(Device::Cpu);
        let net = Mlp::new(&vs.root(), MlpConfig::plain([6, 5, 3])).unwrap();
        let mut named = net.to_tensors(&vs);
        named.retain(|(k, _)| k != "output.bias");
        named.push(("extra.weight".into(), Tensor::zeros([1], (Kind::Float, Device::Cpu))));
        for (k, t) in named.iter_mut() {
            if k == "hidden1.weight" {
                *t = Tensor::zeros([5, 7], (Kind::Float, Device::Cpu));
            }
        }
        let err = Mlp::from_tensors(&named, Device::Cpu).unwrap_err().to_string();
        for expected in
            ["missing entry `output.bias`", "unexpected entry `extra.weight`", "`hidden1.weight` has shape [5, 7]"]
        {
            assert!(err.contains(expected), "{err}");
        }
        let no_config: Vec<_> =
            net.to_tensors(&vs).into_iter().filter(|(k, _)| !k.starts_with(CONFIG_PREFIX)).collect();
        assert!(Mlp::from_tensors(&no_config, Device::Cpu).unwrap_err().to_string().contains("not a kd-models MLP"));
    }
}
