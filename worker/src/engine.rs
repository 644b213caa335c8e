//! Continuous batching: requests join and leave the running batch at every step.
//!
//! One [`Engine::step`]:
//! 1. **Admission.** Waiting requests are admitted first-come first-served while the running
//!    batch has a free slot, the KV cache has the blocks for the request's tokens plus the next
//!    one, and the step's prefill-token budget lasts (the first admission always fits the budget,
//!    so a long prompt is never starved). While sequences decode, a prompt that carries a step
//!    budget of its own ([`Request::step_budget`]) also waits for the next step unless the
//!    step's prefill, its own included, stays within it. Admitting runs the prompt's prefill (or
//!    imports KV blocks a prefill worker produced, or recomputes a preempted sequence).
//! 2. **Decode.** Every running sequence gets one token from a single batched forward pass. When
//!    the cache cannot hold one more token for everyone, the most recently admitted sequences are
//!    preempted: their blocks are freed and they go back to the head of the queue, to be
//!    recomputed from their tokens (prompt plus what they generated) when room returns.
//!
//! Requests run in one of two modes: [`Mode::Generate`] (prefill and decode here: the `mixed` role,
//! or `decode` after an import) and [`Mode::Prefill`] (run the prompt, sample the first token,
//! hand back the KV blocks: the `prefill` role). Events stream out of `step` in order.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use burn::prelude::*;

use crate::kv::{KvError, KvExport, KvLayout, PagedKvCache, SeqId};
use crate::model::Llama;
use crate::sampling::{FinishReason, Sampler, StopConditions};

mod types;
pub use types::*;

const RECENT: usize = 64;

#[derive(Debug)]
struct Seq {
    id: RequestId,
    prompt: Vec<u32>,
    stop: StopConditions,
    mode: Mode,
    sampler: Sampler,
    generated: Vec<u32>,
    /// Imported KV not yet placed in the cache.
    import: Option<KvExport>,
    cache: Option<SeqId>,
    /// Admission order, for choosing preemption victims.
    admitted: u64,
    /// [`Request::step_budget`].
    step_budget: Option<usize>,
    text: String,
    /// Bytes of `text` already streamed.
    sent: usize,
}

impl Seq {
    /// The `Finished` event of this sequence, with the last piece of text.
    fn finished(&self, reason: FinishReason, text: String) -> Event {
        Event::Finished {
            id: self.id,
            reason,
            text,
            usage: Usage {
                prompt_tokens: self.prompt.len(),
                completion_tokens: self.generated.len(),
            },
        }
    }
}

/// See the module docs.
pub struct Engine<B: Backend> {
    model: Arc<Llama<B>>,
    cache: PagedKvCache,
    detok: Option<Arc<dyn Detokenizer>>,
    cfg: EngineConfig,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    admissions: u64,
    stats: EngineStats,
    /// Where imported block vectors go once copied into the cache.
    pool: Option<Arc<crate::transfer::BlockPool>>,
}

impl<B: Backend> Engine<B> {
    pub fn new(
        model: Arc<Llama<B>>,
        detok: Option<Arc<dyn Detokenizer>>,
        cfg: EngineConfig,
    ) -> Self {
        let layout = model.kv_layout(cfg.block_size.max(1), cfg.model_hash);
        Self {
            cache: model.new_cache(layout, cfg.kv_blocks),
            model,
            detok,
            cfg,
            waiting: VecDeque::new(),
            running: Vec::new(),
            admissions: 0,
            stats: EngineStats::default(),
            pool: None,
        }
    }

    /// Hands imported block vectors to `pool` once they are in the cache (a decode worker's
    /// next transfer receives into them).
    pub fn with_block_pool(mut self, pool: Arc<crate::transfer::BlockPool>) -> Self {
        self.pool = Some(pool);
        self
    }

    /// The KV layout (for peers that import this engine's exports).
    pub fn kv_layout(&self) -> KvLayout {
        *self.cache.layout()
    }

    pub fn model(&self) -> &Arc<Llama<B>> {
        &self.model
    }

    /// Whether any request is waiting or running.
    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Current counters.
    pub fn stats(&self) -> EngineStats {
        EngineStats {
            running: self.running.len(),
            waiting: self.waiting.len(),
            kv_blocks_used: self.cache.used_blocks(),
            kv_blocks_free: self.cache.free_blocks(),
            ..self.stats.clone()
        }
    }

