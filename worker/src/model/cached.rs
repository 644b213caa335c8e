//! The forward passes over the paged KV cache: prefill (one prompt in chunks, or several packed
//! into one pass) and the batched decode step. Each appends the new tokens' K/V to the cache and
//! reads a sequence's K/V back for its attention.

use burn::prelude::*;

use super::attention::{QueryRow, paged_attention};
use super::device_kv::{DeviceKv, SlotPlan, decode_bucket, decode_buckets, padded_len};
use super::host::HOST_DECODE_MAX;
use super::{Layer, Llama, PACK_TOKENS, PREFILL_CHUNK, Rope};
use crate::kv::{KvError, PagedKvCache, SeqId};

impl<B: Backend> Llama<B> {
    /// K and V of `seqs` at `layer` from the cache, padded to the longest:
    /// `[b, kv_heads, tmax, head_dim]` each, and each sequence's length.
    fn gather(
        &self,
        cache: &PagedKvCache,
        seqs: &[SeqId],
        layer: usize,
    ) -> Result<Gathered<B>, KvError> {
        let c = &self.config;
        let lens = seqs
            .iter()
            .map(|&s| cache.written(s, layer))
            .collect::<Result<Vec<_>, _>>()?;
        let tmax = lens.iter().copied().max().unwrap_or(0);
        let per = c.kv_heads * tmax * c.head_dim;
        let mut k = vec![0.0f32; seqs.len() * per];
        let mut v = vec![0.0f32; seqs.len() * per];
        for (i, &s) in seqs.iter().enumerate() {
            cache.gather_heads(
                s,
                layer,
                tmax,
                &mut k[i * per..(i + 1) * per],
                &mut v[i * per..(i + 1) * per],
            )?;
        }
        let shape = [seqs.len(), c.kv_heads, tmax, c.head_dim];
        let t = |d: Vec<f32>| Tensor::<B, 4>::from_data(TensorData::new(d, shape), &self.device);
        Ok((t(k), t(v), lens))
    }

    /// Appends the K/V rows (`[n, kv_heads, head_dim]`) of `n` tokens to the sequences `seqs`
    /// (one token each when `seqs.len() == n`, all to one sequence when it is 1).
    fn append_kv(
        &self,
        cache: &mut PagedKvCache,
        seqs: &[SeqId],
        layer: usize,
        k: Tensor<B, 3>,
        v: Tensor<B, 3>,
    ) -> Result<(), KvError> {
        let width = self.config.kv_heads * self.config.head_dim;
        let kd: Vec<f32> = k.into_data().to_vec().unwrap_or_default();
        let vd: Vec<f32> = v.into_data().to_vec().unwrap_or_default();
        for t in 0..kd.len() / width {
            let seq = seqs[if seqs.len() == 1 { 0 } else { t }];
            let r = t * width..(t + 1) * width;
            cache.append(seq, layer, &kd[r.clone()], &vd[r])?;
        }
        Ok(())
    }

    /// Runs `tokens` as the continuation of sequence `seq` in `cache` (a prefill when the
    /// sequence is empty), appending their K/V; returns the logits of the new positions
    /// (`[tokens, vocab]`). Fails before any write when the cache lacks the blocks.
    pub fn forward_cached(
        &self,
        cache: &mut PagedKvCache,
        seq: SeqId,
        tokens: &[u32],
    ) -> Result<Tensor<B, 2>, KvError> {
        Ok(self
            .lm_head
            .apply(self.hidden_cached(cache, seq, tokens, false)?))
    }

    /// Like [`Llama::forward_cached`], but only the last position's logits (`[1, vocab]`): a
    /// prefill needs no more, and the output matrix is the largest matmul of a long prompt.
    pub fn prefill(
        &self,
        cache: &mut PagedKvCache,
        seq: SeqId,
        tokens: &[u32],
    ) -> Result<Tensor<B, 2>, KvError> {
        self.prefill_batch(cache, &[(seq, tokens)])
    }

