//! Weight matrices kept in their quantized form on the CPU, multiplied with kernels that
//! dequantize on the fly.
//!
//! A decode step at a small batch is a matrix-vector product per weight matrix: it reads every
//! weight once and does two floating-point operations with it, so its speed is the speed of
//! reading the weights. Dequantized to f32 they are 5 to 6 times the bytes of the file's blocks
//! (SmolLM2-135M Q4_1: 651 MB against 112 MB kept here). [`QMatrix`] keeps the blocks (scales as f32,
//! values as packed nibbles or bytes) and computes `y = x · Wᵀ` block by block: the 32 values of
//! a block are widened to f32 in registers and multiplied with the input there, so nothing of
//! the matrix is ever written out in f32. The arithmetic is the dequantized weights' exactly, up
//! to the order of the additions.
//!
//! Many rows at once (a prompt) are a matrix-matrix product, which a blocked GEMM does far
//! better than dot products: [`QMatrix::dequantize`] gives the f32 matrix for that path, one
//! matrix at a time.
//!
//! Work is split over output rows across threads (rayon), and the inner loops are compiled for
//! the CPU's widest vector unit found at run time (pulp's dispatch: AVX2+FMA or AVX-512 on
//! x86-64, NEON on aarch64), so one binary runs everywhere; `DOPD_CPU_VECTORS=avx2` caps it at
//! AVX2 (`qmat/vectors.rs`).

use rayon::prelude::*;

use dopd_model::gguf::{GgmlType, Gguf, GgufError, f16_to_f32};

pub mod digits;
pub mod packed;
pub(crate) mod vectors;

/// Values per quantization block.
pub const BLOCK: usize = 32;

/// How a [`QMatrix`] stores its values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QFormat {
    /// 4-bit values `q` in 0..16 with a scale `d` and an offset `m` per block: `d·q + m`
    /// (ggml's Q4_1; Q4_0 is the same with `m = -8·d`). Two values per byte: the low nibbles
    /// of a block's 16 bytes are its values 0..16, the high nibbles 16..32.
    Q4,
    /// 8-bit signed values with a scale per block: `d·q` (ggml's Q8_0).
    Q8,
}

/// A `[rows, cols]` matrix in quantized blocks along its rows (`cols` a multiple of 32).
#[derive(Clone, Debug)]
pub struct QMatrix {
    pub rows: usize,
    pub cols: usize,
    pub format: QFormat,
    /// One scale per block, row-major.
    scales: Vec<f32>,
    /// One offset per block (Q4 only).
    mins: Vec<f32>,
    /// Packed values: 16 bytes per block (Q4) or 32 (Q8).
    q: Vec<u8>,
    /// Q4 with the rows interleaved in groups of 16 ([`QMatrix::interleaved`]): the scales,
    /// offsets and bytes in [`packed`]'s order, multiplied there on 8-bit inputs. The f32
    /// kernels below never see such a matrix (the products and [`QMatrix::dequantize_row`]
    /// route it), so their code is the same as without it: a third case in their block
    /// function, even one that only fills NaN, made the batch kernel twice as slow (measured).
    interleaved: bool,
}

/// Output rows per parallel task for a matrix of `rows`: at least eight tasks per thread, so
/// that a thread slowed down (a shared machine) leaves work for the other to take, and no more
/// than 64 rows each (fixed 64-row tasks gave a 192-row product three tasks on two threads: one
/// idle for a third of it). An even number, for the kernels that take two rows at a time.
fn task_rows(rows: usize) -> usize {
    let tasks = 8 * rayon::current_num_threads().max(1);
    rows.div_ceil(tasks).next_multiple_of(2).clamp(2, 64)
}

/// Input rows one pass over the weights serves (their accumulators stay in registers or L1).
pub const QUANT_ROWS: usize = 8;

/// Below this many weights a product runs on the calling thread.
const PARALLEL_MIN: usize = 1 << 16;

