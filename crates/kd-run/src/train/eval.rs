//! Passes without gradients over a split, in chunks: logits, evaluation (with each example's
//! prediction), and a student's agreement with its teacher.

use crate::data::Split;
use anyhow::Result;
use kd_models::Mlp;
use tch::{nn::ModuleT, Kind, Tensor};

/// Batch size used for evaluation and teacher passes (no gradients, so larger than training).
pub const EVAL_BATCH: i64 = 1000;

/// `f(start, len)` for consecutive chunks `start..start + len` of `0..n` of at most `chunk`
/// examples each (the last may be shorter), and their results in order. Every pass over a split
/// in chunks goes through here, so a result never depends on where a chunk ends.
pub fn in_chunks<T>(n: i64, chunk: i64, mut f: impl FnMut(i64, i64) -> Result<T>) -> Result<Vec<T>> {
    anyhow::ensure!(chunk > 0, "chunks of {chunk} examples");
    (0..n).step_by(chunk as usize).map(|start| f(start, chunk.min(n - start))).collect()
}

/// Logits of `net` in evaluation mode, without gradients, over `split` in chunks of `batch`.
/// In a data-parallel run each rank computes its share of the examples and receives the
/// others' ([`crate::dist::World::gather_rows`]), so no rank runs the whole split.
pub fn logits(net: &Mlp, split: &Split, batch: i64) -> Result<Tensor> {
    let _guard = tch::no_grad_guard();
    let world = crate::dist::world();
    let (first, n) = world.share(split.len());
    let chunks = in_chunks(n, batch, |s, len| Ok(net.forward_t(&split.range(first + s, len), false)))?;
    let mine = match chunks.as_slice() {
        [] => net.forward_t(&split.range(0, 0), false),
        _ => Tensor::cat(&chunks, 0),
    };
    world.gather_rows(&mine, split.len())
}

/// How a model does on a split.
pub struct Evaluation {
    /// Mean hard-label cross-entropy.
    pub loss: f64,
    /// Misclassified examples.
    pub errors: i64,
    /// Examples.
    pub examples: i64,
    /// Misclassified examples per true class.
    pub class_errors: Vec<i64>,
    /// Examples per true class.
    pub class_examples: Vec<i64>,
    /// Each example's predicted class (the top-1 of its logits), `[examples]` int64 on the
    /// split's device, in the order of the examples evaluated.
    pub predictions: Tensor,
}

impl Evaluation {
    /// `1 - errors / examples`.
    pub fn accuracy(&self) -> f64 {
        1.0 - self.errors as f64 / self.examples.max(1) as f64
    }
}

/// Evaluates `net` on `split` in evaluation mode (one device sync at the end), its weights
/// converted to the compute precision once for the whole pass.
pub fn evaluate(net: &Mlp, split: &Split, num_classes: i64) -> Result<Evaluation> {
    let frozen = net.frozen();
    evaluate_with(&|x| Ok(frozen.forward_t(x, false)), split, None, num_classes)
}

/// Evaluates a model given as `logits(x)` (log-probabilities up to a constant per row) on
/// `split` (only its `examples`, when given), without gradients (one device sync at the end),
/// in chunks of [`EVAL_BATCH`]. In a data-parallel run each rank evaluates its share of the
/// examples; the sums and counts are summed and the predictions gathered across the ranks.
pub fn evaluate_with(
    logits: &dyn Fn(&Tensor) -> Result<Tensor>,
    split: &Split,
    examples: Option<&Tensor>,
    num_classes: i64,
) -> Result<Evaluation> {
    evaluate_in_chunks(logits, split, examples, num_classes, EVAL_BATCH)
}

