//! The CubeCL kernels behind [`super::FusedOps`], one launch each, and their launchers. The
//! outputs are fresh contiguous tensors; inputs are read through their strides.

use burn::tensor::{Shape, TensorMetadata};
use burn_cubecl::CubeRuntime;
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;

/// Threads of an element-wise kernel's cube.
const ELEMENTWISE_THREADS: u32 = 256;

/// Threads of an RMS norm's cube (one cube per row; a power of two).
const NORM_THREADS: usize = 128;

/// `(mean + eps)^-1/2` of the row whose squares the cube's threads summed in part (`part`,
/// each): the parts added up in shared memory (a cube of `threads` threads, a power of two).
#[cube]
fn inverse_rms<F: Float>(part: F, cols: usize, eps: f32, #[comptime] threads: usize) -> F {
    let u = UNIT_POS_X as usize;
    let mut sum = SharedMemory::<F>::new(threads);
    sum[u] = part;
    sync_cube();
    let mut s = CUBE_DIM_X as usize / 2;
    while s > 0 {
        if u < s {
            let other = sum[u + s];
            sum[u] += other;
        }
        sync_cube();
        s /= 2;
    }
    F::new(1.0) / (sum[0] / F::cast_from(cols) + F::cast_from(eps)).sqrt()
}

#[cube(launch)]
fn rms_norm_kernel<F: Float>(
    x: &Tensor<F>,
    w: &Tensor<F>,
    out: &mut Tensor<F>,
    eps: f32,
    #[comptime] threads: usize,
    #[define(F)] _dtype: StorageType,
) {
    let row = CUBE_POS_X as usize;
    let u = UNIT_POS_X as usize;
    let cols = x.shape(1);
    let (xr, xc) = (row * x.stride(0), x.stride(1));
    let mut acc = F::new(0.0);
    let mut c = u;
    while c < cols {
        let v = x[xr + c * xc];
        acc += v * v;
        c += threads;
    }
    let inv = inverse_rms::<F>(acc, cols, eps, threads);
    let wc = w.stride(0);
    let o = row * cols;
    let mut c = u;
    while c < cols {
        out[o + c] = x[xr + c * xc] * inv * w[c * wc];
        c += threads;
    }
}

/// [`rms_norm_kernel`] of `x + y`, which it also writes out.
#[cube(launch)]
fn add_rms_norm_kernel<F: Float>(
    x: &Tensor<F>,
    y: &Tensor<F>,
    w: &Tensor<F>,
    sum_out: &mut Tensor<F>,
    out: &mut Tensor<F>,
    eps: f32,
    #[comptime] threads: usize,
    #[define(F)] _dtype: StorageType,
) {
    let row = CUBE_POS_X as usize;
    let u = UNIT_POS_X as usize;
    let cols = x.shape(1);
    let (xr, xc) = (row * x.stride(0), x.stride(1));
    let (yr, yc) = (row * y.stride(0), y.stride(1));
    let o = row * cols;
    let mut acc = F::new(0.0);
    let mut c = u;
    while c < cols {
        let v = x[xr + c * xc] + y[yr + c * yc];
        sum_out[o + c] = v;
        acc += v * v;
        c += threads;
    }
    let inv = inverse_rms::<F>(acc, cols, eps, threads);
    let wc = w.stride(0);
    let mut c = u;
    while c < cols {
        // The thread reads back what it wrote itself above.
        out[o + c] = sum_out[o + c] * inv * w[c * wc];
        c += threads;
    }
}

#[cube(launch)]
fn rope_kernel<F: Float, I: Numeric>(
    x: &Tensor<F>,
    cos: &Tensor<F>,
    sin: &Tensor<F>,
    partner: &Tensor<I>,
    out: &mut Tensor<F>,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let i = ABSOLUTE_POS;
    if i >= out.len() {
        terminate!();
    }
    let hd = x.shape(2);
    let heads = x.shape(1);
    let d = i % hd;
    let h = (i / hd) % heads;
    let r = i / (hd * heads);
    let p = usize::cast_from(partner[d * partner.stride(0)]);
    let at = r * x.stride(0) + h * x.stride(1);
    let tc = r * cos.stride(0) + d * cos.stride(2);
    let ts = r * sin.stride(0) + d * sin.stride(2);
    out[i] = x[at + d * x.stride(2)] * cos[tc] + x[at + p * x.stride(2)] * sin[ts];
}

