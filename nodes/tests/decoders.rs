//! Every decoder of outside or stored bytes (`nodes::decoders::ALL`) answers malformed input
//! with an error, never a panic: arbitrary bytes, seeded mutations of valid samples, and
//! JSON nested far deeper than any decoder allows. A short run of what
//! `cargo run --release -p benches --bin fuzz-decoders` does with a million inputs each.

use nodes::decoders::{mutate, nested, ALL};
use proptest::prelude::*;
use rand::SeedableRng;

// Proves the samples are valid inputs (so mutations start from what a decoder accepts).
#[test]
fn every_sample_decodes() {
    for d in ALL {
        for (i, s) in (d.samples)().iter().enumerate() {
            assert!(
                (d.decode)(s),
                "{} sample {i} does not decode: {}",
                d.name,
                String::from_utf8_lossy(s)
            );
        }
    }
}

// Proves no decoder overflows its stack or panics on nesting 100,000 deep.
#[test]
fn deep_nesting_is_refused() {
    let deep = nested(100_000);
    for d in ALL {
        assert!(!(d.decode)(&deep), "{} accepted 100,000 levels", d.name);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    // Proves arbitrary bytes never panic a decoder.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        for d in ALL {
            let _ = (d.decode)(&bytes);
        }
    }

    // Proves mutations of valid samples (bit flips, structural tokens, truncations,
    // splices) never panic a decoder.
    #[test]
    fn mutated_samples_never_panic(seed in any::<u64>()) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for d in ALL {
            let samples = (d.samples)();
            for _ in 0..16 {
                let input = mutate(&samples, &mut rng);
                let _ = (d.decode)(&input);
            }
        }
    }
}
