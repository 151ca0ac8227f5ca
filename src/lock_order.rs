//! The lock order of the fetcher and the store, written once and checked in debug builds.
//!
//! Each tracked mutex has a [`Level`]; a thread may take a lock only while every lock it holds
//! is of a lower rank. Two threads that each take the other's lock first is how a deadlock
//! starts, and a lock taken twice by one thread is one at once: a debug build keeps the levels
//! each thread holds in a thread-local list and panics, naming both locks, the moment either
//! happens (before waiting, so a test fails instead of hanging). A release build is a plain
//! `std::sync::Mutex`: no list, no check.
//!
//! The order, from the first taken to the last:
//!
//! 1. [`FETCH_TABLE`]: the fetcher's `ChunkTable` (fetch/flight.rs). Deciding whether to start
//!    a fetch looks at presence under it, so it comes before the store's locks.
//! 2. [`STORE_WRITER`]: serializes every index write with the matching change of presence
//!    (create, mark, drop, evict, adopt). SQLite writes and unlinks happen under it.
//! 3. [`STORE_BLOBS`]: presence, which every cache hit takes; held for no I/O but opening a
//!    blob file that is already there.
//! 4. Leaves, never held while taking another tracked lock: the store's open files
//!    ([`STORE_FDS`]), open counts ([`STORE_OPENS`]), suspect blobs ([`STORE_SUSPECT`]), rows
//!    an eviction could not delete ([`STORE_UNFORGOTTEN`]), unverified-write counts
//!    ([`STORE_UNVERIFIED`]) and refused blobs ([`STORE_REFUSED`]).
//!
//! Untracked, and leaves by construction (nothing is taken while they are held): the index's
//! SQLite connection (`store/index.rs`), the group commit's queue (a `Condvar`'s mutex,
//! `store/commit.rs`), the buffer pool's free list (`bufpool.rs`) and each source's health.
//! No lock of either list is held across an await.

use std::ops::{Deref, DerefMut};
use std::sync::{Mutex, MutexGuard};

/// A lock's place in the order: its rank (lower is taken first) and its name, for the panic.
#[derive(Clone, Copy, Debug)]
// Read only by the debug builds' checks; a release build keeps the field for `Debug`.
#[cfg_attr(not(debug_assertions), allow(dead_code))]
pub struct Level {
    rank: u8,
    name: &'static str,
}

pub const FETCH_TABLE: Level = Level::new(10, "fetch table");
pub const STORE_WRITER: Level = Level::new(20, "store writer");
pub const STORE_BLOBS: Level = Level::new(30, "store blobs");
pub const STORE_FDS: Level = Level::new(40, "store fds");
pub const STORE_OPENS: Level = Level::new(40, "store opens");
pub const STORE_SUSPECT: Level = Level::new(40, "store suspect");
pub const STORE_UNFORGOTTEN: Level = Level::new(40, "store unforgotten");
pub const STORE_UNVERIFIED: Level = Level::new(40, "store unverified");
pub const STORE_REFUSED: Level = Level::new(40, "store refused");

impl Level {
    pub const fn new(rank: u8, name: &'static str) -> Level {
        Level { rank, name }
    }
}

/// A mutex with a place in the lock order. Poisoning panics, as `lock().unwrap()` did: a
/// thread that panicked under one of these left its state half changed.
pub struct OrderedMutex<T> {
    #[cfg_attr(not(debug_assertions), allow(dead_code))]
    level: Level,
    inner: Mutex<T>,
}

impl<T> OrderedMutex<T> {
    pub const fn new(level: Level, value: T) -> OrderedMutex<T> {
        OrderedMutex {
            level,
            inner: Mutex::new(value),
        }
    }

    /// Takes the lock. In a debug build, panics if this thread holds a lock of this rank or
    /// a higher one (this one included).
    pub fn lock(&self) -> OrderedGuard<'_, T> {
        #[cfg(debug_assertions)]
        held::check(self.level);
        let guard = self.inner.lock().unwrap();
        OrderedGuard {
            guard,
            #[cfg(debug_assertions)]
            _held: held::Held::push(self.level, self as *const Self as usize),
        }
    }
}

