//! Just enough HTTP/1.1 for /metrics, the probes and healthCheckNodePorts:
//! one request per connection (`Connection: close`), GET and HEAD, bounded
//! request size, time and concurrency. Load balancers and Prometheus need no
//! more, and a framework would be most of the agent's size.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// Longest request head accepted.
const MAX_HEAD: usize = 8 * 1024;
/// A client gets this long to send its request head...
const HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// ...and this long in all, answer included (a scrape walks conntrack).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections open at once per listener. At the limit, the connection that
/// has waited longest without sending its request is closed to make room,
/// so idle connections cannot starve the kubelet's probes.
const MAX_CONNECTIONS: usize = 64;

/// Connections that have not sent their request head yet, oldest first,
/// each with the means to close it.
#[derive(Default)]
struct Waiting {
    next_id: u64,
    queue: VecDeque<(u64, oneshot::Sender<()>)>,
}

type SharedWaiting = Arc<Mutex<Waiting>>;

fn lock(waiting: &SharedWaiting) -> std::sync::MutexGuard<'_, Waiting> {
    waiting.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Forgets connection `id` (it sent its request, or it is gone).
fn stop_waiting(waiting: &SharedWaiting, id: u64) {
    lock(waiting)
        .queue
        .retain(|(waiting_id, _)| *waiting_id != id);
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// Without the query string.
    pub path: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            headers: Vec::new(),
            body: body.into().into_bytes(),
        }
    }

    pub fn json(status: u16, body: &serde_json::Value) -> Self {
        Self {
            status,
            content_type: "application/json",
            headers: vec![("X-Content-Type-Options", String::from("nosniff"))],
            body: format!("{body}\n").into_bytes(),
        }
    }
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// Serves `listener` until the task is dropped or aborted; each request is
/// answered by `handler`.
pub async fn serve<H, F>(listener: TcpListener, handler: H)
where
    H: Fn(Request) -> F + Clone + Send + 'static,
    F: Future<Output = Response> + Send,
{
    let open = Arc::new(AtomicUsize::new(0));
    let waiting = SharedWaiting::default();
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::debug!("accept failed: {error}");
                // EMFILE and the like: give the system a moment.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if open.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
            let oldest = lock(&waiting).queue.pop_front();
            match oldest {
                // Its task ends and releases its place at once.
                Some((_, close)) => {
                    let _ = close.send(());
                }
                // Every connection is being answered: this one waits no more.
                None => continue,
            }
        }
        open.fetch_add(1, Ordering::Relaxed);
        let (close, closed) = oneshot::channel();
        let id = {
            let mut waiting = lock(&waiting);
            waiting.next_id += 1;
            let id = waiting.next_id;
            waiting.queue.push_back((id, close));
            id
        };
        let handler = handler.clone();
        let (open, waiting) = (Arc::clone(&open), Arc::clone(&waiting));
        tokio::spawn(async move {
            let mut stream = stream;
            let served = async {
                let head = tokio::select! {
                    head = tokio::time::timeout(HEAD_TIMEOUT, read_request(&mut stream)) => {
                        head.unwrap_or(Err(()))
                    }
                    _ = closed => Ok(None),
                };
                stop_waiting(&waiting, id);
                answer(&mut stream, head, handler).await;
            };
            let _ = tokio::time::timeout(CLIENT_TIMEOUT, served).await;
            stop_waiting(&waiting, id);
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

async fn answer<H, F>(stream: &mut TcpStream, head: Result<Option<Request>, ()>, handler: H)
where
    H: Fn(Request) -> F,
    F: Future<Output = Response>,
{
    let response = match head {
        Ok(Some(request)) if request.method == "GET" || request.method == "HEAD" => {
            let head_only = request.method == "HEAD";
            let mut response = handler(request).await;
            if head_only {
                let length = response.body.len();
                response.body.clear();
                write_response(stream, &response, length).await;
                return;
            }
            response
        }
        Ok(Some(_)) => {
            let mut response = Response::text(405, "only GET and HEAD\n");
            response.headers.push(("Allow", String::from("GET, HEAD")));
            response
        }
        Ok(None) => return, // Closed (or made room for another) before a request.
        Err(()) => Response::text(400, "bad request\n"),
    };
    let length = response.body.len();
    write_response(stream, &response, length).await;
}

/// Reads the request head; `Ok(None)` if the client closed first.
async fn read_request(stream: &mut TcpStream) -> Result<Option<Request>, ()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        let read = stream.read(&mut buf).await.map_err(|_| ())?;
        if read == 0 {
            return if head.is_empty() { Ok(None) } else { Err(()) };
        }
        head.extend_from_slice(&buf[..read]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            break;
        }
        if head.len() > MAX_HEAD {
            return Err(());
        }
    }
    parse_request_line(&head).map(Some).ok_or(())
}