    /// Several prefills in packed passes: `items[i] = (seq, tokens)` continues `seq` with
    /// `tokens`; returns the logits of each item's last position (`[items, vocab]`, in order).
    ///
    /// Prompts are packed into passes of at most [`PACK_TOKENS`] tokens: the projections and
    /// the MLP of a pass run as one matrix over all its tokens (each weight read once for the
    /// pass, not once per prompt), attention runs per sequence over its own cache, and the output
    /// matrix runs once for all the last positions. A prompt longer than that runs alone, in
    /// chunks of [`PREFILL_CHUNK`]. Fails before any write when a sequence is unknown, listed twice or has no
    /// tokens, or when the cache lacks the blocks for all of them.
    pub fn prefill_batch(
        &self,
        cache: &mut PagedKvCache,
        items: &[(SeqId, &[u32])],
    ) -> Result<Tensor<B, 2>, KvError> {
        if items.is_empty() || items.iter().any(|i| i.1.is_empty()) {
            return Err(KvError::NoTokens);
        }
        let grow: Vec<(SeqId, usize)> = items.iter().map(|&(s, t)| (s, t.len())).collect();
        cache.check_room(&grow)?;
        let last = on_pool(|| {
            let mut last = Vec::with_capacity(items.len());
            let mut pass: Vec<(SeqId, &[u32])> = Vec::new();
            let mut packed = 0;
            for (i, &(seq, tokens)) in items.iter().enumerate() {
                if tokens.len() > PACK_TOKENS {
                    last.push(self.hidden_cached(cache, seq, tokens, true)?);
                } else {
                    pass.push((seq, tokens));
                    packed += tokens.len();
                }
                let next = items.get(i + 1).map_or(usize::MAX, |n| n.1.len());
                if !pass.is_empty() && packed.saturating_add(next) > PACK_TOKENS {
                    last.push(self.last_positions(self.hidden_packed(cache, &pass)?, &pass));
                    pass.clear();
                    packed = 0;
                }
            }
            Ok::<_, KvError>(Tensor::cat(last, 0))
        })?;
        Ok(self.lm_head.apply(last))
    }

    /// The rows of `hidden` (a packed pass over `pass`) at each item's last position.
    fn last_positions(&self, hidden: Tensor<B, 2>, pass: &[(SeqId, &[u32])]) -> Tensor<B, 2> {
        let ends: Vec<i64> = pass
            .iter()
            .scan(0i64, |end, p| {
                *end += p.1.len() as i64;
                Some(*end - 1)
            })
            .collect();
        let n = ends.len();
        hidden.select(
            0,
            Tensor::<B, 1, Int>::from_data(TensorData::new(ends, [n]), &self.device),
        )
    }

    /// The final-norm hidden states (`[tokens, hidden]`) of a cached continuation, computed
    /// in chunks of [`PREFILL_CHUNK`] tokens: each chunk's attention scores are
    /// `[heads, chunk, context]`, so memory grows linearly with the prompt, never with its
    /// square. `last_only` keeps just the last position's state.
    fn hidden_cached(
        &self,
        cache: &mut PagedKvCache,
        seq: SeqId,
        tokens: &[u32],
        last_only: bool,
    ) -> Result<Tensor<B, 2>, KvError> {
        on_pool(|| {
            // The room for the whole continuation is checked first: nothing is written when any
            // chunk would not fit.
            cache.check_room(&[(seq, tokens.len())])?;
            let mut out = Vec::new();
            let chunks = tokens.chunks(PREFILL_CHUNK);
            let last = chunks.len().saturating_sub(1);
            for (i, chunk) in tokens.chunks(PREFILL_CHUNK).enumerate() {
                let h = self.hidden_packed(cache, &[(seq, chunk)])?;
                if !last_only {
                    out.push(h);
                } else if i == last {
                    let n = h.dims()[0];
                    out.push(h.narrow(0, n - 1, 1));
                }
            }
            match out.len() {
                0 => Err(KvError::NoTokens),
                1 => out.pop().ok_or(KvError::NoTokens),
                _ => Ok(Tensor::cat(out, 0)),
            }
        })
    }

