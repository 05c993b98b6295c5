#![cfg_attr(not(test), allow(dead_code))]
//! A deterministic synthetic "tied-state speech" corpus: frames of `D` log-Mel-like channels, each
//! labelled with one of `K` tied triphone HMM states, standing in for the forced-aligned speech
//! data of the paper's section 4 (no real corpus is available).
//!
//! Everything is drawn from a small seeded generator ([`Rng`], xoshiro256** seeded by SplitMix64,
//! Box-Muller normals), never from libtorch's global generator. The "language" (templates, tying,
//! means, phone bigram) depends on `seed` alone; speaker `s` depends on `seed` and `s` alone, so
//! speakers can be generated in parallel or streamed.
//!
//! # Generative model
//!
//! Notation: `P` phones, phone 0 is silence ([`SILENCE`]); channels `c = 0..D`; `s ∈ {0, 1, 2}`
//! the HMM state position; `N` a standard normal draw; `S = D / 40` scales channel distances.
//!
//! * **Phone templates.** Phone `p` has a base level `b_p ~ U(1.5, 2.5)` and 2 to 4 formant-like
//!   bumps `j` (centre `f_j ~ U(0, D)`, width `w_j ~ U(0.04, 0.12)·D`, amplitude `a_j ~ U(1, 3)`,
//!   drift `δ_j ~ 0.04·D·N`); position `s` moves every bump by `δ_j (s − 1)`:
//!   `T_{p,s}(c) = b_p + Σ_j a_j exp(−(c − f_j − δ_j (s − 1))² / (2 w_j²))`.
//!   Silence is one low broad bump (`b = 0`, `a = 0.3`, width `0.3·D`).
//! * **Tying.** Each (phone, position) "slot" owns `n_{p,s} ≥ 1` tied states, `Σ n = K`, shared out
//!   at random in proportion to a per-phone weight `U(0.5, 1.5)` (silence `0.15`). A slot's
//!   possible contexts `(l, r)` are the pairs the phone chain can produce (no phone follows itself;
//!   silence only at the edges). Like decision-tree clustering, the context set is split
//!   repeatedly (largest leaf first) by questions "does the left/right phone have phonetic feature
//!   `q`" (6 random binary features per phone; an identity question "is it phone x" when no
//!   feature splits) until it has `n_{p,s}` leaves; each leaf is a tied state covering its
//!   contexts. Tied-state ids are numbered slot by slot, leaves in tree (depth-first) order.
//! * **Confusable groups.** Consecutive leaves of a slot (tree neighbours) form groups of
//!   `G = confusable_group_size`. With `g_γ` a group offset and `ε_k` a per-state offset, both
//!   smooth random curves over channels (white noise convolved with a Gaussian of width `1.5·S`,
//!   normalized to per-channel std 1): `μ_k = T_{p,s} + group_spread·g_γ(k) + within_group_spread·ε_k`.
//!   States of one group are close, so a classifier's mistakes concentrate within groups.
//! * **Durations.** A state occupancy lasts `d = 1 + NB(2, π)` frames with
//!   `E[d] = 1 + (mean_state_frames − 1)·φ_p·ρ_spk` (`φ_p ~ U(0.7, 1.3)`, silence 2,
//!   speaker rate `ρ_spk = exp(0.08·v·N)`); left to right, no skips, capped at 60 frames.
//! * **Utterances.** `L ~ U{⌈m/2⌉ .. m + ⌊m/2⌋}` phones (`m = mean_phones_per_utterance`) from a
//!   bigram chain (row weights `exp(N)`, no self-loops, silence never inside), with silence at
//!   both edges; triphone contexts at the edges are silence.
//! * **Frames.** With `c_i` the centre frame of occupancy `i`, the clean trajectory interpolates
//!   linearly between consecutive state means, `x_t = (1 − v) μ_i + v μ_{i+1}` for
//!   `c_i ≤ t < c_{i+1}`, where `u = (t − c_i)/(c_{i+1} − c_i)`, `u_b = d_i/(d_i + d_{i+1})` (the
//!   state boundary) and `v = clamp(u_b + (u − u_b)/coarticulation, 0, 1)` (`coarticulation = 0`:
//!   a step at the boundary). The label of frame `t` is the state whose occupancy contains `t`.
//! * **Speakers.** Speaker `spk` (with `v = speaker_variability`) draws a frequency warp
//!   `α = 1 + 0.04·v·N`, shift `β = S·v·N`, tilt `τ = 0.5·v·N` and gain `γ = 0.5·v·N`, and each
//!   utterance a gain jitter `γ_u = 0.2·v·N`:
//!   `y_t(c) = x_t(α (c − D/2 + ½) + D/2 − ½ + β) + τ (c/(D−1) − ½) + γ + γ_u`
//!   (linear interpolation between channels, clamped at the edges).
//! * **Noise.** AR(1) in time, smooth across channels: `n_0 = σ e_0`,
//!   `n_t = ρ n_{t−1} + √(1 − ρ²) σ e_t` with `σ = noise`, `ρ = noise_correlation` and `e_t` white
//!   noise convolved with a Gaussian of width `0.7·S` (unit variance). Features are `y_t + n_t`.
//!
//! Difficulty knobs: `noise`, `within_group_spread` / `group_spread` (confusability within and
//! between groups), `states` per phone, `coarticulation`, `speaker_variability`.
//!
//! [`FrameSet`] holds all frames of a set of utterances as tensors; [`context_windows`] gathers the
//! `left + 1 + right` frame windows of a batch (padding by repeating the utterance's edge frame),
//! and [`normalization`] gives the per-channel mean and standard deviation.

use crate::config::CorpusConfig;
use crate::rng::Rng;
use anyhow::{ensure, Result};
use tch::{Device, Kind, Tensor};

/// The silence phone.
pub const SILENCE: usize = 0;