/// [`evaluate_with`] in chunks of `chunk` examples.
pub fn evaluate_in_chunks(
    logits: &dyn Fn(&Tensor) -> Result<Tensor>,
    split: &Split,
    examples: Option<&Tensor>,
    num_classes: i64,
    chunk: i64,
) -> Result<Evaluation> {
    let _guard = tch::no_grad_guard();
    let world = crate::dist::world();
    let all = examples.map_or(split.len(), |e| e.size()[0]);
    let (first, n) = world.share(all);
    let labels = examples.map_or_else(|| split.labels.shallow_clone(), |e| split.labels.index_select(0, e));
    let labels = labels.narrow(0, first, n);
    let device = split.labels.device();
    let mut loss_sum = Tensor::zeros([], (Kind::Double, device));
    let predictions = in_chunks(n, chunk, |s, len| {
        let x = match examples {
            Some(e) => split.inputs(&e.narrow(0, first + s, len)),
            None => split.range(first + s, len),
        };
        let logits = logits(&x)?;
        let y = labels.narrow(0, s, len);
        loss_sum += kd_core::hard_target_loss(&logits, &y)?.to_kind(Kind::Double) * len as f64;
        Ok(logits.argmax(1, false))
    })?;
    let predictions =
        if predictions.is_empty() { Tensor::zeros([0], (Kind::Int64, device)) } else { Tensor::cat(&predictions, 0) };
    let wrong = predictions.ne_tensor(&labels);
    let class_errors = labels.masked_select(&wrong).bincount::<Tensor>(None, num_classes);
    let class_examples = labels.bincount::<Tensor>(None, num_classes);
    // Both counts over every rank's share (bincount's length is at least `num_classes`).
    let mut counts =
        Tensor::stack(&[class_errors.narrow(0, 0, num_classes), class_examples.narrow(0, 0, num_classes)], 0);
    world.sum(std::slice::from_mut(&mut counts))?;
    world.sum(std::slice::from_mut(&mut loss_sum))?;
    let predictions = world.gather_rows(&predictions, all)?;
    let class_errors = Vec::<i64>::try_from(counts.get(0))?;
    let class_examples = Vec::<i64>::try_from(counts.get(1))?;
    Ok(Evaluation {
        loss: f64::try_from(&loss_sum)? / all.max(1) as f64,
        errors: class_errors.iter().sum(),
        examples: all,
        class_errors,
        class_examples,
        predictions,
    })
}

/// How closely a student follows its teacher on a split: top-1 agreement and the errors they
/// share (the student's fidelity, as opposed to its accuracy).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Agreement {
    /// Examples on which the two top-1 classes are the same.
    pub agree: i64,
    /// Examples both misclassify (not necessarily as the same class).
    pub shared_errors: i64,
    /// The teacher's errors.
    pub teacher_errors: i64,
    /// Examples.
    pub examples: i64,
}

impl Agreement {
    /// `agree / examples`.
    pub fn rate(&self) -> f64 {
        self.agree as f64 / self.examples.max(1) as f64
    }
}

/// A model's logits on the examples of a split.
pub enum Outputs<'a> {
    /// Computed batch by batch from the inputs.
    Model(&'a dyn Fn(&Tensor) -> Result<Tensor>),
    /// Computed already, one row per example of the split in its order (a teacher's cached
    /// outputs on its transfer set).
    Cached(&'a Tensor),
}

impl Outputs<'_> {
    /// The logits of the `len` examples from `start`, whose inputs are `x`.
    fn rows(&self, x: &Tensor, start: i64, len: i64) -> Result<Tensor> {
        match self {
            Outputs::Model(logits) => logits(x),
            Outputs::Cached(all) => Ok(all.narrow(0, start, len)),
        }
    }
}

