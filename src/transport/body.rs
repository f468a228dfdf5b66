//! Reading a response body whole under a cap and a shared budget: the part
//! of every real transport that keeps memory bounded, so that
//! [`ReqwestTransport`](super::ReqwestTransport), `HyperTransport` and
//! `TowerTransport` bound it the same way.

mod budget;
mod ledger;

use bytes::Bytes;
use futures::{Stream, StreamExt};

pub(crate) use self::budget::BodyBudget;
use self::budget::Share;
use crate::error::{TransportError, TransportErrorKind};

/// The default body cap: 16 MiB.
pub(crate) const DEFAULT_MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// The default budget for body bytes being read at once: 64 MiB, four
/// bodies at the default cap.
pub(crate) const DEFAULT_MAX_BODY_BYTES_IN_FLIGHT: usize = 64 * 1024 * 1024;

/// Reads the chunks of one body whole, refusing a body over `max` bytes,
/// with the memory it holds counted against `budget`.
///
/// `announced` is the length the response declared (its `Content-Length`),
/// if any: a body announcing more than `max` is refused before any of it
/// is read.
///
/// The budget counts what the body holds, as its bytes arrive, never what
/// it announced: a response that announces 16 MiB and sends nothing holds
/// none of the budget, so it cannot keep other responses waiting.
///
/// A body that arrives whole in its first chunk (most small ones) is that
/// chunk: neither copied nor counted. Otherwise the chunks are copied into
/// one buffer that grows as they come (to twice what has come, never past
/// the announced length, or the cap when none was announced), and each
/// growth first waits until the budget has room for the buffer's new size.
/// So while waiting a body holds at most one chunk that is not counted:
/// its first, or the one that does not fit yet. Waiting bodies cannot hold
/// each other up for ever: see the [ledger](self::ledger).
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
    let first = chunks.next().await.transpose()?.unwrap_or_default();
    if first.len() > max {
        return Err(too_large(&target(), max));
    }
    let Some(second) = chunks.next().await.transpose()? else {
        return Ok(first);
    };
    let mut body = Collected {
        all: Vec::new(),
        share: budget.share(),
        announced,
        max,
    };
    body.make_room(first.len() + second.len(), target).await?;
    for chunk in [first, second] {
        body.append(&chunk, target).await?;
    }
    while let Some(chunk) = chunks.next().await.transpose()? {
        body.append(&chunk, target).await?;
    }
    Ok(body.into_bytes())
}

/// A body of more than one chunk, as far as it has come, and its share of
/// the budget.
struct Collected {
    all: Vec<u8>,
    share: Share,
    announced: Option<u64>,
    max: usize,
}

impl Collected {
    /// Appends `chunk`, making room for it first.
    async fn append(
        &mut self,
        chunk: &[u8],
        target: &(dyn Fn() -> String + Sync),
    ) -> Result<(), TransportError> {
        self.make_room(self.all.len() + chunk.len(), target).await?;
        self.all.extend_from_slice(chunk);
        Ok(())
    }

    /// Refuses a body of `len` bytes over the cap, and grows the buffer to
    /// hold `len` if it cannot yet, once the budget has room for its new
    /// size (waiting for it, with the bytes to append in hand).
    async fn make_room(
        &mut self,
        len: usize,
        target: &(dyn Fn() -> String + Sync),
    ) -> Result<(), TransportError> {
        if len > self.max {
            return Err(too_large(&target(), self.max));
        }
        if len > self.all.capacity() {
            let limit = limit(self.announced, len, self.max);
            let capacity = grown(len, limit);
            self.share.hold(capacity, limit).await;
            self.all.reserve_exact(capacity - self.all.len());
        }
        Ok(())
    }

    /// The body in an allocation of exactly its length (a buffer grown
    /// past a length that was not announced is cut back).
    fn into_bytes(self) -> Bytes {
        let mut all = self.all;
        all.shrink_to_fit();
        Bytes::from(all)
    }
}

/// The most a body of which `len` bytes have come may grow to: its
/// announced length, or the cap if none was announced or it has already
/// sent more than it announced (hyper refuses those, other bodies may not).
fn limit(announced: Option<u64>, len: usize, max: usize) -> usize {
    match announced {
        Some(announced) if len as u64 <= announced => announced as usize,
        _ => max,
    }
}

