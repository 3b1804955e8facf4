//! Which (epoch, LSN) positions a log's history holds: the first epoch, then each later
//! one from where it began in this log (FORMAT.md §7 records them for every shard). A follower's log must
//! stay on its writer's history; a returning ex-writer's log leaves it where the epoch
//! after its own began, and recovery cuts it there (`WalConfig::history`).

use super::frame::{Epoch, Lsn};

/// Epoch 1, then each later epoch with the first LSN it wrote in this log, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    later: Vec<(Epoch, Lsn)>,
}

impl History {
    /// `later`: the epochs after the first, rising, each with its first LSN in this log.
    pub fn new(later: Vec<(Epoch, Lsn)>) -> History {
        History { later }
    }

    /// The newest epoch.
    pub fn epoch(&self) -> Epoch {
        self.later.last().map_or(Epoch(1), |(epoch, _)| *epoch)
    }

    /// Whether position (`epoch`, `lsn`) is on this history: of the newest epoch, or of
    /// epoch 1 or a recorded one below where the next epoch began. An epoch it has no
    /// record of, or whose end it does not know, is not (when unsure, say no: the
    /// caller starts over, which is never wrong).
    pub fn contains(&self, epoch: Epoch, lsn: Lsn) -> bool {
        self.position(epoch, lsn) == Position::On
    }

    /// Where (`epoch`, `lsn`) stands: [`Position::Off`] only when this history knows
    /// the epoch and where the next one began, at or before `lsn` — what a log may be
    /// cut for.
    pub fn position(&self, epoch: Epoch, lsn: Lsn) -> Position {
        if epoch == self.epoch() {
            return Position::On;
        }
        let known = epoch == Epoch(1) || self.later.iter().any(|(e, _)| *e == epoch);
        if epoch > self.epoch() || !known {
            return Position::Unknown;
        }
        match self.later.iter().find(|(e, _)| *e > epoch) {
            // A restore records an archive's epoch as beginning at LSN 0 when it does
            // not know where the one before it ended.
            Some(&(_, Lsn(0))) | None => Position::Unknown,
            Some(&(_, start)) if lsn < start => Position::On,
            Some(_) => Position::Off,
        }
    }
}

/// Where a log position stands against a [`History`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    On,
    /// Past where its epoch ended: a divergent branch.
    Off,
    /// An epoch the history does not know, or whose end it does not know.
    Unknown,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_failovers() -> History {
        History::new(vec![(Epoch(7), Lsn(10)), (Epoch(9), Lsn(15))])
    }

    #[test]
    fn each_epoch_holds_the_lsns_below_where_the_next_began() {
        let h = two_failovers();
        assert!(h.contains(Epoch(1), Lsn(9)));
        assert!(!h.contains(Epoch(1), Lsn(10)));
        assert!(h.contains(Epoch(7), Lsn(14)));
        assert!(!h.contains(Epoch(7), Lsn(15)));
        assert!(h.contains(Epoch(9), Lsn(1_000)));
        // An epoch that wrote nothing here before the next began at the same LSN.
        let empty = History::new(vec![(Epoch(7), Lsn(20)), (Epoch(9), Lsn(20))]);
        assert!(empty.contains(Epoch(1), Lsn(19)));
        assert!(!empty.contains(Epoch(7), Lsn(20)));
    }

    #[test]
    fn unknown_newer_or_unrecorded_epochs_are_off_history_but_never_cut() {
        let h = two_failovers();
        assert!(!h.contains(Epoch(8), Lsn(1)));
        assert!(!h.contains(Epoch(10), Lsn(1)));
        assert_eq!(h.position(Epoch(8), Lsn(1)), Position::Unknown);
        assert_eq!(h.position(Epoch(10), Lsn(1)), Position::Unknown);
        assert_eq!(h.position(Epoch(7), Lsn(15)), Position::Off);
        assert!(History::default().contains(Epoch(1), Lsn(u64::MAX)));
        assert!(!History::default().contains(Epoch(2), Lsn(1)));
        // A restored layout: epoch 3's archive, where epoch 1 ended unknown.
        let restored = History::new(vec![(Epoch(3), Lsn(0)), (Epoch(9), Lsn(50))]);
        assert!(!restored.contains(Epoch(1), Lsn(5)));
        assert_eq!(restored.position(Epoch(1), Lsn(5)), Position::Unknown);
        assert_eq!(restored.position(Epoch(3), Lsn(50)), Position::Off);
    }
}
