//! Attention on the host over the paged KV cache. Each new token's query attends to its own
//! sequence's cached keys up to its own position, read block by block where they lie in the pool:
//! no gather into a padded tensor, no mask, no score matrix. The softmax runs online, one cache
//! block at a time (the running maximum and sum are rescaled when a block raises the maximum), so
//! the memory a row needs does not grow with the context, and the masked half of a causal prompt
//! is never computed. The query heads that share a KV head read each block while it is in cache.
//! Used on the CPU backend; other backends keep the tensor path.

use rayon::prelude::*;

use crate::kv::{KvError, KvView, PagedKvCache, SeqId};
use crate::qmat::tree_sum;

/// One query row: the sequence and the position of its token, which sees positions `0..=pos`.
pub(crate) type QueryRow = (SeqId, usize);

/// Attention of `rows` at `layer`: `q` is `[rows, heads, head_dim]` (RoPE applied), the scores
/// `q·k` times `scale` (`1/√head_dim`, or 1 for queries that come scaled), the result
/// `[rows, heads · head_dim]`. Every row's K/V must already be in the cache up to its position.
pub(crate) fn paged_attention(
    cache: &PagedKvCache,
    layer: usize,
    q: &[f32],
    rows: &[QueryRow],
    heads: usize,
    scale: f32,
) -> Result<Vec<f32>, KvError> {
    let l = *cache.layout();
    let width = heads * l.head_dim;
    if q.len() != rows.len() * width || heads == 0 || !heads.is_multiple_of(l.kv_heads) {
        return Err(KvError::BadWidth {
            got: q.len(),
            want: rows.len() * width,
        });
    }
    let views = rows
        .iter()
        .map(|&(seq, pos)| {
            let v = cache.view(seq, layer)?;
            if pos >= v.len() {
                return Err(KvError::NotWritten {
                    seq,
                    pos,
                    written: v.len(),
                });
            }
            Ok(v)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let shape = Shape {
        heads,
        kv_heads: l.kv_heads,
        head_dim: l.head_dim,
        scale,
    };
    let mut out = vec![0.0f32; rows.len() * width];
    let work: usize = rows.iter().map(|r| r.1 + 1).sum::<usize>() * width;
    let threads = rayon::current_num_threads();
    if rows.len() == 1 && threads > 1 && work >= 1 << 16 {
        // One row (a decode step at batch 1): its heads split over the threads, else one
        // thread attends while the others wait (a tenth of a batch-1 step at 128 tokens).
        let per = heads.div_ceil(threads.min(heads));
        out.par_chunks_mut(per * l.head_dim)
            .enumerate()
            .for_each(|(i, out)| {
                let h0 = i * per;
                let h1 = h0 + out.len() / l.head_dim;
                crate::qmat::vectors::arch().dispatch(Task {
                    shape,
                    q: &q[h0 * l.head_dim..h1 * l.head_dim],
                    out,
                    rows,
                    views: &views,
                    heads: h0..h1,
                });
            });
        return Ok(out);
    }
    let tiles = tiles(rows);
    let mut parts = Vec::with_capacity(tiles.len());
    let mut rest = out.as_mut_slice();
    for &(_, len) in &tiles {
        let (part, tail) = rest.split_at_mut(len * width);
        parts.push(part);
        rest = tail;
    }
    let run = |(out, &(first, len)): (&mut [f32], &(usize, usize))| {
        crate::qmat::vectors::arch().dispatch(Task {
            shape,
            q: &q[first * width..(first + len) * width],
            out,
            rows: &rows[first..first + len],
            views: &views[first..first + len],
            heads: 0..heads,
        });
    };
    if work >= 1 << 16 {
        parts.into_par_iter().zip(tiles.par_iter()).for_each(run);
    } else {
        parts.into_iter().zip(tiles.iter()).for_each(run);
    }
    Ok(out)
}

/// Query rows a tile holds: one vector lane each.
const TILE: usize = 16;

/// Runs of rows of one sequence at consecutive positions (a prompt's tokens), cut into tiles
/// of at most [`TILE`] rows: `(first row, rows)`.
fn tiles(rows: &[QueryRow]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        match out.last_mut() {
            Some((first, len))
                if *len < TILE && rows[*first].0 == r.0 && rows[*first].1 + *len == r.1 =>
            {
                *len += 1
            }
            _ => out.push((i, 1)),
        }
    }
    out
}

#[derive(Clone, Copy)]
struct Shape {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f32,
}

/// One task's rows, run by pulp with the CPU's vector features enabled (everything below is
/// inlined into it, so the loops vectorize).
struct Task<'a> {
    shape: Shape,
    q: &'a [f32],
    out: &'a mut [f32],
    rows: &'a [QueryRow],
    views: &'a [KvView<'a>],
    /// The query heads `q` and `out` hold (all of them but for a split row).
    heads: std::ops::Range<usize>,
}

