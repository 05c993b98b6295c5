//! The training step captured in a CUDA graph and replayed (`cuda_graphs = true`).
//!
//! A step of the 8 x 2560 network queues about 150 kernels; replaying a captured graph launches
//! them with one call. The capture records the step as [`Trainer::step_share`] queues it, on
//! tensors that stay put: the batch's inputs, labels and teacher targets are copied into
//! *static* tensors before each replay, and the logits and loss are read from the tensors the
//! capture wrote. What makes that possible:
//! - every full batch has the same shape; a smaller batch (the last of an epoch) runs eagerly;
//! - the optimizer updates in place through libtorch's fused kernels
//!   ([`crate::train::optim::Optimizer::capturable`]); the learning rate and momentum are baked into the captured
//!   kernels, so the graph is captured again when they change (once an epoch with a schedule);
//! - nothing in the step reads a value back to the host (the loop reads losses every
//!   `report_every` steps, outside the step).
//!
//! A few eager steps come first, so that libtorch's lazy initializations (cuBLAS handles,
//! autograd's device threads, the allocator's pools) happen outside the capture. Where capture
//! is not possible (a CPU, a data-parallel run, a build without kd-native's `cuda` feature, a
//! capture libtorch refuses), the steps run eagerly and the log says why, once.
//!
//! Dropout masks come from libtorch's CUDA generator, which a graph advances at every replay:
//! the masks differ from an eager run's, as they would between two GPUs.

use super::{Supervision, Trainer};
use crate::data::batch::Batch;
use anyhow::{anyhow, Result};
use kd_core::TeacherTargets;
use kd_models::BatchRows;
use kd_native::cuda::CudaGraph;
use tch::{Device, Tensor};

/// Eager steps before the first capture.
const WARMUP_STEPS: usize = 3;

/// The CUDA-graph state of a [`Trainer`].
pub(super) struct Graphs {
    device: usize,
    /// Eager full-batch steps still to run before a capture.
    warmup: usize,
    captured: Option<Captured>,
}

/// A captured step and the tensors it reads and writes.
struct Captured {
    graph: CudaGraph,
    /// What the capture baked in: batch rows, learning rate, momentum.
    key: (i64, u64, u64),
    x: Tensor,
    y: Tensor,
    targets: Option<TeacherTargets>,
    logits: Tensor,
    loss: Tensor,
    soft_kl: Option<Tensor>,
}

/// Why the training step of `params` on `device` cannot be captured, if it cannot.
pub(super) fn unavailable(device: Device) -> Option<String> {
    let Device::Cuda(index) = device else {
        return Some("CUDA graphs need a CUDA device; the parameters are on the CPU".into());
    };
    if crate::dist::world().is_distributed() {
        return Some("a data-parallel run's gradient all-reduce is not captured".into());
    }
    kd_native::cuda::device_properties(index).err().map(|e| e.to_string())
}

impl Graphs {
    pub(super) fn new(device: usize) -> Self {
        Graphs { device, warmup: WARMUP_STEPS, captured: None }
    }
}

/// What a graphed step returns: the logits, the loss and the soft term's KL form (the
/// capture's output tensors, overwritten by the next replay: read them before it).
pub(super) type StepOutputs = (Tensor, Tensor, Option<Tensor>);

