//! Tasks of one executor waiting for a condition that another task of it makes true
//! (the feed's published LSN moving, the followers confirming an LSN). Each waiting
//! future holds one slot and gives it back when it is dropped, so a wait that times
//! out, or whose task is cancelled, leaves nothing behind.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// Wakers of waiting futures, by slot.
#[derive(Default)]
pub struct WaitList {
    slots: RefCell<Vec<Option<Option<Waker>>>>,
}

impl WaitList {
    /// Waits until `ready()` holds; it is checked at the first poll and after each
    /// [`WaitList::wake_all`].
    pub fn wait_until<F: Fn() -> bool + Unpin>(&self, ready: F) -> Wait<'_, F> {
        Wait {
            list: self,
            ready,
            slot: None,
        }
    }

    /// Wakes every waiting future (each checks its condition again).
    pub fn wake_all(&self) {
        let wakers: Vec<Waker> = self
            .slots
            .borrow_mut()
            .iter_mut()
            .filter_map(|slot| slot.as_mut().and_then(Option::take))
            .collect();
        for waker in wakers {
            waker.wake();
        }
    }

    /// Futures waiting now (tests).
    pub fn waiting(&self) -> usize {
        self.slots.borrow().iter().filter(|s| s.is_some()).count()
    }

    fn register(&self, slot: &mut Option<usize>, waker: &Waker) {
        let mut slots = self.slots.borrow_mut();
        let index = *slot.get_or_insert_with(|| match slots.iter().position(Option::is_none) {
            Some(free) => free,
            None => {
                slots.push(None);
                slots.len() - 1
            }
        });
        slots[index] = Some(Some(waker.clone()));
    }

    fn release(&self, slot: &mut Option<usize>) {
        if let Some(index) = slot.take() {
            if let Some(entry) = self.slots.borrow_mut().get_mut(index) {
                *entry = None;
            }
        }
    }
}

/// A wait on a [`WaitList`] (see [`WaitList::wait_until`]).
pub struct Wait<'a, F: Fn() -> bool + Unpin> {
    list: &'a WaitList,
    ready: F,
    slot: Option<usize>,
}

impl<F: Fn() -> bool + Unpin> Future for Wait<'_, F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if (this.ready)() {
            this.list.release(&mut this.slot);
            return Poll::Ready(());
        }
        this.list.register(&mut this.slot, cx.waker());
        Poll::Pending
    }
}

impl<F: Fn() -> bool + Unpin> Drop for Wait<'_, F> {
    fn drop(&mut self) {
        self.list.release(&mut self.slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn a_dropped_wait_gives_its_slot_back_and_a_woken_one_sees_the_condition() {
        let list = WaitList::default();
        let flag = Cell::new(false);
        futures_lite::future::block_on(async {
            // A wait that is abandoned (a timeout) leaves nothing behind.
            for _ in 0..100 {
                let wait = list.wait_until(|| flag.get());
                let polled = futures_lite::future::poll_once(wait).await;
                assert!(polled.is_none());
            }
            assert_eq!(list.waiting(), 0);
            let wait = list.wait_until(|| flag.get());
            futures_lite::pin!(wait);
            assert!(futures_lite::future::poll_once(&mut wait).await.is_none());
            assert_eq!(list.waiting(), 1);
            flag.set(true);
            list.wake_all();
            assert!(futures_lite::future::poll_once(&mut wait).await.is_some());
            assert_eq!(list.waiting(), 0);
        });
    }
}