#[cube(launch)]
fn silu_mul_kernel<F: Float>(
    gate: &Tensor<F>,
    up: &Tensor<F>,
    out: &mut Tensor<F>,
    #[define(F)] _dtype: StorageType,
) {
    let i = ABSOLUTE_POS;
    if i >= out.len() {
        terminate!();
    }
    let cols = out.shape(1);
    let (r, c) = (i / cols, i % cols);
    let g = gate[r * gate.stride(0) + c * gate.stride(1)];
    let u = up[r * up.stride(0) + c * up.stride(1)];
    out[i] = g * u / (F::new(1.0) + (F::new(0.0) - g).exp());
}

/// One cube per (query head, query row), one thread per dimension of the head. Row `r` attends
/// to the `lens[r]` slots listed from `reads[bases[r]]` on. The context is taken `head_dim`
/// positions at a time: each thread scores one position of the chunk into shared memory, then
/// every thread folds the chunk into its own output dimension with an online softmax (running
/// maximum and sum), so memory does not grow with the context.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn attention_kernel<F: Float, I: Numeric>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    reads: &Tensor<I>,
    bases: &Tensor<I>,
    lens: &Tensor<I>,
    out: &mut Tensor<F>,
    group: u32,
    #[comptime] hd: usize,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let h = CUBE_POS_X as usize;
    let s = CUBE_POS_Y as usize;
    let u = UNIT_POS_X as usize;
    let heads = q.shape(1);
    let kv = (h / group as usize) * hd;
    let len = usize::cast_from(lens[s * lens.stride(0)]);
    let row0 = usize::cast_from(bases[s * bases.stride(0)]);
    let (ks, vs) = (k.stride(0), v.stride(0));
    let mut qs = SharedMemory::<F>::new(hd);
    let mut sc = SharedMemory::<F>::new(hd);
    qs[u] = q[s * q.stride(0) + h * q.stride(1) + u * q.stride(2)];
    sync_cube();
    let mut m = F::new(-1.0e30);
    let mut l = F::new(0.0);
    let mut acc = F::new(0.0);
    let mut c0 = 0usize;
    while c0 < len {
        let j = c0 + u;
        let mut score = F::new(-1.0e30);
        if j < len {
            let at = usize::cast_from(reads[(row0 + j) * reads.stride(0)]) * ks + kv;
            let mut dot = F::new(0.0);
            for e in 0..hd {
                dot += qs[e] * k[at + e];
            }
            score = dot;
        }
        sc[u] = score;
        sync_cube();
        let mut n = len - c0;
        if n > hd {
            n = hd;
        }
        let mut cm = m;
        for e in 0..n {
            let x = sc[e];
            if x > cm {
                cm = x;
            }
        }
        let fix = (m - cm).exp();
        l *= fix;
        acc *= fix;
        m = cm;
        for e in 0..n {
            let p = (sc[e] - m).exp();
            l += p;
            let at = usize::cast_from(reads[(row0 + c0 + e) * reads.stride(0)]) * vs + kv;
            acc += p * v[at + u];
        }
        sync_cube();
        c0 += hd;
    }
    out[(s * heads + h) * hd + u] = acc / l;
}

fn output<R: CubeRuntime>(like: &CubeTensor<R>, shape: Shape) -> CubeTensor<R> {
    empty_device_contiguous_dtype::<R>(like.client.clone(), like.device.clone(), shape, like.dtype)
}

pub(super) fn rms_norm<R: CubeRuntime>(
    x: CubeTensor<R>,
    w: CubeTensor<R>,
    eps: f32,
) -> CubeTensor<R> {
    let shape = x.shape();
    let rows = shape.dims::<2>()[0];
    let out = output(&x, shape);
    let dtype = x.dtype;
    rms_norm_kernel::launch::<R>(
        &x.client.clone(),
        CubeCount::Static(rows as u32, 1, 1),
        CubeDim::new_1d(NORM_THREADS as u32),
        x.into_tensor_arg(),
        w.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        eps,
        NORM_THREADS,
        dtype.into(),
    );
    out
}

