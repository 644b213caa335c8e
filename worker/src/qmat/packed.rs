//! Q4 matrices with their rows interleaved in groups of 16, multiplied with inputs quantized to
//! 8 bits in integer arithmetic.
//!
//! At a batch of several rows a product is bound by arithmetic, not by reading the weights, and
//! the f32 kernel spends a vector multiply-add on 16 products. Here a block of 16 weight rows ×
//! 32 columns is laid out so that one vector holds 4 consecutive columns of each of the 16 rows
//! (`vpmaddubsw` multiplies 64 unsigned 4-bit values by 64 signed 8-bit inputs and adds pairs):
//! eight such instructions and one widening addition give the block's 16 integer dot products
//! for one input row, each output row in its own lane, so no lane ever needs summing across.
//! The block's scales then apply once per block, in f32: `d_w · d_x · Σ q_w·q_x + m_w · Σ x`.
//!
//! The inputs are rounded to 8 bits per block of 32 (symmetric, as ggml's Q8_0), which moves the
//! results by about the inputs' rounding (`docs/worker.md`); the weights are the file's, exactly.
//! The integer sums are exact, so the result does not depend on the batch an input row is in.

use super::{BLOCK, QFormat, QMatrix};

/// Weight rows interleaved together.
pub const GROUP: usize = 16;

/// Bytes of one group's block: 16 rows × 16 bytes of nibbles.
const GROUP_BLOCK: usize = GROUP * BLOCK / 2;

/// Input rows quantized to 8 bits per block of 32: the values as 4-byte words (a word is the
/// quad of inputs one vector lane multiplies), a scale and the exact f32 sum per block.
pub struct Quantized {
    /// `[n, cols / 4]` words of four `i8` values.
    words: Vec<i32>,
    /// `[n, cols / 32]`.
    scales: Vec<f32>,
    sums: Vec<f32>,
    per_row: usize,
}

impl Quantized {
    /// `x` (`[n, cols]`, `cols` a multiple of 32) rounded to 8 bits per block of 32. Compiled
    /// for the CPU's vector unit (pulp's dispatch): for the baseline, each rounding was a call
    /// and the rounding of a decode step's inputs took longer than a small matrix's product.
    pub fn new(x: &[f32], cols: usize) -> Self {
        super::vectors::arch().dispatch(Rounding { x, cols })
    }

    /// Input row `i`'s block `k`: its eight words, scale and sum.
    #[inline(always)]
    fn block(&self, i: usize, k: usize) -> (&[i32], f32, f32) {
        let b = i * self.per_row + k;
        (&self.words[b * 8..b * 8 + 8], self.scales[b], self.sums[b])
    }
}

/// [`Quantized::new`]'s work, run with the CPU's vector features enabled.
struct Rounding<'a> {
    x: &'a [f32],
    cols: usize,
}

impl pulp::WithSimd for Rounding<'_> {
    type Output = Quantized;

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) -> Quantized {
        let Self { x, cols } = self;
        let blocks = x.len() / BLOCK;
        let mut q = Quantized {
            words: Vec::with_capacity(x.len() / 4),
            scales: Vec::with_capacity(blocks),
            sums: Vec::with_capacity(blocks),
            per_row: cols / BLOCK,
        };
        for b in x.chunks_exact(BLOCK) {
            let Some(b) = b.first_chunk::<BLOCK>() else {
                continue;
            };
            let amax = b.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            let v: [u8; BLOCK] =
                std::array::from_fn(|j| (b[j] * inv).round().clamp(-127.0, 127.0) as i8 as u8);
            q.words.extend(
                v.chunks_exact(4)
                    .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
            q.scales.push(d);
            q.sums.push(b.iter().sum());
        }
        q
    }
}

