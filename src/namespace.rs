//! Namespaces: policy per topic family (docs/PROTOCOL.md section 5). A topic's
//! namespace is the part before its first `:` (`chat:42` is in `chat`;
//! `news` is in the default namespace, named `""`). Namespaces come from the
//! config file as `[[namespaces]]` tables; with none configured, every
//! topic is in an implicit default namespace where token holders may
//! subscribe and publish as their tokens allow.

use std::time::Duration;

use serde::Deserialize;

use crate::config::units::{HumanDuration, MAX_DURATION};

/// One `[[namespaces]]` table of the config file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceConfig {
    /// The namespace (`""` for topics without a colon).
    pub name: String,
    /// Presence (`join`/`leave`, `presence` op) for this namespace. Default false.
    #[serde(default)]
    pub presence: bool,
    /// Users listed in a `presence` reply at most (`count` says how many
    /// there are). Default 1000.
    pub presence_max_users: Option<u32>,
    /// Whether subscribers get `join` and `leave`. Default: the value of
    /// `presence`.
    pub join_leave: Option<bool>,
    /// Above this many users on a topic its `join`/`leave` are not sent (the
    /// `presence` reply still works). Default 1000.
    pub join_leave_max_users: Option<u32>,
    /// Clients whose token grants it may publish. Default true.
    #[serde(default = "yes")]
    pub allow_publish: bool,
    /// Clients without a token may subscribe. Default false.
    #[serde(default)]
    pub anonymous: bool,
    /// Messages kept per topic (embedded broker); default: `history_size`.
    pub history_size: Option<usize>,
    /// How long they are kept (embedded broker); default: `history_ttl`.
    pub history_ttl: Option<HumanDuration>,
    /// Clients may subscribe to topic patterns (`chat:*`) here, as far as
    /// their token's `subs` cover them. Default true; false refuses every
    /// pattern `sub` in the namespace with 4403.
    #[serde(default = "yes")]
    pub wildcards: bool,
    /// What a subscriber too slow for its `--outbound-queue` loses on this
    /// namespace's topics: `close` (default), `conflate` or `drop_oldest`
    /// ([`SlowConsumer`]). Read as text so a wrong value is reported with
    /// the table's name.
    pub slow_consumer: Option<String>,
}

/// What a subscriber whose outbound queue is full loses on a namespace's
/// topics (the namespace's `slow_consumer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SlowConsumer {
    /// The connection is closed with 4009 and recovers with `since`
    /// (every message or none: for event-like topics). The default.
    #[default]
    Close,
    /// A `msg` still queued is replaced in place by the topic's next one:
    /// the subscriber converges to the newest state and is not closed for
    /// slowness (for state-like topics: prices, scores, positions).
    Conflate,
    /// The oldest queued `msg` frames of the namespace are dropped to make
    /// room, and the connection is told which ids it lost (`lost`), once
    /// per episode; it is not closed for slowness.
    DropOldest,
}

impl SlowConsumer {
    /// Every value, as written in the config file.
    pub const NAMES: [&'static str; 3] = ["close", "conflate", "drop_oldest"];

    /// The value of a `slow_consumer` setting; `None` when it is none of [`Self::NAMES`].
    pub fn parse(s: &str) -> Option<SlowConsumer> {
        match s {
            "close" => Some(SlowConsumer::Close),
            "conflate" => Some(SlowConsumer::Conflate),
            "drop_oldest" => Some(SlowConsumer::DropOldest),
            _ => None,
        }
    }

    /// The name the config file uses.
    pub fn name(self) -> &'static str {
        match self {
            SlowConsumer::Close => "close",
            SlowConsumer::Conflate => "conflate",
            SlowConsumer::DropOldest => "drop_oldest",
        }
    }
}

fn yes() -> bool {
    true
}

/// Default of `presence_max_users`.
pub const DEFAULT_PRESENCE_MAX_USERS: u32 = 1000;
/// Default of `join_leave_max_users`.
pub const DEFAULT_JOIN_LEAVE_MAX_USERS: u32 = 1000;
/// Largest `presence_max_users`: a reply of this many ids stays well under
/// the default `max_message_size` of clients (1 MiB at 100-byte ids).
pub const MAX_PRESENCE_MAX_USERS: u32 = 10_000;

