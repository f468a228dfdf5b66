//! Reading a response body whole under a cap and a shared budget: the part
//! of every real transport that keeps memory bounded, so that
//! [`ReqwestTransport`](super::ReqwestTransport), `HyperTransport` and
//! `TowerTransport` bound it the same way.

use std::sync::Arc;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{TransportError, TransportErrorKind};

/// The default body cap: 16 MiB.
pub(crate) const DEFAULT_MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// The default budget for body bytes being read at once: 64 MiB, four
/// bodies at the default cap.
pub(crate) const DEFAULT_MAX_BODY_BYTES_IN_FLIGHT: usize = 64 * 1024 * 1024;

/// Reads the chunks of one body whole, refusing a body over `max` bytes,
/// with the bytes it holds counted against `budget`.
///
/// `announced` is the length the response declared (its `Content-Length`),
/// if any: a body announcing more than `max` is refused before any of it
/// is read.
///
/// Never over-allocates past the cap: a body with an announced length gets
/// exactly that much, reserved from the budget before it is read; one
/// without is kept as the chunks that came (checked against the cap as
/// they come) and joined once at the end, after reserving the cap (its
/// worst case) from the budget, so concurrent reads never deadlock on a
/// budget each holds a part of. A body that arrives whole in its first
/// chunk (most small ones) is neither copied nor counted.
pub(crate) async fn read_capped<S>(
    announced: Option<u64>,
    chunks: S,
    max: usize,
    budget: &BodyBudget,
    target: &(dyn Fn() -> String + Sync),
) -> Result<Bytes, TransportError>
where
    S: Stream<Item = Result<Bytes, TransportError>>,
{
    if announced.is_some_and(|len| len > max as u64) {
        return Err(too_large(&target(), max));
    }
    let mut chunks = std::pin::pin!(chunks);
    // Known length: reserve it before reading any of it.
    let mut permit = match announced {
        Some(len) if len > 0 => Some(budget.reserve(len as usize).await),
        _ => None,
    };
    let first = chunks.next().await.transpose()?.unwrap_or_default();
    if first.len() > max {
        return Err(too_large(&target(), max));
    }
    let body = match chunks.next().await.transpose()? {
        None => first,
        Some(second) => match announced {
            // Known length: one exact allocation, filled as chunks come.
            Some(len) => {
                let mut all = Vec::with_capacity(len as usize);
                for chunk in [first, second] {
                    append(&mut all, &chunk, max, target)?;
                }
                while let Some(chunk) = chunks.next().await.transpose()? {
                    append(&mut all, &chunk, max, target)?;
                }
                Bytes::from(all)
            }
            // Unknown length: keep the chunks as they came (no buffer that
            // doubles, no copy while reading), then join them once.
            None => {
                permit = Some(budget.reserve(max).await);
                let mut parts = vec![first, second];
                let mut total = parts.iter().map(Bytes::len).sum::<usize>();
                if total > max {
                    return Err(too_large(&target(), max));
                }
                while let Some(chunk) = chunks.next().await.transpose()? {
                    total += chunk.len();
                    if total > max {
                        return Err(too_large(&target(), max));
                    }
                    parts.push(chunk);
                }
                join(parts, total)
            }
        },
    };
    drop(permit);
    Ok(body)
}

/// Appends `chunk` to a buffer allocated for the announced length; a body
/// longer than announced (hyper refuses those) still stops at `max`.
fn append(
    all: &mut Vec<u8>,
    chunk: &[u8],
    max: usize,
    target: &(dyn Fn() -> String + Sync),
) -> Result<(), TransportError> {
    if all.len() + chunk.len() > max {
        return Err(too_large(&target(), max));
    }
    all.extend_from_slice(chunk);
    Ok(())
}

/// Joins `chunks` (`total` bytes) into one exact buffer, dropping each
/// chunk once copied so the two copies never both exist in full.
fn join(chunks: Vec<Bytes>, total: usize) -> Bytes {
    let mut all = Vec::with_capacity(total);
    for chunk in chunks {
        all.extend_from_slice(&chunk);
    }
    Bytes::from(all)
}

/// The bytes of response bodies one transport (and its clones) may hold
/// while reading them, counted in KiB so any size fits one reservation.
#[derive(Clone)]
pub(crate) struct BodyBudget {
    permits: Arc<Semaphore>,
    bytes: usize,
}

impl BodyBudget {
    pub(crate) fn new(bytes: usize) -> Self {
        let kib = bytes.div_ceil(1024).clamp(1, Semaphore::MAX_PERMITS);
        Self {
            permits: Arc::new(Semaphore::new(kib)),
            bytes,
        }
    }

    /// The budget in bytes, as configured.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Waits until `bytes` (at most the whole budget) are free and holds
    /// them until the permit is dropped.
    async fn reserve(&self, bytes: usize) -> OwnedSemaphorePermit {
        let kib = bytes
            .div_ceil(1024)
            .min(self.permits_total())
            .min(u32::MAX as usize) as u32;
        self.permits
            .clone()
            .acquire_many_owned(kib)
            .await
            .expect("the budget's semaphore is never closed")
    }

