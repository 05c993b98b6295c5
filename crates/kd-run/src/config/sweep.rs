//! Sweeps: a stage repeated over lists of values, expanded before the stages are resolved.

use super::experiment::SweepPoint;
use super::limits::MAX_STAGES;
use super::raw::RawStage;
use super::values::{Temperature, Widths};
use anyhow::Result;
use toml::Spanned;

/// One stage per combination of the swept values (the stage itself when it sweeps nothing); an
/// error when they would be more than `room` stages, before any is made.
pub(crate) fn expand_sweep(mut stage: RawStage, text: &str, room: usize) -> Result<Vec<RawStage>> {
    if room == 0 {
        stage_bail!(
            text,
            stage,
            "the experiment has more than {MAX_STAGES} stages (sweeps expanded), the most kd-run runs"
        );
    }
    // Taken out of the stage, so that each copy below does not copy the swept lists too (which
    // made expansion quadratic in the number of stages).
    let Some(sweep) = stage.sweep.take() else { return Ok(vec![stage]) };
    let lengths = [
        sweep.temperature.as_ref().map_or(1, Vec::len),
        sweep.hidden.as_ref().map_or(1, Vec::len),
        sweep.seed.as_ref().map_or(1, Vec::len),
    ];
    let total = lengths.iter().try_fold(1usize, |acc, &n| acc.checked_mul(n));
    if total.is_none_or(|t| t > room) {
        let total = total.map_or("too many".to_string(), |t| t.to_string());
        stage_bail!(
            text,
            stage,
            "the sweep expands into {} x {} x {} = {total} stages; an experiment has at most {MAX_STAGES} (sweeps expanded){}",
            lengths[0],
            lengths[1],
            lengths[2],
            if room < MAX_STAGES { format!(", and the stages before this one leave room for {room}") } else { String::new() }
        );
    }
    let temperatures: Vec<Option<Temperature>> =
        sweep.temperature.map_or(vec![None], |v| v.into_iter().map(Some).collect());
    let hiddens: Vec<Option<Widths>> = sweep.hidden.map_or(vec![None], |v| v.into_iter().map(Some).collect());
    let seeds: Vec<Option<u64>> = sweep.seed.map_or(vec![None], |v| v.into_iter().map(Some).collect());
    if temperatures.is_empty() || hiddens.is_empty() || seeds.is_empty() {
        stage_bail!(text, stage, "a sweep list is empty");
    }
    let mut out = Vec::with_capacity(total.unwrap_or(0));
    for t in &temperatures {
        for h in &hiddens {
            for seed in &seeds {
                let mut s = stage.clone();
                let mut name = s.name.get_ref().clone();
                let mut point = SweepPoint { base: name.clone(), temperature: None, hidden: None, seed: None };
                if let Some(t) = t {
                    s.temperature = Some(*t);
                    point.temperature = Some(t.0);
                    name.push_str(&format!("-T{}", t.0));
                }
                if let Some(h) = h {
                    let Some(model) = s.model.as_mut() else {
                        stage_bail!(text, stage, "sweeping `hidden` needs a `model` table to vary");
                    };
                    model.hidden = h.clone();
                    point.hidden = Some(h.0.clone());
                    name.push_str(&format!("-h{}", h.0.iter().map(i64::to_string).collect::<Vec<_>>().join("x")));
                }
                if let Some(seed) = seed {
                    s.seed = Some(*seed);
                    point.seed = Some(*seed);
                    name.push_str(&format!("-s{seed}"));
                }
                s.name = Spanned::new(s.name.span(), name);
                s.point = Some(point);
                out.push(s);
            }
        }
    }
    Ok(out)
}
