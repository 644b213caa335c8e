//! One input row times a Q4 matrix in integer arithmetic, to f32's precision: each block of 32
//! inputs is written as three signed 8-bit digits on a scale, `x ≈ s·(a + b/128 + c/128²)` with
//! `s = max|x| / 127`, and the 4-bit weights multiply each digit with `vpmaddubsw` (64 products
//! per instruction on AVX-512, 32 on AVX2; exact integer sums).
//!
//! A decode step at batch 1 is a matrix-vector product per weight matrix. Widening each 4-bit
//! weight to f32 costs more vector instructions than its multiply-add (a block of 32: two byte
//! widenings, two conversions, a multiply and two multiply-adds), and on one AVX-512 core that,
//! not reading the weights, bounds the product (`docs/benchmarks.md`). Here four blocks' 128
//! weights take about 22 instructions against 36.
//!
//! The digits leave at most `s / 2¹⁵` of each input unrepresented (about a 2⁻²² part of the
//! block's largest input), below f32's own rounding of the products' sum over a row; the integer sums
//! are exact and convert to f32 once per block. So the results are the f32 kernel's up to the
//! order of the additions (the reference tolerance of the logits is unchanged,
//! `docs/worker.md`), unlike the 8-bit inputs of [`super::packed`], which round each input to
//! one digit.

use super::{BLOCK, QFormat, QMatrix};

/// Blocks one vector of weight bytes holds (4 × 16 bytes).
const SPAN: usize = 4;

/// Bytes of one span's weights and of one span's digits of one kind.
const SPAN_BYTES: usize = SPAN * BLOCK / 2;

/// One input row as digits, in the order a span's weight bytes need them.
pub struct Digits {
    /// Per span: for the digits `a`, `b`, `c`, the low halves of its four blocks (inputs 0..16 of
    /// each, which the weights' low nibbles multiply) and then the high halves (16..32), each
    /// 64 bytes: `[span][digit][half][64]`.
    bytes: Vec<[u8; SPAN_BYTES]>,
    /// Per span, 16 lanes: lane `i` holds `s / 128²` of the span's block `i / 4` (the lanes of
    /// the integer sums of that block).
    scales: Vec<[f32; 16]>,
    /// The exact f32 sum of each block's inputs (for the weights' offsets).
    sums: Vec<f32>,
}

impl Digits {
    /// The digits of `x` (one row, a multiple of 32 long); `None` when an input is not
    /// finite (the f32 kernel then carries it into the products, as IEEE arithmetic does) or
    /// the row is shorter than four blocks (the f32 kernel then serves). Compiled for the CPU's
    /// vector unit (a decode step makes these for every matrix's input).
    pub fn new(x: &[f32]) -> Option<Self> {
        if x.len() < SPAN * BLOCK || !x.iter().all(|v| v.is_finite()) {
            return None;
        }
        Some(super::vectors::arch().dispatch(Splitting { x }))
    }

    /// The value the digits stand for at input `j` (tests).
    #[cfg(test)]
    fn value(&self, j: usize) -> f64 {
        let (k, col) = (j / BLOCK, j % BLOCK);
        let (span, at) = slot(k, self.sums.len());
        let (half, lane) = (col / 16, col % 16);
        let digit = |n: usize| f64::from(self.bytes[span * 6 + n * 2 + half][at * 16 + lane] as i8);
        let s = f64::from(self.scales[span][at * 4]) * 16384.0;
        s * (digit(0) + digit(1) / 128.0 + digit(2) / 16384.0)
    }
}