/// Compares the top-1 answers of `student` and `teacher` on every example of `split`, without
/// gradients (one device sync at the end).
pub fn agreement(student: &dyn Fn(&Tensor) -> Result<Tensor>, teacher: Outputs, split: &Split) -> Result<Agreement> {
    let _guard = tch::no_grad_guard();
    let n = split.len();
    if let Outputs::Cached(all) = teacher {
        if all.size().first() != Some(&n) {
            anyhow::bail!("the teacher's cached outputs have shape {:?}, for a split of {n} examples", all.size());
        }
    }
    // [agree, shared errors, teacher errors], over this rank's share, then summed over the ranks.
    let mut counts = Tensor::zeros([3], (Kind::Int64, split.labels.device()));
    let world = crate::dist::world();
    let (first, mine) = world.share(n);
    in_chunks(mine, EVAL_BATCH, |s, len| {
        let s = first + s;
        let x = split.range(s, len);
        let y = split.labels.narrow(0, s, len);
        let (a, b) = (student(&x)?.argmax(1, false), teacher.rows(&x, s, len)?.argmax(1, false));
        let (a_wrong, b_wrong) = (a.ne_tensor(&y), b.ne_tensor(&y));
        counts += Tensor::stack(&[a.eq_tensor(&b), a_wrong.logical_and(&b_wrong), b_wrong], 0).sum_dim_intlist(
            1,
            false,
            Kind::Int64,
        );
        Ok(())
    })?;
    world.sum(std::slice::from_mut(&mut counts))?;
    let c = Vec::<i64>::try_from(counts)?;
    Ok(Agreement { agree: c[0], shared_errors: c[1], teacher_errors: c[2], examples: n })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_every_example_once_in_order() {
        let spans = in_chunks(10, 4, |s, len| Ok((s, len))).unwrap();
        assert_eq!(spans, [(0, 4), (4, 4), (8, 2)]);
        assert!(in_chunks(0, 4, |s, len| Ok((s, len))).unwrap().is_empty());
        assert_eq!(in_chunks(3, 1000, |s, len| Ok((s, len))).unwrap(), [(0, 3)]);
        assert!(in_chunks(3, 0, |s, len| Ok((s, len))).is_err());
    }

    #[test]
    fn evaluation_returns_each_examples_prediction_whatever_the_chunks() {
        // Labels 0..6 of 3 classes; the model answers example e with class (e * 2) % 3.
        let x = Tensor::from_slice(&[0i64, 1, 2, 3, 4, 5, 6]);
        let labels = Tensor::from_slice(&[0i64, 1, 2, 0, 1, 2, 0]);
        let split = Split::new(x.to_kind(Kind::Float).view([7, 1]), labels);
        let model =
            |x: &Tensor| Ok((x.view([-1]).to_kind(Kind::Int64) * 2).remainder(3).one_hot(3).to_kind(Kind::Float));
        let want = [0i64, 2, 1, 0, 2, 1, 0];
        for chunk in [1, 3, 1000] {
            let e = evaluate_in_chunks(&model, &split, None, 3, chunk).unwrap();
            assert_eq!(Vec::<i64>::try_from(&e.predictions).unwrap(), want, "chunk {chunk}");
            // Right on examples 0, 3, 6 (class 0) only.
            assert_eq!((e.errors, e.examples), (4, 7));
            assert_eq!((e.class_errors, e.class_examples), (vec![0, 2, 2], vec![3, 2, 2]));
        }
        // Only some examples: predictions in their order.
        let some = Tensor::from_slice(&[5i64, 1]);
        let e = evaluate_in_chunks(&model, &split, Some(&some), 3, 1).unwrap();
        assert_eq!(Vec::<i64>::try_from(&e.predictions).unwrap(), [1, 2]);
    }

    #[test]
    fn agreement_counts_same_answers_and_shared_errors() {
        // Labels 0..5; the student answers [0, 1, 2, 0, 0], the teacher [0, 2, 2, 0, 4].
        let x = Tensor::from_slice(&[0i64, 1, 2, 3, 4]);
        let split = Split::new(x.to_kind(Kind::Float).view([5, 1]), x.shallow_clone());
        let answers = |a: [i64; 5]| {
            let a = Tensor::from_slice(&a);
            move |x: &Tensor| {
                let rows = x.view([-1]).to_kind(Kind::Int64);
                Ok(a.index_select(0, &rows).one_hot(5).to_kind(Kind::Float))
            }
        };
        let (student, teacher) = (answers([0, 1, 2, 0, 0]), answers([0, 2, 2, 0, 4]));
        let got = agreement(&student, Outputs::Model(&teacher), &split).unwrap();
        // Same answer on examples 0, 2, 3; both wrong on 3 only; the teacher wrong on 1 and 3
        // (the student on 3 and 4).
        assert_eq!(got, Agreement { agree: 3, shared_errors: 1, teacher_errors: 2, examples: 5 });
        assert!((got.rate() - 0.6).abs() < 1e-12);
        let same = agreement(&student, Outputs::Model(&student), &split).unwrap();
        // A model agrees with itself everywhere and shares all of its errors (on 3 and 4).
        assert_eq!((same.agree, same.shared_errors, same.teacher_errors), (5, 2, 2));
        // The teacher's outputs read from a cache give the same counts; a cache of another
        // length is refused.
        let cached = teacher(&split.images).unwrap();
        assert_eq!(agreement(&student, Outputs::Cached(&cached), &split).unwrap(), got);
        let err = agreement(&student, Outputs::Cached(&cached.narrow(0, 0, 4)), &split).unwrap_err();
        assert!(err.to_string().contains("for a split of 5 examples"), "{err}");
    }
}
