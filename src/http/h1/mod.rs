//! A lean HTTP/1.1 exchange with the app for the request most traffic is: no body, an idempotent
//! method, no upgrade (the requests [`crate::upstream::pool::AppPool`] may replay). It writes the head from
//! the request's header map into one reused buffer, parses the answer with `httparse` (hyper's
//! parser) in the request's own task, and reads the body only as the client's side pulls it: no
//! connection task, no channels between tasks. Everything else (request bodies, upgrades) goes
//! through hyper's client connection.
//!
//! The answer is framed as RFC 9112 §6.3 says, with hyper's client rules: no body after `HEAD`,
//! 1xx, 204 and 304; `Transfer-Encoding` ending in `chunked` is chunked (decoded strictly: CRLF
//! line ends, hexadecimal sizes without overflow, extensions and trailers skipped within a
//! bound); any other `Transfer-Encoding`, or neither header, reads to the connection's end;
//! `Content-Length` values must all agree. A malformed answer is an error, never guessed at.
//! A connection goes back to its pool only when its answer ended where its framing said, with
//! nothing after it and keep-alive allowed (HTTP/1.1 without `Connection: close`).

use std::io;
use std::pin::Pin;
use std::sync::Weak;
use std::task::{Context, Poll, Waker, ready};

use bytes::{Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Version};
use http_body::{Frame, SizeHint};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

mod chunked;
mod error;

pub use crate::http::h1::error::Error;

use crate::http::h1::chunked::{Chunked, Decoded};

/// Errors a streamed body can yield.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Where a lean connection goes back once its answer has been read: the app pool, seen from
/// below (the pool implements it).
pub trait LeanShelf: Send + Sync {
    /// Keep `conn` as an idle lean connection of `worker`'s (or drop it, when full).
    fn put_lean(&self, worker: usize, conn: Box<Conn>);
}

/// Where a lean connection goes back once its answer has been read (see [`exchange`]).
pub struct Home {
    shelf: Weak<dyn LeanShelf>,
    worker: usize,
}

impl Home {
    pub fn new(shelf: Weak<dyn LeanShelf>, worker: usize) -> Home {
        Home { shelf, worker }
    }

    pub fn put(self, conn: Box<Conn>) {
        if let Some(shelf) = self.shelf.upgrade() {
            shelf.put_lean(self.worker, conn);
        }
    }
}

/// The largest answer head read: hyper's default read buffer limit, so that the same answers
/// pass either way.
pub const MAX_HEAD: usize = 8192 + 4096 * 100;
/// The most header fields in an answer head (hyper's default).
pub const MAX_HEADERS: usize = 100;
/// Room made in the read buffer before a read.
const READ_ROOM: usize = 8 * 1024;
/// One keep-alive connection to the app: the socket, what was read past the last answer (empty
/// between exchanges), and the buffer request heads are written into.
pub struct Conn {
    io: TcpStream,
    buf: BytesMut,
    out: Vec<u8>,
}

impl Conn {
    pub fn new(io: TcpStream) -> Box<Conn> {
        Box::new(Conn { io, buf: BytesMut::with_capacity(READ_ROOM), out: Vec::with_capacity(512) })
    }

    /// The socket, for hyper's client connection to take over (between exchanges, when nothing
    /// is buffered: see [`Conn::is_clean`]).
    pub fn into_io(self) -> TcpStream {
        self.io
    }

    /// An idle connection is fit to reuse: nothing arrived on it since its last answer (no EOF,
    /// no stray bytes). Costs no system call unless the socket was reported readable since.
    pub fn is_clean(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        match self.io.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            // Readable: EOF, stray bytes, or a stale report (the last read filled the buffer
            // exactly); a read that would block tells which, and clears the stale report.
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < READ_ROOM / 4 {
            self.buf.reserve(READ_ROOM);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)
    }

    async fn fill(&mut self) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_fill(cx)).await
    }
}

