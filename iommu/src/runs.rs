//! The set of runs of an S2 domain, keyed by first IOVA.
//!
//! Each run is exactly one backend mapping: runs are never merged after the
//! fact (that would need a host remap), only split when the guest unmaps part
//! of one.

use crate::backend::MapRun;
use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The VM-wide run limit ([`crate::IommuConfig::max_map_runs`]) as shared
/// with backends that hold runs of their own: the IOMMUFD backend's S1
/// shadows, whose runs the guest creates by writing page tables rather than
/// by MAP calls, and which must not let it grow the VMM's memory past the
/// limit the S2 path keeps.
///
/// The domain layer keeps [`RunBudget::limit`] and the count of its own
/// runs current (under its lock, before every call that can reach a
/// backend); a backend takes runs with [`RunBudget::try_take`] and gives
/// them back with [`RunBudget::give_back`]. The domain layer's S2 limit is
/// what the backends leave. Clones share one budget. A budget no domain
/// layer drives (a backend used alone) is unlimited.
#[derive(Clone, Debug)]
pub struct RunBudget(Arc<BudgetInner>);

#[derive(Debug)]
struct BudgetInner {
    limit: AtomicU64,
    domain_runs: AtomicU64,
    backend_runs: AtomicU64,
}

impl Default for RunBudget {
    fn default() -> Self {
        Self(Arc::new(BudgetInner {
            limit: AtomicU64::new(u64::MAX),
            domain_runs: AtomicU64::new(0),
            backend_runs: AtomicU64::new(0),
        }))
    }
}

impl RunBudget {
    /// A budget of `limit` runs, none used.
    pub fn with_limit(limit: u64) -> Self {
        let b = Self::default();
        b.0.limit.store(limit, Ordering::Relaxed);
        b
    }

    /// Sets the VM-wide limit and the domain layer's own runs.
    pub(crate) fn sync(&self, limit: u64, domain_runs: u64) {
        self.0.limit.store(limit, Ordering::Relaxed);
        self.0.domain_runs.store(domain_runs, Ordering::Relaxed);
    }

    /// Runs the backends hold now.
    pub fn backend_runs(&self) -> u64 {
        self.0.backend_runs.load(Ordering::Relaxed)
    }

    /// Runs still free for a backend.
    pub fn available(&self) -> u64 {
        self.0
            .limit
            .load(Ordering::Relaxed)
            .saturating_sub(self.0.domain_runs.load(Ordering::Relaxed))
            .saturating_sub(self.backend_runs())
    }

    /// Takes `n` runs for a backend; false (nothing taken) if fewer are
    /// free.
    pub fn try_take(&self, n: u64) -> bool {
        let inner = &self.0;
        let limit = inner
            .limit
            .load(Ordering::Relaxed)
            .saturating_sub(inner.domain_runs.load(Ordering::Relaxed));
        inner
            .backend_runs
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(n).filter(|&total| total <= limit)
            })
            .is_ok()
    }

    /// Gives back `n` runs a backend took.
    pub fn give_back(&self, n: u64) {
        let _ = self
            .0
            .backend_runs
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                Some(used.saturating_sub(n))
            });
    }
}

/// Non-overlapping runs, by first IOVA.
#[derive(Debug, Default, Clone)]
pub(crate) struct RunMap {
    runs: BTreeMap<u64, MapRun>,
    bytes: u64,
}

/// What the domain layer must tell the backends for one run touched by an
/// unmap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UnmapOp {
    /// The whole run goes.
    Whole(MapRun),
    /// The run goes except for up to two pieces (left and/or right of the
    /// unmapped range) that stay mapped.
    Split {
        run: MapRun,
        keep: [Option<MapRun>; 2],
    },
}

impl RunMap {
    /// Mapped 4 KiB pages.
    pub(crate) fn pages(&self) -> u64 {
        self.bytes >> crate::config::PAGE_SHIFT
    }

    /// Number of runs.
    pub(crate) fn len(&self) -> usize {
        self.runs.len()
    }

