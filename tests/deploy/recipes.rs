//! Reading the deploy/ files the way their tools would: the YAML through
//! PyYAML (Debian's python3-yaml), the unit's `ExecStart`, the
//! Containerfile's `CMD`, nginx and HAProxy directives by line, and the
//! settings of `ringcast serve --help` they must agree with.
#![allow(unreachable_pub)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

/// deploy/, in this checkout.
pub fn deploy_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy"))
}

/// A deploy/ file's text.
pub fn read(rel: &str) -> String {
    let path = deploy_dir().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A Python 3 that can `import yaml`: the one on PATH, else Debian's.
fn python_with_yaml() -> &'static str {
    for python in ["python3", "/usr/bin/python3"] {
        let ok = Command::new(python)
            .args(["-c", "import yaml"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return python;
        }
    }
    panic!(
        "no python3 with PyYAML: tests/run installs it (apt-get install python3-yaml); \
         the YAML recipes cannot be checked without it"
    )
}

/// Every YAML document of a deploy/ file, as JSON (merge keys resolved).
pub fn yaml_docs(rel: &str) -> Vec<Value> {
    let path = deploy_dir().join(rel);
    let out = Command::new(python_with_yaml())
        .args([
            "-c",
            "import json, sys, yaml\n\
             json.dump(list(yaml.safe_load_all(open(sys.argv[1]))), sys.stdout)",
        ])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} does not parse as YAML:\n{}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let docs: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!docs.is_empty(), "{}: no YAML document", path.display());
    docs
}

/// The one document of deploy/k8s/NAME.yaml, checked to be of `kind`.
pub fn k8s(name: &str, kind: &str) -> Value {
    let mut docs = yaml_docs(&format!("k8s/{name}.yaml"));
    assert_eq!(docs.len(), 1, "k8s/{name}.yaml: one object per file");
    let doc = docs.remove(0);
    assert_eq!(doc["kind"], kind, "k8s/{name}.yaml");
    doc
}

/// deploy/compose.yaml.
pub fn compose() -> Value {
    yaml_docs("compose.yaml").remove(0)
}

/// The ringcast services of compose.yaml: (name, service), in order.
pub fn compose_nodes(compose: &Value) -> Vec<(String, Value)> {
    compose["services"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, s)| s["command"][0] == "serve")
        .map(|(n, s)| (n.clone(), s.clone()))
        .collect()
}