/// Whether this CPU runs [`products`] (AVX-512, or AVX2 with FMA).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return super::vectors::v3().is_some();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `out[i] = x · W[r0 + i]ᵀ` for the Q4 matrix `m` (row-major, not interleaved) and one input
/// row as digits. On CPUs with AVX-512 (64-byte vectors) or AVX2 (32-byte vectors, the same
/// arithmetic on half a span at a time): `None` elsewhere (and for other matrices), where the
/// caller uses the f32 kernel.
pub fn products(m: &QMatrix, x: &Digits, r0: usize, out: &mut [f32]) -> Option<()> {
    if m.format != QFormat::Q4 || m.interleaved || x.sums.len() != m.cols / BLOCK {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(simd) = super::vectors::v4() {
        simd.vectorize(v4::Kernel {
            simd,
            m,
            x,
            r0,
            out,
        });
        return Some(());
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(simd) = super::vectors::v3() {
        v3::products(simd, m, x, r0, out);
        return Some(());
    }
    let _ = (x, r0, out);
    None
}

/// [`Digits::new`]'s work, run with the CPU's vector features enabled.
struct Splitting<'a> {
    x: &'a [f32],
}

impl pulp::WithSimd for Splitting<'_> {
    type Output = Digits;

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) -> Digits {
        let x = self.x;
        let blocks = x.len() / BLOCK;
        let spans = blocks.div_ceil(SPAN);
        let mut d = Digits {
            bytes: vec![[0u8; SPAN_BYTES]; spans * 6],
            scales: vec![[0.0f32; 16]; spans],
            sums: Vec::with_capacity(blocks),
        };
        for (k, b) in x.chunks_exact(BLOCK).enumerate() {
            let Some(b) = b.first_chunk::<BLOCK>() else {
                continue;
            };
            d.sums.push(b.iter().sum());
            let (span, at) = slot(k, blocks);
            let mut lanes = [0.0f32; 16];
            for c in b.chunks_exact(16) {
                for (l, v) in lanes.iter_mut().zip(c) {
                    let v = v.abs();
                    *l = if v > *l { v } else { *l };
                }
            }
            let amax = lanes.iter().fold(0.0f32, |a, &v| if v > a { v } else { a });
            if amax == 0.0 {
                continue;
            }
            let s = f64::from(amax) / 127.0;
            let inv = 1.0 / s;
            let t: [f64; BLOCK] = std::array::from_fn(|j| f64::from(b[j]) * inv);
            let a: [f64; BLOCK] = std::array::from_fn(|j| t[j].round().clamp(-127.0, 127.0));
            let r: [f64; BLOCK] = std::array::from_fn(|j| (t[j] - a[j]) * 128.0);
            let bd: [f64; BLOCK] = std::array::from_fn(|j| r[j].round());
            let c: [f64; BLOCK] = std::array::from_fn(|j| ((r[j] - bd[j]) * 128.0).round());
            for (digit, v) in [a, bd, c].iter().enumerate() {
                for half in 0..2 {
                    let to = &mut d.bytes[span * 6 + digit * 2 + half][at * 16..at * 16 + 16];
                    for (o, v) in to.iter_mut().zip(&v[half * 16..half * 16 + 16]) {
                        *o = *v as i8 as u8;
                    }
                }
            }
            d.scales[span][at * 4..at * 4 + 4].fill((s / 16384.0) as f32);
        }
        d
    }
}

/// The first block of span `g` of a row of `blocks` (at least [`SPAN`]): a short last span is
/// read as the row's last four blocks, its digits zero for the blocks the span before took.
#[inline(always)]
fn span_start(g: usize, blocks: usize) -> usize {
    (g * SPAN).min(blocks - SPAN)
}

/// Where block `k` of a row of `blocks` (at least [`SPAN`]) sits: its span, and its place
/// among the four blocks that span reads ([`span_start`]).
#[inline(always)]
fn slot(k: usize, blocks: usize) -> (usize, usize) {
    let span = (k / SPAN).min(blocks / SPAN);
    (span, k - span_start(span, blocks))
}

#[cfg(target_arch = "x86_64")]
mod v4 {
    use core::arch::x86_64::{__m512, __m512i};

    use pulp::x86::V4;

    use super::super::{BLOCK, QMatrix, lane_dot};
    use super::{Digits, SPAN, SPAN_BYTES, span_start};