impl QMatrix {
    /// The GGUF tensor `name`, `[rows, cols]` (`cols` innermost), kept quantized when it is
    /// Q4_0, Q4_1 or Q8_0; `None` for other types (which the caller loads as f32).
    pub fn from_gguf(
        g: &Gguf,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<Option<Self>, GgufError> {
        let (t, data) = g.raw(name)?;
        if t.dims != [cols as u64, rows as u64] || !cols.is_multiple_of(BLOCK) {
            return Ok(None);
        }
        let half = |b: &[u8], i: usize| f16_to_f32(u16::from_le_bytes([b[i], b[i + 1]]));
        let blocks = rows * cols / BLOCK;
        let m = match t.dtype {
            GgmlType::Q4_0 | GgmlType::Q4_1 => {
                let q41 = t.dtype == GgmlType::Q4_1;
                let size = if q41 { 20 } else { 18 };
                let mut m = Self::empty(rows, cols, QFormat::Q4);
                for b in data.chunks_exact(size).take(blocks) {
                    let d = half(b, 0);
                    let (min, qs) = if q41 {
                        (half(b, 2), &b[4..20])
                    } else {
                        (-8.0 * d, &b[2..18])
                    };
                    m.scales.push(d);
                    m.mins.push(min);
                    m.q.extend_from_slice(qs);
                }
                m
            }
            GgmlType::Q8_0 => {
                let mut m = Self::empty(rows, cols, QFormat::Q8);
                for b in data.chunks_exact(34).take(blocks) {
                    m.scales.push(half(b, 0));
                    m.q.extend_from_slice(&b[2..34]);
                }
                m
            }
            _ => return Ok(None),
        };
        // `parse` checked the tensor's extent; a short one is a malformed file, not a panic.
        if m.scales.len() != blocks {
            return Err(GgufError::BadTensor {
                name: name.into(),
                reason: format!("holds {} of its {blocks} blocks", m.scales.len()),
            });
        }
        Ok(Some(m))
    }

    fn empty(rows: usize, cols: usize, format: QFormat) -> Self {
        let blocks = rows * cols / BLOCK;
        let per = match format {
            QFormat::Q4 => BLOCK / 2,
            QFormat::Q8 => BLOCK,
        };
        Self {
            rows,
            cols,
            format,
            scales: Vec::with_capacity(blocks),
            mins: Vec::with_capacity(if format == QFormat::Q4 { blocks } else { 0 }),
            q: Vec::with_capacity(blocks * per),
            interleaved: false,
        }
    }

    /// Quantizes a row-major `[rows, cols]` f32 matrix to Q8 (symmetric, one scale per block),
    /// for tests and for weights that come unquantized. `None` when `cols` is not a multiple of
    /// 32 or the values are not finite.
    pub fn quantize_q8(w: &[f32], rows: usize, cols: usize) -> Option<Self> {
        if !cols.is_multiple_of(BLOCK) || w.len() != rows * cols || !w.iter().all(|x| x.is_finite())
        {
            return None;
        }
        let mut m = Self::empty(rows, cols, QFormat::Q8);
        for b in w.chunks_exact(BLOCK) {
            let amax = b.iter().fold(0.0f32, |a, x| a.max(x.abs()));
            let d = amax / 127.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            m.scales.push(d);
            m.q.extend(
                b.iter()
                    .map(|x| (x * inv).round().clamp(-127.0, 127.0) as i8 as u8),
            );
        }
        Some(m)
    }

    /// Quantizes a row-major `[rows, cols]` f32 matrix to Q4 (one scale and offset per block:
    /// the block's minimum and a sixteenth of its range), for tests and benchmarks. `None` as
    /// for [`QMatrix::quantize_q8`].
    pub fn quantize_q4(w: &[f32], rows: usize, cols: usize) -> Option<Self> {
        if !cols.is_multiple_of(BLOCK) || w.len() != rows * cols || !w.iter().all(|x| x.is_finite())
        {
            return None;
        }
        let mut m = Self::empty(rows, cols, QFormat::Q4);
        for b in w.chunks_exact(BLOCK) {
            let lo = b.iter().fold(f32::INFINITY, |a, &x| a.min(x));
            let hi = b.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
            let d = (hi - lo) / 15.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            let q = |x: f32| ((x - lo) * inv).round().clamp(0.0, 15.0) as u8;
            m.scales.push(d);
            m.mins.push(lo);
            m.q.extend((0..16).map(|j| q(b[j]) | (q(b[j + 16]) << 4)));
        }
        Some(m)
    }

    /// Whether the rows are interleaved for products on 8-bit inputs ([`QMatrix::interleaved`]).
    pub fn is_interleaved(&self) -> bool {
        self.interleaved
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.q.len() + 4 * (self.scales.len() + self.mins.len())
    }

    /// Row `r` as f32 into `out` (`cols` long).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let per_row = self.cols / BLOCK;
        if self.interleaved {
            for (k, o) in out.chunks_exact_mut(BLOCK).enumerate().take(per_row) {
                o.copy_from_slice(&self.interleaved_values(r * per_row + k));
            }
            return;
        }
        for (k, o) in out.chunks_exact_mut(BLOCK).enumerate().take(per_row) {
            let b = r * per_row + k;
            self.block_values(b, o);
        }
    }

