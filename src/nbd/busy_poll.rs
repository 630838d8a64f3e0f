//! Waiting for the rest of a write's payload by polling a Unix socket for a
//! moment before going to sleep, as Linux's `SO_BUSY_POLL` does for network
//! sockets (it has no such option for Unix sockets). TCP connections are
//! not polled: their buffers grow with the traffic, and over loopback
//! polling made no difference (see `server`).
//!
//! A large payload reaches the server in pieces: the client's kernel holds
//! at most its send buffer (208 KiB by default), so the client sends a piece,
//! waits for the server to take it, and sends the next. Whenever the server
//! reads faster than the client sends, the socket runs dry partway. The
//! reactor then sleeps, and the next piece must wake it. On a virtual
//! machine a sleeping CPU halts, and waking it (an interrupt across CPUs,
//! the host scheduling the halted CPU again) costs more than the wait did.
//! The rest of the payload is already on its way, so the connection polls
//! instead, yielding the CPU to any thread that can run meanwhile.
//!
//! The budget was chosen with fio over a Unix socket, 1 MiB writes at
//! iodepth 8, in alternating runs: 3.7k-4.1k IOPS sleeping, 4.6k-4.8k
//! polling for up to 50, 100 or 200 µs (30 µs: 4.0k-4.8k; 1000 µs no
//! better), nbdkit's file plugin 3.5k-4.2k. Before polling, this server left
//! as much CPU idle as nbdkit did: neither was short of CPU. Polling for the
//! next request's header as well gained nothing. The README gives the
//! figures of the server as built, nbdcopy's among them.
//!
//! The poll is bounded: it starts only while a payload is owed, each wait
//! ends at the first byte or after the budget, and one payload is polled
//! for at most a budget per 64 KiB in all. It yields the CPU, but holds the
//! reactor thread it runs on, as an inline write does; so after each direct
//! read it lets the runtime run the thread's other tasks when the task's
//! share is spent. Past the budget the connection sleeps on the reactor as
//! before: a client that stalls or vanishes mid-payload costs one budget,
//! and one that trickles its payload costs its allowance.
//!
//! A client that sends one request at a time (nbdcopy to a pipe or
//! `/dev/null`, fio at iodepth 1, a program reading a disk in order) pays
//! for the wake-ups twice per request: it sleeps until its reply comes and
//! then sends the next request at once, while the server has gone to sleep
//! waiting for it. So the connection's writer, once its replies are out,
//! polls for the next request's first byte if the client has nothing in
//! flight; the reader then finds the request at once. Polling in the reader
//! instead, after letting the writer go first, held up pipelined requests
//! behind the replies (1 MiB reads at iodepth 8: 3.6k-4.5k IOPS against
//! 4.7k-5.0k). Measured in alternating runs against the server without
//! it, over a Unix socket:
//! - nbdcopy of a 1 GiB volume to `/dev/null` (a block status and a 256 KiB
//!   read at a time): 2.13-2.61 GB/s against 1.47-1.84; the requests came
//!   10-25 µs after their replies.
//! - 4 KiB random reads at iodepth 1: 41.5k IOPS against 18.3k-18.8k, p99
//!   45 µs against 74-76, at the same server CPU per request (24 µs): the
//!   server keeps one CPU busy while such a client runs.
//! - Pipelined jobs (4 KiB at iodepth 32, 1 MiB at iodepth 8) and nbdcopy
//!   into the volume: level, within the noise.
//!
//! This wait spins without yielding the CPU: an earlier version that
//! yielded it, as the payload poll does, lost more than it saved when the
//! server and the client ran on different CPUs (nbdcopy out 1.16-1.76 GB/s
//! against 2.53-2.65 spinning), though its waits were as short. A client
//! that takes longer than the budget twice in a row, or one that shares
//! the server's CPU and cannot send while it spins, pauses the wait for
//! `REQUEST_PAUSE` budgets: it costs two budgets now and then.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, recv};

/// How long [`BusyPoll::recv`] polls by default: long enough for a client
/// on the same machine to be scheduled and send its next piece.
pub const DEFAULT_BUDGET: Duration = Duration::from_micros(50);