/// A namespace's policy, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    /// The namespace.
    pub name: String,
    /// See [`NamespaceConfig::presence`].
    pub presence: bool,
    /// See [`NamespaceConfig::presence_max_users`].
    pub presence_max_users: u32,
    /// Whether `join`/`leave` are sent (presence on and `join_leave` not off).
    pub join_leave: bool,
    /// See [`NamespaceConfig::join_leave_max_users`].
    pub join_leave_max_users: u32,
    /// See [`NamespaceConfig::allow_publish`].
    pub allow_publish: bool,
    /// See [`NamespaceConfig::anonymous`].
    pub anonymous: bool,
    /// Retention override, messages.
    pub history_size: Option<usize>,
    /// Retention override, age.
    pub history_ttl: Option<Duration>,
    /// See [`NamespaceConfig::slow_consumer`].
    pub slow_consumer: SlowConsumer,
    /// See [`NamespaceConfig::wildcards`].
    pub wildcards: bool,
}

impl Namespace {
    fn implicit() -> Namespace {
        Namespace {
            name: String::new(),
            presence: false,
            presence_max_users: DEFAULT_PRESENCE_MAX_USERS,
            join_leave: false,
            join_leave_max_users: DEFAULT_JOIN_LEAVE_MAX_USERS,
            allow_publish: true,
            anonymous: false,
            history_size: None,
            history_ttl: None,
            slow_consumer: SlowConsumer::Close,
            wildcards: true,
        }
    }
}

/// Every configured namespace, looked up by topic.
#[derive(Debug, Clone)]
pub struct Namespaces {
    list: Vec<Namespace>,
    configured: bool,
    implicit: Namespace,
}

impl Namespaces {
    /// Validates the config file's tables; every problem names the table.
    pub fn from_config(tables: &[NamespaceConfig]) -> Result<Namespaces, Vec<String>> {
        let mut errs = Vec::new();
        let mut list: Vec<Namespace> = Vec::new();
        for t in tables {
            let ok_name = t.name.is_empty()
                || crate::topic::validate(&t.name).is_ok() && !t.name.contains(':');
            if !ok_name {
                errs.push(format!(
                    "namespaces: name {:?} must be \"\" or topic characters without ':'",
                    t.name
                ));
            }
            if list.iter().any(|n| n.name == t.name) {
                errs.push(format!("namespaces: {:?} is configured twice", t.name));
            }
            if t.history_ttl.is_some_and(|d| d.0 > MAX_DURATION) {
                errs.push(format!(
                    "namespaces.{}: history_ttl must be at most 8760h",
                    t.name
                ));
            }
            if t.history_size.is_some_and(|s| s > 10_000_000) {
                errs.push(format!(
                    "namespaces.{}: history_size must be at most 10000000",
                    t.name
                ));
            }
            let slow_consumer = match t.slow_consumer.as_deref() {
                None => SlowConsumer::Close,
                Some(v) => SlowConsumer::parse(v).unwrap_or_else(|| {
                    errs.push(format!(
                        "namespaces.{}: slow_consumer {:?} must be one of {}",
                        t.name,
                        v.chars().take(32).collect::<String>(),
                        SlowConsumer::NAMES.join(", ")
                    ));
                    SlowConsumer::Close
                }),
            };
            let presence_max_users = t.presence_max_users.unwrap_or(DEFAULT_PRESENCE_MAX_USERS);
            if !(1..=MAX_PRESENCE_MAX_USERS).contains(&presence_max_users) {
                errs.push(format!(
                    "namespaces.{}: presence_max_users must be between 1 and {MAX_PRESENCE_MAX_USERS}",
                    t.name
                ));
            }
            let join_leave = t.join_leave.unwrap_or(t.presence);
            if join_leave && !t.presence {
                errs.push(format!(
                    "namespaces.{}: join_leave needs presence = true",
                    t.name
                ));
            }
            list.push(Namespace {
                name: t.name.clone(),
                presence: t.presence,
                presence_max_users,
                join_leave: join_leave && t.presence,
                join_leave_max_users: t
                    .join_leave_max_users
                    .unwrap_or(DEFAULT_JOIN_LEAVE_MAX_USERS),
                allow_publish: t.allow_publish,
                anonymous: t.anonymous,
                history_size: t.history_size,
                history_ttl: t.history_ttl.map(|d| d.0),
                slow_consumer,
                wildcards: t.wildcards,
            });
        }
        if !errs.is_empty() {
            return Err(errs);
        }
        Ok(Namespaces {
            configured: !list.is_empty(),
            list,
            implicit: Namespace::implicit(),
        })
    }

