//! Memory budgets: what requests hold above the model's own footprint, bounded across concurrent
//! requests by waiting instead of overcommitting.
//!
//! Two budgets, so that no request waits for one while holding the other in a cycle:
//! - **bodies** (`--body-memory`): a request reserves three times its declared body size (the bytes,
//!   the parsed request, the base64-decoded images) before its body is read, and holds it until its
//!   handler returns; a body without `Content-Length` reserves `--max-body-bytes`'s worth.
//! - **decodes** (`--decode-memory`): a request reserves what decoding its images and tokenizing its
//!   text costs ([`decode_cost`]) before either starts, and holds it until its prompt and pixel values
//!   are ready (then only the job's own, model-sized data remain, which the KV budget and `--max-batch`
//!   bound).
//!
//! A reservation larger than its whole budget is cut to the budget: such a request runs alone. The KV
//! cache is bounded by the engine's `--kv-budget`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Reservations are counted in KiB so that budgets up to 4 TiB fit the semaphore's `u32` requests.
const UNIT: u64 = 1024;

/// Peak bytes the tokenizer holds per byte of text: measured with the Llama-3 tokenizer on 1 MiB of one
/// word, of digits and of CJK text (at most about 70 MiB; README, "What one request may cost").
pub const TOKENIZE_BYTES_PER_TEXT_BYTE: u64 = 70;

/// Bytes held at once while a request's images are decoded one after another and its text tokenized:
/// the largest image's decode (4 bytes a pixel: RGBA, the widest decoded format) or the tokenizer's
/// working set, whichever is larger, plus the decoded RGB images a model without one input size keeps
/// (`keeps_images`: MiniCPM-V slices each image from its full size).
pub fn decode_cost(dims: &[(u32, u32)], text_bytes: u64, keeps_images: bool) -> u64 {
    let pixels = |&(w, h): &(u32, u32)| u64::from(w) * u64::from(h);
    let largest = dims.iter().map(pixels).max().unwrap_or(0) * 4;
    let kept: u64 = if keeps_images {
        dims.iter().map(pixels).sum::<u64>() * 3
    } else {
        0
    };
    largest.max(text_bytes.saturating_mul(TOKENIZE_BYTES_PER_TEXT_BYTE)) + kept
}

/// One budget of bytes, shared by the requests that reserve from it.
#[derive(Debug)]
pub struct MemoryBudget {
    permits: Arc<Semaphore>,
    total_units: u32,
    reserved: AtomicU64,
}

/// Bytes held from a budget; given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    _permit: OwnedSemaphorePermit,
    bytes: u64,
    budget: Arc<MemoryBudget>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget
            .reserved
            .fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl MemoryBudget {
    pub fn new(bytes: u64) -> Arc<MemoryBudget> {
        let total_units = u32::try_from(bytes.div_ceil(UNIT).max(1)).unwrap_or(u32::MAX);
        Arc::new(MemoryBudget {
            permits: Arc::new(Semaphore::new(total_units as usize)),
            total_units,
            reserved: AtomicU64::new(0),
        })
    }

    pub fn total_bytes(&self) -> u64 {
        u64::from(self.total_units) * UNIT
    }

    /// Bytes reserved now.
    pub fn reserved_bytes(&self) -> u64 {
        self.reserved.load(Ordering::Relaxed)
    }

    fn units(&self, bytes: u64) -> u32 {
        u32::try_from(bytes.div_ceil(UNIT))
            .unwrap_or(u32::MAX)
            .clamp(1, self.total_units)
    }

    fn held(self: &Arc<Self>, permit: OwnedSemaphorePermit, units: u32) -> Reservation {
        let bytes = u64::from(units) * UNIT;
        self.reserved.fetch_add(bytes, Ordering::Relaxed);
        Reservation {
            _permit: permit,
            bytes,
            budget: Arc::clone(self),
        }
    }

    /// Waits until `bytes` (at most the whole budget) are free and reserves them; `None` if the budget
    /// was closed.
    pub async fn reserve(self: &Arc<Self>, bytes: u64) -> Option<Reservation> {
        let units = self.units(bytes);
        let permit = Arc::clone(&self.permits)
            .acquire_many_owned(units)
            .await
            .ok()?;
        Some(self.held(permit, units))
    }

    /// [`MemoryBudget::reserve`] from a blocking thread, giving up (`None`) once `cancelled` says so;
    /// it is asked every `poll`.
    pub fn reserve_blocking(
        self: &Arc<Self>,
        bytes: u64,
        poll: Duration,
        cancelled: impl Fn() -> bool,
    ) -> Option<Reservation> {
        let units = self.units(bytes);
        loop {
            if cancelled() {
                return None;
            }
            match Arc::clone(&self.permits).try_acquire_many_owned(units) {
                Ok(permit) => return Some(self.held(permit, units)),
                Err(tokio::sync::TryAcquireError::Closed) => return None,
                Err(tokio::sync::TryAcquireError::NoPermits) => std::thread::sleep(poll),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cost_is_the_larger_stage_plus_what_is_kept() {
        // 100x100 and 50x50 images, 10 bytes of text: the larger decode (RGBA) is the peak.
        assert_eq!(decode_cost(&[(100, 100), (50, 50)], 10, false), 40_000);
        // 1 KiB of text costs more to tokenize than a small image to decode.
        assert_eq!(decode_cost(&[(10, 10)], 1024, false), 1024 * 70);
        // A model that keeps its decoded images: both images' RGB bytes on top.
        assert_eq!(
            decode_cost(&[(100, 100), (50, 50)], 0, true),
            40_000 + 3 * 12_500
        );
    }

    #[test]
    fn a_reservation_waits_for_room_and_gives_it_back() {
        let budget = MemoryBudget::new(10 * UNIT);
        let never = || false;
        let poll = Duration::from_millis(1);
        let a = budget.reserve_blocking(6 * UNIT, poll, never);
        assert!(a.is_some());
        assert_eq!(budget.reserved_bytes(), 6 * UNIT);
        // 6 more do not fit beside the first: the wait goes on until it is cancelled.
        let polls = std::cell::Cell::new(0);
        let waited = budget.reserve_blocking(6 * UNIT, poll, || {
            polls.set(polls.get() + 1);
            polls.get() > 3
        });
        assert!(waited.is_none());
        assert_eq!(polls.get(), 4);
        drop(a);
        assert_eq!(budget.reserved_bytes(), 0);
        // More than the whole budget is cut to it: it runs alone.
        let all = budget.reserve_blocking(100 * UNIT, poll, never);
        assert_eq!(budget.reserved_bytes(), 10 * UNIT);
        assert!(budget.permits.available_permits() == 0);
        drop(all);
        assert_eq!(budget.permits.available_permits(), 10);
    }
}