    /// Queues a request; a request that can never run fails at once (returned as an event).
    pub fn submit(&mut self, r: Request) -> Result<(), EngineError> {
        let c = &self.model.config;
        if self.live(r.id) {
            return Err(EngineError::DuplicateId(r.id));
        }
        if r.prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if r.prompt.len() >= c.context {
            return Err(EngineError::PromptTooLong {
                tokens: r.prompt.len(),
                context: c.context,
            });
        }
        if let Some(&token) = r.prompt.iter().find(|&&t| t as usize >= c.vocab) {
            return Err(EngineError::BadToken {
                token,
                vocab: c.vocab,
            });
        }
        let resumed = match &r.start {
            Start::Resume { generated, .. } => generated.len(),
            _ => 0,
        };
        if r.prompt.len() + resumed >= c.context {
            return Err(EngineError::PromptTooLong {
                tokens: r.prompt.len() + resumed,
                context: c.context,
            });
        }
        let needed = self.cache.blocks_for(r.prompt.len() + resumed + 1);
        if needed > self.cache.capacity() {
            return Err(EngineError::TooLargeForCache {
                needed,
                capacity: self.cache.capacity(),
            });
        }
        let mut sent = None;
        let (generated, import, sampled) = match r.start {
            Start::Prompt => (Vec::new(), None, 0),
            Start::Resume {
                generated,
                sent: bytes,
            } => {
                if generated.is_empty() {
                    return Err(EngineError::EmptyResume);
                }
                if let Some(&token) = generated.iter().find(|&&t| t as usize >= c.vocab) {
                    return Err(EngineError::BadToken {
                        token,
                        vocab: c.vocab,
                    });
                }
                sent = Some(bytes);
                let n = generated.len() as u64;
                (generated, None, n)
            }
            Start::Recompute { first_token } => {
                if first_token as usize >= c.vocab {
                    return Err(EngineError::BadToken {
                        token: first_token,
                        vocab: c.vocab,
                    });
                }
                (vec![first_token], None, 1)
            }
            Start::Imported { kv, first_token } => {
                if first_token as usize >= c.vocab {
                    return Err(EngineError::BadToken {
                        token: first_token,
                        vocab: c.vocab,
                    });
                }
                if kv.fingerprint != self.cache.layout().fingerprint() {
                    return Err(EngineError::Import(KvError::LayoutMismatch {
                        got: kv.fingerprint,
                        want: self.cache.layout().fingerprint(),
                    }));
                }
                if kv.tokens != r.prompt.len() {
                    return Err(EngineError::Import(KvError::BadExport {
                        tokens: kv.tokens,
                        blocks: kv.blocks.len(),
                        want: r.prompt.len(),
                    }));
                }
                (vec![first_token], Some(kv), 1)
            }
        };
        let mut s = Seq {
            id: r.id,
            prompt: r.prompt,
            stop: r.stop,
            mode: r.mode,
            sampler: Sampler::at(r.sampling, sampled),
            generated,
            import,
            cache: None,
            admitted: 0,
            step_budget: r.step_budget,
            text: String::new(),
            sent: 0,
        };
        if !s.generated.is_empty() {
            s.text = self.detokenize(&s.generated);
            s.sent = match sent {
                // A resumed stream: start after what the client has (on a character boundary).
                Some(bytes) => {
                    let mut b = bytes.min(s.text.len());
                    while !s.text.is_char_boundary(b) {
                        b -= 1;
                    }
                    b
                }
                // The first token was streamed by the prefill worker: start after it.
                None => self.streamable(&s),
            };
        }
        self.waiting.push_back(s);
        Ok(())
    }

    fn live(&self, id: RequestId) -> bool {
        self.waiting.iter().chain(&self.running).any(|s| s.id == id)
    }

    /// Drops a request wherever it is and frees its blocks. Returns whether it was live.
    pub fn cancel(&mut self, id: RequestId) -> bool {
        if let Some(i) = self.waiting.iter().position(|s| s.id == id) {
            self.waiting.remove(i);
            return true;
        }
        if let Some(i) = self.running.iter().position(|s| s.id == id) {
            let s = self.running.remove(i);
            self.release(&s);
            return true;
        }
        false
    }

    fn release(&mut self, s: &Seq) {
        if let Some(c) = s.cache {
            // Only fails for an unknown id, which would be our bug; never leak silently.
            debug_assert!(self.cache.free(c).is_ok());
            let _ = self.cache.free(c);
        }
    }

