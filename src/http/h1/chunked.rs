//! The strict decoder of a chunked answer body (RFC 9112 §7.1): chunk sizes in hex with bounded
//! lines, extensions and trailers skipped within a bound, anything malformed an error; fed from
//! the connection's read buffer, whatever the reads split.

use bytes::{Bytes, BytesMut};

use crate::http::h1::error::Error;

/// The longest chunk-size line (with its extensions).
const MAX_CHUNK_LINE: usize = 4 * 1024;
/// The most bytes of chunk extensions and trailers one body may carry in all (they are skipped,
/// not forwarded; hyper's client bounds extensions the same way).
const MAX_CHUNK_EXTRAS: usize = 16 * 1024;

/// Where a chunked body's decoding is.
#[derive(Debug, Default)]
pub(crate) struct Chunked {
    step: Step,
    /// Bytes of extensions and trailers so far (bounded by [`MAX_CHUNK_EXTRAS`]).
    extras: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// A chunk-size line: `1*HEXDIG [ BWS ";" extensions ] CRLF`.
    #[default]
    Size,
    /// Chunk data still to come.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// Trailer lines, up to the empty line that ends the body.
    Trailers,
    End,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decoded {
    Data(Bytes),
    /// `buf` holds too little for the next step.
    More,
    End,
}

impl Chunked {
    /// Decode from the front of `buf` (consuming it) up to the next data, the end, or the point
    /// where more bytes are needed.
    pub(crate) fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, Error> {
        loop {
            match self.step {
                Step::End => return Ok(Decoded::End),
                Step::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::More);
                    }
                    let n = left.min(buf.len() as u64);
                    self.step = if n == left { Step::DataEnd } else { Step::Data(left - n) };
                    return Ok(Decoded::Data(buf.split_to(n as usize).freeze()));
                }
                Step::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::More);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(Error::Invalid("chunk data not followed by CRLF"));
                    }
                    let _ = buf.split_to(2);
                    self.step = Step::Size;
                }
                Step::Trailers => {
                    let room = MAX_CHUNK_EXTRAS.saturating_sub(self.extras);
                    let Some(line) = line(buf, room)? else { return Ok(Decoded::More) };
                    self.extras += line.len() + 2;
                    if line.is_empty() {
                        self.step = Step::End;
                    }
                }
                Step::Size => {
                    let Some(line) = line(buf, MAX_CHUNK_LINE)? else { return Ok(Decoded::More) };
                    let (size, extension) = chunk_size(&line)?;
                    self.extras += extension;
                    if self.extras > MAX_CHUNK_EXTRAS {
                        return Err(Error::Invalid("chunk extensions too long"));
                    }
                    self.step = if size == 0 { Step::Trailers } else { Step::Data(size) };
                }
            }
        }
    }
}

/// The next CRLF-terminated line at the front of `buf` (consumed; returned without its CRLF), at
/// most `max` bytes with its CRLF; `None`: not all here yet.
fn line(buf: &mut BytesMut, max: usize) -> Result<Option<BytesMut>, Error> {
    let Some(lf) = buf.iter().take(max).position(|b| *b == b'\n') else {
        if buf.len() >= max {
            return Err(Error::Invalid("chunk line or trailers too long"));
        }
        return Ok(None);
    };
    if lf == 0 || buf[lf - 1] != b'\r' {
        return Err(Error::Invalid("chunk line not ended by CRLF"));
    }
    let mut line = buf.split_to(lf + 1);
    line.truncate(lf - 1);
    Ok(Some(line))
}

