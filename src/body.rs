//! What a response body decodes to, beneath every stage that reads one.
//!
//! The attempt loop decodes a body once and leaves the value (or why it
//! would not decode) on the response; the [`json`](crate::SluiceExt::json)
//! and [`flat_unpack`](crate::SluiceExt::flat_unpack) operators hand out
//! [`Decoded`] values and [`Element`]s; the ETL sinks key them by their
//! item, and [`paginate`](crate::etl::paginate) finds cursors and pages in
//! a body by JSON pointer. All of them use the pieces here, so these sit on
//! the floor below them all and import nothing of the crate: no stage has
//! to reach sideways or up into another for them.

use std::fmt;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Response, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;

/// A decoded body, with the item it was fetched for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded<T, U> {
    /// The input item.
    pub item: T,
    /// The decoded body.
    pub value: U,
}

/// A decoded body is written (say, to JSONL) as its value alone.
impl<T, U: serde::Serialize> serde::Serialize for Decoded<T, U> {
    fn serialize<Ser: serde::Serializer>(&self, serializer: Ser) -> Result<Ser::Ok, Ser::Error> {
        self.value.serialize(serializer)
    }
}

/// An element of an unpacked array, with the item its page was fetched for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element<S, T> {
    /// The input item of the page (an id, a page reference, a URL...).
    pub source: S,
    /// The element's position in its array.
    pub index: usize,
    /// The decoded element.
    pub value: T,
}

/// An element is written (say, to JSONL) as its value alone.
impl<S, T: serde::Serialize> serde::Serialize for Element<S, T> {
    fn serialize<Ser: serde::Serializer>(&self, serializer: Ser) -> Result<Ser::Ok, Ser::Error> {
        self.value.serialize(serializer)
    }
}

/// How much of an undecodable body an error shows.
const EXCERPT_BYTES: usize = 200;

/// A body an endpoint decoded during the attempt
/// ([`Endpoint::json`](crate::Endpoint::json)), kept in the response's
/// extensions until [`json`](crate::SluiceExt::json) takes it, so the body
/// is decoded once. Shared and taken, since extensions must be `Clone`.
pub(crate) struct DecodedBody<U>(Arc<Mutex<Option<U>>>);

impl<U> Clone for DecodedBody<U> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<U: Send + 'static> DecodedBody<U> {
    pub(crate) fn new(value: U) -> Self {
        Self(Arc::new(Mutex::new(Some(value))))
    }

    /// The value decoded for `response`, if its endpoint decoded one as `U`.
    pub(crate) fn take(response: &Response<Bytes>) -> Option<U> {
        let body = response.extensions().get::<Self>()?;
        body.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
}

/// Marks a response whose body the endpoint could not decode, with why:
/// what [`Matcher::undecodable`](crate::retry::Matcher::undecodable) matches.
#[derive(Clone, Debug)]
pub(crate) struct Undecodable(pub(crate) String);

/// Decodes a response's body as JSON; a `204 No Content`'s as `null`.
///
/// A 204 holds no value by definition, which JSON spells `null`: a type
/// that can be absent takes it (`Option<T>` as `None`,
/// `serde_json::Value::Null`, `()`), and any other gets a decode error that
/// says so ([`decode_detail`]). Not an empty `Vec` or a `Default`: "no
/// content" and "an empty list" are different answers (a 204 can also mean
/// the request went somewhere it should not), and only the caller's type
/// can say the first is acceptable. Any other status with an empty body
/// stays undecodable: a body cut to nothing is a fault to see (and, with
/// [`Matcher::undecodable`](crate::retry::Matcher::undecodable), retry).
pub(crate) fn from_json<U: DeserializeOwned>(response: &Response<Bytes>) -> serde_json::Result<U> {
    let body = response.body();
    if response.status() == StatusCode::NO_CONTENT && body.trim_ascii().is_empty() {
        serde_json::from_slice(b"null")
    } else {
        serde_json::from_slice(body)
    }
}