    fn detokenize(&self, ids: &[u32]) -> String {
        self.detok
            .as_ref()
            .map(|d| d.detokenize(ids))
            .unwrap_or_default()
    }

    /// Bytes of `s.text` that can be streamed: not an incomplete character, and not a possible
    /// start of a stop string.
    fn streamable(&self, s: &Seq) -> usize {
        let t = &s.text;
        let mut end = t.len();
        if t.ends_with('\u{FFFD}') {
            end -= '\u{FFFD}'.len_utf8();
        }
        let hold = s
            .stop
            .stop_strings
            .iter()
            .map(|x| x.len())
            .max()
            .unwrap_or(1)
            .saturating_sub(1);
        end = end.saturating_sub(hold).max(s.sent);
        while !t.is_char_boundary(end) {
            end -= 1;
        }
        end.max(s.sent)
    }

    /// Records a sampled token: returns why the sequence ends (if it does) and the text that can
    /// be streamed now.
    fn accept(&mut self, s: &mut Seq, token: u32) -> (Option<FinishReason>, String) {
        s.generated.push(token);
        self.stats.generated_tokens += 1;
        if self.detok.is_some() {
            s.text = self.detokenize(&s.generated);
        }
        let pos = s.prompt.len() + s.generated.len();
        let mut check = s.stop.check(token, s.generated.len(), &s.text);
        if check.is_none() && pos >= self.model.config.context {
            check = Some((FinishReason::Length, None));
        }
        let Some((reason, cut)) = check else {
            let end = self.streamable(s);
            let text = s.text[s.sent..end].to_string();
            s.sent = end;
            return (None, text);
        };
        if let Some(cut) = cut {
            s.text = cut;
        } else if s.stop.eos.contains(&token) && self.detok.is_some() {
            // The end-of-sequence token is not output.
            s.text = self.detokenize(&s.generated[..s.generated.len() - 1]);
        }
        let tail = s.text.get(s.sent..).unwrap_or_default().to_string();
        s.sent = s.text.len();
        self.stats.finished += 1;
        (Some(reason), tail)
    }

    /// Emits a generated token's events (Generate mode).
    fn emit(
        s: &Seq,
        token: u32,
        finish: Option<FinishReason>,
        text: String,
        events: &mut Vec<Event>,
    ) {
        let eos = s.stop.eos.contains(&token);
        let (token_text, tail) = if eos {
            (None, text)
        } else {
            (Some(text), String::new())
        };
        if let Some(text) = token_text {
            events.push(Event::Token {
                id: s.id,
                token,
                text,
            });
        }
        if let Some(reason) = finish {
            events.push(s.finished(reason, tail));
        }
    }

    /// Admits what fits, then runs one batched decode step. Returns the events of this step.
    pub fn step(&mut self) -> Vec<Event> {
        let t0 = Instant::now();
        let mut events = Vec::new();
        let prefilled = self.admit(&mut events);
        let batch = self.decode(&mut events);
        self.stats.steps += 1;
        self.stats
            .recent_steps
            .push((batch, prefilled, t0.elapsed().as_secs_f64()));
        if self.stats.recent_steps.len() > RECENT {
            self.stats.recent_steps.remove(0);
        }
        events
    }

    fn fail(&mut self, id: RequestId, error: EngineError, events: &mut Vec<Event>) {
        self.stats.failed += 1;
        events.push(Event::Failed { id, error });
    }

    /// Admission; returns the prompt tokens prefilled.
    fn admit(&mut self, events: &mut Vec<Event>) -> usize {
        let mut budget = self.cfg.max_prefill_tokens;
        let decoding = !self.running.is_empty();
        let mut prefilled = 0;
        let mut admitted_any = false;
        // Blocks the new prompts admitted so far in this step will take.
        let mut reserved = 0;
        let mut fresh = Vec::new();
        while self.running.len() + fresh.len() < self.cfg.max_running.max(1) {
            let Some(front) = self.waiting.front() else {
                break;
            };
            // Tokens whose K/V must be in the cache before the next decode step.
            let fill = front.prompt.len() + front.generated.len().saturating_sub(1);
            let blocks = self.cache.blocks_for(fill + 1);
            if reserved + blocks > self.cache.free_blocks() {
                break;
            }
            let compute = if front.import.is_some() { 0 } else { fill };
            // A prompt with a step budget of its own joins a step only if the step's prefill
            // stays within it while other sequences decode (it waits for the next step).
            let own = match front.step_budget {
                Some(b) if decoding => prefilled + compute > b,
                _ => false,
            };
            if admitted_any && (compute > budget || own) {
                break;
            }
            let s = self.waiting.pop_front().expect("front exists");
            admitted_any = true;
            budget = budget.saturating_sub(compute);
            prefilled += compute;
            if s.import.is_none() && s.generated.is_empty() {
                // A new prompt: prefilled below, with the others admitted in this step.
                reserved += blocks;
                fresh.push(s);
            } else {
                self.start(s, events);
            }
        }
        self.start_fresh(fresh, events);
        prefilled
    }