/// Write `req`'s head (it has no body), read the answer's head and frame its body. A body that
/// already arrived whole, or none, hands the connection back to `home` before this returns.
pub async fn exchange(mut conn: Box<Conn>, req: &http::request::Parts, home: Home) -> Result<Response<Body>, Error> {
    encode(&mut conn.out, &req.method, &req.uri, &req.headers);
    let Conn { io, out, .. } = &mut *conn;
    io.write_all(out).await.map_err(|source| Error::Io { what: "writing the request", source, answered: false })?;
    let mut informational = false;
    let head = loop {
        if !conn.buf.is_empty() {
            match parse_head(&mut conn.buf, &req.method)? {
                Some(head) if head.status.is_informational() && head.status != StatusCode::SWITCHING_PROTOCOLS => {
                    informational = true;
                    continue;
                }
                Some(head) => break head,
                None if conn.buf.len() >= MAX_HEAD => return Err(Error::Invalid("answer head too large")),
                None => {}
            }
        }
        let n = conn.fill().await.map_err(|source| Error::Io {
            what: "reading the answer",
            source,
            answered: informational,
        })?;
        if n == 0 {
            return Err(Error::Closed { answered: informational });
        }
    };
    let Head { status, version, headers, reason, framing, keep_alive } = head;
    let mut body = Body { state: State::Done, conn: None, home: None, reuse: keep_alive };
    body.state = match framing {
        Framing::Empty | Framing::Length(0) => State::Done,
        Framing::Length(n) if (conn.buf.len() as u64) >= n => {
            // The common answer: all of it arrived with the head.
            State::Full(Some(conn.buf.split_to(n as usize).freeze()))
        }
        Framing::Length(n) => State::Length(n),
        Framing::Chunked => State::Chunked(Chunked::default()),
        Framing::Eof => {
            body.reuse = false;
            State::Eof
        }
    };
    if matches!(body.state, State::Done | State::Full(_)) {
        if body.reuse && conn.buf.is_empty() {
            home.put(conn);
        }
    } else {
        body.conn = Some(conn);
        body.home = Some(home);
    }
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    *resp.version_mut() = version;
    *resp.headers_mut() = headers;
    if let Some(reason) = reason {
        resp.extensions_mut().insert(reason);
    }
    Ok(resp)
}

/// The request head: `METHOD target HTTP/1.1`, the headers as they are (names lowercase, repeated
/// names kept in order), and no `Transfer-Encoding`: the body is empty (as hyper's client does
/// for an empty body).
fn encode(out: &mut Vec<u8>, method: &Method, uri: &http::Uri, headers: &HeaderMap) {
    out.clear();
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(uri.path_and_query().map_or("/", |p| p.as_str()).as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        if name == TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// How an answer's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// To the connection's end (the connection is not reused).
    Eof,
}

struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    reason: Option<hyper::ext::ReasonPhrase>,
    framing: Framing,
    keep_alive: bool,
}

/// Parse one answer head off the front of `buf` (consumed when complete); `None`: incomplete.
fn parse_head(buf: &mut BytesMut, method: &Method) -> Result<Option<Head>, Error> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut fields);
    let len = match res.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Error::Invalid("too many header fields")),
        Err(_) => return Err(Error::Invalid("malformed head")),
    };
    if len > MAX_HEAD {
        return Err(Error::Invalid("answer head too large"));
    }
    let status = StatusCode::from_u16(res.code.unwrap_or(0)).map_err(|_| Error::Invalid("status code"))?;
    let version = if res.version == Some(1) { Version::HTTP_11 } else { Version::HTTP_10 };
    let reason = res.reason.filter(|r| Some(*r) != status.canonical_reason()).map(|r| r.as_bytes().to_vec());
    // Offsets into the head, so that the values can share its bytes once it is frozen.
    let base = buf.as_ptr() as usize;
    let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
    let count = res.headers.len();
    for (span, field) in spans.iter_mut().zip(res.headers.iter()) {
        let name = field.name.as_ptr() as usize - base;
        let value = field.value.as_ptr() as usize - base;
        *span = (name as u32, (name + field.name.len()) as u32, value as u32, (value + field.value.len()) as u32);
    }
    let head = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(count);
    let mut keep_alive = version == Version::HTTP_11;
    let mut close = false;
    for &(n0, n1, v0, v1) in &spans[..count] {
        let name =
            HeaderName::from_bytes(&head[n0 as usize..n1 as usize]).map_err(|_| Error::Invalid("header name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(v0 as usize..v1 as usize))
            .map_err(|_| Error::Invalid("header value"))?;
        if name == CONNECTION {
            let tokens = || value.as_bytes().split(|b| *b == b',').map(|t| t.trim_ascii());
            if close || tokens().any(|t| t.eq_ignore_ascii_case(b"close")) {
                close = true;
                keep_alive = false;
            } else if !keep_alive {
                keep_alive = tokens().any(|t| t.eq_ignore_ascii_case(b"keep-alive"));
            }
        }
        headers.append(name, value);
    }
    let framing = framing(status, version, method, &headers)?;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        keep_alive = false;
    }
    let reason = match reason {
        Some(r) => Some(hyper::ext::ReasonPhrase::try_from(r).map_err(|_| Error::Invalid("reason phrase"))?),
        None => None,
    };
    Ok(Some(Head { status, version, headers, reason, framing, keep_alive }))
}

