//! [`Reconnecting`]: a client that reconnects with exponential backoff and
//! full jitter and resubscribes every topic from its position (the last id
//! it saw, or the `last` of the `sub`'s `ok`), following docs/PROTOCOL.md
//! section 4's close codes ([`after_close`] is that table). With a token
//! provider it authenticates each connection in its first `auth` frame and
//! refreshes the token before `exp` (token.rs); it sends the `ping` op
//! after a heartbeat of silence and treats a second one as a dead link
//! (heartbeat.rs).
//!
//! It is blocking and does nothing between calls: the heartbeat, the
//! refresh, the retries and the reconnects all run inside
//! [`Reconnecting::recv`], so a caller keeps calling it (the CLI does, at
//! least once a second).
//!
//! What happens to each topic after a reconnect (the `sub` from its
//! position, a refusal retried or dropped, the `ok`) is in
//! `reconnecting/resubscribe.rs`.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::close::{after_close, AfterClose, Disconnect, Ended, ABNORMAL};
use super::heartbeat::{Beat, Heartbeat, PING_OP};
use super::token::{AuthReply, Refresh, TokenSource, TOKEN_REFRESH_MARGIN};
use super::{Client, ClientError, Event, Result, Subscribed, SUBPROTOCOL};

mod resubscribe;
use resubscribe::{ended_subscription, newer};

/// Error codes of a refused `sub` that [`Reconnecting`] retries with
/// backoff on the same connection (docs/PROTOCOL.md section 4): 4503
/// broker unavailable, 4008 rate limited. Any other refusal is final for
/// that topic.
pub const RETRY_SUB_CODES: [u16; 2] = [4008, 4503];

/// A client that survives disconnects: it reconnects with exponential
/// backoff and full jitter, and resubscribes every topic with `since` set
/// to its position, so nothing is missed or repeated while the server
/// still has the history. It follows docs/PROTOCOL.md section 4's
/// close-code table, [`after_close`]: a `drain` sets when it reconnects, a
/// close in [`FINAL_CLOSE_CODES`](super::FINAL_CLOSE_CODES) ends it.
///
/// A topic's position is the id of the last thing the client received
/// about it: a `msg`, or the `last` of a `sub`'s `ok` (docs/PROTOCOL.md
/// section 2), so a topic that was quiet while subscribed recovers what
/// was published while the client was away. After `recovered:false` the
/// position is the new `ok`'s `last`: the old one means nothing in the new
/// history.
///
/// A `sub` refused with a code in [`RETRY_SUB_CODES`] is retried with
/// backoff; refused with another code, or ended by the server (an `error`
/// without `id` that carries `topic`), the topic is dropped, never
/// resubscribed, and the `error` is returned by [`Reconnecting::recv`].
///
/// With a token provider ([`Reconnecting::with_token`]) the provider is
/// called before each connect, after a close 4001, and before the token's
/// `exp` (see [`refresh_delay`](super::refresh_delay)); a refused refresh
/// (error 4001) is returned by `recv` as that `error` frame, and the
/// connection holds until `exp`.
#[derive(Debug)]
pub struct Reconnecting {
    url: String,
    client: Option<Client>,
    token: Option<TokenSource>,
    positions: HashMap<String, Position>,
    /// Topics whose `sub` was refused with a retryable code.
    retries: Vec<Retry>,
    /// Backoff floor and ceiling. Default: 100 ms and 10 s.
    pub backoff: (Duration, Duration),
    /// Added to the backoff after a close 4008 (rate limited), so a client
    /// over the server's inbound limit does not come straight back to it.
    /// Default: 10 s, the JS client's `rateLimitedDelay`.
    pub rate_limited_delay: Duration,
    /// How long one connect may take, from the TCP connect to `welcome`. A
    /// call of [`Reconnecting::recv`] that reconnects may overrun its
    /// deadline by this much. Default: 10 s.
    pub connect_timeout: Duration,
    /// How long before `exp` the token is refreshed (half way through a
    /// shorter token). Default: [`TOKEN_REFRESH_MARGIN`].
    pub refresh_margin: Duration,
    attempt: u32,
    /// Reconnects made so far.
    pub reconnects: u32,
    /// Token refreshes the server accepted, on any connection.
    pub refreshes: u32,
    /// The last connection lost: its close code and reason, and when.
    pub last_disconnect: Option<Disconnect>,
    /// Topics whose resubscription could not recover (`recovered:false`),
    /// one entry per resubscription.
    pub unrecovered: Vec<String>,
    /// Topics whose resubscription recovered what was missed
    /// (`recovered:true`), one entry per resubscription.
    pub recovered: Vec<String>,
    /// When to try to reconnect next: the server's `drain` delay, or the
    /// backoff after a lost connection or a failed attempt.
    reconnect_at: Option<Instant>,
    /// When the last 4009 came: a second one soon after backs off.
    last_4009: Option<Instant>,
    /// Why the client stopped for good: no reconnecting after it.
    ended: Option<Ended>,
    /// Events received but not yet returned: replays, dropped topics.
    queue: VecDeque<Event>,
    /// The current connection's `ping` op schedule.
    heartbeat: Heartbeat,
    /// The current connection's token refresh.
    refresh: Refresh,
}

