//! Knowledge distillation with the kd crates from a project of its own, on synthetic data in a
//! few seconds: two teachers trained on hard labels, a student distilled from their ensemble
//! with kd-core's losses (printed as cross-entropy and as KL), and a kd-models checkpoint saved
//! and loaded back. Exits non-zero if the student does not converge towards the ensemble or the
//! reloaded student computes anything else.

use kd_core::{distillation_loss, ensemble_probs, hard_target_loss, EnsembleRule, LossWeights, SoftTargets};
use kd_models::{Mlp, MlpConfig};
// ModuleT brings `forward_t` into scope; OptimizerConfig brings `build`.
use tch::{nn, nn::ModuleT, nn::OptimizerConfig, Device, Kind, Tensor};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const INPUTS: i64 = 20;
const CLASSES: i64 = 10;
const BATCH: i64 = 100;
const TEMPERATURE: f64 = 4.0;

/// `n` examples of `CLASSES` overlapping Gaussian clusters around `centers`: inputs and labels.
fn synthetic(centers: &Tensor, n: i64, device: Device) -> (Tensor, Tensor) {
    let labels = Tensor::randint(CLASSES, [n], (Kind::Int64, device));
    let x = centers.index_select(0, &labels) + Tensor::randn([n, INPUTS], (Kind::Float, device));
    (x, labels)
}

/// Trains a teacher on the hard labels for `epochs` passes of SGD with momentum.
fn train_teacher(x: &Tensor, y: &Tensor, epochs: i64, device: Device) -> Result<(nn::VarStore, Mlp)> {
    let vs = nn::VarStore::new(device);
    let config = MlpConfig {
        sizes: vec![INPUTS, 64, 64, CLASSES],
        input_dropout: 0.0,
        hidden_dropout: 0.2,
        max_norm: Some(3.0),
    };
    let net = Mlp::new(&vs.root(), config)?;
    let mut opt = nn::Sgd { momentum: 0.9, ..Default::default() }.build(&vs, 0.05)?;
    for _ in 0..epochs {
        for (xb, yb) in batches(x, y) {
            let loss = hard_target_loss(&net.forward_t(&xb, true), &yb)?;
            opt.backward_step(&loss);
            net.apply_max_norm();
        }
    }
    Ok((vs, net))
}

/// The data in shuffled batches of `BATCH`.
fn batches(x: &Tensor, y: &Tensor) -> Vec<(Tensor, Tensor)> {
    let n = x.size()[0];
    let order = Tensor::randperm(n, (Kind::Int64, x.device()));
    (0..n / BATCH)
        .map(|b| {
            let idx = order.narrow(0, b * BATCH, BATCH);
            (x.index_select(0, &idx), y.index_select(0, &idx))
        })
        .collect()
}

/// Errors of `net` on the examples `(x, y)`, in evaluation mode.
fn errors(net: &Mlp, x: &Tensor, y: &Tensor) -> Result<i64> {
    let wrong = tch::no_grad(|| net.forward_t(x, false)).argmax(1, false).ne_tensor(y);
    Ok(i64::try_from(wrong.sum(Kind::Int64))?)
}

fn main() -> Result<()> {
    let device = Device::cuda_if_available();
    println!("device {device:?} (CUDA available: {})", tch::Cuda::is_available());
    tch::manual_seed(0);
    let centers = Tensor::randn([CLASSES, INPUTS], (Kind::Float, device)) * 1.2;
    let (x, y) = synthetic(&centers, 4000, device);
    let (x_test, y_test) = synthetic(&centers, 1000, device);

    // Two teachers from different initializations, and their ensemble's distribution at T
    // over the transfer set (here the training set), computed once.
    let (_vs1, teacher1) = train_teacher(&x, &y, 5, device)?;
    let (_vs2, teacher2) = train_teacher(&x, &y, 5, device)?;
    for (name, t) in [("teacher 1", &teacher1), ("teacher 2", &teacher2)] {
        println!("{name}: {} test errors of 1000", errors(t, &x_test, &y_test)?);
    }
    let members = tch::no_grad(|| [teacher1.forward_t(&x, false), teacher2.forward_t(&x, false)]);
    let ensemble = ensemble_probs(&members, TEMPERATURE, EnsembleRule::ArithmeticMean)?;

    // The student learns the ensemble's soft targets at T (weight 0.9) and the labels (0.1).
    let vs = nn::VarStore::new(device);
    let student = Mlp::new(&vs.root(), MlpConfig::plain([INPUTS, 32, CLASSES]))?;
    let mut opt = nn::Adam::default().build(&vs, 3e-3)?;
    let weights = LossWeights::new(0.1, 0.9)?;
    let data = Tensor::cat(&[x.shallow_clone(), ensemble], 1);
    let mut kl_by_epoch = Vec::new();
    for epoch in 1..=5 {
        let (mut ce, mut kl, mut steps) = (0.0, 0.0, 0.0);
        for (batch, yb) in batches(&data, &y) {
            let (xb, pb) = (batch.narrow(1, 0, INPUTS), batch.narrow(1, INPUTS, CLASSES));
            let loss = distillation_loss(
                &student.forward_t(&xb, true),
                SoftTargets::Probs(&pb),
                Some(&yb),
                TEMPERATURE,
                weights,
            )?;
            opt.backward_step(&loss.total);
            ce += f64::try_from(&loss.soft)?;
            kl += f64::try_from(&loss.soft_kl)?;
            steps += 1.0;
        }
        let (ce, kl) = (ce / steps, kl / steps);
        // soft = soft_kl + T^2 * mean H(p): the entropy term is the same in every epoch.
        println!(
            "student epoch {epoch}: soft-target loss {ce:.4} as cross-entropy, {kl:.4} as KL (T^2 H(p) = {:.4})",
            ce - kl
        );
        kl_by_epoch.push(kl);
    }
    println!("student: {} test errors of 1000", errors(&student, &x_test, &y_test)?);
    if kl_by_epoch.last() >= kl_by_epoch.first() {
        return Err(format!("the student does not converge towards the ensemble: KL by epoch {kl_by_epoch:?}").into());
    }

    // A checkpoint is a list of named tensors that carries the layer sizes: write it, read it
    // back, and the loaded student computes exactly the same outputs.
    let path = std::env::temp_dir().join(format!("kd-external-example-{}.safetensors", std::process::id()));
    Tensor::write_safetensors(&student.to_tensors(&vs), &path)?;
    let named = Tensor::read_safetensors(&path)?;
    std::fs::remove_file(&path)?;
    let (_loaded_vs, loaded) = Mlp::from_tensors(&named, device)?;
    let (before, after) = tch::no_grad(|| (student.forward_t(&x_test, false), loaded.forward_t(&x_test, false)));
    if loaded.config() != student.config() || !before.equal(&after) {
        return Err("the reloaded student does not compute the saved student's outputs".into());
    }
    println!("checkpoint: {} tensors, the reloaded {} gives the same outputs", named.len(), loaded.config().describe());
    Ok(())
}
