//! Sealed addresses (`PlatformKeys::open_address`, from the vault) and order tokens
//! (`order_token_matches`, `is_order_token`, from a buyer's device): any bytes or string
//! is refused unless it is the real thing, never a panic.

use crate::fuzz;
use actors::secrets::{PlatformKeys, SealedAddress, ORDER_TOKEN_PREFIX};
use proptest::prelude::*;
use proptest::test_runner::TestRunner;

#[test]
fn only_sealed_addresses_open() {
    let keys = PlatformKeys::from_key([9; 32]);
    let valid = keys.seal_address("d1.s1.0000000000000001", b"Ana, Rua A 1, Lisboa");
    let mut runner = TestRunner::new(fuzz::config());
    runner
        .run(
            &(any::<[u8; 32]>(), fuzz::corrupt(vec![valid.ciphertext.clone()])),
            |(salt, ciphertext)| {
                let changed = salt != valid.salt || ciphertext != valid.ciphertext;
                let sealed = SealedAddress { salt, ciphertext };
                let opened = keys.open_address("d1.s1.0000000000000001", &sealed);
                prop_assert!(!changed || opened.is_err(), "a damaged sealed address opened");
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn only_an_orders_own_token_matches_it() {
    let keys = PlatformKeys::from_key([9; 32]);
    let token = keys.order_token("d1.s1.0000000000000001");
    let mut runner = TestRunner::new(fuzz::config());
    let tokens = prop_oneof![
        any::<String>(),
        "[0-9a-fA-F]{0,70}".prop_map(|hex| format!("{ORDER_TOKEN_PREFIX}{hex}")),
        fuzz::mutated(vec![token.clone().into_bytes()]).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ];
    runner
        .run(&tokens, |candidate| {
            let matches = keys.order_token_matches("d1.s1.0000000000000001", &candidate);
            // The prefix exactly, then the MAC's hex digits (read in either case).
            let own = candidate
                .strip_prefix(ORDER_TOKEN_PREFIX)
                .is_some_and(|hex| hex.eq_ignore_ascii_case(&token[ORDER_TOKEN_PREFIX.len()..]));
            prop_assert_eq!(matches, own);
            if PlatformKeys::is_order_token(&candidate) {
                prop_assert_eq!(candidate.len(), ORDER_TOKEN_PREFIX.len() + 64);
            }
            Ok(())
        })
        .unwrap();
}
