//! Payload buffers, reused within a connection. A fresh buffer costs an
//! allocation, zeroing and, for large ones, page faults on every request;
//! measured on 1 MiB reads that was about a fifth of the server's CPU time
//! per request. Reused buffers hold stale data of the same connection,
//! which every user overwrites in full before anything is sent.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// The idle bytes all the pools of a server keep, against a server-wide
/// cap: each connection's pool is bounded, but without this the pools of
/// many connections that once made large requests and then idle would add
/// up to gigabytes.
#[derive(Debug)]
pub struct PoolBudget {
    max_bytes: usize,
    bytes: AtomicUsize,
}

impl PoolBudget {
    pub fn new(max_bytes: usize) -> Arc<Self> {
        Arc::new(PoolBudget {
            max_bytes,
            bytes: AtomicUsize::new(0),
        })
    }

    fn reserve(&self, n: usize) -> bool {
        self.bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                (b + n <= self.max_bytes).then_some(b + n)
            })
            .is_ok()
    }

    fn release(&self, n: usize) {
        self.bytes.fetch_sub(n, Ordering::AcqRel);
    }
}

/// Free buffers, up to a total capacity, and within the server's budget.
#[derive(Debug)]
pub struct BufferPool {
    max_bytes: usize,
    free: Mutex<Free>,
    server: Arc<PoolBudget>,
}

#[derive(Debug, Default)]
struct Free {
    buffers: Vec<Vec<u8>>,
    bytes: usize,
}

impl BufferPool {
    /// A pool that keeps at most `max_bytes` of capacity while idle, and
    /// no more than `server` has room for.
    pub fn new(max_bytes: usize, server: Arc<PoolBudget>) -> Self {
        BufferPool {
            max_bytes,
            free: Mutex::new(Free::default()),
            server,
        }
    }

    /// A buffer of `len` bytes whose contents are unspecified: the caller
    /// overwrites all of it.
    pub fn take(&self, len: usize) -> Vec<u8> {
        let reused = {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            let found = free.buffers.iter().rposition(|b| b.capacity() >= len);
            found.map(|i| {
                let buf = free.buffers.swap_remove(i);
                free.bytes -= buf.capacity();
                self.server.release(buf.capacity());
                buf
            })
        };
        match reused {
            Some(mut buf) => {
                // Only bytes beyond the old length are zeroed.
                buf.resize(len, 0);
                buf
            }
            None => vec![0; len],
        }
    }

    /// Returns a buffer for reuse, or frees it if the pool is full.
    pub fn give(&self, buf: Vec<u8>) {
        if buf.capacity() == 0 {
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.bytes + buf.capacity() <= self.max_bytes && self.server.reserve(buf.capacity()) {
            free.bytes += buf.capacity();
            free.buffers.push(buf);
        }
    }
}

impl Drop for BufferPool {
    fn drop(&mut self) {
        let free = self.free.get_mut().unwrap_or_else(|e| e.into_inner());
        self.server.release(free.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_up_to_the_bound() {
        let server = PoolBudget::new(1 << 20);
        let pool = BufferPool::new(8192, server.clone());
        let mut a = pool.take(4096);
        assert_eq!(a.len(), 4096);
        a[0] = 7;
        let a_ptr = a.as_ptr();
        pool.give(a);
        let b = pool.take(100);
        assert_eq!((b.len(), b.as_ptr()), (100, a_ptr), "reused, truncated");
        pool.give(b);
        let c = pool.take(4000);
        assert_eq!(
            (c.len(), c.as_ptr()),
            (4000, a_ptr),
            "grown back within capacity"
        );
        let d = pool.take(4096);
        assert_ne!(d.as_ptr(), a_ptr, "the pool was empty: a fresh buffer");
        pool.give(c);
        pool.give(d);
        pool.give(vec![0; 4096]);
        assert_eq!(
            pool.free.lock().unwrap().bytes,
            8192,
            "the third buffer was over the bound"
        );
        let big = pool.take(8192);
        assert!(big.iter().all(|&b| b == 0), "nothing large enough: fresh");
        assert_eq!(server.bytes.load(Ordering::SeqCst), 8192);
        drop(pool);
        assert_eq!(server.bytes.load(Ordering::SeqCst), 0, "given back");
    }

    #[test]
    fn the_server_budget_caps_all_pools_together() {
        let server = PoolBudget::new(8192);
        let (a, b) = (
            BufferPool::new(8192, server.clone()),
            BufferPool::new(8192, server.clone()),
        );
        a.give(vec![0; 4096]);
        b.give(vec![0; 4096]);
        b.give(vec![0; 4096]);
        assert_eq!(b.free.lock().unwrap().bytes, 4096, "over the server's cap");
        a.take(4096);
        b.give(vec![0; 4096]);
        assert_eq!(b.free.lock().unwrap().bytes, 8192, "room again");
    }
}