    pub(super) struct Kernel<'a> {
        pub simd: V4,
        pub m: &'a QMatrix,
        pub x: &'a Digits,
        pub r0: usize,
        pub out: &'a mut [f32],
    }

    /// 64 bytes as a vector.
    #[inline(always)]
    fn vector(b: &[u8; SPAN_BYTES]) -> __m512i {
        pulp::cast(*b)
    }

    impl pulp::NullaryFnOnce for Kernel<'_> {
        type Output = ();

        #[inline(always)]
        fn call(self) {
            let Self {
                simd,
                m,
                x,
                r0,
                out,
            } = self;
            let f = simd.avx512f;
            let per_row = m.cols / BLOCK;
            let low = f._mm512_set1_epi8(0x0f);
            let (ka, kb, kc) = (
                f._mm512_set1_epi16(16384),
                f._mm512_set1_epi16(128),
                f._mm512_set1_epi16(1),
            );
            // Lane i takes the scale of block i / 4.
            let spread = f._mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
            let c = Consts {
                low,
                ka,
                kb,
                kc,
                spread,
            };
            let spans = x.scales.len();
            for (i, o) in out.iter_mut().enumerate() {
                let first = (r0 + i) * per_row;
                let (q, d) = (
                    &m.q[first * 16..(first + per_row) * 16],
                    &m.scales[first..first + per_row],
                );
                let mut acc = f._mm512_set1_ps(0.0);
                for g in 0..spans {
                    let k0 = span_start(g, per_row);
                    let (Some(w), Some(d)) = (
                        q.get(k0 * 16..).and_then(|w| w.first_chunk::<SPAN_BYTES>()),
                        d.get(k0..).and_then(|d| d.first_chunk::<SPAN>()),
                    ) else {
                        continue;
                    };
                    let mut ds = [0.0f32; 16];
                    ds[..SPAN].copy_from_slice(d);
                    acc = span(simd, c, vector(w), ds, x, g, acc);
                }
                let offsets = lane_dot(&m.mins[first..first + per_row], &x.sums);
                *o = f._mm512_reduce_add_ps(acc) + offsets;
            }
        }
    }

    /// The kernel's constants.
    #[derive(Clone, Copy)]
    struct Consts {
        low: __m512i,
        ka: __m512i,
        kb: __m512i,
        kc: __m512i,
        spread: __m512i,
    }

    /// `acc` plus span `g`'s products: weights `w` (four blocks' bytes), their scales `ds`
    /// (the first four lanes).
    #[inline(always)]
    fn span(
        simd: V4,
        c: Consts,
        w: __m512i,
        ds: [f32; 16],
        x: &Digits,
        g: usize,
        acc: __m512,
    ) -> __m512 {
        let (f, bw) = (simd.avx512f, simd.avx512bw);
        let lo = f._mm512_and_si512(w, c.low);
        let hi = f._mm512_and_si512(bw._mm512_srli_epi16::<4>(w), c.low);
        let Some(xb) = x.bytes.get(g * 6..g * 6 + 6) else {
            return acc;
        };
        let digit = |n: usize| {
            bw._mm512_add_epi16(
                bw._mm512_maddubs_epi16(lo, vector(&xb[n * 2])),
                bw._mm512_maddubs_epi16(hi, vector(&xb[n * 2 + 1])),
            )
        };
        let t = f._mm512_add_epi32(
            f._mm512_add_epi32(
                bw._mm512_madd_epi16(digit(0), c.ka),
                bw._mm512_madd_epi16(digit(1), c.kb),
            ),
            bw._mm512_madd_epi16(digit(2), c.kc),
        );
        let dv = f._mm512_permutexvar_ps(c.spread, pulp::cast(ds));
        let scale = f._mm512_mul_ps(dv, pulp::cast(x.scales[g]));
        f._mm512_fmadd_ps(f._mm512_cvtepi32_ps(t), scale, acc)
    }
}

/// The AVX2 kernel: a span's 64 weight bytes (and each of its 64-byte digit vectors) as two
/// 32-byte halves, blocks 0-1 and 2-3, each with the AVX-512 kernel's arithmetic.
#[cfg(target_arch = "x86_64")]
mod v3 {
    use core::arch::x86_64::{__m256, __m256i};

    use pulp::x86::V3;

    use super::super::{BLOCK, QMatrix, lane_dot};
    use super::{Digits, SPAN, SPAN_BYTES, span_start};

    /// [`super::products`] on AVX2.
    pub(super) fn products(simd: V3, m: &QMatrix, x: &Digits, r0: usize, out: &mut [f32]) {
        simd.vectorize(Kernel {
            simd,
            m,
            x,
            r0,
            out,
        })
    }

