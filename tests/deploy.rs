//! The deploy/ recipes. What cannot run here (Kubernetes, image builds,
//! compose) is checked by structure: the YAML parses, and ports, probes,
//! flags, timeouts and grace periods agree with each other and with
//! `ringcast serve --help`; each recipe's command line starts a real node.
//! nginx and HAProxy run for real: `nginx -t` / `haproxy -c` on the
//! configs, then each in front of two nodes on one Redis, through which
//! clients subscribe, receive what the other node publishes, and survive a
//! drain of one node under load (`through_*_a_drained_nodes_clients_...`).
#![allow(clippy::unwrap_used)]

mod common;

#[path = "deploy/drain.rs"]
mod drain;
#[path = "deploy/proxy.rs"]
mod proxy;
#[path = "deploy/recipes.rs"]
mod recipes;

use std::collections::HashSet;
use std::time::Duration;

use serde_json::Value;

use common::redis::TestRedis;
use common::TestServer;
use proxy::{Kind, Node};
use recipes::{duration, flag, port_of, strings, Help};
use ringcast::client::Client;

/// ringcast's own grace after the drain window before it exits anyway
/// (README, Shutdown): every stop timeout must cover window + this.
const EXIT_GRACE: Duration = Duration::from_secs(5);

#[test]
fn yaml_recipes_parse_into_the_objects_they_promise() {
    let compose = recipes::compose();
    let services = compose["services"].as_object().expect("services");
    for name in ["redis", "ringcast-1", "ringcast-2", "nginx"] {
        assert!(services.contains_key(name), "compose.yaml: no {name}");
    }
    assert_eq!(recipes::compose_nodes(&compose).len(), 2, "two nodes");
    for (file, kind) in [
        ("deployment", "Deployment"),
        ("service", "Service"),
        ("pdb", "PodDisruptionBudget"),
        ("hpa", "HorizontalPodAutoscaler"),
    ] {
        let doc = recipes::k8s(file, kind);
        assert_eq!(doc["metadata"]["name"], "ringcast", "k8s/{file}.yaml");
    }
}

#[test]
fn every_flag_and_variable_in_a_recipe_is_a_serve_setting() {
    let help = Help::load();
    for (recipe, args) in recipes::recipes() {
        for arg in args.iter().filter(|a| a.starts_with("--")) {
            let name = arg[2..].split('=').next().unwrap();
            assert!(
                help.has(name),
                "{recipe}: {arg} is not in `ringcast serve --help`"
            );
        }
    }
    let deployment = recipes::k8s("deployment", "Deployment");
    let container = recipes::k8s_container(&deployment);
    let compose = recipes::compose();
    let mut vars: Vec<String> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect();
    for (_, service) in recipes::compose_nodes(&compose) {
        vars.extend(service["environment"].as_object().unwrap().keys().cloned());
    }
    for var in vars.iter().filter(|v| v.starts_with("RINGCAST_")) {
        assert!(help.has_env(var), "{var} is not a setting of serve --help");
    }
}

#[test]
fn every_recipe_starts_a_node_with_its_own_flags() {
    let redis = TestRedis::start();
    for (recipe, args) in recipes::recipes() {
        // Only the host-specific values change: ports (free ones), Redis
        // (this test's), the pod name Kubernetes would fill in.
        let mut extra: Vec<String> = Vec::new();
        let mut it = args[1..].iter();
        while let Some(arg) = it.next() {
            match arg.as_str() {
                "--listen" | "--admin-listen" | "--redis" => {
                    it.next();
                }
                "--node-name" => {
                    it.next();
                    extra.extend(["--node-name".into(), "pod-0".into()]);
                }
                _ => extra.push(arg.clone()),
            }
        }
        extra.extend(["--redis".into(), redis.url()]);
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let mut server = TestServer::try_start(&extra, &[])
            .unwrap_or_else(|log| panic!("{recipe}: the node did not start: {log}"));
        assert_eq!(
            server.admin_request("GET", "/readyz", &[], "").0,
            200,
            "{recipe}"
        );
        assert_eq!(server.admin_request("GET", "/healthz", &[], "").0, 200);
        let status = server.terminate(Duration::from_secs(10));
        assert!(
            status.is_some_and(|s| s.success()),
            "{recipe}: {status:?}\n{}",
            server.log()
        );
    }
}

