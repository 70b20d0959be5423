//! Which acked changes are durable: a write is acked once it is in the export node's page
//! cache, and on stable storage once a flush sent after its ack is acked. If the node
//! reboots while acked changes are not flushed, they may be gone, and the next flush says
//! so with EIO, as a disk that lost its write cache would. Pure bookkeeping.

use crate::protocol::ExportInfo;

#[derive(Debug)]
pub struct Durability {
    /// Changes (writes, trims, zeroings) acked so far, and how many of them a flush covered.
    acked: u64,
    flushed: u64,
    /// The export node's boot, as last seen.
    boot_id: String,
    /// The node rebooted while acked changes were not flushed: the next flush fails.
    lost_unflushed: bool,
}

impl Durability {
    pub fn new(boot_id: &str) -> Self {
        Durability {
            acked: 0,
            flushed: 0,
            boot_id: boot_id.to_string(),
            lost_unflushed: false,
        }
    }

    /// What a flush entering now covers: the changes acked so far. Those acked later
    /// may have been executed after it.
    pub fn covers(&self) -> u64 {
        self.acked
    }

    pub fn change_acked(&mut self) {
        self.acked += 1;
    }

    /// A flush that covered `covers` changes was acked: they are on stable storage, unless
    /// a reboot lost some before it, which the flush reports with EIO (once).
    pub fn flush_acked(&mut self, covers: u64) -> Result<(), i32> {
        if std::mem::take(&mut self.lost_unflushed) {
            log::error!(
                "flush failed: the export node rebooted after acking writes that no flush \
                 covered; they may be lost"
            );
            return Err(libc::EIO);
        }
        self.flushed = self.flushed.max(covers);
        Ok(())
    }

    /// A connection was made to the node described by `info`: notes whether it rebooted
    /// with unflushed changes, and remembers its boot.
    pub fn connected(&mut self, info: &ExportInfo) {
        if rebooted(&self.boot_id, info, self.acked > self.flushed) {
            log::error!(
                "the export node rebooted: writes acked since the last flush may be lost; \
                 the next flush reports EIO"
            );
            self.lost_unflushed = true;
        }
        self.boot_id = info.boot_id.clone();
    }
}

/// Whether a reconnect found the export node rebooted with acked changes unflushed: its
/// page cache, which held them, is gone. A restarted server process keeps the page cache.
fn rebooted(last_boot: &str, info: &ExportInfo, unflushed: bool) -> bool {
    unflushed && !info.resumed && !info.boot_id.is_empty() && info.boot_id != last_boot
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::protocol::Access;

    pub fn info(boot: &str, resumed: bool) -> ExportInfo {
        ExportInfo {
            version: 1,
            export: "disk".into(),
            access: Access::ReadWrite,
            session: [0; 16],
            resumed,
            boot_id: boot.into(),
            size: 1 << 20,
            block_size: 4096,
            max_transfer: 1 << 20,
            features: 0,
        }
    }

    #[test]
    fn only_a_reboot_with_unflushed_changes_counts_as_a_loss() {
        assert!(rebooted("a", &info("b", false), true));
        assert!(
            !rebooted("a", &info("b", false), false),
            "everything was flushed"
        );
        assert!(
            !rebooted("a", &info("a", false), true),
            "process restart: page cache kept"
        );
        assert!(
            !rebooted("a", &info("b", true), true),
            "session resumed: same server"
        );
        assert!(
            !rebooted("a", &info("", false), true),
            "server does not say"
        );
    }

    #[test]
    fn a_flush_covers_what_was_acked_before_it() {
        let mut d = Durability::new("a");
        d.change_acked();
        let covers = d.covers();
        d.change_acked(); // acked after the flush entered: not covered
        assert_eq!(d.flush_acked(covers), Ok(()));
        d.connected(&info("b", false));
        assert_eq!(d.flush_acked(d.covers()), Err(libc::EIO), "one unflushed");
        assert_eq!(d.flush_acked(d.covers()), Ok(()), "reported once");
        d.connected(&info("c", false));
        assert_eq!(d.flush_acked(d.covers()), Ok(()), "all flushed: no loss");
    }
}