    /// One packed pass over continuations of several sequences (room already checked, each at
    /// most a chunk): the projections and the MLP run over all their tokens as one matrix;
    /// attention runs per sequence, each new position seeing its own sequence's cached positions
    /// up to itself. Returns the final-norm hidden states of every new token (`[tokens, hidden]`,
    /// item after item).
    fn hidden_packed(
        &self,
        cache: &mut PagedKvCache,
        items: &[(SeqId, &[u32])],
    ) -> Result<Tensor<B, 2>, KvError> {
        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        // Per query row: its sequence and position (host attention).
        let mut rows = Vec::new();
        // Per item: its first row in the pass and its length.
        let mut spans = Vec::with_capacity(items.len());
        let on_device = !cache.on_host();
        let tensor_attention = on_device || !self.host_attention;
        let host = self.host.as_ref().filter(|_| !tensor_attention);
        for &(seq, t) in items {
            let start = cache.len(seq)?;
            spans.push((tokens.len(), t.len()));
            tokens.extend_from_slice(t);
            positions.extend(start..start + t.len());
            rows.extend((start..start + t.len()).map(|p| (seq, p)));
        }
        if let Some(w) = host {
            let n = tokens.len();
            let hidden = self.hidden_host(w, cache, &tokens, &rows)?;
            return Ok(Tensor::from_data(
                TensorData::new(hidden, [n, self.config.hidden]),
                &self.device,
            ));
        }
        let mut pass = PackedPass::new(items, &spans, &positions);
        let rope = self.rope_table(&positions);
        let mut x = self.embed_tokens(&tokens);
        let mut pending = None;
        for (li, l) in self.layers.iter().enumerate() {
            let (xs, h) = self.add_norm(x, pending.take(), &l.attn_norm);
            x = xs;
            let attended = if on_device {
                self.attend_packed_on_device(cache, li, l, h, &rope, &mut pass)?
            } else {
                let (q, k, v) = self.qkv(l, h, &rope);
                if tensor_attention {
                    let mut out = Vec::with_capacity(items.len());
                    for (i, (&(seq, _), &(first, n))) in items.iter().zip(&spans).enumerate() {
                        let part = |t: &Tensor<B, 3>| t.clone().narrow(0, first, n);
                        self.append_kv(cache, &[seq], li, part(&k), part(&v))?;
                        let (ka, va, _) = self.gather(cache, &[seq], li)?;
                        let mask = self.causal_mask(&mut pass, i, false);
                        out.push(self.attend(part(&q), ka, va, Some(mask)));
                    }
                    cat_rows(out)
                } else {
                    for (&(seq, _), &(first, n)) in items.iter().zip(&spans) {
                        let part = |t: &Tensor<B, 3>| t.clone().narrow(0, first, n);
                        self.append_kv(cache, &[seq], li, part(&k), part(&v))?;
                    }
                    self.attend_host(cache, li, q, &rows)?
                }
            };
            let (xs, y) = self.mlp(l, x, l.wo.apply(attended));
            (x, pending) = (xs, Some(y));
        }
        Ok(self.add_norm(x, pending, &self.norm).1)
    }

    /// `[n, kv_heads, head_dim]` K or V of `n` new tokens as the pool's rows:
    /// `[n, kv_heads · head_dim]` (the same memory).
    pub(super) fn token_rows(&self, x: Tensor<B, 3>) -> Tensor<B, 2> {
        let [n, kvh, hd] = x.dims();
        x.reshape([n, kvh * hd])
    }

