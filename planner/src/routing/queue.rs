//! The shared prefill queue: prefill work that waits in the router for a free prefill instance
//! instead of on the instance picked at arrival.
//!
//! A queue on each instance keeps a backlog where it was built: instances started to clear it
//! only see new arrivals, and requests that have already missed their TTFT hold up those that
//! could still make theirs. [`DeadlineQueue`] is one queue for all prefill instances. With
//! [`QueueOrder::DeadlineFirst`] a free instance takes the work with the earliest TTFT deadline
//! among the work that can still meet it (its deadline minus its prefill time is not past), and
//! only when none can, the earliest deadline of the rest; nothing is ever dropped. With
//! [`QueueOrder::Arrival`] it takes the oldest.
//!
//! Every operation is `O(log n)`: an entry moves once from "can still make it" to "late", when
//! the clock passes its latest start.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// The order in which waiting prefill work is taken.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum QueueOrder {
    /// Earliest deadline among the work that can still meet it; then the earliest of the rest.
    #[default]
    DeadlineFirst,
    /// Oldest first.
    Arrival,
}

/// Where prefill work waits when every prefill instance is busy (the router's
/// `--prefill-queue`, the simulator's too).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PrefillQueue {
    /// On the instance it was sent to on arrival (the least loaded then), in arrival order: a
    /// backlog stays where it was built when new instances come up.
    PerInstance,
    /// In the router ([`DeadlineQueue`], [`QueueOrder::DeadlineFirst`]): a free instance takes
    /// the next work, so new instances share a backlog at once; and only while some decode
    /// instance has room for it (the simulator: its steps stay within the TPOT SLO with the
    /// work's sequences added; the router: a decode worker's last step was within the TPOT SLO
    /// and nothing waits in its engine).
    #[default]
    Shared,
    /// In the router as `Shared`, oldest first and not paced.
    SharedFifo,
}

impl PrefillQueue {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PerInstance => "per-instance",
            Self::Shared => "shared",
            Self::SharedFifo => "shared-fifo",
        }
    }

    /// The order of the shared queue (`None`: per instance).
    pub fn order(self) -> Option<QueueOrder> {
        match self {
            Self::PerInstance => None,
            Self::Shared => Some(QueueOrder::DeadlineFirst),
            Self::SharedFifo => Some(QueueOrder::Arrival),
        }
    }

    /// Whether prefill work waits for room on a decode instance.
    pub fn paced(self) -> bool {
        self == Self::Shared
    }
}

impl std::str::FromStr for PrefillQueue {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "per-instance" => Ok(Self::PerInstance),
            "shared" => Ok(Self::Shared),
            "shared-fifo" => Ok(Self::SharedFifo),
            other => Err(format!(
                "unknown prefill queue {other:?} (per-instance, shared or shared-fifo)"
            )),
        }
    }
}

/// A total order on `f64` for the queue's keys (NaN is stored as +infinity).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Key(f64);

impl Eq for Key {}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Key {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

fn key(x: f64) -> Key {
    if x.is_nan() {
        Key(f64::INFINITY)
    } else {
        Key(x)
    }
}

struct Entry<T> {
    item: T,
    deadline: Key,
    latest_start: Key,
    late: bool,
}

/// Prefill work waiting for a free prefill instance (see the module docs).
pub struct DeadlineQueue<T> {
    order: QueueOrder,
    next_seq: u64,
    /// Every entry by arrival (its sequence number).
    entries: BTreeMap<u64, Entry<T>>,
    /// Entries that can still make their deadline, by latest start and by deadline.
    by_latest_start: BTreeSet<(Key, u64)>,
    on_time: BTreeSet<(Key, u64)>,
    /// Entries past their latest start, by deadline.
    late: BTreeSet<(Key, u64)>,
}

impl<T> Default for DeadlineQueue<T> {
    fn default() -> Self {
        Self::new(QueueOrder::default())
    }
}

impl<T> DeadlineQueue<T> {
    pub fn new(order: QueueOrder) -> Self {
        Self {
            order,
            next_seq: 0,
            entries: BTreeMap::new(),
            by_latest_start: BTreeSet::new(),
            on_time: BTreeSet::new(),
            late: BTreeSet::new(),
        }
    }

    pub fn order(&self) -> QueueOrder {
        self.order
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Adds work due by `deadline` (seconds on the caller's clock) that takes `service_s` to
    /// prefill.
    pub fn push(&mut self, item: T, deadline: f64, service_s: f64) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let deadline = key(deadline);
        let latest_start = key(deadline.0 - service_s.max(0.0));
        self.by_latest_start.insert((latest_start, seq));
        self.on_time.insert((deadline, seq));
        self.entries.insert(
            seq,
            Entry {
                item,
                deadline,
                latest_start,
                late: false,
            },
        );
    }

    /// Moves the entries whose latest start is before `now` to the late set.
    fn advance(&mut self, now: f64) {
        while let Some(&(start, seq)) = self.by_latest_start.first() {
            if start.0 >= now {
                break;
            }
            self.by_latest_start.remove(&(start, seq));
            if let Some(e) = self.entries.get_mut(&seq) {
                self.on_time.remove(&(e.deadline, seq));
                self.late.insert((e.deadline, seq));
                e.late = true;
            }
        }
    }

    /// The sequence number of the entry taken next at `now`.
    fn next_seq(&mut self, now: f64) -> Option<u64> {
        match self.order {
            QueueOrder::Arrival => self.entries.keys().next().copied(),
            QueueOrder::DeadlineFirst => {
                self.advance(now);
                self.on_time
                    .first()
                    .or_else(|| self.late.first())
                    .map(|&(_, seq)| seq)
            }
        }
    }

    /// The work taken next at `now`, and whether it can no longer make its deadline.
    pub fn peek(&mut self, now: f64) -> Option<(&T, bool)> {
        let seq = self.next_seq(now)?;
        let e = self.entries.get(&seq)?;
        Some((&e.item, e.late || e.latest_start.0 < now))
    }

    /// Takes the work that goes next at `now`.
    pub fn pop(&mut self, now: f64) -> Option<T> {
        let seq = self.next_seq(now)?;
        self.remove(seq)
    }

    /// The oldest waiting work.
    pub fn oldest(&self) -> Option<&T> {
        self.entries.values().next().map(|e| &e.item)
    }

    /// The waiting work, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.entries.values().map(|e| &e.item)
    }