    /// The values of block `b` into `out` (32 long).
    fn block_values(&self, b: usize, out: &mut [f32]) {
        let Some(out) = out.first_chunk_mut::<BLOCK>() else {
            return;
        };
        let d = self.scales[b];
        match self.format {
            QFormat::Q4 => q4_values(&self.q[b * 16..b * 16 + 16], d, self.mins[b], out),
            QFormat::Q8 => q8_values(&self.q[b * 32..b * 32 + 32], d, out),
        }
    }

    /// The whole matrix in f32, row-major `[rows, cols]` (rows in parallel).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0f32; self.rows * self.cols];
        let run = |(r, o): (usize, &mut [f32])| self.dequantize_row(r, o);
        if self.rows * self.cols >= PARALLEL_MIN {
            out.par_chunks_mut(self.cols).enumerate().for_each(run);
        } else {
            out.chunks_mut(self.cols).enumerate().for_each(run);
        }
        out
    }

    /// `y = x · Wᵀ` for `n` input rows: `x` is row-major `[n, cols]`, the result `[n, rows]`.
    /// Each weight is read once per [`QUANT_ROWS`] input rows, so this is for small `n` (decode
    /// steps, short prompts); many rows go through [`QMatrix::dequantize`] and a GEMM.
    pub fn matmul_t(&self, x: &[f32], n: usize) -> Vec<f32> {
        Self::matmul_t_many(&[self], x, n).pop().unwrap_or_default()
    }

    /// [`QMatrix::matmul_t`] of several matrices with the same input (Q, K and V; gate and
    /// up), their tasks handed to the threads in one parallel loop: each loop is a fork and a
    /// join of every thread, a few microseconds, which a decode step otherwise pays seven times
    /// a layer. Every matrix must have `x`'s width.
    pub fn matmul_t_many(ms: &[&QMatrix], x: &[f32], n: usize) -> Vec<Vec<f32>> {
        let Some(cols) = ms.first().map(|m| m.cols) else {
            return Vec::new();
        };
        assert!(
            x.len() == n * cols && ms.iter().all(|m| m.cols == cols),
            "input of the wrong size"
        );
        if n > QUANT_ROWS {
            // In groups of rows the accumulators hold.
            let mut ys: Vec<Vec<f32>> = ms.iter().map(|m| Vec::with_capacity(n * m.rows)).collect();
            for part in x.chunks(QUANT_ROWS * cols) {
                for (y, p) in ys
                    .iter_mut()
                    .zip(Self::matmul_t_many(ms, part, part.len() / cols))
                {
                    y.extend(p);
                }
            }
            return ys;
        }
        let per_row = cols / BLOCK;
        // Output rows in tasks; each task writes its rows for every input row, `[task rows, n]`,
        // and then (for several input rows) moves them into their places in the products,
        // `[n, rows]`, in the same parallel loop: done after it, on one thread, the reordering
        // of the output matrix's products was a twentieth of a batch-8 decode step.
        let mut ts: Vec<Vec<f32>> = ms.iter().map(|m| vec![0.0f32; m.rows * n]).collect();
        let mut ys: Vec<Vec<f32>> = if n > 1 {
            ms.iter().map(|m| vec![0.0f32; m.rows * n]).collect()
        } else {
            Vec::new()
        };
        let mut tasks = Vec::new();
        let mut ys_left = ys.iter_mut();
        for (m, t) in ms.iter().zip(ts.iter_mut()) {
            let per_task = if m.interleaved {
                task_rows(m.rows).next_multiple_of(packed::GROUP)
            } else {
                task_rows(m.rows)
            };
            // Each input row's products, cut at the tasks' rows as the tasks come.
            let mut rows_of_y: Vec<&mut [f32]> = match ys_left.next() {
                Some(y) => y.chunks_mut(m.rows).collect(),
                None => Vec::new(),
            };
            for (i, out) in t.chunks_mut(per_task * n).enumerate() {
                let len = out.len() / n;
                let places: Vec<&mut [f32]> = rows_of_y
                    .iter_mut()
                    .map(|row| {
                        let (here, rest) = std::mem::take(row).split_at_mut(len);
                        *row = rest;
                        here
                    })
                    .collect();
                tasks.push((*m, i * per_task, out, places));
            }
        }
        // The input rows block-major (`[block, row, 32]`) once for every task's batch kernel.
        let xt = (n > 1 && ms.iter().any(|m| !m.interleaved)).then(|| block_major(x, n, cols));
        // Inputs rounded to 8 bits once for every interleaved matrix.
        let xq = ms
            .iter()
            .any(|m| m.interleaved)
            .then(|| packed::Quantized::new(x, cols));
        // One input row as 8-bit digits for the Q4 matrices, where the CPU has the integer
        // kernel for them (AVX-512, or AVX2 with FMA).
        let xd = (n == 1
            && digits::available()
            && ms.iter().any(|m| m.format == QFormat::Q4 && !m.interleaved))
        .then(|| digits::Digits::new(x))
        .flatten();
        let product = |m: &QMatrix, r0: usize, out: &mut [f32]| {
            if let (true, Some(xq)) = (m.interleaved, &xq) {
                packed::products(m, xq, r0, n, out);
                return;
            }
            if let Some(xd) = &xd
                && digits::products(m, xd, r0, out).is_some()
            {
                return;
            }
            vectors::arch().dispatch(Dots {
                m,
                x,
                xt: xt.as_deref(),
                per_row,
                r0,
                n,
                out,
            });
        };
        let run = |(m, r0, out, mut places): (&QMatrix, usize, &mut [f32], Vec<&mut [f32]>)| {
            product(m, r0, out);
            for (i, place) in places.iter_mut().enumerate() {
                for (r, o) in place.iter_mut().enumerate() {
                    *o = out[r * n + i];
                }
            }
        };
        let weights: usize = ms.iter().map(|m| m.rows * m.cols).sum();
        if weights >= PARALLEL_MIN {
            tasks.into_par_iter().for_each(run);
        } else {
            tasks.into_iter().for_each(run);
        }
        if n == 1 { ts } else { ys }
    }

    /// The dot product of weight row `r` with the one input row `x`; `xsum[k]` is the sum of
    /// `x`'s values in block `k`. A Q4 block's values are `d·q + m`, so its product is
    /// `d·Σ q·x + m·Σ x`: the offsets are one more dot product, of the row's offsets with the
    /// block sums (computed once for all rows), in lanes of its own after the loop. A single
    /// running sum of offsets inside the loop made every block wait for the last block's
    /// multiply-add (its latency bounded the loop: 15% of a batch-1 decode step, measured).
    /// The format is chosen outside the loop and the blocks are walked by iterators, so the loop
    /// has no branch but its own; the lanes are summed as a tree.
    #[inline(always)]
    fn row_dot(&self, r: usize, x: &[f32], xsum: &[f32], per_row: usize) -> f32 {
        let blocks = r * per_row..(r + 1) * per_row;
        let scales = &self.scales[blocks.clone()];
        // Two accumulators, taking blocks in turn: one would make each block's multiply-add
        // wait for the previous block's. The two formats' loops are written out: one generic
        // helper for both (the block's bytes a constant, the block function an argument) was
        // not compiled into the vector kernel and ran twenty times slower.
        let mut acc = [[0.0f32; 16]; 2];
        let mut offset = 0.0f32;
        match self.format {
            QFormat::Q4 => {
                let q = &self.q[blocks.start * 16..blocks.end * 16];
                let block = q4_block;
                let (qc, xc, dc) = (
                    q.chunks_exact(32),
                    x.chunks_exact(64),
                    scales.chunks_exact(2),
                );
                if let (Some(qs), Some(xb), Some(&d)) = (
                    qc.remainder().get(..16),
                    x.get(x.len() - 32..),
                    dc.remainder().first(),
                ) {
                    block(&mut acc[0], qs, xb, d);
                }
                for ((qs, xb), d) in qc.zip(xc).zip(dc) {
                    let [a0, a1] = &mut acc;
                    block(a0, &qs[..16], &xb[..32], d[0]);
                    block(a1, &qs[16..], &xb[32..], d[1]);
                }
                offset = lane_dot(&self.mins[blocks], xsum);
            }
            QFormat::Q8 => {
                let q = &self.q[blocks.start * 32..blocks.end * 32];
                let block = q8_block;
                let (qc, xc, dc) = (
                    q.chunks_exact(64),
                    x.chunks_exact(64),
                    scales.chunks_exact(2),
                );
                if let (Some(qs), Some(xb), Some(&d)) = (
                    qc.remainder().get(..32),
                    x.get(x.len() - 32..),
                    dc.remainder().first(),
                ) {
                    block(&mut acc[0], qs, xb, d);
                }
                for ((qs, xb), d) in qc.zip(xc).zip(dc) {
                    let [a0, a1] = &mut acc;
                    block(a0, &qs[..32], &xb[..32], d[0]);
                    block(a1, &qs[32..], &xb[32..], d[1]);
                }
            }
        }
        let acc: [f32; 16] = std::array::from_fn(|j| acc[0][j] + acc[1][j]);
        tree_sum(acc) + offset
    }

    /// Dot products of weight row `r` with every input row into `out` (`n` long). Each block
    /// is widened to f32 once and used for every input row.
    #[inline(always)]
    fn row_dots(&self, r: usize, x: &[f32], per_row: usize, out: &mut [f32]) {
        let cols = self.cols;
        let n = out.len();
        let mut acc = [[0.0f32; 16]; QUANT_ROWS];
        let mut w = [0.0f32; 32];
        for k in 0..per_row {
            let b = r * per_row + k;
            let d = self.scales[b];
            match self.format {
                QFormat::Q4 => {
                    let m = self.mins[b];
                    let qs: &[u8] = &self.q[b * 16..b * 16 + 16];
                    for j in 0..16 {
                        w[j] = f32::from(qs[j] & 0x0f) * d + m;
                        w[j + 16] = f32::from(qs[j] >> 4) * d + m;
                    }
                }
                QFormat::Q8 => {
                    let qs: &[u8] = &self.q[b * 32..b * 32 + 32];
                    for j in 0..32 {
                        w[j] = f32::from(qs[j] as i8) * d;
                    }
                }
            }
            for (i, a) in acc.iter_mut().enumerate().take(n) {
                let xb = &x[i * cols + k * 32..i * cols + k * 32 + 32];
                for j in 0..16 {
                    a[j] = w[j].mul_add(xb[j], w[j + 16].mul_add(xb[j + 16], a[j]));
                }
            }
        }
        for (o, a) in out.iter_mut().zip(&acc) {
            *o = tree_sum(*a);
        }
    }
}