/// The lock held; released when dropped. Not `Send`, as a `MutexGuard` is not: a future that
/// holds one across an await cannot be spawned, so the thread-local list stays true.
pub struct OrderedGuard<'a, T> {
    guard: MutexGuard<'a, T>,
    #[cfg(debug_assertions)]
    _held: held::Held,
}

impl<T> Deref for OrderedGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T> DerefMut for OrderedGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.guard
    }
}

#[cfg(debug_assertions)]
mod held {
    use std::cell::RefCell;

    use super::Level;

    thread_local! {
        /// The tracked locks this thread holds: (level, the mutex's address).
        static HELD: RefCell<Vec<(Level, usize)>> = const { RefCell::new(Vec::new()) };
    }

    /// Panics if taking a lock of `level` now could deadlock.
    pub(super) fn check(level: Level) {
        let clash = HELD
            .try_with(|h| {
                h.borrow()
                    .iter()
                    .find(|(l, _)| l.rank >= level.rank)
                    .map(|(l, _)| *l)
            })
            .ok()
            .flatten();
        if let Some(held) = clash {
            panic!(
                "lock order: taking {:?} (rank {}) while holding {:?} (rank {}); see src/lock_order.rs",
                level.name, level.rank, held.name, held.rank
            );
        }
    }

    /// One entry of `HELD`, removed when the guard drops (in any order).
    pub(super) struct Held {
        addr: usize,
        // Not `Send`: it names this thread's list.
        _not_send: std::marker::PhantomData<*const ()>,
    }

    impl Held {
        pub(super) fn push(level: Level, addr: usize) -> Held {
            let _ = HELD.try_with(|h| h.borrow_mut().push((level, addr)));
            Held {
                addr,
                _not_send: std::marker::PhantomData,
            }
        }
    }

    impl Drop for Held {
        fn drop(&mut self) {
            let _ = HELD.try_with(|h| {
                let mut h = h.borrow_mut();
                if let Some(i) = h.iter().rposition(|(_, a)| *a == self.addr) {
                    h.remove(i);
                }
            });
        }
    }
}

#[cfg(all(test, debug_assertions))]
mod tests {
    use super::*;

    fn caught(f: impl FnOnce() + std::panic::UnwindSafe) -> Option<String> {
        let e = std::panic::catch_unwind(f).err()?;
        e.downcast_ref::<String>().cloned()
    }

    #[test]
    fn in_order_is_allowed_and_guards_may_drop_in_any_order() {
        let (table, writer, blobs) = (
            OrderedMutex::new(FETCH_TABLE, 1),
            OrderedMutex::new(STORE_WRITER, 2),
            OrderedMutex::new(STORE_BLOBS, 3),
        );
        let t = table.lock();
        let w = writer.lock();
        drop(t);
        let b = blobs.lock();
        assert_eq!(*w + *b, 5);
        drop(w);
        drop(b);
        // Nothing held any more: the first in the order may be taken again.
        drop(table.lock());
    }

    #[test]
    fn out_of_order_panics_naming_both() {
        let writer = OrderedMutex::new(STORE_WRITER, ());
        let blobs = OrderedMutex::new(STORE_BLOBS, ());
        let msg = caught(|| {
            let _b = blobs.lock();
            let _w = writer.lock();
        })
        .expect("a panic");
        assert!(
            msg.contains("\"store writer\"") && msg.contains("\"store blobs\""),
            "{msg}"
        );
        // The panic released what it held (`blobs` itself is poisoned now): the order holds
        // again.
        let (w2, b2) = (
            OrderedMutex::new(STORE_WRITER, ()),
            OrderedMutex::new(STORE_BLOBS, ()),
        );
        drop((w2.lock(), b2.lock()));
    }

    /// Two leaves, or the same lock twice (with one mutex for the whole table, the easiest
    /// deadlock to write): a panic, not a hang.
    #[test]
    fn a_lock_of_the_same_rank_or_itself_panics() {
        let fds = OrderedMutex::new(STORE_FDS, ());
        let opens = OrderedMutex::new(STORE_OPENS, ());
        assert!(
            caught(|| {
                let _f = fds.lock();
                let _o = opens.lock();
            })
            .is_some()
        );
        let table = OrderedMutex::new(FETCH_TABLE, ());
        assert!(
            caught(|| {
                let _a = table.lock();
                let _b = table.lock();
            })
            .is_some()
        );
    }
}
