//! Next-token selection: turns one row of decoder logits into a token id.
//!
//! Kept apart from the model, as in candle's `generation` module: [`SamplingParams`] is plain
//! data, [`Sampler`] owns the seeded RNG and the scratch buffers. The pipeline follows
//! transformers' logits processors, in their order:
//!
//! 1. repetition penalty (`RepetitionPenaltyLogitsProcessor`),
//! 2. temperature (`TemperatureLogitsWarper`); temperature 0 means greedy: argmax, stop here,
//! 3. top-k (`TopKLogitsWarper`),
//! 4. top-p (`TopPLogitsWarper`),
//! 5. one draw from the softmax of what is left (`torch.multinomial`).
//!
//! Reproducibility: with a seed, the draws come from ChaCha8 keyed by that seed, and every
//! sampled (non-greedy) step consumes exactly one `u64`. ChaCha's stream is fixed by its
//! specification, and the way from it to a token below uses no library distribution, no
//! platform `exp`, no compiler-ordered sum and no std selection whose order could change, so a
//! seed gives the same tokens on every platform and release for the same logits. The numbers
//! will not match PyTorch's generator: only the distribution does.
//!
//! Cost: one pass or two over the vocabulary per token (~128k for Llama 3.2): scratch buffers
//! live in the [`Sampler`], top-k streams the row past a bar instead of sorting, and top-p
//! pre-filters by a mass bound and then cuts with a weighted quickselect instead of sorting.

use std::fmt;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{Error, Result};

/// How the next token is chosen. Check with [`SamplingParams::validate`]; [`Sampler::new`] does.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; `0` selects greedy decoding (argmax, ignoring top-k, top-p and seed).
    pub temperature: f32,
    /// Keep only the `k` most likely tokens; `None` turns top-k off.
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches `p`; `None` or `1`
    /// turns top-p off.
    pub top_p: Option<f32>,
    /// Penalty on tokens already in the prompt or the output; `1` turns it off.
    pub repetition_penalty: f32,
    /// RNG seed for reproducible sampling; `None` seeds from OS entropy.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self::greedy()
    }
}

impl SamplingParams {
    /// Greedy decoding with no repetition penalty: the same output on every run.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
            seed: None,
        }
    }

    /// Whether these parameters pick the argmax instead of drawing.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Checks every field's range; the error names the field, the valid range and the value.
    pub fn validate(&self) -> Result<()> {
        let t = self.temperature;
        if !(t.is_finite() && t >= 0.0) {
            return Err(Error::Sampling(format!(
                "temperature must be a finite number >= 0 (0 = greedy), got {t}"
            )));
        }
        if self.top_k == Some(0) {
            return Err(Error::Sampling(
                "top_k must be >= 1 (leave it unset to turn top-k off), got 0".into(),
            ));
        }
        if let Some(p) = self.top_p {
            // Written so that NaN fails too.
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::Sampling(format!(
                    "top_p must be in (0, 1] (1 = off), got {p}"
                )));
            }
        }
        let r = self.repetition_penalty;
        if !(r.is_finite() && r > 0.0) {
            return Err(Error::Sampling(format!(
                "repetition_penalty must be a finite number > 0 (1 = off), got {r}"
            )));
        }
        Ok(())
    }
}

/// Picks tokens from logits. Owns the RNG and reusable scratch space, so one `Sampler` should
/// serve a whole generation (and may serve many): steady-state sampling allocates nothing.
pub struct Sampler {
    params: SamplingParams,
    seed: u64,
    rng: ChaCha8Rng,
    /// The row after the repetition penalty (left unused when the penalty is off).
    scores: Vec<f32>,
    /// Unnormalised probabilities, indexed by token id; only survivors' entries are meaningful.
    weights: Vec<f32>,
    /// Rank keys (see [`rank_key`]) of the survivors, when top-k or top-p has cut the row.
    keys: Vec<u64>,
}

impl fmt::Debug for Sampler {
    // Hand-written: the scratch buffers hold whole vocabularies.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sampler")
            .field("params", &self.params)
            .field("seed", &self.seed)
            .finish_non_exhaustive()
    }
}

impl Sampler {
    /// Validates `params` and seeds the RNG from `params.seed`, or from OS entropy when unset.
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        // Without a seed, draw one from the OS-seeded thread RNG; [`Sampler::seed`] reports it so
        // a run can be repeated.
        let seed = params.seed.unwrap_or_else(rand::random);
        Ok(Sampler {
            params,
            seed,
            rng: rng_from_seed(seed),
            scores: Vec::new(),
            weights: Vec::new(),
            keys: Vec::new(),
        })
    }

    /// The parameters this sampler was built with.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The seed in use: the given one, or the one drawn from OS entropy. Passing it back as
    /// `seed` repeats the run.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Picks the next token from one row of logits.
    ///
    /// `previous` = prompt + generated ids so far (for the repetition penalty, applied as in
    /// transformers' `RepetitionPenaltyLogitsProcessor`: `score < 0 ? score * p : score / p`,
    /// once on each distinct previous id). Ids past the end of `logits` are skipped: they have
    /// no logit to penalise (Llama 3.2 Vision's `<|image|>` id 128256 is one row past its
    /// 128256-row LM head).
    ///
    /// `step` is only for the [`Error::NonFiniteLogits`] error.
    pub fn sample(&mut self, logits: &[f32], previous: &[u32], step: usize) -> Result<u32> {
        if logits.is_empty() {
            return Err(Error::Sampling(
                "logits row is empty: expected one logit per vocabulary token".into(),
            ));
        }
        // Token ids are u32; a larger row cannot be indexed by them.
        if logits.len() > u32::MAX as usize {
            return Err(Error::Sampling(format!(
                "logits row has {} entries, more than the {} token ids a u32 can name",
                logits.len(),
                u32::MAX
            )));
        }
        // NaN/Inf means the graph or the runtime went wrong; sampling from it would emit garbage
        // quietly, so stop and say where.
        if !all_finite(logits) {
            return Err(Error::NonFiniteLogits { step });
        }

        let Sampler {
            params,
            rng,
            scores,
            weights,
            keys,
            ..
        } = self;
        let scores: &[f32] = if params.repetition_penalty == 1.0 {
            logits
        } else {
            apply_repetition_penalty(scores, logits, previous, params.repetition_penalty);
            scores
        };
        if params.is_greedy() {
            return Ok(argmax(scores));
        }
        let kept = restrict(
            scores,
            params.temperature,
            params.top_k,
            params.top_p,
            weights,
            keys,
        );
        // Exactly one draw per sampled step, whatever the filters did, so the stream position
        // is the step count.
        let u = unit_f64(rng.next_u64());
        match kept {
            Kept::All(total) => draw_all(weights, u * total),
            Kept::Listed(total) => draw_listed(keys, weights, u * total),
        }
    }
}