/// After two waits in a row for the next request that came to nothing,
/// this many budgets pass before the connection waits for one again (10 ms
/// by default).
const REQUEST_PAUSE: u32 = 200;

/// A connection's socket, read without the reactor.
#[derive(Debug)]
pub struct BusyPoll {
    /// A duplicate of the connection's descriptor, so that it lives as long
    /// as this does, whoever owns the stream.
    socket: OwnedFd,
    budget: Duration,
}

impl BusyPoll {
    /// `None` when `budget` is zero: polling is off.
    pub fn new(socket: impl AsFd, budget: Duration) -> io::Result<Option<BusyPoll>> {
        if budget.is_zero() {
            return Ok(None);
        }
        Ok(Some(BusyPoll {
            socket: socket.as_fd().try_clone_to_owned()?,
            budget,
        }))
    }

    /// Reads what the socket holds into `buf`, polling for it to hold
    /// anything for up to the budget, and no longer than `allowance`, which
    /// is charged with the time spent polling. `WouldBlock` when nothing
    /// came; `Ok(0)` when the client closed its side.
    ///
    /// Only for bytes the caller knows nobody else has buffered: the
    /// connection's `BufReader` must be empty.
    pub fn recv(&self, buf: &mut [u8], allowance: &mut Duration) -> io::Result<usize> {
        let limit = self.budget.min(*allowance);
        let mut started = None;
        let result = loop {
            match recv(self.socket.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT) {
                Ok(n) => break Ok(n),
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => {
                    let started = *started.get_or_insert_with(Instant::now);
                    if started.elapsed() >= limit {
                        break Err(io::ErrorKind::WouldBlock.into());
                    }
                    // Lets the client, or anything else runnable, have this
                    // CPU; with nothing to run, it returns at once.
                    std::thread::yield_now();
                }
                Err(e) => break Err(e.into()),
            }
        };
        if let Some(started) = started {
            *allowance = allowance.saturating_sub(started.elapsed());
        }
        result
    }

    /// Another poller of the same socket.
    pub fn try_clone(&self) -> io::Result<BusyPoll> {
        Ok(BusyPoll {
            socket: self.socket.try_clone()?,
            budget: self.budget,
        })
    }

    /// How long one payload may be polled for in all: a budget per 64 KiB,
    /// several times what a client that sends at full speed needs. A client
    /// that trickles its payload, a byte within each budget, gets no more,
    /// and is then waited for on the reactor like any other.
    pub fn allowance(&self, len: usize) -> Duration {
        self.budget * u32::try_from(len.div_ceil(64 * 1024)).unwrap_or(u32::MAX)
    }
}

/// The wait for the next request of a client with nothing in flight
/// (see the module's doc), with its record of misses.
#[derive(Debug)]
pub struct RequestWait {
    poll: BusyPoll,
    /// Whether the last wait came to nothing.
    missed: bool,
    /// Until when [`RequestWait::wait`] does not wait.
    paused_until: Option<Instant>,
}

impl RequestWait {
    pub fn new(poll: BusyPoll) -> RequestWait {
        RequestWait {
            poll,
            missed: false,
            paused_until: None,
        }
    }

    /// Whether [`RequestWait::wait`] would wait now.
    fn waits(&self) -> bool {
        self.paused_until
            .is_none_or(|until| Instant::now() >= until)
    }

