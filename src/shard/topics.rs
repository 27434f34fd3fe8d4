//! The shard's topic index: every topic with a live or pending local
//! subscription, and its subscribers. The entry's life is the topic's
//! announcement to the broker ([`crate::bus::Interest`]): the `sub` that
//! creates it announces the topic, and the shard withdraws it
//! ([`crate::broker::Broker::withdraw`]) when the entry goes.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use super::conn::Conn;
use super::queue::Tag;
use super::Shard;
use crate::topic::TopicName;

impl Shard {
    /// Records a `sub` about to go to the broker. Returns whether the
    /// topic is new to this shard: then the `sub` announces it, so the
    /// broker delivers it here from the subscription's position on.
    pub(crate) fn add_pending(&self, conn: &Conn, topic: &TopicName) -> bool {
        let mut topics = self.topics.borrow_mut();
        let mut new = false;
        let (shared, local) = entry(&mut topics, topic, || {
            new = true;
            let policy = self
                .namespaces
                .of(topic.as_str())
                .map(|n| n.slow_consumer)
                .unwrap_or_default();
            Local {
                tag: Tag::new(topic, policy),
                ..Local::default()
            }
        });
        local.pending += 1;
        drop(topics);
        conn.add_pending(shared);
        self.sync_gauges();
        new
    }

    /// `topic` left the index: the broker stops delivering it here.
    fn withdraw(&self, topic: &TopicName) {
        self.broker.withdraw(topic.clone(), self.id);
    }

    /// A pending `sub` ended without becoming live.
    pub(super) fn end_pending(&self, topic: &TopicName) {
        if release_pending(&mut self.topics.borrow_mut(), topic) {
            self.withdraw(topic);
        }
        self.sync_gauges();
    }

    /// Unsubscribes one connection from one topic or pattern; false if it
    /// was not subscribed.
    pub(crate) fn unsubscribe(&self, conn: &Rc<Conn>, topic: &TopicName) -> bool {
        if topic.is_pattern() {
            let slot = conn.take_live(topic);
            if let Some(slot) = slot {
                self.detach_pattern(topic, slot);
            }
            return slot.is_some();
        }
        let Some(slot) = conn.take_live(topic) else {
            let pending = conn.take_pending(topic);
            if pending {
                self.end_pending(topic);
            }
            return pending;
        };
        let user = self.presence_user(conn, topic);
        let mut topics = self.topics.borrow_mut();
        self.count_out(&mut topics, topic, user);
        let left = detach(&mut topics, topic, slot);
        drop(topics);
        if left {
            self.withdraw(topic);
        }
        self.sync_gauges();
        self.metrics
            .subscriptions_active
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        true
    }

    /// Forgets a finished connection: registry, topic index, counters.
    pub(crate) fn remove(&self, conn: &Rc<Conn>) {
        use std::sync::atomic::Ordering::Relaxed;
        self.conns.borrow_mut().remove(&conn.id);
        self.refusing.borrow_mut().forget(conn.id);
        let subs = conn.take_all();
        let mut topics = self.topics.borrow_mut();
        let mut live = 0;
        let mut gone = Vec::new();
        for sub in &subs {
            if sub.topic.is_pattern() {
                // Counted off by `detach_pattern` itself.
                self.detach_pattern(&sub.topic, sub.slot());
                continue;
            }
            let left = if sub.is_live() {
                live += 1;
                let user = self.presence_user(conn, &sub.topic);
                self.count_out(&mut topics, &sub.topic, user);
                detach(&mut topics, &sub.topic, sub.slot())
            } else {
                release_pending(&mut topics, &sub.topic)
            };
            if left {
                gone.push(&sub.topic);
            }
        }
        drop(topics);
        for topic in gone {
            self.withdraw(topic);
        }
        self.sync_gauges();
        self.metrics.subscriptions_active.fetch_sub(live, Relaxed);
    }

    /// The user a subscription of `conn` to `topic` counts for in
    /// presence: a token's user, on a topic of a presence namespace
    /// (anonymous connections are neither listed nor announced).
    pub(super) fn presence_user(&self, conn: &Conn, topic: &TopicName) -> Option<Arc<str>> {
        self.presence.as_ref()?;
        if !self.namespaces.of(topic.as_str())?.presence {
            return None;
        }
        conn.read_identity(|identity| {
            let identity = identity?;
            (!identity.is_guest() && !identity.user.is_empty()).then(|| Arc::from(&*identity.user))
        })
    }

