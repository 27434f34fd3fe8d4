//! Authentication and topic authorization (docs/PROTOCOL.md sections 1 and 5).
//!
//! A token is a JWT: `sub` (the user, required), `exp` (required), `subs`
//! and `pubs` (topic patterns the token may subscribe / publish to; absent
//! means nothing). [`Verifier`] checks signature, algorithm, `exp`, `nbf`
//! and optionally `iss`/`aud`, and turns the claims into an [`Identity`]
//! whose patterns are parsed once. Only the configured algorithm is
//! accepted, so `alg: none` and HS/RS confusion are refused by construction.
//!
//! Pattern grammar: segments separated by `.` or `:`; `*` matches exactly
//! one whole segment; `#`, only as the last segment, matches one or more
//! trailing segments (`user.#` matches `user.42` and `user.42.x`, not `user`).

use std::sync::Arc;

pub use jsonwebtoken::Algorithm;
use jsonwebtoken::{DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Why a token was refused. The text never contains the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The token is past its `exp`.
    #[error("token expired")]
    Expired,
    /// The token is not valid yet (`nbf`).
    #[error("token not valid yet (nbf)")]
    NotYetValid,
    /// Signature, algorithm or format is wrong.
    #[error("invalid token: {0}")]
    Invalid(&'static str),
    /// `iss` or `aud` does not match the configured value.
    #[error("token {0} does not match")]
    Claim(&'static str),
    /// A pattern in `subs`/`pubs` is malformed.
    #[error("token has an invalid topic pattern in {0}")]
    Pattern(&'static str),
}

impl AuthError {
    /// A fixed string for HTTP 401 bodies and close reasons.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Expired => "token expired",
            AuthError::NotYetValid => "token not valid yet",
            AuthError::Invalid(why) => why,
            AuthError::Claim("iss") => "token issuer does not match",
            AuthError::Claim(_) => "token audience does not match",
            AuthError::Pattern(_) => "token has an invalid topic pattern",
        }
    }
}

/// The claims ringcast reads; others are ignored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Topic patterns the token may subscribe to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subs: Vec<String>,
    /// Topic patterns the token may publish to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pubs: Vec<String>,
}

/// One parsed topic pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern(Vec<Segment>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// `*`: exactly one segment.
    One,
    /// `#`: one or more trailing segments.
    Rest,
}

impl Pattern {
    /// Parses a pattern; `None` when it is malformed (empty segment, `#`
    /// not last, `*`/`#` mixed with other characters in a segment).
    pub fn parse(text: &str) -> Option<Pattern> {
        let parts: Vec<&str> = text.split(['.', ':']).collect();
        let last = parts.len() - 1;
        let mut segs = Vec::with_capacity(parts.len());
        for (i, p) in parts.iter().enumerate() {
            segs.push(match *p {
                "" => return None,
                "*" => Segment::One,
                "#" if i == last => Segment::Rest,
                p if p.contains(['*', '#']) => return None,
                p => Segment::Literal(p.to_string()),
            });
        }
        Some(Pattern(segs))
    }

    /// Whether `topic` matches.
    pub fn matches(&self, topic: &str) -> bool {
        let mut parts = topic.split(['.', ':']);
        for seg in &self.0 {
            match (seg, parts.next()) {
                (Segment::Rest, Some(_)) => return true,
                (Segment::One, Some(_)) => {}
                (Segment::Literal(l), Some(p)) if l == p => {}
                _ => return false,
            }
        }
        parts.next().is_none()
    }
}

impl Pattern {
    /// Whether every topic `other` matches, `self` matches too (pattern
    /// contains pattern): what allows a wildcard `sub` of `other` under a
    /// token pattern `self`. Walks both segment by segment: `#` covers any
    /// rest of at least one segment; `*` covers a literal or a `*`; a
    /// literal covers only itself; and a `#` in `other` (any number of
    /// segments) is covered only by a `#`. Exact, not an approximation:
    /// tests/fuzz_auth.rs checks it against enumerating topics.
    pub fn covers(&self, other: &Pattern) -> bool {
        let (mine, theirs) = (&self.0, &other.0);
        for (i, seg) in mine.iter().enumerate() {
            match (seg, theirs.get(i)) {
                (Segment::Rest, Some(_)) => return true,
                (_, None) | (_, Some(Segment::Rest)) => return false,
                (Segment::One, Some(_)) => {}
                (Segment::Literal(a), Some(Segment::Literal(b))) if a == b => {}
                (Segment::Literal(_), Some(_)) => return false,
            }
        }
        theirs.len() == mine.len()
    }