    /// Pool rows of `b` sequences padded to `t` tokens (`[b · t, kv_heads · head_dim]`) as
    /// attention takes them: `[b, kv_heads, t, head_dim]`.
    fn head_major(&self, x: Tensor<B, 2>, b: usize, t: usize) -> Tensor<B, 4> {
        let c = &self.config;
        x.reshape([b, t, c.kv_heads, c.head_dim]).swap_dims(1, 2)
    }

    /// Attention on the host over the paged cache (see [`super::attention`]): `q` is
    /// `[rows, heads, head_dim]`, the result `[rows, heads · head_dim]`.
    fn attend_host(
        &self,
        cache: &PagedKvCache,
        layer: usize,
        q: Tensor<B, 3>,
        rows: &[QueryRow],
    ) -> Result<Tensor<B, 2>, KvError> {
        let c = &self.config;
        let q: Vec<f32> = q
            .into_data()
            .convert::<f32>()
            .into_vec()
            .unwrap_or_default();
        // Q comes scaled by `1/√head_dim` (see `Llama::qkv`).
        let out = paged_attention(cache, layer, &q, rows, c.heads, 1.0)?;
        Ok(Tensor::from_data(
            TensorData::new(out, [rows.len(), c.heads * c.head_dim]),
            &self.device,
        ))
    }

    /// One decode step for a batch: `batch[i] = (seq, token)` appends `token` to `seq`. The
    /// projections and MLP run as one `[batch, hidden]` matmul; attention runs per sequence over
    /// its own cached length. Returns `[batch, vocab]` logits. Fails before any write when a
    /// sequence is unknown, listed twice, or the cache lacks the blocks.
    pub fn forward_decode(
        &self,
        cache: &mut PagedKvCache,
        batch: &[(SeqId, u32)],
    ) -> Result<Tensor<B, 2>, KvError> {
        on_pool(|| self.decode_step(cache, batch, 0))
    }

    /// Runs, before serving, a prefill and one decode step at each batch [`decode_bucket`]
    /// gives up to `max_batch` (one sequence, its row repeated), so that a GPU backend has
    /// compiled the kernels serving uses; with the attended length padded
    /// ([`super::ATTENTION_PAD`]), those serve every context length. A no-op on a host pool,
    /// whose attention compiles nothing.
    pub fn warm_up(&self, block_size: usize, max_batch: usize) -> Result<(), KvError> {
        let sizes = decode_buckets(max_batch);
        let prompt: Vec<u32> = (1..=16u32)
            .map(|t| t % self.config.vocab.max(1) as u32)
            .collect();
        let tokens = prompt.len() + sizes.len() + 1;
        let mut cache = self.new_cache(self.kv_layout(block_size, 0), tokens.div_ceil(block_size));
        if cache.on_host() {
            return Ok(());
        }
        let seq = cache.create();
        let _ = self.prefill(&mut cache, seq, &prompt)?.into_data();
        on_pool(|| {
            for &b in &sizes {
                let _ = self.decode_step(&mut cache, &[(seq, 1)], b)?.into_data();
            }
            Ok(())
        })
    }