impl pulp::WithSimd for Task<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        let sh = self.shape;
        let width = self.heads.len() * sh.head_dim;
        let block = self.views.first().map_or(1, |v| v.block_size());
        if self.rows.len() >= TILE_MIN {
            // Consecutive positions of one sequence (see `tiles`).
            attend_tile(
                simd,
                sh,
                self.q,
                self.out,
                &self.views[0],
                self.rows[0].1,
                block,
            );
            return;
        }
        // Per head: the running maximum and sum; the block's scores.
        let here = self.heads.len();
        let mut max = vec![f32::NEG_INFINITY; here];
        let mut sum = vec![0.0f32; here];
        let mut scores = vec![0.0f32; here * block];
        for (((q, out), &(_, pos)), view) in self
            .q
            .chunks_exact(width)
            .zip(self.out.chunks_exact_mut(width))
            .zip(self.rows)
            .zip(self.views)
        {
            max.fill(f32::NEG_INFINITY);
            sum.fill(0.0);
            attend_row(
                simd,
                sh,
                self.heads.start,
                q,
                out,
                view,
                pos,
                (&mut max, &mut sum, &mut scores),
            );
        }
    }
}

/// One query row over its sequence's blocks; `out` starts zeroed and ends normalised. A block's
/// keys and values are read token by token, each token's row (every KV head) in memory order,
/// for all the query heads at once: read head by head, each head's keys were sixteen short
/// strided reads the prefetcher did not follow, and the multiply-adds waited on memory (a
/// quarter of a batch-8 decode step was attention, most of it stalled on those loads).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend_row<S: pulp::Simd>(
    simd: S,
    sh: Shape,
    first_head: usize,
    q: &[f32],
    out: &mut [f32],
    view: &KvView,
    pos: usize,
    (max, sum, scores): (&mut [f32], &mut [f32], &mut [f32]),
) {
    let hd = sh.head_dim;
    let group = sh.heads / sh.kv_heads;
    let token = sh.kv_heads * hd;
    let seen = pos + 1;
    let bs = view.block_size();
    for b in 0..seen.div_ceil(bs) {
        let (keys, values) = view.block(b);
        let n = (keys.len() / token).min(seen - b * bs);
        // Scores, `[head, key]`.
        for (t, krow) in keys.chunks_exact(token).take(n).enumerate() {
            for (h, qh) in q.chunks_exact(hd).enumerate() {
                let kv = ((first_head + h) / group) * hd;
                scores[h * bs + t] = dot(qh, &krow[kv..kv + hd]) * sh.scale;
            }
        }
        for (h, acc) in out.chunks_exact_mut(hd).enumerate() {
            let s = &mut scores[h * bs..h * bs + n];
            let top = s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            if top > max[h] {
                // exp(-inf) = 0 on the first block: nothing to rescale yet.
                let c = (max[h] - top).exp();
                sum[h] *= c;
                acc.iter_mut().for_each(|a| *a *= c);
                max[h] = top;
            }
            // The weights, exponentiated a vector of lanes at a time.
            for part in s.chunks_mut(TILE) {
                let mut lanes = [f32::NEG_INFINITY; TILE];
                lanes[..part.len()].copy_from_slice(part);
                lanes.iter_mut().for_each(|x| *x -= max[h]);
                exp_lanes(&mut lanes);
                part.copy_from_slice(&lanes[..part.len()]);
                sum[h] += lanes.iter().sum::<f32>();
            }
        }
        // Values, token by token into every head's accumulator.
        for (t, vrow) in values.chunks_exact(token).take(n).enumerate() {
            for (h, acc) in out.chunks_exact_mut(hd).enumerate() {
                let kv = ((first_head + h) / group) * hd;
                axpy_lanes(simd, acc, scores[h * bs + t], &vrow[kv..kv + hd]);
            }
        }
    }
    for (h, acc) in out.chunks_exact_mut(hd).enumerate() {
        let inv = 1.0 / sum[h];
        acc.iter_mut().for_each(|a| *a *= inv);
    }
}

/// `acc += p · v` in the CPU's vectors.
#[inline(always)]
fn axpy_lanes<S: pulp::Simd>(simd: S, acc: &mut [f32], p: f32, v: &[f32]) {
    let (a, a_tail) = S::as_mut_simd_f32s(acc);
    let (x, x_tail) = S::as_simd_f32s(v);
    let pv = simd.splat_f32s(p);
    for (a, &x) in a.iter_mut().zip(x) {
        *a = simd.mul_add_f32s(pv, x, *a);
    }
    axpy(a_tail, p, x_tail);
}