/// Where a subscribed topic is: what its next `sub` sends as `since`.
#[derive(Debug, Clone, Default)]
struct Position {
    /// The last message id received, or the `last` of the newest `ok`;
    /// `None` until the server has given one (it always does since v1.1).
    id: Option<String>,
    /// The topic's epoch, from the newest `ok`.
    epoch: String,
}

/// A refused `sub` waiting for its next try.
#[derive(Debug)]
struct Retry {
    topic: String,
    at: Instant,
    /// Tries made so far: sets the next backoff.
    attempt: u32,
}

impl Reconnecting {
    /// Connects now, anonymously (failing if the first connect fails).
    pub fn connect(url: &str) -> Result<Reconnecting> {
        let mut r = Self::new(url, None);
        r.client = Some(r.open()?);
        Ok(r)
    }

    /// Connects now with a token from `provider` (failing if the first
    /// connect fails, a refused token included). `provider` is called
    /// again before every reconnect, after a close 4001, and before the
    /// token's `exp` to refresh it on the open connection. It returns
    /// `Err(why)` only when no token will come: the client then gives up
    /// with [`ClientError::Token`] (retry inside the provider for passing
    /// failures).
    ///
    /// The token goes in the first frame, `{"op":"auth"}`, not in
    /// `?token=`: a URL lands in proxies' access logs, and a refused token
    /// is then a 4001 close with the server's reason, handled like an
    /// expired one. It is the JS client's choice too.
    ///
    /// ```no_run
    /// # fn fetch_token_from_backend() -> Result<String, String> { Ok(String::new()) }
    /// use std::time::{Duration, Instant};
    /// use ringcast::client::{Event, Reconnecting};
    ///
    /// let mut rc = Reconnecting::with_token("ws://127.0.0.1:8080/ws", || fetch_token_from_backend())?;
    /// rc.subscribe("user.42")?;
    /// loop {
    ///     if let Ok(Event::Msg { topic, id, data }) = rc.recv(Instant::now() + Duration::from_secs(1)) {
    ///         println!("{topic} {id} {data}");
    ///     }
    /// }
    /// # Ok::<(), ringcast::client::ClientError>(())
    /// ```
    pub fn with_token(
        url: &str,
        provider: impl FnMut() -> std::result::Result<String, String> + Send + 'static,
    ) -> Result<Reconnecting> {
        let mut r = Self::new(url, Some(TokenSource::new(provider)));
        r.client = Some(r.open()?);
        Ok(r)
    }