    /// Takes everything, oldest first (when no prefill instance is left to wait for).
    pub fn drain(&mut self) -> Vec<T> {
        self.by_latest_start.clear();
        self.on_time.clear();
        self.late.clear();
        std::mem::take(&mut self.entries)
            .into_values()
            .map(|e| e.item)
            .collect()
    }

    /// Removes the first entry (in arrival order) that `pred` matches, e.g. a request whose
    /// client went away.
    pub fn remove_first(&mut self, pred: impl Fn(&T) -> bool) -> Option<T> {
        let seq = self
            .entries
            .iter()
            .find(|(_, e)| pred(&e.item))
            .map(|(&s, _)| s)?;
        self.remove(seq)
    }

    fn remove(&mut self, seq: u64) -> Option<T> {
        let e = self.entries.remove(&seq)?;
        self.by_latest_start.remove(&(e.latest_start, seq));
        self.on_time.remove(&(e.deadline, seq));
        self.late.remove(&(e.deadline, seq));
        Some(e.item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn work_that_can_still_make_it_goes_first_then_the_late_by_deadline() {
        let mut q = DeadlineQueue::new(QueueOrder::DeadlineFirst);
        // (name, deadline, service)
        q.push("a", 2.0, 0.5); // latest start 1.5
        q.push("b", 3.0, 0.5); // 2.5
        q.push("c", 2.5, 2.4); // 0.1
        q.push("d", 1.0, 0.1); // 0.9
        // At 0: everything can make it; earliest deadline first.
        assert_eq!(q.peek(0.0), Some((&"d", false)));
        // At 1.0: d (0.9) and c (0.1) are late; a and b are not.
        assert_eq!(q.pop(1.0), Some("a"));
        assert_eq!(q.pop(1.0), Some("b"));
        // Only late work is left: earliest deadline first.
        assert_eq!(q.peek(1.0), Some((&"d", true)));
        assert_eq!(q.pop(1.0), Some("d"));
        assert_eq!(q.pop(1.0), Some("c"));
        assert_eq!(q.pop(1.0), None);
        assert!(q.is_empty());
    }

    #[test]
    fn arrival_order_ignores_deadlines_and_drain_keeps_arrival_order() {
        let mut q = DeadlineQueue::new(QueueOrder::Arrival);
        q.push(1, 9.0, 0.0);
        q.push(2, 1.0, 0.0);
        q.push(3, 5.0, 0.0);
        assert_eq!(q.pop(0.0), Some(1));
        let mut d = DeadlineQueue::new(QueueOrder::DeadlineFirst);
        for (i, dl) in [(1, 9.0), (2, 1.0), (3, f64::NAN)] {
            d.push(i, dl, 0.0);
        }
        assert_eq!(d.oldest(), Some(&1));
        assert_eq!(d.remove_first(|&i| i == 2), Some(2));
        assert_eq!(d.drain(), vec![1, 3]);
        assert_eq!(d.pop(0.0), None);
    }

    /// The brute-force rule the queue implements: among entries with `now + service <=
    /// deadline` the earliest deadline (then the oldest), else the earliest deadline.
    fn brute(entries: &[(u64, f64, f64)], now: f64) -> Option<u64> {
        entries
            .iter()
            .min_by(|x, y| {
                let late = |e: &(u64, f64, f64)| e.1 - e.2 < now;
                (late(x), x.1, x.0)
                    .partial_cmp(&(late(y), y.1, y.0))
                    .unwrap_or(Ordering::Equal)
            })
            .map(|e| e.0)
    }

    proptest! {
        #[test]
        fn matches_the_brute_force_rule(
            ops in prop::collection::vec((0.0f64..10.0, 0.0f64..3.0, any::<bool>()), 1..60)
        ) {
            let mut q = DeadlineQueue::new(QueueOrder::DeadlineFirst);
            let mut shadow: Vec<(u64, f64, f64)> = Vec::new();
            let mut now = 0.0;
            let mut id = 0u64;
            for (deadline, service, take) in ops {
                now += 0.1;
                if take {
                    let want = brute(&shadow, now);
                    prop_assert_eq!(q.pop(now), want);
                    shadow.retain(|e| Some(e.0) != want);
                } else {
                    q.push(id, deadline, service);
                    shadow.push((id, deadline, service));
                    id += 1;
                }
                prop_assert_eq!(q.len(), shadow.len());
            }
        }
    }
}
