//! The project's one policy for poisoned locks: recover.
//!
//! A lock is poisoned when a thread panicked while holding it. In this runtime such a panic is
//! caught where it happens (a compute worker's panic becomes that call's `Internal` error and
//! the caller fails over), and the data under every std lock here (maps, counters, handles,
//! settings) is valid between statements, so the next user takes it as it is. Panicking in
//! turn would take a whole node down for one failed call.

use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Locking that recovers from poison.
pub trait LockExt<T: ?Sized> {
    /// The guard, whether or not a panic poisoned the lock.
    fn lock_or_recover(&self) -> MutexGuard<'_, T>;
}

impl<T: ?Sized> LockExt<T> for Mutex<T> {
    fn lock_or_recover(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Reading and writing that recover from poison.
pub trait RwLockExt<T: ?Sized> {
    /// A read guard, whether or not a panic poisoned the lock.
    fn read_or_recover(&self) -> RwLockReadGuard<'_, T>;
    /// A write guard, whether or not a panic poisoned the lock.
    fn write_or_recover(&self) -> RwLockWriteGuard<'_, T>;
}

impl<T: ?Sized> RwLockExt<T> for RwLock<T> {
    fn read_or_recover(&self) -> RwLockReadGuard<'_, T> {
        self.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_or_recover(&self) -> RwLockWriteGuard<'_, T> {
        self.write().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_poisoned_by_a_panic_is_taken_as_it_is() {
        let counter = std::sync::Arc::new(Mutex::new(1));
        let held = counter.clone();
        let panicked = std::thread::spawn(move || {
            let mut n = held.lock().unwrap();
            *n += 1;
            panic!("a worker fails while holding the lock");
        })
        .join();
        assert!(panicked.is_err() && counter.is_poisoned());
        assert_eq!(*counter.lock_or_recover(), 2);
        let shared = std::sync::Arc::new(RwLock::new(vec![1]));
        let held = shared.clone();
        let _ = std::thread::spawn(move || {
            let _guard = held.write().unwrap();
            panic!("poisons the lock");
        })
        .join();
        shared.write_or_recover().push(2);
        assert_eq!(*shared.read_or_recover(), [1, 2]);
    }
}
