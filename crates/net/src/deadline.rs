//! A socket with one deadline for all its reads and writes: a peer that trickles bytes
//! cannot stretch a handshake past it (a socket timeout alone is per call).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

pub(crate) struct Deadline<'a> {
    stream: &'a TcpStream,
    until: Instant,
    limit: Duration,
}

impl<'a> Deadline<'a> {
    /// `stream`, every read and write on it to end within `limit` from now.
    pub fn new(stream: &'a TcpStream, limit: Duration) -> Self {
        Self { stream, until: Instant::now() + limit, limit }
    }

    fn too_slow(&self) -> std::io::Error {
        let what = format!("the handshake took over {} s", self.limit.as_secs());
        std::io::Error::new(std::io::ErrorKind::TimedOut, what)
    }

    fn left(&self) -> std::io::Result<Duration> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(self.too_slow());
        }
        Ok(left)
    }

    /// A socket timeout (set to the time left) said as the deadline it is.
    fn timed<T>(&self, r: std::io::Result<T>) -> std::io::Result<T> {
        r.map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => self.too_slow(),
            _ => e,
        })
    }
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.stream.set_read_timeout(Some(self.left()?))?;
        let read = self.stream.read(buf);
        self.timed(read)
    }
}

impl Write for Deadline<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.stream.set_write_timeout(Some(self.left()?))?;
        let written = self.stream.write(buf);
        self.timed(written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