/// The size a buffer grows to when `len` bytes no longer fit: twice that,
/// so that growing costs few copies, but never past `limit` (which is at
/// least `len`).
fn grown(len: usize, limit: usize) -> usize {
    len.saturating_mul(2).min(limit).max(len)
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

    use std::time::Duration;

    use futures::channel::mpsc;
    use futures::{stream, FutureExt as _};

    const KIB: usize = 1024;

    #[tokio::test]
    async fn the_budget_holds_reads_back_until_bytes_are_free() {
        let budget = BodyBudget::new(1024 * KIB);
        let mut first = budget.share();
        first.hold(800 * KIB, 800 * KIB).await;
        let mut second = budget.share();
        let mut waiting = Box::pin(second.hold(800 * KIB, 800 * KIB));
        assert!(
            (&mut waiting).now_or_never().is_none(),
            "over the budget: waits"
        );
        // A small one that fits goes ahead of it.
        let mut small = budget.share();
        small
            .hold(100 * KIB, 100 * KIB)
            .now_or_never()
            .expect("fits");
        drop(first);
        waiting.now_or_never().expect("free again");
        assert_eq!(budget.held(), 900 * KIB);
        drop((second, small));
        // A body over the whole budget takes the whole budget.
        let mut whole = budget.share();
        whole
            .hold(64 * 1024 * KIB, 64 * 1024 * KIB)
            .now_or_never()
            .expect("all of it");
        assert_eq!(budget.held(), 1024 * KIB);
        drop(whole);
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn a_buffer_grows_twofold_but_never_past_its_announced_length_or_the_cap() {
        assert_eq!(limit(Some(6000), 10, 9000), 6000);
        assert_eq!(limit(Some(6000), 6001, 9000), 9000, "sent more");
        assert_eq!(limit(None, 10, 9000), 9000);
        assert_eq!(grown(10, 6000), 20);
        assert_eq!(grown(4000, 6000), 6000);
        assert_eq!(grown(6000, 6000), 6000);
        assert_eq!(grown(usize::MAX, usize::MAX), usize::MAX);
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
        // Everything held came back.
        assert_eq!(budget.held(), 0);
    }

    /// A body that sends `parts` and then nothing more.
    fn stalled(
        parts: &[&'static [u8]],
    ) -> impl Stream<Item = Result<Bytes, TransportError>> + Send + 'static {
        chunks(parts).chain(stream::pending())
    }

    #[tokio::test]
    async fn a_body_holds_what_it_received_never_what_it_announced() {
        let budget = BodyBudget::new(64 * KIB);
        let max = 32 * KIB;
        // Announcing the cap and sending nothing: holds nothing.
        let mut silent = Box::pin(read_capped(
            Some(max as u64),
            stalled(&[]),
            max,
            &budget,
            &|| "t".into(),
        ));
        assert!((&mut silent).now_or_never().is_none());
        assert_eq!(budget.held(), 0);
        // Sending 2 KiB first: holds the buffer for them (twice that).
        let mut slow = Box::pin(read_capped(
            Some(max as u64),
            stalled(&[&[1; KIB], &[2; KIB]]),
            max,
            &budget,
            &|| "t".into(),
        ));
        assert!((&mut slow).now_or_never().is_none());
        assert_eq!(budget.held(), 4 * KIB);
        // Others are read meanwhile, without waiting for either.
        for announced in [Some(30 * KIB as u64), None] {
            let body = read_capped(
                announced,
                stream::iter((0..30).map(|_| Ok(Bytes::from_static(&[3; KIB])))),
                max,
                &budget,
                &|| "t".into(),
            )
            .now_or_never()
            .expect("room for it")
            .unwrap();
            assert_eq!(body.len(), 30 * KIB);
        }
        drop(slow);
        assert_eq!(budget.held(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn bodies_growing_together_under_a_small_budget_all_finish_within_it() {
        // Three bodies of 24 KiB in 4 KiB chunks, sent a chunk of each at
        // a time, through a budget of 32 KiB. If the first two could each
        // grow to 16 KiB, both would then wait for 8 KiB more that neither
        // can give back: stuck until their timeouts.
        let budget = BodyBudget::new(32 * KIB);
        let mut senders = Vec::new();
        let mut reads = Vec::new();
        for body in 0..3u8 {
            let (tx, rx) = mpsc::unbounded::<Result<Bytes, TransportError>>();
            senders.push(tx);
            let budget = budget.clone();
            reads.push(tokio::spawn(async move {
                let target = move || format!("body {body}");
                let read = read_capped(Some(24 * KIB as u64), rx, 24 * KIB, &budget, &target);
                read.await.unwrap()
            }));
        }
        for chunk in 0..6u8 {
            for (body, tx) in senders.iter().enumerate() {
                let byte = body as u8 * 16 + chunk;
                tx.unbounded_send(Ok(Bytes::from(vec![byte; 4 * KIB])))
                    .unwrap();
            }
            for _ in 0..8 {
                tokio::task::yield_now().await;
                assert!(budget.held() <= 32 * KIB);
            }
        }
        drop(senders);
        for (body, read) in reads.into_iter().enumerate() {
            // Virtual time: a read that can never finish fails this at once.
            let read = tokio::time::timeout(Duration::from_secs(30), read);
            let got = read.await.expect("no read left waiting").unwrap();
            let want: Vec<u8> = (0..6u8)
                .flat_map(|chunk| vec![body as u8 * 16 + chunk; 4 * KIB])
                .collect();
            assert!(got == want, "body {body} whole and in order");
        }
        assert_eq!(budget.held(), 0);
    }
}