    /// Whether this is a single topic (no `*` or `#`).
    pub fn is_literal(&self) -> bool {
        self.0.iter().all(|s| matches!(s, Segment::Literal(_)))
    }
}

/// What a token allows: its `subs` and `pubs` patterns, parsed. The
/// connections whose tokens carry the same patterns share one
/// ([`GrantsCache`]): users differ, their roles mostly do not.
#[derive(Debug, PartialEq, Eq)]
pub struct Grants {
    subs: Vec<Pattern>,
    pubs: Vec<Pattern>,
    /// The grants of a client without a token (kept here, not in every
    /// [`Identity`], so an identity stays one 64-byte allocation).
    guest: bool,
}

impl Grants {
    fn parse(subs: &[String], pubs: &[String]) -> Result<Grants, AuthError> {
        let parse = |list: &[String], which| -> Result<Vec<Pattern>, AuthError> {
            list.iter()
                .map(|p| Pattern::parse(p).ok_or(AuthError::Pattern(which)))
                .collect()
        };
        Ok(Grants {
            subs: parse(subs, "subs")?,
            pubs: parse(pubs, "pubs")?,
            guest: false,
        })
    }
}

/// A token's `subs` and `pubs`, as written.
type PatternText = (Vec<String>, Vec<String>);

/// The [`Grants`] of the tokens one shard has verified, by their patterns'
/// text, held weakly: an entry lives as long as a connection holds it.
/// Shard-local, so no lock; swept of dead entries as it grows.
#[derive(Debug, Default)]
pub struct GrantsCache {
    map: std::cell::RefCell<std::collections::HashMap<PatternText, std::sync::Weak<Grants>>>,
    /// Entries after the last sweep; the next one comes at twice that.
    swept_at: std::cell::Cell<usize>,
}

impl GrantsCache {
    /// The shared grants of these patterns, parsed the first time.
    fn get(&self, subs: Vec<String>, pubs: Vec<String>) -> Result<Arc<Grants>, AuthError> {
        let mut map = self.map.borrow_mut();
        let key = (subs, pubs);
        if let Some(live) = map.get(&key).and_then(std::sync::Weak::upgrade) {
            return Ok(live);
        }
        let grants = Arc::new(Grants::parse(&key.0, &key.1)?);
        map.insert(key, Arc::downgrade(&grants));
        if map.len() >= 2 * self.swept_at.get().max(64) {
            map.retain(|_, g| g.strong_count() > 0);
            self.swept_at.set(map.len());
        }
        Ok(grants)
    }

    /// Distinct pattern sets held (live or not yet swept).
    pub fn len(&self) -> usize {
        self.map.borrow().len()
    }

    /// True when it holds none.
    pub fn is_empty(&self) -> bool {
        self.map.borrow().is_empty()
    }
}

/// A user id (the `sub` claim): up to [`UserId::INLINE`] bytes kept in
/// place (numeric, Firebase, Auth0 and ObjectId ids fit), a longer one
/// shared. Every connection with a token holds one: kept inline, its
/// identity is one allocation, not two.
#[derive(Clone, PartialEq, Eq)]
pub struct UserId(UserRepr);

#[derive(Clone, PartialEq, Eq)]
enum UserRepr {
    /// `bytes[..len]` is the whole id (copied from a `str`), the rest zero.
    Inline {
        len: u8,
        bytes: [u8; UserId::INLINE],
    },
    Shared(Arc<str>),
}

impl UserId {
    /// The longest id kept inline.
    pub const INLINE: usize = 30;

    /// The id `user`.
    pub fn new(user: &str) -> UserId {
        if user.len() > Self::INLINE {
            return UserId(UserRepr::Shared(Arc::from(user)));
        }
        let mut bytes = [0; Self::INLINE];
        bytes[..user.len()].copy_from_slice(user.as_bytes());
        UserId(UserRepr::Inline {
            len: user.len() as u8,
            bytes,
        })
    }
}

impl std::ops::Deref for UserId {
    type Target = str;

    fn deref(&self) -> &str {
        match &self.0 {
            // Always valid: `new` copied a whole `str` there.
            UserRepr::Inline { len, bytes } => {
                std::str::from_utf8(&bytes[..usize::from(*len)]).unwrap_or_default()
            }
            UserRepr::Shared(s) => s,
        }
    }
}

impl std::fmt::Debug for UserId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&**self, f)
    }
}

