//! The client's half of a connection in the transmission phase: request
//! headers, read through a buffer, and payloads, which continue from the
//! buffer straight off the socket, polled for before sleeping where the
//! socket is a Unix socket (see `busy_poll`).

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, BufReader};

use super::busy_poll::BusyPoll;
use super::handshake::read_message;

/// The client's half of a connection: requests, read through a buffer,
/// and, where the stream is a socket, the socket itself for payloads.
pub struct RequestReader<R> {
    /// Headers and small payloads come through here.
    buffered: BufReader<R>,
    poll: Option<BusyPoll>,
}

impl<R: AsyncRead + Unpin> RequestReader<R> {
    pub fn new(buffered: BufReader<R>, poll: Option<BusyPoll>) -> Self {
        RequestReader { buffered, poll }
    }

    /// The socket's poller, where it is polled.
    pub fn busy_poll(&self) -> Option<&BusyPoll> {
        self.poll.as_ref()
    }

    /// Fills `buf` with a request header; `Ok(false)` if the client closed
    /// the connection before its first byte.
    pub async fn read_header(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        read_message(&mut self.buffered, buf).await
    }

    /// Reads and drops the payload of a refused write, so that the stream
    /// stays in step; a bounded piece at a time, whatever its length.
    pub async fn discard(&mut self, len: u64) -> io::Result<()> {
        let mut payload = (&mut self.buffered).take(len);
        let copied = tokio::io::copy(&mut payload, &mut tokio::io::sink()).await?;
        if copied < len {
            return Err(cut_short(copied, len));
        }
        Ok(())
    }

    /// Fills `buf` with the next bytes of the stream, a payload the client
    /// has begun to send: what the buffer holds first, then straight from
    /// the socket, polling before sleeping.
    pub async fn read_payload(&mut self, buf: &mut [u8]) -> io::Result<()> {
        let mut allowance = self
            .poll
            .as_ref()
            .map_or(Duration::ZERO, |p| p.allowance(buf.len()));
        let mut filled = 0;
        while filled < buf.len() {
            let rest = &mut buf[filled..];
            let polled = match &self.poll {
                Some(poll) if self.buffered.buffer().is_empty() && !allowance.is_zero() => {
                    match poll.recv(rest, &mut allowance) {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
                        read => Some(read?),
                    }
                }
                _ => None,
            };
            let n = match polled {
                Some(n) => {
                    // A direct read never returns to the runtime by itself:
                    // let the connection's other tasks and the shutdown
                    // signal in now and then.
                    tokio::task::consume_budget().await;
                    n
                }
                None => self.buffered.read(rest).await?,
            };
            if n == 0 {
                return Err(cut_short(filled as u64, buf.len() as u64));
            }
            filled += n;
        }
        Ok(())
    }
}

/// A payload that ended early: the client closed the connection.
fn cut_short(done: u64, len: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("client closed the connection {done} bytes into a {len} byte payload"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::busy_poll::DEFAULT_BUDGET;
    use std::io::Write;
    use tokio::io::AsyncWriteExt;

    /// A header, a payload in three pieces, and the next header: the
    /// payload's first bytes come through the buffer, the rest from the
    /// socket; one pause is within the budget and one is past it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_payload_in_pieces_is_read_whole_and_the_stream_stays_in_step() {
        let (mut client, server) = tokio::net::UnixStream::pair().unwrap();
        let poll = BusyPoll::new(&server, Duration::from_millis(5)).unwrap();
        let mut requests = RequestReader::new(BufReader::with_capacity(16, server), poll);
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        // The buffer's first fill takes the header and 8 bytes of payload.
        client
            .write_all(&[b"header-A", &payload[..10]].concat())
            .await
            .unwrap();
        let sent = payload.clone();
        let client = tokio::spawn(async move {
            client.write_all(&sent[10..40_000]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
            client.write_all(&sent[40_000..70_000]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            client
                .write_all(&[&sent[70_000..], b"header-B"].concat())
                .await
                .unwrap();
            client
        });
        let read = async {
            let mut header = [0u8; 8];
            assert!(requests.read_header(&mut header).await.unwrap());
            assert_eq!(&header, b"header-A");
            let mut got = vec![0u8; payload.len()];
            requests.read_payload(&mut got).await.unwrap();
            assert!(got == payload, "the payload arrived intact");
            assert!(requests.read_header(&mut header).await.unwrap());
            assert_eq!(&header, b"header-B");
        };
        tokio::time::timeout(Duration::from_secs(60), read)
            .await
            .expect("no wake-up is lost");
        drop(client.await.unwrap());
    }

    /// A client that sends its payload a byte at a time, each within the
    /// budget, does not keep the runtime to itself: on this one-thread
    /// runtime another task runs before the payload is whole.
    #[tokio::test]
    async fn a_trickling_client_does_not_hold_the_runtime() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        const LEN: usize = 64 * 1024;
        let (mut client, server) = std::os::unix::net::UnixStream::pair().unwrap();
        server.set_nonblocking(true).unwrap();
        let server = tokio::net::UnixStream::from_std(server).unwrap();
        let poll = BusyPoll::new(&server, Duration::from_secs(1)).unwrap();
        let mut requests = RequestReader::new(BufReader::new(server), poll);
        let other_ran = Arc::new(AtomicBool::new(false));
        let flag = other_ran.clone();
        tokio::spawn(async move { flag.store(true, Ordering::SeqCst) });
        let seen = other_ran.clone();
        let sender = std::thread::spawn(move || {
            let mut sent = 0;
            while sent < LEN && !seen.load(Ordering::SeqCst) {
                client.write_all(&[7]).unwrap();
                sent += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            client.write_all(&vec![7; LEN - sent]).unwrap();
            sent
        });
        let mut buf = vec![0u8; LEN];
        requests.read_payload(&mut buf).await.unwrap();
        assert!(other_ran.load(Ordering::SeqCst));
        let trickled = sender.join().unwrap();
        assert!(trickled < LEN, "the other task ran after {trickled} bytes");
        assert!(buf.iter().all(|&b| b == 7));
    }

    #[tokio::test]
    async fn a_client_gone_mid_payload_is_an_error() {
        let (mut client, server) = tokio::net::UnixStream::pair().unwrap();
        let poll = BusyPoll::new(&server, DEFAULT_BUDGET).unwrap();
        let mut requests = RequestReader::new(BufReader::new(server), poll);
        client.write_all(&[1; 100]).await.unwrap();
        drop(client);
        let err = requests.read_payload(&mut [0; 4096]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(
            err.to_string()
                .contains("100 bytes into a 4096 byte payload"),
            "{err}"
        );
    }
}