/// RFC 9112 §6.3, as hyper's client applies it.
fn framing(status: StatusCode, version: Version, method: &Method, headers: &HeaderMap) -> Result<Framing, Error> {
    if status.is_informational() || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok(Framing::Empty);
    }
    if method == Method::HEAD {
        return Ok(Framing::Empty);
    }
    if headers.contains_key(TRANSFER_ENCODING) {
        if version == Version::HTTP_10 {
            return Err(Error::Invalid("Transfer-Encoding in an HTTP/1.0 answer"));
        }
        return Ok(if ends_in_chunked(headers) { Framing::Chunked } else { Framing::Eof });
    }
    let mut length = None;
    for value in headers.get_all(CONTENT_LENGTH) {
        for part in value.as_bytes().split(|b| *b == b',') {
            let n = parse_length(part.trim_ascii()).ok_or(Error::Invalid("Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(Error::Invalid("differing Content-Length values"));
            }
            length = Some(n);
        }
    }
    Ok(length.map_or(Framing::Eof, Framing::Length))
}

/// The last coding of the last `Transfer-Encoding` field is `chunked`.
fn ends_in_chunked(headers: &HeaderMap) -> bool {
    headers
        .get_all(TRANSFER_ENCODING)
        .iter()
        .next_back()
        .and_then(|v| v.as_bytes().rsplit(|b| *b == b',').next())
        .is_some_and(|coding| coding.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// Decimal digits only (no sign, no spaces inside), without overflow.
fn parse_length(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        if d.is_ascii_digit() { n.checked_mul(10)?.checked_add(u64::from(d - b'0')) } else { None }
    })
}

/// An answer's body, read off the app's connection as it is polled; the connection goes back to
/// its pool at the body's end when it may be reused, and is closed when the body is dropped
/// before its end or fails.
pub struct Body {
    state: State,
    conn: Option<Box<Conn>>,
    home: Option<Home>,
    reuse: bool,
}

enum State {
    /// All of it, read with the head.
    Full(Option<Bytes>),
    /// Bytes still to come.
    Length(u64),
    Chunked(Chunked),
    Eof,
    Done,
}

impl Body {
    fn end(&mut self) {
        self.state = State::Done;
        if let (Some(conn), Some(home)) = (self.conn.take(), self.home.take())
            && self.reuse
            && conn.buf.is_empty()
        {
            home.put(conn);
        }
    }