const TAG_TEMPLATES: u64 = 1;
const TAG_PHONES: u64 = 2;
const TAG_BIGRAM: u64 = 3;
const TAG_TYING: u64 = 4;
const TAG_MEANS: u64 = 5;
const TAG_SPEAKER: u64 = 6;
const TAG_SPLIT: u64 = 7;

const PHONETIC_FEATURES: usize = 6;
const MAX_STATE_FRAMES: usize = 60;
const NO_STATE: u32 = u32::MAX;

/// Convolution of white noise with a Gaussian kernel, normalized to unit output variance.
struct Smoother {
    kernel: Vec<f64>,
}

impl Smoother {
    fn new(width: f64) -> Self {
        let width = width.max(0.3);
        let h = (3.0 * width).ceil() as i64;
        let mut kernel: Vec<f64> = (-h..=h).map(|j| (-(j * j) as f64 / (2.0 * width * width)).exp()).collect();
        let norm = kernel.iter().map(|k| k * k).sum::<f64>().sqrt();
        kernel.iter_mut().for_each(|k| *k /= norm);
        Smoother { kernel }
    }

    /// A smooth curve over `d` channels with per-channel std `sigma`, added into `out`.
    fn add(&self, rng: &mut Rng, sigma: f64, out: &mut [f64]) {
        let k = self.kernel.len();
        let white: Vec<f64> = (0..out.len() + k - 1).map(|_| rng.normal()).collect();
        for (c, o) in out.iter_mut().enumerate() {
            *o += sigma * self.kernel.iter().zip(&white[c..c + k]).map(|(a, b)| a * b).sum::<f64>();
        }
    }
}

/// Splits `contexts` like a decision tree into `n` leaves (`n <= contexts.len()`), returned in
/// depth-first order so that neighbouring leaves are tree siblings.
fn cluster_contexts(rng: &mut Rng, contexts: Vec<(u16, u16)>, n: usize, features: &[u64]) -> Vec<Vec<(u16, u16)>> {
    struct Node {
        items: Vec<(u16, u16)>,
        kids: Option<(usize, usize)>,
    }
    let side_of = |x: (u16, u16), side: usize| if side == 0 { x.0 } else { x.1 };
    let mut nodes = vec![Node { items: contexts, kids: None }];
    let mut leaves = vec![0usize];
    while leaves.len() < n {
        let mut li = 0;
        for (i, &nd) in leaves.iter().enumerate() {
            if nodes[nd].items.len() > nodes[leaves[li]].items.len() {
                li = i;
            }
        }
        let node = leaves[li];
        let items = std::mem::take(&mut nodes[node].items);
        assert!(items.len() >= 2, "cannot split a leaf of one context");
        let mut split = None;
        for _ in 0..16 {
            let (side, q) = (rng.below(2), rng.below(PHONETIC_FEATURES));
            let (a, b): (Vec<_>, Vec<_>) =
                items.iter().partition(|&&x| (features[side_of(x, side) as usize] >> q) & 1 == 1);
            if !a.is_empty() && !b.is_empty() {
                split = Some((a, b));
                break;
            }
        }
        let (a, b) = split.unwrap_or_else(|| {
            let side = if items.iter().any(|x| x.0 != items[0].0) { 0 } else { 1 };
            let v = side_of(items[rng.below(items.len())], side);
            items.iter().partition(|&&x| side_of(x, side) == v)
        });
        nodes.push(Node { items: a, kids: None });
        nodes.push(Node { items: b, kids: None });
        let (ia, ib) = (nodes.len() - 2, nodes.len() - 1);
        nodes[node].kids = Some((ia, ib));
        leaves[li] = ia;
        leaves.push(ib);
    }
    let mut out = Vec::with_capacity(n);
    let mut stack = vec![0usize];
    while let Some(nd) = stack.pop() {
        match nodes[nd].kids {
            Some((a, b)) => {
                stack.push(b);
                stack.push(a);
            }
            None => out.push(std::mem::take(&mut nodes[nd].items)),
        }
    }
    out
}

/// The speaker-independent part of the corpus ("the language"), built from `seed` alone.
pub struct CorpusModel {
    cfg: CorpusConfig,
    /// Clean state means, `[K, D]` row-major.
    means: Vec<f32>,
    /// Slot (`phone * 3 + position`) of each tied state.
    state_slot: Vec<u32>,
    state_group: Vec<u32>,
    groups: usize,
    /// `[3P, P, P]`: tied state of (slot, left, right), or `NO_STATE`.
    tying: Vec<u32>,
    /// `[P, P]` transition weights; row `SILENCE` is the initial distribution.
    bigram: Vec<f64>,
    duration_factor: Vec<f64>,
}

/// Per-speaker transform and speaking rate.
struct Speaker {
    warp: f64,
    shift: f64,
    tilt: f64,
    gain: f64,
    rate: f64,
}

impl Speaker {
    fn apply(&self, x: &[f64], extra_gain: f64, out: &mut [f64]) {
        let d = x.len();
        let mid = d as f64 / 2.0 - 0.5;
        for (c, o) in out.iter_mut().enumerate() {
            let pos = (self.warp * (c as f64 - mid) + mid + self.shift).clamp(0.0, (d - 1) as f64);
            let lo = (pos.floor() as usize).min(d - 2);
            let f = pos - lo as f64;
            let warped = (1.0 - f) * x[lo] + f * x[lo + 1];
            *o = warped + self.tilt * (c as f64 / (d - 1) as f64 - 0.5) + self.gain + extra_gain;
        }
    }
}

/// One utterance: `features` is `[frames, feature_dim]` row-major, `states` the tied state of each frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Utterance {
    pub speaker: usize,
    pub features: Vec<f32>,
    pub states: Vec<i32>,
}

impl Utterance {
    pub fn frames(&self) -> usize {
        self.states.len()
    }
}