    /// Spins until the socket has a byte to read (or has ended), for up
    /// to the budget, unless two waits in a row that came to nothing paused
    /// this; the bytes stay in the socket. True when there is something to
    /// read; false when nothing came or the wait is paused.
    ///
    /// Only for a connection whose client has nothing in flight: the
    /// client sends next, or not at all.
    pub fn wait(&mut self) -> bool {
        if !self.waits() {
            return false;
        }
        let budget = self.poll.budget;
        let started = Instant::now();
        let mut byte = [0u8; 1];
        loop {
            let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_PEEK;
            match recv(self.poll.socket.as_raw_fd(), &mut byte, flags) {
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => {
                    if started.elapsed() >= budget {
                        // Twice in a row: not a client that sends at once.
                        if self.missed {
                            self.paused_until = Some(Instant::now() + budget * REQUEST_PAUSE);
                        }
                        self.missed = !self.missed;
                        return false;
                    }
                }
                // An error is the reader's to meet and report.
                _ => {
                    self.missed = false;
                    return true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    #[test]
    fn reads_what_is_there_and_gives_up_after_the_budget() {
        let (mut client, server) = UnixStream::pair().unwrap();
        let budget = Duration::from_millis(2);
        let poll = BusyPoll::new(&server, budget).unwrap().unwrap();
        let mut buf = [0u8; 8];

        let mut allowance = Duration::from_secs(60);
        client.write_all(b"abc").unwrap();
        assert_eq!(poll.recv(&mut buf, &mut allowance).unwrap(), 3);
        assert_eq!(&buf[..3], b"abc");

        let started = Instant::now();
        let err = poll.recv(&mut buf, &mut allowance).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert!(started.elapsed() >= budget);
        assert!(allowance <= Duration::from_secs(60) - budget, "charged");

        let mut spent = Duration::ZERO;
        let started = Instant::now();
        let err = poll.recv(&mut buf, &mut spent).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "no allowance, no poll"
        );

        drop(client);
        assert_eq!(
            poll.recv(&mut buf, &mut allowance).unwrap(),
            0,
            "end of stream"
        );
    }

    #[test]
    fn bytes_sent_while_it_polls_are_read() {
        let (mut client, server) = UnixStream::pair().unwrap();
        // Far longer than the sender takes, however busy the machine.
        let poll = BusyPoll::new(&server, Duration::from_secs(30))
            .unwrap()
            .unwrap();
        let (go, next) = std::sync::mpsc::channel();
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            client.write_all(b"late").unwrap();
            next.recv().unwrap();
            std::thread::sleep(Duration::from_millis(20));
            client.write_all(b"next").unwrap();
            client
        });
        let mut buf = [0u8; 8];
        let n = poll.recv(&mut buf, &mut Duration::from_secs(60)).unwrap();
        assert_eq!(&buf[..n], &b"late"[..n]);
        assert!(n > 0);
        go.send(()).unwrap();
        let mut wait = RequestWait::new(poll);
        assert!(wait.wait(), "the request came within the wait");
        assert!(wait.waits());
        drop(sender.join().unwrap());
    }

    #[test]
    fn waits_for_a_request_without_taking_it_and_pauses_after_two_misses() {
        let (mut client, server) = UnixStream::pair().unwrap();
        let budget = Duration::from_millis(2);
        let poll = BusyPoll::new(&server, budget).unwrap().unwrap();
        let mut wait = RequestWait::new(poll.try_clone().unwrap());
        let mut buf = [0u8; 16];
        let mut allowance = Duration::from_secs(60);

        client.write_all(b"request").unwrap();
        assert!(wait.wait());
        assert!(wait.wait(), "peeked, not taken");
        assert_eq!(poll.recv(&mut buf, &mut allowance).unwrap(), 7);

        let started = Instant::now();
        assert!(!wait.wait());
        assert!(started.elapsed() >= budget, "waited a budget");
        assert!(wait.waits(), "one miss does not pause");
        client.write_all(b"1").unwrap();
        assert!(wait.wait(), "a hit forgets the miss");
        assert_eq!(poll.recv(&mut buf, &mut allowance).unwrap(), 1);

        assert!(!wait.wait());
        assert!(!wait.wait());
        assert!(!wait.waits(), "paused after two misses");
        client.write_all(b"late").unwrap();
        assert!(!wait.wait(), "no wait while paused");

        std::thread::sleep(budget * REQUEST_PAUSE);
        assert!(wait.waits());
        assert!(wait.wait());
        drop(client);
        assert_eq!(poll.recv(&mut buf, &mut allowance).unwrap(), 4);
        assert!(wait.wait(), "the end of the stream is readable");
    }

    #[test]
    fn a_zero_budget_turns_polling_off() {
        let (_client, server) = UnixStream::pair().unwrap();
        assert!(BusyPoll::new(&server, Duration::ZERO).unwrap().is_none());
    }
}