    fn fail(&mut self, e: Error) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.state = State::Done;
        self.conn = None;
        Poll::Ready(Some(Err(e.into())))
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            if let State::Full(data) = &mut this.state {
                let data = data.take();
                this.state = State::Done;
                return Poll::Ready(data.map(|d| Ok(Frame::data(d))));
            }
            let (State::Length(_) | State::Chunked(_) | State::Eof, Some(conn)) = (&mut this.state, this.conn.as_mut())
            else {
                this.state = State::Done;
                return Poll::Ready(None);
            };
            if !conn.buf.is_empty() {
                let (data, ended) = match &mut this.state {
                    State::Length(left) => {
                        let n = (*left).min(conn.buf.len() as u64);
                        *left -= n;
                        (Some(conn.buf.split_to(n as usize).freeze()), *left == 0)
                    }
                    State::Chunked(chunked) => match chunked.decode(&mut conn.buf) {
                        Ok(Decoded::Data(data)) => (Some(data), false),
                        Ok(Decoded::More) => (None, false),
                        Ok(Decoded::End) => (None, true),
                        Err(e) => return this.fail(e),
                    },
                    _ => (Some(conn.buf.split().freeze()), false),
                };
                if ended {
                    this.end();
                }
                match data {
                    Some(data) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    None if ended => return Poll::Ready(None),
                    // A chunk line not all here yet: read on.
                    None => {}
                }
            }
            let Some(conn) = this.conn.as_mut() else { return Poll::Ready(None) };
            match ready!(conn.poll_fill(cx)) {
                Ok(0) if matches!(this.state, State::Eof) => {
                    this.reuse = false;
                    this.end();
                    return Poll::Ready(None);
                }
                Ok(0) => return this.fail(Error::Closed { answered: true }),
                Ok(_) => {}
                Err(source) => {
                    return this.fail(Error::Io { what: "reading the answer's body", source, answered: true });
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done | State::Full(None) | State::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            State::Done | State::Full(None) => SizeHint::with_exact(0),
            State::Full(Some(data)) => SizeHint::with_exact(data.len() as u64),
            State::Length(left) => SizeHint::with_exact(*left),
            State::Chunked(_) | State::Eof => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn head(text: &str, method: Method) -> Result<Option<Head>, Error> {
        parse_head(&mut BytesMut::from(text.as_bytes()), &method)
    }

    #[test]
    fn answers_are_framed_as_rfc_9112_says() {
        let framing_of = |text: &str, method: Method| head(text, method).unwrap().unwrap().framing;
        assert_eq!(framing_of("HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n", Method::GET), Framing::Length(12));
        assert_eq!(framing_of("HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n", Method::HEAD), Framing::Empty);
        assert_eq!(framing_of("HTTP/1.1 204 No Content\r\ncontent-length: 12\r\n\r\n", Method::GET), Framing::Empty);
        assert_eq!(framing_of("HTTP/1.1 304 Not Modified\r\n\r\n", Method::GET), Framing::Empty);
        assert_eq!(
            framing_of("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n", Method::GET),
            Framing::Chunked
        );
        assert_eq!(
            framing_of("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n", Method::GET),
            Framing::Chunked
        );
        assert_eq!(
            framing_of("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n", Method::GET),
            Framing::Eof
        );
        assert_eq!(framing_of("HTTP/1.1 200 OK\r\n\r\n", Method::GET), Framing::Eof);
        assert_eq!(
            framing_of("HTTP/1.1 200 OK\r\ncontent-length: 7, 7\r\ncontent-length: 7\r\n\r\n", Method::GET),
            Framing::Length(7)
        );
        for bad in [
            "HTTP/1.1 200 OK\r\ncontent-length: 7\r\ncontent-length: 8\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 7, 8\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: +7\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length:\r\n\r\n",
            "HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
            "HTTP/1.1 200 OK\r\nx: folded\r\n  line\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
        ] {
            assert!(matches!(head(bad, Method::GET), Err(Error::Invalid(_))), "{bad:?} was accepted");
        }
        assert!(head("HTTP/1.1 200 OK\r\ncontent-length: 7\r\n", Method::GET).unwrap().is_none());
    }

    #[test]
    fn keep_alive_follows_version_and_connection() {
        let keeps = |text: &str| head(text, Method::GET).unwrap().unwrap().keep_alive;
        assert!(keeps("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"));
        assert!(!keeps("HTTP/1.1 200 OK\r\nconnection: keep-alive, Close\r\ncontent-length: 0\r\n\r\n"));
        assert!(!keeps("HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n"));
        assert!(keeps("HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n"));
        assert!(!keeps("HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n"));
    }

    #[test]
    fn header_values_and_the_reason_phrase_are_kept() {
        let h = head("HTTP/1.1 200 Fine\r\nx-a: 1\r\nSet-Cookie: a=1\r\nset-cookie: b=2\r\n\r\n", Method::GET)
            .unwrap()
            .unwrap();
        assert_eq!(h.headers["x-a"], "1");
        let cookies: Vec<_> = h.headers.get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["a=1", "b=2"]);
        assert_eq!(h.reason.unwrap().as_bytes(), b"Fine");
        assert!(head("HTTP/1.1 200 OK\r\n\r\n", Method::GET).unwrap().unwrap().reason.is_none());
    }

    #[test]
    fn the_request_head_is_the_method_target_and_headers_without_transfer_encoding() {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("app"));
        headers.append("accept", HeaderValue::from_static("a"));
        headers.append("accept", HeaderValue::from_static("b"));
        headers.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        let mut out = Vec::new();
        encode(&mut out, &Method::GET, &"/p?q=1".parse().unwrap(), &headers);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /p?q=1 HTTP/1.1\r\nhost: app\r\naccept: a\r\naccept: b\r\n\r\n"
        );
    }
}
