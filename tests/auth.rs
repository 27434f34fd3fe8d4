//! Authentication and authorization through the real server: tokens before
//! the upgrade and in the first frame, forged and expired tokens, refresh,
//! expiry mid-connection, and topic patterns (docs/PROTOCOL.md sections 1, 2, 5).
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::{raw, TestServer};
use ringcast::auth::{mint_hmac, now_secs, Claims};
use ringcast::client::{Client, ClientError, Event};
use serde_json::json;

const SECRET: &str = "test-secret-0123456789abcdef0123456789";

fn server(extra: &[&str]) -> TestServer {
    let mut args = vec!["--auth-hmac-secret", SECRET, "--auth-timeout", "1s"];
    args.extend_from_slice(extra);
    TestServer::start(&args)
}

fn token(sub: &str, ttl: i64, subs: &[&str], pubs: &[&str]) -> String {
    let claims = Claims {
        sub: sub.into(),
        exp: (now_secs() as i64 + ttl) as u64,
        subs: subs.iter().map(|s| s.to_string()).collect(),
        pubs: pubs.iter().map(|s| s.to_string()).collect(),
    };
    mint_hmac(SECRET.as_bytes(), &claims)
}

fn url_with(server: &TestServer, token: &str) -> String {
    format!("{}?token={token}", server.url())
}

