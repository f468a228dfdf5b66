//! What went wrong, from an error's source chain: the kind a transport's
//! error gets when it comes from layers that wrap the cause (tower's,
//! hyper-util's client) rather than from the transport itself.

use std::error::Error as StdError;
use std::io;

use crate::error::{TransportError, TransportErrorKind};

pub(super) type BoxError = Box<dyn StdError + Send + Sync>;

/// A service's error as a [`TransportError`] naming `target`, with the
/// error as its source (or the error itself, if it is one).
pub(super) fn classify(error: BoxError, target: &str) -> TransportError {
    match error.downcast::<TransportError>() {
        Ok(own) => *own,
        Err(error) => TransportError::new(kind_of(&*error), target).with_source(error),
    }
}

/// The kind of the first error down the source chain that says what
/// happened; layers (`Buffer`, hyper-util) wrap the cause.
fn kind_of(error: &(dyn StdError + 'static)) -> TransportErrorKind {
    let mut next = Some(error);
    while let Some(e) = next {
        if is_elapsed(e) {
            return TransportErrorKind::Timeout;
        }
        if let Some(own) = e.downcast_ref::<TransportError>() {
            return own.kind();
        }
        if let Some(io) = e.downcast_ref::<io::Error>() {
            match io.kind() {
                io::ErrorKind::TimedOut => return TransportErrorKind::Timeout,
                io::ErrorKind::ConnectionRefused => return TransportErrorKind::Connect,
                io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::UnexpectedEof => return TransportErrorKind::Reset,
                _ => {}
            }
        }
        #[cfg(feature = "hyper-transport")]
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            if h.is_timeout() {
                return TransportErrorKind::Timeout;
            }
            if h.is_incomplete_message() || h.is_canceled() || h.is_closed() {
                return TransportErrorKind::Reset;
            }
        }
        next = e.source();
    }
    if no_connection(error) {
        TransportErrorKind::Connect
    } else {
        TransportErrorKind::Other
    }
}

/// Whether hyper-util's client says no connection was made (a TLS
/// handshake refused, a name that does not resolve), for a cause no more
/// precise than that: a connect timeout or a refusal says so itself.
fn no_connection(error: &(dyn StdError + 'static)) -> bool {
    #[cfg(feature = "hyper-transport")]
    {
        let mut next = Some(error);
        while let Some(e) = next {
            if let Some(pool) = e.downcast_ref::<hyper_util::client::legacy::Error>() {
                return pool.is_connect();
            }
            next = e.source();
        }
    }
    let _ = error;
    false
}

/// A timer's `Elapsed`: tokio's, or tower's timeout layer's.
fn is_elapsed(e: &(dyn StdError + 'static)) -> bool {
    #[cfg(feature = "tower")]
    if e.is::<::tower::timeout::error::Elapsed>() {
        return true;
    }
    e.is::<tokio::time::error::Elapsed>()
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::fmt;

    #[derive(Debug)]
    struct Wrapped(BoxError);

    impl fmt::Display for Wrapped {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("wrapped")
        }
    }

    impl StdError for Wrapped {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            Some(&*self.0)
        }
    }

    #[test]
    fn kinds_come_from_down_the_source_chain() {
        let io = |kind| -> BoxError { Box::new(io::Error::new(kind, "x")) };
        #[allow(unused_mut, reason = "tower's timeout only with the `tower` feature")]
        let mut cases: Vec<(BoxError, TransportErrorKind)> = vec![
            (io(io::ErrorKind::TimedOut), TransportErrorKind::Timeout),
            (
                io(io::ErrorKind::ConnectionRefused),
                TransportErrorKind::Connect,
            ),
            (io(io::ErrorKind::BrokenPipe), TransportErrorKind::Reset),
            (
                Box::new(Wrapped(io(io::ErrorKind::ConnectionReset))),
                TransportErrorKind::Reset,
            ),
            (
                Box::new(Wrapped(Box::new(TransportError::new(
                    TransportErrorKind::BodyTooLarge,
                    "",
                )))),
                TransportErrorKind::BodyTooLarge,
            ),
            (io(io::ErrorKind::Other), TransportErrorKind::Other),
            ("plain".into(), TransportErrorKind::Other),
        ];
        #[cfg(feature = "tower")]
        cases.push((
            Box::new(::tower::timeout::error::Elapsed::new()),
            TransportErrorKind::Timeout,
        ));
        for (error, kind) in cases {
            let shown = error.to_string();
            let classified = classify(error, "http://h/p");
            assert_eq!(classified.kind(), kind, "{shown}");
            assert_eq!(classified.message(), "http://h/p");
            assert!(classified.source().is_some(), "{shown}");
        }
        // A service's own TransportError is kept as it is.
        let own = TransportError::new(TransportErrorKind::Reset, "its own words");
        let kept = classify(Box::new(own), "http://h/p");
        assert_eq!(
            (kept.kind(), kept.message()),
            (TransportErrorKind::Reset, "its own words")
        );
    }
}
