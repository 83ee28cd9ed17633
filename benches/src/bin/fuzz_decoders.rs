//! Feeds every decoder of outside or stored bytes (`nodes::decoders::ALL`) a million
//! malformed inputs (by default) and reports panics and throughput per decoder. Exit 1 if any
//! input panicked (each such input is printed, hex, to rerun by hand).
//!
//! `cargo run --release -p benches --bin fuzz-decoders -- [--inputs N] [--seed S]`
//!
//! Inputs: nine in ten are seeded mutations of the decoder's valid samples
//! (`nodes::decoders::mutate`), one in ten random bytes (0-256 long); plus JSON nested
//! 100,000 deep. Every input is decoded under `catch_unwind`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

use clap::Parser;
use rand::{Rng, SeedableRng};

#[derive(Parser)]
#[command(about = "Fuzz every decoder of outside or stored bytes; report panics and throughput")]
struct Args {
    /// Inputs per decoder.
    #[arg(long, default_value_t = 1_000_000)]
    inputs: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn main() {
    let args = Args::parse();
    // A panic's message would print once per panicking input; count them instead.
    std::panic::set_hook(Box::new(|_| {}));
    let mut failed = false;
    println!(
        "{:<14} {:>10} {:>10} {:>8} {:>14}",
        "decoder", "inputs", "decoded", "panics", "inputs/s"
    );
    for d in nodes::decoders::ALL {
        let samples = (d.samples)();
        let mut rng =
            rand::rngs::StdRng::seed_from_u64(args.seed ^ nodes::cluster::fnv1a(d.name.as_bytes()));
        let (mut decoded, mut panics) = (0u64, 0u64);
        let mut first_panics: Vec<Vec<u8>> = Vec::new();
        let started = Instant::now();
        let mut run = |input: &[u8]| match catch_unwind(AssertUnwindSafe(|| (d.decode)(input))) {
            Ok(ok) => decoded += u64::from(ok),
            Err(_) => {
                panics += 1;
                if first_panics.len() < 5 {
                    first_panics.push(input.to_vec());
                }
            }
        };
        run(&nodes::decoders::nested(100_000));
        for i in 1..args.inputs {
            let input = if i % 10 == 0 {
                let n = rng.gen_range(0..=256);
                (0..n).map(|_| rng.gen()).collect()
            } else {
                nodes::decoders::mutate(&samples, &mut rng)
            };
            run(&input);
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "{:<14} {:>10} {:>10} {:>8} {:>14.0}",
            d.name,
            args.inputs,
            decoded,
            panics,
            args.inputs as f64 / secs
        );
        for p in &first_panics {
            let hex: String = p.iter().map(|b| format!("{b:02x}")).collect();
            println!("  panicked on: {hex}");
        }
        failed |= panics > 0;
    }
    std::process::exit(i32::from(failed));
}