    /// A live subscription of `user` to `topic` began: the shard's first
    /// one of that user is news for the node.
    pub(super) fn count_in(&self, local: &mut Local, topic: &TopicName, user: Option<Arc<str>>) {
        let (Some(user), Some(presence)) = (user, &self.presence) else {
            return;
        };
        let n = local
            .users
            .get_or_insert_with(Box::default)
            .entry(user.clone())
            .or_insert(0);
        *n += 1;
        if *n == 1 {
            presence.join(topic.clone(), user);
        }
    }

    /// A live subscription of `user` to `topic` ended: the shard's last
    /// one of that user is news for the node.
    fn count_out(
        &self,
        topics: &mut HashMap<TopicName, Local>,
        topic: &TopicName,
        user: Option<Arc<str>>,
    ) {
        let (Some(user), Some(presence)) = (user, &self.presence) else {
            return;
        };
        let Some(users) = topics.get_mut(topic).and_then(|l| l.users.as_mut()) else {
            return;
        };
        let Some(n) = users.get_mut(&user) else {
            return;
        };
        *n -= 1;
        if *n == 0 {
            users.remove(&user);
            presence.leave(topic.clone(), user);
        }
    }

    /// Publishes the sizes of the registry and the topic index as gauges,
    /// after every change to either: what `/metrics` shows is the maps
    /// themselves, not a count kept beside them that could drift.
    pub(super) fn sync_gauges(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let conns = self.conns.borrow().len() as i64;
        let topics = self.topics.borrow().len() as i64;
        // With one shard every message goes to it: nothing is announced.
        let announced = if self.config.shards > 1 { topics } else { 0 };
        self.metrics.registry_connections.store(conns, Relaxed);
        self.metrics.topic_index_entries.store(topics, Relaxed);
        self.metrics.topics_announced.store(announced, Relaxed);
    }
}

/// One topic of a shard's index: the live subscribers (a connection's
/// `Sub::slot` is its index in `live`) and the `sub`s for it still waiting
/// on the broker. The entry lives while either is non-zero, and exactly
/// that long the topic is announced in [`crate::bus::Interest`].
#[derive(Debug, Default)]
pub(crate) struct Local {
    pub(super) live: Vec<Rc<Conn>>,
    pub(super) pending: u32,
    /// The namespace's `slow_consumer` policy for this topic's messages
    /// (`None`: `close`), shared by every queue that holds one.
    pub(super) tag: Option<Rc<Tag>>,
    /// Presence topics: live subscriptions per user (boxed: most topics
    /// have no presence and pay one pointer, not a map's 48 bytes).
    #[allow(clippy::box_collection)]
    pub(super) users: Option<Box<HashMap<Arc<str>, u32>>>,
}

impl Local {
    fn is_empty(&self) -> bool {
        self.live.is_empty() && self.pending == 0
    }
}

/// `topic`'s entry, made by `make` when new, and the index's copy of its
/// name: a connection keeps that one, not the one its `sub` was parsed
/// into (one name per topic, not per subscriber).
pub(super) fn entry<'a>(
    topics: &'a mut HashMap<TopicName, Local>,
    topic: &TopicName,
    make: impl FnOnce() -> Local,
) -> (TopicName, &'a mut Local) {
    match topics.entry(topic.clone()) {
        Entry::Occupied(e) => (e.key().clone(), e.into_mut()),
        Entry::Vacant(e) => (topic.clone(), e.insert(make())),
    }
}

/// Removes the subscriber at `slot` of `topic`'s list, and the topic once
/// it has none, live or pending; true when the topic left the index. O(1):
/// the last subscriber takes the slot and is told so.
pub(super) fn detach(topics: &mut HashMap<TopicName, Local>, topic: &TopicName, slot: u32) -> bool {
    let Some(local) = topics.get_mut(topic) else {
        return false;
    };
    let slot = slot as usize;
    if slot < local.live.len() {
        local.live.swap_remove(slot);
        if let Some(moved) = local.live.get(slot) {
            moved.move_slot(topic, slot as u32);
        }
    }
    forget_if_empty(topics, topic)
}