    /// A decode step; on a device pool the batch runs padded to at least `pad_to` rows and to
    /// its [`decode_bucket`].
    fn decode_step(
        &self,
        cache: &mut PagedKvCache,
        batch: &[(SeqId, u32)],
        pad_to: usize,
    ) -> Result<Tensor<B, 2>, KvError> {
        let seqs: Vec<SeqId> = batch.iter().map(|b| b.0).collect();
        let mut tokens: Vec<u32> = batch.iter().map(|b| b.1).collect();
        let mut positions = seqs
            .iter()
            .map(|&s| cache.len(s))
            .collect::<Result<Vec<_>, _>>()?;
        let need: Vec<(SeqId, usize)> = seqs.iter().map(|&s| (s, 1)).collect();
        cache.check_room(&need)?;
        if let Some(w) = &self.host
            && self.host_attention
            && cache.on_host()
            && batch.len() <= HOST_DECODE_MAX
        {
            let logits = self.decode_host(w, cache, batch, &positions)?;
            return Ok(Tensor::from_data(
                TensorData::new(logits, [batch.len(), self.config.vocab]),
                &self.device,
            ));
        }
        // Each new token's query row (host attention): its sequence and position.
        let rows: Vec<QueryRow> = seqs
            .iter()
            .copied()
            .zip(positions.iter().copied())
            .collect();
        // A device-resident pool: the new tokens' slots and the batch's reads (one group),
        // with each sequence's padding masked, the batch padded to its bucket by repeating the
        // last row (dropped from the logits).
        let on_device = !cache.on_host();
        let real = batch.len();
        let b = if on_device {
            decode_bucket(real.max(pad_to))
        } else {
            real
        };
        if let (Some(&t), Some(&p)) = (tokens.last(), positions.last()) {
            tokens.resize(b, t);
            positions.resize(b, p);
        }
        let mut x = self.embed_tokens(&tokens);
        let mut plan = None;
        let rope = self.rope_table(&positions);
        let pad_mask = |lens: &[usize], tmax: usize| {
            let pad: Vec<bool> = lens
                .iter()
                .flat_map(|&len| (0..tmax).map(move |t| t >= len))
                .collect();
            self.attention_mask(Tensor::<B, 3, Bool>::from_data(
                TensorData::new(pad, [b, 1, tmax]),
                &self.device,
            ))
        };
        let mut pending = None;
        for (li, l) in self.layers.iter().enumerate() {
            let (xs, h) = self.add_norm(x, pending.take(), &l.attn_norm);
            x = xs;
            let attended = if on_device {
                if let Some(p) = SlotPlan::reserve(
                    cache,
                    li,
                    &need,
                    &[(0..real).collect()],
                    b - real,
                    &self.device,
                )? {
                    let t = p.reads[0].1;
                    let lens: Vec<usize> = positions.iter().map(|p| p + 1).collect();
                    // The fused kernel reads each sequence's own length; the tensor
                    // operations mask the padding.
                    let guard = if self.fused.is_some() {
                        Guard::Rows(
                            self.pool_rows(lens.iter().enumerate().map(|(i, &n)| (i * t, n))),
                        )
                    } else {
                        Guard::Mask(pad_mask(&lens, t))
                    };
                    plan = Some((p, guard));
                }
                let (plan, guard) = plan.as_ref().ok_or(KvError::NoTokens)?;
                let store = device_kv::<B>(cache)?;
                let q = self.qkv_to_pool(l, h, &rope, store, li, &plan.write);
                let (read, t) = &plan.reads[0];
                let fused = match guard {
                    Guard::Rows(rows) => self.attend_pool(store, li, &q, &plan.all, rows),
                    Guard::Mask(_) => None,
                };
                match fused {
                    Some(out) => out,
                    None => {
                        let mask = match guard {
                            Guard::Mask(m) => m.clone(),
                            Guard::Rows(_) => {
                                pad_mask(&(0..b).map(|i| positions[i] + 1).collect::<Vec<_>>(), *t)
                            }
                        };
                        let (ka, va) = store.read(li, read);
                        let (ka, va) = (self.head_major(ka, b, *t), self.head_major(va, b, *t));
                        self.attend(q, ka, va, Some(mask))
                    }
                }
            } else {
                let (q, k, v) = self.qkv(l, h, &rope);
                self.append_kv(cache, &seqs, li, k, v)?;
                if self.host_attention {
                    self.attend_host(cache, li, q, &rows)?
                } else {
                    // Each sequence sees its own length; the padding beyond it is masked.
                    let (ka, va, lens) = self.gather(cache, &seqs, li)?;
                    let tmax = ka.dims()[2];
                    self.attend(q, ka, va, Some(pad_mask(&lens, tmax)))
                }
            };
            let (xs, y) = self.mlp(l, x, l.wo.apply(attended));
            (x, pending) = (xs, Some(y));
        }
        let logits = self.lm_head.apply(self.add_norm(x, pending, &self.norm).1);
        Ok(if b > real {
            logits.narrow(0, 0, real)
        } else {
            logits
        })
    }
}

