//! Paged KV cache: a block allocator, per-sequence block tables, and block export/import for
//! moving a prefilled sequence from one worker to another.
//!
//! Storage is one pool of `capacity` blocks per layer for K and one for V; a block holds
//! `block_size` token slots of `kv_heads · head_dim` floats. A sequence owns a list of blocks (its
//! block table) and a length; appending a token takes a new block only when the last one is full.
//! The pool lives in host memory (attention on the host reads it in place) or in a
//! [`DeviceStore`] on an accelerator: there the cache keeps the block tables and hands out slots
//! ([`PagedKvCache::reserve`], [`PagedKvCache::slots`]), and the model writes and reads the values
//! with its own tensor operations, so a step moves no K/V between host and device.
//!
//! Invariants (property-tested): every block is either free or owned by exactly one sequence;
//! freeing a sequence returns exactly its blocks; an exported sequence imported elsewhere reads
//! back the same K/V values.

use std::any::Any;
use std::collections::HashMap;

/// Geometry of a cache; two caches exchange blocks only when their layouts are equal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KvLayout {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    /// Identifies the weights (e.g. a hash of the model file): K/V from another model are garbage.
    pub model_hash: u64,
}

impl KvLayout {
    /// Floats per token per layer, for K (or V).
    pub fn token_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Floats per block per layer, for K (or V).
    pub fn block_width(&self) -> usize {
        self.block_size * self.token_width()
    }

    /// Floats of one block's K and V at every layer: the length of an exported block.
    pub fn block_floats(&self) -> usize {
        2 * self.layers * self.block_width()
    }

    /// Bytes of one token's K and V at every layer (f32).
    pub fn token_bytes(&self) -> usize {
        2 * self.layers * self.token_width() * size_of::<f32>()
    }

    /// A stable fingerprint of the layout (FNV-1a over its fields, dtype f32).
    pub fn fingerprint(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for v in [
            self.layers,
            self.kv_heads,
            self.head_dim,
            self.block_size,
            4,
        ] {
            for b in (v as u64).to_le_bytes() {
                h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
        }
        for b in self.model_hash.to_le_bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        h
    }
}

/// A sequence's handle in one cache.
pub type SeqId = u64;

/// Cache operations that cannot be done.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    #[error("out of KV blocks: {needed} needed, {free} free")]
    OutOfBlocks { needed: usize, free: usize },
    #[error("unknown sequence {0}")]
    UnknownSequence(SeqId),
    #[error("layer {layer} out of range (the cache has {layers})")]
    BadLayer { layer: usize, layers: usize },
    #[error("K/V slice of {got} floats, expected {want} (kv_heads · head_dim)")]
    BadWidth { got: usize, want: usize },
    #[error("KV layout mismatch: export fingerprint {got:#x}, this cache {want:#x}")]
    LayoutMismatch { got: u64, want: u64 },
    #[error("no tokens to run")]
    NoTokens,
    #[error("sequence {0} appears twice in one step")]
    DuplicateSequence(SeqId),
    #[error("export of {tokens} tokens carries {blocks} blocks, expected {want}")]
    BadExport {
        tokens: usize,
        blocks: usize,
        want: usize,
    },
    #[error("export block {block} holds a value that is not a finite number")]
    NonFinite { block: usize },
    #[error("the KV pool is in device memory: it cannot be read in place on the host")]
    OnDevice,
    #[error("the KV pool's device store is not of this model's backend")]
    ForeignStore,
    #[error("sequence {seq} has {written} tokens at this layer: position {pos} is not written")]
    NotWritten {
        seq: SeqId,
        pos: usize,
        written: usize,
    },
}

#[derive(Clone, Debug, Default)]
struct Seq {
    blocks: Vec<u32>,
    /// Tokens with all layers written.
    len: usize,
    /// Per layer: tokens written so far (a token is complete when every layer has it).
    written: Vec<usize>,
}

/// The blocks of one sequence, serialised for another worker.
#[derive(Clone, Debug, PartialEq)]
pub struct KvExport {
    pub fingerprint: u64,
    pub tokens: usize,
    /// Per block: all layers' K then V, `layers · 2 · block_width` floats.
    pub blocks: Vec<Vec<f32>>,
}

