//! How the model holds a weight matrix: a dense tensor on the backend's device, or quantized
//! blocks on the CPU ([`QMatrix`]), and which of the two a backend gets.

use std::sync::Arc;

use burn::prelude::*;

use crate::qmat::QMatrix;

/// A projection `x · W`: dense on the backend's device (`W` kept `[in, out]`), or quantized on
/// the CPU (`W` kept as the file's `[out, in]` blocks).
#[derive(Debug)]
pub(super) enum Linear<B: Backend> {
    Dense(Tensor<B, 2>),
    Quant(Arc<QMatrix>),
}

/// Up to this many input rows, a quantized product runs dot products on the quantized blocks
/// (reading the weights once per [`crate::qmat::QUANT_ROWS`] rows); more rows (a prompt chunk, a
/// large decode batch) dequantize the matrix and run the backend's GEMM. Measured on a 2-core
/// EPYC with SmolLM2 (`dopd bench worker`): at 16 rows the dot products are ahead (decode batch
/// 16: 182 against 128 tok/s; a 16-token prefill 255-285 against 214-222), at 24 and more the
/// GEMM is (a 24-token prefill 300 against 260; decode even).
const QUANT_DOT_MAX_ROWS: usize = 16;

impl<B: Backend> Linear<B> {
    pub(super) fn apply(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        match self {
            Self::Dense(w) => x.matmul(w.clone()),
            Self::Quant(q) => {
                let [n, _] = x.dims();
                let device = x.device();
                if n <= QUANT_DOT_MAX_ROWS {
                    let xd: Vec<f32> = x
                        .into_data()
                        .convert::<f32>()
                        .into_vec()
                        .unwrap_or_default();
                    let y = q.matmul_t(&xd, n);
                    Tensor::from_data(TensorData::new(y, [n, q.rows]), &device)
                } else {
                    let w = Tensor::<B, 2>::from_data(
                        TensorData::new(q.dequantize(), [q.rows, q.cols]),
                        &device,
                    );
                    x.matmul(w.transpose())
                }
            }
        }
    }
}

/// Where a model's projection weights live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightMode {
    /// Dequantized to f32 tensors on the backend's device.
    Dense,
    /// In the file's quantized blocks where it has them (Q4_0, Q4_1, Q8_0), multiplied on the
    /// CPU ([`QMatrix`]); other tensors dense.
    Quantized,
    /// As [`WeightMode::Quantized`], with the 4-bit matrices' rows interleaved by 16 and their
    /// inputs rounded to 8 bits for integer products ([`crate::qmat::packed`]): the arithmetic
    /// llama.cpp's CPU kernels use, several times faster at a batch of rows, and the logits
    /// move by about the inputs' rounding (`docs/worker.md`).
    QuantizedInt8,
}

impl WeightMode {
    /// Quantized on burn's CPU backend, dense on any other (a GPU's kernels take f32 tensors).
    pub fn for_backend<B: Backend>() -> Self {
        if std::any::TypeId::of::<B>() == std::any::TypeId::of::<burn::backend::Flex>() {
            Self::Quantized
        } else {
            Self::Dense
        }
    }
}