/// A verified client: who it is, until when, and what it may do.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The `sub` claim.
    pub user: UserId,
    /// `exp`, seconds since the Unix epoch; `u64::MAX` for anonymous.
    pub expires_at: u64,
    grants: Arc<Grants>,
}

impl Identity {
    /// A client without a token where some namespace admits anonymous
    /// subscribers: no patterns of its own, never expires.
    pub fn guest() -> Identity {
        Identity {
            user: UserId::new(""),
            expires_at: u64::MAX,
            grants: Arc::new(Grants {
                subs: Vec::new(),
                pubs: Vec::new(),
                guest: true,
            }),
        }
    }

    /// Whether this is a [`Identity::guest`] (admitted only to anonymous
    /// namespaces).
    pub fn is_guest(&self) -> bool {
        self.grants.guest
    }

    /// An anonymous client allowed every topic (`--allow-anonymous`).
    pub fn anonymous() -> Identity {
        let all = vec![Segment::Rest];
        Identity {
            user: UserId::new(""),
            expires_at: u64::MAX,
            grants: Arc::new(Grants {
                subs: vec![Pattern(all.clone())],
                pubs: vec![Pattern(all)],
                guest: false,
            }),
        }
    }

    /// Whether this client may subscribe to `topic`.
    pub fn may_subscribe(&self, topic: &str) -> bool {
        self.grants.subs.iter().any(|p| p.matches(topic))
    }

    /// Whether this client may subscribe to the wildcard `pattern`: one
    /// of its `subs` covers every topic the pattern matches.
    pub fn may_subscribe_pattern(&self, pattern: &Pattern) -> bool {
        self.grants.subs.iter().any(|p| p.covers(pattern))
    }

    /// Whether this client may publish to `topic`.
    pub fn may_publish(&self, topic: &str) -> bool {
        self.grants.pubs.iter().any(|p| p.matches(topic))
    }
}

/// How tokens are checked: one key, one algorithm.
#[derive(Clone)]
pub struct Verifier {
    /// One key (no `kid` needed) or a JWKS (tokens name their key by `kid`).
    keys: Vec<VerifyingKey>,
}

/// One key and the only algorithm it accepts.
#[derive(Clone)]
struct VerifyingKey {
    kid: Option<String>,
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys: Vec<_> = self
            .keys
            .iter()
            .map(|k| (&k.kid, &k.validation.algorithms))
            .collect();
        f.debug_struct("Verifier").field("keys", &keys).finish()
    }
}