/// The drain window a recipe's node runs with.
fn drain_window(help: &Help, args: &[String]) -> Duration {
    duration(&help.value(args, "drain-window"))
}

#[test]
fn stop_timeouts_cover_the_drain_window_plus_the_exit_grace() {
    let help = Help::load();
    // systemd: SIGTERM, then TimeoutStopSec before SIGKILL.
    let unit_args = recipes::systemd_args();
    let stop = duration(&recipes::systemd_value("TimeoutStopSec").expect("TimeoutStopSec"));
    let needed = drain_window(&help, &unit_args) + EXIT_GRACE;
    assert!(stop >= needed, "TimeoutStopSec {stop:?} < {needed:?}");
    assert_eq!(
        recipes::systemd_value("KillSignal").as_deref(),
        Some("SIGTERM")
    );
    // The image stops with SIGTERM too (the drain).
    assert!(recipes::read("Containerfile")
        .lines()
        .any(|l| l.trim() == "STOPSIGNAL SIGTERM"));
    // compose: stop_grace_period per node.
    for (name, service) in recipes::compose_nodes(&recipes::compose()) {
        let grace = duration(
            service["stop_grace_period"]
                .as_str()
                .expect("stop_grace_period"),
        );
        let needed = drain_window(&help, &strings(&service["command"])) + EXIT_GRACE;
        assert!(
            grace >= needed,
            "{name}: stop_grace_period {grace:?} < {needed:?}"
        );
        assert_eq!(service["stop_signal"], "SIGTERM", "{name}");
    }
    // Kubernetes: the grace period counts from the preStop hook.
    let deployment = recipes::k8s("deployment", "Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = recipes::k8s_container(&deployment);
    let pre_stop = strings(&container["lifecycle"]["preStop"]["exec"]["command"]);
    assert_eq!(pre_stop[0], "sleep", "preStop: {pre_stop:?}");
    let sleep = duration(&pre_stop[1]);
    assert!(sleep >= Duration::from_secs(1), "preStop sleeps {sleep:?}");
    let grace = Duration::from_secs(pod["terminationGracePeriodSeconds"].as_u64().unwrap());
    let needed = sleep + drain_window(&help, &strings(&container["args"])) + EXIT_GRACE;
    assert!(
        grace >= needed,
        "terminationGracePeriodSeconds {grace:?} < preStop + drain window + 5 s = {needed:?}"
    );
}

/// The admin port of a recipe's node.
fn admin_port(help: &Help, args: &[String]) -> u16 {
    port_of(&help.value(args, "admin-listen"))
}

/// The client port of a recipe's node.
fn listen_port(help: &Help, args: &[String]) -> u16 {
    port_of(&help.value(args, "listen"))
}

#[test]
fn probes_and_health_checks_ask_the_admin_port() {
    let help = Help::load();
    // Kubernetes: readiness /readyz, liveness /healthz, on the port named
    // for --admin-listen's.
    let deployment = recipes::k8s("deployment", "Deployment");
    let container = recipes::k8s_container(&deployment);
    let admin = admin_port(&help, &strings(&container["args"]));
    let port_named = |name: &Value| -> u16 {
        if let Some(n) = name.as_u64() {
            return n as u16;
        }
        container["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == *name)
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("no container port {name}")) as u16
    };
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(port_named(&get["port"]), admin, "{probe} port");
    }
    // Readiness drops a draining pod fast: a check every few seconds.
    let period = container["readinessProbe"]["periodSeconds"]
        .as_u64()
        .unwrap();
    assert!(period <= 5, "readiness every {period} s");
    // compose: the health check asks /readyz on the admin port.
    for (name, service) in recipes::compose_nodes(&recipes::compose()) {
        let test = strings(&service["healthcheck"]["test"]).join(" ");
        let admin = admin_port(&help, &strings(&service["command"]));
        assert!(
            test.contains(&format!("/dev/tcp/127.0.0.1/{admin}")) && test.contains("/readyz"),
            "{name}: {test}"
        );
    }
    // HAProxy: `check port` = the unit's --admin-listen port, on /readyz.
    let cfg = recipes::read("haproxy/haproxy.cfg");
    let admin = admin_port(&help, &recipes::systemd_args());
    for (addr, check) in recipes::haproxy_servers(&cfg) {
        assert_eq!(check, Some(admin), "server {addr}: check port");
    }
    let lines = recipes::directives(&cfg);
    assert!(lines
        .iter()
        .any(|l| l == "http-check send meth GET uri /readyz"));
    assert!(lines.iter().any(|l| l == "http-check expect status 200"));
}