impl CorpusModel {
    /// Builds templates, tying, state means and the phone bigram (checks `cfg` first).
    pub fn new(cfg: &CorpusConfig) -> Result<Self> {
        cfg.validate()?;
        let (p, d, k) = (cfg.phones, cfg.feature_dim, cfg.states);
        let df = d as f64;

        // Templates T_{p,s}, [3P, D].
        let mut rng = Rng::derive(cfg.seed, TAG_TEMPLATES, 0);
        let mut templates = vec![0f64; 3 * p * d];
        for ph in 0..p {
            let (base, bumps) = if ph == SILENCE {
                (0.0, vec![(df / 2.0, 0.3 * df, 0.3, 0.0)])
            } else {
                let base = 1.5 + rng.uniform();
                let nb = 2 + rng.below(3);
                let bumps: Vec<(f64, f64, f64, f64)> = (0..nb)
                    .map(|_| {
                        let centre = rng.uniform() * df;
                        let width = (0.04 + 0.08 * rng.uniform()) * df;
                        let amp = 1.0 + 2.0 * rng.uniform();
                        let drift = 0.04 * df * rng.normal();
                        (centre, width, amp, drift)
                    })
                    .collect();
                (base, bumps)
            };
            for s in 0..3 {
                let row = &mut templates[(ph * 3 + s) * d..(ph * 3 + s + 1) * d];
                for (c, t) in row.iter_mut().enumerate() {
                    *t = base
                        + bumps
                            .iter()
                            .map(|&(f, w, a, dr)| {
                                let z = c as f64 - f - dr * (s as f64 - 1.0);
                                a * (-z * z / (2.0 * w * w)).exp()
                            })
                            .sum::<f64>();
                }
            }
        }

        // Phonetic features, state-count weights and duration factors.
        let mut rng = Rng::derive(cfg.seed, TAG_PHONES, 0);
        let features: Vec<u64> = (0..p).map(|_| rng.next_u64() & ((1 << PHONETIC_FEATURES) - 1)).collect();
        let phone_weight: Vec<f64> = (0..p).map(|ph| if ph == SILENCE { 0.15 } else { 0.5 + rng.uniform() }).collect();
        let duration_factor: Vec<f64> =
            (0..p).map(|ph| if ph == SILENCE { 2.0 } else { 0.7 + 0.6 * rng.uniform() }).collect();

        // Bigram: no self-loops, silence only at the edges.
        let mut rng = Rng::derive(cfg.seed, TAG_BIGRAM, 0);
        let mut bigram = vec![0f64; p * p];
        for a in 0..p {
            for b in 0..p {
                let w = rng.normal().exp();
                if b != SILENCE && b != a {
                    bigram[a * p + b] = w;
                }
            }
        }

        // Possible contexts of each slot, and how many tied states each slot gets.
        let contexts_of = |ph: usize| -> Vec<(u16, u16)> {
            let mut v = Vec::new();
            if ph == SILENCE {
                for x in (0..p).filter(|&x| x != SILENCE) {
                    v.push((SILENCE as u16, x as u16));
                    v.push((x as u16, SILENCE as u16));
                }
            } else {
                let ctx: Vec<u16> = (0..p).filter(|&x| x != ph).map(|x| x as u16).collect();
                for &l in &ctx {
                    for &r in &ctx {
                        v.push((l, r));
                    }
                }
            }
            v
        };
        let capacity: Vec<usize> = (0..3 * p).map(|slot| contexts_of(slot / 3).len()).collect();
        let mut count = vec![1usize; 3 * p];
        let mut rng = Rng::derive(cfg.seed, TAG_TYING, u64::MAX);
        let mut weights: Vec<f64> = (0..3 * p).map(|slot| phone_weight[slot / 3]).collect();
        for _ in 3 * p..k {
            let slot = rng.weighted(&weights);
            count[slot] += 1;
            if count[slot] == capacity[slot] {
                weights[slot] = 0.0;
            }
        }

        // Tying trees, groups and means.
        let mut tying = vec![NO_STATE; 3 * p * p * p];
        let mut means = vec![0f32; k * d];
        let mut state_slot = Vec::with_capacity(k);
        let mut state_group = Vec::with_capacity(k);
        let mut groups = 0usize;
        let mut mean_rng = Rng::derive(cfg.seed, TAG_MEANS, 0);
        let smoother = Smoother::new(1.5 * df / 40.0);
        let g = cfg.confusable_group_size;
        for slot in 0..3 * p {
            let mut rng = Rng::derive(cfg.seed, TAG_TYING, slot as u64);
            let leaves = cluster_contexts(&mut rng, contexts_of(slot / 3), count[slot], &features);
            let template = &templates[slot * d..(slot + 1) * d];
            let mut group_offset = vec![0f64; d];
            for (i, leaf) in leaves.iter().enumerate() {
                if i % g == 0 {
                    group_offset.iter_mut().for_each(|x| *x = 0.0);
                    smoother.add(&mut mean_rng, cfg.group_spread as f64, &mut group_offset);
                    groups += 1;
                }
                let id = state_slot.len();
                let mut mu: Vec<f64> = template.iter().zip(&group_offset).map(|(a, b)| a + b).collect();
                smoother.add(&mut mean_rng, cfg.within_group_spread as f64, &mut mu);
                for (m, v) in means[id * d..(id + 1) * d].iter_mut().zip(&mu) {
                    *m = *v as f32;
                }
                for &(l, r) in leaf {
                    tying[(slot * p + l as usize) * p + r as usize] = id as u32;
                }
                state_slot.push(slot as u32);
                state_group.push((groups - 1) as u32);
            }
        }
        debug_assert_eq!(state_slot.len(), k);
        Ok(CorpusModel { cfg: cfg.clone(), means, state_slot, state_group, groups, tying, bigram, duration_factor })
    }

    pub fn config(&self) -> &CorpusConfig {
        &self.cfg
    }