fn b64(bytes: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().fold(0u32, |n, b| (n << 8) | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

fn refused(url: &str) -> String {
    match Client::connect(url) {
        Err(ClientError::Refused(why)) => why,
        Ok(_) => panic!("{url}: accepted"),
        Err(e) => panic!("{url}: {e}"),
    }
}

#[test]
fn a_good_token_in_the_query_is_accepted_and_bad_ones_get_401() {
    let s = server(&[]);
    let c = Client::connect(&url_with(&s, &token("u1", 60, &["news"], &[]))).unwrap();
    assert_eq!(c.welcome["op"], "welcome");
    let expired = refused(&url_with(&s, &token("u1", -10, &["news"], &[])));
    assert!(
        expired.contains("401") && expired.contains("expired"),
        "{expired}"
    );
    let forged = mint_hmac(
        b"not-the-secret-not-the-secret-xx",
        &Claims {
            sub: "u1".into(),
            exp: now_secs() + 60,
            subs: vec![],
            pubs: vec![],
        },
    );
    assert!(refused(&url_with(&s, &forged)).contains("signature"));
    let header = b64(br#"{"alg":"none","typ":"JWT"}"#);
    let body = b64(format!(r#"{{"sub":"u1","exp":{}}}"#, now_secs() + 60).as_bytes());
    assert!(refused(&url_with(&s, &format!("{header}.{body}."))).contains("401"));
    // HS384 with the right secret: not the configured algorithm.
    let hs384 = jsonwebtoken_like_hs384();
    assert!(refused(&url_with(&s, &hs384)).contains("401"));
    assert!(refused(&url_with(&s, "garbage")).contains("401"));
    assert!(s.metric("ringcast_handshake_failures_total{status=\"401\"}") >= 5.0);
}

/// An HS384 token signed with the server's secret (algorithm confusion).
fn jsonwebtoken_like_hs384() -> String {
    let out = std::process::Command::new("python3")
        .args(["-c", &format!(
            "import hmac,hashlib,base64,json,time\nb=lambda d: base64.urlsafe_b64encode(d).rstrip(b'=').decode()\n\
             h=b(json.dumps({{'alg':'HS384','typ':'JWT'}}).encode())\np=b(json.dumps({{'sub':'u1','exp':int(time.time())+60,'subs':['#']}}).encode())\n\
             s=b(hmac.new(b'{SECRET}', (h+'.'+p).encode(), hashlib.sha384).digest())\nprint(h+'.'+p+'.'+s)"
        )])
        .output()
        .expect("python3 (installed by tests/run)");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn without_a_token_the_first_frame_must_be_auth() {
    let s = server(&[]);
    // Another op first: closed with 4001.
    let mut c = raw::connect(s.addr, raw::UPGRADE.as_bytes());
    assert!(raw::read_head(&mut c).starts_with("HTTP/1.1 101"));
    c.write_all(&raw::frame(true, 1, br#"{"op":"sub","topic":"news"}"#))
        .unwrap();
    assert_eq!(raw::read_close_code(&mut c), Some(4001));
    // Silence: closed with 4001 after auth_timeout (1 s; the sweep runs each second).
    let mut c = raw::connect(s.addr, raw::UPGRADE.as_bytes());
    assert!(raw::read_head(&mut c).starts_with("HTTP/1.1 101"));
    let started = Instant::now();
    assert_eq!(raw::read_close_code(&mut c), Some(4001));
    assert!(started.elapsed() < Duration::from_secs(4));
    // A bad token in the frame: 4001.
    let mut c = raw::connect(s.addr, raw::UPGRADE.as_bytes());
    assert!(raw::read_head(&mut c).starts_with("HTTP/1.1 101"));
    c.write_all(&raw::frame(true, 1, br#"{"op":"auth","token":"nope"}"#))
        .unwrap();
    assert_eq!(raw::read_close_code(&mut c), Some(4001));
    // A good one: welcome, then service.
    let mut c = raw::connect(s.addr, raw::UPGRADE.as_bytes());
    assert!(raw::read_head(&mut c).starts_with("HTTP/1.1 101"));
    let auth = json!({"op": "auth", "token": token("u1", 60, &["news"], &[])}).to_string();
    c.write_all(&raw::frame(true, 1, auth.as_bytes())).unwrap();
    raw::read_op(&mut c, "welcome");
    c.write_all(&raw::frame(
        true,
        1,
        br#"{"op":"sub","id":5,"topic":"news"}"#,
    ))
    .unwrap();
    assert_eq!(raw::read_op(&mut c, "ok")["id"], 5);
}

#[test]
fn topics_outside_the_token_patterns_are_refused_and_never_delivered() {
    let s = server(&[]);
    let mut alice = Client::connect(&url_with(
        &s,
        &token("alice", 60, &["user.alice.#", "chat:*"], &["chat:*"]),
    ))
    .unwrap();
    let err = |r: Result<_, ClientError>| match r {
        Err(ClientError::Server { code, .. }) => code,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        err(alice.subscribe("user.bob.inbox", None).map(|_| ())),
        4403
    );
    assert_eq!(
        err(alice.subscribe("user.alice", None).map(|_| ())),
        4403,
        "# needs one segment"
    );
    assert_eq!(
        err(alice.subscribe("chat:1:x", None).map(|_| ())),
        4403,
        "* is one segment"
    );
    assert_eq!(
        err(alice.publish("user.alice.inbox", &json!(1)).map(|_| ())),
        4403
    );
    alice.subscribe("user.alice.inbox", None).unwrap();
    alice.subscribe("chat:1", None).unwrap();
    // Bob may publish to his inbox and Alice's; Alice never sees Bob's inbox.
    let mut bob = Client::connect(&url_with(&s, &token("bob", 60, &[], &["user.#"]))).unwrap();
    bob.publish("user.bob.inbox", &json!("secret")).unwrap();
    bob.publish("user.alice.inbox", &json!("for alice"))
        .unwrap();
    alice.publish("chat:1", &json!("hi")).unwrap();
    let mut got = Vec::new();
    while let Ok(Event::Msg { topic, data, .. }) = alice.recv(Duration::from_millis(500)) {
        got.push((topic, data));
    }
    assert_eq!(
        got,
        vec![
            ("user.alice.inbox".into(), json!("for alice")),
            ("chat:1".into(), json!("hi"))
        ]
    );
    // A token without subs/pubs allows nothing.
    let mut nobody = Client::connect(&url_with(&s, &token("n", 60, &[], &[]))).unwrap();
    assert_eq!(err(nobody.subscribe("news", None).map(|_| ())), 4403);
}

#[test]
fn refresh_extends_the_session_and_must_keep_the_user() {
    let s = server(&[]);
    let mut c = Client::connect(&url_with(&s, &token("u1", 2, &["news"], &[]))).unwrap();
    let (ok, _) = c
        .request(json!({"op": "auth", "token": token("u1", 60, &["news"], &[])}))
        .unwrap();
    assert_eq!(ok["op"], "ok");
    // Past the first token's expiry the connection lives on.
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        let _ = c.recv(Duration::from_millis(200));
    }
    let (pong, _) = c.request(json!({"op": "ping"})).unwrap();
    assert_eq!(pong["op"], "pong");
    // A bad refresh is an error reply; a token for someone else closes 4003.
    match c.request(json!({"op": "auth", "token": "bad"})) {
        Err(ClientError::Server { code, .. }) => assert_eq!(code, 4001),
        other => panic!("{other:?}"),
    }
    match c.request(json!({"op": "auth", "token": token("mallory", 60, &["#"], &[])})) {
        Err(ClientError::Closed(code, _)) => assert_eq!(code, 4003),
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_expiring_token_closes_the_connection_with_4001() {
    let s = server(&[]);
    let mut c = Client::connect(&url_with(&s, &token("u1", 2, &["news"], &[]))).unwrap();
    let started = Instant::now();
    let code = loop {
        match c.recv(Duration::from_secs(6)) {
            Ok(Event::Close(code, _)) => break code,
            Ok(_) => {}
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(code, 4001);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

/// A `ringcast serve` with no key: (process, ws URL, development token,
/// the hint line printed under it).
fn keyless_server(extra: &[&str]) -> (std::process::Child, String, String, String) {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ringcast"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "off",
            "--shards",
            "1",
        ])
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = lines.next().unwrap().unwrap();
    let dev = lines.next().unwrap().unwrap();
    let hint = lines.next().unwrap().unwrap();
    let addr = ready
        .split_whitespace()
        .find_map(|w| w.strip_prefix("ws="))
        .unwrap()
        .to_string();
    let token = dev
        .strip_prefix("ringcast dev-token ")
        .expect(&dev)
        .to_string();
    (child, format!("ws://{addr}/ws"), token, hint)
}

#[test]
fn with_no_key_the_server_prints_a_working_development_token() {
    let (mut child, url, token, hint) = keyless_server(&[]);
    for flag in ["--auth-hmac-secret", "--auth-public-key", "--auth-jwks"] {
        assert!(hint.contains(flag), "{hint}");
    }
    let denied = match Client::connect(&format!("{url}?token=wrong")) {
        Err(ClientError::Refused(why)) => why,
        other => panic!("{other:?}"),
    };
    assert!(denied.contains("401"));
    let mut c = Client::connect(&format!("{url}?token={token}")).unwrap();
    c.subscribe("anything:at.all", None).unwrap();
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn the_development_token_carries_the_required_issuer_and_audience() {
    let (mut child, url, token, _) = keyless_server(&[
        "--auth-issuer",
        "https://id.example",
        "--auth-audience",
        "app",
    ]);
    let mut c = Client::connect(&format!("{url}?token={token}")).unwrap();
    c.subscribe("news", None).unwrap();
    let _ = child.kill();
    let _ = child.wait();
}

/// An RSA key pair made with openssl: (private PEM, public PEM, modulus hex).
fn rsa_keys(dir: &std::path::Path) -> (Vec<u8>, std::path::PathBuf, String) {
    let private = dir.join("key.pem");
    let public = dir.join("pub.pem");
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    run(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        private.to_str().unwrap(),
    ]);
    run(&[
        "pkey",
        "-in",
        private.to_str().unwrap(),
        "-pubout",
        "-out",
        public.to_str().unwrap(),
    ]);
    let modulus = run(&[
        "rsa",
        "-in",
        private.to_str().unwrap(),
        "-noout",
        "-modulus",
    ]);
    let hex = modulus.trim().strip_prefix("Modulus=").unwrap().to_string();
    (std::fs::read(&private).unwrap(), public, hex)
}

fn claims(sub: &str) -> Claims {
    Claims {
        sub: sub.into(),
        exp: now_secs() + 60,
        subs: vec!["#".into()],
        pubs: vec![],
    }
}

#[test]
fn rs256_public_keys_and_jwks_verify_and_refuse_hs_rs_confusion() {
    use ringcast::auth::{mint_with_pem, Algorithm};
    let dir = std::env::temp_dir().join(format!(
        "ringcast-rsa-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let (private, public, modulus) = rsa_keys(&dir);
    // One public key.
    let s = TestServer::start(&[
        "--auth-public-key",
        public.to_str().unwrap(),
        "--auth-algorithm",
        "RS256",
    ]);
    let good = mint_with_pem(&private, Algorithm::RS256, None, &claims("u1")).unwrap();
    Client::connect(&url_with(&s, &good)).unwrap();
    // HS256 signed with the public key's bytes as the secret: refused.
    let confused = mint_hmac(&std::fs::read(&public).unwrap(), &claims("u1"));
    assert!(refused(&url_with(&s, &confused)).contains("algorithm"));
    drop(s);
    // A JWKS with that key under kid "k1".
    let n: Vec<u8> = (0..modulus.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&modulus[i..i + 2], 16).unwrap())
        .collect();
    let jwks = json!({"keys": [{"kty": "RSA", "kid": "k1", "alg": "RS256", "use": "sig", "n": b64(&n), "e": "AQAB"}]});
    let jwks_path = dir.join("jwks.json");
    std::fs::write(&jwks_path, jwks.to_string()).unwrap();
    let s = TestServer::start(&["--auth-jwks", jwks_path.to_str().unwrap()]);
    let with_kid = mint_with_pem(&private, Algorithm::RS256, Some("k1"), &claims("u1")).unwrap();
    Client::connect(&url_with(&s, &with_kid)).unwrap();
    let unknown_kid = mint_with_pem(&private, Algorithm::RS256, Some("k2"), &claims("u1")).unwrap();
    assert!(refused(&url_with(&s, &unknown_kid)).contains("unknown key"));
    assert!(refused(&url_with(&s, &good)).contains("names no key"));
    std::fs::remove_dir_all(dir).unwrap();
}

/// An EC P-256 key pair made with openssl: (private PEM, public PEM path).
fn ec_keys(dir: &std::path::Path, name: &str) -> (Vec<u8>, std::path::PathBuf) {
    let private = dir.join(format!("{name}.pem"));
    let public = dir.join(format!("{name}.pub.pem"));
    for args in [
        vec![
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            private.to_str().unwrap(),
        ],
        vec![
            "pkey",
            "-in",
            private.to_str().unwrap(),
            "-pubout",
            "-out",
            public.to_str().unwrap(),
        ],
    ] {
        let out = std::process::Command::new("openssl")
            .args(&args)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    (std::fs::read(&private).unwrap(), public)
}

fn temp_dir(what: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "ringcast-{what}-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn es256_public_keys_verify_and_refuse_other_keys_and_algorithms() {
    use ringcast::auth::{mint_with_pem, Algorithm};
    let dir = temp_dir("ec");
    let (private, public) = ec_keys(&dir, "key");
    let (other, _) = ec_keys(&dir, "other");
    let s = TestServer::start(&[
        "--auth-public-key",
        public.to_str().unwrap(),
        "--auth-algorithm",
        "ES256",
    ]);
    let good = mint_with_pem(&private, Algorithm::ES256, None, &claims("u1")).unwrap();
    let mut c = Client::connect(&url_with(&s, &good)).unwrap();
    c.subscribe("news", None).unwrap();
    // The same claims signed by another EC key: a bad signature.
    let forged = mint_with_pem(&other, Algorithm::ES256, None, &claims("u1")).unwrap();
    assert!(refused(&url_with(&s, &forged)).contains("signature"));
    // HS256 keyed with the public key's bytes: the wrong algorithm.
    let confused = mint_hmac(&std::fs::read(&public).unwrap(), &claims("u1"));
    assert!(refused(&url_with(&s, &confused)).contains("algorithm"));
    // The auth frame path checks the same way.
    let mut raw_c = raw::connect(s.addr, raw::UPGRADE.as_bytes());
    assert!(raw::read_head(&mut raw_c).starts_with("HTTP/1.1 101"));
    let auth = json!({"op": "auth", "token": forged}).to_string();
    raw_c
        .write_all(&raw::frame(true, 1, auth.as_bytes()))
        .unwrap();
    assert_eq!(raw::read_close_code(&mut raw_c), Some(4001));
    std::fs::remove_dir_all(dir).unwrap();
}

/// An HS256 token with arbitrary claims, signed with [`SECRET`].
fn token_with(claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

#[test]
fn a_token_not_valid_yet_is_refused_in_the_query_and_in_the_auth_frame() {
    let s = server(&[]);
    let future = token_with(
        json!({"sub": "u1", "exp": now_secs() + 7200, "nbf": now_secs() + 3600, "subs": ["#"]}),
    );
    let why = refused(&url_with(&s, &future));
    assert!(
        why.contains("401") && why.contains("not valid yet"),
        "{why}"
    );
    let mut c = raw::connect(s.addr, raw::UPGRADE.as_bytes());
    assert!(raw::read_head(&mut c).starts_with("HTTP/1.1 101"));
    let auth = json!({"op": "auth", "token": future}).to_string();
    c.write_all(&raw::frame(true, 1, auth.as_bytes())).unwrap();
    assert_eq!(raw::read_close_code(&mut c), Some(4001));
    // `nbf` in the past is fine.
    let past = token_with(
        json!({"sub": "u1", "exp": now_secs() + 60, "nbf": now_secs() - 10, "subs": ["#"]}),
    );
    Client::connect(&url_with(&s, &past)).unwrap();
}

#[test]
fn issuer_and_audience_are_required_and_checked_by_the_server() {
    use ringcast::auth::mint_hmac_for;
    let s = server(&[
        "--auth-issuer",
        "https://id.example",
        "--auth-audience",
        "app",
    ]);
    let mint = |iss, aud| mint_hmac_for(SECRET.as_bytes(), &claims("u1"), iss, aud);
    let mut c = Client::connect(&url_with(
        &s,
        &mint(Some("https://id.example"), Some("app")),
    ))
    .unwrap();
    c.subscribe("news", None).unwrap();
    let cases = [
        (
            mint(Some("https://evil.example"), Some("app")),
            "issuer does not match",
        ),
        (
            mint(Some("https://id.example"), Some("web")),
            "audience does not match",
        ),
        (mint(None, Some("app")), "lacks the required iss claim"),
        (
            mint(Some("https://id.example"), None),
            "lacks the required aud claim",
        ),
        (
            mint_hmac(SECRET.as_bytes(), &claims("u1")),
            "lacks the required",
        ),
    ];
    for (token, reason) in cases {
        let why = refused(&url_with(&s, &token));
        assert!(
            why.contains("401") && why.contains(reason),
            "{reason}: {why}"
        );
    }
    // A refresh is checked the same way: a token without them is refused.
    match c.request(json!({"op": "auth", "token": mint(None, None)})) {
        Err(ClientError::Server { code, reason }) => {
            assert_eq!(code, 4001);
            // Either missing claim may be named first.
            assert!(reason.contains("lacks the required"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}

/// Runs `ringcast token ARGS` with no RINGCAST_* settings from the environment.
fn ringcast_token(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_ringcast"))
        .arg("token")
        .args(args)
        .env_remove("RINGCAST_AUTH_HMAC_SECRET")
        .env_remove("RINGCAST_AUTH_ISSUER")
        .env_remove("RINGCAST_AUTH_AUDIENCE")
        .output()
        .unwrap()
}

#[test]
fn the_token_command_mints_tokens_whose_subs_and_pubs_the_server_honours() {
    let out = ringcast_token(&[
        "--secret",
        SECRET,
        "--sub",
        "u9",
        "--subs",
        "news,user.u9.#",
        "--pubs",
        "chat:*",
        "--ttl",
        "1h",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let id = ringcast::auth::Verifier::hmac(SECRET.as_bytes(), None, None)
        .verify(&token)
        .unwrap();
    assert_eq!(&*id.user, "u9");
    assert!((3590..=3600).contains(&(id.expires_at - now_secs())));
    let s = server(&[]);
    let mut c = Client::connect(&url_with(&s, &token)).unwrap();
    let code = |r: Result<String, ClientError>| match r {
        Err(ClientError::Server { code, .. }) => code,
        other => panic!("{other:?}"),
    };
    c.subscribe("news", None).unwrap();
    c.subscribe("user.u9.inbox", None).unwrap();
    assert_eq!(
        code(c.subscribe("user.u8.inbox", None).map(|_| String::new())),
        4403
    );
    assert_eq!(
        code(c.subscribe("chat:1", None).map(|_| String::new())),
        4403
    );
    c.publish("chat:1", &json!("hi")).unwrap();
    assert_eq!(code(c.publish("news", &json!("no"))), 4403);
    // With --issuer / --audience, for servers that require them.
    let out = ringcast_token(&[
        "--secret",
        SECRET,
        "--sub",
        "u9",
        "--subs",
        "news",
        "--issuer",
        "https://id.example",
        "--audience",
        "app",
    ]);
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let strict = server(&[
        "--auth-issuer",
        "https://id.example",
        "--auth-audience",
        "app",
    ]);
    Client::connect(&url_with(&strict, &token))
        .unwrap()
        .subscribe("news", None)
        .unwrap();
    // A secret serve would refuse, or a bad pattern: usage errors (exit 2).
    let out = ringcast_token(&["--secret", "too-short-0123456789", "--sub", "u9"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--secret: must be at least 32 characters"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
    let out = ringcast_token(&["--secret", SECRET, "--sub", "u9", "--subs", "a..b"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--subs: invalid topic pattern \"a..b\""),
        "{stderr}"
    );
}

const ENDED: &str = "subscription ended: topic not allowed by the refreshed token";

#[test]
fn a_refresh_with_narrower_subs_ends_the_subscriptions_it_no_longer_allows() {
    let s = server(&[]);
    let mut c =
        Client::connect(&url_with(&s, &token("u1", 60, &["news", "sport.#"], &[]))).unwrap();
    for t in ["news", "sport.football", "sport.tennis"] {
        c.subscribe(t, None).unwrap();
    }
    assert_eq!(s.metric("ringcast_subscriptions_active"), 3.0);
    let (ok, before) = c
        .request(json!({"op": "auth", "token": token("u1", 60, &["news"], &[])}))
        .unwrap();
    assert_eq!(ok["op"], "ok");
    // One frame per ended subscription, before the refresh's `ok`.
    let mut ended: Vec<serde_json::Value> = before
        .into_iter()
        .map(|e| match e {
            Event::Frame(v) => v,
            other => panic!("{other:?}"),
        })
        .collect();
    ended.sort_by_key(|v| v["topic"].as_str().unwrap().to_string());
    assert_eq!(
        ended,
        [
            json!({"op": "error", "code": 4403, "topic": "sport.football", "reason": ENDED}),
            json!({"op": "error", "code": 4403, "topic": "sport.tennis", "reason": ENDED}),
        ]
    );
    assert_eq!(s.metric("ringcast_subscriptions_active"), 1.0);
    // Nothing of the ended topics arrives any more; the allowed one does.
    let mut publisher = Client::connect(&url_with(&s, &token("p", 60, &[], &["#"]))).unwrap();
    publisher.publish("sport.football", &json!(1)).unwrap();
    publisher.publish("sport.tennis", &json!(2)).unwrap();
    publisher.publish("news", &json!(3)).unwrap();
    let mut got = Vec::new();
    while let Ok(e) = c.recv(Duration::from_millis(500)) {
        got.push(e);
    }
    assert_eq!(
        got,
        [Event::Msg {
            topic: "news".into(),
            id: match &got[0] {
                Event::Msg { id, .. } => id.clone(),
                other => panic!("{other:?}"),
            },
            data: json!(3)
        }]
    );
    // Subscribing again is refused like any topic outside the token.
    match c.subscribe("sport.football", None) {
        Err(ClientError::Server { code, .. }) => assert_eq!(code, 4403),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_sub_in_flight_during_a_narrowing_refresh_is_refused_and_never_delivered() {
    let s = server(&[]);
    let request = raw::UPGRADE.replace(
        "GET /ws ",
        &format!(
            "GET /ws?token={} ",
            token("u1", 60, &["news", "sport.#"], &[])
        ),
    );
    let mut c = raw::connect(s.addr, request.as_bytes());
    assert!(raw::read_head(&mut c).starts_with("HTTP/1.1 101"));
    raw::read_op(&mut c, "welcome");
    // The sub and the refresh in one write: the refresh is handled before
    // the broker answers the sub (or, if the reads split, just after).
    let mut batch = raw::frame(true, 1, br#"{"op":"sub","id":1,"topic":"sport.live"}"#);
    let auth = json!({"op": "auth", "id": 2, "token": token("u1", 60, &["news"], &[])});
    batch.extend(raw::frame(true, 1, auth.to_string().as_bytes()));
    c.write_all(&batch).unwrap();
    let (mut sub_reply, mut auth_ok, mut ended) = (None, false, false);
    while sub_reply.is_none() || !auth_ok || (sub_reply == Some("ok".to_string()) && !ended) {
        let (op, p) = raw::read_frame(&mut c).expect("replies");
        if op != 1 {
            continue;
        }
        let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
        match (v["op"].as_str().unwrap(), v["id"].as_u64()) {
            ("error", Some(1)) => {
                assert_eq!(v["code"], 4403);
                assert_eq!(v["topic"], "sport.live");
                sub_reply = Some("error".into());
            }
            ("ok", Some(1)) => sub_reply = Some("ok".into()),
            ("ok", Some(2)) => auth_ok = true,
            ("error", None) => {
                assert_eq!(
                    v,
                    json!({"op": "error", "code": 4403, "topic": "sport.live", "reason": ENDED})
                );
                ended = true;
            }
            _ => panic!("{v}"),
        }
    }
    let mut publisher = Client::connect(&url_with(&s, &token("p", 60, &[], &["#"]))).unwrap();
    publisher.publish("sport.live", &json!("goal")).unwrap();
    c.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    while let Some((op, p)) = raw::read_frame(&mut c) {
        assert!(
            op != 1,
            "delivered after the refresh: {}",
            String::from_utf8_lossy(&p)
        );
    }
    assert_eq!(s.metric("ringcast_subscriptions_active"), 0.0);
}