#[test]
fn the_compose_health_check_follows_readiness_on_a_real_node() {
    let test = strings(&recipes::compose_nodes(&recipes::compose())[0].1["healthcheck"]["test"]);
    assert_eq!(test[..3], ["CMD", "bash", "-c"]);
    let server = TestServer::start(&["--drain-window", "5s"]);
    let script = test[3].replace(
        "/dev/tcp/127.0.0.1/9090",
        &format!("/dev/tcp/127.0.0.1/{}", server.admin.port()),
    );
    let check = || {
        std::process::Command::new("bash")
            .args(["-c", &script])
            .status()
            .unwrap()
            .success()
    };
    assert!(check(), "healthy while ready: {script}");
    // A client keeps the node in its drain window.
    let _client = Client::connect(&server.url()).unwrap();
    server.signal_term();
    server.wait_for("readyz 503", Duration::from_secs(5), |s| {
        s.admin_request("GET", "/readyz", &[], "").0 == 503
    });
    assert!(!check(), "unhealthy while draining");
}

#[test]
fn proxies_send_to_the_listen_port_by_least_connections() {
    let help = Help::load();
    let unit = listen_port(&help, &recipes::systemd_args());
    let sticky = [
        "ip_hash",
        "hash ",
        "sticky",
        "cookie",
        "stick on",
        "balance source",
        "balance uri",
        "balance hdr",
    ];
    // nginx
    let conf = recipes::read("nginx/ringcast.conf");
    let upstream = recipes::nginx_upstream(&conf);
    assert!(upstream.iter().any(|l| l == "least_conn;"), "{upstream:?}");
    assert!(
        upstream.iter().any(|l| l.starts_with("zone ")),
        "least_conn shared by the workers: {upstream:?}"
    );
    let servers = recipes::nginx_servers(&conf);
    assert!(servers.len() >= 2);
    for s in &servers {
        assert_eq!(
            port_of(s),
            unit,
            "nginx server {s}: the unit's --listen port"
        );
    }
    // The same servers are compose's nodes: address and --listen port.
    let compose = recipes::compose();
    let nodes: Vec<String> = recipes::compose_nodes(&compose)
        .iter()
        .map(|(_, s)| {
            let ip = s["networks"]["ringcast"]["ipv4_address"].as_str().unwrap();
            format!("{ip}:{}", listen_port(&help, &strings(&s["command"])))
        })
        .collect();
    assert_eq!(servers, nodes, "nginx's upstream = compose's nodes");
    // HAProxy
    let cfg = recipes::read("haproxy/haproxy.cfg");
    let lines = recipes::directives(&cfg);
    assert!(lines.iter().any(|l| l == "balance leastconn"));
    for (addr, _) in recipes::haproxy_servers(&cfg) {
        assert_eq!(port_of(&addr), unit, "haproxy server {addr}");
    }
    for line in recipes::directives(&conf).iter().chain(&lines) {
        for s in sticky {
            assert!(!line.starts_with(s), "sticky sessions: {line}");
        }
    }
    // Kubernetes: the Service reaches the container's --listen port, with
    // no affinity.
    let deployment = recipes::k8s("deployment", "Deployment");
    let container = recipes::k8s_container(&deployment);
    let listen = listen_port(&help, &strings(&container["args"]));
    let service = recipes::k8s("service", "Service");
    assert_eq!(service["spec"]["sessionAffinity"], "None");
    let target = &service["spec"]["ports"][0]["targetPort"];
    let port = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == *target || p["containerPort"] == *target)
        .and_then(|p| p["containerPort"].as_u64())
        .expect("the Service's targetPort is a container port");
    assert_eq!(port, u64::from(listen));
    // The image exposes what its CMD listens on.
    let cmd = recipes::containerfile_exec("CMD");
    let exposed: Vec<u16> = recipes::read("Containerfile")
        .lines()
        .filter_map(|l| l.strip_prefix("EXPOSE "))
        .flat_map(|ports| ports.split_whitespace().map(|p| p.parse().unwrap()))
        .collect();
    assert!(exposed.contains(&listen_port(&help, &cmd)), "{exposed:?}");
    assert!(exposed.contains(&admin_port(&help, &cmd)), "{exposed:?}");
}