    fn new(url: &str, token: Option<TokenSource>) -> Reconnecting {
        Reconnecting {
            url: url.to_string(),
            client: None,
            token,
            positions: HashMap::new(),
            retries: Vec::new(),
            backoff: (Duration::from_millis(100), Duration::from_secs(10)),
            rate_limited_delay: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            refresh_margin: TOKEN_REFRESH_MARGIN,
            attempt: 0,
            reconnects: 0,
            refreshes: 0,
            last_disconnect: None,
            unrecovered: Vec::new(),
            recovered: Vec::new(),
            reconnect_at: None,
            last_4009: None,
            ended: None,
            queue: VecDeque::new(),
            heartbeat: Heartbeat::new(super::heartbeat::DEFAULT_HEARTBEAT),
            refresh: Refresh::new(None, None, TOKEN_REFRESH_MARGIN),
        }
    }

    /// The current connection's `welcome` (its `conn`, `node` and
    /// `heartbeat`); `None` while disconnected.
    pub fn welcome(&self) -> Option<&Value> {
        self.client.as_ref().map(|c| &c.welcome)
    }

    /// Subscribes and remembers the topic for resubscription. A refusal
    /// with a code in [`RETRY_SUB_CODES`] is not an error: the `sub` is
    /// retried with backoff while [`Reconnecting::recv`] runs. Any other
    /// refusal is returned, and the topic is not kept. While disconnected
    /// the topic is kept and subscribed on the next connection (a refusal
    /// then comes from `recv`, as an `error` frame with the topic).
    pub fn subscribe(&mut self, topic: &str) -> Result<()> {
        if let Some(end) = &self.ended {
            return Err(end.error());
        }
        let Some(client) = self.client.as_mut() else {
            self.positions.entry(topic.to_string()).or_default();
            return Ok(());
        };
        match client.subscribe(topic, None) {
            Ok(sub) => self.settle(topic, sub),
            Err(ClientError::Server { code, .. }) if RETRY_SUB_CODES.contains(&code) => {
                self.positions
                    .insert(topic.to_string(), Position::default());
                self.retry_later(topic, 0);
            }
            Err(e) => {
                self.broken(&e);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Topics subscribed (or waiting to be), in no particular order.
    pub fn topics(&self) -> impl Iterator<Item = &str> {
        self.positions.keys().map(String::as_str)
    }

    /// A topic's position: (the id its next `sub` sends as `since`, if
    /// any; its epoch).
    pub fn position(&self, topic: &str) -> Option<(Option<&str>, &str)> {
        self.positions
            .get(topic)
            .map(|p| (p.id.as_deref(), p.epoch.as_str()))
    }

    /// The delay before reconnect attempt `attempt`: uniform in [0, min(cap, base * 2^attempt)).
    pub fn backoff_delay(&self, attempt: u32) -> Duration {
        let (base, cap) = self.backoff;
        let ceiling = base.saturating_mul(1u32 << attempt.min(16)).min(cap);
        ceiling.mul_f64(fastrand::f64())
    }

    /// The next event, reconnecting (and recovering) as needed, until
    /// `deadline`; meanwhile it sends the `ping` op and refreshes the
    /// token when they are due. After a close that [`after_close`] says
    /// not to reconnect, that close is returned as [`ClientError::Closed`],
    /// now and on every later call; after the token provider failed, that
    /// is [`ClientError::Token`], likewise.
    pub fn recv(&mut self, deadline: Instant) -> Result<Event> {
        loop {
            if let Some(e) = self.queue.pop_front() {
                return Ok(e);
            }
            if let Some(end) = &self.ended {
                return Err(end.error());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ClientError::Timeout);
            }
            if self.client.is_none() {
                self.reconnect(deadline)?;
                continue;
            }
            if self.retry_due(now) {
                continue;
            }
            let Some(wake) = self.keep_alive(now)? else {
                continue;
            };
            // Wake for the heartbeat, the refresh or the next retry, if one
            // comes before the deadline.
            let wake = self
                .retries
                .iter()
                .map(|r| r.at)
                .fold(wake.min(deadline), Instant::min);
            let client = self.client.as_mut().expect("connected: checked above");
            match client.recv(wake.saturating_duration_since(now)) {
                Ok(Event::Close(code, reason)) => self.closed(code, reason),
                Ok(Event::Frame(v)) => {
                    if let Some(e) = self.on_frame(v) {
                        return Ok(e);
                    }
                }
                Ok(Event::Msg { topic, id, data }) => {
                    if let Some(pos) = self.positions.get_mut(&topic) {
                        pos.id = Some(newer(pos.id.take(), &id));
                    }
                    return Ok(Event::Msg { topic, id, data });
                }
                // The wake for a retry, or the deadline: the loop tells.
                Err(ClientError::Timeout) => {}
                Err(e @ (ClientError::Closed(..) | ClientError::Io(_))) => self.broken(&e),
                Err(e) => return Err(e),
            }
        }
    }

    /// Takes in a frame other than `msg`; what `recv` returns of it.
    fn on_frame(&mut self, v: Value) -> Option<Event> {
        if v["op"] == "drain" {
            // The server spreads these delays so its clients do not all
            // come back at once: honour it, not our backoff.
            let ms = v["reconnect_in_ms"].as_u64().unwrap_or(0);
            self.reconnect_at = Some(Instant::now() + Duration::from_millis(ms));
            return None;
        }
        if v["op"] == "pong" && v["id"].is_null() {
            // The answer to our `ping` op: its arrival was the point.
            return None;
        }
        if let Some(id) = v["id"].as_u64() {
            match self.refresh.answer(id, v["op"] != "error") {
                Some(AuthReply::Accepted) => {
                    self.refreshes += 1;
                    return None;
                }
                // A refused refresh is surfaced; the token holds until exp.
                Some(AuthReply::Refused) => return Some(Event::Frame(v)),
                Some(AuthReply::First) if v["op"] != "error" => return None,
                Some(AuthReply::First) | None => {}
            }
        }
        if let Some(topic) = ended_subscription(&v) {
            self.drop_topic(topic);
        }
        Some(Event::Frame(v))
    }

    /// Runs the heartbeat and the token refresh at `now` (the client is
    /// connected). `Some(when)` to look again; `None` when it acted (sent
    /// something, or found the link dead), and the caller looks again now.
    fn keep_alive(&mut self, now: Instant) -> Result<Option<Instant>> {
        let client = self.client.as_mut().expect("keep_alive runs connected");
        let wake = match self.heartbeat.check(now, client.last_received()) {
            Beat::Wait(at) => at,
            Beat::Ping => {
                if let Err(e) = client.send_text(PING_OP) {
                    self.broken(&e);
                }
                return Ok(None);
            }
            Beat::Dead => {
                let hb = self.heartbeat.interval();
                let reason = format!(
                    "nothing within {hb:?} of a ping op sent after {hb:?} of silence: dead link"
                );
                self.closed(ABNORMAL, reason);
                return Ok(None);
            }
        };
        match self.refresh.due() {
            Some(at) if at <= now => {
                self.refresh_token()?;
                Ok(None)
            }
            Some(at) => Ok(Some(wake.min(at))),
            None => Ok(Some(wake)),
        }
    }

    /// Asks the provider for a token and sends it in an `auth` frame; its
    /// answer comes through [`Reconnecting::on_frame`]. A provider failure
    /// ends the client.
    fn refresh_token(&mut self) -> Result<()> {
        let Some(source) = self.token.as_mut() else {
            return Ok(());
        };
        let token = match source.fetch() {
            Ok(token) => token,
            Err(e) => return Err(self.give_up(e)),
        };
        let client = self.client.as_mut().expect("refreshes run connected");
        match client.send_request(json!({"op": "auth", "token": token})) {
            Ok(id) => self.refresh.sent(id, token),
            Err(e) => self.broken(&e),
        }
        Ok(())
    }

    /// The token provider failed: close (1000) and stop for good.
    fn give_up(&mut self, e: ClientError) -> ClientError {
        if let Some(client) = self.client.take() {
            client.close();
        }
        if let ClientError::Token(reason) = &e {
            self.ended = Some(Ended::Token(reason.clone()));
        }
        e
    }

    /// A request or a read failed: when the connection is gone, that is a
    /// close (1006 for a socket error).
    fn broken(&mut self, e: &ClientError) {
        match e {
            ClientError::Closed(code, reason) => self.closed(*code, reason.clone()),
            ClientError::Io(err) => self.closed(ABNORMAL, err.to_string()),
            _ => {}
        }
    }

    /// The connection closed with `code`: docs/PROTOCOL.md section 4's
    /// table ([`after_close`]) says whether and when to reconnect.
    fn closed(&mut self, code: u16, reason: String) {
        let now = Instant::now();
        self.last_disconnect = Some(Disconnect {
            code,
            reason: reason.clone(),
            at: now,
        });
        match after_close(code, self.token.is_some()) {
            AfterClose::Stop => {
                self.client = None;
                self.ended = Some(Ended::Closed(code, reason));
            }
            AfterClose::Now if self.last_4009.is_none_or(|at| now - at > self.backoff.1) => {
                self.last_4009 = Some(now);
                self.reconnect_at = Some(now);
                self.lost();
            }
            AfterClose::RateLimited => {
                self.reconnect_at =
                    Some(now + self.rate_limited_delay + self.backoff_delay(self.attempt));
                self.lost();
            }
            // A `drain` already set when (1001); 4001 gets a fresh token
            // when it reconnects.
            AfterClose::Drain | AfterClose::Now | AfterClose::Backoff => self.lost(),
        }
    }

    /// The connection is gone: reconnect after the backoff (unless a
    /// `drain` or the close code already set when). Every topic, those
    /// waiting for a retry included, is resubscribed on the next connection.
    fn lost(&mut self) {
        self.client = None;
        self.retries.clear();
        if self.reconnect_at.is_none() {
            self.reconnect_at = Some(Instant::now() + self.backoff_delay(self.attempt));
        }
    }

    fn reconnect(&mut self, deadline: Instant) -> Result<()> {
        loop {
            if let Some(at) = self.reconnect_at {
                std::thread::sleep(at.min(deadline).saturating_duration_since(Instant::now()));
                if Instant::now() < at {
                    // The deadline came first; the next call goes on waiting.
                    return Err(ClientError::Timeout);
                }
                self.reconnect_at = None;
            }
            match self.resume() {
                Ok(client) => {
                    self.attempt = 0;
                    self.reconnects += 1;
                    self.client = Some(client);
                    return Ok(());
                }
                Err(e @ ClientError::Token(_)) => return Err(self.give_up(e)),
                Err(ClientError::Closed(code, reason))
                    if after_close(code, self.token.is_some()) == AfterClose::Stop =>
                {
                    self.closed(code, reason);
                    return Err(self.ended.as_ref().expect("closed for good").error());
                }
                // 4001 included: the next attempt asks for a fresh token.
                Err(_) => {
                    self.attempt += 1;
                    self.reconnect_at = Some(Instant::now() + self.backoff_delay(self.attempt));
                }
            }
        }
    }

    /// Connects (with a fresh token from the provider, if there is one)
    /// and resets the heartbeat and the refresh for the new connection.
    fn open(&mut self) -> Result<Client> {
        let token = self.token.as_mut().map(TokenSource::fetch).transpose()?;
        let client = Client::open(
            &self.url,
            &SUBPROTOCOL,
            token.as_deref(),
            self.connect_timeout,
        )?;
        self.heartbeat = Heartbeat::new(client.heartbeat());
        self.refresh = Refresh::new(token.as_deref(), client.auth_id, self.refresh_margin);
        Ok(client)
    }

    /// Connects and resubscribes every topic; an error only when the new
    /// connection failed. What the `sub`s received is settled at once, so
    /// a later attempt after a failure resubscribes from there.
    fn resume(&mut self) -> Result<Client> {
        self.retries.clear();
        let mut client = self.open()?;
        let topics: Vec<String> = self.positions.keys().cloned().collect();
        for topic in topics {
            self.resubscribe(&mut client, &topic, 0)?;
        }
        Ok(client)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_jittered_and_capped() {
        let mut r = Reconnecting::new("", None);
        r.backoff = (Duration::from_millis(100), Duration::from_secs(1));
        for attempt in 0..40 {
            let ceiling =
                Duration::from_millis(100 * (1u64 << attempt.min(16))).min(Duration::from_secs(1));
            // Full jitter: uniform in [0, ceiling). 200 draws all in one
            // half, or all equal, has odds of 2^-200 for a real jitter.
            let draws: Vec<Duration> = (0..200).map(|_| r.backoff_delay(attempt)).collect();
            for d in &draws {
                assert!(
                    *d < ceiling,
                    "attempt {attempt}: {d:?} not under {ceiling:?}"
                );
            }
            let low = draws.iter().filter(|d| **d < ceiling / 2).count();
            assert!(
                low > 0 && low < draws.len(),
                "attempt {attempt}: not spread over [0, {ceiling:?}): {draws:?}"
            );
            assert!(
                draws.iter().any(|d| *d != draws[0]),
                "attempt {attempt}: constant"
            );
        }
        // The ceiling grows with the attempt: by 4, draws reach past attempt 0's.
        assert!(
            (0..200).any(|_| r.backoff_delay(4) >= Duration::from_millis(100)),
            "no exponential growth"
        );
    }

    fn msg(topic: &str, id: &str) -> Event {
        Event::Msg {
            topic: topic.into(),
            id: id.into(),
            data: Value::Null,
        }
    }

    fn ok(last: &str, recovered: Option<bool>, replayed: Vec<Event>) -> Subscribed {
        Subscribed {
            epoch: "ep".into(),
            last: last.into(),
            recovered,
            replayed,
        }
    }

    #[test]
    fn the_position_is_the_newest_id_received_msg_or_ok() {
        let mut r = Reconnecting::new("", None);
        // A quiet topic: the `ok`'s `last` is the position.
        r.settle("t", ok("0-0", None, vec![]));
        assert_eq!(r.position("t"), Some((Some("0-0"), "ep")));
        // Recovered: the replay, then the `ok` (whose `last` may be past
        // the topic's newest id: the broker's position).
        r.settle(
            "t",
            ok("9-0", Some(true), vec![msg("t", "5-0"), msg("t", "7-0")]),
        );
        assert_eq!(r.position("t"), Some((Some("9-0"), "ep")));
        assert_eq!(r.queue.len(), 2);
        assert_eq!(r.recovered, ["t"]);
        // A `last` older than what was replayed does not move it back.
        r.settle("t", ok("8-0", Some(true), vec![msg("t", "10-0")]));
        assert_eq!(r.position("t"), Some((Some("10-0"), "ep")));
        // Recovered, nothing replayed, no `last` (a server before v1.1).
        r.settle("t", ok("", Some(true), vec![]));
        assert_eq!(r.position("t"), Some((Some("10-0"), "ep")));
        // Not recovered: the new history's `last`, even if smaller.
        r.settle("t", ok("3-0", Some(false), vec![]));
        assert_eq!(r.position("t"), Some((Some("3-0"), "ep")));
        assert_eq!(r.unrecovered, ["t"]);
        // Without `last`, no position until a `msg`.
        r.settle("u", ok("", None, vec![]));
        assert_eq!(r.position("u"), Some((None, "ep")));
        assert_eq!(newer(None, "1-0"), "1-0");
        assert_eq!(newer(Some("2-0".into()), "1-5"), "2-0");
        assert_eq!(newer(Some("2-0".into()), "2-1"), "2-1");
        assert_eq!(newer(Some("x".into()), "1-0"), "1-0");
    }

    #[test]
    fn only_an_error_without_id_carrying_a_topic_ends_a_subscription() {
        let ended = json!({"op":"error","code":4403,"topic":"t","reason":"subscription ended"});
        assert_eq!(ended_subscription(&ended), Some("t"));
        let answer = json!({"op":"error","id":3,"code":4403,"topic":"t","reason":"no"});
        assert_eq!(ended_subscription(&answer), None);
        let other = json!({"op":"error","code":4000,"reason":"bad request"});
        assert_eq!(ended_subscription(&other), None);
        assert_eq!(ended_subscription(&json!({"op":"ok","topic":"t"})), None);
    }
}