/// `acc += d · (q · x)` over one Q4 block's 32 values (`x` its 32 inputs), in 16 lanes.
/// A function rather than a closure, so that it is always inlined into the kernel compiled for
/// the CPU's vector unit (a closure left out of line ran 3x slower at batch 1, measured).
#[inline(always)]
fn q4_block(acc: &mut [f32; 16], qs: &[u8], xb: &[f32], d: f32) {
    let (Some(qs), Some(lo), Some(hi)) = (
        qs.first_chunk::<16>(),
        xb.first_chunk::<16>(),
        xb.get(16..).and_then(|h| h.first_chunk::<16>()),
    ) else {
        return;
    };
    for j in 0..16 {
        let s = f32::from(qs[j] & 0x0f).mul_add(lo[j], f32::from(qs[j] >> 4) * hi[j]);
        acc[j] = d.mul_add(s, acc[j]);
    }
}

/// `acc += d · (q · x)` over one Q8 block, as [`q4_block`].
#[inline(always)]
fn q8_block(acc: &mut [f32; 16], qs: &[u8], xb: &[f32], d: f32) {
    let (Some(ql), Some(qh), Some(lo), Some(hi)) = (
        qs.first_chunk::<16>(),
        qs.get(16..).and_then(|h| h.first_chunk::<16>()),
        xb.first_chunk::<16>(),
        xb.get(16..).and_then(|h| h.first_chunk::<16>()),
    ) else {
        return;
    };
    for j in 0..16 {
        let s = f32::from(ql[j] as i8).mul_add(lo[j], f32::from(qh[j] as i8) * hi[j]);
        acc[j] = d.mul_add(s, acc[j]);
    }
}