#[test]
fn proxy_timeouts_exceed_two_heartbeats() {
    let help = Help::load();
    // Every recipe runs with the same heartbeat (the default unless set).
    let heartbeats: HashSet<Duration> = recipes::recipes()
        .iter()
        .map(|(_, args)| duration(&help.value(args, "heartbeat")))
        .collect();
    assert_eq!(heartbeats.len(), 1, "{heartbeats:?}");
    let two = 2 * *heartbeats.iter().next().unwrap();
    let nginx = recipes::directives(&recipes::read("nginx/ringcast.conf"));
    for name in ["proxy_read_timeout", "proxy_send_timeout"] {
        let values = recipes::directive_values(&nginx, name);
        assert!(!values.is_empty(), "nginx sets {name}");
        for v in values {
            assert!(duration(&v) > two, "nginx {name} {v} <= {two:?}");
        }
    }
    let haproxy = recipes::directives(&recipes::read("haproxy/haproxy.cfg"));
    for name in ["tunnel", "client", "server"] {
        let values = recipes::directive_values(&haproxy, &format!("timeout {name}"));
        assert!(!values.is_empty(), "haproxy sets timeout {name}");
        for v in values {
            assert!(duration(&v) > two, "haproxy timeout {name} {v} <= {two:?}");
        }
    }
}

/// HAProxy log-format variables (`%ci`, `%{+Q}r`, ...) by name.
fn haproxy_log_variables(format: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = format;
    while let Some(i) = rest.find('%') {
        rest = &rest[i + 1..];
        if let Some(after) = rest.strip_prefix('{') {
            rest = &after[after.find('}').map_or(0, |j| j + 1)..];
        }
        let end = rest
            .find(|c: char| !c.is_ascii_alphanumeric())
            .unwrap_or(rest.len());
        out.push(rest[..end].to_string());
        rest = &rest[end..];
    }
    out
}

