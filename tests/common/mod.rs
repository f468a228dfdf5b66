//! Helpers shared by the behaviour tests.

use std::ops::Sub;
use std::time::Duration;

/// The most instants of `times` (sorted) that fall in any half-open window
/// of `width`: what a rate limit bounds.
pub fn max_in_window<T>(times: &[T], width: Duration) -> usize
where
    T: Copy + Sub<Output = Duration>,
{
    let mut best = 0;
    let mut start = 0;
    for end in 0..times.len() {
        while times[end] - times[start] >= width {
            start += 1;
        }
        best = best.max(end - start + 1);
    }
    best
}
