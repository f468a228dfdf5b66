//! Wire-level checks both transports that read bodies themselves must
//! pass (`ReqwestTransport`, `HyperTransport`), against servers on
//! 127.0.0.1 that misbehave on purpose. Included by each transport's
//! test file.

#![allow(dead_code)] // each test binary uses some of these

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures::{stream, StreamExt};
use http::Request;
use sluicegate::Transport;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// What only a hang reaches.
pub const BOUND: Duration = Duration::from_secs(30);

pub async fn bounded<F: std::future::Future>(future: F) -> F::Output {
    tokio::time::timeout(BOUND, future)
        .await
        .expect("finished well inside the bound")
}

pub fn get(url: String) -> Request<Bytes> {
    Request::get(url).body(Bytes::new()).unwrap()
}

/// Reads a request's head off `socket`: whether it came whole.
async fn read_head(socket: &mut TcpStream) -> bool {
    let mut buf = vec![0u8; 4096];
    let mut seen = Vec::new();
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
        match socket.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
    true
}

/// A server that answers each connection with `reply` verbatim, then
/// closes it.
pub async fn raw_server(reply: Vec<u8>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let reply = reply.clone();
            tokio::spawn(async move {
                if !read_head(&mut socket).await {
                    return;
                }
                let _ = socket.write_all(&reply).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    addr
}

/// A server on 127.0.0.1:0 that answers every request with `prefix` (a
/// head, and perhaps part of a body) and then sends nothing more, keeping
/// the connection open; it reports on the channel each time it has
/// written one.
pub async fn stalling_server(prefix: &'static [u8]) -> (SocketAddr, mpsc::UnboundedReceiver<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (written, heads) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let written = written.clone();
            tokio::spawn(async move {
                if !read_head(&mut socket).await {
                    return;
                }
                if socket.write_all(prefix).await.is_ok() {
                    let _ = written.send(());
                }
                // Silent until the client goes away.
                let _ = socket.read(&mut [0; 64]).await;
            });
        }
    });
    (addr, heads)
}

/// With a budget far below every body (`transport` is made with one),
/// each read waits for room in turn and none waits for ever.
pub async fn bodies_larger_than_the_budget_come_back<T: Transport>(transport: T) {
    let body = vec![b'y'; 100_000];
    let mut announced = format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    announced.extend_from_slice(&body);
    let mut unannounced = b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n".to_vec();
    unannounced.extend_from_slice(&body);
    for reply in [announced, unannounced] {
        let addr = raw_server(reply).await;
        let lengths: Vec<usize> = bounded(
            stream::iter(0..8)
                .map(|_| transport.send(get(format!("http://{addr}/"))))
                .buffer_unordered(8)
                .map(|r| r.unwrap().body().len())
                .collect(),
        )
        .await;
        assert_eq!(lengths, [body.len(); 8]);
    }
}

/// Bodies that announce much and send nothing hold no room: a small
/// answer on the same transport comes back while they are still pending.
pub async fn stalled_bodies_hold_up_no_other_response<T: Transport>(make: fn() -> T) {
    // Announcing 16 MiB and sending nothing of it, and the same without a
    // length after two chunks of a few bytes.
    let stalls: [&[u8]; 2] = [
        b"HTTP/1.1 200 OK\r\ncontent-length: 16777216\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n3\r\ndef\r\n",
    ];
    for stall in stalls {
        // Four bodies at the default cap: the whole default budget, had
        // what they announce been set aside for them.
        let transport = make();
        let (stalling, mut heads) = stalling_server(stall).await;
        let stalled: Vec<_> = (0..4)
            .map(|_| tokio::spawn(transport.send(get(format!("http://{stalling}/")))))
            .collect();
        for _ in 0..4 {
            bounded(heads.recv()).await.unwrap();
        }
        // Let the four read their heads and start on their bodies.
        for _ in 0..32 {
            tokio::task::yield_now().await;
        }
        let whole =
            raw_server(b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\nhello world".to_vec());
        let chunked = raw_server(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
                .to_vec(),
        );
        for addr in [whole.await, chunked.await] {
            let response = bounded(transport.send(get(format!("http://{addr}/"))))
                .await
                .unwrap();
            assert_eq!(response.body().as_ref(), b"hello world");
        }
        assert!(
            stalled.iter().all(|read| !read.is_finished()),
            "the stalled bodies are still being waited for"
        );
        for read in stalled {
            read.abort();
        }
    }
}
