//! The keeper's own FUSE filesystem, which serves nothing: at mount time it answers the
//! kernel's FUSE_INIT as a worker's filesystem would ([`fuse::configure_kernel`]) and
//! records what the kernel offered, for the synthesized INIT of every worker
//! ([`super::resume`]).

use std::sync::{Arc, Mutex};

use fuser::{Filesystem, KernelConfig};

use super::resume::KernelInit;
use crate::fuse;

/// The filesystem of the keeper's session: it only answers the kernel's INIT, as the
/// workers' filesystem would, and records what the kernel offered.
pub(super) struct InitRecorder(pub(super) Arc<Mutex<Option<KernelInit>>>);

impl Filesystem for InitRecorder {
    fn init(&mut self, _req: &fuser::Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let abi = config.kernel_abi();
        // The kernel's readahead is the most that may be set; asking for more tells it.
        let max_readahead = match config.set_max_readahead(u32::MAX) {
            Err(max) => max,
            Ok(previous) => {
                let _ = config.set_max_readahead(previous);
                u32::MAX
            }
        };
        *self.0.lock().unwrap() = Some(KernelInit {
            major: abi.0,
            minor: abi.1,
            max_readahead,
            flags: config.capabilities().bits(),
        });
        fuse::configure_kernel(config);
        Ok(())
    }
}