    fn permits_total(&self) -> usize {
        self.bytes.div_ceil(1024).max(1)
    }
}

/// Reads an [`http_body::Body`] whole under the cap and the budget (see
/// [`read_capped`]), frame by frame, so the cap stops a body while it
/// streams in; a size hint already over the cap is refused before a frame
/// is read. Trailers are dropped (they carry nothing the pipeline reads);
/// a frame's error becomes what `classify` makes of it.
#[cfg(any(feature = "tower", feature = "hyper-transport"))]
pub(crate) async fn read_body<B>(
    body: B,
    max: usize,
    budget: &BodyBudget,
    target: &(dyn Fn() -> String + Sync),
    classify: impl Fn(B::Error, &str) -> TransportError,
) -> Result<Bytes, TransportError>
where
    B: http_body::Body,
{
    use bytes::Buf;
    use http_body_util::BodyExt;

    let hint = body.size_hint();
    if hint.lower() > max as u64 {
        return Err(too_large(&target(), max));
    }
    let classify = &classify;
    let chunks = futures::stream::try_unfold(Box::pin(body), |mut body| async move {
        loop {
            match body.frame().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(classify(e, &target())),
                Some(Ok(frame)) => {
                    if let Ok(mut data) = frame.into_data() {
                        if data.has_remaining() {
                            let chunk = data.copy_to_bytes(data.remaining());
                            return Ok(Some((chunk, body)));
                        }
                    }
                }
            }
        }
    });
    read_capped(hint.exact(), chunks, max, budget, target).await
}

pub(crate) fn too_large(target: &str, max: usize) -> TransportError {
    TransportError::new(
        TransportErrorKind::BodyTooLarge,
        format!("response from {target} exceeds {max} bytes"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    use futures::{stream, FutureExt as _};

    #[tokio::test]
    async fn the_budget_holds_reads_back_until_bytes_are_free() {
        let budget = BodyBudget::new(1024 * 1024);
        let first = budget.reserve(800 * 1024).await;
        let mut second = Box::pin(budget.reserve(800 * 1024));
        assert!(
            (&mut second).now_or_never().is_none(),
            "over the budget: waits"
        );
        // A small one behind it waits too: the queue is fair.
        assert!(budget.reserve(100 * 1024).now_or_never().is_none());
        drop(first);
        let second = second.now_or_never().expect("free again");
        // A reservation over the whole budget takes the whole budget.
        drop(second);
        let whole = budget
            .reserve(64 * 1024 * 1024)
            .now_or_never()
            .expect("all of it");
        assert_eq!(budget.permits.available_permits(), 0);
        drop(whole);
        assert_eq!(budget.permits.available_permits(), 1024);
    }

    #[test]
    fn an_announced_buffer_never_grows_past_the_cap() {
        let max = 1000;
        let mut all = Vec::with_capacity(max);
        for _ in 0..9 {
            append(&mut all, &[7; 111], max, &|| "t".into()).unwrap();
        }
        assert_eq!((all.len(), all.capacity()), (999, max));
        let err = append(&mut all, &[7; 2], max, &|| "t".into()).unwrap_err();
        assert_eq!(err.kind(), TransportErrorKind::BodyTooLarge);
        let joined = join(vec![Bytes::from_static(b"ab"), Bytes::from_static(b"c")], 3);
        assert_eq!(joined.as_ref(), b"abc");
    }

    fn chunks(parts: &[&'static [u8]]) -> impl Stream<Item = Result<Bytes, TransportError>> {
        stream::iter(
            parts
                .iter()
                .map(|p| Ok(Bytes::from_static(p)))
                .collect::<Vec<_>>(),
        )
    }

    #[tokio::test]
    async fn bodies_come_back_whole_and_stop_at_the_cap() {
        let budget = BodyBudget::new(4096);
        for announced in [None, Some(6)] {
            let body = read_capped(
                announced,
                chunks(&[b"ab", b"cd", b"ef"]),
                6,
                &budget,
                &|| "t".into(),
            )
            .await
            .unwrap();
            assert_eq!(body.as_ref(), b"abcdef");
            let err = read_capped(
                announced,
                chunks(&[b"ab", b"cd", b"efg"]),
                6,
                &budget,
                &|| "t".into(),
            )
            .await
            .unwrap_err();
            assert_eq!(err.kind(), TransportErrorKind::BodyTooLarge);
        }
        // Announced over the cap: refused before a chunk is read.
        let never = stream::poll_fn(
            |_| -> std::task::Poll<Option<Result<Bytes, TransportError>>> {
                panic!("read a body announced over the cap")
            },
        );
        let err = read_capped(Some(7), never, 6, &budget, &|| "http://h/p".into())
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "body too large: response from http://h/p exceeds 6 bytes"
        );
        // Every permit came back.
        assert_eq!(budget.permits.available_permits(), 4);
    }
}
