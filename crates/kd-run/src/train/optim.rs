//! SGD with momentum and Adam, written against libtorch ops so that their state (momentum
//! buffers, moments) can be checkpointed and a killed run resumed exactly.
//!
//! Gradients are passed in, as returned by `Tensor::run_backward`, instead of being
//! accumulated into `.grad` and zeroed again each step. SGD and Adam update all parameters in
//! one call of libtorch's fused kernels (`kd_native::optim`, one pass over each parameter, on
//! the CPU over libtorch's threads; about 20% faster per SGD step than the ops, and Adam 1.6 to
//! 2.2 times the one-thread loop it replaced, docs/benchmarks.md). The per-parameter libtorch-op path (each
//! update one `addcmul_` with a 0-dim learning-rate tensor, free of host syncs on the GPU)
//! stays as the fallback and the tests' reference; all paths leave the same state, so a
//! checkpoint resumes on any of them.

use crate::config::{OptimizerKind, OptimizerSpec};
use anyhow::{bail, Result};
use kd_native::optim::{AdamOptions, Lr, SgdOptions};
use tch::{Kind, Tensor};

/// Whether SGD on the CPU takes libtorch's fused kernel (`_fused_sgd_`) rather than the
/// per-parameter ops; see docs/benchmarks.md for the measurement behind it.
const FUSED_SGD_ON_CPU: bool = true;

/// Which implementation an optimizer step takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// The one measured fastest for the parameters' device and the optimizer.
    Auto,
    /// Per-parameter libtorch ops.
    Ops,
    /// libtorch's fused kernels, all parameters in one call (`kd_native::optim`).
    Fused,
}

/// An optimizer over a fixed list of parameters.
pub struct Optimizer {
    spec: OptimizerSpec,
    params: Vec<Tensor>,
    /// SGD: momentum buffers. Adam: first moments.
    first: Vec<Tensor>,
    /// Adam: second moments (empty for SGD).
    second: Vec<Tensor>,
    /// `-lr` as a 0-dim tensor on the parameters' device.
    neg_lr: Tensor,
    /// The SGD momentum as a 0-dim tensor on the parameters' device.
    momentum_t: Tensor,
    lr: f64,
    momentum: f64,
    steps: i64,
    /// Fused Adam: its per-parameter step counts, created on first use.
    adam_steps: Vec<Tensor>,
    /// The count each of `adam_steps` holds (-1: out of step).
    adam_steps_at: Vec<i64>,
    /// A fused step failed: [`Path::Auto`] takes the libtorch-op path from then on.
    fused_failed: bool,
}

const STATE_PREFIX: &str = "__optimizer__.";

impl Optimizer {
    /// Creates the optimizer with zero state; `params` must be non-empty leaf tensors.
    pub fn new(spec: &OptimizerSpec, params: Vec<Tensor>) -> Self {
        let zeros = |ps: &[Tensor]| ps.iter().map(Tensor::zeros_like).collect::<Vec<_>>();
        let first = match spec.kind {
            OptimizerKind::Sgd if spec.momentum == 0.0 && spec.momentum_start == 0.0 => vec![],
            _ => zeros(&params),
        };
        let second = if spec.kind == OptimizerKind::Adam { zeros(&params) } else { vec![] };
        let device = params.first().map_or(tch::Device::Cpu, Tensor::device);
        let kind = params.first().map_or(Kind::Float, Tensor::kind);
        let scalar = |v: f64| Tensor::from(v).to_kind(kind).to(device);
        Optimizer {
            spec: spec.clone(),
            neg_lr: scalar(-spec.lr),
            momentum_t: scalar(spec.momentum),
            lr: spec.lr,
            momentum: spec.momentum,
            params,
            first,
            second,
            steps: 0,
            adam_steps: vec![],
            adam_steps_at: vec![],
            fused_failed: false,
        }
    }

    /// Sets the learning rate used by the following steps.
    pub fn set_lr(&mut self, lr: f64) {
        if lr != self.lr {
            self.lr = lr;
            let _ = self.neg_lr.fill_(-lr);
        }
    }

    /// Sets the SGD momentum used by the following steps.
    pub fn set_momentum(&mut self, momentum: f64) {
        if momentum != self.momentum {
            self.momentum = momentum;
            let _ = self.momentum_t.fill_(momentum);
        }
    }