    /// Clean, speaker-independent state means, `[K, D]` row-major.
    pub fn state_means(&self) -> &[f32] {
        &self.means
    }

    pub fn state_phone(&self, state: usize) -> usize {
        self.state_slot[state] as usize / 3
    }

    /// HMM state position (0, 1, 2) of a tied state.
    pub fn state_position(&self, state: usize) -> usize {
        self.state_slot[state] as usize % 3
    }

    /// Confusable group of a tied state (`0..groups()`).
    pub fn state_group(&self, state: usize) -> usize {
        self.state_group[state] as usize
    }

    pub fn groups(&self) -> usize {
        self.groups
    }

    /// The tied state of position `position` of triphone `left-phone+right`; `None` for a
    /// context the phone chain never produces.
    pub fn tied_state(&self, left: usize, phone: usize, right: usize, position: usize) -> Option<usize> {
        let p = self.cfg.phones;
        let id = self.tying[((phone * 3 + position) * p + left) * p + right];
        (id != NO_STATE).then_some(id as usize)
    }

    /// All utterances of speaker `speaker`, from `seed` and `speaker` alone.
    pub fn generate_speaker(&self, speaker: usize) -> Vec<Utterance> {
        let sv = self.cfg.speaker_variability as f64;
        let scale = self.cfg.feature_dim as f64 / 40.0;
        let mut rng = Rng::derive(self.cfg.seed, TAG_SPEAKER, speaker as u64);
        let spk = Speaker {
            warp: 1.0 + 0.04 * sv * rng.normal(),
            shift: scale * sv * rng.normal(),
            tilt: 0.5 * sv * rng.normal(),
            gain: 0.5 * sv * rng.normal(),
            rate: (0.08 * sv * rng.normal()).exp(),
        };
        let noise = Smoother::new(0.7 * scale);
        (0..self.cfg.utterances_per_speaker).map(|_| self.utterance(&mut rng, &spk, &noise, speaker)).collect()
    }

    fn utterance(&self, rng: &mut Rng, spk: &Speaker, noise: &Smoother, speaker: usize) -> Utterance {
        let cfg = &self.cfg;
        let (p, d) = (cfg.phones, cfg.feature_dim);
        let m = cfg.mean_phones_per_utterance;
        let lo = m.div_ceil(2);
        let len = lo + rng.below(m + m / 2 - lo + 1);
        let mut phones = vec![SILENCE];
        for _ in 0..len {
            let prev = *phones.last().unwrap();
            phones.push(rng.weighted(&self.bigram[prev * p..(prev + 1) * p]));
        }
        phones.push(SILENCE);

        // State occupancies (tied state, duration).
        let mut occ: Vec<(usize, usize)> = Vec::with_capacity(3 * phones.len());
        for i in 0..phones.len() {
            let l = if i == 0 { SILENCE } else { phones[i - 1] };
            let r = if i + 1 == phones.len() { SILENCE } else { phones[i + 1] };
            let extra = (cfg.mean_state_frames as f64 - 1.0) * self.duration_factor[phones[i]] * spk.rate;
            for s in 0..3 {
                let k = self.tied_state(l, phones[i], r, s).expect("the phone chain only produces tied contexts");
                let dur = if extra <= 0.0 {
                    1
                } else {
                    let q = 2.0 / (extra + 2.0);
                    1 + rng.geometric(q) + rng.geometric(q)
                };
                occ.push((k, dur.min(MAX_STATE_FRAMES)));
            }
        }

        let frames: usize = occ.iter().map(|o| o.1).sum();
        let mut centres = Vec::with_capacity(occ.len());
        let mut start = 0usize;
        for &(_, dur) in &occ {
            centres.push(start as f64 + (dur as f64 - 1.0) / 2.0);
            start += dur;
        }
        let mean = |k: usize| &self.means[k * d..(k + 1) * d];
        let utt_gain = 0.2 * cfg.speaker_variability as f64 * rng.normal();
        let (sigma, rho) = (cfg.noise as f64, cfg.noise_correlation as f64);
        let innov = (1.0 - rho * rho).sqrt();
        let coart = cfg.coarticulation as f64;

        let mut features = Vec::with_capacity(frames * d);
        let mut states = Vec::with_capacity(frames);
        let (mut x, mut y, mut n, mut e) = (vec![0f64; d], vec![0f64; d], vec![0f64; d], vec![0f64; d]);
        let (mut j, mut cur, mut cur_end) = (0usize, 0usize, occ[0].1);
        for t in 0..frames {
            let tf = t as f64;
            while t >= cur_end {
                cur += 1;
                cur_end += occ[cur].1;
            }
            while j + 1 < occ.len() && centres[j + 1] <= tf {
                j += 1;
            }
            if tf < centres[0] || j + 1 == occ.len() {
                let mu = mean(occ[if tf < centres[0] { 0 } else { j }].0);
                x.iter_mut().zip(mu).for_each(|(a, &b)| *a = b as f64);
            } else {
                let u = (tf - centres[j]) / (centres[j + 1] - centres[j]);
                let ub = occ[j].1 as f64 / (occ[j].1 + occ[j + 1].1) as f64;
                let v = if coart > 0.0 {
                    (ub + (u - ub) / coart).clamp(0.0, 1.0)
                } else if u > ub {
                    1.0
                } else {
                    0.0
                };
                let (a, b) = (mean(occ[j].0), mean(occ[j + 1].0));
                for c in 0..d {
                    x[c] = (1.0 - v) * a[c] as f64 + v * b[c] as f64;
                }
            }
            spk.apply(&x, utt_gain, &mut y);
            e.iter_mut().for_each(|v| *v = 0.0);
            noise.add(rng, 1.0, &mut e);
            for c in 0..d {
                n[c] = if t == 0 { sigma * e[c] } else { rho * n[c] + innov * sigma * e[c] };
                features.push((y[c] + n[c]) as f32);
            }
            states.push(occ[cur].0 as i32);
        }
        Utterance { speaker, features, states }
    }
}

