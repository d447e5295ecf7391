//! Which deliveries may start, and together: the pure core of the consumer, tested
//! without a broker.

use std::collections::{HashMap, VecDeque};

/// What a task tells the dispatcher when it ends.
#[derive(Debug, PartialEq)]
pub(super) struct Done {
    /// Streams free for their next message.
    pub(super) keys: Vec<String>,
    pub(super) task: Task,
}

/// The kind of task that ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Task {
    /// A batch, whose slot is free now; `handed_off` of its messages went on to retry
    /// tasks of their own, which keep their streams busy.
    Batch { handed_off: usize },
    /// A retry task: one message tried again outside any batch.
    Retry,
}

/// Tells the dispatcher a task ended, even if it panicked.
pub(super) struct DoneGuard {
    pub(super) done: Option<Done>,
    pub(super) sender: tokio::sync::mpsc::UnboundedSender<Done>,
}

impl DoneGuard {
    pub(super) fn new(
        keys: Vec<String>,
        task: Task,
        sender: tokio::sync::mpsc::UnboundedSender<Done>,
    ) -> Self {
        let done = Done { keys, task };
        DoneGuard {
            done: Some(done),
            sender,
        }
    }

    /// `key` stays busy after this task: a retry task took it over.
    pub(super) fn hand_off(&mut self, key: &str) {
        if let Some(done) = self.done.as_mut()
            && let Some(index) = done.keys.iter().position(|held| held == key)
        {
            done.keys.swap_remove(index);
            if let Task::Batch { handed_off } = &mut done.task {
                *handed_off += 1;
            }
        }
    }
}

impl Drop for DoneGuard {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            let _ = self.sender.send(done);
        }
    }
}

/// Decides which deliveries may start, and together: one at a time per key, each key's
/// deliveries in arrival order, at most `concurrency` batches at once, each of at most
/// `batch_size` deliveries with different keys. Generic so it can be tested without a
/// broker.
pub(super) struct Dispatcher<T> {
    concurrency: usize,
    batch_size: usize,
    /// Batches being handled.
    running: usize,
    /// Messages being retried outside any batch.
    retrying: usize,
    /// Keys with a delivery being handled or ready, and what waits behind it.
    busy: HashMap<String, VecDeque<T>>,
    /// Deliveries free to start once a slot frees up, oldest first; no key twice.
    ready: VecDeque<(String, T)>,
}

impl<T> Dispatcher<T> {
    pub(super) fn new(concurrency: usize, batch_size: usize) -> Self {
        Dispatcher {
            concurrency: concurrency.max(1),
            batch_size: batch_size.max(1),
            running: 0,
            retrying: 0,
            busy: HashMap::new(),
            ready: VecDeque::new(),
        }
    }

    /// Tasks still running: batches and retries.
    pub(super) fn in_flight(&self) -> usize {
        self.running + self.retrying
    }

    /// A delivery arrived; [`startable`](Self::startable) says whether it may start.
    pub(super) fn arrived(&mut self, key: String, item: T) {
        match self.busy.get_mut(&key) {
            Some(waiting) => waiting.push_back(item),
            None => {
                self.busy.insert(key.clone(), VecDeque::new());
                self.ready.push_back((key, item));
            }
        }
    }

    /// A task ended: its keys' next deliveries become ready, and a batch frees its
    /// slot.
    pub(super) fn finished(&mut self, done: Done) {
        match done.task {
            Task::Batch { handed_off } => {
                self.running -= 1;
                self.retrying += handed_off;
            }
            Task::Retry => self.retrying -= 1,
        }
        for key in done.keys {
            match self.busy.get_mut(&key).and_then(VecDeque::pop_front) {
                Some(next) => self.ready.push_back((key, next)),
                None => {
                    self.busy.remove(&key);
                }
            }
        }
    }

    /// The batches that may start now, taking ready deliveries oldest first.
    pub(super) fn startable(&mut self) -> Vec<Vec<(String, T)>> {
        let mut start = Vec::new();
        while self.running < self.concurrency && !self.ready.is_empty() {
            let size = self.batch_size.min(self.ready.len());
            start.push(self.ready.drain(..size).collect());
            self.running += 1;
        }
        start
    }
}

#[cfg(test)]
mod tests {
    use super::{Dispatcher, Done, Task};

    fn items(batches: Vec<Vec<(String, u32)>>) -> Vec<Vec<u32>> {
        batches
            .into_iter()
            .map(|batch| batch.into_iter().map(|(_, item)| item).collect())
            .collect()
    }

