//! The settings of the synthetic speech corpus (an experiment file's `[data.speech]` table),
//! checked here; `data::speech` generates the corpus from them.

use anyhow::{ensure, Result};

/// Settings of the synthetic corpus (an experiment file's `[data.speech]` table; keys left out
/// keep their defaults).
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CorpusConfig {
    pub seed: u64,
    /// Phones, silence included (phone 0).
    pub phones: usize,
    /// Tied states `K`: at least `3 * phones`.
    pub states: usize,
    pub speakers: usize,
    pub utterances_per_speaker: usize,
    pub mean_phones_per_utterance: usize,
    /// Channels per frame (40 "Mel" filterbanks).
    pub feature_dim: usize,
    /// Tied states per confusable group (1: no groups).
    pub confusable_group_size: usize,
    /// Std of a group's offset from its (phone, position) template.
    pub group_spread: f32,
    /// Std of a state's offset from its group mean.
    pub within_group_spread: f32,
    /// Mean frames per HMM state occupancy (`>= 1`).
    pub mean_state_frames: f32,
    /// 1: linear interpolation between state centres; 0: steps at state boundaries.
    pub coarticulation: f32,
    /// Std of the additive noise.
    pub noise: f32,
    /// Frame-to-frame correlation of the noise, in `[0, 1)`.
    pub noise_correlation: f32,
    /// Scales every speaker-dependent transform (0: all speakers alike).
    pub speaker_variability: f32,
}

impl Default for CorpusConfig {
    fn default() -> Self {
        CorpusConfig {
            seed: 0,
            phones: 40,
            states: 600,
            speakers: 20,
            utterances_per_speaker: 10,
            mean_phones_per_utterance: 12,
            feature_dim: 40,
            confusable_group_size: 4,
            group_spread: 0.6,
            within_group_spread: 0.15,
            mean_state_frames: 3.0,
            coarticulation: 1.0,
            noise: 0.5,
            noise_correlation: 0.8,
            speaker_variability: 1.0,
        }
    }
}

impl CorpusConfig {
    /// The most tied states the phone set allows: one per possible (context, slot).
    pub fn max_states(&self) -> usize {
        let n = self.phones.saturating_sub(1);
        3 * (n * n * n + 2 * n)
    }

    /// Checks every field; an error names the field.
    pub fn validate(&self) -> Result<()> {
        ensure!(self.phones >= 3, "speech corpus: `phones` = {} must be at least 3 (silence + 2)", self.phones);
        ensure!(self.phones <= 100, "speech corpus: `phones` = {} must be at most 100", self.phones);
        ensure!(
            self.states >= 3 * self.phones,
            "speech corpus: `states` = {} must be at least 3 * phones = {}",
            self.states,
            3 * self.phones
        );
        ensure!(
            self.states <= self.max_states() && self.states <= 1_000_000,
            "speech corpus: `states` = {} exceeds the {} distinct (context, phone, position) triples of {} phones \
             (or 1000000)",
            self.states,
            self.max_states(),
            self.phones
        );
        ensure!(
            self.speakers >= 3,
            "speech corpus: `speakers` = {} must be at least 3 (train/dev/test)",
            self.speakers
        );
        ensure!(self.utterances_per_speaker >= 1, "speech corpus: `utterances_per_speaker` must be at least 1");
        ensure!(self.mean_phones_per_utterance >= 1, "speech corpus: `mean_phones_per_utterance` must be at least 1");
        ensure!(self.feature_dim >= 2, "speech corpus: `feature_dim` = {} must be at least 2", self.feature_dim);
        ensure!(self.confusable_group_size >= 1, "speech corpus: `confusable_group_size` must be at least 1");
        let nonneg = [
            ("group_spread", self.group_spread),
            ("within_group_spread", self.within_group_spread),
            ("noise", self.noise),
            ("speaker_variability", self.speaker_variability),
        ];
        for (name, v) in nonneg {
            ensure!(v.is_finite() && v >= 0.0, "speech corpus: `{name}` = {v} must be finite and >= 0");
        }
        ensure!(
            self.mean_state_frames.is_finite() && (1.0..=30.0).contains(&self.mean_state_frames),
            "speech corpus: `mean_state_frames` = {} must be in [1, 30]",
            self.mean_state_frames
        );
        ensure!(
            (0.0..=1.0).contains(&self.coarticulation),
            "speech corpus: `coarticulation` = {} must be in [0, 1]",
            self.coarticulation
        );
        ensure!(
            (0.0..1.0).contains(&self.noise_correlation),
            "speech corpus: `noise_correlation` = {} must be in [0, 1)",
            self.noise_correlation
        );
        Ok(())
    }
}
