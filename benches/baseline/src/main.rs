//! Baseline broadcast server: tokio's multi-thread runtime, one task per
//! connection, a `tokio::sync::broadcast` channel per topic, and the
//! `tokio-tungstenite` stream/sink, used the way its examples and most
//! tutorials use them. It exists to be measured against ringcast with the
//! same load tool (`ringcast load`), nothing else.
//!
//! Usage: ringcast-baseline 127.0.0.1:18081

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::Message;

type Topics = Arc<Mutex<HashMap<String, broadcast::Sender<Message>>>>;

#[tokio::main]
async fn main() {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:18081".into());
    let listener = TcpListener::bind(&addr).await.expect("bind");
    println!("baseline listening on {addr}");
    let topics: Topics = Arc::default();
    let seq = Arc::new(AtomicU64::new(0));
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve(stream, topics.clone(), seq.clone()));
    }
}

fn channel(topics: &Topics, topic: &str) -> broadcast::Sender<Message> {
    let mut map = topics.lock().expect("lock");
    map.entry(topic.to_string()).or_insert_with(|| broadcast::channel(4096).0).clone()
}

async fn serve(stream: TcpStream, topics: Topics, seq: Arc<AtomicU64>) {
    let Ok(ws) = tokio_tungstenite::accept_async(stream).await else { return };
    let (mut sink, mut source) = ws.split();
    let welcome = r#"{"op":"welcome","conn":"b","node":"baseline","heartbeat":25}"#;
    if sink.send(Message::text(welcome)).await.is_err() {
        return;
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Message>();
    // Forward every subscribed topic's broadcast into this connection.
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if sink.send(m).await.is_err() {
                break;
            }
        }
    });
    while let Some(Ok(msg)) = source.next().await {
        let Message::Text(text) = msg else { continue };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else { continue };
        let id = v.get("id").cloned();
        let topic = v["topic"].as_str().unwrap_or_default().to_string();
        match v["op"].as_str() {
            Some("sub") => {
                let mut sub = channel(&topics, &topic).subscribe();
                let out = tx.clone();
                tokio::spawn(async move {
                    while let Ok(m) = sub.recv().await {
                        if out.send(m).is_err() {
                            break;
                        }
                    }
                });
                let ok = serde_json::json!({"op": "ok", "id": id, "topic": topic, "epoch": "baseline"});
                let _ = tx.send(Message::text(ok.to_string()));
            }
            Some("pub") => {
                let ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
                let mid = format!("{ms}-{}", seq.fetch_add(1, Ordering::Relaxed));
                let frame = serde_json::json!({"op": "msg", "topic": topic, "id": mid, "data": v["data"]});
                let _ = channel(&topics, &topic).send(Message::text(frame.to_string()));
                if id.is_some() {
                    let ok = serde_json::json!({"op": "ok", "id": id, "topic": topic, "mid": mid});
                    let _ = tx.send(Message::text(ok.to_string()));
                }
            }
            Some("ping") => {
                let _ = tx.send(Message::text(serde_json::json!({"op": "pong", "id": id}).to_string()));
            }
            _ => {}
        }
    }
    writer.abort();
}