#[test]
fn access_logs_leave_out_the_query_string() {
    let conf = recipes::read("nginx/ringcast.conf");
    let lines = recipes::directives(&conf);
    // Every access log names a format defined here (nginx's default,
    // `combined`, logs $request: the whole request line).
    let formats: Vec<String> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("log_format "))
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect();
    let logs = recipes::directive_values(&lines, "access_log");
    assert!(!logs.is_empty());
    for log in logs {
        let words: Vec<&str> = log.split_whitespace().collect();
        assert!(
            words[0] == "off" || words.get(1).is_some_and(|f| formats.iter().any(|d| d == f)),
            "access_log {log}: with a format of this file"
        );
    }
    // No variable carrying the query string in any format.
    let body = lines.join("\n");
    let statements = body.split(';').filter(|s| s.contains("log_format"));
    for statement in statements {
        let mut rest = statement;
        while let Some(i) = rest.find('$') {
            rest = &rest[i + 1..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            let var = &rest[..end];
            assert!(
                !["request", "request_uri", "args", "query_string", "is_args"].contains(&var)
                    && !var.starts_with("arg_"),
                "nginx log_format logs ${var}, which carries the query string (tokens)"
            );
        }
    }
    // Error-level lines quote the request line: the error log stays at crit.
    for v in recipes::directive_values(&lines, "error_log") {
        assert!(v.ends_with(" crit"), "error_log {v}");
    }
    // HAProxy: a log-format without %r (the request line), %HU (the URI)
    // or %HQ (the query string), and never the default `option httplog`.
    let cfg = recipes::directives(&recipes::read("haproxy/haproxy.cfg"));
    let formats = recipes::directive_values(&cfg, "log-format");
    assert!(!formats.is_empty(), "HAProxy sets its own log-format");
    for f in formats {
        let vars = haproxy_log_variables(&f);
        assert!(vars.iter().any(|v| v == "HPO"), "logs the path: {f}");
        for bad in ["r", "HU", "HQ"] {
            assert!(!vars.iter().any(|v| v == bad), "log-format has %{bad}: {f}");
        }
    }
    assert!(!cfg.iter().any(|l| l.starts_with("option httplog")));
    assert_eq!(haproxy_log_variables("%ci %{+Q}r %rc"), ["ci", "r", "rc"]);
}

#[test]
fn the_systemd_unit_holds_every_connection_and_is_hardened() {
    let help = Help::load();
    let args = recipes::systemd_args();
    let max: u64 = help.value(&args, "max-connections").parse().unwrap();
    let nofile: u64 = recipes::systemd_value("LimitNOFILE")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        nofile >= max + ringcast::server::FD_RESERVE,
        "LimitNOFILE {nofile} < --max-connections {max} + {}",
        ringcast::server::FD_RESERVE
    );
    assert_eq!(
        recipes::systemd_value("LimitMEMLOCK").as_deref(),
        Some("infinity")
    );
    for (key, value) in [
        ("NoNewPrivileges", "yes"),
        ("DynamicUser", "yes"),
        ("CapabilityBoundingSet", ""),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectControlGroups", "yes"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("RestrictNamespaces", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallArchitectures", "native"),
    ] {
        assert_eq!(
            recipes::systemd_value(key).as_deref(),
            Some(value),
            "systemd {key}"
        );
    }
    let filter = recipes::systemd_value("SystemCallFilter").unwrap();
    for call in ["@system-service", "io_uring_setup", "io_uring_enter"] {
        assert!(filter.contains(call), "SystemCallFilter {filter}");
    }
    // Behind a proxy the nodes trust it to name each client, and keep the
    // per-address limits as they are (they count real clients).
    for (name, args) in recipes::recipes() {
        if name.starts_with("Containerfile") {
            continue;
        }
        let trusted = flag(&args, "trusted-proxies").unwrap_or_default();
        assert!(
            !trusted.is_empty()
                && trusted
                    .split(',')
                    .all(|r| r.parse::<ringcast::config::Cidr>().is_ok()),
            "{name}: --trusted-proxies {trusted:?}"
        );
        for limit in ["max-connections-per-ip", "max-handshakes-per-ip"] {
            assert_eq!(
                flag(&args, limit),
                None,
                "{name}: --{limit} left at its default"
            );
        }
    }
    // compose trusts its own nginx, and nothing wider.
    let compose = recipes::compose();
    let nginx_ip = compose["services"]["nginx"]["networks"]["ringcast"]["ipv4_address"]
        .as_str()
        .unwrap()
        .to_string();
    for (name, node) in recipes::compose_nodes(&compose) {
        let args = recipes::strings(&node["command"]);
        assert_eq!(
            flag(&args, "trusted-proxies"),
            Some(nginx_ip.clone()),
            "{name}"
        );
    }
    // HAProxy sends what the nodes read: a PROXY v2 header on every server.
    let cfg = recipes::read("haproxy/haproxy.cfg");
    let servers: Vec<&str> = cfg
        .lines()
        .filter(|l| l.trim_start().starts_with("server "))
        .collect();
    assert!(!servers.is_empty());
    for line in servers {
        assert!(
            line.split_whitespace().any(|w| w == "send-proxy-v2"),
            "{line}"
        );
    }
}