/// Checks for tokens of one algorithm: signature, `exp` and `nbf` with no
/// leeway, `sub` and `exp` required, `iss`/`aud` required and checked when
/// configured (jsonwebtoken checks them only when present otherwise, so a
/// token without them would pass).
fn validation(alg: Algorithm, issuer: Option<&str>, audience: Option<&str>) -> Validation {
    let mut v = Validation::new(alg);
    v.leeway = 0;
    v.validate_nbf = true;
    let mut required = vec!["exp", "sub"];
    required.extend(issuer.map(|_| "iss"));
    required.extend(audience.map(|_| "aud"));
    v.set_required_spec_claims(&required);
    match issuer {
        Some(i) => v.set_issuer(&[i]),
        None => v.iss = None,
    }
    match audience {
        Some(a) => v.set_audience(&[a]),
        None => v.validate_aud = false,
    }
    v
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

impl Verifier {
    /// HS256 with a shared secret.
    pub fn hmac(secret: &[u8], issuer: Option<&str>, audience: Option<&str>) -> Verifier {
        Self::with(
            DecodingKey::from_secret(secret),
            Algorithm::HS256,
            issuer,
            audience,
        )
    }

    /// RS256 or ES256 with a PEM public key.
    pub fn public_key(
        pem: &[u8],
        alg: Algorithm,
        issuer: Option<&str>,
        audience: Option<&str>,
    ) -> Result<Verifier, String> {
        let key = match alg {
            Algorithm::RS256 => DecodingKey::from_rsa_pem(pem),
            Algorithm::ES256 => DecodingKey::from_ec_pem(pem),
            other => {
                return Err(format!(
                    "unsupported algorithm {other:?} for a public key (use RS256 or ES256)"
                ))
            }
        }
        .map_err(|e| format!("cannot read the public key: {e}"))?;
        Ok(Self::with(key, alg, issuer, audience))
    }

    fn with(
        key: DecodingKey,
        alg: Algorithm,
        issuer: Option<&str>,
        audience: Option<&str>,
    ) -> Verifier {
        Verifier {
            keys: vec![VerifyingKey {
                kid: None,
                key,
                validation: validation(alg, issuer, audience),
            }],
        }
    }

    /// A JWKS document (`{"keys":[...]}`): asymmetric keys only, each with
    /// a `kid` and an `alg`; a token is checked with the key its header names.
    pub fn jwks(
        json: &[u8],
        issuer: Option<&str>,
        audience: Option<&str>,
    ) -> Result<Verifier, String> {
        let set: jsonwebtoken::jwk::JwkSet =
            serde_json::from_slice(json).map_err(|e| format!("not a JWKS document: {e}"))?;
        let mut keys = Vec::with_capacity(set.keys.len());
        for (i, jwk) in set.keys.iter().enumerate() {
            let kid = jwk
                .common
                .key_id
                .clone()
                .ok_or(format!("key {i} has no kid"))?;
            let alg = jwk
                .common
                .key_algorithm
                .and_then(|a| Algorithm::try_from(a).ok())
                .ok_or(format!("key {kid:?} has no supported alg"))?;
            if matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
                return Err(format!(
                    "key {kid:?}: shared-secret keys do not belong in a JWKS"
                ));
            }
            let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("key {kid:?}: {e}"))?;
            keys.push(VerifyingKey {
                kid: Some(kid),
                key,
                validation: validation(alg, issuer, audience),
            });
        }
        if keys.is_empty() {
            return Err("the JWKS has no keys".into());
        }
        Ok(Verifier { keys })
    }

    fn key_for(&self, header: &Header) -> Result<&VerifyingKey, AuthError> {
        if let [only] = self.keys.as_slice() {
            if only.kid.is_none() {
                return Ok(only);
            }
        }
        let kid = header
            .kid
            .as_deref()
            .ok_or(AuthError::Invalid("token names no key (kid)"))?;
        self.keys
            .iter()
            .find(|k| k.kid.as_deref() == Some(kid))
            .ok_or(AuthError::Invalid("token names an unknown key (kid)"))
    }

    /// Checks a token and returns who it is for and what it allows.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        self.verify_shared(token, &GrantsCache::default())
    }

    /// [`Verifier::verify`], the grants shared through `cache` with every
    /// connection whose token carries the same patterns.
    pub fn verify_shared(&self, token: &str, cache: &GrantsCache) -> Result<Identity, AuthError> {
        use jsonwebtoken::errors::ErrorKind as K;
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| AuthError::Invalid("malformed token"))?;
        // RFC 7515 section 4.1.11: extensions listed in `crit` must be
        // understood, and ringcast understands none (jsonwebtoken parses
        // the header but does not check it).
        if header.crit.is_some() {
            return Err(AuthError::Invalid(
                "token has critical header extensions (crit)",
            ));
        }
        let vk = self.key_for(&header)?;
        let data =
            jsonwebtoken::decode::<Claims>(token, &vk.key, &vk.validation).map_err(|e| match e
                .kind()
            {
                K::ExpiredSignature => AuthError::Expired,
                K::ImmatureSignature => AuthError::NotYetValid,
                K::InvalidIssuer => AuthError::Claim("iss"),
                K::InvalidAudience => AuthError::Claim("aud"),
                K::InvalidSignature => AuthError::Invalid("invalid token signature"),
                K::InvalidAlgorithm | K::InvalidAlgorithmName => {
                    AuthError::Invalid("token algorithm not accepted")
                }
                K::MissingRequiredClaim(c) => AuthError::Invalid(match c.as_str() {
                    "iss" => "token lacks the required iss claim",
                    "aud" => "token lacks the required aud claim",
                    _ => "token lacks a required claim (sub, exp)",
                }),
                _ => AuthError::Invalid("malformed token"),
            })?;
        let c = data.claims;
        Ok(Identity {
            user: UserId::new(&c.sub),
            expires_at: c.exp,
            grants: cache.get(c.subs, c.pubs)?,
        })
    }
}

/// Mints an HS256 token (`ringcast token`, tests, the development token).
pub fn mint_hmac(secret: &[u8], claims: &Claims) -> String {
    // Encoding HS256 claims that serialize cannot fail.
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap_or_default()
}

