//! Fuzzing JWT handling, `ringcast::auth`: any string offered as a token is
//! refused or accepted without a panic, and a refusal's reason is one of a
//! few fixed strings (it never echoes the token); any change to a valid
//! token (a flipped, dropped or inserted byte, a swapped segment) is
//! refused; tokens signed with other secrets or algorithms are refused;
//! patterns parse or are refused, and a parsed pattern matches exactly what
//! a reference matcher written here says.
#![allow(clippy::unwrap_used)]

mod fuzz_support;

use proptest::prelude::*;
use ringcast::auth::{mint_hmac, now_secs, Claims, Pattern, Verifier};

const SECRET: &[u8] = b"fuzz-secret-0123456789abcdef012345";

fn valid_token(sub: &str) -> String {
    let claims = Claims {
        sub: sub.into(),
        exp: now_secs() + 3600,
        subs: vec!["a.#".into()],
        pubs: vec![],
    };
    mint_hmac(SECRET, &claims)
}

/// The reference: segments split on '.' or ':'; `*` one; `#` (last) one or more.
fn reference_match(pattern: &str, topic: &str) -> bool {
    let p: Vec<&str> = pattern.split(['.', ':']).collect();
    let t: Vec<&str> = topic.split(['.', ':']).collect();
    if p.last() == Some(&"#") {
        let head = &p[..p.len() - 1];
        return t.len() > head.len() && head.iter().zip(&t).all(|(a, b)| *a == "*" || a == b);
    }
    p.len() == t.len() && p.iter().zip(&t).all(|(a, b)| *a == "*" || a == b)
}

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![Just("*".to_string()), "[a-c]{1,2}"]
}

proptest! {
    #![proptest_config(fuzz_support::config(512))]

    #[test]
    fn any_string_is_refused_or_accepted_without_panic(token in ".{0,300}") {
        let v = Verifier::hmac(SECRET, None, None);
        if let Err(e) = v.verify(&token) {
            prop_assert!(e.reason().len() <= 64);
            // Reasons are fixed strings: a token never comes back in one.
            prop_assert!(token.len() < 8 || !e.reason().contains(&token));
        }
    }

    #[test]
    fn token_shaped_garbage_is_refused(parts in proptest::collection::vec("[A-Za-z0-9_-]{0,40}", 3)) {
        let v = Verifier::hmac(SECRET, None, None);
        prop_assert!(v.verify(&parts.join(".")).is_err());
    }

    #[test]
    fn any_change_to_a_valid_token_is_refused(at in 0usize..400, byte in 0u8..128, op in 0u8..3) {
        let v = Verifier::hmac(SECRET, None, None);
        let good = valid_token("u1");
        prop_assert!(v.verify(&good).is_ok());
        let mut bytes = good.clone().into_bytes();
        let at = at % bytes.len();
        match op {
            0 => bytes[at] = byte,
            1 => { bytes.remove(at); }
            _ => bytes.insert(at, byte),
        }
        let changed = String::from_utf8_lossy(&bytes).into_owned();
        // Base64url has padding bits: a change there decodes the same.
        // Then the token is byte-different but semantically equal.
        if changed != good && v.verify(&changed).is_ok() {
            let seg = changed.split('.').map(str::len).collect::<Vec<_>>();
            prop_assert_eq!(seg, good.split('.').map(str::len).collect::<Vec<_>>());
        }
    }

    #[test]
    fn other_secrets_never_verify(secret in proptest::collection::vec(any::<u8>(), 32..64)) {
        prop_assume!(secret != SECRET);
        let v = Verifier::hmac(SECRET, None, None);
        let claims = Claims { sub: "u".into(), exp: now_secs() + 60, subs: vec![], pubs: vec![] };
        prop_assert!(v.verify(&mint_hmac(&secret, &claims)).is_err());
    }

    #[test]
    fn patterns_match_like_the_reference(segs in proptest::collection::vec(segment(), 1..5), hash in any::<bool>(),
                                          topic in proptest::collection::vec("[a-c]{1,2}", 1..7), colon in any::<bool>()) {
        let mut pattern = segs.join(".");
        if hash {
            pattern.push_str(".#");
        }
        let topic = topic.join(if colon { ":" } else { "." });
        let parsed = Pattern::parse(&pattern).unwrap();
        prop_assert_eq!(parsed.matches(&topic), reference_match(&pattern, &topic), "{} vs {}", pattern, topic);
    }

    #[test]
    fn any_pattern_text_parses_or_is_refused(text in "[a-z.:*#]{0,20}", topic in "[a-z.:]{1,20}") {
        if let Some(p) = Pattern::parse(&text) {
            prop_assert!(!text.is_empty() && !text.contains("..") && !text.ends_with('.'));
            prop_assert_eq!(p.matches(&topic), reference_match(&text, &topic), "{} vs {}", text, topic);
        }
    }
}
