//! The synthetic websites on the wire: an HTTP/1.1 server (tiny_http) that answers `GET /<n>`
//! with `n` bytes, and a visit, as a browser without a cache makes it: one keep-alive
//! connection fetching a page's objects in order (RFC 9112 §9.3: persistent connections).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::testbed::Testbed;

/// The largest object the server sends (a typo in a path is not a gigabyte).
pub const MAX_OBJECT: u64 = 16 << 20;

/// Starts the server on `host` at `bind`, each request answered on its own thread, until the
/// testbed goes; returns once it listens.
pub fn serve(tb: &Testbed, host: &str, bind: SocketAddr) -> Result<(), String> {
    let (bound, is_bound) = std::sync::mpsc::channel();
    tb.spawn_in(host, move || {
        let server = match tiny_http::Server::http(bind) {
            Ok(s) => s,
            Err(e) => {
                let _ = bound.send(Err(format!("web server at {bind}: {e}")));
                return;
            }
        };
        let _ = bound.send(Ok(()));
        for request in server.incoming_requests() {
            std::thread::spawn(move || answer(request));
        }
    })
    .map_err(|e| e.to_string())?;
    is_bound
        .recv()
        .map_err(|_| format!("web server at {bind}: its thread ended"))?
}

/// `GET /<n>`: 200 with `n` bytes; anything else: 404.
fn answer(request: tiny_http::Request) {
    let size = (request.url().strip_prefix('/'))
        .and_then(|n| n.parse::<u64>().ok())
        .filter(|&n| n <= MAX_OBJECT);
    let _ = match (request.method(), size) {
        // With a Content-Length, never chunked (tiny_http chunks bodies above 32 KB by default).
        (tiny_http::Method::Get, Some(n)) => request.respond(
            tiny_http::Response::new(
                tiny_http::StatusCode(200),
                Vec::new(),
                std::io::repeat(b'm').take(n),
                usize::try_from(n).ok(),
                None,
            )
            .with_chunked_threshold(usize::MAX),
        ),
        _ => request.respond(tiny_http::Response::empty(404)),
    };
}

/// Fetches `objects` (their sizes, in order) from the server at `server` over one connection;
/// run it inside a client's namespace. Returns the body bytes received, or why the visit
/// failed (a short or malformed answer included).
pub fn visit(server: SocketAddr, objects: &[u32], timeout: Duration) -> Result<u64, String> {
    let stream =
        TcpStream::connect_timeout(&server, timeout).map_err(|e| format!("{server}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream);
    let mut total = 0u64;
    let mut line = String::new();
    for &size in objects {
        write!(writer, "GET /{size} HTTP/1.1\r\nHost: site\r\n\r\n").map_err(|e| e.to_string())?;
        let mut length = None;
        let mut status_ok = None;
        loop {
            line.clear();
            let n = reader.read_line(&mut line).map_err(|e| e.to_string())?;
            if n == 0 {
                return Err(format!("GET /{size}: the server closed the connection"));
            }
            let l = line.trim_end();
            if status_ok.is_none() {
                status_ok = Some(l.starts_with("HTTP/1.1 200"));
            } else if l.is_empty() {
                break;
            } else if let Some((name, value)) = l.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse::<u64>().ok();
                }
            }
        }
        if status_ok != Some(true) || length != Some(u64::from(size)) {
            return Err(format!(
                "GET /{size}: answered {:?} with length {length:?}",
                status_ok
            ));
        }
        let got = std::io::copy(
            &mut (&mut reader).take(u64::from(size)),
            &mut std::io::sink(),
        )
        .map_err(|e| format!("GET /{size}: {e}"))?;
        if got != u64::from(size) {
            return Err(format!(
                "GET /{size}: {got} bytes, then the connection ended"
            ));
        }
        total += got;
    }
    Ok(total)
}
