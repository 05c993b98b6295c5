//! A step's examples and the sources that deliver them, the interface between the data (held in
//! memory or streamed from a frame store) and the training loop.

use anyhow::Result;
use kd_core::TeacherTargets;
use kd_models::BatchRows;
use tch::Tensor;

/// One step's examples, as a [`BatchSource`] delivers them.
pub struct Batch {
    /// `[b, input_dim]` inputs, on the training device.
    pub x: Tensor,
    /// `[b]` int64 labels.
    pub y: Tensor,
    /// Rows of the in-memory split (what cached teacher targets are indexed by); `None` for
    /// examples streamed from a frame store.
    pub idx: Option<Tensor>,
    /// The teacher's targets for these rows, when the source delivers them (top-k targets read
    /// beside a frame store); otherwise they come from the training loop's
    /// supervision (`crate::train::Supervision`).
    pub targets: Option<TeacherTargets>,
    /// Which rows of the global batch these are (all of it for a process alone): the loss is
    /// weighted by their share, dropout masks are drawn for the whole batch.
    pub held: BatchRows,
}

/// The batches of one epoch (or of a slice of one), in the order they are trained on.
pub trait BatchSource {
    /// Steps in the pass.
    fn steps(&self) -> usize;
    /// The next batch, `None` after the last.
    fn next_batch(&mut self) -> Result<Option<Batch>>;
}