/// Mints an HS256 token that also carries `iss` and `aud` when given, for
/// servers that require them (`--auth-issuer`, `--auth-audience`).
pub fn mint_hmac_for(
    secret: &[u8],
    claims: &Claims,
    issuer: Option<&str>,
    audience: Option<&str>,
) -> String {
    #[derive(Serialize)]
    struct WithRegistered<'a> {
        #[serde(flatten)]
        claims: &'a Claims,
        #[serde(skip_serializing_if = "Option::is_none")]
        iss: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        aud: Option<&'a str>,
    }
    let full = WithRegistered {
        claims,
        iss: issuer,
        aud: audience,
    };
    // As in `mint_hmac`: these claims always serialize.
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &full,
        &EncodingKey::from_secret(secret),
    )
    .unwrap_or_default()
}

/// Mints a token signed with a PEM private key (RS256 or ES256), with an
/// optional `kid` (tests, tooling).
pub fn mint_with_pem(
    pem: &[u8],
    alg: Algorithm,
    kid: Option<&str>,
    claims: &Claims,
) -> Result<String, String> {
    let key = match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(pem),
        Algorithm::ES256 => EncodingKey::from_ec_pem(pem),
        other => return Err(format!("unsupported algorithm {other:?}")),
    }
    .map_err(|e| format!("cannot read the private key: {e}"))?;
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, claims, &key).map_err(|e| e.to_string())
}

