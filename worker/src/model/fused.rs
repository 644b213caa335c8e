//! Fused GPU kernels for the hot operations of a forward pass ([`FusedOps`]), where burn runs
//! one kernel per tensor operation: an RMS norm (6 operations), with the residual addition
//! before it (7); the bias, RoPE and pool writes after the Q/K/V product (10); attention over
//! the device pool (the K/V reads, the layout copies, two matrix products, the mask and the
//! softmax: about 15); the MLP's `silu(gate)·up` (5). A small model's decode step on a GPU
//! costs about one launch per kernel (`docs/benchmarks.md`), so each becomes one kernel: a
//! decode layer launches 10 instead of 50 (`scripts/kernel-count.sh`).
//!
//! The kernels are CubeCL's ([`kernels`]), so they run wherever burn's CubeCL backends do:
//! CUDA (`--features cuda`) and wgpu (`--features wgpu`; Mesa's software Vulkan device on a
//! machine without a GPU, which is how the tests check them against the tensor operations).
//! [`for_backend`] gives them for those backends and `None` for the others (the CPU's Flex
//! backend), which run the tensor operations as before. Each operation takes its inputs by
//! reference and answers `None` when it cannot run, so the caller always has the tensor
//! operations to fall back on.

use std::sync::Arc;

use burn::prelude::*;

/// The fused operations of one backend; see the module docs.
pub(crate) trait FusedOps<B: Backend>: Send + Sync + std::fmt::Debug {
    /// `x · (mean(x²) + eps)^-1/2 · w` per row of `x` (`[rows, cols]`; `w` is `[cols]`).
    fn rms_norm(&self, x: &Tensor<B, 2>, w: &Tensor<B, 1>, eps: f32) -> Option<Tensor<B, 2>>;

    /// `s = x + y` and `s · (mean(s²) + eps)^-1/2 · w` per row (`[rows, cols]` each; `w` is
    /// `[cols]`): the residual stream's addition and the next RMS norm. Returns both.
    fn add_rms_norm(
        &self,
        x: &Tensor<B, 2>,
        y: &Tensor<B, 2>,
        w: &Tensor<B, 1>,
        eps: f32,
    ) -> Option<(Tensor<B, 2>, Tensor<B, 2>)>;

    /// RoPE on `x` (`[n, heads, head_dim]`) with per-row tables `cos`, `sin`
    /// (`[n, 1, head_dim]`, the sines signed): `x·cos + x[partner]·sin`, where `partner`
    /// (`[head_dim]`) names the other dimension of each one's pair.
    fn rope(
        &self,
        x: &Tensor<B, 3>,
        cos: &Tensor<B, 3>,
        sin: &Tensor<B, 3>,
        partner: &Tensor<B, 1, Int>,
    ) -> Option<Tensor<B, 3>>;

    /// `silu(gate) · up`, element-wise (`[rows, cols]` each).
    fn silu_mul(&self, gate: &Tensor<B, 2>, up: &Tensor<B, 2>) -> Option<Tensor<B, 2>>;

    /// Query rows attending to their own contexts in the device pool:
    /// - `q`: `[rows, heads, head_dim]`, scaled by `1/√head_dim` already;
    /// - `k_pool`, `v_pool`: `[slots, kv_heads · head_dim]`;
    /// - `reads`: slot lists; row `r` attends to the `lens[r]` slots from `reads[bases[r]]` on
    ///   (`bases`, `lens`: `[rows]`).
    ///
    /// Returns `[rows, heads · head_dim]`.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        q: &Tensor<B, 3>,
        k_pool: &Tensor<B, 2>,
        v_pool: &Tensor<B, 2>,
        reads: &Tensor<B, 1, Int>,
        bases: &Tensor<B, 1, Int>,
        lens: &Tensor<B, 1, Int>,
    ) -> Option<Tensor<B, 2>>;

    /// The fused projection `y = h·[Wq Wk Wv]` (`[n, (heads + 2·kv_heads)·head_dim]`) of `n`
    /// new tokens, finished in one kernel: `bias` (`[width]`) added, RoPE applied to Q and K
    /// (`tables`: Q's cosines and sines, then K's, as [`FusedOps::rope`] takes them), K and V
    /// written into the pools' rows at `slots` (`[n, 1]`) in place. Returns Q,
    /// `[n, heads, head_dim]`.
    #[allow(clippy::too_many_arguments)]
    fn qkv_into_pool(
        &self,
        y: &Tensor<B, 2>,
        bias: &Tensor<B, 1>,
        tables: [&Tensor<B, 3>; 4],
        partner: &Tensor<B, 1, Int>,
        slots: &Tensor<B, 2, Int>,
        k_pool: &Tensor<B, 2>,
        v_pool: &Tensor<B, 2>,
        heads: usize,
    ) -> Option<Tensor<B, 3>>;
}

