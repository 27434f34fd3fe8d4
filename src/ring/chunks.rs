//! A list kept in fixed blocks, for the data ring's lists of a burst.

use super::REAP_BATCH;

/// Entries per block of a [`Chunks`] (a divisor of [`REAP_BATCH`]).
pub(super) const CHUNK: usize = 512;
const _: () = assert!(REAP_BATCH.is_multiple_of(CHUNK));

/// A list in blocks of [`CHUNK`] entries, never one big block: a burst
/// (a send in flight to each of 10,000 connections) takes many
/// medium-sized blocks, all given back when it is over, where a `Vec`
/// grown by doubling takes blocks of 100-200 KB that the allocator puts in
/// a page beside long-lived blocks of that size (the registry, a topic's
/// subscribers), so that page stays committed after the burst (~30 bytes
/// per idle connection, measured). Every block but the last is full, and
/// none is empty, so entry `i` is at `i / CHUNK, i % CHUNK` and the list
/// is empty when it has no block.
pub(super) struct Chunks<T>(Vec<Vec<T>>);

impl<T> Default for Chunks<T> {
    fn default() -> Self {
        Chunks(Vec::new())
    }
}

impl<T> Chunks<T> {
    pub(super) fn len(&self) -> usize {
        self.0
            .last()
            .map_or(0, |last| (self.0.len() - 1) * CHUNK + last.len())
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(super) fn push(&mut self, value: T) {
        match self.0.last_mut() {
            Some(last) if last.len() < CHUNK => last.push(value),
            _ => {
                let mut block = Vec::with_capacity(CHUNK);
                block.push(value);
                self.0.push(block);
            }
        }
    }

    pub(super) fn get(&self, i: usize) -> Option<&T> {
        self.0.get(i / CHUNK)?.get(i % CHUNK)
    }

    pub(super) fn get_mut(&mut self, i: usize) -> Option<&mut T> {
        self.0.get_mut(i / CHUNK)?.get_mut(i % CHUNK)
    }

    /// Takes the first block away (the oldest entries, at most [`CHUNK`]);
    /// the others move up, so entry numbers no longer hold (for a queue).
    pub(super) fn take_front(&mut self) -> Option<Vec<T>> {
        (!self.0.is_empty()).then(|| self.0.remove(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Entries keep their numbers across blocks; the front block comes
    /// away whole, oldest first.
    #[test]
    fn chunks_index_across_blocks_and_hand_out_the_oldest_first() {
        let mut c = Chunks::default();
        assert_eq!((c.len(), c.get(0).is_none()), (0, true));
        let n = 2 * CHUNK + 7;
        for i in 0..n {
            c.push(i);
        }
        assert_eq!(c.len(), n);
        for i in [0, CHUNK - 1, CHUNK, 2 * CHUNK, n - 1] {
            assert_eq!(c.get(i), Some(&i));
        }
        assert!(c.get(n).is_none());
        *c.get_mut(CHUNK + 1).unwrap() = 99;
        assert_eq!(c.get(CHUNK + 1), Some(&99));
        let first = c.take_front().unwrap();
        assert_eq!(
            (first.len(), first[0], first[CHUNK - 1]),
            (CHUNK, 0, CHUNK - 1)
        );
        assert_eq!(c.take_front().unwrap()[0], CHUNK);
        assert_eq!(c.take_front().unwrap(), (2 * CHUNK..n).collect::<Vec<_>>());
        assert!(c.take_front().is_none());
        assert_eq!((c.len(), c.is_empty()), (0, true));
    }
}
