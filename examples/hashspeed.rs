//! The hashing floor of the benchmarks: one core's sha256 and BLAKE3 over 8 MiB buffers (a
//! chunk), with the same crates and features the daemon verifies chunks with.
//!
//!     cargo run --release --example hashspeed        # prints "sha256 GB/s" and "blake3 GB/s"

use std::time::{Duration, Instant};

use wanfs::chunk::ChunkHash;

fn main() {
    let buf: Vec<u8> = (0..8usize << 20).map(|i| (i ^ (i >> 11)) as u8).collect();
    for hash in ChunkHash::ALL {
        // Best of three one-second runs: the floor, not the average of a noisy machine.
        let best = (0..3)
            .map(|_| {
                let (t0, mut n) = (Instant::now(), 0usize);
                while t0.elapsed() < Duration::from_secs(1) {
                    std::hint::black_box(hash.digest(&buf));
                    n += buf.len();
                }
                n as f64 / t0.elapsed().as_secs_f64() / 1e9
            })
            .fold(0.0, f64::max);
        println!("{hash} {best:.3}");
    }
}
