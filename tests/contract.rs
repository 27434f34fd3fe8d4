//! The wire contract, docs/PROTOCOL.md, against the code:
//!
//! - every close code and error code the server sends (`protocol::close::ALL`,
//!   `protocol::code::ALL`) is in the tables of its section 4, and every code
//!   there is one the server sends;
//! - no code reaches the wire as a numeric literal at a call site: the
//!   source of `src/` (test modules excluded) passes codes to
//!   `encode_error`, `encode_topic_error`, `encode_close`, `.close` and
//!   `fail` only by name, and the codes `ProtocolError::close_code` returns
//!   are in `close::ALL`;
//! - every `ringcast serve` flag that shows on the wire is in the defaults
//!   table of its section 7, and every flag there is a real one, or is
//!   marked "(planned)" and is not one yet.
//!
//! Each check is a function returning the problems it found, so the tests
//! at the end can show that each one fails on a contract with a hole in it.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use ringcast::protocol::{close, code};

const CONTRACT: &str = "docs/PROTOCOL.md";

fn read(relative: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {relative}: {e}"))
}

// ---------------------------------------------------------------- codes

/// The text of the `## ` section whose heading starts with `heading`, up
/// to the next `## ` heading.
fn section<'a>(doc: &'a str, heading: &str) -> Option<&'a str> {
    let start = doc
        .match_indices("\n## ")
        .map(|(i, _)| i + 1)
        .chain(doc.starts_with("## ").then_some(0))
        .find(|&i| doc[i..].starts_with(heading))?;
    let body = &doc[start..];
    let end = body[1..].find("\n## ").map_or(body.len(), |i| i + 1);
    Some(&body[..end])
}

/// The text under the `### ` heading `heading` of a section, up to the
/// next `### `.
fn subsection<'a>(section: &'a str, heading: &str) -> Option<&'a str> {
    let start = section.find(&format!("{heading}\n"))?;
    let body = &section[start..];
    let end = body[1..].find("\n### ").map_or(body.len(), |i| i + 1);
    Some(&body[..end])
}

/// The numbers in the first cell of the markdown table rows of `text`
/// (header and separator rows have none).
fn table_codes(text: &str) -> Vec<u16> {
    text.lines()
        .filter(|l| l.trim_start().starts_with('|'))
        .filter_map(|l| l.split('|').nth(1))
        .filter_map(|cell| cell.trim().trim_matches('`').parse().ok())
        .collect()
}

/// Where the contract disagrees with the codes the server sends: `kind`
/// codes in `sent` missing from `documented`, and documented ones the
/// server never sends.
fn code_problems(kind: &str, source: &str, sent: &[u16], documented: &[u16]) -> Vec<String> {
    let mut problems = Vec::new();
    for c in sent.iter().filter(|c| !documented.contains(c)) {
        problems.push(format!(
            "{kind} code {c} is sent by the server ({source}) but has no row in the \
             \"### {kind} codes\" table of {CONTRACT} section 4"
        ));
    }
    for c in documented.iter().filter(|c| !sent.contains(c)) {
        problems.push(format!(
            "{kind} code {c} has a row in the \"### {kind} codes\" table of {CONTRACT} \
             section 4 but is not in {source}: the server never sends it"
        ));
    }
    problems
}

/// Every problem between the contract `doc` and the code lists.
fn codes_problems(doc: &str, closes: &[u16], errors: &[u16]) -> Vec<String> {
    let Some(codes) = section(doc, "## 4.") else {
        return vec![format!(
            "{CONTRACT} has no section \"## 4. ...\" (close codes and error codes)"
        )];
    };
    let mut problems = Vec::new();
    for (kind, source, sent) in [
        ("Close", "protocol::close::ALL", closes),
        ("Error", "protocol::code::ALL", errors),
    ] {
        let heading = format!("### {kind} codes");
        match subsection(codes, &heading) {
            Some(text) => problems.extend(code_problems(kind, source, sent, &table_codes(text))),
            None => problems.push(format!(
                "{CONTRACT} section 4 has no \"{heading}\" heading with its table"
            )),
        }
    }
    problems
}