/// One sequence's K/V at one layer, read in place ([`PagedKvCache::view`]).
#[derive(Clone, Copy, Debug)]
pub struct KvView<'a> {
    k: &'a [f32],
    v: &'a [f32],
    blocks: &'a [u32],
    len: usize,
    layout: KvLayout,
}

impl<'a> KvView<'a> {
    /// Tokens written at this layer.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Tokens per block: a block's tokens lie next to each other.
    pub fn block_size(&self) -> usize {
        self.layout.block_size
    }

    /// K and V of the tokens `[b·block_size, ...)` held by the sequence's `b`-th block, up to its
    /// written length: `[tokens, kv_heads, head_dim]` each (empty past the sequence's blocks).
    pub fn block(&self, b: usize) -> (&'a [f32], &'a [f32]) {
        let l = self.layout;
        let Some(&block) = self.blocks.get(b) else {
            return (&[], &[]);
        };
        let first = b * l.block_size;
        let tokens = self.len.saturating_sub(first).min(l.block_size);
        let at = block as usize * l.block_width();
        let r = at..at + tokens * l.token_width();
        (&self.k[r.clone()], &self.v[r])
    }
}

/// K/V values kept off the host (a GPU's memory), slot by slot: slot `block · block_size + i`
/// holds token `i` of `block`. The cache decides the slots; the store only holds values. The
/// model's forward passes reach the concrete store through [`DeviceStore::as_any_mut`] and write
/// and read it as tensors; these methods serve everything else (tests, export and import for KV
/// transfer), once per request rather than once per step.
pub trait DeviceStore: Send + std::fmt::Debug {
    /// Writes one token's K and V (`kv_heads · head_dim` floats each) at `layer` into `slot`.
    fn write_token(&mut self, layer: usize, slot: usize, k: &[f32], v: &[f32]);
    /// Copies whole blocks out, each in the export format: every layer's K block, then its V
    /// block (`layers · 2 · block_width` floats).
    fn read_blocks(&self, blocks: &[u32]) -> Vec<Vec<f32>>;
    /// Writes whole blocks given in the export format.
    fn write_blocks(&mut self, blocks: &[u32], data: &[&[f32]]);
    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// Where the values are.
#[derive(Debug)]
enum Pool {
    /// `k[layer · per_layer + block · block_width ..]`: one allocation for all layers, so that
    /// it is always its own mapping of fresh pages (the allocator maps allocations this large
    /// directly): memory becomes resident as blocks are written, and returns whole when the
    /// cache is dropped. Per-layer vectors of a few megabytes could land in reused heap memory
    /// that calloc clears, resident at once.
    Host {
        k: Vec<f32>,
        v: Vec<f32>,
        per_layer: usize,
    },
    Device(Box<dyn DeviceStore>),
}

/// See the module docs.
#[derive(Debug)]
pub struct PagedKvCache {
    layout: KvLayout,
    capacity: usize,
    pool: Pool,
    free: Vec<u32>,
    seqs: HashMap<SeqId, Seq>,
    next_id: SeqId,
}

impl PagedKvCache {
    /// A cache whose pool is in host memory.
    pub fn new(layout: KvLayout, capacity: usize) -> Self {
        let size = capacity * layout.block_width();
        let pool = Pool::Host {
            k: vec![0.0; layout.layers * size],
            v: vec![0.0; layout.layers * size],
            per_layer: size,
        };
        Self::with_pool(layout, capacity, pool)
    }

    /// A cache whose values live in `store`, which holds `capacity · block_size` slots per
    /// layer.
    pub fn on_device(layout: KvLayout, capacity: usize, store: Box<dyn DeviceStore>) -> Self {
        Self::with_pool(layout, capacity, Pool::Device(store))
    }

    fn with_pool(layout: KvLayout, capacity: usize, pool: Pool) -> Self {
        Self {
            layout,
            capacity,
            pool,
            // Pop from the end: lowest ids first.
            free: (0..capacity as u32).rev().collect(),
            seqs: HashMap::new(),
            next_id: 0,
        }
    }

    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    /// The store of a cache whose pool is off the host.
    pub fn device_store(&mut self) -> Option<&mut dyn DeviceStore> {
        match &mut self.pool {
            Pool::Device(s) => Some(s.as_mut()),
            Pool::Host { .. } => None,
        }
    }