    /// The namespace of a topic; `None` when namespaces are configured and
    /// this one is not among them (error 4004).
    pub fn of(&self, topic: &str) -> Option<&Namespace> {
        if !self.configured {
            return Some(&self.implicit);
        }
        let name = topic.split_once(':').map_or("", |(ns, _)| ns);
        self.list.iter().find(|n| n.name == name)
    }

    /// Whether any namespace has presence on.
    pub fn any_presence(&self) -> bool {
        self.list.iter().any(|n| n.presence)
    }

    /// Whether any namespace admits clients without a token.
    pub fn any_anonymous(&self) -> bool {
        self.list.iter().any(|n| n.anonymous)
    }

    /// Every configured namespace.
    pub fn iter(&self) -> impl Iterator<Item = &Namespace> {
        self.list.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(name: &str) -> NamespaceConfig {
        NamespaceConfig {
            name: name.into(),
            presence: false,
            presence_max_users: None,
            join_leave: None,
            join_leave_max_users: None,
            allow_publish: true,
            anonymous: false,
            history_size: None,
            history_ttl: None,
            slow_consumer: None,
            wildcards: true,
        }
    }

    #[test]
    fn topics_find_their_namespace() {
        let ns = Namespaces::from_config(&[table("chat"), table("")]).unwrap();
        assert_eq!(ns.of("chat:42").unwrap().name, "chat");
        assert_eq!(ns.of("news").unwrap().name, "");
        assert!(ns.of("other:1").is_none());
        let none = Namespaces::from_config(&[]).unwrap();
        assert!(none
            .of("anything:1")
            .is_some_and(|n| n.allow_publish && !n.anonymous));
    }

    #[test]
    fn bad_tables_are_named() {
        let errs = Namespaces::from_config(&[table("a:b"), table("x"), table("x")]).unwrap_err();
        assert!(errs[0].contains("\"a:b\""), "{errs:?}");
        assert!(errs[1].contains("configured twice"), "{errs:?}");
    }

    #[test]
    fn slow_consumer_is_one_of_three_and_a_wrong_one_names_its_table() {
        let with = |name: &str, v: Option<&str>| NamespaceConfig {
            slow_consumer: v.map(Into::into),
            ..table(name)
        };
        let ns = Namespaces::from_config(&[
            with("a", None),
            with("b", Some("close")),
            with("c", Some("conflate")),
            with("d", Some("drop_oldest")),
        ])
        .unwrap();
        let policy = |t: &str| ns.of(t).unwrap().slow_consumer;
        assert_eq!(policy("a:1"), SlowConsumer::Close);
        assert_eq!(policy("b:1"), SlowConsumer::Close);
        assert_eq!(policy("c:1"), SlowConsumer::Conflate);
        assert_eq!(policy("d:1"), SlowConsumer::DropOldest);
        for bad in ["Conflate", "drop-oldest", "", &"x".repeat(1000)] {
            let errs = Namespaces::from_config(&[with("prices", Some(bad))]).unwrap_err();
            assert_eq!(errs.len(), 1, "{errs:?}");
            assert!(
                errs[0].starts_with("namespaces.prices: slow_consumer")
                    && errs[0].ends_with("must be one of close, conflate, drop_oldest")
                    && errs[0].len() < 160,
                "{errs:?}"
            );
        }
    }

    #[test]
    fn presence_keys_have_defaults_and_bounds() {
        let mut chat = table("chat");
        chat.presence = true;
        let ns = Namespaces::from_config(&[chat.clone(), table("news")]).unwrap();
        let c = ns.of("chat:1").unwrap();
        assert!(c.presence && c.join_leave);
        assert_eq!((c.presence_max_users, c.join_leave_max_users), (1000, 1000));
        let n = ns.of("news:1").unwrap();
        assert!(!n.presence && !n.join_leave);
        chat.join_leave = Some(false);
        chat.presence_max_users = Some(5);
        let ns = Namespaces::from_config(&[chat.clone()]).unwrap();
        let c = ns.of("chat:1").unwrap();
        assert!(c.presence && !c.join_leave && c.presence_max_users == 5);
        chat.presence_max_users = Some(0);
        let mut news = table("news");
        news.join_leave = Some(true);
        let errs = Namespaces::from_config(&[chat, news]).unwrap_err();
        assert!(
            errs[0].contains("namespaces.chat: presence_max_users must be between 1 and 10000"),
            "{errs:?}"
        );
        assert!(
            errs[1].contains("namespaces.news: join_leave needs presence = true"),
            "{errs:?}"
        );
    }
}
