//! Accept any `:authority` on the plugin's unix socket.
//!
//! gRPC C-core (Python grpcio, the C++, Ruby and PHP clients, Apache Mesos) sends the percent-encoded
//! socket path (`%2Fcsi%2Fcsi.sock`) as `:authority` for a `unix:` target; grpc-java sends the bare
//! path. Neither is a valid URI authority, and h2 (under hyper and tonic) resets every such stream with
//! PROTOCOL_ERROR while it decodes the headers, before any hyper or tower layer sees the request; h2 has
//! no option to relax that. On a unix socket the authority names nothing (the socket is the address and
//! sealcsi serves one virtual host), so the plugin accepts it by rewriting it on the way in:
//!
//! [`AuthorityFix`] wraps each accepted connection and sits between the client's bytes and h2. It
//! passes every frame through unchanged except header blocks (HEADERS + CONTINUATION), which it
//! HPACK-decodes with its own decoder (mirroring the client's encoder state), replaces an invalid
//! `:authority` with `localhost`, and re-encodes as literals that never touch h2's dynamic table, so the
//! two HPACK contexts (client -> us, us -> h2) stay independent and consistent. The server-to-client
//! direction is not touched.
//!
//! Anything this layer does not understand (no HTTP/2 preface, an oversized frame, undecodable HPACK,
//! a CONTINUATION out of order) switches the connection to plain pass-through of the raw bytes, so h2
//! sees the original and reports the protocol error itself.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The HTTP/2 client connection preface (RFC 9113 section 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Frame header length.
const FRAME_HEADER: usize = 9;
/// Largest frame payload we emit and the largest we parse: every HTTP/2 endpoint must accept 16384
/// (the SETTINGS_MAX_FRAME_SIZE initial value), and the plugin's h2 server does not raise it, so a
/// larger frame is already an error there (passed through for h2 to report).
const MAX_FRAME: usize = 16_384;
/// A header block (HEADERS + CONTINUATIONs) larger than this is passed through undecoded (h2 applies
/// its own header-list limit).
const MAX_BLOCK: usize = 1 << 20;
/// The HPACK dynamic table size the plugin's h2 server advertises (SETTINGS_HEADER_TABLE_SIZE default,
/// not changed by the server builder): the most the client's encoder may use.
const HEADER_TABLE_SIZE: usize = 4096;
/// What replaces an authority that is not a valid URI authority.
pub const REPLACEMENT: &str = "localhost";

const TYPE_HEADERS: u8 = 0x1;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;

/// A header block being collected across HEADERS and CONTINUATION frames.
struct Pending {
    stream_id: u32,
    end_stream: bool,
    /// Stream dependency and weight of a HEADERS frame with the PRIORITY flag.
    priority: Option<[u8; 5]>,
    block: Vec<u8>,
    /// The frames as received, forwarded unchanged if the block cannot be rewritten.
    raw: Vec<u8>,
}

/// Rewrites the client-to-server byte stream of one HTTP/2 connection (see the module comment). Pure:
/// bytes in, bytes out, no I/O, so it is tested on its own.
pub struct Rewriter {
    /// Received, not yet processed (an incomplete preface or frame).
    input: Vec<u8>,
    /// Processed, ready for h2.
    output: Vec<u8>,
    state: State,
    decoder: loona_hpack::Decoder<'static>,
    pending: Option<Pending>,
    rewritten: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Preface,
    Frames,
    PassThrough,
}

impl Default for Rewriter {
    fn default() -> Self {
        Self::new()
    }
}