/// All utterances of speaker `speaker` (deterministic from `cfg.seed` and `speaker` alone).
/// Builds the [`CorpusModel`] each call; keep one model to generate many speakers.
///
/// Fails if `cfg.validate()` fails or `speaker >= cfg.speakers`.
pub fn generate_speaker(cfg: &CorpusConfig, speaker: usize) -> Result<Vec<Utterance>> {
    if speaker >= cfg.speakers {
        anyhow::bail!("speaker {speaker} out of range (speakers = {})", cfg.speakers);
    }
    Ok(CorpusModel::new(cfg)?.generate_speaker(speaker))
}

/// Disjoint train/dev/test speaker lists (about 80/10/10, dev and test at least one speaker
/// each), each sorted; a seeded shuffle of all speakers.
pub fn split_speakers(cfg: &CorpusConfig) -> (Vec<usize>, Vec<usize>, Vec<usize>) {
    let n = cfg.speakers;
    let mut all: Vec<usize> = (0..n).collect();
    Rng::derive(cfg.seed, TAG_SPLIT, 0).shuffle(&mut all);
    let held = ((n as f64 / 10.0).round() as usize).max(1);
    let held = held.min(n.saturating_sub(1) / 2);
    let mut test = all[..held].to_vec();
    let mut dev = all[held..2 * held].to_vec();
    let mut train = all[2 * held..].to_vec();
    train.sort_unstable();
    dev.sort_unstable();
    test.sort_unstable();
    (train, dev, test)
}

/// All frames of a set of utterances, concatenated, on one device.
pub struct FrameSet {
    /// `[T, D]` float.
    pub features: Tensor,
    /// `[T]` int64 tied-state ids.
    pub labels: Tensor,
    /// `[T]` int64: index of the first frame of each frame's utterance.
    pub utt_start: Tensor,
    /// `[T]` int64: one past the last frame of each frame's utterance.
    pub utt_end: Tensor,
}

impl FrameSet {
    pub fn from_utterances(utts: &[Utterance], feature_dim: usize, device: Device) -> Result<FrameSet> {
        let total: usize = utts.iter().map(|u| u.frames()).sum();
        let mut features = Vec::with_capacity(total * feature_dim);
        let mut labels = Vec::with_capacity(total);
        let (mut start, mut end) = (Vec::with_capacity(total), Vec::with_capacity(total));
        for (i, u) in utts.iter().enumerate() {
            ensure!(
                u.features.len() == u.frames() * feature_dim,
                "utterance {i}: {} feature values for {} frames of {feature_dim}",
                u.features.len(),
                u.frames()
            );
            let s = labels.len() as i64;
            let e = s + u.frames() as i64;
            features.extend_from_slice(&u.features);
            labels.extend(u.states.iter().map(|&k| k as i64));
            start.resize(start.len() + u.frames(), s);
            end.resize(end.len() + u.frames(), e);
        }
        Ok(FrameSet {
            features: Tensor::from_slice(&features).view([total as i64, feature_dim as i64]).to_device(device),
            labels: Tensor::from_slice(&labels).to_device(device),
            utt_start: Tensor::from_slice(&start).to_device(device),
            utt_end: Tensor::from_slice(&end).to_device(device),
        })
    }

