//! The ts2021 record layer as a byte stream: `NoiseStream` encrypts what HTTP/2 writes into
//! Noise records and decrypts records into what it reads, in place, with one frame of
//! buffer each way. (A plaintext pipe and a pump task would hold two more 64 KiB buffers
//! per connection — thousands of connections per member make that count.)

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, BytesMut};
use chacha20poly1305::aead::AeadInPlace;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::noise::{
    CipherState, FRAME_HEADER_BYTES, MAX_NOISE_FRAME_BYTES, MAX_PLAINTEXT_BYTES, MSG_RECORD,
    SessionKeys, TAG_BYTES,
};

/// Sealed records gathered before they are written out: a large response (a full netmap
/// is hundreds of kilobytes of 4 KiB records) leaves in one write per 64 KiB instead of one
/// per record, and each write costs a pass through the kernel's TCP path (on loopback, the
/// receiver's too). The buffer exists only while there is something to write: an idle
/// connection holds none, and a small delta never grows it past its own size.
const WRITE_BUFFER_BYTES: usize = 64 * 1024;

/// A Noise transport over `io`. A malformed or forged record fails the stream with
/// `InvalidData` and sets the shared `violated` flag (for metrics).
pub struct NoiseStream<IO> {
    io: IO,
    rx: CipherState,
    tx: CipherState,
    /// Bytes read from `io` not yet consumed: at most one record and the start of the next.
    rbuf: BytesMut,
    /// The decrypted plaintext of the record at the front of `rbuf`, as a range of it.
    plain: std::ops::Range<usize>,
    /// Records not yet written, from `wpos` on; the last one may still be open.
    wbuf: Vec<u8>,
    wpos: usize,
    /// Where the open record starts in `wbuf`: plaintext is gathered into it until it is
    /// full or the stream flushes. (h2 writes a frame's head and its data separately;
    /// sealed apart, each would be a record of its own, with its own tag and seal.)
    open: Option<usize>,
    violated: Arc<AtomicBool>,
}

