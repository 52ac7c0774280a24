//! Injected write failures, for tests of what a full or failing disk does
//! (behind the `testing` feature; without it every check passes and the
//! type holds nothing).

/// Where a failure can be injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fault {
    /// Before a group's bytes are written.
    Write,
    /// After they were written, before the fsync.
    Sync,
}

#[cfg(feature = "testing")]
mod imp {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::Fault;

    /// Switches a test flips to make the WAL's writes or fsyncs fail as a
    /// full disk does.
    #[derive(Debug, Default)]
    pub struct WalFaults {
        pub fail_writes: AtomicBool,
        pub fail_syncs: AtomicBool,
    }

    #[derive(Debug, Clone, Default)]
    pub(in crate::wal) struct Faults(pub(in crate::wal) Option<Arc<WalFaults>>);

    impl Faults {
        pub(in crate::wal) fn check(&self, at: Fault) -> std::io::Result<()> {
            let Some(f) = &self.0 else { return Ok(()) };
            let fail = match at {
                Fault::Write => f.fail_writes.load(Ordering::SeqCst),
                Fault::Sync => f.fail_syncs.load(Ordering::SeqCst),
            };
            if fail {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::StorageFull,
                    "injected: no space left on device",
                ));
            }
            Ok(())
        }
    }
}

#[cfg(not(feature = "testing"))]
mod imp {
    use super::Fault;

    #[derive(Debug, Clone, Default)]
    pub(in crate::wal) struct Faults;

    impl Faults {
        pub(in crate::wal) fn check(&self, _at: Fault) -> std::io::Result<()> {
            Ok(())
        }
    }
}

pub(super) use imp::Faults;
#[cfg(feature = "testing")]
pub use imp::WalFaults;