    struct Kernel<'a> {
        simd: V3,
        m: &'a QMatrix,
        x: &'a Digits,
        r0: usize,
        out: &'a mut [f32],
    }

    /// Half `h` of 64 bytes as a vector.
    #[inline(always)]
    fn half(b: &[u8; SPAN_BYTES], h: usize) -> __m256i {
        let mut v = [0u8; 32];
        v.copy_from_slice(&b[h * 32..h * 32 + 32]);
        pulp::cast(v)
    }

    /// The kernel's constants.
    #[derive(Clone, Copy)]
    struct Consts {
        low: __m256i,
        ka: __m256i,
        kb: __m256i,
        kc: __m256i,
        /// Lanes 0-3 take a span's block 0 (or 2), lanes 4-7 block 1 (or 3).
        spread: [__m256i; 2],
    }

    impl pulp::NullaryFnOnce for Kernel<'_> {
        type Output = ();

        #[inline(always)]
        fn call(self) {
            let Self {
                simd,
                m,
                x,
                r0,
                out,
            } = self;
            let a = simd.avx;
            let per_row = m.cols / BLOCK;
            let c = Consts {
                low: a._mm256_set1_epi8(0x0f),
                ka: a._mm256_set1_epi16(16384),
                kb: a._mm256_set1_epi16(128),
                kc: a._mm256_set1_epi16(1),
                spread: [
                    a._mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1),
                    a._mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3),
                ],
            };
            let spans = x.scales.len();
            for (i, o) in out.iter_mut().enumerate() {
                let first = (r0 + i) * per_row;
                let (q, d) = (
                    &m.q[first * 16..(first + per_row) * 16],
                    &m.scales[first..first + per_row],
                );
                // One accumulator per half: two independent chains.
                let mut acc = [a._mm256_setzero_ps(); 2];
                for g in 0..spans {
                    let k0 = span_start(g, per_row);
                    let (Some(w), Some(d)) = (
                        q.get(k0 * 16..).and_then(|w| w.first_chunk::<SPAN_BYTES>()),
                        d.get(k0..).and_then(|d| d.first_chunk::<SPAN>()),
                    ) else {
                        continue;
                    };
                    let Some(xb) = x.bytes.get(g * 6..g * 6 + 6) else {
                        continue;
                    };
                    let mut ds = [0.0f32; 8];
                    ds[..SPAN].copy_from_slice(d);
                    for (h, acc) in acc.iter_mut().enumerate() {
                        *acc = span_half(simd, c, (w, xb, h), (pulp::cast(ds), &x.scales[g]), *acc);
                    }
                }
                let offsets = lane_dot(&m.mins[first..first + per_row], &x.sums);
                let s: [f32; 8] = pulp::cast(a._mm256_add_ps(acc[0], acc[1]));
                *o = ((s[0] + s[4]) + (s[2] + s[6])) + ((s[1] + s[5]) + (s[3] + s[7])) + offsets;
            }
        }
    }

    /// `acc` plus half `h` of a span's products: weights `w`, digits `xb` (`[digit][half of
    /// the block][64]`), the weights' four block scales `ds` (lanes 0-3) and the digits'
    /// scales (16 lanes, four a block).
    #[inline(always)]
    fn span_half(
        simd: V3,
        c: Consts,
        (w, xb, h): (&[u8; SPAN_BYTES], &[[u8; SPAN_BYTES]], usize),
        (ds, xs): (__m256, &[f32; 16]),
        acc: __m256,
    ) -> __m256 {
        let (a, a2, f) = (simd.avx, simd.avx2, simd.fma);
        let w = half(w, h);
        let lo = a2._mm256_and_si256(w, c.low);
        let hi = a2._mm256_and_si256(a2._mm256_srli_epi16::<4>(w), c.low);
        let digit = |n: usize| {
            a2._mm256_add_epi16(
                a2._mm256_maddubs_epi16(lo, half(&xb[n * 2], h)),
                a2._mm256_maddubs_epi16(hi, half(&xb[n * 2 + 1], h)),
            )
        };
        let t = a2._mm256_add_epi32(
            a2._mm256_add_epi32(
                a2._mm256_madd_epi16(digit(0), c.ka),
                a2._mm256_madd_epi16(digit(1), c.kb),
            ),
            a2._mm256_madd_epi16(digit(2), c.kc),
        );
        let dv = a2._mm256_permutevar8x32_ps(ds, c.spread[h]);
        let mut s = [0.0f32; 8];
        s.copy_from_slice(&xs[h * 8..h * 8 + 8]);
        let scale = a._mm256_mul_ps(dv, pulp::cast(s));
        f._mm256_fmadd_ps(a._mm256_cvtepi32_ps(t), scale, acc)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_values as values;
    use super::*;

    #[test]
    fn the_digits_hold_each_input_to_a_2_21_part_of_its_blocks_largest() {
        // Blocks of very different sizes, one of zeros, and a row of 18 blocks (a short last span).
        let mut x = values(18 * BLOCK, 5);
        for (k, b) in x.chunks_exact_mut(BLOCK).enumerate() {
            let scale = 10f32.powi(k as i32 % 7 - 3);
            b.iter_mut().for_each(|v| *v *= scale);
        }
        x[2 * BLOCK..3 * BLOCK].fill(0.0);
        let d = Digits::new(&x).expect("finite");
        let mut bad = x.clone();
        bad[40] = f32::NAN;
        assert!(Digits::new(&bad).is_none());
        for (k, b) in x.chunks_exact(BLOCK).enumerate() {
            let amax = b.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            assert_eq!(d.sums[k], b.iter().sum::<f32>());
            for (j, &v) in b.iter().enumerate() {
                let got = d.value(k * BLOCK + j);
                assert!(
                    (got - f64::from(v)).abs() <= f64::from(amax) * 2f64.powi(-21),
                    "block {k} input {j}: {got} for {v}"
                );
            }
        }
    }

    #[test]
    fn digit_products_equal_the_f32_kernels_to_its_rounding() {
        // The kernel `products` picks here, and the AVX2 one on its own (a machine with
        // AVX-512 would not run it otherwise).
        check_products("products", products);
        #[cfg(target_arch = "x86_64")]
        if let Some(simd) = super::super::vectors::v3() {
            check_products("avx2", |m, x, r0, out| {
                v3::products(simd, m, x, r0, out);
                Some(())
            });
        }
        // Rows under four blocks are the f32 kernel's.
        assert!(Digits::new(&values(96, 4)).is_none());
        // Q8 and interleaved matrices are not this kernel's.
        let q8 = QMatrix::quantize_q8(&values(32 * 128, 2), 32, 128).expect("q8");
        let q4i = QMatrix::quantize_q4(&values(32 * 128, 2), 32, 128)
            .and_then(|q| q.interleaved())
            .expect("q4, rows in 16s");
        let x = Digits::new(&values(128, 3)).expect("finite");
        assert!(products(&q4i, &x, 0, &mut [0.0; 32]).is_none());
        assert!(products(&q8, &x, 0, &mut [0.0; 32]).is_none());
    }

    /// `kernel`'s products against the dequantized matrix's in f64, within a 1e-6 part of the
    /// sum of the products' sizes, and the same from a later first row.
    fn check_products(
        name: &str,
        kernel: impl Fn(&QMatrix, &Digits, usize, &mut [f32]) -> Option<()>,
    ) {
        for cols in [128, 160, 576] {
            let rows = 37;
            let w = values(rows * cols, 1);
            let q = QMatrix::quantize_q4(&w, rows, cols).expect("q4");
            let dense = q.dequantize();
            let mut x = values(cols, 9);
            // Inputs of mixed sizes, as a layer's activations are.
            x.iter_mut().step_by(7).for_each(|v| *v *= 40.0);
            let d = Digits::new(&x).expect("finite");
            let mut out = vec![0.0f32; rows];
            if kernel(&q, &d, 0, &mut out).is_none() {
                // No vector kernel here: the f32 kernel serves (its own test covers it).
                return;
            }
            for (r, got) in out.iter().enumerate() {
                let want: f64 = (0..cols)
                    .map(|c| f64::from(dense[r * cols + c]) * f64::from(x[c]))
                    .sum();
                let size: f64 = (0..cols)
                    .map(|c| (f64::from(dense[r * cols + c]) * f64::from(x[c])).abs())
                    .sum();
                assert!(
                    (f64::from(*got) - want).abs() <= size * 1e-6,
                    "{name}: cols {cols} row {r}: {got} vs {want}"
                );
            }
            // From a later row on: the same values as from the first.
            let mut tail = vec![0.0f32; rows - 5];
            kernel(&q, &d, 5, &mut tail).expect("found above");
            assert_eq!(tail, out[5..], "{name}");
        }
    }
}
