//! The connection caps at accept (per address 429, shard and node 503,
//! 429 first) and the upgrade budget per address.

use super::*;

#[test]
fn the_per_address_cap_is_429_at_accept_and_a_close_frees_a_place() {
    on_both_drivers(|| async {
        let h = Harness::new(Config {
            max_connections_per_ip: 2,
            ..config()
        });
        // Counted from accept: sockets that never send a request count.
        let first = h.accept(A);
        let mut second = h.accept(A);
        let mut third = h.accept(A);
        let got = third.read();
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].starts_with("http 429") && got[0].contains("max_connections_per_ip"));
        assert_eq!(got[1], "eof");
        // Another address is not affected.
        let mut other = h.accept(B);
        other.write(UPGRADE.as_bytes());
        h.poll();
        assert_eq!(other.read(), ["http 101", "welcome"]);
        // One of the two goes: its place is free again.
        drop(first);
        h.poll();
        let mut fourth = h.accept(A);
        fourth.write(UPGRADE.as_bytes());
        second.write(UPGRADE.as_bytes());
        h.poll();
        assert_eq!(fourth.read(), ["http 101", "welcome"]);
        assert_eq!(second.read(), ["http 101", "welcome"]);
        assert_eq!(
            h.shard.conns.borrow().len(),
            3,
            "the refused one is forgotten"
        );
        assert_eq!(
            h.metric(r#"ringcast_handshake_failures_total{status="429"}"#),
            1
        );
    });
}

#[test]
fn a_full_shard_or_node_is_503_at_accept() {
    on_both_drivers(|| async {
        let h = Harness::new(Config {
            max_connections_per_shard: 2,
            ..config()
        });
        let _a = h.accept(A);
        let _b = h.accept(B);
        let got = h.accept(C).read();
        assert!(
            got[0].starts_with("http 503") && got[0].contains("max_connections_per_shard"),
            "{got:?}"
        );
        // The node's cap counts every shard's connections: here one other.
        let h = Harness::new(Config {
            max_connections: 2,
            ..config()
        });
        h.shard.node_connections.fetch_add(1, Relaxed);
        let _a = h.accept(A);
        let got = h.accept(B).read();
        assert!(
            got[0].starts_with("http 503") && got[0].contains("max_connections"),
            "{got:?}"
        );
        assert_eq!(
            h.shard.node_connections.load(Relaxed),
            2,
            "the refused one is not counted"
        );
    });
}

#[test]
fn too_many_from_one_address_is_429_before_a_full_shard_is_503() {
    on_both_drivers(|| async {
        let h = Harness::new(Config {
            max_connections_per_ip: 1,
            max_connections_per_shard: 1,
            ..config()
        });
        let _a = h.accept(A);
        // Over both caps: the address's answer comes first.
        let got = h.accept(A).read();
        assert!(got[0].starts_with("http 429"), "{got:?}");
        let got = h.accept(B).read();
        assert!(got[0].starts_with("http 503"), "{got:?}");
    });
}

#[test]
fn the_upgrade_budget_is_taken_at_upgrade_refused_at_accept_once_spent_and_refills() {
    on_both_drivers(|| async {
        // Two upgrades a second per address (one shard takes all of it).
        let h = Harness::new(Config {
            max_handshakes_per_ip: 2,
            ..config()
        });
        // Accepting takes nothing from the budget: three get in.
        let mut conns: Vec<Client> = (0..3).map(|_| h.accept(A)).collect();
        let got: Vec<Vec<String>> = conns
            .iter_mut()
            .map(|c| {
                c.write(UPGRADE.as_bytes());
                h.poll();
                c.read()
            })
            .collect();
        assert_eq!(got[0], ["http 101", "welcome"]);
        assert_eq!(got[1], ["http 101", "welcome"]);
        assert!(
            got[2][0].starts_with("http 429") && got[2][0].contains("max_handshakes_per_ip"),
            "{got:?}"
        );
        // Spent: the next one is refused at accept, before its request.
        let got = h.accept(A).read();
        assert!(
            got[0].starts_with("http 429") && got[0].contains("max_handshakes_per_ip"),
            "{got:?}"
        );
        // Each address has its own budget.
        h.open(B);
        // Half a second refills one upgrade.
        h.advance(499);
        assert!(h.accept(A).read()[0].starts_with("http 429"));
        h.advance(1);
        let mut c = h.accept(A);
        c.write(UPGRADE.as_bytes());
        h.poll();
        assert_eq!(c.read(), ["http 101", "welcome"]);
    });
}