    /// The runs in ascending IOVA order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &MapRun> {
        self.runs.values()
    }

    /// The run containing `iova`.
    pub(crate) fn lookup(&self, iova: u64) -> Option<&MapRun> {
        self.runs
            .range(..=iova)
            .next_back()
            .map(|(_, r)| r)
            .filter(|r| iova < r.iova_end())
    }

    /// The first run that ends after `iova` (it contains `iova` or lies above).
    pub(crate) fn first_ending_after(&self, iova: u64) -> Option<&MapRun> {
        if let Some(r) = self.lookup(iova) {
            return Some(r);
        }
        self.runs
            .range((Bound::Excluded(iova), Bound::Unbounded))
            .next()
            .map(|(_, r)| r)
    }

    /// Adds a run; the caller guarantees it overlaps no other.
    pub(crate) fn insert(&mut self, run: MapRun) {
        debug_assert!(self
            .first_ending_after(run.iova)
            .is_none_or(|r| r.iova >= run.iova_end()));
        self.bytes += run.len;
        self.runs.insert(run.iova, run);
    }

    /// Removes the run starting at `iova`.
    pub(crate) fn remove(&mut self, iova: u64) -> Option<MapRun> {
        let run = self.runs.remove(&iova)?;
        self.bytes -= run.len;
        Some(run)
    }

    /// Unmaps the mapped prefix of `[start, end)` (page-aligned, start < end),
    /// calling `op` once per run it touches, in ascending order, after the map
    /// has been updated. `spare_runs` is how many more runs the VM may hold:
    /// cutting a hole in a run (keeping a piece on each side) takes one,
    /// removing a whole run gives one back; a hole that would need a run when
    /// none is spare is not cut, and the prefix ends there.
    pub(crate) fn unmap_prefix(
        &mut self,
        start: u64,
        end: u64,
        spare_runs: &mut u64,
        mut op: impl FnMut(UnmapOp),
    ) -> Prefix {
        let mut cursor = start;
        while cursor < end {
            let Some(run) = self.first_ending_after(cursor).copied() else {
                break;
            };
            if run.iova > cursor {
                break; // a gap: cursor is not mapped
            }
            let cut_end = run.iova_end().min(end);
            let (keep_left, keep_right) = (run.iova < cursor, run.iova_end() > cut_end);
            match (keep_left, keep_right) {
                (true, true) if *spare_runs == 0 => {
                    return Prefix {
                        end: cursor,
                        out_of_runs: true,
                    };
                }
                (true, true) => *spare_runs -= 1,
                (false, false) => *spare_runs = spare_runs.saturating_add(1),
                _ => {}
            }
            self.remove(run.iova);
            let left = keep_left.then(|| MapRun {
                iova: run.iova,
                gpa: run.gpa,
                len: cursor - run.iova,
                perms: run.perms,
            });
            let right = keep_right.then(|| MapRun {
                iova: cut_end,
                gpa: run.gpa + (cut_end - run.iova),
                len: run.iova_end() - cut_end,
                perms: run.perms,
            });
            for piece in [left, right].into_iter().flatten() {
                self.insert(piece);
            }
            op(if left.is_none() && right.is_none() {
                UnmapOp::Whole(run)
            } else {
                UnmapOp::Split {
                    run,
                    keep: [left, right],
                }
            });
            cursor = cut_end;
        }
        Prefix {
            end: cursor,
            out_of_runs: false,
        }
    }
}

