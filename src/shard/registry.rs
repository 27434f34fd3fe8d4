//! The shard's connections by id. A set of the connection records
//! themselves, looked up by the id each one carries: a table slot is one
//! pointer (8 bytes), where a map from id to record took the id again
//! beside it (16). At 10,000 connections the table is 16,384 slots.

use std::borrow::Borrow;
use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::rc::Rc;

use super::conn::Conn;
use crate::id::ConnId;

/// Every connection of one shard, by [`ConnId`].
#[derive(Debug, Default)]
pub(crate) struct Registry(HashSet<ById>);

/// A connection keyed by its id: hashed and compared as the id alone, so
/// the set can be asked for a `&ConnId`.
#[derive(Debug)]
struct ById(Rc<Conn>);

impl Borrow<ConnId> for ById {
    fn borrow(&self) -> &ConnId {
        &self.0.id
    }
}

impl Hash for ById {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.id.hash(state);
    }
}

impl PartialEq for ById {
    fn eq(&self, other: &Self) -> bool {
        self.0.id == other.0.id
    }
}

impl Eq for ById {}

impl Registry {
    /// Adds `conn` (a connection of the same id is replaced).
    pub(crate) fn insert(&mut self, conn: Rc<Conn>) {
        self.0.replace(ById(conn));
    }

    pub(crate) fn get(&self, id: &ConnId) -> Option<&Rc<Conn>> {
        self.0.get(id).map(|c| &c.0)
    }

    pub(crate) fn contains_key(&self, id: &ConnId) -> bool {
        self.0.contains(id)
    }

    pub(crate) fn remove(&mut self, id: &ConnId) -> Option<Rc<Conn>> {
        self.0.take(id).map(|c| c.0)
    }

    /// The connections, in no particular order.
    pub(crate) fn values(&self) -> impl Iterator<Item = &Rc<Conn>> {
        self.0.iter().map(|c| &c.0)
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(id: u64) -> Rc<Conn> {
        Rc::new(Conn::detached(id, 0))
    }

    #[test]
    fn connections_are_found_by_their_id_and_the_table_holds_pointers() {
        assert_eq!(std::mem::size_of::<ById>(), 8);
        let mut r = Registry::default();
        let (a, b) = (conn(1), conn(2));
        r.insert(a.clone());
        r.insert(b.clone());
        assert_eq!(r.len(), 2);
        assert!(Rc::ptr_eq(r.get(&ConnId(1)).unwrap(), &a));
        assert!(r.contains_key(&ConnId(2)) && !r.contains_key(&ConnId(3)));
        let mut ids: Vec<u64> = r.values().map(|c| c.id.0).collect();
        ids.sort_unstable();
        assert_eq!(ids, [1, 2]);
        // The same id again replaces the record.
        let a2 = conn(1);
        r.insert(a2.clone());
        assert_eq!(r.len(), 2);
        assert!(Rc::ptr_eq(r.get(&ConnId(1)).unwrap(), &a2));
        assert!(Rc::ptr_eq(&r.remove(&ConnId(1)).unwrap(), &a2));
        assert!(r.remove(&ConnId(1)).is_none());
        assert!(r.get(&ConnId(1)).is_none());
        r.remove(&ConnId(2));
        assert!(r.is_empty());
    }
}