#[test]
fn kubernetes_objects_agree_with_each_other_and_the_server() {
    let help = Help::load();
    let deployment = recipes::k8s("deployment", "Deployment");
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    assert_eq!(deployment["spec"]["selector"]["matchLabels"], *labels);
    let service = recipes::k8s("service", "Service");
    assert_eq!(service["spec"]["selector"], *labels, "Service selector");
    let pdb = recipes::k8s("pdb", "PodDisruptionBudget");
    assert_eq!(pdb["spec"]["selector"]["matchLabels"], *labels);
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    // A rolling update never has fewer ready pods than wanted.
    assert_eq!(
        deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"],
        0
    );
    // The HPA scales this Deployment on connections per pod, below what a
    // pod admits.
    let hpa = recipes::k8s("hpa", "HorizontalPodAutoscaler");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["kind"], "Deployment");
    assert_eq!(
        hpa["spec"]["scaleTargetRef"]["name"],
        deployment["metadata"]["name"]
    );
    let metric = &hpa["spec"]["metrics"][0];
    assert_eq!(metric["type"], "Pods");
    let name = metric["pods"]["metric"]["name"].as_str().unwrap();
    assert_eq!(name, "ringcast_connections_active");
    assert!(recipes::read("k8s/hpa.yaml").contains("prometheus-adapter"));
    let container = recipes::k8s_container(&deployment);
    let args = strings(&container["args"]);
    let max: u64 = help.value(&args, "max-connections").parse().unwrap();
    let target: u64 = metric["pods"]["target"]["averageValue"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        target < max,
        "HPA target {target} >= --max-connections {max}"
    );
    // The memory limit holds --max-connections at the measured cost.
    let limit = container["resources"]["limits"]["memory"].as_str().unwrap();
    let gib: u64 = limit
        .strip_suffix("Gi")
        .expect("memory in Gi")
        .parse()
        .unwrap();
    assert!(gib << 30 >= max * ringcast::doctor::BYTES_PER_CONNECTION);
    // The metric the HPA reads is one a node exports.
    let server = TestServer::start(&[]);
    assert!(
        server.metrics().contains_key(name),
        "{name} not in /metrics"
    );
}

#[test]
fn the_containerfile_builds_from_what_the_repository_has() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = recipes::read("Containerfile");
    let toolchain = std::fs::read_to_string(root.join("rust-toolchain.toml")).unwrap();
    let channel = toolchain
        .lines()
        .find_map(|l| l.strip_prefix("channel = "))
        .unwrap()
        .trim_matches('"');
    let minor = channel.rsplit_once('.').unwrap().0;
    assert!(
        text.contains(&format!("/rust:{minor}-")),
        "the build image is Rust {minor} (rust-toolchain.toml {channel})"
    );
    for line in text
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let words: Vec<&str> = line.split_whitespace().collect();
        for src in &words[1..words.len() - 1] {
            match src.strip_suffix("/*.rs") {
                Some(dir) => assert!(
                    std::fs::read_dir(root.join(dir)).unwrap().any(|e| e
                        .unwrap()
                        .path()
                        .extension()
                        .is_some_and(|x| x == "rs")),
                    "{line}"
                ),
                None => assert!(root.join(src).exists(), "{line}: no {src}"),
            }
        }
    }
    let user = text
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("USER");
    assert!(
        !user.starts_with("0") && !user.starts_with("root"),
        "USER {user}"
    );
    // compose builds this file.
    let compose = recipes::compose();
    for (name, service) in recipes::compose_nodes(&compose) {
        let build = &service["build"];
        let context = recipes::deploy_dir().join(build["context"].as_str().unwrap());
        let file = context.join(build["dockerfile"].as_str().unwrap());
        assert_eq!(
            file.canonicalize().unwrap(),
            recipes::deploy_dir()
                .join("Containerfile")
                .canonicalize()
                .unwrap(),
            "{name}"
        );
    }
}