    /// Whether the pool is in host memory (readable in place by [`PagedKvCache::view`]).
    pub fn on_host(&self) -> bool {
        matches!(self.pool, Pool::Host { .. })
    }

    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    pub fn used_blocks(&self) -> usize {
        self.capacity - self.free.len()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn check_layer(&self, layer: usize) -> Result<(), KvError> {
        if layer >= self.layout.layers {
            return Err(KvError::BadLayer {
                layer,
                layers: self.layout.layers,
            });
        }
        Ok(())
    }

    /// Blocks a sequence of `tokens` tokens occupies.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.layout.block_size)
    }

    /// Blocks that appending `n` tokens to `seq` would take from the free list.
    pub fn blocks_to_grow(&self, seq: SeqId, n: usize) -> Result<usize, KvError> {
        let s = self.seqs.get(&seq).ok_or(KvError::UnknownSequence(seq))?;
        let written = s.written.iter().copied().max().unwrap_or(0);
        Ok(self
            .blocks_for(written.max(s.len) + n)
            .saturating_sub(s.blocks.len()))
    }

    /// Checks that appending `n` tokens to each listed sequence fits, before anything is written.
    pub fn check_room(&self, grow: &[(SeqId, usize)]) -> Result<(), KvError> {
        let mut needed = 0;
        for (i, &(seq, n)) in grow.iter().enumerate() {
            if grow[..i].iter().any(|g| g.0 == seq) {
                return Err(KvError::DuplicateSequence(seq));
            }
            needed += self.blocks_to_grow(seq, n)?;
        }
        if needed > self.free.len() {
            return Err(KvError::OutOfBlocks {
                needed,
                free: self.free.len(),
            });
        }
        Ok(())
    }

    /// Starts an empty sequence.
    pub fn create(&mut self) -> SeqId {
        let id = self.next_id;
        self.next_id += 1;
        self.seqs.insert(
            id,
            Seq {
                written: vec![0; self.layout.layers],
                ..Seq::default()
            },
        );
        id
    }

    /// Complete tokens of a sequence.
    pub fn len(&self, seq: SeqId) -> Result<usize, KvError> {
        self.seqs
            .get(&seq)
            .map(|s| s.len)
            .ok_or(KvError::UnknownSequence(seq))
    }

    /// Tokens of a sequence written at `layer` (a token being appended counts once its layer
    /// has it).
    pub fn written(&self, seq: SeqId, layer: usize) -> Result<usize, KvError> {
        let s = self.seqs.get(&seq).ok_or(KvError::UnknownSequence(seq))?;
        s.written.get(layer).copied().ok_or(KvError::BadLayer {
            layer,
            layers: self.layout.layers,
        })
    }

    /// Block table of a sequence.
    pub fn blocks(&self, seq: SeqId) -> Result<&[u32], KvError> {
        self.seqs
            .get(&seq)
            .map(|s| s.blocks.as_slice())
            .ok_or(KvError::UnknownSequence(seq))
    }

    /// Releases a sequence's blocks.
    pub fn free(&mut self, seq: SeqId) -> Result<(), KvError> {
        let s = self
            .seqs
            .remove(&seq)
            .ok_or(KvError::UnknownSequence(seq))?;
        self.free.extend(s.blocks.iter().rev());
        Ok(())
    }

    /// Appends the next token's K and V for `layer`. Each layer is written in token order, layers
    /// independently (a prefill writes layer by layer, a decode step token by token); a token is
    /// complete once every layer has it. A new block is taken when a write needs one.
    pub fn append(
        &mut self,
        seq: SeqId,
        layer: usize,
        k: &[f32],
        v: &[f32],
    ) -> Result<(), KvError> {
        let l = self.layout;
        self.check_layer(layer)?;
        for got in [k.len(), v.len()] {
            if got != l.token_width() {
                return Err(KvError::BadWidth {
                    got,
                    want: l.token_width(),
                });
            }
        }
        let slot = self.reserve(seq, layer, 1)?[0];
        match &mut self.pool {
            Pool::Host {
                k: pk,
                v: pv,
                per_layer,
            } => {
                let at = layer * *per_layer + slot * l.token_width();
                pk[at..at + l.token_width()].copy_from_slice(k);
                pv[at..at + l.token_width()].copy_from_slice(v);
            }
            Pool::Device(store) => store.write_token(layer, slot, k, v),
        }
        Ok(())
    }