/// How far [`RunMap::unmap_prefix`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Prefix {
    /// `end` if every page was unmapped, else the first page left mapped
    /// (a gap, or a hole that could not be cut).
    pub end: u64,
    /// The prefix stopped because cutting a hole needed a spare run.
    pub out_of_runs: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Perms;

    const P: u64 = 4096;

    fn run(iova: u64, gpa: u64, pages: u64) -> MapRun {
        MapRun {
            iova: iova * P,
            gpa: gpa * P,
            len: pages * P,
            perms: Perms::RW,
        }
    }

    #[test]
    fn the_budget_is_shared_and_bounded() {
        let b = RunBudget::with_limit(10);
        let c = b.clone();
        b.sync(10, 6);
        assert!(c.try_take(3));
        assert_eq!((b.backend_runs(), b.available()), (3, 1));
        assert!(!c.try_take(2), "6 + 3 + 2 > 10");
        assert!(c.try_take(1));
        c.give_back(2);
        assert_eq!(b.available(), 2);
        c.give_back(100);
        assert_eq!(b.backend_runs(), 0);
        assert!(RunBudget::default().try_take(1 << 40), "unlimited");
    }

    #[test]
    fn lookup_and_neighbours() {
        let mut m = RunMap::default();
        m.insert(run(10, 100, 5));
        m.insert(run(20, 7, 1));
        assert_eq!(m.pages(), 6);
        assert_eq!(m.len(), 2);
        assert_eq!(m.lookup(10 * P), Some(&run(10, 100, 5)));
        assert_eq!(m.lookup(15 * P - 1), Some(&run(10, 100, 5)));
        assert_eq!(m.lookup(15 * P), None);
        assert_eq!(m.lookup(9 * P), None);
        assert_eq!(m.first_ending_after(15 * P), Some(&run(20, 7, 1)));
        assert_eq!(m.first_ending_after(12 * P), Some(&run(10, 100, 5)));
        assert_eq!(m.first_ending_after(21 * P), None);
    }

    #[test]
    fn unmap_inside_a_run_splits_it() {
        let mut m = RunMap::default();
        m.insert(run(10, 100, 10));
        let mut ops = vec![];
        let mut spare = 1;
        let end = m.unmap_prefix(13 * P, 15 * P, &mut spare, |op| ops.push(op));
        assert_eq!((end.end, spare), (15 * P, 0));
        assert_eq!(
            ops,
            [UnmapOp::Split {
                run: run(10, 100, 10),
                keep: [Some(run(10, 100, 3)), Some(run(15, 105, 5))]
            }]
        );
        assert_eq!(m.pages(), 8);
        assert_eq!(
            m.iter().copied().collect::<Vec<_>>(),
            [run(10, 100, 3), run(15, 105, 5)]
        );
    }

    #[test]
    fn unmap_across_runs_stops_at_a_gap() {
        let mut m = RunMap::default();
        m.insert(run(0, 50, 4));
        m.insert(run(4, 9, 2));
        m.insert(run(8, 1, 2));
        let mut ops = vec![];
        let mut spare = 0;
        let end = m.unmap_prefix(2 * P, 10 * P, &mut spare, |op| ops.push(op));
        assert_eq!(end.end, 6 * P, "page 6 is not mapped");
        assert_eq!(spare, 1, "a whole run came back");
        assert_eq!(
            ops,
            [
                UnmapOp::Split {
                    run: run(0, 50, 4),
                    keep: [Some(run(0, 50, 2)), None]
                },
                UnmapOp::Whole(run(4, 9, 2)),
            ]
        );
        assert_eq!(
            m.iter().copied().collect::<Vec<_>>(),
            [run(0, 50, 2), run(8, 1, 2)]
        );
        assert_eq!(m.unmap_prefix(0, P, &mut spare, |_| {}).end, P);
        assert_eq!(
            m.unmap_prefix(0, P, &mut spare, |_| {}).end,
            0,
            "nothing mapped at 0 any more"
        );
    }

    #[test]
    fn a_hole_needs_a_spare_run() {
        let mut m = RunMap::default();
        m.insert(run(0, 100, 8));
        let mut spare = 0;
        let mut ops = vec![];
        let p = m.unmap_prefix(2 * P, 3 * P, &mut spare, |op| ops.push(op));
        assert_eq!(
            p,
            Prefix {
                end: 2 * P,
                out_of_runs: true
            }
        );
        assert!(ops.is_empty(), "nothing cut");
        assert_eq!(m.len(), 1);
        // Trimming an end needs no spare run.
        let p = m.unmap_prefix(0, P, &mut spare, |op| ops.push(op));
        assert_eq!((p.end, p.out_of_runs, m.len()), (P, false, 1));
    }
}