    /// Applies one update from `grads` (one per parameter, same order), which it consumes: on the
    /// libtorch-op path a gradient's storage becomes the new momentum buffer. Runs without
    /// autograd.
    pub fn step(&mut self, grads: Vec<Tensor>) {
        self.step_with(grads, Path::Auto);
    }

    /// Starts a step whose parameters are then updated in parts, by [`Optimizer::update_part`]
    /// (the optimizer step fused into a backward pass that delivers gradients layer by layer).
    /// Every parameter must be updated once before the next step begins; the parts together
    /// make the update [`Optimizer::step`] makes.
    pub fn begin_step(&mut self) {
        self.steps += 1;
    }

    /// Updates the parameters at positions `indices` (of the list the optimizer was built with)
    /// from their gradients `grads`, same order, within the step [`Optimizer::begin_step`] began.
    pub fn update_part(&mut self, indices: &[usize], grads: Vec<Tensor>) {
        self.update(indices, grads, Path::Auto);
    }

    /// Whether a step can be captured in a CUDA graph now: every parameter takes libtorch's
    /// fused kernel (which updates the state in place; the op path replaces SGD's buffers with
    /// the gradients' storage) and fused Adam's step counts agree with `steps` (so the capture
    /// records no refill).
    pub fn capturable(&self) -> bool {
        let all: Vec<usize> = (0..self.params.len()).collect();
        let in_step = self.spec.kind == OptimizerKind::Sgd
            || (self.adam_steps.len() == self.params.len() && self.adam_steps_at.iter().all(|&at| at == self.steps));
        self.params.first().is_some_and(|p| p.device().is_cuda())
            && self.auto_path(&all, &self.params) == Path::Fused
            && in_step
    }

    /// The learning rate and momentum a captured step has baked in (libtorch's fused kernels
    /// take them as numbers): a captured step replays only while they are unchanged.
    pub fn hyperparameters(&self) -> (f64, f64) {
        (self.lr, self.momentum)
    }

    /// Counts a step that a replayed CUDA graph made on the device: what [`Optimizer::step`]
    /// does on the host (the step count, fused Adam's counts, which the kernel advanced).
    pub fn replayed_step(&mut self) {
        self.steps += 1;
        for at in &mut self.adam_steps_at {
            if *at == self.steps - 1 {
                *at = self.steps;
            }
        }
    }

    /// Takes the host's count back to `steps` after a capture that failed (whose kernels never
    /// ran): fused Adam's counts are refilled at the next step.
    pub fn rewind(&mut self, steps: i64) {
        self.steps = steps;
        self.adam_steps_at.fill(-1);
    }

    /// Steps taken so far.
    pub fn steps(&self) -> i64 {
        self.steps
    }

    /// The path [`Path::Auto`] takes for the parameters at `indices` and their gradients.
    fn auto_path(&self, indices: &[usize], grads: &[Tensor]) -> Path {
        let Some(first) = indices.first().map(|&i| &self.params[i]) else { return Path::Ops };
        let (device, kind) = (first.device(), first.kind());
        let state = |list: &[Tensor]| if list.is_empty() { vec![] } else { pick(list, indices) };
        let uniform = pick(&self.params, indices)
            .iter()
            .chain(grads)
            .chain(&state(&self.first))
            .chain(&state(&self.second))
            .all(|t| t.device() == device && t.kind() == kind);
        let float = matches!(kind, Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16);
        let fused = uniform && float && grads.len() == indices.len() && !self.fused_failed;
        match (self.spec.kind, device) {
            (OptimizerKind::Sgd, tch::Device::Cpu) if !FUSED_SGD_ON_CPU => Path::Ops,
            _ if fused => Path::Fused,
            _ => Path::Ops,
        }
    }

    /// [`Optimizer::step`] on a chosen path (the tests compare them).
    fn step_with(&mut self, grads: Vec<Tensor>, path: Path) {
        self.begin_step();
        let all: Vec<usize> = (0..self.params.len()).collect();
        self.update(&all, grads, path);
    }

    /// The update of the parameters at `indices` on a chosen path.
    fn update(&mut self, indices: &[usize], grads: Vec<Tensor>, path: Path) {
        let _guard = tch::no_grad_guard();
        let path = if path == Path::Auto { self.auto_path(indices, &grads) } else { path };
        if path == Path::Fused {
            let done = match self.spec.kind {
                OptimizerKind::Sgd => self.fused_sgd(indices, &grads),
                OptimizerKind::Adam => self.fused_adam(indices, &grads),
            };
            match done {
                Ok(()) => return,
                // libtorch checks its inputs before it updates anything.
                Err(e) => {
                    tracing::warn!("fused optimizer step failed ({e}); taking the libtorch-op path from now on");
                    self.fused_failed = true;
                }
            }
        }
        self.ops_step(indices, grads);
    }