    /// Starts new prompts admitted together: one packed prefill for all of them (the router's
    /// short batches pay off here), then each samples its first token. Should the packed pass
    /// fail, each is started on its own, so one bad sequence fails alone.
    fn start_fresh(&mut self, mut seqs: Vec<Seq>, events: &mut Vec<Event>) {
        if seqs.len() <= 1 {
            for s in seqs {
                self.start(s, events);
            }
            return;
        }
        let ids: Vec<SeqId> = seqs.iter().map(|_| self.cache.create()).collect();
        for (s, &id) in seqs.iter_mut().zip(&ids) {
            s.cache = Some(id);
        }
        let items: Vec<(SeqId, &[u32])> = ids
            .iter()
            .zip(&seqs)
            .map(|(&id, s)| (id, s.prompt.as_slice()))
            .collect();
        let logits = match self.model.prefill_batch(&mut self.cache, &items) {
            Ok(l) => l.into_data().to_vec::<f32>().unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        let vocab = logits.len() / seqs.len();
        if vocab == 0 {
            for mut s in seqs {
                self.release(&s);
                s.cache = None;
                self.start(s, events);
            }
            return;
        }
        for ((mut s, id), row) in seqs.into_iter().zip(ids).zip(logits.chunks_exact(vocab)) {
            self.admissions += 1;
            s.admitted = self.admissions;
            self.stats.prompt_tokens += s.prompt.len() as u64;
            let placed = self.first_token(&mut s, id, row, events);
            self.settle(s, placed, events);
        }
    }

    /// Starts an admitted sequence: it joins the batch, or it is already done, or it failed.
    fn start(&mut self, mut s: Seq, events: &mut Vec<Event>) {
        self.admissions += 1;
        s.admitted = self.admissions;
        let placed = self.place(&mut s, events);
        self.settle(s, placed, events);
    }

    /// Puts a started sequence where `placed` says: into the batch (`true`), done (`false`), or
    /// failed; a sequence leaving frees its blocks.
    fn settle(&mut self, s: Seq, placed: Result<bool, EngineError>, events: &mut Vec<Event>) {
        match placed {
            Ok(true) => self.running.push(s),
            Ok(false) => self.release(&s),
            Err(error) => {
                self.release(&s);
                self.fail(s.id, error, events);
            }
        }
    }

    /// Puts a sequence's K/V in the cache (import, recompute or prefill); returns whether it goes
    /// on to decode.
    fn place(&mut self, s: &mut Seq, events: &mut Vec<Event>) -> Result<bool, EngineError> {
        if let Some(kv) = s.import.take() {
            s.cache = Some(self.cache.import(&kv).map_err(EngineError::Import)?);
            if let Some(p) = &self.pool {
                p.give(kv.blocks);
            }
            // The first token was sampled remotely; it may already end the request.
            let first = s.generated[0];
            if let Some((reason, _)) = s.stop.check(first, 1, &s.text) {
                self.stats.finished += 1;
                events.push(s.finished(reason, String::new()));
                return Ok(false);
            }
            return Ok(true);
        }
        let id = self.cache.create();
        s.cache = Some(id);
        if !s.generated.is_empty() {
            // Recompute after preemption: every token but the last goes into the cache.
            let mut toks = s.prompt.clone();
            toks.extend_from_slice(&s.generated[..s.generated.len() - 1]);
            self.model
                .prefill(&mut self.cache, id, &toks)
                .map_err(EngineError::Kv)?;
            return Ok(true);
        }
        let logits = self
            .model
            .prefill(&mut self.cache, id, &s.prompt)
            .map_err(EngineError::Kv)?;
        self.stats.prompt_tokens += s.prompt.len() as u64;
        let logits: Vec<f32> = logits.into_data().to_vec().unwrap_or_default();
        self.first_token(s, id, &logits, events)
    }

    /// After a prompt's prefill into cache sequence `id`: samples the first token from the last
    /// position's `logits` and hands the sequence on (its KV to a decode worker in Prefill mode,
    /// or the token to the client); returns whether it goes on to decode here.
    fn first_token(
        &mut self,
        s: &mut Seq,
        id: SeqId,
        logits: &[f32],
        events: &mut Vec<Event>,
    ) -> Result<bool, EngineError> {
        let token = s.sampler.sample(logits);
        let (finish, text) = self.accept(s, token);
        if s.mode == Mode::Prefill {
            let kv = self.cache.export(id).map_err(EngineError::Kv)?;
            if finish.is_none() {
                self.stats.finished += 1;
            }
            events.push(Event::Prefilled {
                id: s.id,
                first_token: token,
                text,
                kv,
                finish,
            });
            return Ok(false);
        }
        Self::emit(s, token, finish, text, events);
        Ok(finish.is_none())
    }

    /// One batched decode step over the running sequences; returns the batch size.
    fn decode(&mut self, events: &mut Vec<Event>) -> usize {
        // Make room for one more token each, preempting the newest admissions.
        loop {
            let need: Vec<(SeqId, usize)> = self
                .running
                .iter()
                .filter_map(|s| s.cache.map(|c| (c, 1)))
                .collect();
            match self.cache.check_room(&need) {
                Ok(()) => break,
                Err(_) if self.running.len() > 1 => {
                    let victim = self
                        .running
                        .iter()
                        .enumerate()
                        .max_by_key(|(_, s)| s.admitted)
                        .map(|(i, _)| i)
                        .expect("non-empty");
                    let mut s = self.running.remove(victim);
                    self.release(&s);
                    s.cache = None;
                    self.stats.preemptions += 1;
                    self.waiting.push_front(s);
                }
                Err(_) => {
                    // A lone sequence that fills the whole cache ends at its length limit.
                    if let Some(mut s) = self.running.pop() {
                        self.release(&s);
                        self.finish_now(&mut s, FinishReason::Length, events);
                    }
                    break;
                }
            }
        }
        if self.running.is_empty() {
            return 0;
        }
        let batch: Vec<(SeqId, u32)> = self
            .running
            .iter()
            .map(|s| {
                (
                    s.cache.expect("running sequences are cached"),
                    *s.generated.last().expect("running sequences have a token"),
                )
            })
            .collect();
        let logits = match self.model.forward_decode(&mut self.cache, &batch) {
            Ok(l) => l,
            Err(e) => {
                // Room was checked above; fail the batch rather than wedge.
                for s in std::mem::take(&mut self.running) {
                    self.release(&s);
                    self.fail(s.id, EngineError::Kv(e.clone()), events);
                }
                return batch.len();
            }
        };
        let vocab = self.model.config.vocab;
        let all: Vec<f32> = logits.into_data().to_vec().unwrap_or_default();
        let mut still = Vec::with_capacity(self.running.len());
        for (i, mut s) in std::mem::take(&mut self.running).into_iter().enumerate() {
            let row = all.get(i * vocab..(i + 1) * vocab).unwrap_or(&[]);
            let token = s.sampler.sample(row);
            let (finish, text) = self.accept(&mut s, token);
            Self::emit(&s, token, finish, text, events);
            if finish.is_some() {
                self.release(&s);
            } else {
                still.push(s);
            }
        }
        self.running = still;
        batch.len()
    }

    fn finish_now(&mut self, s: &mut Seq, reason: FinishReason, events: &mut Vec<Event>) {
        let tail = s.text.get(s.sent..).unwrap_or_default().to_string();
        self.stats.finished += 1;
        events.push(s.finished(reason, tail));
    }

    /// Runs steps until no request is left; returns all events (for tests and batch jobs).
    pub fn run_to_completion(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        while self.has_work() {
            out.extend(self.step());
        }
        out
    }

    /// Every cache block is free or owned by exactly one sequence, and the live sequences own
    /// them all (for tests).
    pub fn check_invariants(&self) -> bool {
        let owned: usize = self
            .running
            .iter()
            .filter_map(|s| s.cache)
            .map(|c| self.cache.blocks(c).map_or(0, <[u32]>::len))
            .sum();
        self.cache.check_invariants() && owned == self.cache.used_blocks()
    }
}
