#!/usr/bin/env python3
"""Writes the JWT seed corpus, tests/corpus/jwt/: one token per file,
replayed by tests/fuzz_auth.rs against Verifier::hmac(SECRET, Some(ISS),
Some(AUD)). File names start with the expected class: ok, expired, nbf,
iss, aud, pattern, invalid. Times are fixed far from now (2001, 2100) so
the classes hold for decades. Run: python3 tests/corpus/make_jwt.py
"""
import base64
import hashlib
import hmac
import json
import os

SECRET = b"corpus-secret-0123456789abcdef0123"  # same as tests/fuzz_auth.rs
ISS = "https://id.example"
AUD = "clients"
FUTURE = 4102444800  # 2100-01-01
PAST = 1000000000  # 2001-09-09
DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "jwt")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def seg(obj) -> str:
    return b64(obj if isinstance(obj, bytes) else json.dumps(obj, separators=(",", ":")).encode())


def sign(header, payload, key=SECRET, digest=hashlib.sha256) -> str:
    head = seg(header) + "." + seg(payload)
    return head + "." + b64(hmac.new(key, head.encode(), digest).digest())


def claims(**extra):
    c = {"sub": "u1", "exp": FUTURE, "iss": ISS, "aud": AUD}
    c.update(extra)
    return {k: v for k, v in c.items() if v is not None}


HS = {"alg": "HS256", "typ": "JWT"}
good = sign(HS, claims())

cases = {
    "ok-minimal": good,
    "ok-with-patterns": sign(HS, claims(subs=["user.u1.#", "chat:*"], pubs=["chat:*"])),
    "ok-audience-list": sign(HS, claims(aud=["other", AUD])),
    "ok-extra-claims": sign(HS, claims(iat=PAST, jti="x1", role={"admin": False})),
    "ok-kid-ignored-with-one-key": sign({"alg": "HS256", "kid": "whatever"}, claims()),
    "ok-no-typ": sign({"alg": "HS256"}, claims()),
    "ok-nbf-past": sign(HS, claims(nbf=PAST)),
    "ok-exp-u64-max": sign(HS, claims(exp=18446744073709551615)),
    "ok-unicode-sub": sign(HS, claims(sub="\u00fcser-\u2713")),
    "expired-2001": sign(HS, claims(exp=PAST)),
    "nbf-2100": sign(HS, claims(nbf=FUTURE - 100)),
    "iss-other": sign(HS, claims(iss="https://evil.example")),
    "iss-list": sign(HS, claims(iss=["https://evil.example"])),
    "aud-other": sign(HS, claims(aud="web")),
    "aud-empty-list": sign(HS, claims(aud=[])),
    "pattern-bad-subs": sign(HS, claims(subs=["a..b"])),
    "pattern-hash-not-last": sign(HS, claims(pubs=["#.x"])),
    "invalid-missing-iss": sign(HS, claims(iss=None)),
    "invalid-missing-aud": sign(HS, claims(aud=None)),
    "invalid-missing-sub": sign(HS, claims(sub=None)),
    "invalid-missing-exp": sign(HS, claims(exp=None)),
    "invalid-sub-number": sign(HS, claims(sub=42)),
    "invalid-exp-string": sign(HS, claims(exp=str(FUTURE))),
    "invalid-exp-negative": sign(HS, claims(exp=-1)),
    "invalid-exp-float-huge": sign(HS, claims(exp=1e30)),
    "invalid-nbf-string": sign(HS, claims(nbf="soon")),
    "invalid-subs-not-a-list": sign(HS, claims(subs="news")),
    "invalid-subs-null": sign(HS, claims(subs=None) | {"subs": None}),
    "invalid-payload-array": sign(HS, ["u1", FUTURE]),
    # serde_json skips an unknown field without recursing: no depth limit, no stack
    # overflow (53 KB: fits an auth frame under the default 64 KiB message limit).
    "ok-payload-unknown-field-nested-20000-deep": sign(HS, json.dumps(claims())[:-1].encode()
                                                        + b',"x":' + b"[" * 20000 + b"]" * 20000 + b"}"),
    "invalid-header-not-json": sign(b"{alg:HS256}", claims()),
    "invalid-header-array": sign(["HS256"], claims()),
    "invalid-crit-header": sign({"alg": "HS256", "crit": ["exp"]}, claims()),
    "invalid-alg-none": seg({"alg": "none", "typ": "JWT"}) + "." + seg(claims()) + ".",
    "invalid-alg-none-lowercase-signed": sign({"alg": "none"}, claims()),
    "invalid-alg-hs384": sign({"alg": "HS384"}, claims(), digest=hashlib.sha384),
    "invalid-alg-hs512": sign({"alg": "HS512"}, claims(), digest=hashlib.sha512),
    "invalid-alg-rs256-header-hmac-signature": sign({"alg": "RS256"}, claims()),
    "invalid-alg-unknown": sign({"alg": "XS256"}, claims()),
    "invalid-signature-other-secret": sign(HS, claims(), key=b"another-secret-0123456789abcdef012"),
    "invalid-signature-truncated": good[:-3],
    "invalid-signature-empty": good.rsplit(".", 1)[0] + ".",
    "invalid-signature-padded": good + "=",
    "invalid-two-segments": good.rsplit(".", 1)[0],
    "invalid-four-segments": good + "." + good.split(".")[2],
    "invalid-not-base64": good.replace(good.split(".")[1], "!!!!", 1),
    "invalid-standard-base64-alphabet": good.replace("-", "+").replace("_", "/") if ("-" in good or "_" in good) else good[:-1] + "+",
    "invalid-whitespace-around": " " + good + "\n",
    "invalid-empty": "",
    "invalid-dots-only": "..",
    "invalid-non-ascii": good[:10] + "\u00e9" + good[11:],
    "invalid-payload-swapped-from-other-token": good.split(".")[0] + "." + seg(claims(sub="admin")) + "." + good.split(".")[2],
}


def main():
    os.makedirs(DIR, exist_ok=True)
    for f in os.listdir(DIR):
        os.remove(os.path.join(DIR, f))
    for name, token in cases.items():
        with open(os.path.join(DIR, name + ".jwt"), "w", encoding="utf-8") as f:
            f.write(token)


if __name__ == "__main__":
    main()