    /// SGD through libtorch's fused kernel, all parameters in one call. The buffers hold what
    /// the libtorch-op path leaves in them (`b <- mu b + g`, `g` with weight decay), so a
    /// checkpoint from either path resumes on the other.
    fn fused_sgd(&mut self, indices: &[usize], grads: &[Tensor]) -> kd_native::Result<()> {
        let s = &self.spec;
        let lr = Lr::Value(self.lr);
        let mut params = pick(&self.params, indices);
        let mut first = if self.first.is_empty() { vec![] } else { pick(&self.first, indices) };
        if self.momentum == 0.0 && !first.is_empty() {
            // Momentum 0 (the start of a ramp): libtorch takes no buffers then, yet the buffer
            // must become the gradient for the steps after the ramp. It is the step's direction.
            for ((b, g), p) in first.iter_mut().zip(grads).zip(&params) {
                b.copy_(g);
                if s.weight_decay > 0.0 {
                    let _ = b.g_add_(&p.multiply_scalar(s.weight_decay));
                }
            }
            return kd_native::optim::fused_sgd(&mut params, &first, &mut [], &SgdOptions::default(), lr);
        }
        let opts = SgdOptions {
            momentum: self.momentum,
            dampening: 0.0,
            weight_decay: s.weight_decay,
            nesterov: s.nesterov,
            is_first_step: false,
        };
        kd_native::optim::fused_sgd(&mut params, grads, &mut first, &opts, lr)
    }

    /// Adam through libtorch's fused kernel, the parameters at `indices` in one call. Its step
    /// counts (one 0-dim tensor per parameter) follow `steps`, which alone is checkpointed.
    fn fused_adam(&mut self, indices: &[usize], grads: &[Tensor]) -> kd_native::Result<()> {
        // The kernel increments the counts before reading them.
        let before = self.steps - 1;
        if self.adam_steps.len() != self.params.len() {
            self.adam_steps = kd_native::optim::adam_steps(&self.params);
            self.adam_steps_at = vec![-1; self.params.len()];
        }
        for &i in indices {
            if self.adam_steps_at[i] != before {
                let _ = self.adam_steps[i].fill_(before as f64);
            }
            // Out of step until the kernel has run: a failed call refills the count next time.
            self.adam_steps_at[i] = -1;
        }
        let opts = adam_options(&self.spec);
        let mut counts = pick(&self.adam_steps, indices);
        kd_native::optim::fused_adam(
            &mut pick(&self.params, indices),
            grads,
            &mut pick(&self.first, indices),
            &mut pick(&self.second, indices),
            &mut counts,
            &opts,
            Lr::Value(self.lr),
        )?;
        for &i in indices {
            self.adam_steps_at[i] = self.steps;
        }
        Ok(())
    }

    /// The update of the parameters at `indices` in per-parameter libtorch ops.
    fn ops_step(&mut self, indices: &[usize], grads: Vec<Tensor>) {
        let wd = self.spec.weight_decay;
        for (&i, g) in indices.iter().zip(grads) {
            let mut p = self.params[i].shallow_clone();
            let mut g = if wd > 0.0 { g + p.multiply_scalar(wd) } else { g };
            match self.spec.kind {
                OptimizerKind::Sgd => {
                    if self.first.is_empty() {
                        let _ = p.addcmul_(&g, &self.neg_lr);
                        continue;
                    }
                    if self.spec.nesterov {
                        let buf = &mut self.first[i];
                        let _ = buf.g_mul_scalar_(self.momentum).g_add_(&g);
                        let _ = g.g_add_(&buf.multiply_scalar(self.momentum));
                        let _ = p.addcmul_(&g, &self.neg_lr);
                    } else {
                        // buf <- momentum * buf + g, computed in the gradient's own storage, which
                        // becomes the buffer: one pass over the parameters instead of two.
                        let _ = g.addcmul_(&self.first[i], &self.momentum_t);
                        self.first[i] = g;
                        let _ = p.addcmul_(&self.first[i], &self.neg_lr);
                    }
                }
                OptimizerKind::Adam => {
                    let (b1, b2, eps) = (self.spec.beta1, self.spec.beta2, self.spec.eps);
                    let t = self.steps as i32;
                    let (bc1, bc2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
                    // Every intermediate lives in the gradient's storage (no allocation per step):
                    // m <- lerp(m, g, 1 - b1); v <- lerp(v, g^2, 1 - b2);
                    // p <- p + m / ((sqrt(v) / sqrt(bc2) + eps) * (-bc1 / lr)).
                    let m = &mut self.first[i];
                    let _ = m.lerp_(&g, 1.0 - b1);
                    let _ = g.square_();
                    let v = &mut self.second[i];
                    let _ = v.lerp_(&g, 1.0 - b2);
                    g.copy_(v);
                    let _ = g.sqrt_().g_mul_scalar_(1.0 / bc2.sqrt()).g_add_scalar_(eps).g_mul_scalar_(-bc1 / self.lr);
                    let _ = p.addcdiv_(&self.first[i], &g);
                }
            }
        }
    }

    /// The optimizer's state as named tensors, for a resumable checkpoint.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![(format!("{STATE_PREFIX}steps"), Tensor::from_slice(&[self.steps]))];
        for (name, list) in [("first", &self.first), ("second", &self.second)] {
            out.extend(list.iter().enumerate().map(|(i, t)| (format!("{STATE_PREFIX}{name}.{i}"), t.shallow_clone())));
        }
        out
    }