/// `Σ a[i]·b[i]` in 16 independent lanes (so it vectorizes and no multiply-add waits for the
/// previous one), then summed as a tree.
#[inline(always)]
fn lane_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
    let rest: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for j in 0..16 {
            acc[j] = x[j].mul_add(y[j], acc[j]);
        }
    }
    tree_sum(acc) + rest
}

/// The sum of 16 lanes as a tree of pairwise additions (four vector steps rather than 15
/// dependent scalar additions).
#[inline(always)]
pub(crate) fn tree_sum(a: [f32; 16]) -> f32 {
    let b: [f32; 8] = std::array::from_fn(|j| a[j] + a[j + 8]);
    let c: [f32; 4] = std::array::from_fn(|j| b[j] + b[j + 4]);
    (c[0] + c[2]) + (c[1] + c[3])
}

/// One task's dot products, run by pulp with the CPU's vector features enabled: everything it
/// calls is inlined into that context, so the loops are vectorized for AVX2/AVX-512 or NEON.
struct Dots<'a> {
    m: &'a QMatrix,
    x: &'a [f32],
    /// `x` block-major ([`block_major`]), for batches.
    xt: Option<&'a [f32]>,
    per_row: usize,
    r0: usize,
    n: usize,
    out: &'a mut [f32],
}

