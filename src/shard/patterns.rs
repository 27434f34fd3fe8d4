//! The shard's wildcard subscriptions: a segment trie of the distinct
//! patterns its connections hold (`user.42.*`, `chat:#`), and their
//! subscribers.
//!
//! Matching a message costs one walk down the trie: at each segment of the
//! topic, one hash lookup of the literal child and one step into the `*`
//! child, and a `#` node matches whatever is left. So a message costs a
//! lookup per distinct pattern prefix it can still match, not a test of
//! every pattern; patterns held by many connections are one entry.
//!
//! A pattern never crosses namespaces: the first level is the pattern's
//! namespace (the part before its first `:`, literal by construction, see
//! [`TopicName::filter`]), and a topic only walks its own. `chat:*`
//! matches `chat:42`, and `#` (the default namespace) matches `news` but
//! never `chat:42`. Within a namespace, `.` and `:` both separate segments,
//! as in the claims' grammar.
//!
//! The subscribers of each pattern live in the shard's pattern index, a
//! map like the topic index (same `Local`, same O(1) leave by slot): the
//! trie holds each distinct pattern once, and the walk yields its name.
//!
//! [`TopicName::filter`]: crate::topic::TopicName::filter

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;

use super::conn::Conn;
use super::topics::{detach, Local};
use super::Shard;
use crate::topic::TopicName;

/// A shard's wildcard subscriptions: the distinct patterns as a trie, and
/// each pattern's live subscribers (a connection's `Sub::slot` is its
/// index in the list, as in the topic index). A pattern is never pending:
/// its `sub` is answered by the shard, with no broker round trip.
#[derive(Debug, Default)]
pub(crate) struct Wildcards {
    pub(super) trie: PatternTrie,
    pub(super) subs: HashMap<TopicName, Local>,
    /// The recipients of the message being delivered, kept between
    /// messages so a delivery allocates nothing.
    scratch: Vec<Rc<Conn>>,
}

impl Shard {
    /// Subscribes `conn` to `pattern` (checked by the caller). The shard's
    /// first pattern asks the broker side for every topic, before the
    /// caller answers `ok`.
    pub(super) fn add_pattern(&self, conn: &Rc<Conn>, pattern: &TopicName) {
        let mut wild = self.wild.borrow_mut();
        let first = wild.trie.is_empty();
        wild.trie.insert(pattern);
        let (shared, local) = super::topics::entry(&mut wild.subs, pattern, Local::default);
        conn.add_live(shared, local.live.len() as u32);
        local.live.push(conn.clone());
        drop(wild);
        if first {
            self.broker.want_every_topic(self.id, true);
        }
        self.metrics.subscriptions_active.fetch_add(1, Relaxed);
        self.metrics
            .wildcard_subscriptions_active
            .fetch_add(1, Relaxed);
    }

    /// Takes `conn` off `pattern`'s list at `slot`; the pattern leaves the
    /// trie with its last subscriber, and the broker side stops sending
    /// every topic with the shard's last pattern.
    pub(super) fn detach_pattern(&self, pattern: &TopicName, slot: u32) {
        let mut wild = self.wild.borrow_mut();
        if detach(&mut wild.subs, pattern, slot) {
            wild.trie.remove(pattern);
            if wild.trie.is_empty() {
                self.broker.want_every_topic(self.id, false);
            }
        }
        drop(wild);
        self.metrics.subscriptions_active.fetch_sub(1, Relaxed);
        self.metrics
            .wildcard_subscriptions_active
            .fetch_sub(1, Relaxed);
    }

    /// Every connection that gets a message of `topic` on this shard: the
    /// topic's own subscribers and those of every pattern it matches, each
    /// once. Only called when the shard holds patterns; a shard without
    /// any never pays for them.
    pub(super) fn recipients(&self, topic: &TopicName, out: &mut Vec<Rc<Conn>>) {
        let stamp = self.stamp.get() + 1;
        self.stamp.set(stamp);
        let mut take = |conn: &Rc<Conn>| {
            if conn.seen.replace(stamp) != stamp {
                out.push(conn.clone());
            }
        };
        if let Some(local) = self.topics.borrow().get(topic) {
            local.live.iter().for_each(&mut take);
        }
        let wild = self.wild.borrow();
        wild.trie.for_each_match(topic.as_str(), |pattern| {
            if let Some(local) = wild.subs.get(pattern) {
                local.live.iter().for_each(&mut take);
            }
        });
    }

