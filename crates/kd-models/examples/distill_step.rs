use kd_core::{distillation_loss, LossWeights, SoftTargets};
use kd_models::{Mlp, MlpConfig};
// `forward_t` is a method of the `ModuleT` trait and `build` of `OptimizerConfig`: both in scope.
use tch::{nn, nn::ModuleT, nn::OptimizerConfig, Device, Kind, Tensor};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = Device::cuda_if_available();
    println!("device {device:?}");
    let vs = nn::VarStore::new(device);
    let student = Mlp::new(&vs.root(), MlpConfig::mnist_student())?;
    let mut opt = nn::Sgd { momentum: 0.9, ..Default::default() }.build(&vs, 0.05)?;
    // Stand-ins for a batch of MNIST images, their labels and a teacher's logits on them.
    let x = Tensor::rand([32, 784], (Kind::Float, device));
    let labels = Tensor::randint(10, [32], (Kind::Int64, device));
    let teacher_logits = Tensor::randn([32, 10], (Kind::Float, device)) * 5.0;
    for step in 1..=5 {
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
        // The soft term as optimized (cross-entropy) and as KL, which shows the progress.
        let (soft, kl) = (f64::try_from(&loss.soft)?, f64::try_from(&loss.soft_kl)?);
        println!("step {step}: soft term {soft:.3} = KL {kl:.3} + T^2 H(teacher) {:.3}", soft - kl);
    }
    Ok(())
}