/// Below this many rows a tile is attended row by row (a decode step's rows, each of its own
/// sequence): lanes would stay empty.
const TILE_MIN: usize = 4;

/// Rows of one sequence at positions `first..first + rows`, one vector lane per row: scores
/// for a key are computed for all the tile's rows at once from the queries laid out
/// dimension-major, the softmax runs on whole lanes, and the masked keys past a row's position
/// score −∞.
#[inline(always)]
fn attend_tile<S: pulp::Simd>(
    simd: S,
    sh: Shape,
    q: &[f32],
    out: &mut [f32],
    view: &KvView,
    first: usize,
    block: usize,
) {
    let hd = sh.head_dim;
    let width = sh.heads * hd;
    let rows = q.len() / width;
    let group = sh.heads / sh.kv_heads;
    let token = sh.kv_heads * hd;
    let seen = first + rows;
    // Queries of one head, dimension-major and scaled; the block's scores, key-major.
    let mut qt = vec![[0.0f32; TILE]; hd];
    let mut scores = vec![[0.0f32; TILE]; block];
    let mut acc = vec![0.0f32; TILE * hd];
    for h in 0..sh.heads {
        let kv = (h / group) * hd;
        for (r, row) in q.chunks_exact(width).enumerate() {
            for (d, x) in row[h * hd..(h + 1) * hd].iter().enumerate() {
                qt[d][r] = x * sh.scale;
            }
        }
        let mut max = [f32::NEG_INFINITY; TILE];
        let mut sum = [0.0f32; TILE];
        acc.fill(0.0);
        for b in 0..seen.div_ceil(block) {
            let (keys, values) = view.block(b);
            let t0 = b * block;
            let n = (keys.len() / token).min(seen - t0);
            let mut top = [f32::NEG_INFINITY; TILE];
            for (j, s) in scores.iter_mut().enumerate().take(n) {
                let k = &keys[j * token + kv..j * token + kv + hd];
                scores_of(simd, &qt, k, s);
                // Row r (position first + r) sees keys up to its own position.
                for r in 0..TILE {
                    if t0 + j > first + r {
                        s[r] = f32::NEG_INFINITY;
                    }
                    top[r] = top[r].max(s[r]);
                }
            }
            let mut scale = [0.0f32; TILE];
            for r in 0..TILE {
                let m = max[r].max(top[r]);
                scale[r] = max[r] - m;
                max[r] = m;
            }
            exp_lanes(&mut scale);
            for r in 0..TILE {
                sum[r] *= scale[r];
            }
            for (r, a) in acc.chunks_exact_mut(hd).enumerate().take(rows) {
                a.iter_mut().for_each(|x| *x *= scale[r]);
            }
            for s in scores.iter_mut().take(n) {
                for r in 0..TILE {
                    s[r] -= max[r];
                }
                exp_lanes(s);
                for r in 0..TILE {
                    sum[r] += s[r];
                }
            }
            let v = HeadValues {
                data: values,
                token,
                kv,
            };
            for (r, a) in acc.chunks_exact_mut(hd).enumerate().take(rows) {
                pv(simd, a, n, |j| scores[j][r], v);
            }
        }
        for (r, a) in acc.chunks_exact(hd).enumerate().take(rows) {
            let inv = 1.0 / sum[r];
            for (o, x) in out[r * width + h * hd..r * width + (h + 1) * hd]
                .iter_mut()
                .zip(a)
            {
                *o = x * inv;
            }
        }
    }
}

