//! Fuzzing what the Redis Streams broker exposes to producers
//! (`ringcast::broker::redis`): the partition of a topic is CRC-32/ISO-HDLC
//! (zlib's crc32) mod the partition count, as PROTOCOL.md section 6 tells
//! producers to compute it, checked against a bitwise CRC written from the
//! definition; keys have the documented shape.
//!
//! Entry decoding (`decode_entry`) is crate-private, so it is not fuzzed
//! here; its unit tests live next to it in `src/broker/redis/entry.rs`.
#![allow(clippy::unwrap_used)]

mod fuzz_support;

use proptest::prelude::*;
use ringcast::broker::redis::{epoch_key, partition, stream_key};

/// CRC-32/ISO-HDLC, one bit at a time: reflected polynomial 0xEDB88320,
/// initial value and final XOR 0xFFFFFFFF.
fn crc32_reference(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn reference_crc_matches_the_standard_check_value() {
    assert_eq!(crc32_reference(b"123456789"), 0xCBF4_3926);
    assert_eq!(partition("123456789", u32::MAX), 0xCBF4_3926);
    // README's producer example: "news" is in partition 0 of 16, as
    // Python's zlib.crc32(b"news") % 16 says.
    assert_eq!(partition("news", 16), 0);
}

proptest! {
    #![proptest_config(fuzz_support::config(512))]

    #[test]
    fn partition_is_zlib_crc32_mod_partitions(
        topic in prop_oneof!["[A-Za-z0-9_.:@/-]{1,255}", any::<String>()],
        partitions in prop_oneof![1u32..=1024, any::<u32>()],
    ) {
        let p = partition(&topic, partitions);
        prop_assert!(p < partitions.max(1));
        prop_assert_eq!(p, crc32_reference(topic.as_bytes()) % partitions.max(1));
    }

    #[test]
    fn keys_carry_the_partition_as_a_hash_tag(prefix in "[!-z|~]{1,64}", p in any::<u32>()) {
        prop_assert_eq!(stream_key(&prefix, p), format!("{prefix}:stream:{{{p}}}"));
        prop_assert_eq!(epoch_key(&prefix, p), format!("{prefix}:epoch:{{{p}}}"));
    }
}