/// Why `body` is not a `U`, with an excerpt of it.
pub(crate) fn decode_detail(error: &serde_json::Error, body: &[u8]) -> String {
    if body.trim_ascii().is_empty() {
        return format!(
            "{error}: the body is empty (a 204 No Content decodes only into a type \
             that can be absent, such as an Option)"
        );
    }
    let excerpt = String::from_utf8_lossy(&body[..body.len().min(EXCERPT_BYTES)]);
    format!("{error}; body starts {excerpt:?}")
}

/// Why [`locate`] found no value.
#[derive(Debug)]
pub(crate) enum LocateError {
    /// The body is not JSON.
    Malformed(serde_json::Error),
    /// The pointer is not a JSON pointer (it must start with `/`).
    BadPointer(String),
    /// The pointer leads to nothing in the body.
    Missing(String),
}

impl fmt::Display for LocateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Malformed(e) => write!(f, "malformed JSON: {e}"),
            Self::BadPointer(p) => write!(f, "invalid JSON pointer {p:?}: must start with '/'"),
            Self::Missing(p) => write!(f, "nothing at JSON pointer {p:?}"),
        }
    }
}

impl std::error::Error for LocateError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Malformed(e) => Some(e),
            Self::BadPointer(_) | Self::Missing(_) => None,
        }
    }
}

/// Callers that only report it keep its words: an error item's detail.
impl From<LocateError> for String {
    fn from(error: LocateError) -> Self {
        error.to_string()
    }
}

/// The byte range of the value at JSON `pointer` (RFC 6901) in `body`,
/// found without copying or decoding anything but the path to it.
///
/// The empty pointer is the whole document (which must still be valid
/// JSON).
pub(crate) fn locate(body: &[u8], pointer: &str) -> Result<Range<usize>, LocateError> {
    let root: &RawValue = serde_json::from_slice(body).map_err(LocateError::Malformed)?;
    let mut current = root;
    if !pointer.is_empty() {
        let Some(path) = pointer.strip_prefix('/') else {
            return Err(LocateError::BadPointer(pointer.to_owned()));
        };
        for token in path.split('/') {
            let token = token.replace("~1", "/").replace("~0", "~");
            let next = match current.get().as_bytes().first() {
                Some(b'{') => serde_json::from_str::<std::collections::HashMap<String, &RawValue>>(
                    current.get(),
                )
                .ok()
                .and_then(|mut map| map.remove(&token)),
                Some(b'[') => serde_json::from_str::<Vec<&RawValue>>(current.get())
                    .ok()
                    .and_then(|list| {
                        token
                            .parse::<usize>()
                            .ok()
                            .and_then(|i| list.get(i).copied())
                    }),
                _ => None,
            };
            current = next.ok_or_else(|| LocateError::Missing(pointer.to_owned()))?;
        }
    }
    let start = current.get().as_ptr() as usize - body.as_ptr() as usize;
    Ok(start..start + current.get().len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locate_follows_objects_and_arrays() {
        let body = br#"{"data": {"items": [1, 2], "a/b": [{"x": 3}]}}"#;
        let at = |p: &str| locate(body, p).map(|r| String::from_utf8(body[r].to_vec()).unwrap());
        assert_eq!(at("/data/items").unwrap(), "[1, 2]");
        assert_eq!(at("/data/a~1b/0/x").unwrap(), "3");
        assert_eq!(at("").unwrap(), String::from_utf8(body.to_vec()).unwrap());
        assert!(matches!(at("/data/none"), Err(LocateError::Missing(_))));
        assert!(matches!(at("data"), Err(LocateError::BadPointer(_))));
        assert!(matches!(
            locate(b"{oops", ""),
            Err(LocateError::Malformed(_))
        ));
        assert_eq!(
            String::from(LocateError::Missing("/a".into())),
            r#"nothing at JSON pointer "/a""#
        );
    }

    #[test]
    fn decoded_values_are_written_as_their_value_alone() {
        let decoded = Decoded {
            item: 7u32,
            value: "x",
        };
        let element = Element {
            source: "page",
            index: 3,
            value: [1, 2],
        };
        assert_eq!(serde_json::to_string(&decoded).unwrap(), r#""x""#);
        assert_eq!(serde_json::to_string(&element).unwrap(), "[1,2]");
    }
}