    /// Restores a state saved by [`Optimizer::state`] into an optimizer built the same way.
    pub fn load_state(&mut self, named: &[(String, Tensor)]) -> Result<()> {
        let get = |key: String| named.iter().find(|(k, _)| *k == key).map(|(_, t)| t);
        let Some(steps) = get(format!("{STATE_PREFIX}steps")) else { bail!("the checkpoint holds no optimizer state") };
        self.steps = i64::try_from(steps)?;
        self.adam_steps_at.fill(-1);
        let _guard = tch::no_grad_guard();
        for (name, list) in [("first", &mut self.first), ("second", &mut self.second)] {
            for (i, t) in list.iter_mut().enumerate() {
                let Some(saved) = get(format!("{STATE_PREFIX}{name}.{i}")) else {
                    bail!("the checkpoint lacks optimizer state `{name}.{i}`")
                };
                if saved.size() != t.size() {
                    bail!("optimizer state `{name}.{i}` has shape {:?}, expected {:?}", saved.size(), t.size());
                }
                t.copy_(saved);
            }
        }
        Ok(())
    }
}

/// The fused Adam kernel's options for `spec` (L2 weight decay, as `torch.optim.Adam`).
fn adam_options(spec: &OptimizerSpec) -> AdamOptions {
    AdamOptions {
        beta1: spec.beta1,
        beta2: spec.beta2,
        eps: spec.eps,
        weight_decay: spec.weight_decay,
        decoupled_weight_decay: false,
    }
}

/// Shallow copies of the tensors of `list` at `indices`, in that order.
fn pick(list: &[Tensor], indices: &[usize]) -> Vec<Tensor> {
    indices.iter().map(|&i| list[i].shallow_clone()).collect()
}