/// Counts one pending `sub` of `topic` as over; true when the topic left the index.
pub(super) fn release_pending(topics: &mut HashMap<TopicName, Local>, topic: &TopicName) -> bool {
    if let Some(local) = topics.get_mut(topic) {
        local.pending = local.pending.saturating_sub(1);
    }
    forget_if_empty(topics, topic)
}

pub(super) fn forget_if_empty(topics: &mut HashMap<TopicName, Local>, topic: &TopicName) -> bool {
    let empty = topics.get(topic).is_some_and(Local::is_empty);
    if empty {
        topics.remove(topic);
    }
    empty
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(id: u64) -> Rc<Conn> {
        Rc::new(Conn::detached(id, 0))
    }

    fn attach(topics: &mut HashMap<TopicName, Local>, topic: &TopicName, c: &Rc<Conn>) {
        let local = topics.entry(topic.clone()).or_default();
        c.add_live(topic.clone(), local.live.len() as u32);
        local.live.push(c.clone());
    }

    /// Every subscriber of a topic keeps the index's copy of its name:
    /// two `sub`s parsed into two names end up holding one.
    #[test]
    fn subscribers_share_the_index_copy_of_the_name() {
        let mut topics = HashMap::new();
        let first = TopicName::new("ns:t").unwrap();
        let again = TopicName::new("ns:t").unwrap();
        assert_ne!(first.as_str().as_ptr(), again.as_str().as_ptr());
        let (a, _) = entry(&mut topics, &first, Local::default);
        let (b, local) = entry(&mut topics, &again, || unreachable!("made twice"));
        local.pending += 1;
        assert_eq!(a.as_str().as_ptr(), b.as_str().as_ptr());
        assert_eq!(b.as_str().as_ptr(), first.as_str().as_ptr());
        assert_eq!(topics[&again].pending, 1);
    }

    #[test]
    fn a_topic_stays_indexed_while_it_has_a_live_or_pending_subscription() {
        let t = TopicName::new("t").unwrap();
        let c = conn(1);
        let mut topics: HashMap<TopicName, Local> = HashMap::new();
        topics.entry(t.clone()).or_default().pending = 2;
        attach(&mut topics, &t, &c);
        assert!(
            !release_pending(&mut topics, &t),
            "one pending and one live left"
        );
        assert!(!detach(&mut topics, &t, 0), "one pending left");
        assert!(topics.contains_key(&t));
        assert!(release_pending(&mut topics, &t), "the last one");
        assert!(topics.is_empty());
        // Releasing what is not there changes nothing.
        assert!(!release_pending(&mut topics, &t));
        assert!(!detach(&mut topics, &t, 0));
        assert!(topics.is_empty());
    }

    #[test]
    fn detaching_in_any_order_keeps_every_slot_true() {
        let (a, b) = (TopicName::new("a").unwrap(), TopicName::new("b").unwrap());
        let conns: Vec<Rc<Conn>> = (0..50).map(conn).collect();
        let mut topics = HashMap::new();
        for c in &conns {
            attach(&mut topics, &a, c);
            if c.id.0 % 3 == 0 {
                attach(&mut topics, &b, c);
            }
        }
        let mut order: Vec<usize> = (0..conns.len()).collect();
        fastrand::Rng::with_seed(7).shuffle(&mut order);
        for (n, &i) in order.iter().enumerate() {
            for sub in conns[i].take_all().iter().filter(|s| s.is_live()) {
                detach(&mut topics, &sub.topic, sub.slot());
            }
            let left: Vec<&Rc<Conn>> = order[n + 1..].iter().map(|&k| &conns[k]).collect();
            let list = topics.get(&a).map_or(&[][..], |l| &l.live[..]);
            assert_eq!(list.len(), left.len());
            for (slot, c) in list.iter().enumerate() {
                assert!(
                    left.iter().any(|l| Rc::ptr_eq(l, c)),
                    "a gone conn is still listed"
                );
                assert_eq!(c.take_live(&a), Some(slot as u32));
                c.add_live(a.clone(), slot as u32);
            }
        }
        assert!(topics.is_empty(), "{:?}", topics.keys().collect::<Vec<_>>());
    }
}