    /// Number of frames.
    pub fn len(&self) -> i64 {
        self.labels.size()[0]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn feature_dim(&self) -> i64 {
        self.features.size()[1]
    }
}

/// `[B, (left + 1 + right) * D]` context windows of the frames `frames` (`[B]` int64), oldest
/// frame first; offsets are clamped to the frame's own utterance, so edge frames repeat.
pub fn context_windows(set: &FrameSet, frames: &Tensor, left: i64, right: i64) -> Tensor {
    let device = set.features.device();
    let frames = frames.to_device(device).to_kind(Kind::Int64);
    let b = frames.size()[0];
    let w = left + 1 + right;
    let offsets = Tensor::arange_start(-left, right + 1, (Kind::Int64, device));
    let lo = set.utt_start.index_select(0, &frames).unsqueeze(1);
    let hi = set.utt_end.index_select(0, &frames).unsqueeze(1) - 1;
    let idx = (frames.unsqueeze(1) + offsets.unsqueeze(0)).clamp_tensor(Some(&lo), Some(&hi));
    set.features.index_select(0, &idx.view([-1])).view([b, w * set.feature_dim()])
}

/// Per-channel mean and standard deviation (`[D]` each, std at least 1e-6) over `set`; apply
/// as `(x - mean) / std` (tile `D` to `(left + 1 + right) * D` for windows).
pub fn normalization(set: &FrameSet) -> (Tensor, Tensor) {
    let x = set.features.to_kind(Kind::Double);
    let mean = x.mean_dim(0, false, Kind::Double);
    let std = x.std_dim(0, false, false).clamp_min(1e-6);
    (mean.to_kind(Kind::Float), std.to_kind(Kind::Float))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> CorpusConfig {
        CorpusConfig {
            seed: 7,
            phones: 8,
            states: 48,
            speakers: 6,
            utterances_per_speaker: 6,
            mean_phones_per_utterance: 6,
            ..CorpusConfig::default()
        }
    }

    fn all_utterances(model: &CorpusModel) -> Vec<Utterance> {
        (0..model.config().speakers).flat_map(|s| model.generate_speaker(s)).collect()
    }

    #[test]
    fn speech_is_deterministic_per_seed_and_speaker() {
        let cfg = tiny();
        let a = generate_speaker(&cfg, 2).unwrap();
        assert_eq!(a, generate_speaker(&cfg, 2).unwrap());
        assert_eq!(a.len(), cfg.utterances_per_speaker);
        // A speaker does not depend on how many others there are.
        assert_eq!(a, generate_speaker(&CorpusConfig { speakers: 50, ..cfg.clone() }, 2).unwrap());
        assert_ne!(a, generate_speaker(&cfg, 3).unwrap());
        let b = generate_speaker(&CorpusConfig { seed: 8, ..cfg.clone() }, 2).unwrap();
        assert_ne!(a[0].features[..40], b[0].features[..40]);
        assert_ne!(
            a.iter().map(|u| u.states.clone()).collect::<Vec<_>>(),
            b.iter().map(|u| u.states.clone()).collect::<Vec<_>>()
        );
        for u in &a {
            assert_eq!(u.features.len(), u.frames() * cfg.feature_dim);
            assert!(u.features.iter().all(|x| x.is_finite()));
        }
    }

    #[test]
    fn speech_validate_names_the_field() {
        assert!(CorpusConfig::default().validate().is_ok());
        assert!(tiny().validate().is_ok());
        let d = CorpusConfig::default;
        let bad: Vec<(&str, CorpusConfig)> = vec![
            ("phones", CorpusConfig { phones: 2, ..d() }),
            ("phones", CorpusConfig { phones: 101, states: 400, ..d() }),
            ("states", CorpusConfig { states: 100, ..d() }),
            ("states", CorpusConfig { phones: 3, states: 1000, ..d() }),
            ("speakers", CorpusConfig { speakers: 2, ..d() }),
            ("utterances_per_speaker", CorpusConfig { utterances_per_speaker: 0, ..d() }),
            ("mean_phones_per_utterance", CorpusConfig { mean_phones_per_utterance: 0, ..d() }),
            ("feature_dim", CorpusConfig { feature_dim: 1, ..d() }),
            ("confusable_group_size", CorpusConfig { confusable_group_size: 0, ..d() }),
            ("group_spread", CorpusConfig { group_spread: -1.0, ..d() }),
            ("within_group_spread", CorpusConfig { within_group_spread: f32::NAN, ..d() }),
            ("noise", CorpusConfig { noise: -0.1, ..d() }),
            ("speaker_variability", CorpusConfig { speaker_variability: f32::INFINITY, ..d() }),
            ("mean_state_frames", CorpusConfig { mean_state_frames: 0.5, ..d() }),
            ("coarticulation", CorpusConfig { coarticulation: 1.5, ..d() }),
            ("noise_correlation", CorpusConfig { noise_correlation: 1.0, ..d() }),
        ];
        for (field, cfg) in bad {
            let err = format!("{:#}", cfg.validate().unwrap_err());
            assert!(err.contains(&format!("`{field}`")), "{field}: {err}");
            assert!(CorpusModel::new(&cfg).is_err());
        }
    }

    #[test]
    fn speech_labels_in_range_and_every_state_reached() {
        let cfg = CorpusConfig { phones: 6, states: 36, speakers: 10, utterances_per_speaker: 10, ..tiny() };
        let model = CorpusModel::new(&cfg).unwrap();
        let mut seen = vec![0usize; cfg.states];
        for u in all_utterances(&model) {
            for &k in &u.states {
                assert!((0..cfg.states as i32).contains(&k));
                seen[k as usize] += 1;
            }
        }
        let unseen: Vec<usize> = (0..cfg.states).filter(|&k| seen[k] == 0).collect();
        assert!(unseen.is_empty(), "never produced: {unseen:?}");
    }

    #[test]
    fn speech_tying_covers_every_state_with_consistent_slots() {
        // The paper's 14,000 tied states over 40 phones.
        let cfg = CorpusConfig { states: 14_000, ..CorpusConfig::default() };
        let model = CorpusModel::new(&cfg).unwrap();
        let p = cfg.phones;
        let mut contexts = vec![0usize; cfg.states];
        for ph in 0..p {
            for s in 0..3 {
                for l in 0..p {
                    for r in 0..p {
                        if let Some(k) = model.tied_state(l, ph, r, s) {
                            assert_eq!((model.state_phone(k), model.state_position(k)), (ph, s));
                            contexts[k] += 1;
                        }
                    }
                }
            }
        }
        assert!(contexts.iter().all(|&c| c > 0), "a tied state covers no context");
        // A middle phone may follow any other phone and silence, never itself.
        assert!(model.tied_state(1, 2, 3, 1).is_some());
        assert!(model.tied_state(2, 2, 3, 1).is_none());
        assert!(model.tied_state(SILENCE, SILENCE, 3, 0).is_some());
        assert!(model.tied_state(1, SILENCE, 3, 0).is_none());
        assert_eq!(model.groups(), (0..cfg.states).map(|k| model.state_group(k)).max().unwrap() + 1);
    }

    #[test]
    fn speech_state_durations_have_the_configured_mean() {
        let cfg = CorpusConfig { speakers: 8, ..tiny() };
        let model = CorpusModel::new(&cfg).unwrap();
        let (mut runs, mut frames, mut ones) = (0usize, 0usize, 0usize);
        for u in all_utterances(&model) {
            let mut t = 0;
            while t < u.frames() {
                let k = u.states[t];
                let mut e = t;
                while e < u.frames() && u.states[e] == k {
                    e += 1;
                }
                if model.state_phone(k as usize) != SILENCE {
                    runs += 1;
                    frames += e - t;
                    ones += usize::from(e - t == 1);
                }
                t = e;
            }
        }
        let mean = frames as f64 / runs as f64;
        assert!(runs > 500, "{runs}");
        assert!((2.5..=3.5).contains(&mean), "mean state duration {mean} frames (configured 3)");
        let frac_one = ones as f64 / runs as f64;
        assert!((0.1..0.45).contains(&frac_one), "fraction of one-frame states {frac_one}");
    }

    /// Per-channel z-scores of all frames, with utterance boundaries.
    fn zscores(utts: &[Utterance], d: usize) -> (Vec<f64>, Vec<usize>) {
        let x: Vec<f64> = utts.iter().flat_map(|u| u.features.iter().map(|&v| v as f64)).collect();
        let t = x.len() / d;
        let mut z = x.clone();
        for c in 0..d {
            let m = (0..t).map(|i| x[i * d + c]).sum::<f64>() / t as f64;
            let v = (0..t).map(|i| (x[i * d + c] - m).powi(2)).sum::<f64>() / t as f64;
            for i in 0..t {
                z[i * d + c] = (x[i * d + c] - m) / v.sqrt();
            }
        }
        let mut ends = vec![];
        let mut acc = 0;
        for u in utts {
            acc += u.frames();
            ends.push(acc);
        }
        (z, ends)
    }

    #[test]
    fn speech_frames_are_correlated_in_time() {
        let cfg = tiny();
        let model = CorpusModel::new(&cfg).unwrap();
        let utts = all_utterances(&model);
        let d = cfg.feature_dim;
        let (z, ends) = zscores(&utts, d);
        let t = z.len() / d;
        let corr = |pairs: &[(usize, usize)]| {
            pairs.iter().map(|&(a, b)| (0..d).map(|c| z[a * d + c] * z[b * d + c]).sum::<f64>()).sum::<f64>()
                / (pairs.len() * d) as f64
        };
        let lag1: Vec<(usize, usize)> = (0..t - 1).filter(|i| !ends.contains(&(i + 1))).map(|i| (i, i + 1)).collect();
        let mut rng = Rng::new(1);
        let random: Vec<(usize, usize)> = (0..lag1.len()).map(|_| (rng.below(t), rng.below(t))).collect();
        let (c1, cr) = (corr(&lag1), corr(&random));
        assert!(c1 > 0.6, "lag-1 correlation {c1}");
        assert!(cr.abs() < 0.15 && c1 > 4.0 * cr.abs(), "random-pair correlation {cr} vs lag-1 {c1}");
    }

    /// Per-state mean features over `utts`, with counts.
    fn state_means(utts: &[Utterance], k: usize, d: usize) -> (Vec<f64>, Vec<usize>) {
        let mut sum = vec![0f64; k * d];
        let mut n = vec![0usize; k];
        for u in utts {
            for (t, &s) in u.states.iter().enumerate() {
                n[s as usize] += 1;
                for c in 0..d {
                    sum[s as usize * d + c] += u.features[t * d + c] as f64;
                }
            }
        }
        for s in 0..k {
            for c in 0..d {
                sum[s * d + c] /= n[s].max(1) as f64;
            }
        }
        (sum, n)
    }

    #[test]
    fn speech_speakers_differ_more_than_sampling_noise() {
        let (other, same, noise_floor) = speaker_gap(1.0);
        assert!(other > 2.0 * same, "between speakers {other}, within a speaker {same}");
        assert!(other > noise_floor, "between speakers {other}, noise / sqrt(n) {noise_floor}");
        // Control: without speaker variability two speakers look like two halves of one.
        let (other, same, _) = speaker_gap(0.0);
        assert!(other < 1.5 * same, "no variability: between speakers {other}, within a speaker {same}");
    }

    /// Mean over common states of the RMS difference of state means: (speaker 0 vs speaker 1,
    /// two halves of speaker 0, noise / sqrt(fewest frames)).
    fn speaker_gap(variability: f32) -> (f64, f64, f64) {
        let cfg = CorpusConfig { utterances_per_speaker: 40, speaker_variability: variability, ..tiny() };
        let model = CorpusModel::new(&cfg).unwrap();
        let (k, d) = (cfg.states, cfg.feature_dim);
        let a = model.generate_speaker(0);
        let b = model.generate_speaker(1);
        let (a1, na1) = state_means(&a[..20], k, d);
        let (a2, na2) = state_means(&a[20..], k, d);
        let (b1, nb1) = state_means(&b[..20], k, d);
        let rms = |x: &[f64], y: &[f64], s: usize| {
            ((0..d).map(|c| (x[s * d + c] - y[s * d + c]).powi(2)).sum::<f64>() / d as f64).sqrt()
        };
        let common: Vec<usize> = (0..k).filter(|&s| na1[s] >= 10 && na2[s] >= 10 && nb1[s] >= 10).collect();
        assert!(common.len() >= 10, "{}", common.len());
        let same = common.iter().map(|&s| rms(&a1, &a2, s)).sum::<f64>() / common.len() as f64;
        let other = common.iter().map(|&s| rms(&a1, &b1, s)).sum::<f64>() / common.len() as f64;
        let n_min = common.iter().map(|&s| na1[s].min(nb1[s])).min().unwrap() as f64;
        (other, same, cfg.noise as f64 / n_min.sqrt())
    }

    #[test]
    fn speech_confusable_groups_are_close() {
        let cfg = CorpusConfig { phones: 10, states: 200, ..tiny() };
        let model = CorpusModel::new(&cfg).unwrap();
        let (k, d) = (cfg.states, cfg.feature_dim);
        let mu = model.state_means();
        let dist = |a: usize, b: usize| {
            (0..d).map(|c| (mu[a * d + c] as f64 - mu[b * d + c] as f64).powi(2)).sum::<f64>().sqrt()
        };
        let (mut within, mut nw, mut between, mut nb, mut other, mut no) = (0.0, 0, 0.0, 0, 0.0, 0);
        for a in 0..k {
            for b in a + 1..k {
                if model.state_group(a) == model.state_group(b) {
                    assert_eq!(model.state_slot[a], model.state_slot[b]);
                    within += dist(a, b);
                    nw += 1;
                } else if model.state_slot[a] == model.state_slot[b] {
                    between += dist(a, b);
                    nb += 1;
                } else {
                    other += dist(a, b);
                    no += 1;
                }
            }
        }
        let (within, between, other) = (within / nw as f64, between / nb as f64, other / no as f64);
        assert!(within < 0.4 * between, "within groups {within}, between groups of one slot {between}");
        assert!(between < other, "between groups of one slot {between}, other slots {other}");
        // The nearest other state is mostly in the same group (mistakes concentrate there).
        let (mut hits, mut total) = (0, 0);
        for a in 0..k {
            if (0..k).filter(|&b| model.state_group(b) == model.state_group(a)).count() < 2 {
                continue;
            }
            let nearest = (0..k).filter(|&b| b != a).min_by(|&x, &y| dist(a, x).total_cmp(&dist(a, y))).unwrap();
            hits += usize::from(model.state_group(nearest) == model.state_group(a));
            total += 1;
        }
        assert!(hits as f64 > 0.9 * total as f64, "{hits} of {total} nearest neighbours in the same group");
    }

    fn naive_windows(utts: &[Utterance], d: usize, frames: &[i64], left: i64, right: i64) -> Vec<f32> {
        let mut bounds = vec![];
        let mut all = vec![];
        let mut acc = 0i64;
        for u in utts {
            for _ in 0..u.frames() {
                bounds.push((acc, acc + u.frames() as i64));
            }
            acc += u.frames() as i64;
            all.extend_from_slice(&u.features);
        }
        let mut out = vec![];
        for &f in frames {
            let (s, e) = bounds[f as usize];
            for o in -left..=right {
                let j = (f + o).clamp(s, e - 1) as usize;
                out.extend_from_slice(&all[j * d..(j + 1) * d]);
            }
        }
        out
    }

    #[test]
    fn speech_context_windows_match_a_naive_loop() {
        // Hand-made utterances of 2, 5 and 1 frames; value = 100 * utterance + 10 * frame + channel.
        let d = 3;
        let utts: Vec<Utterance> = [2usize, 5, 1]
            .iter()
            .enumerate()
            .map(|(u, &n)| Utterance {
                speaker: 0,
                features: (0..n * d).map(|i| (100 * u + 10 * (i / d) + i % d) as f32).collect(),
                states: vec![u as i32; n],
            })
            .collect();
        let set = FrameSet::from_utterances(&utts, d, Device::Cpu).unwrap();
        assert_eq!((set.len(), set.feature_dim(), set.is_empty()), (8, 3, false));
        let frames: Vec<i64> = vec![0, 1, 2, 3, 4, 5, 6, 7, 4, 0];
        for (left, right) in [(3, 2), (0, 0), (20, 5)] {
            let got = context_windows(&set, &Tensor::from_slice(&frames), left, right);
            assert_eq!(got.size(), [frames.len() as i64, (left + 1 + right) * d as i64]);
            let got = Vec::<f32>::try_from(got.flatten(0, -1)).unwrap();
            assert_eq!(got, naive_windows(&utts, d, &frames, left, right));
        }
        // Spelled out: frame 2 (first of utterance 1) with 2 left, 1 right repeats its first frame
        // and never reaches utterance 0 or 2.
        let w =
            Vec::<f32>::try_from(context_windows(&set, &Tensor::from_slice(&[2i64, 7]), 2, 1).flatten(0, -1)).unwrap();
        let first: Vec<f32> = w.iter().step_by(d).copied().collect();
        assert_eq!(first, vec![100.0, 100.0, 100.0, 110.0, 200.0, 200.0, 200.0, 200.0]);

        // Generated data with the paper's window.
        let cfg = CorpusConfig { utterances_per_speaker: 3, ..tiny() };
        let utts = generate_speaker(&cfg, 0).unwrap();
        let set = FrameSet::from_utterances(&utts, cfg.feature_dim, Device::Cpu).unwrap();
        let n = set.len();
        let mut frames: Vec<i64> = vec![0, 1, n - 1, n - 2];
        let mut acc = 0;
        for u in &utts {
            frames.extend([acc, acc + 3, acc + u.frames() as i64 - 1]);
            acc += u.frames() as i64;
        }
        let got = context_windows(&set, &Tensor::from_slice(&frames), 20, 5);
        let got = Vec::<f32>::try_from(got.flatten(0, -1)).unwrap();
        assert_eq!(got, naive_windows(&utts, cfg.feature_dim, &frames, 20, 5));
        let labels = Vec::<i64>::try_from(&set.labels).unwrap();
        assert_eq!(labels[..utts[0].frames()], utts[0].states.iter().map(|&k| k as i64).collect::<Vec<_>>()[..]);
    }

    #[test]
    fn speech_normalization_standardizes() {
        let cfg = tiny();
        let set = FrameSet::from_utterances(&generate_speaker(&cfg, 0).unwrap(), cfg.feature_dim, Device::Cpu).unwrap();
        let (mean, std) = normalization(&set);
        assert_eq!(mean.size(), [cfg.feature_dim as i64]);
        let z = (&set.features - mean.unsqueeze(0)) / std.unsqueeze(0);
        let zm = z.mean_dim(0, false, Kind::Float).abs().max().double_value(&[]);
        let zs = z.std_dim(0, false, false);
        let (lo, hi) = (zs.min().double_value(&[]), zs.max().double_value(&[]));
        assert!(zm < 1e-4 && (lo - 1.0).abs() < 1e-4 && (hi - 1.0).abs() < 1e-4, "{zm} {lo} {hi}");
    }

    #[test]
    fn speech_speaker_split_is_disjoint_and_complete() {
        let cfg = CorpusConfig::default();
        let (train, dev, test) = split_speakers(&cfg);
        assert_eq!((train.len(), dev.len(), test.len()), (16, 2, 2));
        let mut all: Vec<usize> = train.iter().chain(&dev).chain(&test).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..cfg.speakers).collect::<Vec<_>>());
        assert_eq!(split_speakers(&cfg), (train, dev, test));
        let three = split_speakers(&CorpusConfig { speakers: 3, ..cfg });
        assert_eq!((three.0.len(), three.1.len(), three.2.len()), (1, 1, 1));
    }
}
