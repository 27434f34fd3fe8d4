//! The server's frames, encoded to bytes: `msg` once per message for
//! every subscriber, and the replies and notices of one connection. Written
//! by hand into one buffer: topics and ids need no escaping, and `data` is
//! copied verbatim.

use bytes::{BufMut, Bytes, BytesMut};

use crate::id::MsgId;
use crate::topic::TopicName;
use crate::ws::frame::{encode_text, write_header, OpCode};

/// Encodes a reply (small, per connection) as one text frame.
fn text_frame(body: &str) -> Bytes {
    encode_text(body.as_bytes())
}

fn push_id(out: &mut String, id: Option<u64>) {
    if let Some(id) = id {
        out.push_str(",\"id\":");
        out.push_str(&id.to_string());
    }
}

/// Appends `s` as a JSON string literal (with quotes), escaping as needed.
fn push_json_str(out: &mut String, s: &str) {
    // serde_json never fails to serialize a &str.
    out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into()));
}

/// The `msg` frame for one notification, encoded once and shared by every
/// subscriber: `{"op":"msg","topic":T,"id":ID[,"event":E],"data":DATA}`.
/// `data` must be valid JSON text; `topic` needs no escaping by construction.
pub fn encode_msg(topic: &TopicName, id: MsgId, event: Option<&str>, data: &str) -> Bytes {
    let mut body = String::with_capacity(48 + topic.as_str().len() + data.len());
    body.push_str("{\"op\":\"msg\",\"topic\":\"");
    body.push_str(topic.as_str());
    body.push_str("\",\"id\":\"");
    body.push_str(&id.to_string());
    body.push('"');
    if let Some(ev) = event {
        body.push_str(",\"event\":");
        push_json_str(&mut body, ev);
    }
    body.push_str(",\"data\":");
    body.push_str(data);
    body.push('}');
    let mut frame = BytesMut::with_capacity(body.len() + 10);
    write_header(&mut frame, OpCode::Text, false, body.len());
    frame.put_slice(body.as_bytes());
    frame.freeze()
}

/// `{"op":"lost","topic":T,"from":ID,"to":ID}` (v1.2): a connection on a
/// `drop_oldest` namespace did not get the topic's messages `from` to `to`
/// (both included); a client that needs them resubscribes with `since`.
pub fn encode_lost(topic: &TopicName, from: MsgId, to: MsgId) -> Bytes {
    text_frame(&format!(
        "{{\"op\":\"lost\",\"topic\":\"{}\",\"from\":\"{from}\",\"to\":\"{to}\"}}",
        topic.as_str()
    ))
}

/// The longest a message id is as text: two u64 and a dash.
pub const MAX_ID_TEXT: usize = 20 + 1 + 20;

/// The largest frame [`encode_lost`] makes for `topic`, whatever the ids:
/// what the outbound queue reserves for a notice before it drops frames.
pub fn lost_frame_max(topic: &TopicName) -> usize {
    // `{"op":"lost","topic":"` `","from":"` `","to":"` `"}`.
    let body = 22 + topic.as_str().len() + 10 + MAX_ID_TEXT + 8 + MAX_ID_TEXT + 2;
    // RFC 6455 section 5.2: 2 header bytes up to 125, 4 up to 65535.
    body + if body <= 125 { 2 } else { 4 }
}

/// `{"op":"welcome",...}`, the first frame after the upgrade.
pub fn encode_welcome(conn: &str, node: &str, heartbeat_secs: u64) -> Bytes {
    let mut s = String::from("{\"op\":\"welcome\",\"conn\":");
    push_json_str(&mut s, conn);
    s.push_str(",\"node\":");
    push_json_str(&mut s, node);
    s.push_str(&format!(",\"heartbeat\":{heartbeat_secs}}}"));
    text_frame(&s)
}

/// What an `ok` reply carries besides `id` and `topic`.
#[derive(Debug, Default)]
pub struct OkExtra<'a> {
    /// The topic's epoch (every `sub`).
    pub epoch: Option<&'a str>,
    /// The position when the subscription became live (every `sub`):
    /// resubscribing with `since` = `last` recovers what came after.
    pub last: Option<MsgId>,
    /// Whether recovery succeeded (a `sub` with `since`).
    pub recovered: Option<bool>,
    /// The new message id (a `pub`).
    pub mid: Option<MsgId>,
}