/// `s[r] = Σ_d qt[d][r] · k[d]`: one key's scores for all the tile's rows, in the CPU's
/// vectors, written out (left to itself, the compiler unrolls this into scalar multiply-adds),
/// with four independent chains of multiply-adds in registers so they overlap.
#[inline(always)]
fn scores_of<S: pulp::Simd>(simd: S, qt: &[[f32; TILE]], k: &[f32], s: &mut [f32; TILE]) {
    let zero = simd.splat_f32s(0.0);
    let (lanes, _) = S::as_mut_simd_f32s(s);
    if lanes.len() > 2 {
        // Narrow vectors (no SIMD found): the plain loop.
        for (r, x) in s.iter_mut().enumerate() {
            *x = qt.iter().zip(k).map(|(q, &kd)| q[r] * kd).sum();
        }
        return;
    }
    let mut part = [[zero; 4]; 2];
    let whole = k.len() / 4 * 4;
    for (q4, k4) in qt[..whole].chunks_exact(4).zip(k[..whole].chunks_exact(4)) {
        for c in 0..4 {
            let kd = simd.splat_f32s(k4[c]);
            for (p, &q) in part.iter_mut().zip(S::as_simd_f32s(&q4[c]).0) {
                p[c] = simd.mul_add_f32s(q, kd, p[c]);
            }
        }
    }
    for (qd, &kd) in qt[whole..].iter().zip(&k[whole..]) {
        let kd = simd.splat_f32s(kd);
        for (p, &q) in part.iter_mut().zip(S::as_simd_f32s(qd).0) {
            p[0] = simd.mul_add_f32s(q, kd, p[0]);
        }
    }
    for (l, p) in lanes.iter_mut().zip(&part) {
        *l = simd.add_f32s(simd.add_f32s(p[0], p[1]), simd.add_f32s(p[2], p[3]));
    }
}

/// `e^x` on every lane, branch-free so it vectorizes (Cephes' single-precision polynomial:
/// relative error about 1e-7; −∞ and anything below −87 give 0).
#[inline(always)]
fn exp_lanes(x: &mut [f32; TILE]) {
    for v in x.iter_mut() {
        let zero = *v < -87.0;
        let a = v.clamp(-87.0, 88.0);
        let n = (a * std::f32::consts::LOG2_E + 0.5).floor();
        let r = a - n * 0.693_359_4 + n * 2.121_944_4e-4;
        let mut p = 1.987_569_1e-4f32;
        p = p.mul_add(r, 1.398_2e-3);
        p = p.mul_add(r, 8.333_452e-3);
        p = p.mul_add(r, 4.166_579_6e-2);
        p = p.mul_add(r, 1.666_666_5e-1);
        p = p.mul_add(r, 0.5);
        let e = (p * r).mul_add(r, r) + 1.0;
        let two_n = f32::from_bits(((n as i32 + 127) as u32) << 23);
        *v = if zero { 0.0 } else { e * two_n };
    }
}

/// `Σ a·b` in two 16-lane accumulators taken in turn, summed as a tree (a single accumulator
/// and a lane-by-lane sum made each key's score wait on about twenty dependent additions).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [[0.0f32; 16]; 2];
    let whole = a.len() / 16 * 16;
    for (i, (x, y)) in a[..whole]
        .chunks_exact(16)
        .zip(b[..whole].chunks_exact(16))
        .enumerate()
    {
        let acc = &mut acc[i & 1];
        for j in 0..16 {
            acc[j] = x[j].mul_add(y[j], acc[j]);
        }
    }
    let mut s = tree_sum(std::array::from_fn(|j| acc[0][j] + acc[1][j]));
    for j in whole..a.len() {
        s = a[j].mul_add(b[j], s);
    }
    s
}

/// The values of a block's keys for one KV head: key `j`'s at `data[j · token + kv ..]`, one
/// head wide.
#[derive(Clone, Copy)]
struct HeadValues<'a> {
    data: &'a [f32],
    token: usize,
    kv: usize,
}

impl<'a> HeadValues<'a> {
    #[inline(always)]
    fn key(&self, j: usize, head_dim: usize) -> &'a [f32] {
        &self.data[j * self.token + self.kv..j * self.token + self.kv + head_dim]
    }
}

/// `a += Σ_j w(j) · v_j` over `n` keys of a block. The accumulator stays in registers across
/// the keys: taken key by key for every row of a tile, it was loaded and stored at every
/// multiply-add (a third of a 2048-token prefill's attention, measured).
#[inline(always)]
fn pv<S: pulp::Simd>(simd: S, a: &mut [f32], n: usize, w: impl Fn(usize) -> f32, v: HeadValues) {
    let lanes = size_of::<S::f32s>() / 4;
    match (a.len().is_multiple_of(lanes), a.len() / lanes) {
        (true, 1) => pv_fixed::<S, 1>(simd, a, n, w, v),
        (true, 2) => pv_fixed::<S, 2>(simd, a, n, w, v),
        (true, 4) => pv_fixed::<S, 4>(simd, a, n, w, v),
        (true, 8) => pv_fixed::<S, 8>(simd, a, n, w, v),
        (true, 16) => pv_fixed::<S, 16>(simd, a, n, w, v),
        _ => {
            let hd = a.len();
            for j in 0..n {
                axpy(a, w(j), v.key(j, hd));
            }
        }
    }
}