    /// Delivers `frame` of `topic` to [`Shard::recipients`]; whether
    /// there were any.
    pub(super) fn deliver_wild(
        &self,
        topic: &TopicName,
        id: crate::id::MsgId,
        frame: &bytes::Bytes,
    ) -> bool {
        let mut conns = std::mem::take(&mut self.wild.borrow_mut().scratch);
        self.recipients(topic, &mut conns);
        let any = !conns.is_empty();
        if any {
            // The topic's policy: its index entry's tag when it has one
            // here, else one made for this message (a topic only patterns
            // match); queues compare tags by topic, so both conflate alike.
            let tag = match self.topics.borrow().get(topic) {
                Some(local) => local.tag.clone(),
                None => {
                    let policy = self
                        .namespaces
                        .of(topic.as_str())
                        .map(|n| n.slow_consumer)
                        .unwrap_or_default();
                    super::queue::Tag::new(topic, policy)
                }
            };
            self.deliver_to(conns.iter(), frame, (tag.as_ref(), id));
        }
        conns.clear();
        self.wild.borrow_mut().scratch = conns;
        any
    }

    /// Every connection holding a pattern (a Redis partition gap may have
    /// cost any of them a message).
    pub(super) fn pattern_holders(&self) -> Vec<Rc<Conn>> {
        let wild = self.wild.borrow();
        let mut all: Vec<Rc<Conn>> = Vec::new();
        for local in wild.subs.values() {
            all.extend(local.live.iter().cloned());
        }
        all
    }
}

/// Distinct patterns, by namespace, as segment tries. Public (hidden from
/// the docs) only for `benches/patterns.rs`; not a stable API.
#[derive(Debug, Default)]
pub struct PatternTrie {
    spaces: HashMap<Box<str>, Node>,
    len: usize,
}

#[derive(Debug, Default)]
struct Node {
    literal: HashMap<Box<str>, Node>,
    one: Option<Box<Node>>,
    /// The patterns that end here (their last segment was the step here):
    /// one, or a few that differ only in separators (`a.*` and `a:*`
    /// in one namespace).
    end: Vec<TopicName>,
    /// The patterns that end here with `#`: one or more segments follow.
    rest: Vec<TopicName>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.literal.is_empty() && self.one.is_none() && self.end.is_empty() && self.rest.is_empty()
    }
}

/// `name`'s namespace and what follows it (the whole name, for the
/// default namespace).
fn split_namespace(name: &str) -> (&str, &str) {
    name.split_once(':').unwrap_or(("", name))
}

/// The first segment of `rest` and what follows it, if anything.
fn next_segment(rest: &str) -> (&str, Option<&str>) {
    match rest.find(['.', ':']) {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    }
}

impl PatternTrie {
    /// Distinct patterns held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds `pattern` (valid, from [`TopicName::filter`]); false if it was
    /// there already.
    pub fn insert(&mut self, pattern: &TopicName) -> bool {
        let (ns, rest) = split_namespace(pattern.as_str());
        let mut node = self.spaces.entry(ns.into()).or_default();
        let mut left = Some(rest);
        let mut hash = false;
        while let Some(r) = left {
            let (seg, after) = next_segment(r);
            node = match seg {
                "#" => {
                    hash = true;
                    break;
                }
                "*" => node.one.get_or_insert_with(Box::default),
                _ => node.literal.entry(seg.into()).or_default(),
            };
            left = after;
        }
        let list = if hash { &mut node.rest } else { &mut node.end };
        if list.contains(pattern) {
            return false;
        }
        list.push(pattern.clone());
        self.len += 1;
        true
    }

    /// Removes `pattern` and the nodes only it needed; false if it was not there.
    pub fn remove(&mut self, pattern: &TopicName) -> bool {
        let (ns, rest) = split_namespace(pattern.as_str());
        let Some(root) = self.spaces.get_mut(ns) else {
            return false;
        };
        let removed = remove_in(root, pattern.as_str(), Some(rest));
        if root.is_empty() {
            self.spaces.remove(ns);
        }
        if removed {
            self.len -= 1;
        }
        removed
    }

    /// Calls `f` with every pattern `topic` matches, each once.
    pub fn for_each_match(&self, topic: &str, mut f: impl FnMut(&TopicName)) {
        let (ns, rest) = split_namespace(topic);
        if let Some(root) = self.spaces.get(ns) {
            walk(root, Some(rest), &mut f);
        }
    }
}

fn remove_in(node: &mut Node, pattern: &str, left: Option<&str>) -> bool {
    let take = |list: &mut Vec<TopicName>| {
        let before = list.len();
        list.retain(|p| p.as_str() != pattern);
        list.len() < before
    };
    let Some(r) = left else {
        return take(&mut node.end);
    };
    let (seg, after) = next_segment(r);
    if seg == "#" {
        return take(&mut node.rest);
    }
    let removed = match seg {
        "*" => {
            let Some(child) = node.one.as_mut() else {
                return false;
            };
            let removed = remove_in(child, pattern, after);
            if child.is_empty() {
                node.one = None;
            }
            removed
        }
        _ => {
            let Some(child) = node.literal.get_mut(seg) else {
                return false;
            };
            let removed = remove_in(child, pattern, after);
            if child.is_empty() {
                node.literal.remove(seg);
            }
            removed
        }
    };
    removed
}

