//! `SimDisk`: a redb storage backend held in memory that outlives its node.
//!
//! The simulation creates one per kv node and captures it in the node's init closure, so a
//! madsim kill + restart reopens the same bytes, as a process restart reopens its file. Every
//! write lands at once (an fsync'd disk); dropping writes that were not yet synced when the
//! node is killed is issue 3's fault model. In the real build kv uses a file instead.

use std::io;
use std::sync::{Arc, Mutex};

use redb::StorageBackend;

/// The bytes of one simulated disk. Clone the `Arc` to hand it to a restarted node.
#[derive(Default)]
pub struct SimDisk {
    /// A std mutex: redb calls the backend synchronously, never across an await.
    bytes: Mutex<Vec<u8>>,
}

impl std::fmt::Debug for SimDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SimDisk({} bytes)", self.lock().len())
    }
}

impl SimDisk {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.bytes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes currently stored.
    pub fn len_bytes(&self) -> usize {
        self.lock().len()
    }
}

/// The backend handed to redb: a handle on a shared [`SimDisk`].
#[derive(Debug, Clone)]
pub struct SimDiskBackend(pub Arc<SimDisk>);

fn out_of_range() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        "read or write past the end of the disk",
    )
}

impl StorageBackend for SimDiskBackend {
    fn len(&self) -> Result<u64, io::Error> {
        Ok(self.0.lock().len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        let bytes = self.0.lock();
        let start = usize::try_from(offset).map_err(|_| out_of_range())?;
        let src = bytes
            .get(start..start + out.len())
            .ok_or_else(out_of_range)?;
        out.copy_from_slice(src);
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        let len = usize::try_from(len).map_err(|_| out_of_range())?;
        self.0.lock().resize(len, 0);
        Ok(())
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        let mut bytes = self.0.lock();
        let start = usize::try_from(offset).map_err(|_| out_of_range())?;
        let dst = bytes
            .get_mut(start..start + data.len())
            .ok_or_else(out_of_range)?;
        dst.copy_from_slice(data);
        Ok(())
    }
}