/// 32 random bytes from the OS, hex-encoded: an ephemeral development secret.
pub fn random_secret() -> std::io::Result<String> {
    use std::io::Read as _;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ids up to 30 bytes stay inline, longer ones are shared; both read
    /// back whole, compare by content, and an identity stays 48 bytes
    /// (64 with its `Rc`'s counts: one allocation per connection).
    #[test]
    fn user_ids_inline_and_shared() {
        let long = "0123456789abcdef0123456789abcdef-uuid";
        for id in ["", "u1", "é-ü-日本", &"x".repeat(30), &"y".repeat(31), long] {
            let u = UserId::new(id);
            assert_eq!(&*u, id);
            assert_eq!(u, UserId::new(id));
            assert_eq!(format!("{u:?}"), format!("{id:?}"));
            assert_eq!(
                matches!(u.0, UserRepr::Inline { .. }),
                id.len() <= 30,
                "{id}"
            );
        }
        assert_ne!(UserId::new("ann"), UserId::new("bob"));
        assert!(std::mem::size_of::<Identity>() <= 48);
        assert!(Identity::guest().is_guest());
        assert!(!Identity::anonymous().is_guest());
    }

    fn pat(s: &str) -> Pattern {
        Pattern::parse(s).unwrap()
    }

    #[test]
    fn patterns_match_whole_segments() {
        assert!(pat("user.#").matches("user.42"));
        assert!(pat("user.#").matches("user.42.x"));
        assert!(!pat("user.#").matches("user"));
        assert!(pat("chat:*").matches("chat:42"));
        assert!(!pat("chat:*").matches("chat:42:x"));
        assert!(!pat("chat:*").matches("chat"));
        assert!(pat("news").matches("news"));
        assert!(!pat("news").matches("newsroom"));
        assert!(pat("#").matches("anything:at.all"));
        assert!(pat("a.*.c").matches("a:b.c"));
    }

    #[test]
    fn a_pattern_covers_what_it_matches_all_of() {
        let covers = |a: &str, b: &str| pat(a).covers(&pat(b));
        assert!(covers("user.#", "user.42.*"));
        assert!(covers("user.#", "user.#"));
        assert!(covers("user.#", "user.*.x.#"));
        assert!(covers("#", "chat:*"));
        assert!(covers("user.*.*", "user.42.*"));
        assert!(
            covers("chat:*", "chat.*"),
            "`.` and `:` are both separators"
        );
        assert!(!covers("user.*", "user.#"), "# is more than one segment");
        assert!(!covers("user.42.*", "user.*.*"));
        assert!(!covers("user.#", "user"));
        assert!(!covers("user.*", "user.*.x"));
        assert!(!covers("*.x", "#"));
        assert!(pat("a.b").is_literal() && !pat("a.*").is_literal());
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in ["", "a..b", "#.a", "a*", "a.#b", "a.", ":"] {
            assert!(Pattern::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn tokens_with_the_same_patterns_share_their_grants() {
        let v = Verifier::hmac(b"secret", None, None);
        let cache = GrantsCache::default();
        let token = |sub: &str, subs: &[&str]| {
            mint_hmac(
                b"secret",
                &Claims {
                    sub: sub.into(),
                    exp: now_secs() + 60,
                    subs: subs.iter().map(|s| s.to_string()).collect(),
                    pubs: vec!["news".into()],
                },
            )
        };
        let a = v
            .verify_shared(&token("ann", &["news", "chat:*"]), &cache)
            .unwrap();
        let b = v
            .verify_shared(&token("bob", &["news", "chat:*"]), &cache)
            .unwrap();
        let c = v.verify_shared(&token("cy", &["news"]), &cache).unwrap();
        assert!(Arc::ptr_eq(&a.grants, &b.grants), "same patterns, one copy");
        assert!(!Arc::ptr_eq(&a.grants, &c.grants));
        assert_eq!((&*a.user, &*b.user), ("ann", "bob"));
        assert!(b.may_subscribe("chat:7") && !c.may_subscribe("chat:7"));
        assert_eq!(cache.len(), 2);
        // Held weakly: once nobody holds them, a growing cache sweeps them.
        drop((a, b, c));
        for i in 0..200 {
            let _ = v
                .verify_shared(&token("u", &[&format!("t{i}")]), &cache)
                .unwrap();
        }
        assert!(cache.len() < 200, "{} entries kept", cache.len());
        // A bad pattern is still refused, shared or not.
        let bad = v.verify_shared(&token("x", &["a..b"]), &cache);
        assert!(matches!(bad, Err(AuthError::Pattern("subs"))), "{bad:?}");
    }

    fn claims(exp: u64) -> Claims {
        Claims {
            sub: "u1".into(),
            exp,
            subs: vec!["user.u1.#".into()],
            pubs: vec![],
        }
    }

    #[test]
    fn tokens_verify_and_fail_for_the_right_reasons() {
        let v = Verifier::hmac(b"secret", None, None);
        let id = v
            .verify(&mint_hmac(b"secret", &claims(now_secs() + 60)))
            .unwrap();
        assert_eq!(&*id.user, "u1");
        assert!(id.may_subscribe("user.u1.inbox"));
        assert!(!id.may_subscribe("user.u2.inbox"));
        assert!(
            !id.may_publish("user.u1.inbox"),
            "absent pubs allow nothing"
        );
        assert_eq!(
            v.verify(&mint_hmac(b"secret", &claims(now_secs() - 5)))
                .unwrap_err(),
            AuthError::Expired
        );
        assert_eq!(
            v.verify(&mint_hmac(b"other", &claims(now_secs() + 60)))
                .unwrap_err(),
            AuthError::Invalid("invalid token signature")
        );
        assert!(v.verify("not.a.token").is_err());
        assert!(v.verify("").is_err());
        // alg "none": header {"alg":"none","typ":"JWT"}, no signature.
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ1MSIsImV4cCI6OTk5OTk5OTk5OX0.";
        assert!(v.verify(none).is_err());
        let mut bad = claims(now_secs() + 60);
        bad.subs = vec!["a.#.b".into()];
        assert_eq!(
            v.verify(&mint_hmac(b"secret", &bad)).unwrap_err(),
            AuthError::Pattern("subs")
        );
    }

    #[test]
    fn issuer_and_audience_are_checked_when_configured() {
        #[derive(Serialize)]
        struct WithIss<'a> {
            sub: &'a str,
            exp: u64,
            iss: &'a str,
            aud: &'a str,
        }
        let exp = now_secs() + 60;
        let tok = |iss, aud| {
            jsonwebtoken::encode(
                &Header::default(),
                &WithIss {
                    sub: "u",
                    exp,
                    iss,
                    aud,
                },
                &EncodingKey::from_secret(b"k"),
            )
            .unwrap()
        };
        let v = Verifier::hmac(b"k", Some("me"), Some("app"));
        assert!(v.verify(&tok("me", "app")).is_ok());
        let minted = |iss, aud| mint_hmac_for(b"k", &claims(exp), iss, aud);
        assert!(v.verify(&minted(Some("me"), Some("app"))).is_ok());
        assert_eq!(
            v.verify(&minted(None, Some("app"))).unwrap_err(),
            AuthError::Invalid("token lacks the required iss claim"),
            "a missing iss is refused"
        );
        assert_eq!(
            v.verify(&minted(Some("me"), None)).unwrap_err(),
            AuthError::Invalid("token lacks the required aud claim")
        );
        assert!(Verifier::hmac(b"k", None, None)
            .verify(&minted(None, None))
            .is_ok());
        assert_eq!(
            v.verify(&tok("you", "app")).unwrap_err(),
            AuthError::Claim("iss")
        );
        assert_eq!(
            v.verify(&tok("me", "web")).unwrap_err(),
            AuthError::Claim("aud")
        );
    }
}