    /// A batch of these keys ended, handing `handed_off` of them to retry tasks.
    fn batch(names: &[&str], handed_off: usize) -> Done {
        Done {
            keys: names.iter().map(|name| (*name).to_owned()).collect(),
            task: Task::Batch { handed_off },
        }
    }

    fn retry(name: &str) -> Done {
        Done {
            keys: vec![name.to_owned()],
            task: Task::Retry,
        }
    }

    #[test]
    fn one_key_runs_one_at_a_time_in_arrival_order() {
        let mut dispatcher = Dispatcher::new(8, 1);
        dispatcher.arrived("a".into(), 1);
        assert_eq!(items(dispatcher.startable()), vec![vec![1]]);
        dispatcher.arrived("a".into(), 2);
        dispatcher.arrived("a".into(), 3);
        assert!(dispatcher.startable().is_empty(), "a is busy");
        dispatcher.arrived("b".into(), 9);
        assert_eq!(items(dispatcher.startable()), vec![vec![9]]);
        dispatcher.finished(batch(&["a"], 0));
        assert_eq!(items(dispatcher.startable()), vec![vec![2]]);
        dispatcher.finished(batch(&["a"], 0));
        assert_eq!(items(dispatcher.startable()), vec![vec![3]]);
        dispatcher.finished(batch(&["a"], 0));
        assert!(dispatcher.startable().is_empty());
        assert_eq!(dispatcher.in_flight(), 1);
        // The key is free again.
        dispatcher.arrived("a".into(), 4);
        assert_eq!(items(dispatcher.startable()), vec![vec![4]]);
    }

    #[test]
    fn concurrency_caps_running_batches_and_frees_in_arrival_order() {
        let mut dispatcher = Dispatcher::new(2, 1);
        dispatcher.arrived("a".into(), 1);
        dispatcher.arrived("b".into(), 2);
        assert_eq!(items(dispatcher.startable()), vec![vec![1], vec![2]]);
        dispatcher.arrived("c".into(), 3);
        dispatcher.arrived("a".into(), 4);
        assert!(dispatcher.startable().is_empty());
        // "c" arrived before a's second delivery became ready.
        dispatcher.finished(batch(&["a"], 0));
        assert_eq!(items(dispatcher.startable()), vec![vec![3]]);
        dispatcher.finished(batch(&["b"], 0));
        assert_eq!(items(dispatcher.startable()), vec![vec![4]]);
        assert_eq!(dispatcher.in_flight(), 2);
    }

    #[test]
    fn what_waits_for_a_slot_goes_together_with_one_delivery_per_key() {
        let mut dispatcher = Dispatcher::new(1, 3);
        dispatcher.arrived("a".into(), 1);
        assert_eq!(items(dispatcher.startable()), vec![vec![1]]);
        for (key, item) in [("a", 2), ("b", 3), ("a", 4), ("c", 5), ("d", 6), ("e", 7)] {
            dispatcher.arrived(key.into(), item);
        }
        assert!(dispatcher.startable().is_empty(), "the one slot is busy");
        dispatcher.finished(batch(&["a"], 0));
        // a's second delivery became ready after b..e: b, c, d go first, at most 3.
        assert_eq!(items(dispatcher.startable()), vec![vec![3, 5, 6]]);
        dispatcher.finished(batch(&["b", "c", "d"], 0));
        assert_eq!(items(dispatcher.startable()), vec![vec![7, 2]]);
        dispatcher.finished(batch(&["e", "a"], 0));
        assert_eq!(items(dispatcher.startable()), vec![vec![4]]);
    }

    #[test]
    fn a_retried_message_frees_its_batch_slot_but_not_its_stream() {
        let mut dispatcher = Dispatcher::new(1, 4);
        dispatcher.arrived("a".into(), 1);
        dispatcher.arrived("b".into(), 2);
        assert_eq!(items(dispatcher.startable()), vec![vec![1, 2]]);
        dispatcher.arrived("a".into(), 3);
        dispatcher.arrived("c".into(), 4);
        // The batch failed for a; b was applied. a is retried on its own.
        dispatcher.finished(batch(&["b"], 1));
        assert_eq!(dispatcher.in_flight(), 1, "the retry");
        assert_eq!(
            items(dispatcher.startable()),
            vec![vec![4]],
            "a waits for its retry"
        );
        dispatcher.finished(batch(&["c"], 0));
        dispatcher.finished(retry("a"));
        assert_eq!(dispatcher.in_flight(), 0);
        assert_eq!(items(dispatcher.startable()), vec![vec![3]]);
    }
}
