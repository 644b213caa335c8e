//! Quantized products on SmolLM2-135M's matrix shapes: `cargo bench -p dopd-worker --bench qmat`.
//!
//! For each shape and number of input rows, the best of several timed runs of
//! `QMatrix::matmul_t` (after a warm-up), as time per product, the weights' bytes read per second
//! and multiply-adds per second. A decode step at batch `n` runs these products with `n` rows:
//! seven per layer and the output matrix once. Results for this machine are in
//! docs/benchmarks.md. `QMAT_SHAPES` (names), `QMAT_FORMATS` (`q4`, `q4i`, `q8`) and
//! `QMAT_ROWS` (input row counts), each comma-separated, narrow the run.

use std::time::Instant;

use dopd_worker::qmat::QMatrix;

fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}

fn main() {
    // `QMAT_ROWS=1,8` and `QMAT_SHAPES=output` narrow the run (an A/B of one kernel).
    let rows_list: Vec<usize> = std::env::var("QMAT_ROWS")
        .ok()
        .and_then(|v| v.split(',').map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 2, 4, 8, 16]);
    let only = std::env::var("QMAT_SHAPES").unwrap_or_default();
    let formats = std::env::var("QMAT_FORMATS").unwrap_or_default();
    // (name, output rows, input columns): attention, MLP in and out, the output matrix.
    let shapes = [
        ("q/o 576x576", 576usize, 576usize),
        ("k/v 192x576", 192, 576),
        ("gate/up 1536x576", 1536, 576),
        ("down 576x1536", 576, 1536),
        ("output 49152x576", 49152, 576),
    ];
    println!(
        "{:<18} {:<4} {:>5} {:>12} {:>10} {:>12}",
        "matrix", "fmt", "rows", "us/product", "GB/s", "GFMA/s"
    );
    for (name, rows, cols) in shapes {
        if !only.is_empty() && !only.split(',').any(|o| name.contains(o)) {
            continue;
        }
        let w = values(rows * cols, 1);
        let q4 = QMatrix::quantize_q4(&w, rows, cols).expect("q4");
        let q4i = q4.interleaved().expect("rows in 16s");
        let mats = [
            ("q4", q4),
            ("q4i", q4i),
            ("q8", QMatrix::quantize_q8(&w, rows, cols).expect("q8")),
        ];
        for (fmt, m) in &mats {
            if !formats.is_empty() && !formats.split(',').any(|f| f == *fmt) {
                continue;
            }
            for &n in &rows_list {
                let x = values(n * cols, 7);
                let reps = (20_000_000 / (rows * cols)).clamp(3, 2000);
                let mut best = f64::INFINITY;
                std::hint::black_box(m.matmul_t(&x, n));
                for _ in 0..5 {
                    let t = Instant::now();
                    for _ in 0..reps {
                        std::hint::black_box(m.matmul_t(std::hint::black_box(&x), n));
                    }
                    best = best.min(t.elapsed().as_secs_f64() / reps as f64);
                }
                println!(
                    "{:<18} {:<4} {:>5} {:>12.1} {:>10.1} {:>12.1}",
                    name,
                    fmt,
                    n,
                    best * 1e6,
                    m.bytes() as f64 / best / 1e9,
                    (n * rows * cols) as f64 / best / 1e9
                );
            }
        }
    }
}