    /// Counts the next `n` tokens of `seq` at `layer` as written and returns their slots
    /// (`block · block_size + offset`), taking new blocks as they are needed; the caller writes
    /// the values there (a device-resident pool, written by the model's tensor operations).
    /// Every layer's tokens get the same slots. Fails before anything changes when the layer or
    /// the sequence is unknown or the blocks are short.
    pub fn reserve(&mut self, seq: SeqId, layer: usize, n: usize) -> Result<Vec<usize>, KvError> {
        let l = self.layout;
        self.check_layer(layer)?;
        let s = self
            .seqs
            .get_mut(&seq)
            .ok_or(KvError::UnknownSequence(seq))?;
        let first = s.written[layer];
        let needed = (first + n)
            .div_ceil(l.block_size)
            .saturating_sub(s.blocks.len());
        if needed > self.free.len() {
            return Err(KvError::OutOfBlocks {
                needed,
                free: self.free.len(),
            });
        }
        for _ in 0..needed {
            s.blocks.extend(self.free.pop());
        }
        s.written[layer] += n;
        s.len = s.written.iter().copied().min().unwrap_or(0);
        Ok((first..first + n)
            .map(|t| s.blocks[t / l.block_size] as usize * l.block_size + t % l.block_size)
            .collect())
    }

    /// The slots of a sequence's tokens `0..tokens` (written or reserved at some layer).
    pub fn slots(&self, seq: SeqId, tokens: usize) -> Result<Vec<usize>, KvError> {
        let l = self.layout;
        let s = self.seqs.get(&seq).ok_or(KvError::UnknownSequence(seq))?;
        if tokens > s.blocks.len() * l.block_size {
            return Err(KvError::NotWritten {
                seq,
                pos: tokens.saturating_sub(1),
                written: s.written.iter().copied().max().unwrap_or(0),
            });
        }
        Ok((0..tokens)
            .map(|t| s.blocks[t / l.block_size] as usize * l.block_size + t % l.block_size)
            .collect())
    }

    /// Read access to a sequence's K/V at `layer`, token by token, where they lie in the pool
    /// (no copy): what attention on the host reads.
    pub fn view(&self, seq: SeqId, layer: usize) -> Result<KvView<'_>, KvError> {
        self.check_layer(layer)?;
        let s = self.seqs.get(&seq).ok_or(KvError::UnknownSequence(seq))?;
        let Pool::Host { k, v, per_layer } = &self.pool else {
            return Err(KvError::OnDevice);
        };
        let r = layer * per_layer..(layer + 1) * per_layer;
        Ok(KvView {
            k: &k[r.clone()],
            v: &v[r],
            blocks: &s.blocks,
            len: s.written[layer],
            layout: self.layout,
        })
    }

    /// K and V of a sequence at `layer`, head-major (`[kv_heads, tmax, head_dim]` each) into
    /// `k_out` and `v_out`; positions past the sequence's length are left untouched (callers
    /// mask them). Fails when the sequence is longer than `tmax` or the slices are too short.
    pub fn gather_heads(
        &self,
        seq: SeqId,
        layer: usize,
        tmax: usize,
        k_out: &mut [f32],
        v_out: &mut [f32],
    ) -> Result<usize, KvError> {
        let l = self.layout;
        self.check_layer(layer)?;
        let s = self.seqs.get(&seq).ok_or(KvError::UnknownSequence(seq))?;
        let tokens = s.written[layer];
        let want = l.kv_heads * tmax * l.head_dim;
        if tokens > tmax || k_out.len() < want || v_out.len() < want {
            return Err(KvError::BadWidth {
                got: k_out.len().min(v_out.len()),
                want,
            });
        }
        let Pool::Host { k, v, per_layer } = &self.pool else {
            return Err(KvError::OnDevice);
        };
        let base = layer * per_layer;
        let hd = l.head_dim;
        for t in 0..tokens {
            let at = s.blocks[t / l.block_size] as usize * l.block_width()
                + (t % l.block_size) * l.token_width();
            for h in 0..l.kv_heads {
                let src = at + h * hd;
                let dst = (h * tmax + t) * hd;
                let src = base + src;
                k_out[dst..dst + hd].copy_from_slice(&k[src..src + hd]);
                v_out[dst..dst + hd].copy_from_slice(&v[src..src + hd]);
            }
        }
        Ok(tokens)
    }