/// The fused operations for backend `B`, if it is one of burn's CubeCL backends built in
/// (f32: CUDA with the `cuda` feature, wgpu with `wgpu`).
pub(crate) fn for_backend<B: Backend>() -> Option<Arc<dyn FusedOps<B>>> {
    #[cfg(feature = "cuda")]
    if let Some(ops) = cube::ops_for::<B, burn::backend::Cuda<f32>>() {
        return Some(ops);
    }
    #[cfg(feature = "wgpu")]
    if let Some(ops) = cube::ops_for::<B, burn::backend::Wgpu>() {
        return Some(ops);
    }
    None
}

#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod kernels;

#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod cube {
    use std::any::{Any, TypeId};
    use std::marker::PhantomData;
    use std::sync::Arc;

    use burn::prelude::*;
    use burn::tensor::TensorPrimitive;
    use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};

    use super::FusedOps;
    use super::kernels;

    /// [`FusedOps`] for `B` when `B` is `C`, a CubeCL backend.
    pub(super) fn ops_for<B: Backend, C: CubeOps>() -> Option<Arc<dyn FusedOps<B>>> {
        (TypeId::of::<B>() == TypeId::of::<C>())
            .then(|| Arc::new(Cube::<C>(PhantomData)) as Arc<dyn FusedOps<B>>)
    }

    /// The CubeCL backends: reach their runtime's tensors.
    pub(super) trait CubeOps: Backend {
        type R: CubeRuntime;
        fn float(t: Tensor<Self, 2>) -> burn_cubecl::tensor::CubeTensor<Self::R>;
        fn float3(t: Tensor<Self, 3>) -> burn_cubecl::tensor::CubeTensor<Self::R>;
        fn float1(t: Tensor<Self, 1>) -> burn_cubecl::tensor::CubeTensor<Self::R>;
        fn int(t: Tensor<Self, 1, Int>) -> burn_cubecl::tensor::CubeTensor<Self::R>;
        fn int2(t: Tensor<Self, 2, Int>) -> burn_cubecl::tensor::CubeTensor<Self::R>;
        fn from_float<const D: usize>(
            t: burn_cubecl::tensor::CubeTensor<Self::R>,
        ) -> Tensor<Self, D>;
    }

    impl<R, F, I, BT> CubeOps for CubeBackend<R, F, I, BT>
    where
        R: CubeRuntime,
        F: FloatElement,
        I: IntElement,
        BT: BoolElement,
    {
        type R = R;
        fn float(t: Tensor<Self, 2>) -> burn_cubecl::tensor::CubeTensor<R> {
            t.into_primitive().tensor()
        }
        fn float3(t: Tensor<Self, 3>) -> burn_cubecl::tensor::CubeTensor<R> {
            t.into_primitive().tensor()
        }
        fn float1(t: Tensor<Self, 1>) -> burn_cubecl::tensor::CubeTensor<R> {
            t.into_primitive().tensor()
        }
        fn int(t: Tensor<Self, 1, Int>) -> burn_cubecl::tensor::CubeTensor<R> {
            t.into_primitive()
        }
        fn int2(t: Tensor<Self, 2, Int>) -> burn_cubecl::tensor::CubeTensor<R> {
            t.into_primitive()
        }
        fn from_float<const D: usize>(t: burn_cubecl::tensor::CubeTensor<R>) -> Tensor<Self, D> {
            Tensor::from_primitive(TensorPrimitive::Float(t))
        }
    }

    #[derive(Debug)]
    struct Cube<C>(PhantomData<C>);

    /// `x` as type `U` (for a tensor, a clone: the same device memory), if it is one.
    fn cast<T: 'static, U: Clone + 'static>(x: &T) -> Option<U> {
        (x as &dyn Any).downcast_ref::<U>().cloned()
    }

    /// `y` back as a tensor of `B`.
    fn back<B: Backend, C: Backend, const D: usize>(y: Tensor<C, D>) -> Option<Tensor<B, D>> {
        (Box::new(y) as Box<dyn Any>)
            .downcast::<Tensor<B, D>>()
            .ok()
            .map(|b| *b)
    }

    impl<B: Backend, C: CubeOps> FusedOps<B> for Cube<C> {
        fn rms_norm(&self, x: &Tensor<B, 2>, w: &Tensor<B, 1>, eps: f32) -> Option<Tensor<B, 2>> {
            let x = C::float(cast::<_, Tensor<C, 2>>(x)?);
            let w = C::float1(cast::<_, Tensor<C, 1>>(w)?);
            back::<B, C, 2>(C::from_float(kernels::rms_norm(x, w, eps)))
        }

        fn add_rms_norm(
            &self,
            x: &Tensor<B, 2>,
            y: &Tensor<B, 2>,
            w: &Tensor<B, 1>,
            eps: f32,
        ) -> Option<(Tensor<B, 2>, Tensor<B, 2>)> {
            let x = C::float(cast::<_, Tensor<C, 2>>(x)?);
            let y = C::float(cast::<_, Tensor<C, 2>>(y)?);
            let w = C::float1(cast::<_, Tensor<C, 1>>(w)?);
            let (sum, norm) = kernels::add_rms_norm(x, y, w, eps);
            Some((
                back::<B, C, 2>(C::from_float(sum))?,
                back::<B, C, 2>(C::from_float(norm))?,
            ))
        }

        fn rope(
            &self,
            x: &Tensor<B, 3>,
            cos: &Tensor<B, 3>,
            sin: &Tensor<B, 3>,
            partner: &Tensor<B, 1, Int>,
        ) -> Option<Tensor<B, 3>> {
            let x = C::float3(cast::<_, Tensor<C, 3>>(x)?);
            let cos = C::float3(cast::<_, Tensor<C, 3>>(cos)?);
            let sin = C::float3(cast::<_, Tensor<C, 3>>(sin)?);
            let partner = C::int(cast::<_, Tensor<C, 1, Int>>(partner)?);
            back::<B, C, 3>(C::from_float(kernels::rope(x, cos, sin, partner)))
        }

        fn silu_mul(&self, gate: &Tensor<B, 2>, up: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
            let gate = C::float(cast::<_, Tensor<C, 2>>(gate)?);
            let up = C::float(cast::<_, Tensor<C, 2>>(up)?);
            back::<B, C, 2>(C::from_float(kernels::silu_mul(gate, up)))
        }

        fn attention(
            &self,
            q: &Tensor<B, 3>,
            k_pool: &Tensor<B, 2>,
            v_pool: &Tensor<B, 2>,
            reads: &Tensor<B, 1, Int>,
            bases: &Tensor<B, 1, Int>,
            lens: &Tensor<B, 1, Int>,
        ) -> Option<Tensor<B, 2>> {
            let int = |t: &Tensor<B, 1, Int>| cast::<_, Tensor<C, 1, Int>>(t).map(C::int);
            let q = C::float3(cast::<_, Tensor<C, 3>>(q)?);
            let k = C::float(cast::<_, Tensor<C, 2>>(k_pool)?);
            let v = C::float(cast::<_, Tensor<C, 2>>(v_pool)?);
            let out = kernels::attention(q, k, v, int(reads)?, int(bases)?, int(lens)?)?;
            back::<B, C, 2>(C::from_float(out))
        }

        fn qkv_into_pool(
            &self,
            y: &Tensor<B, 2>,
            bias: &Tensor<B, 1>,
            tables: [&Tensor<B, 3>; 4],
            partner: &Tensor<B, 1, Int>,
            slots: &Tensor<B, 2, Int>,
            k_pool: &Tensor<B, 2>,
            v_pool: &Tensor<B, 2>,
            heads: usize,
        ) -> Option<Tensor<B, 3>> {
            let table = |t: &Tensor<B, 3>| cast::<_, Tensor<C, 3>>(t).map(C::float3);
            let head_dim = tables[0].dims()[2];
            let x = kernels::QkvIn {
                y: C::float(cast::<_, Tensor<C, 2>>(y)?),
                bias: C::float1(cast::<_, Tensor<C, 1>>(bias)?),
                q_cos: table(tables[0])?,
                q_sin: table(tables[1])?,
                cos: table(tables[2])?,
                sin: table(tables[3])?,
                partner: C::int(cast::<_, Tensor<C, 1, Int>>(partner)?),
                slots: C::int2(cast::<_, Tensor<C, 2, Int>>(slots)?),
            };
            let k = C::float(cast::<_, Tensor<C, 2>>(k_pool)?);
            let v = C::float(cast::<_, Tensor<C, 2>>(v_pool)?);
            let q = kernels::qkv_pool(x, k, v, heads, head_dim)?;
            back::<B, C, 3>(C::from_float(q))
        }
    }
}