fn invalid(violated: &AtomicBool, what: &str) -> io::Error {
    violated.store(true, Ordering::Relaxed);
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

impl<IO> NoiseStream<IO> {
    pub fn new(io: IO, keys: &SessionKeys) -> Self {
        NoiseStream {
            io,
            rx: CipherState::new(&keys.receive),
            tx: CipherState::new(&keys.send),
            rbuf: BytesMut::new(),
            plain: 0..0,
            wbuf: Vec::new(),
            wpos: 0,
            open: None,
            violated: Arc::default(),
        }
    }

    /// Set once the peer sent something that is not a valid record.
    pub fn violation_flag(&self) -> Arc<AtomicBool> {
        self.violated.clone()
    }

    /// Decrypts the record at the front of `rbuf` if it is complete.
    fn open_front(&mut self) -> io::Result<bool> {
        if self.rbuf.len() < FRAME_HEADER_BYTES {
            return Ok(false);
        }
        let len = u16::from_be_bytes([self.rbuf[1], self.rbuf[2]]) as usize;
        if self.rbuf[0] != MSG_RECORD {
            return Err(invalid(&self.violated, "not a Noise record"));
        }
        if FRAME_HEADER_BYTES + len > MAX_NOISE_FRAME_BYTES || len < TAG_BYTES {
            return Err(invalid(&self.violated, "bad Noise record length"));
        }
        if self.rbuf.len() < FRAME_HEADER_BYTES + len {
            return Ok(false);
        }
        let body = &mut self.rbuf[FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + len];
        let (text, tag) = body.split_at_mut(len - TAG_BYTES);
        let nonce = self
            .rx
            .next_nonce()
            .map_err(|_| invalid(&self.violated, "nonce exhausted"))?;
        self.rx
            .cipher()
            .decrypt_in_place_detached(&nonce, b"", text, chacha20poly1305::Tag::from_slice(tag))
            .map_err(|_| invalid(&self.violated, "Noise record failed to decrypt"))?;
        self.plain = FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + len - TAG_BYTES;
        Ok(true)
    }

    /// Drops the consumed record from the front of `rbuf`; an idle connection keeps no
    /// buffer at all.
    fn consume_front(&mut self) {
        let record_end = self.plain.end + TAG_BYTES;
        self.rbuf.advance(record_end);
        self.plain = 0..0;
        if self.rbuf.is_empty() {
            self.rbuf = BytesMut::new();
        }
    }

    /// Adds as much of `data` to the open record as fits (opening one if needed), sealing
    /// it once full; returns how much it took.
    fn gather(&mut self, data: &[u8]) -> io::Result<usize> {
        let at = *self.open.get_or_insert_with(|| {
            let at = self.wbuf.len();
            self.wbuf.extend_from_slice(&[MSG_RECORD, 0, 0]);
            at
        });
        let held = self.wbuf.len() - (at + FRAME_HEADER_BYTES);
        let n = data.len().min(MAX_PLAINTEXT_BYTES - held);
        self.wbuf.extend_from_slice(&data[..n]);
        if held + n == MAX_PLAINTEXT_BYTES {
            self.seal_open()?;
        }
        Ok(n)
    }

    /// Whether another whole record might not fit: the buffer never grows past its bound.
    fn write_buffer_full(&self) -> bool {
        self.wbuf.len() + MAX_NOISE_FRAME_BYTES > WRITE_BUFFER_BYTES
    }

    /// Encrypts the open record in place and closes it.
    fn seal_open(&mut self) -> io::Result<()> {
        let Some(at) = self.open.take() else {
            return Ok(());
        };
        let start = at + FRAME_HEADER_BYTES;
        let len = self.wbuf.len() - start;
        self.wbuf[at + 1..start].copy_from_slice(&((len + TAG_BYTES) as u16).to_be_bytes());
        let nonce = self
            .tx
            .next_nonce()
            .map_err(|_| io::Error::other("nonce exhausted"))?;
        let tag = self
            .tx
            .cipher()
            .encrypt_in_place_detached(&nonce, b"", &mut self.wbuf[start..])
            .map_err(|_| io::Error::other("sealing a record"))?;
        self.wbuf.extend_from_slice(&tag);
        Ok(())
    }
}

impl<IO: AsyncWrite + Unpin> NoiseStream<IO> {
    /// Writes buffered records out; Ready once all are written.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.seal_open()?;
        while self.wpos < self.wbuf.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.wbuf[self.wpos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.wpos += n;
        }
        // Written out: an idle connection keeps no buffer.
        self.wbuf = Vec::new();
        self.wpos = 0;
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for NoiseStream<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.plain.is_empty() {
                let n = this.plain.len().min(buf.remaining());
                let start = this.plain.start;
                buf.put_slice(&this.rbuf[start..start + n]);
                this.plain.start += n;
                if this.plain.is_empty() {
                    this.consume_front();
                }
                return Poll::Ready(Ok(()));
            }
            if this.open_front()? {
                if this.plain.is_empty() {
                    // An empty record carries nothing; take the next one.
                    this.consume_front();
                }
                continue;
            }
            // Read more of the current record (never more than one record ahead), into
            // memory that is not zeroed first: only what arrives is touched.
            let have = this.rbuf.len();
            let room = MAX_NOISE_FRAME_BYTES - have;
            this.rbuf.reserve(room);
            let polled = tokio_util::io::poll_read_buf(
                Pin::new(&mut this.io),
                cx,
                &mut (&mut this.rbuf).limit(room),
            );
            let got = match polled {
                Poll::Ready(got) => got?,
                Poll::Pending => {
                    // Waiting with nothing buffered is what an idle connection does, for
                    // minutes at a time: it holds no buffer meanwhile.
                    if have == 0 {
                        this.rbuf = BytesMut::new();
                    }
                    return Poll::Pending;
                }
            };
            if got == 0 {
                return if have == 0 {
                    Poll::Ready(Ok(())) // clean end of stream
                } else {
                    Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()))
                };
            }
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for NoiseStream<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.write_buffer_full() {
            ready!(this.poll_drain(cx))?;
        }
        let n = this.gather(data)?;
        if this.write_buffer_full() {
            // Start writing; finishing is poll_flush's job.
            let _ = this.poll_drain(cx)?;
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn pair() -> (SessionKeys, SessionKeys) {
        let (a, b) = ([7u8; 32], [9u8; 32]);
        (
            SessionKeys {
                send: a,
                receive: b,
            },
            SessionKeys {
                send: b,
                receive: a,
            },
        )
    }

    #[tokio::test]
    async fn large_writes_arrive_intact_across_many_records() {
        let (ka, kb) = pair();
        let (x, y) = tokio::io::duplex(1 << 20);
        let mut a = NoiseStream::new(x, &ka);
        let mut b = NoiseStream::new(y, &kb);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let writer = async {
            a.write_all(&data).await.unwrap();
            a.shutdown().await.unwrap();
        };
        let reader = async {
            let mut got = Vec::new();
            b.read_to_end(&mut got).await.unwrap();
            got
        };
        let ((), got) = tokio::join!(writer, reader);
        assert_eq!(got, data);
    }

    /// Small writes before a flush (h2's frame head, then its data) go out as one record.
    #[tokio::test]
    async fn small_writes_before_a_flush_share_one_record() {
        let (ka, kb) = pair();
        let (x, mut raw) = tokio::io::duplex(1 << 16);
        let mut a = NoiseStream::new(x, &ka);
        a.write_all(b"head:").await.unwrap();
        a.write_all(b"data").await.unwrap();
        a.flush().await.unwrap();
        let mut wire = vec![0u8; FRAME_HEADER_BYTES + 9 + TAG_BYTES];
        raw.read_exact(&mut wire).await.unwrap();
        assert_eq!(
            wire[..FRAME_HEADER_BYTES],
            [MSG_RECORD, 0, (9 + TAG_BYTES) as u8]
        );
        let nothing_more = futures::poll!(std::pin::pin!(raw.read_u8()));
        assert!(nothing_more.is_pending(), "a second record followed");
        // And the peer reads it back whole.
        let (mut x, y) = tokio::io::duplex(1 << 16);
        let mut b = NoiseStream::new(y, &kb);
        x.write_all(&wire).await.unwrap();
        let mut got = [0u8; 9];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"head:data");
    }

    /// Counts the writes that reach the socket.
    struct CountingWriter {
        bytes: Vec<u8>,
        writes: usize,
    }

    impl AsyncWrite for CountingWriter {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.writes += 1;
            self.bytes.extend_from_slice(data);
            Poll::Ready(Ok(data.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// A full netmap's worth of records leaves in a few large writes, not one per record,
    /// and the buffer is given back once written.
    #[tokio::test]
    async fn a_large_response_leaves_in_few_writes_and_keeps_no_buffer() {
        let (ka, kb) = pair();
        let counting = CountingWriter {
            bytes: Vec::new(),
            writes: 0,
        };
        let mut a = NoiseStream::new(counting, &ka);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 253) as u8).collect();
        // h2 hands over a frame at a time (16 KiB of data, then the next head).
        for chunk in data.chunks(16_384) {
            a.write_all(chunk).await.unwrap();
        }
        a.flush().await.unwrap();
        let records = data.len().div_ceil(MAX_PLAINTEXT_BYTES);
        assert!(records > 70, "{records} records");
        let writes = a.io.writes;
        assert!(
            writes <= records / 8,
            "{writes} writes for {records} records"
        );
        assert!(a.wbuf.capacity() == 0, "the write buffer was kept");
        // What went out reads back whole (the pipe holds all of it: no reader needed yet).
        let (mut x, y) = tokio::io::duplex(1 << 20);
        x.write_all(&a.io.bytes).await.unwrap();
        x.shutdown().await.unwrap();
        let mut got = Vec::new();
        NoiseStream::new(y, &kb)
            .read_to_end(&mut got)
            .await
            .unwrap();
        assert_eq!(got, data);
    }

    #[tokio::test]
    async fn a_connection_waiting_for_data_holds_no_read_buffer() {
        let (ka, kb) = pair();
        let (x, y) = tokio::io::duplex(1 << 16);
        let mut a = NoiseStream::new(x, &ka);
        let mut b = NoiseStream::new(y, &kb);
        a.write_all(b"hello").await.unwrap();
        a.flush().await.unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(b.read(&mut buf).await.unwrap(), 5);
        // Nothing more has been sent: the next read waits, and meanwhile keeps no buffer.
        let waiting = futures::poll!(std::pin::pin!(b.read(&mut buf)));
        assert!(waiting.is_pending());
        assert_eq!(b.rbuf.capacity(), 0);
    }

    #[tokio::test]
    async fn a_forged_record_fails_the_stream_and_is_flagged() {
        let (ka, _) = pair();
        let (x, mut y) = tokio::io::duplex(1 << 16);
        let mut a = NoiseStream::new(x, &ka);
        let flag = a.violation_flag();
        y.write_all(&[MSG_RECORD, 0, 20]).await.unwrap();
        y.write_all(&[0u8; 20]).await.unwrap();
        let mut buf = [0u8; 16];
        let err = a.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(flag.load(Ordering::Relaxed));
        // An oversized length is refused before its body is read.
        let (x, mut y) = tokio::io::duplex(1 << 16);
        let mut a = NoiseStream::new(x, &ka);
        y.write_all(&[MSG_RECORD, 0xff, 0xff]).await.unwrap();
        assert_eq!(
            a.read(&mut buf).await.unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }
}