impl pulp::WithSimd for Dots<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        let Self {
            m,
            x,
            xt,
            per_row,
            r0,
            n,
            out,
        } = self;
        if n == 1 {
            let xsum: Vec<f32> = x.chunks_exact(BLOCK).map(|b| b.iter().sum()).collect();
            for (i, o) in out.iter_mut().enumerate() {
                *o = m.row_dot(r0 + i, x, &xsum, per_row);
            }
            return;
        }
        let (Some(xt), true) = (xt, BLOCK.is_multiple_of(size_of::<S::f32s>() / 4)) else {
            // Vectors that do not tile a block (no SIMD found): the plain loop.
            for (i, o) in out.chunks_exact_mut(n).enumerate() {
                m.row_dots(r0 + i, x, per_row, o);
            }
            return;
        };
        let b = Batch { m, xt, per_row };
        match n {
            2 => blocked_rows::<S, 2>(simd, b, r0, out),
            3 => blocked_rows::<S, 3>(simd, b, r0, out),
            4 => blocked_rows::<S, 4>(simd, b, r0, out),
            5 => blocked_rows::<S, 5>(simd, b, r0, out),
            6 => blocked_rows::<S, 6>(simd, b, r0, out),
            7 => blocked_rows::<S, 7>(simd, b, r0, out),
            _ => blocked_rows::<S, 8>(simd, b, r0, out),
        }
    }
}

/// `x` (`[n, cols]`) as `[cols / 32, n, 32]`: a block's inputs for every row together, so the
/// batch kernel reads them at fixed offsets from one pointer.
fn block_major(x: &[f32], n: usize, cols: usize) -> Vec<f32> {
    let per_row = cols / BLOCK;
    let mut t = vec![0.0f32; x.len()];
    for (i, row) in x.chunks_exact(cols).enumerate() {
        for (k, b) in row.chunks_exact(BLOCK).enumerate() {
            let to = (k * n + i) * BLOCK;
            t[to..to + BLOCK].copy_from_slice(b);
        }
    }
    debug_assert_eq!(t.len(), per_row * n * BLOCK);
    t
}

/// A product's block-major input rows (`[block, row, 32]`) and the matrix they multiply.
#[derive(Clone, Copy)]
struct Batch<'a> {
    m: &'a QMatrix,
    xt: &'a [f32],
    per_row: usize,
}

/// The task's weight rows from `r0` against `N` block-major input rows: two weight rows at a
/// time where the `2 · N` accumulators fit in registers (AVX-512's 32; AVX2's 16 up to 4 input
/// rows), else one at a time. On AVX2, two weight rows against 8 input rows spilled the
/// accumulators to the stack: a batch-8 decode step ran slower than a batch-1 step
/// (`docs/benchmarks.md`).
#[inline(always)]
fn blocked_rows<S: pulp::Simd, const N: usize>(simd: S, b: Batch, r0: usize, out: &mut [f32]) {
    match b.m.format {
        QFormat::Q4 => rows_of::<S, N, true>(simd, b, r0, out),
        QFormat::Q8 => rows_of::<S, N, false>(simd, b, r0, out),
    }
}

/// [`blocked_rows`] for one format.
#[inline(always)]
fn rows_of<S: pulp::Simd, const N: usize, const Q4: bool>(
    simd: S,
    b: Batch,
    r0: usize,
    out: &mut [f32],
) {
    let mut r = r0;
    if size_of::<S::f32s>() >= 64 || N <= 4 {
        let mut pairs = out.chunks_exact_mut(2 * N);
        for o in &mut pairs {
            blocked_dots::<S, 2, N, Q4>(simd, b, r, o);
            r += 2;
        }
        let rest = pairs.into_remainder();
        if !rest.is_empty() {
            blocked_dots::<S, 1, N, Q4>(simd, b, r, rest);
        }
        return;
    }
    for o in out.chunks_exact_mut(N) {
        blocked_dots::<S, 1, N, Q4>(simd, b, r, o);
        r += 1;
    }
}

/// A Q4 block's 32 values, `d·q + m`.
#[inline(always)]
fn q4_values(qs: &[u8], d: f32, m: f32, out: &mut [f32; BLOCK]) {
    let Some(qs) = qs.first_chunk::<16>() else {
        return;
    };
    for j in 0..16 {
        out[j] = f32::from(qs[j] & 0x0f) * d + m;
        out[j + 16] = f32::from(qs[j] >> 4) * d + m;
    }
}

