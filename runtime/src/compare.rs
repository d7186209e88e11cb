//! The same model on two provider lists, stage by stage, on the reference cases' inputs: what
//! `llama3v check --against` prints. Each stage gets the same input on both sides (the CPU's
//! preprocessing, the reference's greedy tokens teacher-forced), so a difference is pinned to one graph.

use serde::Serialize;

use crate::check::{load_reference, measure, Measure, Tolerances, REFERENCE_DIR};
use crate::error::Result;
use crate::manifest::resolve_inside;
use crate::model::Model;
use crate::preprocess::{load_image, DecodeLimits};
use crate::sampling::argmax;

#[derive(Debug, Clone, Serialize)]
pub struct CaseComparison {
    pub case: String,
    pub measures: Vec<Measure>,
    /// Steps whose argmax is the same on both sides.
    pub greedy_agreement: usize,
    pub greedy_steps: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProviderComparison {
    pub a: String,
    pub b: String,
    pub tolerances: Tolerances,
    pub cases: Vec<CaseComparison>,
}

impl ProviderComparison {
    pub fn pass(&self) -> bool {
        !self.cases.is_empty() && self.cases.iter().all(|c| c.measures.iter().all(|m| m.pass))
    }

    /// The largest logits difference over all cases and steps (relative for fp16 exports).
    pub fn max_logits_diff(&self) -> f64 {
        self.measures("step_logits").fold(0.0, f64::max)
    }

    /// Agreeing greedy steps and all steps, over all cases.
    pub fn greedy_agreement(&self) -> (usize, usize) {
        self.cases.iter().fold((0, 0), |(a, n), c| {
            (a + c.greedy_agreement, n + c.greedy_steps)
        })
    }

    fn measures<'a>(&'a self, stage: &'a str) -> impl Iterator<Item = f64> + 'a {
        self.cases
            .iter()
            .flat_map(|c| c.measures.iter())
            .filter(move |m| m.stage == stage)
            .map(|m| m.measured)
    }
}

/// Runs every reference case of `a`'s model directory on both models and measures their differences.
/// Both must load the same directory; `a_name` and `b_name` label the provider lists.
pub fn compare_models(
    a: &Model,
    b: &Model,
    a_name: &str,
    b_name: &str,
) -> Result<ProviderComparison> {
    let index = load_reference(&a.dir)?;
    let tol = Tolerances::for_manifest(&a.manifest);
    let mut cases = Vec::new();
    for case in &index.cases {
        let ref_dir = a.dir.join(REFERENCE_DIR);
        let images = case
            .images
            .iter()
            .map(|name| load_image(&resolve_inside(&ref_dir, name)?, &DecodeLimits::default()))
            .collect::<Result<Vec<_>>>()?;
        let ids = a.prompt_ids(&case.messages(), &images)?;
        let pixels = a.pixel_values(&images);
        let mut measures = Vec::new();

        let features_a = a.sessions.image_features(&pixels, images.len())?;
        let features_b = b.sessions.image_features(&pixels, images.len())?;
        if !images.is_empty() {
            measures.push(measure(
                "image_features",
                &features_a,
                &features_b,
                tol.image_features,
                tol.relative,
            ));
        }
        // Both sides continue from `a`'s features so the decoder comparison is not the vision graph's.
        let embeds_a = a.sessions.prompt_embeddings(&ids, &features_a)?;
        let embeds_b = b.sessions.prompt_embeddings(&ids, &features_a)?;
        measures.push(measure(
            "inputs_embeds",
            &embeds_a,
            &embeds_b,
            tol.image_features,
            tol.relative,
        ));

        let (mut logits_a, mut logits_b) = (Vec::new(), Vec::new());
        let mut cache_a = a.sessions.prefill(
            &embeds_a,
            ids.len(),
            case.greedy_tokens.len(),
            &mut logits_a,
        )?;
        let mut cache_b = b.sessions.prefill(
            &embeds_a,
            ids.len(),
            case.greedy_tokens.len(),
            &mut logits_b,
        )?;
        let mut worst: Option<(usize, Measure)> = None;
        let mut agreement = 0;
        for step in 0..case.greedy_tokens.len() {
            if step > 0 {
                let previous = case.greedy_tokens[step - 1];
                a.sessions.step(previous, &mut cache_a, &mut logits_a)?;
                b.sessions.step(previous, &mut cache_b, &mut logits_b)?;
            }
            let m = measure(
                "step_logits",
                &logits_a,
                &logits_b,
                tol.logits,
                tol.relative,
            );
            if worst.as_ref().is_none_or(|(_, w)| m.measured > w.measured) {
                worst = Some((step, m));
            }
            if !logits_a.is_empty() && argmax(&logits_a) == argmax(&logits_b) {
                agreement += 1;
            }
        }
        let steps = case.greedy_tokens.len();
        if let Some((step, mut m)) = worst {
            m.detail = format!("worst over {steps} steps, at step {step}; {}", m.detail);
            measures.push(m);
        }
        measures.push(Measure {
            stage: "greedy_tokens".into(),
            measured: (steps - agreement) as f64,
            tolerance: 0.0,
            pass: !tol.require_token_agreement || agreement == steps,
            detail: format!(
                "{agreement}/{steps} argmax tokens agree between {a_name} and {b_name}"
            ),
        });
        cases.push(CaseComparison {
            case: case.name.clone(),
            measures,
            greedy_agreement: agreement,
            greedy_steps: steps,
        });
    }
    Ok(ProviderComparison {
        a: a_name.into(),
        b: b_name.into(),
        tolerances: tol,
        cases,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.1, 0.7, 0.7, -1.0]), 1);
        assert_eq!(argmax(&[]), 0);
    }

    #[test]
    fn measures_are_absolute_or_relative() {
        let m = measure("x", &[1.0, 2.0], &[1.0, 2.5], 1e-4, false);
        assert_eq!(m.measured, 0.5);
        assert!(!m.pass);
        let m = measure("x", &[1.0, 10.0], &[1.0, 10.05], 1e-2, true);
        assert!((m.measured - 0.05 / 10.05).abs() < 1e-6, "{}", m.measured);
        assert!(m.pass);
    }
}
