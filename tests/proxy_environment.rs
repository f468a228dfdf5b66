//! HyperTransport reading its proxy from the environment, as
//! `HyperTransport::new()` does. One test in its own binary: the process's
//! environment is shared by every test in a binary, and this one sets it.
#![cfg(feature = "hyper-transport")]

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use sluicegate::{HyperTransport, Transport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A proxy on 127.0.0.1 that answers one request `200 ok` and hands back
/// the head it read.
async fn one_request_proxy() -> (String, tokio::task::JoinHandle<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let head = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = socket.read(&mut buf).await.unwrap();
            assert!(n > 0, "the client closed before its head ended");
            head.extend_from_slice(&buf[..n]);
        }
        socket
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await
            .unwrap();
        String::from_utf8(head).unwrap()
    });
    (addr, head)
}

/// `ALL_PROXY` with an `@` left unencoded in the user name: the
/// credentials end at the last `@`, as curl and reqwest read them, and the
/// password shows nowhere but in the header to the proxy.
#[tokio::test]
async fn a_proxy_from_the_environment_gets_its_whole_credentials_and_debug_shows_none() {
    let (proxy, head) = one_request_proxy().await;
    for name in [
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "NO_PROXY",
        "no_proxy",
        "all_proxy",
        "REQUEST_METHOD",
    ] {
        std::env::remove_var(name);
    }
    std::env::set_var(
        "ALL_PROXY",
        format!("http://me@corp.example:hunter2@{proxy}"),
    );
    let transport = HyperTransport::new();
    std::env::remove_var("ALL_PROXY");

    let shown = format!("{transport:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(shown.contains(&proxy), "{shown}");

    // Nothing listens at the origin: only the proxy can answer.
    let origin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin_addr = origin.local_addr().unwrap();
    drop(origin);
    let request = Request::get(format!("http://{origin_addr}/x"))
        .body(Bytes::new())
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(30), transport.send(request))
        .await
        .expect("answered inside the bound")
        .unwrap();
    assert_eq!(response.body().as_ref(), b"ok");

    let head = head.await.unwrap().to_ascii_lowercase();
    assert!(
        head.starts_with(&format!("get http://{origin_addr}/x http/1.1\r\n")),
        "{head}"
    );
    // `me@corp.example:hunter2`, whole.
    assert!(
        head.contains("proxy-authorization: basic bwvay29ycc5legftcgxlomh1bnrlcji=\r\n"),
        "{head}"
    );
}