    /// Serialises a sequence's blocks (complete tokens only).
    pub fn export(&self, seq: SeqId) -> Result<KvExport, KvError> {
        let l = self.layout;
        let s = self.seqs.get(&seq).ok_or(KvError::UnknownSequence(seq))?;
        let n = self.blocks_for(s.len);
        let blocks = match &self.pool {
            Pool::Host { k, v, per_layer } => s.blocks[..n]
                .iter()
                .map(|&b| {
                    let at = b as usize * l.block_width();
                    let mut out = Vec::with_capacity(l.block_floats());
                    for layer in 0..l.layers {
                        let at = layer * per_layer + at;
                        out.extend_from_slice(&k[at..at + l.block_width()]);
                        out.extend_from_slice(&v[at..at + l.block_width()]);
                    }
                    out
                })
                .collect(),
            Pool::Device(store) => store.read_blocks(&s.blocks[..n]),
        };
        Ok(KvExport {
            fingerprint: l.fingerprint(),
            tokens: s.len,
            blocks,
        })
    }

    /// Creates a sequence from an export of a cache with the same layout. Fails without taking any
    /// block when the layout or the block count differs, a value is not finite, or there is no
    /// room.
    pub fn import(&mut self, e: &KvExport) -> Result<SeqId, KvError> {
        let l = self.layout;
        if e.fingerprint != l.fingerprint() {
            return Err(KvError::LayoutMismatch {
                got: e.fingerprint,
                want: l.fingerprint(),
            });
        }
        let want = self.blocks_for(e.tokens);
        if e.blocks.len() != want || e.blocks.iter().any(|b| b.len() != l.block_floats()) {
            return Err(KvError::BadExport {
                tokens: e.tokens,
                blocks: e.blocks.len(),
                want,
            });
        }
        // K/V from a peer is data, not trusted: a NaN or an infinity would poison every
        // attention score of the sequence.
        if let Some(block) = e
            .blocks
            .iter()
            .position(|b| b.iter().any(|v| !v.is_finite()))
        {
            return Err(KvError::NonFinite { block });
        }
        if self.free.len() < want {
            return Err(KvError::OutOfBlocks {
                needed: want,
                free: self.free.len(),
            });
        }
        let id = self.create();
        let owned = self.free.split_off(self.free.len() - want);
        let owned: Vec<u32> = owned.into_iter().rev().collect();
        match &mut self.pool {
            Pool::Host { k, v, per_layer } => {
                let w = l.block_width();
                for (data, &b) in e.blocks.iter().zip(&owned) {
                    let at = b as usize * w;
                    for layer in 0..l.layers {
                        let base = layer * 2 * w;
                        let to = layer * *per_layer + at;
                        k[to..to + w].copy_from_slice(&data[base..base + w]);
                        v[to..to + w].copy_from_slice(&data[base + w..base + 2 * w]);
                    }
                }
            }
            Pool::Device(store) => {
                let data: Vec<&[f32]> = e.blocks.iter().map(Vec::as_slice).collect();
                store.write_blocks(&owned, &data);
            }
        }
        let s = self.seqs.get_mut(&id).expect("just created");
        s.blocks = owned;
        s.len = e.tokens;
        s.written = vec![e.tokens; l.layers];
        Ok(id)
    }

    /// Every block is free or owned by exactly one sequence (for tests and debug checks).
    pub fn check_invariants(&self) -> bool {
        let mut seen = vec![0u8; self.capacity];
        for b in self
            .free
            .iter()
            .chain(self.seqs.values().flat_map(|s| s.blocks.iter()))
        {
            seen[*b as usize] += 1;
        }
        seen.iter().all(|c| *c == 1)
    }
}