/// What keeps a decode step's attention on the device pool off each sequence's padding: its
/// rows' reads and lengths (the fused kernel) or a mask (tensor operations).
enum Guard<B: Backend> {
    Rows(PoolRows<B>),
    Mask(Tensor<B, 4, Bool>),
}

/// For the fused attention over the device pool, per query row: where its slots start in the
/// pass's reads ([`SlotPlan::all`]) and how many it attends to. Built once per pass.
pub(super) struct PoolRows<B: Backend> {
    bases: Tensor<B, 1, Int>,
    lens: Tensor<B, 1, Int>,
}

impl<B: Backend> Llama<B> {
    /// [`PoolRows`] of `(base, len)` per query row.
    fn pool_rows(&self, rows: impl Iterator<Item = (usize, usize)>) -> PoolRows<B> {
        let (bases, lens): (Vec<i64>, Vec<i64>) = rows.map(|(b, n)| (b as i64, n as i64)).unzip();
        let n = bases.len();
        let t = |v: Vec<i64>| Tensor::from_data(TensorData::new(v, [n]), &self.device);
        PoolRows {
            bases: t(bases),
            lens: t(lens),
        }
    }

    /// The fused attention of `q`'s rows over the pool of `layer` (`None`: not available).
    fn attend_pool(
        &self,
        store: &DeviceKv<B>,
        layer: usize,
        q: &Tensor<B, 3>,
        reads: &Tensor<B, 1, Int>,
        rows: &PoolRows<B>,
    ) -> Option<Tensor<B, 2>> {
        let f = self.fused.as_ref()?;
        let (kp, vp) = store.pools(layer)?;
        f.attention(q, kp, vp, reads, &rows.bases, &rows.lens)
    }
}

/// What a packed prefill keeps from layer to layer: each item's rows and slots, and what its
/// attention over them needs (built at the first layer that needs it).
struct PackedPass<'a, B: Backend> {
    /// `(sequence, new tokens)` per item, as [`SlotPlan::reserve`] takes them.
    grow: Vec<(SeqId, usize)>,
    /// One read group per item, as [`SlotPlan::reserve`] takes them.
    groups: Vec<Vec<usize>>,
    /// Per item: its first row in the pass and its length.
    spans: &'a [(usize, usize)],
    /// Per row: its position in its sequence.
    positions: &'a [usize],
    /// On a device pool: where the new tokens go and what each item reads (layer 0's plan).
    plan: Option<SlotPlan<B>>,
    /// The fused attention's rows over [`SlotPlan::all`].
    rows: Option<PoolRows<B>>,
    /// Per item: its causal mask over the cache (tensor attention only).
    masks: Vec<Option<Tensor<B, 4, Bool>>>,
}

impl<'a, B: Backend> PackedPass<'a, B> {
    fn new(items: &[(SeqId, &[u32])], spans: &'a [(usize, usize)], positions: &'a [usize]) -> Self {
        Self {
            grow: items.iter().map(|&(s, t)| (s, t.len())).collect(),
            groups: (0..items.len()).map(|i| vec![i]).collect(),
            spans,
            positions,
            plan: None,
            rows: None,
            masks: vec![None; items.len()],
        }
    }
}