/// A chunk-size line without its CRLF: hexadecimal digits, then nothing or (after optional
/// spaces and tabs) `;` and extensions, which are skipped. The size, and the extensions' length.
fn chunk_size(line: &[u8]) -> Result<(u64, usize), Error> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(Error::Invalid("chunk size"));
    }
    let size = line[..digits].iter().try_fold(0u64, |n, &d| {
        let v = (d as char).to_digit(16)?;
        n.checked_mul(16)?.checked_add(u64::from(v))
    });
    let size = size.ok_or(Error::Invalid("chunk size too large"))?;
    let blanks = line[digits..].iter().take_while(|b| matches!(b, b' ' | b'\t')).count();
    let rest = &line[digits + blanks..];
    if !rest.is_empty() && rest[0] != b';' {
        return Err(Error::Invalid("chunk size"));
    }
    if rest.iter().any(|b| *b == b'\r' || *b == 0) {
        return Err(Error::Invalid("chunk extension"));
    }
    Ok((size, rest.len()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn decode_all(input: &[u8], split: usize) -> Result<(Vec<u8>, BytesMut), Error> {
        let mut chunked = Chunked::default();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut fed = 0;
        loop {
            match chunked.decode(&mut buf)? {
                Decoded::Data(d) => out.extend_from_slice(&d),
                Decoded::End => return Ok((out, buf)),
                Decoded::More => {
                    if fed == input.len() {
                        return Err(Error::Closed { answered: true });
                    }
                    let n = split.min(input.len() - fed);
                    buf.extend_from_slice(&input[fed..fed + n]);
                    fed += n;
                }
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_reads_split() {
        let input = b"5\r\nhello\r\n6;name=\"v\"\r\n world\r\nA \r\n0123456789\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        for split in [1, 2, 3, 7, 64, 1000] {
            let (out, rest) = decode_all(input, split).unwrap();
            assert_eq!(out, b"hello world0123456789", "split {split}");
            // Nothing past the body's end is taken as body.
            assert!(b"NEXT".starts_with(&rest), "split {split}: {rest:?}");
        }
    }

    #[test]
    fn malformed_chunked_bodies_are_errors() {
        for bad in [
            &b"5\nhello\r\n0\r\n\r\n"[..],   // bare LF after the size
            b"5\r\nhelloXX0\r\n\r\n",        // data not followed by CRLF
            b"-5\r\nhello\r\n0\r\n\r\n",     // sign
            b"0x5\r\nhello\r\n0\r\n\r\n",    // prefix
            b"\r\nhello\r\n0\r\n\r\n",       // no size
            b"5 junk\r\nhello\r\n0\r\n\r\n", // junk after the size
            b"10000000000000000\r\n",        // 2^64: overflows
            b"0\r\nx-trailer: 1\n\r\n",      // bare LF in trailers
            b"5\r;a\r\nhello\r\n0\r\n\r\n",  // bare CR before an extension
            b"5\x0c\r\nhello\r\n0\r\n\r\n",  // form feed after the size
        ] {
            assert!(
                matches!(decode_all(bad, 1000), Err(Error::Invalid(_))),
                "{:?} was accepted",
                String::from_utf8_lossy(bad)
            );
        }
        let endless = [b"1;".as_slice(), &[b'x'; MAX_CHUNK_LINE]].concat();
        assert!(matches!(decode_all(&endless, 4096), Err(Error::Invalid(_))));
        let one_ext = format!("1;{}\r\nx\r\n", "e".repeat(1000));
        let many = one_ext.repeat(MAX_CHUNK_EXTRAS / 1000 + 1) + "0\r\n\r\n";
        assert!(matches!(decode_all(many.as_bytes(), 4096), Err(Error::Invalid(_))));
        let trailers = format!("0\r\n{}\r\n", "x-t: 1234567\r\n".repeat(MAX_CHUNK_EXTRAS / 14 + 1));
        assert!(matches!(decode_all(trailers.as_bytes(), 4096), Err(Error::Invalid(_))));
    }

    #[test]
    fn a_long_stream_of_small_chunks_is_not_bounded() {
        // A server-sent event stream: many chunks, no extensions.
        let body = "6\r\ndata:x\r\n".repeat(10_000) + "0\r\n\r\n";
        let (out, _) = decode_all(body.as_bytes(), 4096).unwrap();
        assert_eq!(out.len(), 60_000);
    }

    #[test]
    fn the_largest_chunk_size_parses() {
        assert_eq!(chunk_size(b"ffffffffffffffff").unwrap(), (u64::MAX, 0));
        assert_eq!(chunk_size(b"1F ;ext").unwrap(), (31, 4));
    }
}