/// `{"op":"ok",...}`.
pub fn encode_ok(id: Option<u64>, topic: Option<&TopicName>, extra: OkExtra<'_>) -> Bytes {
    let mut s = String::from("{\"op\":\"ok\"");
    push_id(&mut s, id);
    if let Some(t) = topic {
        s.push_str(",\"topic\":\"");
        s.push_str(t.as_str());
        s.push('"');
    }
    if let Some(e) = extra.epoch {
        s.push_str(",\"epoch\":");
        push_json_str(&mut s, e);
    }
    if let Some(l) = extra.last {
        s.push_str(&format!(",\"last\":\"{l}\""));
    }
    if let Some(r) = extra.recovered {
        s.push_str(if r {
            ",\"recovered\":true"
        } else {
            ",\"recovered\":false"
        });
    }
    if let Some(m) = extra.mid {
        s.push_str(&format!(",\"mid\":\"{m}\""));
    }
    s.push('}');
    text_frame(&s)
}

/// `{"op":"error","id":..,"code":..,"reason":..}`.
pub fn encode_error(id: Option<u64>, code: u16, reason: &str) -> Bytes {
    let mut s = String::from("{\"op\":\"error\"");
    push_id(&mut s, id);
    s.push_str(&format!(",\"code\":{code},\"reason\":"));
    push_json_str(&mut s, reason);
    s.push('}');
    text_frame(&s)
}

/// `{"op":"error"[,"id":..],"code":..,"topic":..,"reason":..}`: an error
/// about one topic. Without `id` it is not a reply but news: the server
/// ended that subscription (docs/PROTOCOL.md section 2).
pub fn encode_topic_error(id: Option<u64>, code: u16, topic: &TopicName, reason: &str) -> Bytes {
    let mut s = String::from("{\"op\":\"error\"");
    push_id(&mut s, id);
    s.push_str(&format!(",\"code\":{code},\"topic\":\""));
    // A topic name needs no escaping by construction.
    s.push_str(topic.as_str());
    s.push_str("\",\"reason\":");
    push_json_str(&mut s, reason);
    s.push('}');
    text_frame(&s)
}

/// `{"op":"pong"[,"id":..]}`.
pub fn encode_pong(id: Option<u64>) -> Bytes {
    let mut s = String::from("{\"op\":\"pong\"");
    push_id(&mut s, id);
    s.push('}');
    text_frame(&s)
}

/// `{"op":"presence","id":..,"topic":..,"users":[..],"count":..,"truncated":..}`:
/// the answer to a `presence` request. `users` are at most the namespace's
/// `presence_max_users`; `count` is how many there are in all.
pub fn encode_presence(id: Option<u64>, topic: &TopicName, users: &[String], count: u64) -> Bytes {
    let mut s = String::from("{\"op\":\"presence\"");
    push_id(&mut s, id);
    s.push_str(",\"topic\":\"");
    s.push_str(topic.as_str());
    s.push_str("\",\"users\":[");
    for (i, u) in users.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        push_json_str(&mut s, u);
    }
    let truncated = (users.len() as u64) < count;
    s.push_str(&format!("],\"count\":{count},\"truncated\":{truncated}}}"));
    text_frame(&s)
}

/// `{"op":"join"|"leave","topic":..,"user":..}`: a user's first connection
/// subscribed to the topic, or its last one left.
pub fn encode_presence_event(topic: &TopicName, join: bool, user: &str) -> Bytes {
    let mut s = String::from(if join {
        "{\"op\":\"join\",\"topic\":\""
    } else {
        "{\"op\":\"leave\",\"topic\":\""
    });
    s.push_str(topic.as_str());
    s.push_str("\",\"user\":");
    push_json_str(&mut s, user);
    s.push('}');
    text_frame(&s)
}

/// `{"op":"drain","reconnect_in_ms":..}`.
pub fn encode_drain(reconnect_in_ms: u64) -> Bytes {
    text_frame(&format!(
        "{{\"op\":\"drain\",\"reconnect_in_ms\":{reconnect_in_ms}}}"
    ))
}