/// ChaCha8 keyed with the seed's little-endian bytes (rest of the key zero). Done by hand rather
/// than with `seed_from_u64` so the seed-to-stream mapping is fixed here, not by a library default.
fn rng_from_seed(seed: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    ChaCha8Rng::from_seed(key)
}

/// Uniform in [0, 1) from the top 53 bits: exact in f64, and independent of `rand`'s
/// distribution code, which is not promised to stay value-stable.
fn unit_f64(bits: u64) -> f64 {
    (bits >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Writes the penalised row into `scores`.
fn apply_repetition_penalty(scores: &mut Vec<f32>, logits: &[f32], previous: &[u32], penalty: f32) {
    scores.clear();
    scores.extend_from_slice(logits);
    for &id in previous {
        let i = id as usize;
        // Penalising from the untouched row makes repeats in `previous` harmless: each distinct
        // id is penalised once, as transformers' gather/scatter does.
        if let (Some(&logit), Some(s)) = (logits.get(i), scores.get_mut(i)) {
            *s = penalize(logit, penalty);
        }
    }
}

/// transformers' repetition penalty on one logit. A very small penalty can overflow f32; the
/// result saturates at ±f32::MAX so later arithmetic stays finite.
fn penalize(logit: f32, penalty: f32) -> f32 {
    let v = if logit < 0.0 {
        logit * penalty
    } else {
        logit / penalty
    };
    v.clamp(f32::MIN, f32::MAX)
}

/// Largest of a non-empty, finite row.
fn max_of(scores: &[f32]) -> f32 {
    // Sixteen independent running maxima, so the loop vectorises (a single `fold` does not).
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = scores.chunks_exact(16);
    for chunk in &mut chunks {
        for (lane, &s) in lanes.iter_mut().zip(chunk) {
            *lane = if s > *lane { s } else { *lane };
        }
    }
    lanes
        .into_iter()
        .chain(chunks.remainder().iter().copied())
        .fold(f32::NEG_INFINITY, f32::max)
}

/// Whether every entry is finite. Checks exponent bits over whole chunks with no early exit
/// inside one, so the loop vectorises; several times faster than `any(is_finite)` over ~128k.
fn all_finite(row: &[f32]) -> bool {
    const EXPONENT: u32 = 0x7f80_0000;
    row.chunks(1024).all(|chunk| {
        !chunk
            .iter()
            .fold(false, |bad, x| bad | (x.to_bits() & EXPONENT == EXPONENT))
    })
}

/// Index of the highest score in a non-empty, finite row of at most u32::MAX entries; ties go
/// to the lowest index, as with `torch.argmax`.
/// Index of the largest score (the first on ties), as greedy decoding picks it; 0 for an empty row.
/// The one argmax of the runtime: sampling, reference checks and benchmarks use it.
pub fn argmax(scores: &[f32]) -> u32 {
    // Two simple passes (max, then first match) run faster than one pass carrying an index.
    let max = max_of(scores);
    // Always found (`max` is one of the scores); 0 only keeps this free of a panic path.
    let i = scores.iter().position(|&s| s == max).unwrap_or(0);
    // Lossless: at most u32::MAX scores.
    i as u32
}

/// Orders tokens as `u64`s: ascending key = descending score, equal scores by ascending id.
/// The high half is the score's bits mapped so that unsigned order is reverse numeric order;
/// the low half is the id. Keys are unique, so every selection and sort on them has exactly one
/// answer, whatever the algorithm: results cannot change with the std version.
fn rank_key(score: f32, id: u32) -> u64 {
    // Adding +0.0 turns -0.0 into +0.0, so the two zeros tie (and go by id) as in argmax.
    let bits = (score + 0.0).to_bits();
    let ascending = if bits >> 31 == 1 {
        !bits
    } else {
        bits | 0x8000_0000
    };
    (u64::from(!ascending) << 32) | u64::from(id)
}

/// The token id in a [`rank_key`].
fn key_id(key: u64) -> usize {
    // Truncation intended: the id is the low half.
    key as u32 as usize
}

/// Below this, `exp` is under f32's smallest normal number; such weights count as 0.
const EXP_FLOOR: f32 = -87.0;

/// `e^x` for `x <= 0` (including -inf), to about 2 ulp, written out (Cephes' `expf` scheme) for
/// two reasons: std's `exp` calls the platform libm, whose last bits differ between platforms
/// and would let a seed pick different tokens, and this branch-free form vectorises, which
/// matters at one call per vocabulary entry per token. `exp(0)` is exactly 1.
fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n * LN2_HI is exact for the |n| <= 126 used here.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let xc = if x < EXP_FLOOR { EXP_FLOOR } else { x };
    let shifted = xc * LOG2E + ROUND;
    let n = shifted - ROUND;
    // The integer n in [-126, 0], read from the low bits of `shifted` (same binade as ROUND).
    let n_int = shifted.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = ((((1.987_569_2e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let e_r = p * r * r + r + 1.0;
    // 2^n built from its exponent bits; n + 127 is in [1, 127], a normal number.
    let scale = f32::from_bits(((n_int + 127) as u32) << 23);
    if x < EXP_FLOOR {
        0.0
    } else {
        e_r * scale
    }
}

/// Which tokens survive [`restrict`], with their total weight.
enum Kept {
    /// Every token, in id order, weights in `weights`.
    All(f64),
    /// The tokens in `keys`, in that order, weights in `weights` by id.
    Listed(f64),
}

/// Tokens per block in [`blocked_sum`] and [`draw_all`].
const BLOCK: usize = 256;

/// Sum of a block of weights in a fixed order: eight independent lanes, then a fixed tree. The
/// order is spelled out (never left to the compiler), so the total is the same everywhere, and
/// the independent lanes avoid one long chain of dependent additions.
fn block_sum(block: &[f32]) -> f64 {
    let mut lanes = [0.0f64; 8];
    let mut chunks = block.chunks_exact(8);
    for chunk in &mut chunks {
        for (lane, &w) in lanes.iter_mut().zip(chunk) {
            *lane += f64::from(w);
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(0.0f64, |acc, &w| acc + f64::from(w));
    let [a, b, c, d, e, f, g, h] = lanes;
    (((a + b) + (c + d)) + ((e + f) + (g + h))) + tail
}

/// Sum of all weights: block sums added in block order, the order [`draw_all`] uses.
fn blocked_sum(weights: &[f32]) -> f64 {
    weights
        .chunks(BLOCK)
        .fold(0.0f64, |acc, block| acc + block_sum(block))
}

/// Sum of the listed tokens' weights, in list order, the order [`draw_listed`] uses.
fn listed_sum(keys: &[u64], weights: &[f32]) -> f64 {
    keys.iter()
        .fold(0.0f64, |acc, &k| acc + f64::from(weights[key_id(k)]))
}

/// Applies temperature, top-k and top-p to a finite, non-empty row of at most u32::MAX scores,
/// leaving the survivors' weights in `weights` (by id) and, when the row was cut, their keys in
/// `keys`.
fn restrict(
    scores: &[f32],
    temperature: f32,
    top_k: Option<usize>,
    top_p: Option<f32>,
    weights: &mut Vec<f32>,
    keys: &mut Vec<u64>,
) -> Kept {
    let n = scores.len();
    // Temperature enters as exp((s - max) / t) rather than by dividing the scores first: s - max
    // is <= 0, so a tiny t gives -inf and weight 0 instead of overflowing to inf - inf = NaN.
    // The most likely token gets weight exactly 1, so every total is >= 1.
    let top_p = top_p.filter(|&p| p < 1.0);

    // k >= vocabulary size keeps everything (transformers clamps k the same way).
    if let Some(k) = top_k.filter(|&k| k >= 1 && k < n) {
        top_k_keys(scores, k, keys);
        // Only the survivors' entries are written or read.
        weights.resize(n, 0.0);
        let max = scores[key_id(keys[0])];
        for &key in keys.iter() {
            let id = key_id(key);
            weights[id] = exp_nonpositive((scores[id] - max) / temperature);
        }
        if let Some(p) = top_p {
            // transformers renormalises over the top k before applying top-p.
            let threshold = f64::from(p) * listed_sum(keys, weights);
            let keep = scan_cut(keys, weights, 0.0, threshold);
            keys.truncate(keep);
        }
        return Kept::Listed(listed_sum(keys, weights));
    }

    let max = max_of(scores);
    weights.clear();
    weights.extend(
        scores
            .iter()
            .map(|&s| exp_nonpositive((s - max) / temperature)),
    );
    let total = blocked_sum(weights);
    let Some(p) = top_p else {
        return Kept::All(total);
    };

    // Pre-filter: tokens lighter than `floor` together weigh under n * floor = (1 - p) * total / 2,
    // so everything heavier already exceeds p * total and the cut falls among the heavier ones.
    // With a typical peaked distribution this leaves a handful of tokens out of ~128k.
    let floor = ((1.0 - f64::from(p)) * total / n as f64 * 0.5) as f32;
    keys.clear();
    keys.extend(
        weights
            .iter()
            .zip(scores)
            .enumerate()
            .filter(|&(_, (&w, _))| w >= floor)
            // Lossless: n <= u32::MAX.
            .map(|(i, (_, &s))| rank_key(s, i as u32)),
    );
    let keep = quickselect_cut(keys, weights, f64::from(p) * total);
    keys.truncate(keep);
    Kept::Listed(listed_sum(keys, weights))
}

/// Leaves the keys of the `k` highest scores in `keys`, best first (`1 <= k < scores.len()`).
///
/// Streams the row through a buffer of up to 2k keys: when full, a selection keeps the best k and
/// its k-th key becomes the bar later keys must beat. On a typical row few keys beat the bar, so
/// this is one cheap pass instead of a selection over all ~128k entries.
fn top_k_keys(scores: &[f32], k: usize, keys: &mut Vec<u64>) {
    let capacity = (2 * k).max(k + 64);
    keys.clear();
    // Keys at or past the bar cannot be in the top k (keys are unique).
    let mut bar = u64::MAX;
    for (i, &s) in scores.iter().enumerate() {
        // Lossless: the caller checked scores.len() <= u32::MAX.
        let key = rank_key(s, i as u32);
        if key < bar {
            keys.push(key);
            if keys.len() >= capacity {
                keys.select_nth_unstable(k - 1);
                keys.truncate(k);
                bar = keys[k - 1];
            }
        }
    }
    if keys.len() > k {
        keys.select_nth_unstable(k - 1);
        keys.truncate(k);
    }
    keys.sort_unstable();
}

/// In best-first `keys` whose predecessors weigh `above`, the index of the first token top-p
/// drops (`keys.len()` when none is). transformers' rule: a token is kept while the weight ranked
/// strictly above it is below `threshold` (= top_p x total), so the token that crosses the
/// threshold is kept, and the most likely one always is.
fn scan_cut(keys: &[u64], weights: &[f32], mut above: f64, threshold: f64) -> usize {
    for (r, &key) in keys.iter().enumerate() {
        if above >= threshold {
            return r;
        }
        above += f64::from(weights[key_id(key)]);
    }
    keys.len()
}

/// Below this many keys the quickselect sorts and scans.
const SMALL_REGION: usize = 32;

/// Rounds of partitioning after which the remaining region is sorted outright: bounds the
/// quickselect's rare bad cases at O(n log n).
const MAX_ROUNDS: usize = 64;

/// Top-p cut on unsorted `keys` without sorting them: reorders `keys` so that the kept tokens
/// come first and returns how many are kept (see [`scan_cut`] for the rule). A weighted
/// quickselect: partition around a pivot, weigh the side above it, continue in the side that
/// holds the cut; O(n) expected. The partition is written here rather than taken from std so the
/// survivors' order, which the seeded draw walks, cannot change with the toolchain.
fn quickselect_cut(keys: &mut [u64], weights: &[f32], threshold: f64) -> usize {
    // Invariant: keys[..lo] are kept and rank above keys[lo..hi]; keys[hi..] are dropped;
    // `above` is the weight of keys[..lo]; the cut is in lo..=hi.
    let (mut lo, mut hi) = (0, keys.len());
    let mut above = 0.0f64;
    let mut rounds = 0;
    loop {
        let region = &mut keys[lo..hi];
        if region.len() <= SMALL_REGION || rounds >= MAX_ROUNDS {
            region.sort_unstable();
            return lo + scan_cut(region, weights, above, threshold);
        }
        rounds += 1;
        let (p, upper) = partition(region, weights);
        if above + upper >= threshold {
            // The pivot and everything below it are dropped; the cut is in the part above the
            // pivot, or right after it if all of that part is kept.
            hi = lo + p;
        } else {
            // The whole upper part and the pivot itself are kept.
            above += upper + f64::from(weights[key_id(region[p])]);
            lo += p + 1;
        }
        if lo >= hi {
            return lo;
        }
    }
}

/// Lomuto partition of `region` (longer than 2) around the median of its first, middle and last
/// keys: afterwards the keys ranked above the pivot come first, then the pivot, then the rest.
/// Returns the pivot's index and the weight of the keys above it.
fn partition(region: &mut [u64], weights: &[f32]) -> (usize, f64) {
    let last = region.len() - 1;
    let mid = region.len() / 2;
    let (a, b, z) = (region[0], region[mid], region[last]);
    let median = if (a < b) == (b < z) {
        mid
    } else if (a < b) == (a < z) {
        last
    } else {
        0
    };
    region.swap(median, last);
    let pivot = region[last];
    let mut store = 0;
    let mut upper = 0.0f64;
    for j in 0..last {
        let key = region[j];
        if key < pivot {
            upper += f64::from(weights[key_id(key)]);
            region.swap(store, j);
            store += 1;
        }
    }
    region.swap(store, last);
    (store, upper)
}

/// The token (in id order) at which the running weight first exceeds `target` (in [0, total)).
/// Skips whole blocks by their [`block_sum`]s, adding them exactly as [`blocked_sum`] did, so the
/// running sum reaches the total and some block always holds the target.
fn draw_all(weights: &[f32], target: f64) -> Result<u32> {
    let mut cumulative = 0.0f64;
    for (b, block) in weights.chunks(BLOCK).enumerate() {
        let sum = block_sum(block);
        if target < cumulative + sum {
            let mut running = cumulative;
            let mut pick = None;
            for (j, &w) in block.iter().enumerate() {
                if w > 0.0 {
                    pick = Some(j);
                    running += f64::from(w);
                    if target < running {
                        break;
                    }
                }
            }
            // The element-wise sum can round just short of the block's; the block's last
            // token with weight then takes the target.
            if let Some(j) = pick {
                // Lossless: at most u32::MAX weights.
                return Ok((b * BLOCK + j) as u32);
            }
        }
        cumulative += sum;
    }
    // Not reached (see above); a token with weight is the safe answer regardless.
    weights
        .iter()
        .rposition(|&w| w > 0.0)
        .map(|i| i as u32)
        .ok_or_else(|| Error::Sampling("no candidate tokens left to sample from".into()))
}

/// The listed token at which the running weight first exceeds `target` (in [0, total)).
fn draw_listed(keys: &[u64], weights: &[f32], target: f64) -> Result<u32> {
    let mut cumulative = 0.0f64;
    let mut pick = None;
    for &key in keys {
        let id = key_id(key);
        let w = weights[id];
        if w > 0.0 {
            pick = Some(id);
            cumulative += f64::from(w);
            if target < cumulative {
                break;
            }
        }
    }
    // Without a break (not reached: the total was summed in this order), the last token with
    // weight is the safe answer.
    // Lossless: ids come from keys.
    pick.map(|id| id as u32)
        .ok_or_else(|| Error::Sampling("no candidate tokens left to sample from".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(params: SamplingParams) -> Sampler {
        match Sampler::new(params) {
            Ok(s) => s,
            Err(e) => panic!("valid params rejected: {e}"),
        }
    }

    fn seeded(temperature: f32, top_k: Option<usize>, top_p: Option<f32>, seed: u64) -> Sampler {
        sampler(SamplingParams {
            temperature,
            top_k,
            top_p,
            repetition_penalty: 1.0,
            seed: Some(seed),
        })
    }

    fn draws(s: &mut Sampler, logits: &[f32], n: usize) -> Vec<u32> {
        (0..n)
            .map(|step| s.sample(logits, &[], step).unwrap())
            .collect()
    }

    /// Softmax at a temperature, in f64, as the reference for frequency tests.
    fn softmax(logits: &[f32], t: f64) -> Vec<f64> {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let w: Vec<f64> = logits
            .iter()
            .map(|&l| ((l as f64 - max) / t).exp())
            .collect();
        let s: f64 = w.iter().sum();
        w.iter().map(|x| x / s).collect()
    }

    /// Pearson's chi-square statistic of observed counts against probabilities.
    fn chi_square(counts: &[usize], probs: &[f64]) -> f64 {
        let n: usize = counts.iter().sum();
        counts
            .iter()
            .zip(probs)
            .map(|(&o, &p)| {
                let e = p * n as f64;
                if e == 0.0 {
                    assert_eq!(o, 0, "drew a token with probability 0");
                    0.0
                } else {
                    (o as f64 - e).powi(2) / e
                }
            })
            .sum()
    }

    fn counts(s: &mut Sampler, logits: &[f32], n: usize) -> Vec<usize> {
        let mut c = vec![0usize; logits.len()];
        for step in 0..n {
            c[s.sample(logits, &[], step).unwrap() as usize] += 1;
        }
        c
    }

    /// Small deterministic generator for test data (not the sampler's RNG).
    fn test_logits(n: usize, seed: u64, levels: Option<f32>) -> Vec<f32> {
        let mut rng = rng_from_seed(seed ^ 0x5eed);
        (0..n)
            .map(|_| {
                let x = (unit_f64(rng.next_u64()) * 12.0 - 6.0) as f32;
                // Quantising produces ties, to exercise the tie rules.
                levels.map_or(x, |q| (x * q).round() / q)
            })
            .collect()
    }

    #[test]
    fn greedy_is_argmax() {
        let mut s = sampler(SamplingParams::greedy());
        assert_eq!(s.sample(&[0.1, 3.0, -2.0, 2.9], &[], 0).unwrap(), 1);
        assert_eq!(s.sample(&[-5.0, -4.0, -6.0], &[], 1).unwrap(), 1);
        assert_eq!(s.sample(&[7.0], &[], 2).unwrap(), 0);
    }

    #[test]
    fn greedy_ties_go_to_lowest_index() {
        let mut s = sampler(SamplingParams::greedy());
        assert_eq!(s.sample(&[1.0, 2.0, 2.0, 2.0], &[], 0).unwrap(), 1);
        assert_eq!(s.sample(&[0.0; 5], &[], 1).unwrap(), 0);
    }

    #[test]
    fn greedy_ignores_top_k_top_p_and_seed() {
        let mut s = sampler(SamplingParams {
            temperature: 0.0,
            top_k: Some(3),
            top_p: Some(0.5),
            repetition_penalty: 1.0,
            seed: Some(9),
        });
        assert_eq!(s.sample(&[0.0, 1.0, 5.0, 1.0], &[], 0).unwrap(), 2);
    }

    #[test]
    fn repetition_penalty_divides_positive_logits() {
        let mut s = sampler(SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::greedy()
        });
        // 2.0 -> 1.0, below the untouched 1.5.
        assert_eq!(s.sample(&[2.0, 1.5, 0.0], &[0], 0).unwrap(), 1);
        // Without the penalty token 0 wins.
        assert_eq!(s.sample(&[2.0, 1.5, 0.0], &[], 1).unwrap(), 0);
        assert_eq!(penalize(2.0, 2.0), 1.0);
        assert_eq!(penalize(3.0, 0.5), 6.0);
    }

    #[test]
    fn repetition_penalty_multiplies_negative_logits() {
        let mut s = sampler(SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::greedy()
        });
        // -1.0 -> -2.0, below the untouched -1.5.
        assert_eq!(s.sample(&[-1.0, -1.5], &[0], 0).unwrap(), 1);
        assert_eq!(penalize(-1.0, 2.0), -2.0);
        assert_eq!(penalize(0.0, 2.0), 0.0);
    }

    #[test]
    fn repetition_penalty_applies_once_per_distinct_id() {
        let mut s = sampler(SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::greedy()
        });
        // Penalised once, 4.0 -> 2.0 still beats 1.9; penalised three times it would be 0.5.
        assert_eq!(s.sample(&[4.0, 1.9], &[0, 0, 0], 0).unwrap(), 0);
        apply_repetition_penalty(&mut s.scores, &[4.0, -1.0, 3.0], &[1, 0, 1, 0, 1], 2.0);
        let got = s.scores.clone();
        assert_eq!(got, vec![2.0, -2.0, 3.0]);
    }

    #[test]
    fn repetition_penalty_skips_ids_past_the_row() {
        let mut s = sampler(SamplingParams {
            repetition_penalty: 1.3,
            ..SamplingParams::greedy()
        });
        assert_eq!(s.sample(&[0.0, 1.0], &[128_256, u32::MAX], 0).unwrap(), 1);
    }

    #[test]
    fn repetition_penalty_saturates_instead_of_overflowing() {
        assert_eq!(penalize(1e30, 1e-30), f32::MAX);
        assert_eq!(penalize(-1e30, 1e30), f32::MIN);
        let mut s = sampler(SamplingParams {
            temperature: 1.0,
            repetition_penalty: 1e-30,
            seed: Some(1),
            ..SamplingParams::greedy()
        });
        // Saturated logits leave a finite distribution: token 1 holds all the mass.
        for step in 0..20 {
            assert_eq!(s.sample(&[1e30, 2e30, -1e30], &[1, 2], step).unwrap(), 1);
        }
    }

    #[test]
    fn top_k_one_equals_greedy() {
        for seed in 0..20 {
            let logits = test_logits(1000, seed, Some(2.0));
            let want = argmax(&logits);
            let mut s = seeded(1.5, Some(1), None, seed);
            for step in 0..5 {
                assert_eq!(s.sample(&logits, &[], step).unwrap(), want);
            }
        }
    }

    #[test]
    fn tiny_top_p_equals_greedy() {
        for seed in 0..20 {
            let logits = test_logits(5000, seed, Some(2.0));
            let mut g = sampler(SamplingParams::greedy());
            let want = g.sample(&logits, &[], 0).unwrap();
            let mut s = seeded(1.0, None, Some(1e-6), seed);
            for step in 0..5 {
                assert_eq!(s.sample(&logits, &[], step).unwrap(), want);
            }
        }
    }

    #[test]
    fn tiny_temperature_equals_greedy_without_nan() {
        let logits = [1.0, 3.0, 2.999, -4.0];
        let mut s = seeded(1e-30, None, None, 3);
        for step in 0..50 {
            assert_eq!(s.sample(&logits, &[], step).unwrap(), 1);
        }
    }

    #[test]
    fn same_seed_same_sequence() {
        let logits = test_logits(2000, 7, None);
        for (k, p) in [
            (None, None),
            (Some(40), None),
            (None, Some(0.9)),
            (Some(100), Some(0.8)),
        ] {
            let a = draws(&mut seeded(1.0, k, p, 42), &logits, 200);
            let b = draws(&mut seeded(1.0, k, p, 42), &logits, 200);
            assert_eq!(a, b);
        }
    }

    #[test]
    fn different_seeds_differ_on_a_flat_distribution() {
        let flat = vec![0.0f32; 1000];
        let a = draws(&mut seeded(1.0, None, None, 1), &flat, 32);
        let b = draws(&mut seeded(1.0, None, None, 2), &flat, 32);
        assert_ne!(a, b);
    }

    /// Pins the seed-to-token mapping: if this changes, `--seed` no longer reproduces old runs.
    #[test]
    fn seeded_stream_is_stable() {
        let flat = vec![0.0f32; 1000];
        let got = draws(&mut seeded(1.0, None, None, 1234), &flat, 8);
        assert_eq!(got, GOLDEN_1234);
    }
    const GOLDEN_1234: [u32; 8] = [903, 915, 841, 714, 909, 325, 637, 646];

    /// The same for the filtered paths, whose survivor order the draw walks.
    #[test]
    fn seeded_stream_is_stable_through_filters() {
        let logits = test_logits(5000, 21, None);
        let top_k_p = draws(&mut seeded(0.8, Some(40), Some(0.9), 99), &logits, 8);
        let top_p = draws(&mut seeded(1.0, None, Some(0.95), 7), &logits, 8);
        assert_eq!((top_k_p, top_p), (GOLDEN_K_P.to_vec(), GOLDEN_P.to_vec()));
    }
    const GOLDEN_K_P: [u32; 8] = [4797, 4369, 3766, 2673, 4369, 2301, 488, 3144];
    const GOLDEN_P: [u32; 8] = [4298, 2693, 28, 1613, 2232, 1920, 2023, 932];

    #[test]
    fn unseeded_sampler_reports_its_seed() {
        let logits = test_logits(500, 1, None);
        let mut a = sampler(SamplingParams {
            temperature: 1.0,
            ..SamplingParams::greedy()
        });
        let mut b = seeded(1.0, None, None, a.seed());
        assert_eq!(draws(&mut a, &logits, 50), draws(&mut b, &logits, 50));
    }

    // With a fixed seed these are deterministic; the bound is the chi-square 99.99% quantile,
    // so a correct sampler passes it for almost any seed and a wrong one fails by far.

    #[test]
    fn frequencies_match_softmax() {
        let logits = [0.0f32, 1.0, 2.0, -1.0, 0.5];
        let probs = softmax(&logits, 1.0);
        let c = counts(&mut seeded(1.0, None, None, 11), &logits, 100_000);
        let chi2 = chi_square(&c, &probs);
        // df = 4: 99.99% quantile 23.5.
        assert!(
            chi2 < 23.5,
            "chi-square {chi2} too large: {c:?} vs {probs:?}"
        );
    }

    #[test]
    fn frequencies_match_softmax_with_temperature() {
        let logits = [0.0f32, 1.0, 2.0, -1.0, 0.5];
        let probs = softmax(&logits, 0.6);
        let c = counts(&mut seeded(0.6, None, None, 12), &logits, 100_000);
        let chi2 = chi_square(&c, &probs);
        assert!(
            chi2 < 23.5,
            "chi-square {chi2} too large: {c:?} vs {probs:?}"
        );
        // A lower temperature sharpens: the top token is more frequent than at t = 1.
        assert!(probs[2] > softmax(&logits, 1.0)[2]);
    }

    #[test]
    fn top_k_renormalises_over_the_k_best() {
        let logits = [0.0f32, 1.0, 2.0, -1.0, 0.5];
        // Tokens 2, 1, 4 survive top-3.
        let kept = [0.0f32, 1.0, 2.0, f32::NEG_INFINITY, 0.5];
        let mut probs = softmax(&kept, 1.0);
        probs[0] = 0.0;
        let s: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= s);
        let c = counts(&mut seeded(1.0, Some(3), None, 13), &logits, 100_000);
        assert_eq!((c[0], c[3]), (0, 0), "top-k let a low token through: {c:?}");
        // df = 2: 99.99% quantile 18.4.
        let chi2 = chi_square(&c, &probs);
        assert!(
            chi2 < 18.4,
            "chi-square {chi2} too large: {c:?} vs {probs:?}"
        );
    }

    #[test]
    fn top_p_keeps_the_token_that_crosses_the_mass() {
        // Probabilities 0.5, 0.3, 0.2.
        let logits = [5f32.ln(), 3f32.ln(), 2f32.ln()];
        // transformers: ascending cumsum [0.2, 0.5, 1.0]; drop where <= 1 - p.
        // p = 0.5 drops 0.2 and 0.3; p = 0.75 keeps 0.5 and 0.3; p = 0.85 keeps all.
        for (p, want) in [
            (0.5f32, vec![0u32]),
            (0.75, vec![0, 1]),
            (0.85, vec![0, 1, 2]),
        ] {
            assert_eq!(kept_ids(&logits, 1.0, None, Some(p)).0, want, "top_p {p}");
        }
        // And the draws follow the renormalised 0.5 : 0.3.
        let c = counts(&mut seeded(1.0, None, Some(0.75), 14), &logits, 100_000);
        assert_eq!(c[2], 0);
        // df = 1: 99.99% quantile 15.1.
        let chi2 = chi_square(&c, &[0.625, 0.375, 0.0]);
        assert!(chi2 < 15.1, "chi-square {chi2} too large: {c:?}");
    }

    /// The survivors of [`restrict`], ascending, and their total weight.
    fn kept_ids(scores: &[f32], t: f32, k: Option<usize>, p: Option<f32>) -> (Vec<u32>, f64) {
        let (mut weights, mut keys) = (Vec::new(), Vec::new());
        match restrict(scores, t, k, p, &mut weights, &mut keys) {
            Kept::All(total) => {
                assert_eq!(total, blocked_sum(&weights));
                ((0..scores.len() as u32).collect(), total)
            }
            Kept::Listed(total) => {
                assert_eq!(total, listed_sum(&keys, &weights));
                let mut ids: Vec<u32> = keys.iter().map(|&k| key_id(k) as u32).collect();
                ids.sort_unstable();
                (ids, total)
            }
        }
    }

    /// Straightforward full-sort implementation of top-k then top-p: the kept ids, ascending.
    fn reference(scores: &[f32], t: f32, top_k: Option<usize>, top_p: Option<f32>) -> Vec<u32> {
        let mut order: Vec<u32> = (0..scores.len() as u32).collect();
        // Best first, ties by lower id.
        order.sort_by(|&a, &b| {
            // partial_cmp: -0.0 and 0.0 tie, as in rank_key (no NaN here).
            scores[b as usize]
                .partial_cmp(&scores[a as usize])
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(a.cmp(&b))
        });
        if let Some(k) = top_k {
            order.truncate(k);
        }
        let max = scores[order[0] as usize];
        let weights: Vec<f64> = order
            .iter()
            .map(|&i| f64::from(exp_nonpositive((scores[i as usize] - max) / t)))
            .collect();
        let total: f64 = weights.iter().sum();
        if let Some(p) = top_p.filter(|&p| p < 1.0) {
            let threshold = f64::from(p) * total;
            let mut above = 0.0;
            let mut keep = order.len();
            for (r, w) in weights.iter().enumerate() {
                if above >= threshold {
                    keep = r;
                    break;
                }
                above += w;
            }
            order.truncate(keep);
        }
        order.sort_unstable();
        order
    }

    #[test]
    fn restrict_matches_a_full_sort() {
        for (i, n) in [1usize, 3, 33, 100, 5000, 20_000].into_iter().enumerate() {
            for levels in [None, Some(1.0), Some(8.0)] {
                let logits = test_logits(n, i as u64, levels);
                for t in [0.5f32, 2.0] {
                    for k in [None, Some(1), Some(7), Some(300), Some(100_000)] {
                        for p in [
                            None,
                            Some(1e-3),
                            Some(0.3),
                            Some(0.9),
                            Some(0.999),
                            Some(1.0),
                        ] {
                            // Summation order differs from the reference, so a cut that lands
                            // within rounding of the threshold could move; these data have none.
                            assert_eq!(
                                kept_ids(&logits, t, k, p).0,
                                reference(&logits, t, k, p),
                                "n {n} levels {levels:?} t {t} k {k:?} p {p:?}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn nucleus_on_a_flat_row_keeps_the_lowest_ids() {
        // Flat: p = 0.5 of 10_000 tokens is 5_000 of them; equal logits rank by id.
        let (ids, total) = kept_ids(&vec![0.0f32; 10_000], 1.0, None, Some(0.5));
        assert_eq!(ids, (0..5_000).collect::<Vec<u32>>());
        assert_eq!(total, 5_000.0);
    }

    #[test]
    fn quickselect_survives_adversarial_orders() {
        // Sorted ascending, descending, and organ-pipe rows must still give the exact cut.
        let n = 4096u32;
        let rows: [Vec<f32>; 3] = [
            (0..n).map(|i| i as f32 / 512.0).collect(),
            (0..n).map(|i| (n - i) as f32 / 512.0).collect(),
            (0..n).map(|i| i.min(n - i) as f32 / 512.0).collect(),
        ];
        for logits in &rows {
            for p in [0.1f32, 0.5, 0.95, 0.9999] {
                for k in [None, Some(5), Some(3000)] {
                    assert_eq!(
                        kept_ids(logits, 1.0, k, Some(p)).0,
                        reference(logits, 1.0, k, Some(p)),
                        "p {p} k {k:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn top_k_streaming_matches_a_full_sort() {
        // Buffer flushes many times on an ascending row (every key beats the bar).
        let ascending: Vec<f32> = (0..10_000).map(|i| i as f32).collect();
        let random = test_logits(10_000, 9, Some(4.0));
        for row in [&ascending, &random] {
            for k in [1usize, 2, 50, 64, 65, 1000, 9_999] {
                let mut keys = Vec::new();
                top_k_keys(row, k, &mut keys);
                let got: Vec<u32> = keys.iter().map(|&x| key_id(x) as u32).collect();
                let mut want: Vec<u32> = (0..row.len() as u32).collect();
                want.sort_by(|&a, &b| {
                    row[b as usize]
                        .partial_cmp(&row[a as usize])
                        .unwrap_or(std::cmp::Ordering::Equal)
                        .then(a.cmp(&b))
                });
                want.truncate(k);
                assert_eq!(got, want, "k {k}");
            }
        }
    }

    #[test]
    fn rank_keys_order_by_score_then_id() {
        let scores = [
            1.0f32,
            -0.0,
            0.0,
            f32::MAX,
            -1.0,
            f32::MIN,
            1.0,
            -1e-40,
            1e-40,
        ];
        let mut by_key: Vec<u32> = (0..scores.len() as u32).collect();
        by_key.sort_by_key(|&i| rank_key(scores[i as usize], i));
        // -0.0 and 0.0 tie and go by id; subnormals order correctly.
        assert_eq!(by_key, vec![3, 0, 6, 8, 1, 2, 7, 4, 5]);
    }

    #[test]
    fn exp_is_accurate_and_exact_at_zero() {
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-0.0), 1.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpositive(-88.0), 0.0);
        let mut worst = 0.0f64;
        let mut x = 0.0f32;
        while x >= EXP_FLOOR {
            let want = f64::from(x).exp();
            let got = f64::from(exp_nonpositive(x));
            worst = worst.max(((got - want) / want).abs());
            x -= 0.000_731;
        }
        // f32 epsilon is 1.19e-7: a few ulp at most.
        assert!(worst < 3.0e-7, "worst relative error {worst}");
    }

    #[test]
    fn blocked_draw_finds_every_token() {
        // A target just inside each token's slice must pick that token, across block borders.
        let weights: Vec<f32> = (0..1000)
            .map(|i| if i % 7 == 3 { 0.0 } else { 0.5 })
            .collect();
        let mut start = 0.0f64;
        for (i, &w) in weights.iter().enumerate() {
            if w > 0.0 {
                assert_eq!(draw_all(&weights, start + 0.25).unwrap(), i as u32);
            }
            start += f64::from(w);
        }
        // The very top of the range lands on the last token with weight.
        let total = blocked_sum(&weights);
        assert_eq!(draw_all(&weights, total - 1e-9).unwrap(), 999);
    }

    #[test]
    fn frequencies_match_softmax_over_many_blocks() {
        // 600 tokens: three blocks of the blocked draw.
        let logits = test_logits(600, 4, None)
            .iter()
            .map(|x| x / 6.0)
            .collect::<Vec<_>>();
        let probs = softmax(&logits, 1.0);
        let c = counts(&mut seeded(1.0, None, None, 15), &logits, 60_000);
        let chi2 = chi_square(&c, &probs);
        // df = 599: mean 599, sd 34.6; five sd above the mean.
        assert!(chi2 < 772.0, "chi-square {chi2} too large");
    }

    #[test]
    fn scratch_is_reused() {
        let logits = test_logits(50_000, 3, None);
        let mut s = seeded(0.8, Some(50), Some(0.9), 5);
        s.sample(&logits, &[1, 2, 3], 0).unwrap();
        let buffers = |s: &Sampler| {
            [
                (s.scores.as_ptr() as usize, s.scores.capacity()),
                (s.weights.as_ptr() as usize, s.weights.capacity()),
                (s.keys.as_ptr() as usize, s.keys.capacity()),
            ]
        };
        let before = buffers(&s);
        for step in 1..20 {
            s.sample(&logits, &[1, 2, 3], step).unwrap();
        }
        assert_eq!(buffers(&s), before);
    }

    #[test]
    fn non_finite_logits_name_the_step() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for params in [
                SamplingParams::greedy(),
                seeded(1.0, None, None, 0).params.clone(),
            ] {
                let mut s = sampler(params);
                let err = s.sample(&[0.0, bad, 1.0], &[], 7).unwrap_err();
                assert!(matches!(err, Error::NonFiniteLogits { step: 7 }), "{err:?}");
                assert!(err.to_string().contains("step 7"), "{err}");
            }
        }
    }

    #[test]
    fn empty_logits_are_an_error() {
        let err = sampler(SamplingParams::greedy())
            .sample(&[], &[], 0)
            .unwrap_err();
        assert!(matches!(err, Error::Sampling(_)), "{err:?}");
    }

    fn invalid(params: SamplingParams) -> String {
        match Sampler::new(params) {
            Ok(_) => panic!("invalid params accepted"),
            Err(e @ Error::Sampling(_)) => e.to_string(),
            Err(e) => panic!("wrong error kind: {e:?}"),
        }
    }

    #[test]
    fn validation_messages_state_range_and_value() {
        let g = SamplingParams::greedy;
        assert!(g().validate().is_ok());
        let msg = invalid(SamplingParams {
            temperature: -0.5,
            ..g()
        });
        assert!(
            msg.contains("temperature") && msg.contains(">= 0") && msg.contains("-0.5"),
            "{msg}"
        );
        let msg = invalid(SamplingParams {
            temperature: f32::NAN,
            ..g()
        });
        assert!(msg.contains("temperature") && msg.contains("NaN"), "{msg}");
        let msg = invalid(SamplingParams {
            temperature: f32::INFINITY,
            ..g()
        });
        assert!(msg.contains("temperature") && msg.contains("inf"), "{msg}");
        let msg = invalid(SamplingParams {
            top_k: Some(0),
            ..g()
        });
        assert!(
            msg.contains("top_k") && msg.contains(">= 1") && msg.contains("got 0"),
            "{msg}"
        );
        for p in [0.0f32, -0.1, 1.5, f32::NAN] {
            let msg = invalid(SamplingParams {
                top_p: Some(p),
                ..g()
            });
            assert!(
                msg.contains("top_p")
                    && msg.contains("(0, 1]")
                    && msg.contains(&format!("got {p}")),
                "{msg}"
            );
        }
        for r in [0.0f32, -1.0, f32::INFINITY, f32::NAN] {
            let msg = invalid(SamplingParams {
                repetition_penalty: r,
                ..g()
            });
            assert!(
                msg.contains("repetition_penalty")
                    && msg.contains("> 0")
                    && msg.contains(&format!("got {r}")),
                "{msg}"
            );
        }
        // Edges that are valid.
        for ok in [
            SamplingParams {
                top_p: Some(1.0),
                ..g()
            },
            SamplingParams {
                top_k: Some(1),
                ..g()
            },
            SamplingParams {
                temperature: 2.0,
                repetition_penalty: 0.5,
                ..g()
            },
        ] {
            assert!(ok.validate().is_ok(), "{ok:?}");
        }
    }
}