impl QMatrix {
    /// This Q4 matrix with its rows interleaved by [`GROUP`], for products on 8-bit inputs;
    /// `None` for Q8, an interleaved matrix, or rows not a multiple of 16. Same bytes.
    pub fn interleaved(&self) -> Option<QMatrix> {
        if self.format != QFormat::Q4 || self.interleaved || !self.rows.is_multiple_of(GROUP) {
            return None;
        }
        let per_row = self.cols / BLOCK;
        let mut m = QMatrix {
            rows: self.rows,
            cols: self.cols,
            format: QFormat::Q4,
            scales: vec![0.0; self.scales.len()],
            mins: vec![0.0; self.mins.len()],
            q: vec![0; self.q.len()],
            interleaved: true,
        };
        for g in 0..self.rows / GROUP {
            for k in 0..per_row {
                let gb = g * per_row + k;
                for r in 0..GROUP {
                    let b = (g * GROUP + r) * per_row + k;
                    m.scales[gb * GROUP + r] = self.scales[b];
                    m.mins[gb * GROUP + r] = self.mins[b];
                    for p in 0..4 {
                        let to = gb * GROUP_BLOCK + p * 64 + r * 4;
                        m.q[to..to + 4]
                            .copy_from_slice(&self.q[b * 16 + 4 * p..b * 16 + 4 * p + 4]);
                    }
                }
            }
        }
        Some(m)
    }

    /// The values of block `b` (row-major numbering) of an interleaved matrix.
    pub(super) fn interleaved_values(&self, b: usize) -> [f32; BLOCK] {
        let (qs, d, m) = self.interleaved_block(b);
        let mut out = [0.0f32; BLOCK];
        for (j, &q) in qs.iter().enumerate() {
            out[j] = f32::from(q & 0x0f) * d + m;
            out[j + 16] = f32::from(q >> 4) * d + m;
        }
        out
    }

    /// Block `b` (row-major numbering) of an interleaved matrix as its original 16 bytes, scale
    /// and offset.
    fn interleaved_block(&self, b: usize) -> ([u8; 16], f32, f32) {
        let per_row = self.cols / BLOCK;
        let (r, k) = (b / per_row, b % per_row);
        let (g, lane) = (r / GROUP, r % GROUP);
        let gb = g * per_row + k;
        let mut bytes = [0u8; 16];
        for p in 0..4 {
            let from = gb * GROUP_BLOCK + p * 64 + lane * 4;
            bytes[4 * p..4 * p + 4].copy_from_slice(&self.q[from..from + 4]);
        }
        (
            bytes,
            self.scales[gb * GROUP + lane],
            self.mins[gb * GROUP + lane],
        )
    }
}

/// `out = x · Wᵀ` for weight rows `r0..r0 + out.len() / n` (a multiple of 16) of the
/// interleaved `m` and the `n` (at most 8) quantized input rows, `out` as `[rows, n]`.
pub fn products(m: &QMatrix, x: &Quantized, r0: usize, n: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(simd) = super::vectors::v4() {
        simd.vectorize(v4::Kernel {
            simd,
            m,
            x,
            r0,
            n,
            out,
        });
        return;
    }
    plain(m, x, r0, n, out);
}

