//! `POST /publish`: the producer path over HTTP. A body is one
//! `{"topic":..,"data":..[,"event":..]}` or an array of them; each is
//! checked as a client `pub` is (topic grammar and namespace, `data` size,
//! nesting and numbers, `event` length), but `allow_publish` does not apply
//! (producers are trusted). Authorization is `Bearer` with
//! `--admin-api-key`: without a configured key every publish is refused
//! (403), so the admin port never takes publishes by accident.
//!
//! Answers: 200 `{"mid":..}` (or `{"results":[{"mid":..}|{"error":..}]}`
//! for an array, in order); 400 naming the item and what is wrong (nothing
//! is published then); 401 / 403; 408 body too slow; 413 body too large;
//! 503 while the broker is down, or when it refused every item.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::header::AUTHORIZATION;
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{json, text, Admin, BODY_TIMEOUT, MAX_BODY};
use crate::broker::redis::MAX_EVENT_LEN;
use crate::broker::Replier;
use crate::protocol::check_data;
use crate::topic::TopicName;

/// Items in one batch at most.
pub(super) const MAX_BATCH: usize = 1000;
/// How long a publish may wait for the broker's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// One publish, as the body spells it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Item {
    topic: String,
    data: Box<RawValue>,
    #[serde(default)]
    event: Option<String>,
    /// (v1.2) The producer's idempotency key.
    #[serde(default)]
    key: Option<String>,
}

/// One publish, checked.
#[derive(Debug)]
struct Checked {
    topic: TopicName,
    data: Box<RawValue>,
    event: Option<String>,
    key: Option<String>,
}

pub(super) async fn handle(admin: &Admin, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if let Err((status, why)) = authorize(admin, &req) {
        return text(status, why);
    }
    let body = match read_body(req.into_body()).await {
        Ok(b) => b,
        Err((status, why)) => return text(status, why),
    };
    let (items, batch) = match parse(&body) {
        Ok(parsed) => parsed,
        Err(why) => return text(StatusCode::BAD_REQUEST, format!("{why}\n")),
    };
    let checked = match items
        .into_iter()
        .enumerate()
        .map(|(i, item)| check(admin, item).map_err(|why| (i, why)))
        .collect::<Result<Vec<Checked>, _>>()
    {
        Ok(c) => c,
        Err((i, why)) if batch => {
            return text(StatusCode::BAD_REQUEST, format!("item {i}: {why}\n"))
        }
        Err((_, why)) => return text(StatusCode::BAD_REQUEST, format!("{why}\n")),
    };
    if admin
        .broker_metrics
        .up
        .load(std::sync::atomic::Ordering::Relaxed)
        != 1
    {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "broker unavailable: Redis is unreachable, retry later\n",
        );
    }
    let outcomes = publish_all(admin, checked).await;
    let all_failed = outcomes.iter().all(Result::is_err);
    let status = if all_failed {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    let one = |r: &Result<String, String>| match r {
        Ok(mid) => serde_json::json!({ "mid": mid }),
        Err(e) => serde_json::json!({ "error": e }),
    };
    if batch {
        let results: Vec<serde_json::Value> = outcomes.iter().map(one).collect();
        json(status, &serde_json::json!({ "results": results }))
    } else {
        json(status, &one(&outcomes[0]))
    }
}

/// Why a request is refused: the status and a one-line reason.
type Refusal = (StatusCode, String);

/// 403 without a configured key, 401 for a missing or wrong one.
fn authorize(admin: &Admin, req: &Request<Incoming>) -> Result<(), Refusal> {
    let Some(key) = admin.config.admin_api_key.as_deref() else {
        return Err((
            StatusCode::FORBIDDEN,
            "HTTP publishing is off: the node has no --admin-api-key\n".into(),
        ));
    };
    let given = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if same(g.as_bytes(), key.as_bytes()) => Ok(()),
        Some(_) => Err((StatusCode::UNAUTHORIZED, "wrong API key\n".into())),
        None => Err((
            StatusCode::UNAUTHORIZED,
            "missing Authorization: Bearer <admin API key>\n".into(),
        )),
    }
}