pub(super) fn add_rms_norm<R: CubeRuntime>(
    x: CubeTensor<R>,
    y: CubeTensor<R>,
    w: CubeTensor<R>,
    eps: f32,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let shape = x.shape();
    let rows = shape.dims::<2>()[0];
    let (sum, out) = (output(&x, shape.clone()), output(&x, shape));
    let dtype = x.dtype;
    add_rms_norm_kernel::launch::<R>(
        &x.client.clone(),
        CubeCount::Static(rows as u32, 1, 1),
        CubeDim::new_1d(NORM_THREADS as u32),
        x.into_tensor_arg(),
        y.into_tensor_arg(),
        w.into_tensor_arg(),
        sum.clone().into_tensor_arg(),
        out.clone().into_tensor_arg(),
        eps,
        NORM_THREADS,
        dtype.into(),
    );
    (sum, out)
}

/// Launch geometry of an element-wise kernel over `n` elements.
/// The cube is the same size whatever `n` (a kernel compiles once per cube size).
fn elementwise<R: CubeRuntime>(like: &CubeTensor<R>, n: usize) -> (CubeCount, CubeDim) {
    let dim = CubeDim::new_1d(ELEMENTWISE_THREADS);
    (
        cubecl::calculate_cube_count_elemwise(&like.client, n, dim),
        dim,
    )
}

pub(super) fn rope<R: CubeRuntime>(
    x: CubeTensor<R>,
    cos: CubeTensor<R>,
    sin: CubeTensor<R>,
    partner: CubeTensor<R>,
) -> CubeTensor<R> {
    let shape = x.shape();
    let out = output(&x, shape.clone());
    let (count, dim) = elementwise(&x, shape.num_elements());
    let dtypes = [x.dtype.into(), partner.dtype.into()];
    rope_kernel::launch::<R>(
        &x.client.clone(),
        count,
        dim,
        x.into_tensor_arg(),
        cos.into_tensor_arg(),
        sin.into_tensor_arg(),
        partner.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        dtypes,
    );
    out
}

pub(super) fn silu_mul<R: CubeRuntime>(gate: CubeTensor<R>, up: CubeTensor<R>) -> CubeTensor<R> {
    let shape = gate.shape();
    let out = output(&gate, shape.clone());
    let (count, dim) = elementwise(&gate, shape.num_elements());
    let dtype = gate.dtype;
    silu_mul_kernel::launch::<R>(
        &gate.client.clone(),
        count,
        dim,
        gate.into_tensor_arg(),
        up.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        dtype.into(),
    );
    out
}

/// `None` when the shapes do not fit together (the caller falls back to tensor operations).
pub(super) fn attention<R: CubeRuntime>(
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
    reads: CubeTensor<R>,
    bases: CubeTensor<R>,
    lens: CubeTensor<R>,
) -> Option<CubeTensor<R>> {
    let [rows, heads, hd] = q.shape().dims::<3>();
    let width = k.shape().dims::<2>()[1];
    let kv_heads = width / hd.max(1);
    if hd == 0 || kv_heads == 0 || heads % kv_heads != 0 || width % hd != 0 {
        return None;
    }
    if bases.shape().num_elements() != rows || lens.shape().num_elements() != rows {
        return None;
    }
    let out = output(&q, Shape::new([rows, heads * hd]));
    let dtypes = [q.dtype.into(), reads.dtype.into()];
    attention_kernel::launch::<R>(
        &q.client.clone(),
        CubeCount::Static(heads as u32, rows as u32, 1),
        CubeDim::new_1d(hd as u32),
        q.into_tensor_arg(),
        k.into_tensor_arg(),
        v.into_tensor_arg(),
        reads.into_tensor_arg(),
        bases.into_tensor_arg(),
        lens.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        (heads / kv_heads) as u32,
        hd,
        dtypes,
    );
    Some(out)
}