#[test]
fn compose_runs_two_nodes_on_persistent_redis_behind_nginx() {
    let compose = recipes::compose();
    let redis = &compose["services"]["redis"];
    let command = strings(&redis["command"]).join(" ");
    assert!(command.contains("--appendonly yes"), "{command}");
    assert!(strings(&redis["volumes"])
        .iter()
        .any(|v| v.ends_with(":/data")));
    let nodes = recipes::compose_nodes(&compose);
    let mut names = HashSet::new();
    for (name, service) in &nodes {
        let args = strings(&service["command"]);
        let url = flag(&args, "redis").expect("--redis");
        assert!(url.starts_with("redis://redis:"), "{name}: {url}");
        assert!(
            names.insert(flag(&args, "node-name")),
            "{name}: node names differ"
        );
    }
    let nginx = &compose["services"]["nginx"];
    let mount = strings(&nginx["volumes"])
        .into_iter()
        .find(|v| v.contains("ringcast.conf"))
        .expect("nginx mounts ringcast.conf");
    let (host, rest) = mount.split_once(':').unwrap();
    assert_eq!(
        recipes::deploy_dir().join(host).canonicalize().unwrap(),
        recipes::deploy_dir()
            .join("nginx/ringcast.conf")
            .canonicalize()
            .unwrap()
    );
    let in_container = rest.split(':').next().unwrap();
    assert!(
        strings(&nginx["command"]).iter().any(|a| a == in_container),
        "nginx runs the mounted file"
    );
    // nginx publishes the port its config listens on.
    let listen = recipes::directive_values(
        &recipes::directives(&recipes::read("nginx/ringcast.conf")),
        "listen",
    );
    let port = listen[0].split_whitespace().next().unwrap();
    assert!(
        strings(&nginx["ports"])
            .iter()
            .any(|p| p.ends_with(&format!(":{port}"))),
        "nginx listens on {port}"
    );
}

#[test]
fn readme_links_to_files_that_exist() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let mut deploy_links = 0;
    for part in readme.split("](").skip(1) {
        let target = part.split(')').next().unwrap();
        if target.starts_with('#') || target.contains("://") {
            continue;
        }
        let path = target.split('#').next().unwrap();
        assert!(root.join(path).exists(), "README links to missing {path}");
        deploy_links += usize::from(path.starts_with("deploy/"));
    }
    assert!(deploy_links >= 5, "the Deploying section links deploy/");
}

#[test]
fn nginx_and_haproxy_accept_their_configs() {
    let nodes = [
        Node {
            ws: "127.0.0.1:18080".parse().unwrap(),
            admin: "127.0.0.1:19090".parse().unwrap(),
        },
        Node {
            ws: "127.0.0.1:18081".parse().unwrap(),
            admin: "127.0.0.1:19091".parse().unwrap(),
        },
    ];
    let (ok, out) = proxy::check_config(Kind::Nginx, &nodes);
    assert!(ok, "nginx -t:\n{out}");
    assert!(out.contains("test is successful"), "{out}");
    let (ok, out) = proxy::check_config(Kind::Haproxy, &nodes);
    assert!(ok, "haproxy -c:\n{out}");
    assert!(out.contains("Configuration file is valid"), "{out}");
}

#[test]
fn through_nginx_a_drained_nodes_clients_come_back_on_the_other_node_missing_nothing() {
    let took = drain::drain_through(Kind::Nginx);
    assert!(
        took.is_none_or(|t| t < Duration::from_secs(60)),
        "took {took:?}"
    );
}

#[test]
fn through_haproxy_a_drained_nodes_clients_come_back_on_the_other_node_missing_nothing() {
    let took = drain::drain_through(Kind::Haproxy);
    assert!(
        took.is_none_or(|t| t < Duration::from_secs(60)),
        "took {took:?}"
    );
}