impl<B: Backend> Llama<B> {
    /// One layer's Q/K/V of a packed prefill written into the device pool, and each item's
    /// attention over its own slots: one fused launch for every item where the backend has the
    /// kernel, tensor operations with a causal mask per item otherwise. `[rows, heads · hd]`.
    fn attend_packed_on_device(
        &self,
        cache: &mut PagedKvCache,
        li: usize,
        l: &Layer<B>,
        h: Tensor<B, 2>,
        rope: &Rope<B>,
        pass: &mut PackedPass<B>,
    ) -> Result<Tensor<B, 2>, KvError> {
        if let Some(p) = SlotPlan::reserve(cache, li, &pass.grow, &pass.groups, 0, &self.device)? {
            if self.fused.is_some() {
                // Row j of an item starting at position `start` attends to `start + j + 1`
                // slots of its group's reads.
                let rows = p
                    .offsets
                    .iter()
                    .zip(pass.spans)
                    .flat_map(|(&base, &(first, n))| {
                        let start = pass.positions[first];
                        (0..n).map(move |j| (base, start + j + 1))
                    });
                pass.rows = Some(self.pool_rows(rows));
            }
            pass.plan = Some(p);
        }
        let plan = pass.plan.take().ok_or(KvError::NoTokens)?;
        let store = device_kv::<B>(cache)?;
        let q = self.qkv_to_pool(l, h, rope, store, li, &plan.write);
        let fused = pass
            .rows
            .as_ref()
            .and_then(|r| self.attend_pool(store, li, &q, &plan.all, r));
        let attended = match fused {
            Some(a) => a,
            None => {
                let mut out = Vec::with_capacity(pass.spans.len());
                for (i, (read, t)) in plan.reads.iter().enumerate() {
                    let (first, n) = pass.spans[i];
                    let (ka, va) = store.read(li, read);
                    let q = q.clone().narrow(0, first, n);
                    let (ka, va) = (self.head_major(ka, 1, *t), self.head_major(va, 1, *t));
                    let mask = self.causal_mask(pass, i, true);
                    out.push(self.attend(q, ka, va, Some(mask)));
                }
                cat_rows(out)
            }
        };
        pass.plan = Some(plan);
        Ok(attended)
    }

    /// Item `i`'s causal mask over its cache: each of its rows sees the positions up to its own.
    /// On a device pool the attended length is padded (see `ATTENTION_PAD`), and the padding
    /// lies beyond every row. Built once per pass.
    fn causal_mask(&self, pass: &mut PackedPass<B>, i: usize, padded: bool) -> Tensor<B, 4, Bool> {
        let (first, n) = pass.spans[i];
        let start = pass.positions[first];
        let width = if padded {
            padded_len(start + n)
        } else {
            start + n
        };
        pass.masks[i]
            .get_or_insert_with(|| {
                self.attention_mask(
                    Tensor::<B, 2, Bool>::tril_mask([n, width], start as i64, &self.device)
                        .unsqueeze_dim::<3>(0),
                )
            })
            .clone()
    }
}

/// Rows of several items' attention, one after the other.
fn cat_rows<B: Backend>(mut out: Vec<Tensor<B, 2>>) -> Tensor<B, 2> {
    if out.len() == 1 {
        out.pop().expect("one item")
    } else {
        Tensor::cat(out, 0)
    }
}

/// The model's store in a cache whose pool is on the device.
fn device_kv<B: Backend>(cache: &mut PagedKvCache) -> Result<&mut DeviceKv<B>, KvError> {
    cache
        .device_store()
        .and_then(|s| s.as_any_mut().downcast_mut::<DeviceKv<B>>())
        .ok_or(KvError::ForeignStore)
}

/// Runs `f` on a thread of the CPU thread pool (at once when already on one). The quantized
/// products split every matrix over the pool's threads; handing work to the pool from outside
/// it costs a wake-up and a blocking wait each time, about 200 times a decode step, while from
/// inside it a split is a cheap fork-join.
fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::join(f, || ()).0
    }
}

/// K and V of a batch (`[b, kv_heads, tmax, head_dim]` each) and each sequence's length.
type Gathered<B> = (Tensor<B, 4>, Tensor<B, 4>, Vec<usize>);
