//! One distillation step of the paper's MNIST student, with the crates used directly (the
//! snippet of the README). Run: `cargo run -p kd-models --example distill_step`.
use kd_core::{distillation_loss, LossWeights, SoftTargets};
use kd_models::{Mlp, MlpConfig};
use tch::{nn, nn::ModuleT, nn::OptimizerConfig, Device, Kind, Tensor};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let vs = nn::VarStore::new(Device::Cpu);
    let student = Mlp::new(&vs.root(), MlpConfig::mnist_student())?;
    let mut opt = nn::Sgd { momentum: 0.9, ..Default::default() }.build(&vs, 0.05)?;

    let x = Tensor::rand([32, 784], (Kind::Float, Device::Cpu));
    let labels = Tensor::randint(10, [32], (Kind::Int64, Device::Cpu));
    let teacher_logits = Tensor::randn([32, 10], (Kind::Float, Device::Cpu)) * 5.0;
    // total = 0.1 * CE(labels, student at T=1) + 0.9 * T^2 * CE(teacher at T, student at T)
    let loss = distillation_loss(
        &student.forward_t(&x, true),
        SoftTargets::Logits(&teacher_logits),
        Some(&labels),
        20.0,
        LossWeights::new(0.1, 0.9)?,
    )?;
    opt.backward_step(&loss.total);
    student.apply_max_norm();
    println!(
        "total {:.4} = 0.1 x hard {:.4} + 0.9 x soft {:.4}",
        f64::try_from(&loss.total)?,
        f64::try_from(&loss.hard)?,
        f64::try_from(&loss.soft)?
    );
    Ok(())
}
