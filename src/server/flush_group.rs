//! Group commit for FLUSH: flushes that arrive while an export's fdatasync runs share the
//! next one, so a flood of them costs one sync at a time and one thread, not one thread
//! each. A flush must cover every write completed before it arrived, so it joins the
//! sync that starts after it, never the one already running.
//!
//! Pure: the caller runs the syncs and answers the waiters.

/// The flushes of one export: whether a sync runs, and who waits for the next one.
pub struct FlushGroup<W> {
    running: bool,
    waiting: Vec<W>,
}

impl<W> std::fmt::Debug for FlushGroup<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlushGroup")
            .field("running", &self.running)
            .field("waiting", &self.waiting.len())
            .finish()
    }
}

impl<W> Default for FlushGroup<W> {
    fn default() -> Self {
        FlushGroup {
            running: false,
            waiting: Vec::new(),
        }
    }
}

impl<W> FlushGroup<W> {
    /// A flush arrives. If no sync runs, the caller must run one now for the batch
    /// returned; otherwise the flush waits for the next sync and `None` is returned.
    pub fn arrive(&mut self, waiter: W) -> Option<Vec<W>> {
        if self.running {
            self.waiting.push(waiter);
            return None;
        }
        self.running = true;
        Some(vec![waiter])
    }

    /// The caller's sync is done (its batch answered). Returns the flushes that arrived
    /// meanwhile, for which the caller must now run the next sync; `None` when none did
    /// and the group is idle.
    pub fn finished(&mut self) -> Option<Vec<W>> {
        debug_assert!(self.running);
        if self.waiting.is_empty() {
            self.running = false;
            return None;
        }
        Some(std::mem::take(&mut self.waiting))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flushes_during_a_sync_share_the_next_one() {
        let mut g = FlushGroup::default();
        assert_eq!(g.arrive(1), Some(vec![1]), "an idle group syncs at once");
        assert_eq!(g.arrive(2), None);
        assert_eq!(g.arrive(3), None);
        assert_eq!(
            g.finished(),
            Some(vec![2, 3]),
            "one sync for both, after the first"
        );
        assert_eq!(g.arrive(4), None, "still running: waits for the sync after");
        assert_eq!(g.finished(), Some(vec![4]));
        assert_eq!(g.finished(), None);
        assert_eq!(g.arrive(5), Some(vec![5]), "idle again");
    }
}