#[test]
fn every_code_the_server_sends_is_in_the_contract() {
    let problems = codes_problems(&read(CONTRACT), &close::ALL, &code::ALL);
    assert!(problems.is_empty(), "\n{}\n", problems.join("\n"));
}

// ---------------------------------------------------------- source scan

/// Calls that put a code on the wire, and which argument (from 0) is it.
const CODE_CALLS: &[(&str, usize)] = &[
    ("encode_error", 1),
    ("encode_topic_error", 1),
    ("encode_close", 0),
    // `Shard::close(conn, why)`, as `shard.close`, `self.close`: `why` is a
    // `protocol::Close`, whose `code()` is the one table of close codes.
    (".close", 1),
    // shard/input.rs: `fail(shard, conn, why)`, the same.
    ("fail", 2),
];

/// `src` with the contents of comments, string and char literals replaced by
/// spaces (line breaks kept), so a scan sees only code, at the same lines.
fn code_only(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = b.to_vec();
    let blank = |out: &mut Vec<u8>, from: usize, to: usize| {
        for c in &mut out[from..to.min(b.len())] {
            if *c != b'\n' {
                *c = b' ';
            }
        }
    };
    let ident = |i: usize| i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_');
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                let end = src[i..].find('\n').map_or(b.len(), |n| i + n);
                blank(&mut out, i, end);
                i = end;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let end = src[i + 2..].find("*/").map_or(b.len(), |n| i + 2 + n + 2);
                blank(&mut out, i, end);
                i = end;
            }
            // Raw strings: r"..", r#".."#, br"..".
            b'r' if !ident(i) || (b[i - 1] == b'b' && !ident(i - 1)) => {
                let hashes = b[i + 1..].iter().take_while(|&&c| c == b'#').count();
                if b.get(i + 1 + hashes) != Some(&b'"') {
                    i += 1;
                    continue;
                }
                let close = format!("\"{}", "#".repeat(hashes));
                let body = i + 2 + hashes;
                let end = src[body..].find(&close).map_or(b.len(), |n| body + n);
                blank(&mut out, body, end);
                i = end + close.len();
            }
            b'"' => {
                let mut j = i + 1;
                while j < b.len() && b[j] != b'"' {
                    j += if b[j] == b'\\' { 2 } else { 1 };
                }
                blank(&mut out, i + 1, j);
                i = j + 1;
            }
            // A char literal ('x', '\n', '\''), not a lifetime ('a).
            b'\'' => {
                let rest = &src[i + 1..];
                let len = if rest.starts_with('\\') {
                    rest[2..].find('\'').map(|n| n + 2)
                } else {
                    rest.chars()
                        .next()
                        .map(char::len_utf8)
                        .filter(|&n| rest[n..].starts_with('\''))
                };
                match len {
                    Some(n) => {
                        blank(&mut out, i + 1, i + 1 + n);
                        i += n + 2;
                    }
                    None => i += 1,
                }
            }
            _ => i += 1,
        }
    }
    String::from_utf8(out).expect("only ASCII bytes were replaced")
}