/// Compares without an early exit, so the time taken tells nothing of
/// where a guess went wrong.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn read_body(body: Incoming) -> Result<Bytes, Refusal> {
    let read = Limited::new(body, MAX_BODY).collect();
    match tokio::time::timeout(BODY_TIMEOUT, read).await {
        Err(_) => Err((
            StatusCode::REQUEST_TIMEOUT,
            format!("body not complete within {} s\n", BODY_TIMEOUT.as_secs()),
        )),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err((
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body over {MAX_BODY} bytes\n"),
        )),
        Ok(Err(e)) => Err((
            StatusCode::BAD_REQUEST,
            format!("cannot read the body: {e}\n"),
        )),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

/// One item or an array of them; `true` for an array.
fn parse(body: &[u8]) -> Result<(Vec<Item>, bool), String> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'[') {
        let items: Vec<Item> = serde_json::from_slice(body)
            .map_err(|e| format!("body is not a JSON array of publishes: {e}"))?;
        if items.is_empty() {
            return Err("empty batch: nothing to publish".into());
        }
        if items.len() > MAX_BATCH {
            return Err(format!(
                "{} publishes in one batch, over {MAX_BATCH}",
                items.len()
            ));
        }
        Ok((items, true))
    } else {
        let item: Item = serde_json::from_slice(body)
            .map_err(|e| format!("body is not {{\"topic\":..,\"data\":..[,\"event\":..]}}: {e}"))?;
        Ok((vec![item], false))
    }
}

fn check(admin: &Admin, item: Item) -> Result<Checked, String> {
    let topic = TopicName::new(&item.topic).map_err(|e| format!("topic: {e}"))?;
    if admin.namespaces.of(topic.as_str()).is_none() {
        return Err(format!("unknown namespace {:?}", topic.namespace()));
    }
    let len = item.data.get().len();
    let max = admin.config.max_publish_size;
    if len > max {
        return Err(format!("data is {len} bytes, over max_publish_size {max}"));
    }
    check_data(item.data.get()).map_err(|e| format!("data: {e}"))?;
    if let Some(e) = &item.event {
        if e.is_empty() || e.len() > MAX_EVENT_LEN {
            return Err(format!("event must be 1 to {MAX_EVENT_LEN} bytes"));
        }
    }
    if let Some(k) = &item.key {
        crate::protocol::check_key(k).map_err(|e| format!("key: {e}"))?;
    }
    Ok(Checked {
        topic,
        data: item.data,
        event: item.event,
        key: item.key,
    })
}

/// Hands every item to the broker and waits for each answer, in order.
async fn publish_all(admin: &Admin, items: Vec<Checked>) -> Vec<Result<String, String>> {
    let mut waits = Vec::with_capacity(items.len());
    for item in items {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let answer = Box::new(move |r: Result<crate::id::MsgId, String>| {
            let _ = tx.send(r);
        });
        admin.broker.publish_as(
            Some(Replier::Call(answer)),
            item.topic,
            item.event.as_deref(),
            item.data.get(),
            item.key.as_deref(),
        );
        waits.push(rx);
    }
    let mut out = Vec::with_capacity(waits.len());
    for rx in waits {
        let r = match tokio::time::timeout(ANSWER_TIMEOUT, rx).await {
            Ok(Ok(Ok(mid))) => Ok(mid.to_string()),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err("broker unavailable: it dropped the publish, retry later".into()),
            Err(_) => Err(
                "broker unavailable: no answer within 5 s (the publish may have happened)".into(),
            ),
        };
        out.push(r);
    }
    if out.iter().any(Result::is_ok) {
        let n = out.iter().filter(|r| r.is_ok()).count() as u64;
        admin
            .broker_metrics
            .published_http
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }
    out
}
