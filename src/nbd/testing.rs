//! Test helpers: an in-memory backend that counts reads and flushes and reports
//! all-zero blocks as holes, and a negotiated session over it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::handshake::Session;
use super::{Backend, Export, Extent, Limits};

#[derive(Clone)]
pub struct MemBackend(Arc<Inner>);

struct Inner {
    data: Mutex<Vec<u8>>,
    block_size: u32,
    can_trim: bool,
    reads: AtomicUsize,
    flushes: AtomicUsize,
}

impl MemBackend {
    pub fn new(size: usize, block_size: u32, can_trim: bool) -> Self {
        MemBackend(Arc::new(Inner {
            data: Mutex::new(vec![0; size]),
            block_size,
            can_trim,
            reads: AtomicUsize::new(0),
            flushes: AtomicUsize::new(0),
        }))
    }

    pub fn reads(&self) -> usize {
        self.0.reads.load(Ordering::SeqCst)
    }

    pub fn flushes(&self) -> usize {
        self.0.flushes.load(Ordering::SeqCst)
    }

    pub fn contents(&self) -> Vec<u8> {
        self.0.data.lock().unwrap().clone()
    }

    fn zero(&self, offset: u64, len: u64) {
        let mut data = self.0.data.lock().unwrap();
        data[offset as usize..(offset + len) as usize].fill(0);
    }
}

impl Backend for MemBackend {
    fn size(&self) -> u64 {
        self.0.data.lock().unwrap().len() as u64
    }
    fn block_size(&self) -> u32 {
        self.0.block_size
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.0.reads.fetch_add(1, Ordering::SeqCst);
        let data = self.0.data.lock().unwrap();
        buf.copy_from_slice(&data[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    /// Memory never waits: small reads and writes are served on the reactor.
    fn read_cached(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<bool> {
        self.read(offset, buf).map(|()| true)
    }
    fn write(&self, offset: u64, data: &mut [u8]) -> std::io::Result<()> {
        let mut store = self.0.data.lock().unwrap();
        store[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn write_cached(&self, offset: u64, data: &mut [u8]) -> std::io::Result<bool> {
        self.write(offset, data).map(|()| true)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.0.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn can_trim(&self) -> bool {
        self.0.can_trim
    }
    fn trim(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.zero(offset, len);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, _may_trim: bool) -> std::io::Result<()> {
        self.zero(offset, len);
        Ok(())
    }
    fn cache(&self, _offset: u64, _len: u64) -> std::io::Result<()> {
        Ok(())
    }
    /// 512-byte blocks: all zero is a hole, anything else data.
    fn extents(&self, offset: u64, len: u64) -> std::io::Result<Vec<Extent>> {
        let data = self.0.data.lock().unwrap();
        let end = (offset + len).min(data.len() as u64) as usize;
        let mut out: Vec<Extent> = Vec::new();
        let mut at = offset as usize;
        while at < end {
            let next = ((at / 512 + 1) * 512).min(end);
            let zero = data[at..next].iter().all(|&b| b == 0);
            match out.last_mut() {
                Some(last) if last.zero == zero => last.length += (next - at) as u64,
                _ => out.push(Extent {
                    length: (next - at) as u64,
                    hole: zero,
                    zero,
                }),
            }
            at = next;
        }
        Ok(out)
    }
}

pub fn export(name: &str, backend: MemBackend, read_only: bool) -> Export {
    Export {
        name: name.into(),
        description: format!("test export {name}"),
        read_only,
        backend: Arc::new(backend),
    }
}

/// A session on a fresh export, with `base:allocation` selected when
/// structured replies are on.
pub fn session(backend: MemBackend, read_only: bool, structured: bool) -> Session {
    let export = export("disk", backend, read_only);
    let meta = structured.then_some(super::handshake::BASE_ALLOCATION_ID);
    Session::new(&export, structured, meta, &Limits::default())
}