/// [`pv`] for a head of `NV` vectors.
#[inline(always)]
fn pv_fixed<S: pulp::Simd, const NV: usize>(
    simd: S,
    a: &mut [f32],
    n: usize,
    w: impl Fn(usize) -> f32,
    v: HeadValues,
) {
    let hd = a.len();
    let (av, _) = S::as_mut_simd_f32s(a);
    let mut reg: [S::f32s; NV] = std::array::from_fn(|d| av[d]);
    for j in 0..n {
        let p = simd.splat_f32s(w(j));
        let (vv, _) = S::as_simd_f32s(v.key(j, hd));
        for d in 0..NV {
            reg[d] = simd.mul_add_f32s(p, vv[d], reg[d]);
        }
    }
    av.copy_from_slice(&reg);
}

#[inline(always)]
fn axpy(acc: &mut [f32], p: f32, v: &[f32]) {
    for (a, &x) in acc.iter_mut().zip(v) {
        *a = p.mul_add(x, *a);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qmat::test_values as values;

    #[test]
    fn exp_on_lanes_matches_the_library_and_underflows_to_zero() {
        let mut worst = 0.0f32;
        for i in -2000..=2000 {
            let mut x = [0.0f32; TILE];
            for (l, v) in x.iter_mut().enumerate() {
                *v = i as f32 * 0.043 + l as f32 * 0.0027;
            }
            let want = x.map(f32::exp);
            exp_lanes(&mut x);
            for (got, want) in x.iter().zip(want) {
                worst = worst.max((got - want).abs() / want);
            }
        }
        assert!(worst < 1e-6, "relative error {worst}");
        let mut x = [f32::NEG_INFINITY; TILE];
        x[1] = -100.0;
        x[2] = 0.0;
        exp_lanes(&mut x);
        assert_eq!((x[0], x[1], x[2]), (0.0, 0.0, 1.0));
    }

    #[test]
    fn one_rows_heads_split_over_the_threads_equal_dense_attention() {
        use crate::kv::KvLayout;
        // 9 query heads on 3 KV heads (SmolLM2's shape), a context long enough to be split.
        let (heads, kv_heads, hd, len) = (9usize, 3usize, 16usize, 600usize);
        let layout = KvLayout {
            layers: 1,
            kv_heads,
            head_dim: hd,
            block_size: 16,
            model_hash: 0,
        };
        let mut cache = PagedKvCache::new(layout, len.div_ceil(16));
        let seq = cache.create();
        let (k, v) = (
            values(len * kv_heads * hd, 1),
            values(len * kv_heads * hd, 2),
        );
        for t in 0..len {
            let r = t * kv_heads * hd..(t + 1) * kv_heads * hd;
            cache
                .append(seq, 0, &k[r.clone()], &v[r])
                .expect("room for the context");
        }
        let q: Vec<f32> = values(heads * hd, 3).iter().map(|x| x * 8.0).collect();
        let scale = 0.25;
        // Dense, in f64.
        let mut want = vec![0.0f64; heads * hd];
        for h in 0..heads {
            let kv = (h / (heads / kv_heads)) * hd;
            let scores: Vec<f64> = (0..len)
                .map(|t| {
                    let key = &k[t * kv_heads * hd + kv..][..hd];
                    let s: f64 = (0..hd)
                        .map(|d| f64::from(q[h * hd + d]) * f64::from(key[d]))
                        .sum();
                    s * scale
                })
                .collect();
            let top = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - top).exp()).collect();
            let sum: f64 = e.iter().sum();
            for (t, w) in e.iter().enumerate() {
                for d in 0..hd {
                    want[h * hd + d] += w / sum * f64::from(v[t * kv_heads * hd + kv + d]);
                }
            }
        }
        // One thread (no split), two (5 + 4 heads) and four (3 + 3 + 3).
        for threads in [1, 2, 4] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("a thread pool");
            // The cache moves to the pool's thread and back (it is not shared between threads).
            let q = &q;
            let (got, back) = pool.install(move || {
                let got = paged_attention(&cache, 0, q, &[(seq, len - 1)], heads, scale as f32);
                (got, cache)
            });
            cache = back;
            let got = got.expect("written");
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (f64::from(*g) - w).abs() < 1e-5,
                    "{threads} threads, value {i}: {g} vs {w}"
                );
            }
        }
    }

    #[test]
    fn rows_of_one_sequence_at_consecutive_positions_share_tiles() {
        let rows: Vec<QueryRow> = (0..20)
            .map(|p| (1, p))
            .chain([(2, 5), (3, 0), (3, 1), (3, 3)])
            .collect();
        assert_eq!(
            tiles(&rows),
            vec![(0, 16), (16, 4), (20, 1), (21, 2), (23, 1)]
        );
    }
}