/// A Q8 block's 32 values, `d·q`.
#[inline(always)]
fn q8_values(qs: &[u8], d: f32, out: &mut [f32; BLOCK]) {
    let Some(qs) = qs.first_chunk::<BLOCK>() else {
        return;
    };
    for j in 0..BLOCK {
        out[j] = f32::from(qs[j] as i8) * d;
    }
}

/// Dot products of the `R` weight rows from `r0` with the `N` block-major input rows `xt` into
/// `out` (`[R, N]`). The accumulators (`R · N` vectors) stay in registers, since both counts are
/// constants; each block is widened to f32 once (in the kernel, with the CPU's vector features:
/// out of line, the widening was a fifth of a batch-8 decode step on AVX2) and each input vector
/// is read once for the `R` rows, at a fixed offset from the block's start.
#[inline(always)]
fn blocked_dots<S: pulp::Simd, const R: usize, const N: usize, const Q4: bool>(
    simd: S,
    b: Batch,
    r0: usize,
    out: &mut [f32],
) {
    let Batch { m, xt, per_row } = b;
    let zero = simd.splat_f32s(0.0);
    let mut acc = [[zero; N]; R];
    let mut w = [[0.0f32; BLOCK]; R];
    for (k, xk) in xt.chunks_exact(N * BLOCK).enumerate().take(per_row) {
        for (j, wj) in w.iter_mut().enumerate() {
            let at = (r0 + j) * per_row + k;
            if Q4 {
                q4_values(&m.q[at * 16..at * 16 + 16], m.scales[at], m.mins[at], wj);
            } else {
                q8_values(&m.q[at * 32..at * 32 + 32], m.scales[at], wj);
            }
        }
        let wv: [&[S::f32s]; R] = std::array::from_fn(|j| S::as_simd_f32s(&w[j]).0);
        let xv = S::as_simd_f32s(xk).0;
        let vpb = BLOCK * 4 / size_of::<S::f32s>();
        for (i, xi) in xv.chunks_exact(vpb).enumerate() {
            for (v, &b) in xi.iter().enumerate() {
                for j in 0..R {
                    acc[j][i] = simd.mul_add_f32s(wv[j][v], b, acc[j][i]);
                }
            }
        }
    }
    for (o, a) in out.chunks_exact_mut(N).zip(&acc) {
        for (o, &a) in o.iter_mut().zip(a) {
            *o = simd.reduce_sum_f32s(a);
        }
    }
}

