//! The KV pool in the backend's device memory ([`DeviceKv`]): one `[slots, kv_heads · head_dim]`
//! tensor per layer for K and one for V, written in place by index and read by index, so a
//! forward pass on a GPU keeps its K/V on the GPU. The cache ([`PagedKvCache`]) keeps the block
//! tables and decides the slots; the forward passes turn them into index tensors once per pass
//! ([`SlotPlan`]) and every layer uses the same ones.

use std::any::Any;

use burn::prelude::*;
use burn::tensor::IndexingUpdateOp;

use crate::kv::{DeviceStore, KvError, KvLayout, PagedKvCache, SeqId};

/// See the module docs.
#[derive(Debug)]
pub struct DeviceKv<B: Backend> {
    layout: KvLayout,
    /// Per layer; `None` only inside [`DeviceKv::write`], which takes the tensor so that its
    /// memory is not shared and the backend writes it in place rather than copying the pool.
    k: Vec<Option<Tensor<B, 2>>>,
    v: Vec<Option<Tensor<B, 2>>>,
    device: B::Device,
}

impl<B: Backend> DeviceKv<B> {
    /// A zeroed pool of `capacity` blocks per layer on `device`.
    pub fn new(layout: KvLayout, capacity: usize, device: &B::Device) -> Self {
        let shape = [capacity * layout.block_size, layout.token_width()];
        let pool = || {
            (0..layout.layers)
                .map(|_| Some(Tensor::zeros(shape, device)))
                .collect()
        };
        Self {
            layout,
            k: pool(),
            v: pool(),
            device: device.clone(),
        }
    }

    /// Writes `k` and `v` (`[n, kv_heads · head_dim]`) into `slots` (`[n, 1]`) at `layer`.
    pub(super) fn write(
        &mut self,
        layer: usize,
        slots: &Tensor<B, 2, Int>,
        k: Tensor<B, 2>,
        v: Tensor<B, 2>,
    ) {
        for (pool, x) in [(&mut self.k[layer], k), (&mut self.v[layer], v)] {
            if let Some(t) = pool.take() {
                *pool = Some(t.scatter_nd(slots.clone(), x, IndexingUpdateOp::Assign));
            }
        }
    }

    /// K and V (`[n, kv_heads · head_dim]` each) of `slots` (`[n]`) at `layer`.
    pub(super) fn read(
        &self,
        layer: usize,
        slots: &Tensor<B, 1, Int>,
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let get = |pool: &Option<Tensor<B, 2>>| {
            pool.clone()
                .expect("a pool is put back by the write that takes it")
                .select(0, slots.clone())
        };
        (get(&self.k[layer]), get(&self.v[layer]))
    }

    /// The K and V pools (`[slots, kv_heads · head_dim]`) of `layer`.
    pub(super) fn pools(&self, layer: usize) -> Option<(&Tensor<B, 2>, &Tensor<B, 2>)> {
        Some((self.k.get(layer)?.as_ref()?, self.v.get(layer)?.as_ref()?))
    }

    fn index(&self, slots: Vec<i64>) -> Tensor<B, 1, Int> {
        let n = slots.len();
        Tensor::from_data(TensorData::new(slots, [n]), &self.device)
    }

    /// The slots of whole blocks, in order.
    fn block_slots(&self, blocks: &[u32]) -> Vec<i64> {
        let bs = self.layout.block_size;
        blocks
            .iter()
            .flat_map(|&b| (0..bs).map(move |i| (b as usize * bs + i) as i64))
            .collect()
    }
}

impl<B: Backend> DeviceStore for DeviceKv<B> {
    fn write_token(&mut self, layer: usize, slot: usize, k: &[f32], v: &[f32]) {
        let w = self.layout.token_width();
        let row = |x: &[f32]| {
            Tensor::<B, 2>::from_data(TensorData::new(x.to_vec(), [1, w]), &self.device)
        };
        let (k, v) = (row(k), row(v));
        let slots = Tensor::from_data(TensorData::new(vec![slot as i64], [1, 1]), &self.device);
        self.write(layer, &slots, k, v);
    }

    fn read_blocks(&self, blocks: &[u32]) -> Vec<Vec<f32>> {
        let l = self.layout;
        let w = l.block_width();
        let slots = self.index(self.block_slots(blocks));
        let mut out: Vec<Vec<f32>> = (0..blocks.len())
            .map(|_| Vec::with_capacity(l.block_floats()))
            .collect();
        for layer in 0..l.layers {
            let (k, v) = self.read(layer, &slots);
            for t in [k, v] {
                let d: Vec<f32> = t
                    .into_data()
                    .convert::<f32>()
                    .into_vec()
                    .unwrap_or_default();
                for (o, chunk) in out.iter_mut().zip(d.chunks(w)) {
                    o.extend_from_slice(chunk);
                }
            }
        }
        out
    }