/// The top-level arguments of the call whose `(` is at `open` in `code`.
fn call_args(code: &str, open: usize) -> Vec<&str> {
    let mut args = Vec::new();
    let (mut depth, mut start) = (0usize, open + 1);
    for (i, c) in code[open..].char_indices().map(|(i, c)| (open + i, c)) {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => {
                depth -= 1;
                if depth == 0 {
                    args.push(&code[start..i]);
                    return args;
                }
            }
            ',' if depth == 1 => {
                args.push(&code[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    args
}

/// Every call in CODE_CALLS in the non-test code of `src` (cut at its first
/// `#[cfg(test)]`) whose code argument is a number, as `file:line: call`.
fn literal_codes(file: &str, src: &str) -> Vec<String> {
    let code = code_only(src);
    let code = &code[..code.find("#[cfg(test)]").unwrap_or(code.len())];
    let mut found = Vec::new();
    for &(name, arg) in CODE_CALLS {
        let call = format!("{name}(");
        for (at, _) in code.match_indices(&call) {
            // `.close(` follows its receiver; a bare name follows no identifier.
            let before = code[..at].chars().next_back();
            let joined =
                !name.starts_with('.') && before.is_some_and(|c| c.is_alphanumeric() || c == '_');
            // A definition (`fn close(`) or part of a longer name.
            if joined || code[..at].trim_end().ends_with("fn") {
                continue;
            }
            let args = call_args(code, at + call.len() - 1);
            let Some(value) = args.get(arg).map(|a| a.trim()) else {
                continue;
            };
            if value.starts_with(|c: char| c.is_ascii_digit()) {
                let line = code[..at].matches('\n').count() + 1;
                found.push(format!(
                    "{file}:{line}: {name}(..) sends the code {value} as a literal: use a \
                     constant of protocol::code (error replies) or protocol::close (close frames)"
                ));
            }
        }
    }
    found
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The numbers `ProtocolError::close_code` returns, read from its body in
/// src/ws/frame.rs; `None` when the function is not found.
fn frame_close_codes(frame_rs: &str) -> Option<Vec<u16>> {
    let start = frame_rs.find("fn close_code(")?;
    let code = code_only(&frame_rs[start..]);
    let open = code.find('{')?;
    let mut depth = 0;
    let end = code[open..].char_indices().find_map(|(i, c)| {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            _ => {}
        }
        (depth == 0).then_some(open + i)
    })?;
    let body = &code[open..end];
    // Number tokens only: `InvalidUtf8` holds no code.
    let tokens = body.split(|c: char| !(c.is_alphanumeric() || c == '_'));
    let numbers = tokens.filter(|t| t.starts_with(|c: char| c.is_ascii_digit()));
    Some(
        numbers
            .filter_map(|t| {
                let digits = t.chars().take_while(|c| c.is_ascii_digit() || *c == '_');
                digits
                    .filter(|c| *c != '_')
                    .collect::<String>()
                    .parse()
                    .ok()
            })
            .collect(),
    )
}

#[test]
fn codes_reach_the_wire_only_by_name() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    assert!(files.len() > 20, "src/ holds only {files:?}");
    let mut problems = Vec::new();
    for path in &files {
        let name = path.strip_prefix(root).unwrap().display().to_string();
        problems.extend(literal_codes(
            &name,
            &std::fs::read_to_string(path).unwrap(),
        ));
    }
    let codes = frame_close_codes(&read("src/ws/frame.rs")).expect(
        "src/ws/frame.rs has no fn close_code: point this test at where close codes come from",
    );
    for c in codes.iter().filter(|c| !close::ALL.contains(c)) {
        problems.push(format!(
            "src/ws/frame.rs: ProtocolError::close_code returns {c}, which is not in \
             protocol::close::ALL (nor, then, in {CONTRACT} section 4)"
        ));
    }
    assert!(problems.is_empty(), "\n{}\n", problems.join("\n"));
}

// ------------------------------------------------------------- defaults

/// `ringcast serve` flags that change nothing a client or producer sees,
/// so the contract's defaults table does not list them; each with why.
const NOT_ON_THE_WIRE: &[(&str, &str)] = &[
    ("help", "not a setting"),
    ("config", "where settings are read from, not a setting"),
    (
        "listen",
        "the address clients dial is the deployment's; the protocol starts at /ws",
    ),
    (
        "admin-listen",
        "the admin port serves operators (metrics, health), not clients",
    ),
    (
        "shards",
        "threads; node and address limits are the flags' totals whatever their number",
    ),
    ("pin-cores", "CPU placement"),
    (
        "data-path",
        "how the server's sockets are polled and written (io_uring or epoll), not what goes on them",
    ),
    ("huge-pages", "memory placement"),
    ("log-format", "the server's log, not the wire"),
    ("stats-log-interval", "the server's log, not the wire"),
    (
        "redis-cache-size",
        "where a recovery is read from (memory or Redis), not its answer",
    ),
    (
        "auth-hmac-secret",
        "which key verifies tokens; the claims (section 5) are the contract",
    ),
    (
        "auth-public-key",
        "which key verifies tokens; the claims (section 5) are the contract",
    ),
    (
        "auth-jwks",
        "which keys verify tokens; the claims (section 5) are the contract",
    ),
    (
        "auth-algorithm",
        "the algorithm of --auth-public-key, chosen with the key",
    ),
];

/// The flags of the defaults table (section 7) of `doc`, each with whether
/// its row is marked "(planned)"; `None` when there is no section 7.
fn defaults_table(doc: &str) -> Option<Vec<(String, bool)>> {
    let text = section(doc, "## 7.")?;
    let mut flags = Vec::new();
    for row in text.lines().filter(|l| l.starts_with("| `--")) {
        let setting = row.split('|').nth(1).unwrap_or_default();
        let planned = setting.contains("(planned)");
        // Backticked words of the first cell: `--flag`, or `--flag VALUE`.
        for word in setting.split('`').skip(1).step_by(2) {
            if let Some(flag) = word.strip_prefix("--") {
                let flag = flag.split(' ').next().unwrap_or_default();
                flags.push((flag.to_string(), planned));
            }
        }
    }
    Some(flags)
}

/// Where the defaults table and `ringcast serve --help` disagree.
fn defaults_problems(
    help: &[String],
    table: &[(String, bool)],
    not_on_the_wire: &[(&str, &str)],
) -> Vec<String> {
    let mut problems = Vec::new();
    let excluded = |f: &str| not_on_the_wire.iter().any(|(x, _)| *x == f);
    for flag in help.iter().filter(|f| !excluded(f)) {
        match table.iter().find(|(f, _)| f == flag) {
            None => problems.push(format!(
                "`ringcast serve --{flag}` has no row in the defaults table of {CONTRACT} \
                 section 7: add one (setting, default, effect on the wire), or list it in \
                 NOT_ON_THE_WIRE in tests/contract.rs with why clients never see it"
            )),
            Some((_, true)) => problems.push(format!(
                "--{flag} is marked (planned) in {CONTRACT} section 7, but `ringcast serve` \
                 has it now: drop the mark and document what it does"
            )),
            Some((_, false)) => {}
        }
    }
    for (flag, planned) in table {
        let exists = help.contains(flag);
        if !planned && !exists {
            problems.push(format!(
                "--{flag} is in the defaults table of {CONTRACT} section 7 but is not a \
                 `ringcast serve` flag: remove the row, or mark it (planned)"
            ));
        }
    }
    for (flag, _) in not_on_the_wire {
        if !help.iter().any(|f| f == flag) {
            problems.push(format!(
                "NOT_ON_THE_WIRE in tests/contract.rs lists --{flag}, which `ringcast serve` \
                 no longer has: remove it"
            ));
        }
    }
    problems
}

#[test]
fn every_serve_flag_on_the_wire_is_in_the_contract_defaults() {
    let (_, blocks) = common::serve_help();
    let help: Vec<String> = blocks.into_iter().map(|(flag, _)| flag).collect();
    assert!(help.len() >= 30, "parsed `serve --help` into only {help:?}");
    let table = defaults_table(&read(CONTRACT))
        .unwrap_or_else(|| panic!("{CONTRACT} has no section \"## 7. ...\" (defaults)"));
    assert!(
        table.len() >= 20,
        "the defaults table of {CONTRACT} section 7 has only {table:?}"
    );
    let problems = defaults_problems(&help, &table, NOT_ON_THE_WIRE);
    assert!(problems.is_empty(), "\n{}\n", problems.join("\n"));
}

// ------------------------------------------- the checks catch each hole

#[test]
fn the_code_check_names_a_missing_and_a_stray_row() {
    let doc = "# x\n\n## 4. Codes\n\n### Close codes\n\n| code | when |\n|---|---|\n\
               | 1000 | normal |\n\n### Error codes\n\n| code | meaning |\n|---|---|\n\
               | `4000` | bad |\n| 4999 | stray |\n\n## 5. Topics\n\n| 4009 | not here |\n";
    let problems = codes_problems(doc, &[1000, 4009], &[4000, 4503]);
    assert_eq!(problems.len(), 3, "{problems:#?}");
    assert!(
        problems[0].contains("Close code 4009 is sent"),
        "{}",
        problems[0]
    );
    assert!(
        problems[1].contains("Error code 4503 is sent"),
        "{}",
        problems[1]
    );
    assert!(
        problems[2].contains("Error code 4999 has a row"),
        "{}",
        problems[2]
    );
    let problems = codes_problems("## 4. Codes\n\n| 1000 | x |\n", &[1000], &[]);
    assert!(
        problems.iter().all(|p| p.contains("no \"### ")),
        "{problems:#?}"
    );
    assert!(codes_problems("## 3. x\n", &[], &[])[0].contains("no section"));
}

#[test]
fn the_source_scan_finds_literal_codes_and_nothing_else() {
    let src = r##"
fn a(shard: &Shard, conn: &Rc<Conn>) {
    shard.close(conn, close::SLOW, "slow, (really)", Disconnect::Slow);
    self.close(
        &conn,
        4009,
        "slow",
        Disconnect::Slow,
    );
    let frame = encode_error(id, code::BAD_REQUEST, &format!("a, {}", b(1, 2)));
    q(encode_topic_error(None, 4403, &t, "r"));
    fail(shard, conn, 1007, "invalid UTF-8");
    fail(&bus, r, "1011");
    // shard.close(conn, 4001, "in a comment", D);
    let s = "encode_error(id, 1011, x)";
    let r = r#"encode_close(1000, "")"#;
    let c = ')';
    encode_close(code, "");
    my_encode_error(id, 4000, "not ours");
}
pub(crate) fn close(&self, conn: &Rc<Conn>, code: u16) {}
#[cfg(test)]
mod tests {
    fn t() { encode_error(None, 4000, "tests may"); }
}
"##;
    let found = literal_codes("src/x.rs", src);
    let want = [
        "src/x.rs:11: encode_topic_error(..) sends the code 4403",
        "src/x.rs:4: .close(..) sends the code 4009",
        "src/x.rs:12: fail(..) sends the code 1007",
    ];
    assert_eq!(found.len(), want.len(), "{found:#?}");
    for w in want {
        assert!(
            found.iter().any(|f| f.starts_with(w)),
            "{w} not in {found:#?}"
        );
    }
    let frame = "impl E {\n    pub fn close_code(&self) -> u16 {\n        match self {\n\
                 \x20           Self::InvalidUtf8 { .. } => 1_007u16, // not 4000\n\
                 \x20           _ => close::PROTOCOL_ERROR,\n        }\n    }\n}\nconst X: u16 = 3;\n";
    assert_eq!(frame_close_codes(frame), Some(vec![1007]));
    assert_eq!(frame_close_codes("fn other() {}"), None);
}

#[test]
fn the_defaults_check_names_each_kind_of_hole() {
    let doc = "## 7. Defaults\n\n| setting | default | effect |\n|---|---|---|\n\
               | `--heartbeat` | 25 s | ping |\n\
               | `--inbound-rate` / `--inbound-burst` | 100 / 200 | 4008 |\n\
               | `--compression` (planned) | true | none |\n\
               | `--gone` | 1 | none |\n\
               | `--echo` (planned) | false | x |\n";
    let table = defaults_table(doc).unwrap();
    assert_eq!(table.len(), 6, "{table:?}");
    assert!(table.contains(&("inbound-burst".into(), false)));
    let help: Vec<String> = [
        "heartbeat",
        "inbound-rate",
        "inbound-burst",
        "echo",
        "outbound-queue",
        "listen",
    ]
    .map(String::from)
    .to_vec();
    let problems = defaults_problems(&help, &table, &[("listen", "x"), ("shards", "y")]);
    assert_eq!(problems.len(), 4, "{problems:#?}");
    assert!(
        problems[0].starts_with("--echo is marked (planned)"),
        "{}",
        problems[0]
    );
    assert!(
        problems[1].starts_with("`ringcast serve --outbound-queue` has no row"),
        "{}",
        problems[1]
    );
    assert!(
        problems[2].starts_with("--gone is in the defaults table"),
        "{}",
        problems[2]
    );
    assert!(problems[3].contains("lists --shards"), "{}", problems[3]);
    assert!(defaults_table("## 6. x\n").is_none());
}