/// Whether a checkpoint entry belongs to the optimizer.
pub fn is_state_key(key: &str) -> bool {
    key.starts_with(STATE_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::OptimizerKind;

    fn spec(kind: OptimizerKind, momentum: f64, nesterov: bool, weight_decay: f64) -> OptimizerSpec {
        OptimizerSpec {
            kind,
            lr: 0.1,
            momentum,
            momentum_start: momentum,
            momentum_ramp_epochs: 0,
            nesterov,
            weight_decay,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }

    /// Runs 3 steps on f(p) = sum(p^2 * c + p * d) and returns p, starting from p = [1, -2, 3], on
    /// `path`.
    fn run(spec: &OptimizerSpec, path: Path) -> Vec<f64> {
        let p = Tensor::from_slice(&[1.0f64, -2.0, 3.0]).set_requires_grad(true);
        let c = Tensor::from_slice(&[1.0f64, 0.5, 2.0]);
        let d = Tensor::from_slice(&[0.5f64, -1.0, 0.25]);
        let mut opt = Optimizer::new(spec, vec![p.shallow_clone()]);
        for _ in 0..3 {
            let loss = (&p * &p * &c + &p * &d).sum(Kind::Double);
            let grads = Tensor::run_backward(&[loss], &[&p], false, false);
            opt.step_with(grads, path);
        }
        Vec::<f64>::try_from(p.detach()).unwrap()
    }

    /// The same three steps written out by hand, following PyTorch's torch.optim formulas.
    fn reference(spec: &OptimizerSpec) -> Vec<f64> {
        let (c, d) = ([1.0, 0.5, 2.0], [0.5, -1.0, 0.25]);
        let mut p = [1.0f64, -2.0, 3.0];
        let (mut m, mut v) = ([0.0f64; 3], [0.0f64; 3]);
        for t in 1..=3 {
            for i in 0..3 {
                // With the linear term the gradient is not proportional to p, so weight decay
                // changes Adam's (per-coordinate scale-free) steps.
                let g = 2.0 * c[i] * p[i] + d[i] + spec.weight_decay * p[i];
                match spec.kind {
                    OptimizerKind::Sgd => {
                        m[i] = spec.momentum * m[i] + g;
                        let d = if spec.nesterov { g + spec.momentum * m[i] } else { m[i] };
                        p[i] -= spec.lr * d;
                    }
                    OptimizerKind::Adam => {
                        m[i] = spec.beta1 * m[i] + (1.0 - spec.beta1) * g;
                        v[i] = spec.beta2 * v[i] + (1.0 - spec.beta2) * g * g;
                        let mh = m[i] / (1.0 - spec.beta1.powi(t));
                        let vh = v[i] / (1.0 - spec.beta2.powi(t));
                        p[i] -= spec.lr * mh / (vh.sqrt() + spec.eps);
                    }
                }
            }
        }
        p.to_vec()
    }

    #[test]
    fn updates_match_the_torch_optim_formulas() {
        let _generator = kd_core::lock_global_generator();
        for s in [
            spec(OptimizerKind::Sgd, 0.0, false, 0.0),
            spec(OptimizerKind::Sgd, 0.9, false, 0.0),
            spec(OptimizerKind::Sgd, 0.9, true, 0.01),
            spec(OptimizerKind::Adam, 0.0, false, 0.0),
            spec(OptimizerKind::Adam, 0.0, false, 0.1),
        ] {
            for path in [Path::Ops, Path::Fused, Path::Auto] {
                let (got, want) = (run(&s, path), reference(&s));
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() < 1e-9,
                        "{:?} momentum {} nesterov {} {path:?}: {got:?} vs {want:?}",
                        s.kind,
                        s.momentum,
                        s.nesterov
                    );
                }
            }
        }
    }

    /// Parameters of a small MLP's shapes and `n` random f32 gradients for each.
    fn mlp_problem(n: usize) -> (Vec<Tensor>, Vec<Vec<Tensor>>) {
        tch::manual_seed(11);
        let shapes: [&[i64]; 4] = [&[60, 40], &[60], &[10, 60], &[10]];
        let params: Vec<Tensor> = shapes.iter().map(|&d| Tensor::randn(d, (Kind::Float, tch::Device::Cpu))).collect();
        let grads = (0..n).map(|_| params.iter().map(|p| p.randn_like() * 0.5).collect()).collect();
        (params, grads)
    }

    /// Runs `spec` on `path` from copies of `params`, through `grads`, with the momentum ramp of
    /// `momenta` (one per step), a learning-rate change, and a checkpoint taken after `resume_at`
    /// steps and loaded into a fresh optimizer on `resume_path`. Returns the parameters and state.
    fn run_steps(
        spec: &OptimizerSpec,
        params: &[Tensor],
        grads: &[Vec<Tensor>],
        momenta: &[f64],
        (path, resume_at, resume_path): (Path, usize, Path),
    ) -> (Vec<Tensor>, Vec<(String, Tensor)>) {
        let ps: Vec<Tensor> = params.iter().map(|p| p.copy().set_requires_grad(true)).collect();
        let mut opt = Optimizer::new(spec, ps.iter().map(Tensor::shallow_clone).collect());
        for (i, (g, &mu)) in grads.iter().zip(momenta).enumerate() {
            if i == resume_at {
                let saved: Vec<(String, Tensor)> = opt.state().into_iter().map(|(k, t)| (k, t.copy())).collect();
                opt = Optimizer::new(spec, ps.iter().map(Tensor::shallow_clone).collect());
                opt.load_state(&saved).unwrap();
                opt.set_lr(if i > 4 { spec.lr / 2.0 } else { spec.lr });
            }
            if i == 4 {
                opt.set_lr(spec.lr / 2.0);
            }
            opt.set_momentum(mu);
            let path = if i < resume_at { path } else { resume_path };
            opt.step_with(g.iter().map(Tensor::copy).collect(), path);
        }
        (ps, opt.state())
    }

    fn max_rel_diff(a: &[Tensor], b: &[Tensor]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs().max().double_value(&[]) / y.abs().max().double_value(&[]).max(1e-12))
            .fold(0.0, f64::max)
    }

    /// libtorch's fused SGD equals the per-parameter ops over several steps: plain, with momentum,
    /// Nesterov, weight decay, and through a momentum ramp from 0 (where the kernel takes no
    /// buffers); and a checkpoint of either path resumes on the other to the same parameters.
    #[test]
    fn fused_sgd_matches_the_op_path() {
        let _generator = kd_core::lock_global_generator();
        let n = 8;
        let (params, grads) = mlp_problem(n);
        let ramp: Vec<f64> = (0..n).map(|i| if i < 3 { 0.0 } else { 0.9 * (i - 2) as f64 / 5.0 }).collect();
        let mut cases = vec![];
        for (momentum, start, nesterov, wd) in [
            (0.0, 0.0, false, 0.0),
            (0.9, 0.9, false, 0.0),
            (0.9, 0.9, true, 1e-3),
            (0.9, 0.0, false, 1e-3),
            (0.9, 0.0, true, 0.0),
        ] {
            let mut s = spec(OptimizerKind::Sgd, momentum, nesterov, wd);
            s.lr = 0.05;
            s.momentum_start = start;
            let momenta = if start == momentum { vec![momentum; n] } else { ramp.clone() };
            cases.push((s, momenta));
        }
        for (s, momenta) in &cases {
            let (want, want_state) = run_steps(s, &params, &grads, momenta, (Path::Ops, n, Path::Ops));
            for plan in [(Path::Fused, n, Path::Fused), (Path::Fused, 4, Path::Ops), (Path::Ops, 2, Path::Fused)] {
                let (got, got_state) = run_steps(s, &params, &grads, momenta, plan);
                let moved = max_rel_diff(&got, &params);
                let diff = max_rel_diff(&got, &want);
                let state =
                    |st: &[(String, Tensor)]| st.iter().skip(1).map(|(_, t)| t.shallow_clone()).collect::<Vec<_>>();
                let state_diff = max_rel_diff(&state(&got_state), &state(&want_state));
                let what = format!(
                    "momentum {} from {} nesterov {} wd {} {plan:?}",
                    s.momentum, s.momentum_start, s.nesterov, s.weight_decay
                );
                assert!(moved > 0.05, "{what}: the parameters barely moved ({moved})");
                assert!(diff < 1e-6, "{what}: fused and op paths differ by {diff} (relative)");
                assert!(state_diff < 1e-6, "{what}: momentum buffers differ by {state_diff} (relative)");
            }
        }
    }

    /// libtorch's fused Adam (the CUDA path, run here on the CPU) equals the per-parameter ops,
    /// with weight decay, a learning-rate change, and resumes across paths from a checkpoint.
    #[test]
    fn fused_adam_matches_the_op_path() {
        let _generator = kd_core::lock_global_generator();
        let n = 8;
        let (params, grads) = mlp_problem(n);
        for wd in [0.0, 0.01] {
            let mut s = spec(OptimizerKind::Adam, 0.0, false, wd);
            s.lr = 1e-2;
            let momenta = vec![0.0; n];
            let (want, want_state) = run_steps(&s, &params, &grads, &momenta, (Path::Ops, n, Path::Ops));
            for plan in [(Path::Fused, n, Path::Fused), (Path::Fused, 5, Path::Ops), (Path::Ops, 3, Path::Fused)] {
                let (got, got_state) = run_steps(&s, &params, &grads, &momenta, plan);
                let moved = max_rel_diff(&got, &params);
                let diff = max_rel_diff(&got, &want);
                assert!(moved > 0.02, "wd {wd} {plan:?}: the parameters barely moved ({moved})");
                assert!(diff < 1e-5, "wd {wd} {plan:?}: fused and op paths differ by {diff} (relative)");
                assert_eq!(i64::try_from(&got_state[0].1).unwrap(), n as i64);
                let state =
                    |st: &[(String, Tensor)]| st.iter().skip(1).map(|(_, t)| t.shallow_clone()).collect::<Vec<_>>();
                assert!(max_rel_diff(&state(&got_state), &state(&want_state)) < 1e-5);
            }
        }
    }

    /// A step made of parts, the parameters grouped and ordered as a layer-by-layer backward
    /// pass delivers them, leaves the parameters and the state the whole step leaves, on every
    /// path, through a checkpoint resumed on the other kind of step.
    /// Adam at lr 0.01 with weight decay 0.01.
    fn adam_spec() -> OptimizerSpec {
        OptimizerSpec { lr: 1e-2, ..spec(OptimizerKind::Adam, 0.0, false, 0.01) }
    }

    /// Two copies of `params`, each with an optimizer of `s` over it.
    fn twins(s: &OptimizerSpec, params: &[Tensor]) -> [(Vec<Tensor>, Optimizer); 2] {
        [(); 2].map(|()| {
            let ps: Vec<Tensor> = params.iter().map(|p| p.copy().set_requires_grad(true)).collect();
            let opt = Optimizer::new(s, ps.iter().map(Tensor::shallow_clone).collect());
            (ps, opt)
        })
    }

    #[test]
    fn a_step_in_parts_equals_the_whole_step() {
        let _generator = kd_core::lock_global_generator();
        let n = 6;
        let (params, grads) = mlp_problem(n);
        for s in [spec(OptimizerKind::Sgd, 0.9, false, 1e-3), spec(OptimizerKind::Sgd, 0.9, true, 0.0), adam_spec()] {
            for path in [Path::Ops, Path::Fused, Path::Auto] {
                let [(a, mut whole), (b, mut parts)] = twins(&s, &params);
                for (step, g) in grads.iter().enumerate() {
                    if step == 3 {
                        let saved: Vec<(String, Tensor)> =
                            parts.state().into_iter().map(|(k, t)| (k, t.copy())).collect();
                        parts = Optimizer::new(&s, b.iter().map(Tensor::shallow_clone).collect());
                        parts.load_state(&saved).unwrap();
                    }
                    whole.step_with(g.iter().map(Tensor::copy).collect(), path);
                    parts.begin_step();
                    for part in [&[2usize, 3][..], &[0, 1]] {
                        parts.update(part, part.iter().map(|&i| g[i].copy()).collect(), path);
                    }
                }
                let what = format!("{:?} nesterov {} {path:?}", s.kind, s.nesterov);
                assert!(max_rel_diff(&a, &params) > 0.01, "{what}: the parameters barely moved");
                for (x, y) in a.iter().zip(&b) {
                    assert!(x.equal(y), "{what}: parameters differ by {:?}", (x - y).abs().max());
                }
                for ((k, x), (_, y)) in whole.state().iter().zip(&parts.state()) {
                    assert!(x.equal(y), "{what}: state `{k}` differs");
                }
            }
        }
    }

    /// What a replayed CUDA graph does, run here on the CPU: the fused kernel called on the
    /// optimizer's own tensors (the device's part of a step) and `replayed_step` (the host's).
    /// Steps taken that way and ordinary ones interleave to the parameters and state ordinary
    /// steps alone reach; a rewound count refills fused Adam's step tensors.
    #[test]
    fn replayed_steps_keep_the_host_count_in_step_with_the_device() {
        let _generator = kd_core::lock_global_generator();
        let n = 5;
        let (params, grads) = mlp_problem(n);
        for s in [spec(OptimizerKind::Sgd, 0.9, false, 1e-3), adam_spec()] {
            let [(a, mut plain), (b, mut replayed)] = twins(&s, &params);
            for (step, g) in grads.iter().enumerate() {
                plain.step_with(g.iter().map(Tensor::copy).collect(), Path::Fused);
                if step == 0 || step == 3 {
                    replayed.step_with(g.iter().map(Tensor::copy).collect(), Path::Fused);
                    continue;
                }
                if step == 2 {
                    // A capture that failed: its step counted on the host, never ran.
                    replayed.begin_step();
                    replayed.rewind(replayed.steps() - 1);
                    if s.kind == OptimizerKind::Adam {
                        // The next ordinary step refills the counts; replay only after it.
                        replayed.step_with(g.iter().map(Tensor::copy).collect(), Path::Fused);
                        continue;
                    }
                }
                let (lr, momentum) = replayed.hyperparameters();
                let mut ps = pick(&replayed.params, &(0..replayed.params.len()).collect::<Vec<_>>());
                match s.kind {
                    OptimizerKind::Sgd => {
                        let opts = SgdOptions { momentum, weight_decay: s.weight_decay, ..SgdOptions::default() };
                        kd_native::optim::fused_sgd(&mut ps, g, &mut replayed.first, &opts, Lr::Value(lr)).unwrap();
                    }
                    OptimizerKind::Adam => {
                        let opts = adam_options(&s);
                        let (m, v, counts) = (&mut replayed.first, &mut replayed.second, &mut replayed.adam_steps);
                        kd_native::optim::fused_adam(&mut ps, g, m, v, counts, &opts, Lr::Value(lr)).unwrap();
                    }
                }
                replayed.replayed_step();
            }
            assert_eq!(replayed.steps(), plain.steps());
            for (x, y) in a.iter().zip(&b) {
                let diff = (x - y).abs().max().double_value(&[]);
                assert!(diff < 1e-6, "{:?}: replayed and ordinary steps differ by {diff}", s.kind);
            }
        }
    }

    /// Not a check: times SGD steps of the MNIST teacher's parameters on the op and the fused
    /// paths, alternating, and prints the sorted ms/step (`KD_T` sets the thread count, default 1):
    /// `cargo test --release -p kd-run --bin kd-run time_sgd_paths -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn time_sgd_paths() {
        let _generator = kd_core::seed_global_generator(1);
        let shapes: [&[i64]; 6] = [&[1200, 784], &[1200], &[1200, 1200], &[1200], &[10, 1200], &[10]];
        let params: Vec<Tensor> = shapes.iter().map(|&d| Tensor::randn(d, (Kind::Float, tch::Device::Cpu))).collect();
        let grads: Vec<Tensor> = params.iter().map(|p| p.randn_like() * 0.01).collect();
        let s = spec(OptimizerKind::Sgd, 0.9, false, 0.0);
        tch::set_num_threads(std::env::var("KD_T").map_or(1, |v| v.parse().unwrap()));
        let mut times: [Vec<f64>; 2] = [vec![], vec![]];
        for _ in 0..10 {
            for (k, path) in [Path::Ops, Path::Fused].into_iter().enumerate() {
                let mut opt = Optimizer::new(&s, params.iter().map(Tensor::copy).collect());
                opt.step_with(grads.iter().map(Tensor::copy).collect(), path);
                let gs: Vec<Vec<Tensor>> = (0..40).map(|_| grads.iter().map(Tensor::copy).collect()).collect();
                let t0 = std::time::Instant::now();
                for g in gs {
                    opt.step_with(g, path);
                }
                times[k].push(t0.elapsed().as_secs_f64() * 1e3 / 40.0);
            }
        }
        for t in &mut times {
            t.sort_by(f64::total_cmp);
        }
        eprintln!("ops ms/step {:?}\nfused ms/step {:?}", times[0], times[1]);
    }

    #[test]
    fn momentum_changes_take_effect() {
        let _generator = kd_core::lock_global_generator();
        let s = spec(OptimizerKind::Sgd, 0.9, false, 0.0);
        let p = Tensor::from_slice(&[1.0f64]).set_requires_grad(true);
        let mut opt = Optimizer::new(&s, vec![p.shallow_clone()]);
        opt.step(vec![Tensor::from_slice(&[1.0f64])]); // buf = 1, p = 1 - 0.1
        opt.set_momentum(0.5);
        opt.step(vec![Tensor::from_slice(&[1.0f64])]); // buf = 0.5 * 1 + 1, p = 0.9 - 0.15
        assert!((f64::try_from(p.detach()).unwrap() - 0.75).abs() < 1e-12);
    }

    #[test]
    fn state_round_trip_continues_identically() {
        let _generator = kd_core::lock_global_generator();
        let s = spec(OptimizerKind::Adam, 0.0, false, 0.0);
        let p = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
        let mut a = Optimizer::new(&s, vec![p.shallow_clone()]);
        a.step(vec![Tensor::from_slice(&[0.5f32, 0.25])]);
        let saved: Vec<(String, Tensor)> = a.state().into_iter().map(|(k, t)| (k, t.copy())).collect();
        let q = p.detach().copy().set_requires_grad(true);
        let mut b = Optimizer::new(&s, vec![q.shallow_clone()]);
        b.load_state(&saved).unwrap();
        let g = Tensor::from_slice(&[-1.0f32, 2.0]);
        a.step(vec![g.copy()]);
        b.step(vec![g]);
        assert!(p.detach().equal(&q.detach()));
        assert!(b.load_state(&saved[..1]).unwrap_err().to_string().contains("lacks optimizer state"));
    }
}