/// The same arithmetic in plain code, lane by lane (CPUs without AVX-512, and the reference the
/// vector kernel is tested against): the same integer sums, and the same two multiply-adds per
/// block in the same order, so the same results.
pub fn plain(m: &QMatrix, x: &Quantized, r0: usize, n: usize, out: &mut [f32]) {
    let per_row = m.cols / BLOCK;
    for (gi, o) in out.chunks_exact_mut(GROUP * n).enumerate() {
        let g = r0 / GROUP + gi;
        let mut acc = vec![[0.0f32; GROUP]; n];
        for k in 0..per_row {
            let gb = g * per_row + k;
            let wq = &m.q[gb * GROUP_BLOCK..(gb + 1) * GROUP_BLOCK];
            let d = &m.scales[gb * GROUP..(gb + 1) * GROUP];
            let mn = &m.mins[gb * GROUP..(gb + 1) * GROUP];
            for (i, a) in acc.iter_mut().enumerate() {
                let (words, dx, sx) = x.block(i, k);
                for r in 0..GROUP {
                    let mut s = 0i32;
                    for p in 0..4 {
                        let w = &wq[p * 64 + r * 4..p * 64 + r * 4 + 4];
                        let (lo, hi) = (words[p].to_le_bytes(), words[p + 4].to_le_bytes());
                        for j in 0..4 {
                            s += i32::from(w[j] & 0x0f) * i32::from(lo[j] as i8);
                            s += i32::from(w[j] >> 4) * i32::from(hi[j] as i8);
                        }
                    }
                    a[r] = (s as f32).mul_add(d[r] * dx, a[r]);
                    a[r] = mn[r].mul_add(sx, a[r]);
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            for r in 0..GROUP {
                o[r * n + i] = a[r];
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod v4 {
    use core::arch::x86_64::{__m512, __m512i};

    use pulp::x86::V4;

    use super::{BLOCK, GROUP, GROUP_BLOCK, QMatrix, Quantized};

    /// One task's products, run with AVX-512 enabled (everything inlined into that context).
    pub(super) struct Kernel<'a> {
        pub simd: V4,
        pub m: &'a QMatrix,
        pub x: &'a Quantized,
        pub r0: usize,
        pub n: usize,
        pub out: &'a mut [f32],
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
                n,
                out,
            } = self;
            match n {
                1 => groups::<1>(simd, m, x, r0, out),
                2 => groups::<2>(simd, m, x, r0, out),
                3 => groups::<3>(simd, m, x, r0, out),
                4 => groups::<4>(simd, m, x, r0, out),
                5 => groups::<5>(simd, m, x, r0, out),
                6 => groups::<6>(simd, m, x, r0, out),
                7 => groups::<7>(simd, m, x, r0, out),
                _ => groups::<8>(simd, m, x, r0, out),
            }
        }
    }

    /// 64 bytes of `b` from `at` as a vector.
    #[inline(always)]
    fn bytes64(b: &[u8], at: usize) -> __m512i {
        let mut v = [0u8; 64];
        v.copy_from_slice(&b[at..at + 64]);
        pulp::cast(v)
    }

    /// 16 values of `v` from `at` as a vector.
    #[inline(always)]
    fn lanes16(v: &[f32], at: usize) -> __m512 {
        let mut l = [0.0f32; GROUP];
        l.copy_from_slice(&v[at..at + GROUP]);
        pulp::cast(l)
    }

    /// The groups of 16 weight rows from `r0`, each against the `N` input rows, accumulators in
    /// registers.
    #[inline(always)]
    fn groups<const N: usize>(simd: V4, m: &QMatrix, x: &Quantized, r0: usize, out: &mut [f32]) {
        let (f, bw) = (simd.avx512f, simd.avx512bw);
        let per_row = m.cols / BLOCK;
        let low = f._mm512_set1_epi8(0x0f);
        let ones = f._mm512_set1_epi16(1);
        for (gi, o) in out.chunks_exact_mut(GROUP * N).enumerate() {
            let g = r0 / GROUP + gi;
            let mut acc = [f._mm512_set1_ps(0.0); N];
            for k in 0..per_row {
                let gb = g * per_row + k;
                let Some(wq) = m.q.get(gb * GROUP_BLOCK..(gb + 1) * GROUP_BLOCK) else {
                    return;
                };
                let a = [
                    bytes64(wq, 0),
                    bytes64(wq, 64),
                    bytes64(wq, 128),
                    bytes64(wq, 192),
                ];
                let w = [
                    f._mm512_and_si512(a[0], low),
                    f._mm512_and_si512(a[1], low),
                    f._mm512_and_si512(a[2], low),
                    f._mm512_and_si512(a[3], low),
                    f._mm512_and_si512(bw._mm512_srli_epi16::<4>(a[0]), low),
                    f._mm512_and_si512(bw._mm512_srli_epi16::<4>(a[1]), low),
                    f._mm512_and_si512(bw._mm512_srli_epi16::<4>(a[2]), low),
                    f._mm512_and_si512(bw._mm512_srli_epi16::<4>(a[3]), low),
                ];
                let (d, mn) = (lanes16(&m.scales, gb * GROUP), lanes16(&m.mins, gb * GROUP));
                for (i, acc) in acc.iter_mut().enumerate() {
                    let (words, dx, sx) = x.block(i, k);
                    let mut s = bw._mm512_maddubs_epi16(w[0], f._mm512_set1_epi32(words[0]));
                    for p in 1..8 {
                        let t = bw._mm512_maddubs_epi16(w[p], f._mm512_set1_epi32(words[p]));
                        s = bw._mm512_add_epi16(s, t);
                    }
                    let s = f._mm512_cvtepi32_ps(bw._mm512_madd_epi16(s, ones));
                    let scale = f._mm512_mul_ps(d, f._mm512_set1_ps(dx));
                    *acc = f._mm512_fmadd_ps(s, scale, *acc);
                    *acc = f._mm512_fmadd_ps(mn, f._mm512_set1_ps(sx), *acc);
                }
            }
            for (i, a) in acc.iter().enumerate() {
                let a: [f32; GROUP] = pulp::cast(*a);
                for r in 0..GROUP {
                    o[r * N + i] = a[r];
                }
            }
        }
    }
}