/// `len` pseudo-random values in `[-0.5, 0.5)` from `seed` (the kernels' tests).
#[cfg(test)]
pub(crate) fn test_values(len: usize, seed: u64) -> Vec<f32> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        test_values(rows * cols, seed)
    }

    /// `x · Wᵀ` in f64 from the dequantized matrix.
    fn reference(w: &[f32], x: &[f32], rows: usize, cols: usize) -> Vec<f64> {
        let n = x.len() / cols;
        let mut y = vec![0.0; n * rows];
        for i in 0..n {
            for r in 0..rows {
                y[i * rows + r] = (0..cols)
                    .map(|c| f64::from(w[r * cols + c]) * f64::from(x[i * cols + c]))
                    .sum();
            }
        }
        y
    }

    #[test]
    fn quantized_products_equal_the_dequantized_matrixs() {
        // Enough rows for several parallel tasks and a ragged last one; an odd and an even
        // number of blocks per row.
        for cols in [96, 128] {
            let rows = 197;
            let w = matrix(rows, cols, 1);
            for q in [
                QMatrix::quantize_q4(&w, rows, cols).expect("q4"),
                QMatrix::quantize_q8(&w, rows, cols).expect("q8"),
            ] {
                let dense = q.dequantize();
                // The quantization is close to the original, and the product is the dequantized
                // matrix's up to rounding, for one row, a few, and more than one pass holds.
                let step = if q.format == QFormat::Q4 {
                    1.0 / 15.0
                } else {
                    0.5 / 127.0
                };
                assert!(
                    w.iter().zip(&dense).all(|(a, b)| (a - b).abs() <= step),
                    "{:?}",
                    q.format
                );
                // 2-4 and 5-8 rows take different kernels on AVX2 (two weight rows at a time,
                // then one).
                for n in [1, 2, 3, 4, 5, QUANT_ROWS, QUANT_ROWS + 3] {
                    let x = matrix(n, cols, 7 + n as u64);
                    let y = q.matmul_t(&x, n);
                    let want = reference(&dense, &x, rows, cols);
                    assert_eq!(y.len(), want.len());
                    for (a, b) in y.iter().zip(&want) {
                        assert!(
                            (f64::from(*a) - b).abs() < 1e-4,
                            "{:?} n={n}: {a} vs {b}",
                            q.format
                        );
                    }
                }
                let mut row = vec![0.0; cols];
                q.dequantize_row(rows - 1, &mut row);
                assert_eq!(row, dense[(rows - 1) * cols..]);
                // At least three times smaller than f32.
                assert!(q.bytes() * 3 < w.len() * 4, "{} bytes", q.bytes());
            }
        }
    }

    #[test]
    fn interleaved_products_on_8_bit_inputs_equal_the_rounded_inputs_products() {
        let (rows, cols) = (48, 96);
        let w = matrix(rows, cols, 3);
        let q = QMatrix::quantize_q4(&w, rows, cols).expect("q4");
        let qi = q.interleaved().expect("rows in 16s");
        assert!(qi.is_interleaved() && qi.format == QFormat::Q4);
        assert_eq!(qi.bytes(), q.bytes());
        // Same values, reordered.
        assert_eq!(qi.dequantize(), q.dequantize());
        // Q8, and rows that do not fill groups of 16, stay as they are.
        assert!(
            QMatrix::quantize_q8(&w, rows, cols)
                .expect("q8")
                .interleaved()
                .is_none()
        );
        let odd = QMatrix::quantize_q4(&w[..40 * cols], 40, cols).expect("q4");
        assert!(odd.interleaved().is_none());
        let dense = q.dequantize();
        for n in [1, 2, 3, QUANT_ROWS, QUANT_ROWS + 3] {
            let x = matrix(n, cols, 11 + n as u64);
            // The inputs rounded to 8 bits per block, as the kernel rounds them.
            let xr: Vec<f32> = x
                .chunks_exact(BLOCK)
                .flat_map(|b| {
                    let d = b.iter().fold(0.0f32, |a, v| a.max(v.abs())) / 127.0;
                    b.iter().map(move |v| {
                        if d > 0.0 {
                            (v / d).round().clamp(-127.0, 127.0) * d
                        } else {
                            0.0
                        }
                    })
                })
                .collect();
            let y = qi.matmul_t(&x, n);
            // `d·q` times the rounded inputs plus the offset times the exact inputs' sum, per
            // block, in f64.
            let per_row = cols / BLOCK;
            let mut want = vec![0.0f64; n * rows];
            for i in 0..n {
                for r in 0..rows {
                    for k in 0..per_row {
                        let b = r * per_row + k;
                        let m = f64::from(q.mins[b]);
                        for j in k * BLOCK..(k + 1) * BLOCK {
                            want[i * rows + r] += (f64::from(dense[r * cols + j]) - m)
                                * f64::from(xr[i * cols + j])
                                + m * f64::from(x[i * cols + j]);
                        }
                    }
                }
            }
            let exact = reference(&dense, &x, rows, cols);
            for ((a, b), e) in y.iter().zip(&want).zip(&exact) {
                assert!(
                    (f64::from(*a) - b).abs() < 1e-5,
                    "n={n}: {a} vs {b} (exact {e})"
                );
                assert!((f64::from(*a) - e).abs() < 2e-2, "n={n}: {a} vs exact {e}");
            }
            // A row's products do not depend on the rows beside it (the integer sums are exact
            // and each row's scales apply in the same order): a batch gives what each row gives
            // alone, bit for bit.
            for i in 0..n {
                let alone = qi.matmul_t(&x[i * cols..(i + 1) * cols], 1);
                assert_eq!(alone, y[i * rows..(i + 1) * rows], "n={n} row {i}");
            }
            // The plain kernel (CPUs without AVX-512) gives the same results, bit for bit.
            if n <= QUANT_ROWS {
                let xq = packed::Quantized::new(&x, cols);
                let mut out = vec![0.0f32; rows * n];
                packed::plain(&qi, &xq, 0, n, &mut out);
                let t: Vec<f32> = (0..n * rows)
                    .map(|j| out[(j % rows) * n + j / rows])
                    .collect();
                assert_eq!(t, y, "n={n}");
            }
        }
    }

    #[test]
    fn what_cannot_be_quantized_is_refused() {
        assert!(QMatrix::quantize_q8(&[0.0; 30], 1, 30).is_none());
        assert!(QMatrix::quantize_q4(&[f32::NAN; 32], 1, 32).is_none());
        assert!(QMatrix::quantize_q8(&[0.0; 32], 2, 32).is_none());
        // An all-zero block has a zero scale, not a division by zero.
        let z = QMatrix::quantize_q8(&[0.0; 64], 2, 32).expect("zeros");
        assert_eq!(z.matmul_t(&[1.0; 32], 1), vec![0.0, 0.0]);
    }
}