    fn write_blocks(&mut self, blocks: &[u32], data: &[&[f32]]) {
        let l = self.layout;
        let w = l.block_width();
        let n = blocks.len() * l.block_size;
        let slots = self.block_slots(blocks);
        let slots = Tensor::from_data(TensorData::new(slots, [n, 1]), &self.device);
        for layer in 0..l.layers {
            let part = |half: usize| {
                let at = (2 * layer + half) * w;
                let d: Vec<f32> = data
                    .iter()
                    .flat_map(|b| b[at..at + w].iter().copied())
                    .collect();
                Tensor::<B, 2>::from_data(TensorData::new(d, [n, l.token_width()]), &self.device)
            };
            let (k, v) = (part(0), part(1));
            self.write(layer, &slots, k, v);
        }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// Attention over the device pool reads a multiple of this many positions per sequence (the
/// rest masked). A GPU backend compiles a kernel for each new combination of vector width and
/// bounds checks, which the attended length decides: a length that grew by one at every decode
/// step crossed a new combination every few steps, each compile costing a decode step many
/// times over. Padded, the lengths a worker sees all share one combination, compiled once.
pub const ATTENTION_PAD: usize = 64;

/// The batch a decode step of `b` sequences runs at on a device pool: the next power of two up
/// to 8, then the next multiple of 8 up to 64, of 16 up to 128, of 32 up to 256, of 64 beyond
/// (the padding rows repeat the last sequence and are dropped from the logits). A GPU backend
/// compiles some kernels anew for each batch size's vector widths and bounds checks, at
/// irregular sizes (a test run compiled at batches 2-9, 13, 16, 17, 25 and 32); a few sizes,
/// all warmed up before serving ([`super::Llama::warm_up`]), compile nothing while serving.
pub fn decode_bucket(b: usize) -> usize {
    let up = |m: usize| b.div_ceil(m) * m;
    match b {
        0..=8 => b.max(1).next_power_of_two(),
        9..=64 => up(8),
        65..=128 => up(16),
        129..=256 => up(32),
        _ => up(64),
    }
}

/// Every batch [`decode_bucket`] gives for `1..=max_batch`, ascending.
pub fn decode_buckets(max_batch: usize) -> Vec<usize> {
    let mut out: Vec<usize> = (1..=max_batch.max(1)).map(decode_bucket).collect();
    out.dedup();
    out
}

/// `len` rounded up to a multiple of [`ATTENTION_PAD`].
pub(super) fn padded_len(len: usize) -> usize {
    len.div_ceil(ATTENTION_PAD) * ATTENTION_PAD
}

/// The slots one forward pass writes and reads on a device-resident pool, as index tensors
/// built once for all layers: the new tokens' slots, and for each group of query rows (a
/// sequence of a prefill, the whole batch of a decode step) the slots of the K/V it attends to.
pub(super) struct SlotPlan<B: Backend> {
    /// `[new tokens, 1]`, in the pass's row order.
    pub write: Tensor<B, 2, Int>,
    /// Per group: `[sequences · t]` (each sequence's slots padded to `t`, the group's longest
    /// rounded up to [`ATTENTION_PAD`], with its first slot; the padding is masked) and `t`.
    /// Views of `all`.
    pub reads: Vec<(Tensor<B, 1, Int>, usize)>,
    /// Every group's reads, one after the other (one upload), and where each group's start.
    pub all: Tensor<B, 1, Int>,
    pub offsets: Vec<usize>,
}

impl<B: Backend> SlotPlan<B> {
    /// Reserves `n` new tokens for each `(seq, n)` at `layer`; at layer 0 also returns the plan:
    /// where the tokens go and, per group of `groups` (lists of indices into `grow`), the slots
    /// of each of its sequences' tokens so far. Other layers reuse layer 0's plan: a token has the
    /// same slot at every layer.
    ///
    /// `pad_rows` more rows repeat the last one (its write slot, and its reads in the last
    /// group): a decode step padded to its batch bucket ([`decode_bucket`]) writes the same
    /// K/V to the same slot again and reads what the row it copies reads.
    pub fn reserve(
        cache: &mut PagedKvCache,
        layer: usize,
        grow: &[(SeqId, usize)],
        groups: &[Vec<usize>],
        pad_rows: usize,
        device: &B::Device,
    ) -> Result<Option<Self>, KvError> {
        let mut write = Vec::new();
        for &(seq, n) in grow {
            let slots = cache.reserve(seq, layer, n)?;
            write.extend(slots.into_iter().map(|s| s as i64));
        }
        if layer != 0 {
            return Ok(None);
        }
        if let Some(&last) = write.last() {
            write.extend(std::iter::repeat_n(last, pad_rows));
        }
        let mut all = Vec::new();
        let mut spans = Vec::with_capacity(groups.len());
        for (gi, group) in groups.iter().enumerate() {
            let mut slots = group
                .iter()
                .map(|&i| cache.slots(grow[i].0, cache.written(grow[i].0, layer)?))
                .collect::<Result<Vec<_>, _>>()?;
            if gi + 1 == groups.len()
                && let Some(last) = slots.last().cloned()
            {
                slots.extend(std::iter::repeat_n(last, pad_rows));
            }
            let t = padded_len(slots.iter().map(Vec::len).max().unwrap_or(0));
            let start = all.len();
            for s in &slots {
                let pad = s.first().copied().unwrap_or(0);
                all.extend(s.iter().map(|&x| x as i64));
                all.extend(std::iter::repeat_n(pad as i64, t - s.len()));
            }
            spans.push((start, all.len() - start, t));
        }
        let total = all.len();
        let all = Tensor::<B, 1, Int>::from_data(TensorData::new(all, [total]), device);
        let reads = spans
            .iter()
            .map(|&(start, n, t)| (all.clone().narrow(0, start, n), t))
            .collect();
        let offsets = spans.iter().map(|s| s.0).collect();
        let n = write.len();
        Ok(Some(Self {
            write: Tensor::from_data(TensorData::new(write, [n, 1]), device),
            reads,
            all,
            offsets,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    /// Every batch has a bucket at least as large, the buckets are few, a bucket is its own
    /// bucket, and the padding stays within a power of two up to 8 and a step above.
    #[test]
    fn decode_buckets_cover_every_batch_with_few_sizes() {
        let all = decode_buckets(300);
        assert_eq!(all.len(), 4 + 7 + 4 + 4 + 1, "{all:?}");
        for b in 1..=300 {
            let p = decode_bucket(b);
            assert!(p >= b && all.contains(&p), "batch {b} -> {p}");
            assert_eq!(decode_bucket(p), p);
            let step = match b {
                0..=8 => b,
                9..=64 => 8,
                65..=128 => 16,
                129..=256 => 32,
                _ => 64,
            };
            assert!(p - b < step, "batch {b} -> {p}");
        }
        assert_eq!(&all[..6], &[1, 2, 4, 8, 16, 24]);
    }

    /// A decode step's reads cover each sequence's positions, padded with its first slot to
    /// the batch's longest rounded up to `ATTENTION_PAD`: lengths that grow step by step give
    /// the same shape until they cross a multiple of it.
    #[test]
    fn reads_are_padded_to_a_multiple_of_the_attention_pad_with_the_first_slot() {
        let layout = KvLayout {
            layers: 1,
            kv_heads: 1,
            head_dim: 2,
            block_size: 4,
            model_hash: 0,
        };
        let device = Default::default();
        let store = DeviceKv::<Flex>::new(layout, 64, &device);
        let mut cache = PagedKvCache::on_device(layout, 64, Box::new(store));
        let (a, b) = (cache.create(), cache.create());
        let mut ts = Vec::new();
        for (la, lb) in [(3, 1), (40, 9), (ATTENTION_PAD - 1, 5)] {
            for (s, len) in [(a, la), (b, lb)] {
                let have = cache.len(s).expect("known");
                if len > have {
                    cache.reserve(s, 0, len - have).expect("room");
                }
            }
            // One more token each, as a decode step reserves.
            let grow = [(a, 1), (b, 1)];
            let plan = SlotPlan::<Flex>::reserve(&mut cache, 0, &grow, &[vec![0, 1]], 0, &device)
                .expect("room")
                .expect("layer 0 plans");
            let (idx, t) = &plan.reads[0];
            ts.push(*t);
            let idx: Vec<i64> = idx
                .clone()
                .into_data()
                .convert::<i64>()
                .to_vec()
                .expect("ints");
            assert_eq!(idx.len(), 2 * t);
            for (row, s) in [(0, a), (1, b)] {
                let slots = cache
                    .slots(s, cache.written(s, 0).expect("known"))
                    .expect("slots");
                let got = &idx[row * t..(row + 1) * t];
                let want: Vec<i64> = slots.iter().map(|&x| x as i64).collect();
                assert_eq!(&got[..want.len()], want.as_slice());
                assert!(got[want.len()..].iter().all(|&x| x == want[0]));
            }
        }
        assert_eq!(ts, vec![ATTENTION_PAD, ATTENTION_PAD, ATTENTION_PAD]);
    }
}