fn parse_request_line(head: &[u8]) -> Option<Request> {
    let line_end = head.iter().position(|&b| b == b'\n')?;
    let line = std::str::from_utf8(&head[..line_end]).ok()?.trim_end();
    let mut parts = line.split(' ');
    let method = parts.next()?;
    let target = parts.next()?;
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") || parts.next().is_some() || !target.starts_with('/') {
        return None;
    }
    let path = target.split('?').next().unwrap_or(target);
    Some(Request {
        method: method.to_owned(),
        path: path.to_owned(),
    })
}

async fn write_response(stream: &mut TcpStream, response: &Response, content_length: usize) {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {content_length}\r\nConnection: close\r\n",
        response.status,
        reason_phrase(response.status),
        response.content_type,
    );
    for (name, value) in &response.headers {
        head.push_str(name);
        head.push_str(": ");
        head.push_str(value);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    if stream.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let _ = stream.write_all(&response.body).await;
    let _ = stream.shutdown().await;
}

/// A blocking GET for tests and the CLI: status and body.
pub fn get(address: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect_timeout(&address, CLIENT_TIMEOUT)?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let invalid = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP answer");
    let (head, body) = answer.split_once("\r\n\r\n").ok_or_else(invalid)?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(invalid)?;
    Ok((status, body.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn request_lines() {
        let parsed = parse_request_line(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(
            parsed,
            Some(Request {
                method: String::from("GET"),
                path: String::from("/metrics"),
            })
        );
        assert_eq!(parse_request_line(b"GET metrics HTTP/1.1\r\n"), None);
        assert_eq!(parse_request_line(b"GET / SPDY/3\r\n"), None);
        assert_eq!(parse_request_line(b"\xff\xfe\r\n"), None);
    }

    #[test]
    fn serves_get_head_and_refuses_the_rest() {
        runtime().block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = listener.local_addr().unwrap();
            let server = tokio::spawn(serve(listener, |request: Request| async move {
                match request.path.as_str() {
                    "/hello" => Response::text(200, "hi\n"),
                    _ => Response::text(404, "no\n"),
                }
            }));
            let answers = tokio::task::spawn_blocking(move || {
                let get_hello = get(address, "/hello").unwrap();
                let get_other = get(address, "/other").unwrap();
                let raw = |request: &str| {
                    use std::io::{Read as _, Write as _};
                    let mut stream = std::net::TcpStream::connect(address).unwrap();
                    stream.write_all(request.as_bytes()).unwrap();
                    let mut answer = String::new();
                    stream.read_to_string(&mut answer).unwrap();
                    answer
                };
                let head = raw("HEAD /hello HTTP/1.1\r\n\r\n");
                let post = raw("POST /hello HTTP/1.1\r\n\r\n");
                let junk = raw("hello\r\n\r\n");
                (get_hello, get_other, head, post, junk)
            })
            .await
            .unwrap();
            server.abort();
            let (hello, other, head, post, junk) = answers;
            assert_eq!(hello, (200, String::from("hi\n")));
            assert_eq!(other.0, 404);
            assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
            assert!(head.contains("Content-Length: 3\r\n"), "{head}");
            assert!(head.ends_with("\r\n\r\n"), "HEAD has no body: {head:?}");
            assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
            assert!(junk.starts_with("HTTP/1.1 400 "), "{junk}");
        });
    }

    /// Far more idle connections than the limit: a probe still gets its
    /// answer at once (the idlest connections make room), not after the
    /// idle ones time out.
    #[test]
    fn idle_connections_do_not_starve_probes() {
        runtime().block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = listener.local_addr().unwrap();
            let server = tokio::spawn(serve(listener, |_request: Request| async move {
                Response::text(200, "ok\n")
            }));
            let probe = tokio::task::spawn_blocking(move || {
                let idle: Vec<std::net::TcpStream> = (0..MAX_CONNECTIONS * 3)
                    .map(|_| std::net::TcpStream::connect(address).unwrap())
                    .collect();
                let started = std::time::Instant::now();
                let answer = get(address, "/healthz");
                (answer, started.elapsed(), idle.len())
            })
            .await
            .unwrap();
            server.abort();
            let (answer, took, idle) = probe;
            assert_eq!(idle, MAX_CONNECTIONS * 3);
            assert_eq!(answer.unwrap(), (200, String::from("ok\n")));
            assert!(
                took < HEAD_TIMEOUT,
                "the probe waited {took:?}, as long as idle connections are kept"
            );
        });
    }
}