/// One thread per element of the fused projection `y` (`[n, (heads + 2·kv_heads)·head_dim]`,
/// Q then K then V): adds the bias, applies RoPE to Q (with Q's scaled tables) and K, writes Q
/// out and K/V into the pools' rows at the row's slot.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn qkv_pool_kernel<F: Float, I: Numeric>(
    y: &Tensor<F>,
    bias: &Tensor<F>,
    q_cos: &Tensor<F>,
    q_sin: &Tensor<F>,
    cos: &Tensor<F>,
    sin: &Tensor<F>,
    partner: &Tensor<I>,
    slots: &Tensor<I>,
    q: &mut Tensor<F>,
    k_pool: &mut Tensor<F>,
    v_pool: &mut Tensor<F>,
    hd: u32,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let i = ABSOLUTE_POS;
    let n = y.shape(0);
    let w = y.shape(1);
    if i >= n * w {
        terminate!();
    }
    let hd = hd as usize;
    let qw = q.shape(1) * hd;
    let kw = k_pool.shape(1);
    let (r, c) = (i / w, i % w);
    let at = r * y.stride(0);
    let (ys, bs) = (y.stride(1), bias.stride(0));
    let x = y[at + c * ys] + bias[c * bs];
    if c < qw + kw {
        let d = c % hd;
        let pc = c - d + usize::cast_from(partner[d * partner.stride(0)]);
        let px = y[at + pc * ys] + bias[pc * bs];
        if c < qw {
            let (tc, ts) = (r * q_cos.stride(0) + d, r * q_sin.stride(0) + d);
            q[r * qw + c] = x * q_cos[tc] + px * q_sin[ts];
        } else {
            let (tc, ts) = (r * cos.stride(0) + d, r * sin.stride(0) + d);
            let slot = usize::cast_from(slots[r * slots.stride(0)]);
            k_pool[slot * k_pool.stride(0) + (c - qw)] = x * cos[tc] + px * sin[ts];
        }
    } else {
        let slot = usize::cast_from(slots[r * slots.stride(0)]);
        v_pool[slot * v_pool.stride(0) + (c - qw - kw)] = x;
    }
}

/// The tensors [`qkv_pool`] reads (each a clone of the caller's: the same device memory).
pub(super) struct QkvIn<R: CubeRuntime> {
    pub y: CubeTensor<R>,
    pub bias: CubeTensor<R>,
    pub q_cos: CubeTensor<R>,
    pub q_sin: CubeTensor<R>,
    pub cos: CubeTensor<R>,
    pub sin: CubeTensor<R>,
    pub partner: CubeTensor<R>,
    pub slots: CubeTensor<R>,
}

/// Q (`[n, heads, head_dim]`) of the fused projection; K/V written into `k_pool` and `v_pool`
/// in place (their memory: the pools the caller owns). `None` when the shapes do not fit.
pub(super) fn qkv_pool<R: CubeRuntime>(
    x: QkvIn<R>,
    k_pool: CubeTensor<R>,
    v_pool: CubeTensor<R>,
    heads: usize,
    hd: usize,
) -> Option<CubeTensor<R>> {
    let [n, w] = x.y.shape().dims::<2>();
    let kw = k_pool.shape().dims::<2>()[1];
    if hd == 0 || w != heads * hd + 2 * kw || v_pool.shape().dims::<2>()[1] != kw {
        return None;
    }
    if x.bias.shape().num_elements() != w || x.slots.shape().num_elements() != n {
        return None;
    }
    let q = output(&x.y, Shape::new([n, heads, hd]));
    let (count, dim) = elementwise(&x.y, n * w);
    let dtypes = [x.y.dtype.into(), x.slots.dtype.into()];
    qkv_pool_kernel::launch::<R>(
        &x.y.client.clone(),
        count,
        dim,
        x.y.into_tensor_arg(),
        x.bias.into_tensor_arg(),
        x.q_cos.into_tensor_arg(),
        x.q_sin.into_tensor_arg(),
        x.cos.into_tensor_arg(),
        x.sin.into_tensor_arg(),
        x.partner.into_tensor_arg(),
        x.slots.into_tensor_arg(),
        q.clone().into_tensor_arg(),
        k_pool.into_tensor_arg(),
        v_pool.into_tensor_arg(),
        hd as u32,
        dtypes,
    );
    Some(q)
}