/// The ringcast container of the Deployment.
pub fn k8s_container(deployment: &Value) -> Value {
    let containers = deployment["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap();
    containers
        .iter()
        .find(|c| c["name"] == "ringcast")
        .expect("a container named ringcast")
        .clone()
}

/// A JSON array of strings as a Vec.
pub fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|s| match s {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .collect()
}

/// The unit's `ExecStart` command line, continuation lines joined: the
/// arguments after the binary.
pub fn systemd_args() -> Vec<String> {
    let unit = read("systemd/ringcast.service");
    let joined = unit.replace("\\\n", " ");
    let line = joined
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart=");
    line.split_whitespace().skip(1).map(String::from).collect()
}

/// The value of `key=` in the unit (the last one wins, as in systemd).
pub fn systemd_value(key: &str) -> Option<String> {
    read("systemd/ringcast.service")
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(|v| v.trim().to_string())
}

/// The JSON array of a Containerfile instruction (`CMD [...]`).
pub fn containerfile_exec(instruction: &str) -> Vec<String> {
    let text = read("Containerfile");
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{instruction} ")))
        .unwrap_or_else(|| panic!("no {instruction} in the Containerfile"));
    strings(&serde_json::from_str(line).unwrap())
}

/// Every ringcast command line of the recipes: (where, the arguments
/// from `serve` on).
pub fn recipes() -> Vec<(String, Vec<String>)> {
    let mut out = vec![
        ("systemd/ringcast.service".to_string(), systemd_args()),
        ("Containerfile CMD".to_string(), containerfile_exec("CMD")),
    ];
    let compose = compose();
    for (name, service) in compose_nodes(&compose) {
        out.push((format!("compose.yaml {name}"), strings(&service["command"])));
    }
    let deployment = k8s("deployment", "Deployment");
    out.push((
        "k8s/deployment.yaml".to_string(),
        strings(&k8s_container(&deployment)["args"]),
    ));
    for (name, args) in &out {
        assert_eq!(args.first().map(String::as_str), Some("serve"), "{name}");
    }
    out
}

/// The value of `--flag` in `args` (`--flag value` or `--flag=value`).
pub fn flag(args: &[String], name: &str) -> Option<String> {
    let long = format!("--{name}");
    args.iter().enumerate().find_map(|(i, a)| {
        if *a == long {
            args.get(i + 1).cloned()
        } else {
            a.strip_prefix(&format!("{long}=")).map(String::from)
        }
    })
}

/// `ringcast serve --help`: each flag's block of text.
pub struct Help {
    blocks: Vec<(String, String)>,
}

impl Help {
    pub fn load() -> Help {
        let (_, blocks) = crate::common::serve_help();
        Help { blocks }
    }

    pub fn has(&self, flag: &str) -> bool {
        self.blocks.iter().any(|(f, _)| f == flag)
    }

    /// Whether some setting reads the environment variable `var`.
    pub fn has_env(&self, var: &str) -> bool {
        self.blocks
            .iter()
            .any(|(_, text)| text.contains(&format!("[env: {var}")))
    }

    /// The `[default: ...]` of `--flag`.
    pub fn default(&self, flag: &str) -> String {
        let (_, text) = self
            .blocks
            .iter()
            .find(|(f, _)| f == flag)
            .unwrap_or_else(|| panic!("--{flag} is not in serve --help"));
        let start = text.find("[default: ").expect("a default") + "[default: ".len();
        text[start..].split(']').next().unwrap().to_string()
    }

    /// `--flag` in `args`, else its default.
    pub fn value(&self, args: &[String], name: &str) -> String {
        flag(args, name).unwrap_or_else(|| self.default(name))
    }
}

/// A duration as ringcast, systemd, compose and nginx write them: `20s`,
/// `1m`, `500ms`, `1h`, `1m30s`, or bare seconds.
pub fn duration(text: &str) -> Duration {
    let text = text.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Duration::from_secs(secs);
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let n: u64 = rest[..digits]
            .parse()
            .unwrap_or_else(|_| panic!("duration {text:?}"));
        rest = &rest[digits..];
        let unit = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        total += match &rest[..unit] {
            "ms" => Duration::from_millis(n),
            "s" | "sec" => Duration::from_secs(n),
            "m" | "min" => Duration::from_secs(60 * n),
            "h" => Duration::from_secs(3600 * n),
            other => panic!("duration {text:?}: unit {other:?}"),
        };
        rest = &rest[unit..];
    }
    total
}

/// The port of a `HOST:PORT` or `[V6]:PORT`.
pub fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {addr:?}"))
}

/// Lines of a proxy config with comments stripped, trimmed, non-empty.
pub fn directives(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split('#').next().unwrap().trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

/// The lines of nginx's `upstream ringcast { ... }` block.
pub fn nginx_upstream(conf: &str) -> Vec<String> {
    let lines = directives(conf);
    let start = lines
        .iter()
        .position(|l| l.starts_with("upstream ringcast"))
        .expect("upstream ringcast { ... }");
    lines[start + 1..]
        .iter()
        .take_while(|l| *l != "}")
        .cloned()
        .collect()
}

/// nginx's upstream servers: `host:port` of each `server` line.
pub fn nginx_servers(conf: &str) -> Vec<String> {
    nginx_upstream(conf)
        .iter()
        .filter_map(|l| l.strip_prefix("server "))
        .map(|rest| rest.split_whitespace().next().unwrap().to_string())
        .collect()
}

/// HAProxy's `server` lines of the ringcast backend: (address, check port).
pub fn haproxy_servers(cfg: &str) -> Vec<(String, Option<u16>)> {
    directives(cfg)
        .iter()
        .filter_map(|l| l.strip_prefix("server "))
        .map(|rest| {
            let words: Vec<&str> = rest.split_whitespace().collect();
            let check_port = words
                .windows(2)
                .find(|w| w[0] == "port")
                .map(|w| w[1].parse().unwrap());
            (words[1].to_string(), check_port)
        })
        .collect()
}

/// The value of a one-word directive (`proxy_read_timeout 60s;` →
/// `60s`), every occurrence.
pub fn directive_values(lines: &[String], name: &str) -> Vec<String> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix(&format!("{name} ")))
        .map(|v| v.trim_end_matches(';').trim().to_string())
        .collect()
}