impl Trainer<'_> {
    /// Runs `batch`'s step by replaying the captured graph (capturing it first when it is
    /// due); `Ok(None)` when the step is to run eagerly: graphs off, a batch smaller than
    /// `full_batch`, a warm-up step, or a capture that failed (graphs then stay off).
    pub(super) fn graphed_step(
        &mut self,
        batch: &Batch,
        targets: Option<&TeacherTargets>,
        supervision: &Supervision,
        full_batch: i64,
    ) -> Result<Option<StepOutputs>> {
        let Some(mut graphs) = self.graphs.take() else { return Ok(None) };
        let out = self.graphed_step_with(&mut graphs, batch, targets, supervision, full_batch);
        match out {
            Ok(out) => {
                self.graphs = Some(graphs);
                Ok(out)
            }
            Err(e) => {
                tracing::warn!("CUDA graphs off for the rest of this stage: {e:#}; the steps run eagerly");
                Ok(None)
            }
        }
    }

    fn graphed_step_with(
        &mut self,
        graphs: &mut Graphs,
        batch: &Batch,
        targets: Option<&TeacherTargets>,
        supervision: &Supervision,
        full_batch: i64,
    ) -> Result<Option<StepOutputs>> {
        let rows = batch.x.size()[0];
        if rows != full_batch || batch.held.batch != full_batch {
            return Ok(None);
        }
        let (lr, momentum) = self.opt.hyperparameters();
        let key = (rows, lr.to_bits(), momentum.to_bits());
        if let Some(c) = graphs.captured.as_mut().filter(|c| c.key == key) {
            load(c, batch, targets)?;
            c.graph.replay()?;
            self.opt.replayed_step();
            return Ok(Some(outputs(c)));
        }
        graphs.captured = None;
        if graphs.warmup > 0 || !self.opt.capturable() {
            graphs.warmup = graphs.warmup.saturating_sub(1);
            return Ok(None);
        }
        let steps = self.opt.steps();
        let mut c = self.capture(graphs.device, batch, targets, supervision, key)?;
        // The capture recorded the step without running it (the host counted it): run it on
        // this batch.
        if let Err(e) = c.graph.replay() {
            self.opt.rewind(steps);
            return Err(e.into());
        }
        let out = outputs(&c);
        graphs.captured = Some(c);
        Ok(Some(out))
    }

    /// Captures one step on copies of `batch` (which become the static tensors).
    fn capture(
        &mut self,
        device: usize,
        batch: &Batch,
        targets: Option<&TeacherTargets>,
        supervision: &Supervision,
        key: (i64, u64, u64),
    ) -> Result<Captured> {
        let (x, y) = (batch.x.copy(), batch.y.copy());
        let targets = targets.map(TeacherTargets::copy).transpose()?;
        let steps = self.opt.steps();
        let held = BatchRows { start: 0, batch: key.0 };
        let mut soft_kl = None;
        let mut stepped = None;
        let captured = CudaGraph::capture(device, || {
            stepped = Some(self.step_share(&x, held, |z| {
                let (loss, kl) = supervision.loss(z, &y, targets.as_ref())?;
                soft_kl = kl;
                Ok(loss)
            }));
            Ok(())
        });
        let stepped = stepped.ok_or_else(|| anyhow!("the capture did not run the step"));
        match (captured, stepped) {
            (Ok((graph, ())), Ok(Ok((logits, loss)))) => {
                tracing::info!(
                    "captured the training step in a CUDA graph (batch {}, lr {})",
                    key.0,
                    f64::from_bits(key.1)
                );
                Ok(Captured { graph, key, x, y, targets, logits, loss, soft_kl })
            }
            (captured, stepped) => {
                // Nothing the capture recorded ran; the host's count of steps did advance.
                self.opt.rewind(steps);
                let why = match (captured.err(), stepped.and_then(|s| s.map(|_| ()))) {
                    (Some(e), _) => anyhow::Error::from(e),
                    (None, Err(e)) => e,
                    (None, Ok(())) => anyhow!("the capture failed"),
                };
                Err(why.context("capturing the training step in a CUDA graph"))
            }
        }
    }
}

/// Copies `batch` (and its targets) into the tensors the captured step reads.
fn load(c: &mut Captured, batch: &Batch, targets: Option<&TeacherTargets>) -> Result<()> {
    let _guard = tch::no_grad_guard();
    c.x.copy_(&batch.x);
    c.y.copy_(&batch.y);
    match (&mut c.targets, targets) {
        (Some(dst), Some(src)) => dst.copy_from(src)?,
        (None, None) => {}
        _ => anyhow::bail!("the batch's teacher targets do not match the captured step's"),
    }
    Ok(())
}

fn outputs(c: &Captured) -> StepOutputs {
    (c.logits.shallow_clone(), c.loss.shallow_clone(), c.soft_kl.as_ref().map(Tensor::shallow_clone))
}