impl Rewriter {
    pub fn new() -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(HEADER_TABLE_SIZE);
        Self {
            input: Vec::new(),
            output: Vec::new(),
            state: State::Preface,
            decoder,
            pending: None,
            rewritten: 0,
        }
    }

    /// How many `:authority` values were replaced so far.
    pub fn rewritten(&self) -> u64 {
        self.rewritten
    }

    /// Whether the connection gave up rewriting (forwarding raw bytes).
    pub fn passing_through(&self) -> bool {
        self.state == State::PassThrough
    }

    /// Feeds bytes from the client.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.state == State::PassThrough {
            self.output.extend_from_slice(bytes);
            return;
        }
        self.input.extend_from_slice(bytes);
        self.process();
    }

    /// The client closed its side: whatever is still held goes to h2 as it is.
    pub fn finish(&mut self) {
        self.give_up();
    }

    /// Takes up to `max` processed bytes.
    pub fn take(&mut self, max: usize) -> Vec<u8> {
        let n = max.min(self.output.len());
        self.output.drain(..n).collect()
    }

    pub fn has_output(&self) -> bool {
        !self.output.is_empty()
    }

    /// Forwards everything held, raw, and stops rewriting.
    fn give_up(&mut self) {
        if let Some(p) = self.pending.take() {
            self.output.extend_from_slice(&p.raw);
        }
        self.output.append(&mut self.input);
        self.state = State::PassThrough;
    }

    fn process(&mut self) {
        loop {
            match self.state {
                State::PassThrough => {
                    self.output.append(&mut self.input);
                    return;
                }
                State::Preface => {
                    let n = self.input.len().min(PREFACE.len());
                    if self.input[..n] != PREFACE[..n] {
                        // Not HTTP/2 prior knowledge: not ours to interpret.
                        self.give_up();
                        return;
                    }
                    if n < PREFACE.len() {
                        return;
                    }
                    self.output.extend(self.input.drain(..PREFACE.len()));
                    self.state = State::Frames;
                }
                State::Frames => {
                    if self.input.len() < FRAME_HEADER {
                        return;
                    }
                    let len = (usize::from(self.input[0]) << 16)
                        | (usize::from(self.input[1]) << 8)
                        | usize::from(self.input[2]);
                    if len > MAX_FRAME {
                        self.give_up();
                        return;
                    }
                    if self.input.len() < FRAME_HEADER + len {
                        return;
                    }
                    let frame: Vec<u8> = self.input.drain(..FRAME_HEADER + len).collect();
                    if self.frame(frame).is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// Handles one complete frame. `Err` means the connection was switched to pass-through.
    fn frame(&mut self, frame: Vec<u8>) -> Result<(), ()> {
        let ty = frame[3];
        let flags = frame[4];
        let stream_id = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
        let payload = &frame[FRAME_HEADER..];
        match (ty, &mut self.pending) {
            (TYPE_CONTINUATION, Some(p)) if p.stream_id == stream_id => {
                if p.block.len() + payload.len() > MAX_BLOCK {
                    p.raw.extend_from_slice(&frame);
                    self.give_up();
                    return Err(());
                }
                p.block.extend_from_slice(payload);
                p.raw.extend_from_slice(&frame);
                if flags & FLAG_END_HEADERS != 0 {
                    let p = self.pending.take().expect("matched Some");
                    return self.block(p);
                }
                Ok(())
            }
            // Anything but the CONTINUATION of the open block is a connection error for h2 to report.
            (_, Some(_)) | (TYPE_CONTINUATION, None) => {
                self.input.splice(0..0, frame);
                self.give_up();
                Err(())
            }
            (TYPE_HEADERS, None) => {
                let Some(p) = parse_headers(flags, stream_id, payload, &frame) else {
                    self.input.splice(0..0, frame);
                    self.give_up();
                    return Err(());
                };
                if flags & FLAG_END_HEADERS != 0 {
                    self.block(p)
                } else {
                    self.pending = Some(p);
                    Ok(())
                }
            }
            (_, None) => {
                self.output.extend_from_slice(&frame);
                Ok(())
            }
        }
    }

    /// Decodes a complete header block, fixes the authority, re-encodes it as frames.
    fn block(&mut self, p: Pending) -> Result<(), ()> {
        let mut fields = Vec::new();
        let decoded = self.decoder.decode_with_cb(&p.block, |n, v| {
            fields.push((n.into_owned(), v.into_owned()))
        });
        if decoded.is_err() {
            self.output.extend_from_slice(&p.raw);
            self.give_up();
            return Err(());
        }
        let mut encoded = Vec::with_capacity(p.block.len() + 64);
        for (name, value) in &mut fields {
            if name.as_slice() == b":authority" && !valid_authority(value) {
                *value = REPLACEMENT.as_bytes().to_vec();
                self.rewritten += 1;
            }
            encode_literal(&mut encoded, name, value);
        }
        write_block(&mut self.output, &p, &encoded);
        Ok(())
    }
}

/// Whether h2 accepts `value` as an `:authority` (the same parser it uses).
fn valid_authority(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

/// The header block fragment of a HEADERS frame, without padding and priority.
fn parse_headers(flags: u8, stream_id: u32, payload: &[u8], frame: &[u8]) -> Option<Pending> {
    let mut body = payload;
    let mut pad = 0usize;
    if flags & FLAG_PADDED != 0 {
        let (&n, rest) = body.split_first()?;
        pad = usize::from(n);
        body = rest;
    }
    let mut priority = None;
    if flags & FLAG_PRIORITY != 0 {
        priority = Some(<[u8; 5]>::try_from(body.get(..5)?).ok()?);
        body = &body[5..];
    }
    let end = body.len().checked_sub(pad)?;
    Some(Pending {
        stream_id,
        end_stream: flags & FLAG_END_STREAM != 0,
        priority,
        block: body[..end].to_vec(),
        raw: frame.to_vec(),
    })
}

/// An HPACK integer with an `n`-bit prefix (RFC 7541 section 5.1); `first` holds the pattern bits.
fn encode_int(out: &mut Vec<u8>, first: u8, n: u32, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// "Literal Header Field without Indexing -- New Name" (RFC 7541 section 6.2.2), no Huffman: h2's
/// decoder never adds it to its dynamic table.
fn encode_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    encode_int(out, 0x00, 7, name.len());
    out.extend_from_slice(name);
    encode_int(out, 0x00, 7, value.len());
    out.extend_from_slice(value);
}

fn frame_header(out: &mut Vec<u8>, len: usize, ty: u8, flags: u8, stream_id: u32) {
    out.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    out.push(ty);
    out.push(flags);
    out.extend_from_slice(&stream_id.to_be_bytes());
}

/// A HEADERS frame and as many CONTINUATION frames as `block` needs.
fn write_block(out: &mut Vec<u8>, p: &Pending, block: &[u8]) {
    let prio_len = if p.priority.is_some() { 5 } else { 0 };
    let first = block.len().min(MAX_FRAME - prio_len);
    let (head, mut rest) = block.split_at(first);
    let mut flags = 0;
    if p.end_stream {
        flags |= FLAG_END_STREAM;
    }
    if p.priority.is_some() {
        flags |= FLAG_PRIORITY;
    }
    if rest.is_empty() {
        flags |= FLAG_END_HEADERS;
    }
    frame_header(out, prio_len + head.len(), TYPE_HEADERS, flags, p.stream_id);
    if let Some(prio) = &p.priority {
        out.extend_from_slice(prio);
    }
    out.extend_from_slice(head);
    while !rest.is_empty() {
        let n = rest.len().min(MAX_FRAME);
        let (chunk, tail) = rest.split_at(n);
        let flags = if tail.is_empty() { FLAG_END_HEADERS } else { 0 };
        frame_header(out, n, TYPE_CONTINUATION, flags, p.stream_id);
        out.extend_from_slice(chunk);
        rest = tail;
    }
}

/// A connection whose incoming bytes go through a [`Rewriter`]; writes pass straight through.
pub struct AuthorityFix<IO> {
    io: IO,
    rewriter: Rewriter,
    eof: bool,
    logged: bool,
}

impl<IO> AuthorityFix<IO> {
    pub fn new(io: IO) -> Self {
        Self {
            io,
            rewriter: Rewriter::new(),
            eof: false,
            logged: false,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for AuthorityFix<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.rewriter.has_output() {
                let out = this.rewriter.take(buf.remaining());
                buf.put_slice(&out);
                if !this.logged && this.rewriter.rewritten() > 0 {
                    this.logged = true;
                    tracing::debug!(
                        "a client sent an :authority that is not a URI authority (a socket path); \
                         served as {REPLACEMENT}"
                    );
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                this.eof = true;
                this.rewriter.finish();
            } else {
                this.rewriter.push(read.filled());
            }
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl<IO: tonic::transport::server::Connected> tonic::transport::server::Connected
    for AuthorityFix<IO>
{
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header block as a client encoder would send it: `fields` through loona's encoder (which uses
    /// indexing and the dynamic table, as real clients do).
    fn client_block(enc: &mut loona_hpack::Encoder<'_>, fields: &[(&[u8], &[u8])]) -> Vec<u8> {
        enc.encode(fields.iter().copied())
    }

    fn headers_frame(stream: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        frame_header(&mut f, payload.len(), TYPE_HEADERS, flags, stream);
        f.extend_from_slice(payload);
        f
    }

    /// Decoded header blocks, and (type, flags, stream) of every frame.
    type ServerView = (Vec<Vec<(Vec<u8>, Vec<u8>)>>, Vec<(u8, u8, u32)>);

    /// Splits the rewriter's output into frames and decodes every header block with a fresh decoder
    /// (h2's side), checking the frame structure on the way.
    fn server_view(bytes: &[u8]) -> ServerView {
        assert_eq!(&bytes[..24], PREFACE);
        let mut rest = &bytes[24..];
        let mut dec = loona_hpack::Decoder::new();
        let (mut blocks, mut frames, mut block) = (Vec::new(), Vec::new(), Vec::new());
        while !rest.is_empty() {
            let len =
                (usize::from(rest[0]) << 16) | (usize::from(rest[1]) << 8) | usize::from(rest[2]);
            assert!(len <= MAX_FRAME);
            let (ty, flags) = (rest[3], rest[4]);
            let stream = u32::from_be_bytes(rest[5..9].try_into().unwrap());
            let payload = &rest[9..9 + len];
            frames.push((ty, flags, stream));
            if ty == TYPE_HEADERS || ty == TYPE_CONTINUATION {
                let skip = if ty == TYPE_HEADERS && flags & FLAG_PRIORITY != 0 {
                    5
                } else {
                    0
                };
                block.extend_from_slice(&payload[skip..]);
                if flags & FLAG_END_HEADERS != 0 {
                    blocks.push(dec.decode(&block).unwrap());
                    block.clear();
                }
            }
            rest = &rest[9 + len..];
        }
        (blocks, frames)
    }

    fn request(authority: &[u8]) -> Vec<(&'static [u8], Vec<u8>)> {
        vec![
            (b":method", b"POST".to_vec()),
            (b":scheme", b"http".to_vec()),
            (b":path", b"/csi.v1.Identity/Probe".to_vec()),
            (b":authority", authority.to_vec()),
            (b"content-type", b"application/grpc".to_vec()),
            (b"te", b"trailers".to_vec()),
        ]
    }

    #[test]
    fn percent_encoded_and_path_authorities_become_localhost_and_the_rest_is_kept() {
        let mut enc = loona_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        // A SETTINGS frame, two requests sharing the encoder's dynamic table (the second references
        // the first's entries by index), then a DATA frame.
        input.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
        for (stream, authority) in [(1u32, &b"%2Ftmp%2Fcsi.sock"[..]), (3, b"/tmp/csi.sock")] {
            let fields = request(authority);
            let refs: Vec<(&[u8], &[u8])> =
                fields.iter().map(|(n, v)| (*n, v.as_slice())).collect();
            let block = client_block(&mut enc, &refs);
            input.extend(headers_frame(stream, FLAG_END_HEADERS, &block));
        }
        input.extend_from_slice(&[0, 0, 2, 0x0, 0x1, 0, 0, 0, 1, 0xAA, 0xBB]);
        let mut rw = Rewriter::new();
        // Byte by byte: frames split anywhere by the socket must come out the same.
        for b in &input {
            rw.push(std::slice::from_ref(b));
        }
        assert!(!rw.passing_through());
        assert_eq!(rw.rewritten(), 2);
        let out = rw.take(usize::MAX);
        let (blocks, frames) = server_view(&out);
        assert_eq!(blocks.len(), 2);
        for block in &blocks {
            let want: Vec<(Vec<u8>, Vec<u8>)> = request(REPLACEMENT.as_bytes())
                .into_iter()
                .map(|(n, v)| (n.to_vec(), v))
                .collect();
            assert_eq!(block, &want);
        }
        assert_eq!(frames[0], (0x4, 0, 0), "SETTINGS untouched");
        assert_eq!(*frames.last().unwrap(), (0x0, 0x1, 1), "DATA untouched");
        assert!(out.ends_with(&[0xAA, 0xBB]));
    }

    #[test]
    fn valid_authorities_padding_priority_and_continuations() {
        let mut enc = loona_hpack::Encoder::new();
        let mut fields = request(b"localhost:50051");
        let big = vec![b'x'; 3 * MAX_FRAME];
        fields.push((b"x-big", big.clone()));
        let refs: Vec<(&[u8], &[u8])> = fields.iter().map(|(n, v)| (*n, v.as_slice())).collect();
        let block = client_block(&mut enc, &refs);
        // HEADERS (padded, with priority) carrying the first part, CONTINUATIONs the rest.
        let mut input = PREFACE.to_vec();
        let (first, rest) = block.split_at(100);
        let mut payload = vec![3u8];
        payload.extend_from_slice(&[0, 0, 0, 0, 15]);
        payload.extend_from_slice(first);
        payload.extend_from_slice(&[0, 0, 0]);
        input.extend(headers_frame(
            5,
            FLAG_PADDED | FLAG_PRIORITY | FLAG_END_STREAM,
            &payload,
        ));
        let chunks: Vec<&[u8]> = rest.chunks(MAX_FRAME).collect();
        for (i, c) in chunks.iter().enumerate() {
            let flags = if i + 1 == chunks.len() {
                FLAG_END_HEADERS
            } else {
                0
            };
            frame_header(&mut input, c.len(), TYPE_CONTINUATION, flags, 5);
            input.extend_from_slice(c);
        }
        let mut rw = Rewriter::new();
        rw.push(&input);
        assert!(!rw.passing_through());
        assert_eq!(rw.rewritten(), 0);
        let (blocks, frames) = server_view(&rw.take(usize::MAX));
        assert_eq!(blocks.len(), 1);
        let auth = blocks[0].iter().find(|(n, _)| n == b":authority").unwrap();
        assert_eq!(auth.1, b"localhost:50051");
        assert_eq!(blocks[0].last().unwrap().1, big);
        let (ty, flags, stream) = frames[0];
        assert_eq!((ty, stream), (TYPE_HEADERS, 5));
        assert_eq!(
            flags & (FLAG_PRIORITY | FLAG_END_STREAM | FLAG_PADDED),
            FLAG_PRIORITY | FLAG_END_STREAM
        );
        assert!(frames[1..].iter().all(|f| f.0 == TYPE_CONTINUATION));
        assert!(frames.last().unwrap().1 & FLAG_END_HEADERS != 0);
    }

    #[test]
    fn what_it_does_not_understand_passes_through_unchanged() {
        // Not an HTTP/2 preface.
        let mut rw = Rewriter::new();
        rw.push(b"GET / HTTP/1.1\r\n\r\n");
        assert!(rw.passing_through());
        assert_eq!(rw.take(usize::MAX), b"GET / HTTP/1.1\r\n\r\n");
        // Undecodable HPACK (an index past both tables), then more bytes.
        let mut input = PREFACE.to_vec();
        let bad = headers_frame(1, FLAG_END_HEADERS, &[0xFF, 0x7F]);
        input.extend_from_slice(&bad);
        let mut rw = Rewriter::new();
        rw.push(&input);
        rw.push(b"tail");
        assert!(rw.passing_through());
        let mut want = input.clone();
        want.extend_from_slice(b"tail");
        assert_eq!(rw.take(usize::MAX), want);
        // An oversized frame, and a frame cut short by the end of the connection.
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(&[0x01, 0, 0, 0x0, 0, 0, 0, 0, 1]);
        let mut rw = Rewriter::new();
        rw.push(&input);
        assert!(rw.passing_through());
        assert_eq!(rw.take(usize::MAX), input);
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(&[0, 0, 10, 0x0, 0, 0, 0, 0, 1, 1, 2]);
        let mut rw = Rewriter::new();
        rw.push(&input);
        assert_eq!(rw.take(usize::MAX), PREFACE);
        rw.finish();
        assert_eq!(rw.take(usize::MAX), &input[24..]);
    }

    #[test]
    fn integers_follow_rfc_7541() {
        // C.1.1 .. C.1.3.
        let mut v = Vec::new();
        encode_int(&mut v, 0, 5, 10);
        assert_eq!(v, [0x0a]);
        v.clear();
        encode_int(&mut v, 0, 5, 1337);
        assert_eq!(v, [0x1f, 0x9a, 0x0a]);
        v.clear();
        encode_int(&mut v, 0, 8, 42);
        assert_eq!(v, [0x2a]);
    }
}