/// Visits the patterns under `node` that match the rest of a topic
/// (`None`: no segment left). Depth is the topic's segment count (at most
/// 128 in 255 bytes); each step is a hash lookup and a `*` branch.
fn walk(node: &Node, left: Option<&str>, f: &mut impl FnMut(&TopicName)) {
    let Some(r) = left else {
        node.end.iter().for_each(&mut *f);
        return;
    };
    node.rest.iter().for_each(&mut *f);
    let (seg, after) = next_segment(r);
    if let Some(child) = node.literal.get(seg) {
        walk(child, after, f);
    }
    if let Some(child) = &node.one {
        walk(child, after, f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Pattern;

    fn matches(trie: &PatternTrie, topic: &str) -> Vec<String> {
        let mut out = Vec::new();
        trie.for_each_match(topic, |p| out.push(p.as_str().to_string()));
        out.sort();
        out
    }

    fn p(s: &str) -> TopicName {
        TopicName::filter(s).unwrap()
    }

    #[test]
    fn a_topic_finds_every_pattern_it_matches_once() {
        let mut t = PatternTrie::default();
        for s in [
            "user.*",
            "user.#",
            "user.42.*",
            "*.42.x",
            "chat:*",
            "chat:#",
            "#",
        ] {
            assert!(t.insert(&p(s)), "{s}");
        }
        assert!(!t.insert(&p("user.*")), "twice is once");
        assert_eq!(t.len(), 7);
        assert_eq!(matches(&t, "user.42"), ["#", "user.#", "user.*"]);
        assert_eq!(
            matches(&t, "user.42.x"),
            ["#", "*.42.x", "user.#", "user.42.*"]
        );
        assert_eq!(matches(&t, "user"), ["#"]);
        // Namespaces: `chat:` patterns only see chat topics, `#` none of them.
        assert_eq!(matches(&t, "chat:42"), ["chat:#", "chat:*"]);
        assert_eq!(matches(&t, "chat:42.x"), ["chat:#"]);
        assert_eq!(matches(&t, "other:42"), Vec::<String>::new());
    }

    #[test]
    fn removing_prunes_and_leaves_the_others() {
        let mut t = PatternTrie::default();
        for s in ["a.*.c", "a.*.#", "a.b.*", "x:#"] {
            t.insert(&p(s));
        }
        assert!(t.remove(&p("a.*.c")));
        assert!(!t.remove(&p("a.*.c")), "gone already");
        assert!(!t.remove(&p("a.*.*")), "never there");
        assert_eq!(matches(&t, "a.b.c"), ["a.*.#", "a.b.*"]);
        for s in ["a.*.#", "a.b.*", "x:#"] {
            assert!(t.remove(&p(s)), "{s}");
        }
        assert!(t.is_empty());
        assert!(t.spaces.is_empty(), "every node pruned: {:?}", t.spaces);
    }

    /// The trie agrees with testing every pattern (the claims' matcher,
    /// restricted to the pattern's namespace) over random patterns and
    /// topics.
    #[test]
    fn the_trie_agrees_with_a_scan_of_every_pattern() {
        let mut rng = fastrand::Rng::with_seed(19);
        let seg = |rng: &mut fastrand::Rng, wild: bool| -> &'static str {
            let lits = ["a", "b", "c"];
            match wild && rng.u8(..4) == 0 {
                true => "*",
                false => lits[rng.usize(..lits.len())],
            }
        };
        let name = |rng: &mut fastrand::Rng, wild: bool| -> String {
            let n = rng.usize(1..=4);
            let mut s = String::new();
            if rng.bool() {
                s.push_str(seg(rng, false));
                s.push(':');
            }
            for i in 0..n {
                if i > 0 {
                    s.push(if rng.u8(..4) == 0 { ':' } else { '.' });
                }
                s.push_str(if wild && i == n - 1 && rng.u8(..3) == 0 {
                    "#"
                } else {
                    seg(rng, wild)
                });
            }
            s
        };
        for _ in 0..200 {
            let mut t = PatternTrie::default();
            let mut all = Vec::new();
            for _ in 0..rng.usize(1..20) {
                let s = name(&mut rng, true);
                if let Ok(pat) = TopicName::filter(&s) {
                    t.insert(&pat);
                    all.push(s);
                }
            }
            all.sort();
            all.dedup();
            for _ in 0..50 {
                let topic = name(&mut rng, false);
                let mut want: Vec<String> = all
                    .iter()
                    .filter(|s| {
                        split_namespace(s).0 == split_namespace(&topic).0
                            && Pattern::parse(s).unwrap().matches(&topic)
                    })
                    .cloned()
                    .collect();
                want.sort();
                assert_eq!(matches(&t, &topic), want, "{topic} over {all:?}");
            }
        }
    }
}
