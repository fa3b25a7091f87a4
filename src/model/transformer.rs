//! The SkyReels-V2 / Wan 2.1 diffusion-forcing DiT (diffusers
//! `SkyReelsV2Transformer3DModel`), organised for block-causal generation with a K/V cache.
//!
//! Unlike a whole-window forward with a dense block-causal mask, the forward here runs one
//! *attention block* (a causal block of latent frames, or any subset of its tokens) at a
//! time against the keys/values of the blocks before it. Under the block-causal mask this
//! is the same computation as diffusers' full-window forward, and it is what lets finished
//! blocks be computed once and not-started blocks not at all.
//!
//! Tensors inside a forward carry no batch dimension: hidden states are `[tokens, dim]`,
//! keys/values `[1, heads, tokens, head_dim]`.
//!
//! The generator runs one [`Batch`] per row of the step matrix: any tokens of any blocks of
//! both guidance branches in one forward (every linear layer sees all of them at once), each
//! block attending to its range of a preallocated [`KvCache`] into which the forward writes
//! the processed tokens' keys/values in place. Under the block-causal mask this equals the
//! block-by-block computation: a block's layer-`l` keys/values depend only on its own
//! inputs, so computing every block of a row layer by layer gives the later blocks the same
//! keys/values as computing the earlier blocks first.

use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::{Linear, VarBuilder};

use super::config::TransformerConfig;
use super::kernels::kernel_layout;

/// Cross-attention keys/values of one text context, computed once per prompt.
#[derive(Clone)]
pub struct Context {
    layers: Vec<(Tensor, Tensor)>,
}

impl Context {
    /// Text positions.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .map_or(0, |(k, _)| k.dim(2).unwrap_or(0))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Several contexts one after the other along the key axis, layer by layer: a batch
    /// whose tokens come from several guidance branches attends to branch `i`'s context at
    /// keys `i * len .. (i + 1) * len` (see [`Batch::cross_groups`]).
    pub fn stack(contexts: &[&Context]) -> candle_core::Result<Context> {
        let Some(first) = contexts.first() else {
            candle_core::bail!("no context to stack");
        };
        if contexts.len() == 1 {
            return Ok((*first).clone());
        }
        let len = first.len();
        if contexts.iter().any(|c| c.len() != len) {
            candle_core::bail!("contexts of different lengths cannot be stacked");
        }
        let layers = (0..first.layers.len())
            .map(|l| {
                let ks: Vec<&Tensor> = contexts.iter().map(|c| &c.layers[l].0).collect();
                let vs: Vec<&Tensor> = contexts.iter().map(|c| &c.layers[l].1).collect();
                Ok((Tensor::cat(&ks, 2)?, Tensor::cat(&vs, 2)?))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Context { layers })
    }
}

/// Keys and values of every layer for the attention blocks of a window, one region of
/// `capacity` token rows per guidance branch, allocated once and written in place by
/// [`Transformer::forward_batch`] (no concatenation per pass). Token `p` of branch `b`
/// lives at row `b * capacity + p`.
pub struct KvCache {
    /// Per layer `(k, v)`, each `[1, heads, branches * capacity, head_dim]`, keys rotated.
    layers: Vec<(Tensor, Tensor)>,
    capacity: usize,
    branches: usize,
}

impl KvCache {
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn branches(&self) -> usize {
        self.branches
    }

    /// Cache row of token `pos` of branch `branch`.
    pub fn slot(&self, branch: usize, pos: usize) -> usize {
        branch * self.capacity + pos
    }

    /// Copies `rows` rows of layer keys/values starting at `from` into a [`BlockKv`].
    fn read(&self, from: usize, rows: usize) -> candle_core::Result<BlockKv> {
        let layers = self
            .layers
            .iter()
            .map(|(k, v)| {
                Ok((
                    k.narrow(2, from, rows)?.contiguous()?,
                    v.narrow(2, from, rows)?.contiguous()?,
                ))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(BlockKv { layers })
    }

    /// Writes a [`BlockKv`] at rows `at..`.
    fn write(&self, at: usize, kv: &BlockKv) -> candle_core::Result<()> {
        for ((k, v), (sk, sv)) in self.layers.iter().zip(&kv.layers) {
            k.slice_set(&sk.to_dtype(k.dtype())?.contiguous()?, 2, at)?;
            v.slice_set(&sv.to_dtype(v.dtype())?.contiguous()?, 2, at)?;
        }
        Ok(())
    }
}

/// The tokens of one [`Transformer::forward_batch`]: any tokens of any attention blocks of
/// any guidance branches, in the order of their attention groups. Built with
/// [`BatchBuilder`].
pub struct Batch {
    /// `[n, dim]` patch embeddings.
    pub x: Tensor,
    /// `[runs, 6, dim]`, f32: the 6-way modulation of each run of tokens of one frame.
    pub proj: Tensor,
    /// Tokens of each frame run, in order (sum `n`).
    pub frame_counts: Vec<usize>,
    /// RoPE tables of the tokens, `[n, head_dim / 2]`.
    pub cos: Tensor,
    pub sin: Tensor,
    /// The cache row each token's keys/values are written to, then those of the
    /// [`KvRefresh`] tokens.
    pub slots: Vec<u32>,
    /// Self-attention: each group of query rows attends to a range of cache rows.
    pub self_groups: Vec<super::kernels::Group>,
    /// Cross-attention: each group of query rows attends to its branch's context in the
    /// stacked contexts.
    pub cross_groups: Vec<super::kernels::Group>,
    /// Tokens whose keys/values are rewritten without computing their outputs.
    pub refresh: Option<KvRefresh>,
    /// Whether the forward returns the tokens' hidden states (see [`Forward::hidden`]).
    pub record_hidden: bool,
}

/// Tokens of a [`Batch`] that only refresh their keys/values: at every layer their hidden
/// state is estimated as this step's patch embedding plus the change the layers before made
/// to it at the token's last computation (the sum of `est`'s first and `l`-th columns of
/// `dim`; exact at the first layer),
/// normalised and modulated at this step's timestep, projected to keys and values, rotated
/// and written into the cache. Tokens a cache reuses then keep keys/values of the current
/// step instead of the one they were last computed at, for the key and value projections
/// alone (about a seventh of a layer's work).
pub struct KvRefresh {
    /// `[m, layers * dim]`: per token its patch embedding at this step, then per layer
    /// after the first the hidden state at that layer's input minus the patch embedding,
    /// at the token's last computation (see [`RefreshItem::est`]).
    pub est: Tensor,
    /// The modulation and rope tables of the batch's tokens followed by these ones (the
    /// batch's own tables are views of them).
    joined: Joined,
}

/// A batch's tokens followed by its [`KvRefresh`] tokens, for the layers' key/value
/// projections.
struct Joined {
    /// `[runs, 6, dim]`, f32, and the tokens of each frame run.
    proj: Tensor,
    counts: Vec<usize>,
    cos: Tensor,
    sin: Tensor,
}

/// Where a forward's layers write the keys/values of its tokens (the batch's, then the
/// refreshed ones).
enum KvTarget {
    /// CPU, f32: their cache rows and rope tables (`[rows, head_dim]`, the cosines, then
    /// the sines) for [`super::kernels::cache_store`].
    Rows(Vec<u32>, Tensor),
    /// Elsewhere: `[1, heads, rows, head_dim]` u32 cache rows for a scatter, and the rope
    /// tables.
    Scatter {
        slots: Tensor,
        cos: Tensor,
        sin: Tensor,
    },
}

/// What [`Transformer::forward_batch_until`] returns.
pub struct Forward {
    /// `[n, dim]` output tokens.
    pub y: Tensor,
    /// With [`Batch::record_hidden`], `[n, (layers - 1) * dim]`: per layer after the first,
    /// the tokens' hidden state at that layer's input minus their patch embedding (the
    /// columns after the first of [`KvRefresh::est`] in a later refresh of the same tokens).
    pub hidden: Option<Tensor>,
}

/// Tokens of one attention block of one guidance branch for a [`KvRefresh`].
pub struct RefreshItem<'a> {
    /// `[m, layers * dim]`: per token its patch embedding at this step, then per layer
    /// after the first the change the layers before made to it at the token's last
    /// computation (the [`Forward::hidden`] of that computation; one tensor, so that a
    /// cache keeps, forecasts and gathers all layers in one op each).
    pub est: Tensor,
    pub modulation: &'a FrameModulation,
    /// Which tokens of the block (a subset: its `idx` names them).
    pub tokens: &'a TokenSet,
    pub branch: usize,
    /// Position (within the branch's cache region) of the block's first token.
    pub first: usize,
}

/// Accumulated [`RefreshItem`]s.
#[derive(Default)]
struct RefreshParts {
    est: Vec<Tensor>,
    proj: Vec<Tensor>,
    counts: Vec<usize>,
    cos: Vec<Tensor>,
    sin: Vec<Tensor>,
    slots: Vec<u32>,
}

/// One part of a [`Batch`]: tokens of one attention block (or of several consecutive blocks
/// attending as one group) of one guidance branch.
pub struct BatchItem<'a> {
    /// `[m, dim]` patch embeddings of the processed tokens.
    pub x: Tensor,
    pub modulation: &'a FrameModulation,
    /// Which tokens of the block(s) (rope tables, frame counts).
    pub tokens: &'a TokenSet,
    pub branch: usize,
    /// Position (within the branch's cache region) of the block's first token; the
    /// processed tokens are written at `first + their index in the block`.
    pub first: usize,
    /// The cache positions (within the branch's region) the item attends to, its own
    /// tokens included. With block-causal groups inside the item, each group sees the
    /// positions from `keys.start` to its own end.
    pub keys: std::ops::Range<usize>,
}

/// Accumulates [`BatchItem`]s into a [`Batch`].
#[derive(Default)]
pub struct BatchBuilder {
    x: Vec<Tensor>,
    proj: Vec<Tensor>,
    counts: Vec<usize>,
    cos: Vec<Tensor>,
    sin: Vec<Tensor>,
    slots: Vec<u32>,
    self_groups: Vec<super::kernels::Group>,
    cross_groups: Vec<super::kernels::Group>,
    n: usize,
    refresh: RefreshParts,
    record_hidden: bool,
}

impl BatchBuilder {
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Tokens pushed so far.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Asks the forward for the tokens' hidden states (see [`Forward::hidden`]).
    pub fn record_hidden(&mut self) {
        self.record_hidden = true;
    }

    /// Adds tokens whose keys/values are refreshed (see [`KvRefresh`]).
    pub fn push_refresh(
        &mut self,
        item: RefreshItem,
        cache: &KvCache,
        layers: usize,
    ) -> candle_core::Result<()> {
        let m = item.tokens.len();
        let Some(idx) = &item.tokens.idx else {
            candle_core::bail!("a key/value refresh needs the indices of its tokens");
        };
        let (n, w) = item.est.dims2()?;
        if n != m || layers == 0 || !w.is_multiple_of(layers) {
            candle_core::bail!(
                "key/value refresh of {:?} estimates, token set of {m} for {layers} layers",
                item.est.shape(),
            );
        }
        check_modulation(item.modulation, item.tokens)?;
        if item.branch >= cache.branches {
            candle_core::bail!(
                "key/value refresh of branch {} in a cache of {} branches",
                item.branch,
                cache.branches
            );
        }
        let base = cache.slot(item.branch, item.first) as u32;
        let end = cache.slot(item.branch, cache.capacity);
        let r = &mut self.refresh;
        for i in idx.to_vec1::<u32>()? {
            if (base + i) as usize >= end {
                candle_core::bail!("key/value refresh outside the cache region of its branch");
            }
            r.slots.push(base + i);
        }
        r.est.push(item.est);
        r.proj.push(item.modulation.proj.clone());
        r.counts.extend_from_slice(&item.tokens.frame_counts);
        r.cos.push(item.tokens.cos.clone());
        r.sin.push(item.tokens.sin.clone());
        Ok(())
    }

    /// Adds an item; returns the row range of its tokens in the batch.
    pub fn push(
        &mut self,
        item: BatchItem,
        cache: &KvCache,
        text_len: usize,
    ) -> candle_core::Result<std::ops::Range<usize>> {
        let m = item.tokens.len();
        if item.x.dim(0)? != m {
            candle_core::bail!(
                "batch item of {:?} tokens with a token set of {m}",
                item.x.shape()
            );
        }
        check_modulation(item.modulation, item.tokens)?;
        if item.branch >= cache.branches || item.keys.end > cache.capacity || item.keys.is_empty() {
            candle_core::bail!(
                "batch item of branch {} attending to positions {:?} does not fit a cache of {} branches x {} rows",
                item.branch,
                item.keys,
                cache.branches,
                cache.capacity
            );
        }
        let base = cache.slot(item.branch, item.first);
        match &item.tokens.idx {
            None => self.slots.extend((0..m).map(|i| (base + i) as u32)),
            Some(idx) => self
                .slots
                .extend(idx.to_vec1::<u32>()?.iter().map(|&i| base as u32 + i)),
        }
        if let Some(&s) = self.slots.last()
            && s as usize >= cache.slot(item.branch, cache.capacity)
        {
            candle_core::bail!("batch item tokens outside the cache region of its branch");
        }
        let start = self.n;
        let k_start = cache.slot(item.branch, item.keys.start);
        match &item.tokens.groups {
            None => self.self_groups.push(super::kernels::Group {
                q_start: start,
                q_len: m,
                k_start,
                keys: item.keys.len(),
            }),
            // Block-causal groups inside the item (whole blocks): each sees the positions
            // up to its own end.
            Some(sizes) => {
                let mut q = start;
                for &len in sizes {
                    let end = item.first + (q - start) + len;
                    if end > item.keys.end || end <= item.keys.start {
                        candle_core::bail!(
                            "attention group ending at {end} outside {:?}",
                            item.keys
                        );
                    }
                    self.self_groups.push(super::kernels::Group {
                        q_start: q,
                        q_len: len,
                        k_start,
                        keys: end - item.keys.start,
                    });
                    q += len;
                }
            }
        }
        self.cross_groups.push(super::kernels::Group {
            q_start: start,
            q_len: m,
            k_start: item.branch * text_len,
            keys: text_len,
        });
        self.x.push(item.x);
        self.proj.push(item.modulation.proj.clone());
        self.counts.extend_from_slice(&item.tokens.frame_counts);
        self.cos.push(item.tokens.cos.clone());
        self.sin.push(item.tokens.sin.clone());
        self.n += m;
        Ok(start..self.n)
    }

    pub fn build(self) -> candle_core::Result<Batch> {
        if self.n == 0 {
            candle_core::bail!("an empty batch");
        }
        let cat = |v: &[Tensor]| {
            if v.len() == 1 {
                Ok(v[0].clone())
            } else {
                Tensor::cat(v, 0)
            }
        };
        let r = self.refresh;
        let mut slots = self.slots;
        // With a refresh, each table once for both sets of tokens; the batch's are views
        // of it.
        let (proj, cos, sin, refresh) = if r.est.is_empty() {
            (cat(&self.proj)?, cat(&self.cos)?, cat(&self.sin)?, None)
        } else {
            let (runs, n) = (self.counts.len(), self.n);
            slots.extend_from_slice(&r.slots);
            let joined = Joined {
                proj: cat(&[self.proj, r.proj].concat())?,
                counts: [self.counts.as_slice(), &r.counts].concat(),
                cos: cat(&[self.cos, r.cos].concat())?,
                sin: cat(&[self.sin, r.sin].concat())?,
            };
            (
                joined.proj.narrow(0, 0, runs)?,
                joined.cos.narrow(0, 0, n)?,
                joined.sin.narrow(0, 0, n)?,
                Some(KvRefresh {
                    est: cat(&r.est)?,
                    joined,
                }),
            )
        };
        Ok(Batch {
            x: cat(&self.x)?,
            proj,
            frame_counts: self.counts,
            cos,
            sin,
            slots,
            self_groups: self.self_groups,
            cross_groups: self.cross_groups,
            refresh,
            record_hidden: self.record_hidden,
        })
    }
}

/// A token set's modulation must have one row per frame of the set.
fn check_modulation(m: &FrameModulation, tokens: &TokenSet) -> candle_core::Result<()> {
    if m.proj.dim(0)? != tokens.frame_counts.len() {
        candle_core::bail!(
            "modulation for {} frames, token set of {} frames",
            m.proj.dim(0)?,
            tokens.frame_counts.len()
        );
    }
    Ok(())
}

/// Timestep conditioning of the frames of one attention block.
#[derive(Clone)]
pub struct FrameModulation {
    /// `[frames, dim]`, f32: conditions the output head.
    pub temb: Tensor,
    /// `[frames, 6, dim]`, f32: the 6-way modulation of every layer (time projection, plus
    /// the fps embedding where the model injects it). MotionCache measures its step
    /// distance on this tensor.
    pub proj: Tensor,
}

/// Which tokens of an attention block a forward processes.
#[derive(Clone)]
pub struct TokenSet {
    /// Sorted token indices within the block; `None` for all of them.
    pub idx: Option<Tensor>,
    /// Number of processed tokens in each frame of the block, in frame order.
    pub frame_counts: Vec<usize>,
    /// RoPE tables of the processed tokens, `[tokens, head_dim / 2]`.
    pub cos: Tensor,
    pub sin: Tensor,
    /// Block-causal attention inside the set: the token counts of consecutive attention
    /// groups, each attending to the prefix and to the groups up to itself. `None`: one
    /// group (every token sees every token of the set).
    pub groups: Option<Vec<usize>>,
}

impl TokenSet {
    pub fn len(&self) -> usize {
        self.frame_counts.iter().sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Keys and values of one attention block for every layer.
#[derive(Clone)]
pub struct BlockKv {
    /// Per layer `(k, v)`, each `[1, heads, tokens, head_dim]`, keys already rotated.
    pub layers: Vec<(Tensor, Tensor)>,
}

impl BlockKv {
    pub fn tokens(&self) -> usize {
        self.layers
            .first()
            .map(|(k, _)| k.dim(2).unwrap_or(0))
            .unwrap_or(0)
    }

    /// Concatenates several blocks' keys/values along the token axis, layer by layer.
    pub fn concat(blocks: &[&BlockKv]) -> candle_core::Result<Option<BlockKv>> {
        let Some(first) = blocks.first() else {
            return Ok(None);
        };
        if blocks.len() == 1 {
            return Ok(Some((*first).clone()));
        }
        let mut layers = Vec::with_capacity(first.layers.len());
        for l in 0..first.layers.len() {
            let ks: Vec<&Tensor> = blocks.iter().map(|b| &b.layers[l].0).collect();
            let vs: Vec<&Tensor> = blocks.iter().map(|b| &b.layers[l].1).collect();
            layers.push((Tensor::cat(&ks, 2)?, Tensor::cat(&vs, 2)?));
        }
        Ok(Some(BlockKv { layers }))
    }
}

/// 3D rotary position tables: one per axis (frame, height, width), as pairs of cos/sin of
/// `head_dim / 2` complex pairs split (t, h, w); for head_dim 128 that is (22, 21, 21).
struct Rope {
    cos: [Tensor; 3],
    sin: [Tensor; 3],
}

impl Rope {
    fn new(head_dim: usize, max_len: usize, dev: &Device) -> candle_core::Result<Self> {
        let h_dim = 2 * (head_dim / 6);
        let t_dim = head_dim - 2 * h_dim;
        let mk = |dim: usize| -> candle_core::Result<(Tensor, Tensor)> {
            let half = dim / 2;
            let mut c = Vec::with_capacity(max_len * half);
            let mut s = Vec::with_capacity(max_len * half);
            for p in 0..max_len {
                for j in 0..half {
                    // diffusers computes the angles in f64, then casts to f32.
                    let freq = 1.0 / 10000f64.powf((2 * j) as f64 / dim as f64);
                    let a = p as f64 * freq;
                    c.push(a.cos() as f32);
                    s.push(a.sin() as f32);
                }
            }
            Ok((
                Tensor::from_vec(c, (max_len, half), dev)?,
                Tensor::from_vec(s, (max_len, half), dev)?,
            ))
        };
        let (ct, st) = mk(t_dim)?;
        let (ch, sh) = mk(h_dim)?;
        let (cw, sw) = mk(h_dim)?;
        Ok(Self {
            cos: [ct, ch, cw],
            sin: [st, sh, sw],
        })
    }

    /// Tables for all tokens of `frames` frames starting at absolute frame `f0`, raster
    /// order (frame, row, column): `[frames * h * w, head_dim / 2]` each.
    fn tables(
        &self,
        f0: usize,
        frames: usize,
        h: usize,
        w: usize,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let build = |t: &[Tensor; 3]| -> candle_core::Result<Tensor> {
            let max = t[0].dim(0)?;
            if f0 + frames > max || h > max || w > max {
                candle_core::bail!(
                    "rope positions out of range: frames {f0}..{} rows {h} cols {w} (max {max})",
                    f0 + frames
                );
            }
            let (dt, dh, dw) = (t[0].dim(1)?, t[1].dim(1)?, t[2].dim(1)?);
            let tf = t[0]
                .narrow(0, f0, frames)?
                .reshape((frames, 1, 1, dt))?
                .broadcast_as((frames, h, w, dt))?;
            let th = t[1]
                .narrow(0, 0, h)?
                .reshape((1, h, 1, dh))?
                .broadcast_as((frames, h, w, dh))?;
            let tw = t[2]
                .narrow(0, 0, w)?
                .reshape((1, 1, w, dw))?
                .broadcast_as((frames, h, w, dw))?;
            Tensor::cat(&[tf, th, tw], 3)?.reshape((frames * h * w, dt + dh + dw))
        };
        Ok((build(&self.cos)?, build(&self.sin)?))
    }
}

struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn new(dim: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            eps: eps as f32,
        })
    }
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if super::kernels::f32_kernels(&[x, &self.weight]) {
            return super::kernels::rms_norm(x, &self.weight, self.eps);
        }
        candle_nn::ops::rms_norm(x, &self.weight, self.eps)
    }
}

/// diffusers' FP32LayerNorm: the normalisation itself always runs in f32.
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    fn plain(dim: usize, eps: f64, dev: &Device) -> candle_core::Result<Self> {
        Ok(Self {
            weight: Tensor::ones(dim, DType::F32, dev)?,
            bias: Tensor::zeros(dim, DType::F32, dev)?,
            eps: eps as f32,
        })
    }
    fn affine(dim: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?.to_dtype(DType::F32)?,
            bias: vb.get(dim, "bias")?.to_dtype(DType::F32)?,
            eps: eps as f32,
        })
    }
    /// Returns f32.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = x.to_dtype(DType::F32)?;
        if super::kernels::f32_kernels(&[&x, &self.weight, &self.bias]) {
            return super::kernels::layer_norm(&x, &self.weight, &self.bias, self.eps);
        }
        candle_nn::ops::layer_norm(&x, &self.weight, &self.bias, self.eps)
    }
}

struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    norm_q: Option<RmsNorm>,
    norm_k: Option<RmsNorm>,
}

impl Attention {
    fn new(cfg: &TransformerConfig, kv_dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let dim = cfg.dim();
        let (norm_q, norm_k) = if cfg.qk_norm {
            (
                Some(RmsNorm::new(dim, cfg.eps, vb.pp("norm_q"))?),
                Some(RmsNorm::new(dim, cfg.eps, vb.pp("norm_k"))?),
            )
        } else {
            (None, None)
        };
        Ok(Self {
            to_q: kernel_layout(candle_nn::linear(dim, dim, vb.pp("to_q"))?)?,
            to_k: kernel_layout(candle_nn::linear(kv_dim, dim, vb.pp("to_k"))?)?,
            to_v: kernel_layout(candle_nn::linear(kv_dim, dim, vb.pp("to_v"))?)?,
            to_out: kernel_layout(candle_nn::linear(dim, dim, vb.pp("to_out.0"))?)?,
            norm_q,
            norm_k,
        })
    }

    fn q(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Self::project(&self.to_q, self.norm_q.as_ref(), x)
    }

    fn k(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Self::project(&self.to_k, self.norm_k.as_ref(), x)
    }

    /// A projection and its RMS norm across heads, fused on the CPU in f32.
    fn project(l: &Linear, norm: Option<&RmsNorm>, x: &Tensor) -> candle_core::Result<Tensor> {
        match norm {
            Some(n) if super::kernels::f32_kernels(&[x, &n.weight]) => {
                super::kernels::linear_rms(l, x, &n.weight, n.eps)
            }
            Some(n) => n.forward(&super::kernels::linear(l, x)?),
            None => super::kernels::linear(l, x),
        }
    }
}

/// `[tokens, heads * head_dim]` -> `[1, heads, tokens, head_dim]`, contiguous.
pub(crate) fn split_heads(x: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (n, d) = x.dims2()?;
    x.reshape((1, n, heads, d / heads))?
        .transpose(1, 2)?
        .contiguous()
}

/// Per-frame affine map of tokens sorted by frame: `x * mul[f] (+ add[f])` for the tokens
/// of frame `f` (`mul`, `add`: `[frames, dim]`). One broadcast op when every frame has the
/// same number of tokens (full forwards), else the rows are expanded per token.
fn per_frame_affine(
    x: &Tensor,
    counts: &[usize],
    mul: &Tensor,
    add: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let (n, d) = x.dims2()?;
    let frames = counts.len();
    if frames > 0 && counts.iter().all(|&c| c == counts[0]) {
        let x3 = x.reshape((frames, n / frames, d))?;
        let mut y = x3.broadcast_mul(&mul.unsqueeze(1)?)?;
        if let Some(a) = add {
            y = y.broadcast_add(&a.unsqueeze(1)?)?;
        }
        return y.reshape((n, d));
    }
    let idx: Vec<u32> = counts
        .iter()
        .enumerate()
        .flat_map(|(f, &c)| std::iter::repeat_n(f as u32, c))
        .collect();
    let idx = Tensor::new(idx.as_slice(), x.device())?;
    let y = (x * mul.index_select(&idx, 0)?)?;
    match add {
        Some(a) => y + a.index_select(&idx, 0)?,
        None => Ok(y),
    }
}

struct Layer {
    attn1: Attention,
    attn2: Attention,
    norm1: LayerNorm,
    norm2: Option<LayerNorm>,
    norm3: LayerNorm,
    ffn_in: Linear,
    ffn_out: Linear,
    /// `[6, dim]`, f32.
    scale_shift_table: Tensor,
    heads: usize,
}

impl Layer {
    fn new(cfg: &TransformerConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let dim = cfg.dim();
        let dev = vb.device().clone();
        Ok(Self {
            attn1: Attention::new(cfg, dim, vb.pp("attn1"))?,
            attn2: Attention::new(cfg, dim, vb.pp("attn2"))?,
            norm1: LayerNorm::plain(dim, cfg.eps, &dev)?,
            norm2: if cfg.cross_attn_norm {
                Some(LayerNorm::affine(dim, cfg.eps, vb.pp("norm2"))?)
            } else {
                None
            },
            norm3: LayerNorm::plain(dim, cfg.eps, &dev)?,
            ffn_in: kernel_layout(candle_nn::linear(
                dim,
                cfg.ffn_dim,
                vb.pp("ffn.net.0.proj"),
            )?)?,
            ffn_out: kernel_layout(candle_nn::linear(cfg.ffn_dim, dim, vb.pp("ffn.net.2"))?)?,
            scale_shift_table: vb
                .get((1, 6, dim), "scale_shift_table")?
                .to_dtype(DType::F32)?
                .squeeze(0)?,
            heads: cfg.num_attention_heads,
        })
    }

    /// `[runs, 6, dim]`: the layer's table plus the per-frame timestep projection.
    fn table(&self, proj: &Tensor) -> candle_core::Result<Tensor> {
        proj.broadcast_add(&self.scale_shift_table.unsqueeze(0)?)
    }

    /// One of the block's plain norms (norm1, norm3) of `x` and its per-frame modulation
    /// `m` (rows `shift`, `scale`). On the CPU in f32 one pass (src/model/kernels.rs);
    /// elsewhere candle ops.
    fn modulate(
        norm: &LayerNorm,
        x: &Tensor,
        m: &Tensor,
        counts: &[usize],
        shift: usize,
        scale: usize,
    ) -> candle_core::Result<Tensor> {
        if super::kernels::f32_kernels(&[x, m]) {
            return super::kernels::norm_modulate(x, m, counts, shift, scale, norm.eps);
        }
        let sc = (m.i((.., scale))? + 1.0)?;
        per_frame_affine(
            &norm.forward(x)?,
            counts,
            &sc,
            Some(&m.i((.., shift))?.contiguous()?),
        )
    }

    /// One transformer block over the tokens of a batch; their keys/values are written
    /// into the cache layer `kv` at `target` first, then every attention group reads its
    /// range of it.
    /// `refresh`: the refreshed tokens' estimate sources (`[m, layers * dim]`: their patch
    /// embeddings, then their deltas; see [`KvRefresh`]), this layer's index, and the
    /// batch's tokens joined with them; their keys and values go through the same
    /// projections as the batch's own.
    fn forward(
        &self,
        x: &Tensor,
        b: &Batch,
        target: &KvTarget,
        kv: &(Tensor, Tensor),
        ctx: &(Tensor, Tensor),
        refresh: Option<(&Tensor, usize, &Joined)>,
    ) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let n = x.dim(0)?;
        let joined = match refresh {
            Some((est, l, j)) => Some((est, l, self.table(&j.proj)?, j)),
            None => None,
        };
        let m = match &joined {
            Some((_, _, mj, _)) => mj.narrow(0, 0, b.frame_counts.len())?,
            None => self.table(&b.proj)?,
        };
        let counts = &b.frame_counts;
        let fused = super::kernels::f32_kernels(&[x, &m]);
        let modulate = |norm: &LayerNorm, x: &Tensor, shift: usize, scale: usize| {
            Self::modulate(norm, x, &m, counts, shift, scale)
        };
        let gated_add = |x: &Tensor, y: &Tensor, gate: usize| -> candle_core::Result<Tensor> {
            if fused && y.dtype() == DType::F32 {
                return super::kernels::gated_add(x, y, &m, counts, gate);
            }
            let g = per_frame_affine(
                &y.to_dtype(DType::F32)?,
                counts,
                &m.i((.., gate))?.contiguous()?,
                None,
            )?;
            (x.to_dtype(DType::F32)? + g)?.to_dtype(dtype)
        };

        // Self-attention (refreshed tokens: keys and values only).
        let h = match &joined {
            Some((est, l, mj, j)) if super::kernels::f32_kernels(&[x, est, mj]) => {
                let eps = self.norm1.eps;
                super::kernels::norm_modulate_joined(x, est, *l, mj, &j.counts, 0, 1, eps)?
            }
            Some((est, l, mj, j)) => {
                let d = x.dim(1)?;
                let mut e = est.narrow(1, 0, d)?;
                if *l > 0 {
                    e = (e + est.narrow(1, l * d, d)?)?;
                }
                let xj = Tensor::cat(&[x, &e], 0)?;
                Self::modulate(&self.norm1, &xj, mj, &j.counts, 0, 1)?
            }
            None => modulate(&self.norm1, x, 0, 1)?,
        }
        .to_dtype(dtype)?;
        let q = self.attn1.q(&h.narrow(0, 0, n)?)?;
        let k = self.attn1.k(&h)?;
        let v = super::kernels::linear(&self.attn1.to_v, &h)?;
        let a = match target {
            KvTarget::Rows(rows, rope) => {
                super::kernels::cache_store(&kv.0, &k, rows, Some(rope))?;
                super::kernels::cache_store(&kv.1, &v, rows, None)?;
                // The batch's rotation table is the first `n` rows of the joined one.
                let rope = rope.narrow(0, 0, n)?;
                super::kernels::sdpa_tokens(&q, Some(&rope), &kv.0, &kv.1, &b.self_groups)?
            }
            KvTarget::Scatter { slots, cos, sin } => {
                let (k, v) = (split_heads(&k, self.heads)?, split_heads(&v, self.heads)?);
                let (cos, sin) = (cos.to_dtype(dtype)?, sin.to_dtype(dtype)?);
                let k = candle_nn::rotary_emb::rope_i(&k, &cos, &sin)?;
                kv.0.scatter_set(slots, &k.to_dtype(kv.0.dtype())?, 2)?;
                kv.1.scatter_set(slots, &v.to_dtype(kv.1.dtype())?, 2)?;
                let rope = Tensor::cat(&[&b.cos, &b.sin], 1)?;
                super::kernels::sdpa_tokens(&q, Some(&rope), &kv.0, &kv.1, &b.self_groups)?
            }
        };
        let a = super::kernels::linear(&self.attn1.to_out, &a)?;
        let x = gated_add(x, &a, 2)?;

        // Cross-attention on the text context (all positions, padding included).
        let h = match &self.norm2 {
            Some(n) => n.forward(&x)?.to_dtype(dtype)?,
            None => x.clone(),
        };
        let q = self.attn2.q(&h)?;
        let a = super::kernels::sdpa_tokens(&q, None, &ctx.0, &ctx.1, &b.cross_groups)?;
        let x = super::kernels::linear_add(&self.attn2.to_out, &a, &x)?;

        // Feed-forward.
        let h = modulate(&self.norm3, &x, 3, 4)?.to_dtype(dtype)?;
        let f = super::kernels::linear_gelu(&self.ffn_in, &h)?;
        let f = super::kernels::linear(&self.ffn_out, &f)?;
        gated_add(&x, &f, 5)
    }
}

/// The diffusion-forcing DiT.
pub struct Transformer {
    cfg: TransformerConfig,
    /// The patch embedding as a linear map of flattened patches.
    patch: Linear,
    time_1: Linear,
    time_2: Linear,
    time_proj: Linear,
    text_1: Linear,
    text_2: Linear,
    fps: Option<(Tensor, Linear, Linear)>,
    layers: Vec<Layer>,
    norm_out: LayerNorm,
    /// `[2, dim]`, f32.
    head_table: Tensor,
    proj_out: Linear,
    rope: Rope,
    dtype: DType,
    device: Device,
}

impl Transformer {
    /// Builds the model from weights in diffusers names (use `VarBuilder::rename_f` with
    /// [`super::config::diffusers_to_original_name`] for original SkyReels-V2 names).
    pub fn new(cfg: &TransformerConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let dim = cfg.dim();
        let dev = vb.device().clone();
        let [pt, ph, pw] = cfg.patch_size;
        let patch_in = cfg.in_channels * pt * ph * pw;
        let patch_w = vb
            .get((dim, cfg.in_channels, pt, ph, pw), "patch_embedding.weight")?
            .reshape((dim, patch_in))?;
        let patch_b = vb.get(dim, "patch_embedding.bias")?;
        let ce = vb.pp("condition_embedder");
        let fps = if cfg.inject_sample_info {
            Some((
                vb.get((2, dim), "fps_embedding.weight")?,
                candle_nn::linear(dim, dim, vb.pp("fps_projection.net.0.proj"))?,
                candle_nn::linear(dim, 6 * dim, vb.pp("fps_projection.net.2"))?,
            ))
        } else {
            None
        };
        let layers = (0..cfg.num_layers)
            .map(|i| Layer::new(cfg, vb.pp(format!("blocks.{i}"))))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            patch: kernel_layout(Linear::new(patch_w, Some(patch_b)))?,
            // The time embedder stays in f32 in diffusers (`_keep_in_fp32_modules`).
            time_1: f32_linear(cfg.freq_dim, dim, ce.pp("time_embedder.linear_1"))?,
            time_2: f32_linear(dim, dim, ce.pp("time_embedder.linear_2"))?,
            time_proj: candle_nn::linear(dim, 6 * dim, ce.pp("time_proj"))?,
            text_1: candle_nn::linear(cfg.text_dim, dim, ce.pp("text_embedder.linear_1"))?,
            text_2: candle_nn::linear(dim, dim, ce.pp("text_embedder.linear_2"))?,
            fps,
            layers,
            norm_out: LayerNorm::plain(dim, cfg.eps, &dev)?,
            head_table: vb
                .get((1, 2, dim), "scale_shift_table")?
                .to_dtype(DType::F32)?
                .squeeze(0)?,
            proj_out: kernel_layout(candle_nn::linear(
                dim,
                cfg.out_channels * pt * ph * pw,
                vb.pp("proj_out"),
            )?)?,
            rope: Rope::new(cfg.attention_head_dim, cfg.rope_max_seq_len, &dev)?,
            dtype: vb.dtype(),
            device: dev,
        })
    }

    pub fn config(&self) -> &TransformerConfig {
        &self.cfg
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Projects a text context `[1, text_len, text_dim]` (or `[text_len, text_dim]`) and
    /// precomputes every layer's cross-attention keys/values.
    pub fn context(&self, encoder_hidden_states: &Tensor) -> candle_core::Result<Context> {
        let c = match encoder_hidden_states.rank() {
            3 => encoder_hidden_states.squeeze(0)?,
            2 => encoder_hidden_states.clone(),
            _ => candle_core::bail!(
                "text context must be [1, len, dim], got {:?}",
                encoder_hidden_states.shape()
            ),
        };
        let c = c.to_dtype(self.dtype)?;
        let c = self.text_2.forward(&self.text_1.forward(&c)?.gelu()?)?;
        let layers = self
            .layers
            .iter()
            .map(|l| {
                let k = split_heads(&l.attn2.k(&c)?, l.heads)?;
                let v = split_heads(&l.attn2.to_v.forward(&c)?, l.heads)?;
                Ok((k, v))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Context { layers })
    }

    /// Timestep (and fps) conditioning for frames with the given timesteps. `fps_class` is
    /// the model's fps class (SkyReels: 0 for 16 fps, 1 otherwise), used when the model
    /// injects sample info.
    pub fn modulation(
        &self,
        timesteps: &[f64],
        fps_class: u32,
    ) -> candle_core::Result<FrameModulation> {
        let f = timesteps.len();
        let dim = self.cfg.dim();
        let half = self.cfg.freq_dim / 2;
        // Sinusoidal embedding with cos first (flip_sin_to_cos), computed in f64.
        let mut e = Vec::with_capacity(f * self.cfg.freq_dim);
        for &t in timesteps {
            let angles: Vec<f64> = (0..half)
                .map(|j| t / 10000f64.powf(j as f64 / half as f64))
                .collect();
            e.extend(angles.iter().map(|a| a.cos() as f32));
            e.extend(angles.iter().map(|a| a.sin() as f32));
        }
        let e = Tensor::from_vec(e, (f, self.cfg.freq_dim), &self.device)?;
        let temb = self.time_2.forward(&self.time_1.forward(&e)?.silu()?)?;
        let mut proj = self
            .time_proj
            .forward(&temb.to_dtype(self.dtype)?.silu()?)?
            .to_dtype(DType::F32)?
            .reshape((f, 6, dim))?;
        if let Some((table, p0, p2)) = &self.fps {
            let emb = table.i(fps_class as usize)?.unsqueeze(0)?;
            let add = p2
                .forward(&p0.forward(&emb)?.silu()?)?
                .to_dtype(DType::F32)?;
            proj = proj.broadcast_add(&add.reshape((1, 6, dim))?)?;
        }
        Ok(FrameModulation {
            temb: temb.to_dtype(DType::F32)?,
            proj,
        })
    }

    /// Latent grid `[C, F, H, W]` -> post-patch grid size `(F', H', W')`.
    pub fn grid(
        &self,
        frames: usize,
        h: usize,
        w: usize,
    ) -> candle_core::Result<(usize, usize, usize)> {
        let [pt, ph, pw] = self.cfg.patch_size;
        if !frames.is_multiple_of(pt) || !h.is_multiple_of(ph) || !w.is_multiple_of(pw) {
            candle_core::bail!(
                "latent size {frames}x{h}x{w} is not a multiple of the patch size {:?}",
                self.cfg.patch_size
            );
        }
        Ok((frames / pt, h / ph, w / pw))
    }

    /// Patch embedding: latents `[C, F, H, W]` -> tokens `[F'*H'*W', dim]` in raster order.
    pub fn patchify(&self, latents: &Tensor) -> candle_core::Result<Tensor> {
        let (c, f, h, w) = latents.dims4()?;
        if c != self.cfg.in_channels {
            candle_core::bail!(
                "latents have {c} channels, the transformer expects {}",
                self.cfg.in_channels
            );
        }
        let [pt, ph, pw] = self.cfg.patch_size;
        let (gf, gh, gw) = self.grid(f, h, w)?;
        let patches = latents
            .to_dtype(self.dtype)?
            .reshape(vec![c, gf, pt, gh, ph, gw, pw])?
            .permute(vec![1, 3, 5, 0, 2, 4, 6])?
            .reshape((gf * gh * gw, c * pt * ph * pw))?;
        super::kernels::linear(&self.patch, &patches)
    }

    /// Output head and unpatchify: tokens `[N, dim]` of a `(F', H', W')` grid -> the
    /// prediction `[C_out, F, H, W]` (f32).
    pub fn head(
        &self,
        x: &Tensor,
        temb: &Tensor,
        grid: (usize, usize, usize),
    ) -> candle_core::Result<Tensor> {
        let (gf, gh, gw) = grid;
        let out = self.head_tokens(x, temb, &vec![gh * gw; gf])?;
        self.unpatchify(&out, grid)
    }

    /// The output head on tokens of several frames: `x` `[N, dim]`, `temb` `[frames, dim]`,
    /// `counts` the tokens of each frame in order. Returns `[N, C_out * patch]` (f32).
    pub fn head_tokens(
        &self,
        x: &Tensor,
        temb: &Tensor,
        counts: &[usize],
    ) -> candle_core::Result<Tensor> {
        if super::kernels::f32_kernels(&[x, temb]) {
            // `[frames, 2, dim]`: shift, then scale, as the blocks' tables.
            let m = temb
                .unsqueeze(1)?
                .broadcast_add(&self.head_table.unsqueeze(0)?)?;
            let h = super::kernels::norm_modulate(x, &m, counts, 0, 1, self.norm_out.eps)?;
            return super::kernels::linear(&self.proj_out, &h);
        }
        let xn = self.norm_out.forward(x)?;
        let shift = temb.broadcast_add(&self.head_table.i(0)?.unsqueeze(0)?)?;
        let scale = (temb.broadcast_add(&self.head_table.i(1)?.unsqueeze(0)?)? + 1.0)?;
        let h = per_frame_affine(&xn, counts, &scale, Some(&shift))?;
        self.proj_out
            .forward(&h.to_dtype(self.dtype)?)?
            .to_dtype(DType::F32)
    }

    /// Head outputs `[F'*H'*W', C_out * patch]` of a `(F', H', W')` grid -> `[C_out, F, H, W]`.
    pub fn unpatchify(
        &self,
        out: &Tensor,
        grid: (usize, usize, usize),
    ) -> candle_core::Result<Tensor> {
        let (gf, gh, gw) = grid;
        let [pt, ph, pw] = self.cfg.patch_size;
        let c = self.cfg.out_channels;
        out.reshape(vec![gf, gh, gw, pt, ph, pw, c])?
            .permute(vec![6, 0, 3, 1, 4, 2, 5])?
            .reshape((c, gf * pt, gh * ph, gw * pw))
    }

    /// Token set of all tokens of `frames` grid frames starting at absolute grid frame
    /// `f0` (the RoPE temporal position).
    pub fn all_tokens(
        &self,
        f0: usize,
        frames: usize,
        gh: usize,
        gw: usize,
    ) -> candle_core::Result<TokenSet> {
        let (cos, sin) = self.rope.tables(f0, frames, gh, gw)?;
        Ok(TokenSet {
            idx: None,
            frame_counts: vec![gh * gw; frames],
            cos,
            sin,
            groups: None,
        })
    }

    /// A subset of `all` (which must be a full token set): `idx` sorted ascending.
    pub fn subset(&self, all: &TokenSet, idx: &[u32]) -> candle_core::Result<TokenSet> {
        let per = all.frame_counts.first().copied().unwrap_or(1).max(1);
        let mut counts = vec![0usize; all.frame_counts.len()];
        for &i in idx {
            let f = i as usize / per;
            if f >= counts.len() {
                candle_core::bail!("token index {i} outside a block of {} tokens", all.len());
            }
            counts[f] += 1;
        }
        let t = Tensor::new(idx, &self.device)?;
        if all.groups.is_some() {
            candle_core::bail!("a subset of a token set with several attention groups");
        }
        Ok(TokenSet {
            cos: all.cos.index_select(&t, 0)?,
            sin: all.sin.index_select(&t, 0)?,
            idx: Some(t),
            frame_counts: counts,
            groups: None,
        })
    }

    /// A zeroed key/value cache of `capacity` token rows per branch for `branches`
    /// guidance branches, in the model's dtype.
    pub fn kv_cache(&self, branches: usize, capacity: usize) -> candle_core::Result<KvCache> {
        let heads = self.cfg.num_attention_heads;
        let hd = self.cfg.attention_head_dim;
        let shape = (1, heads, branches * capacity, hd);
        let layers = (0..self.layers.len())
            .map(|_| {
                Ok((
                    Tensor::zeros(shape, self.dtype, &self.device)?,
                    Tensor::zeros(shape, self.dtype, &self.device)?,
                ))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(KvCache {
            layers,
            capacity,
            branches,
        })
    }

    /// Runs a batch through every layer: its tokens' keys/values are written into `cache`,
    /// each attention group reads its range of it; `ctx` holds the stacked contexts of the
    /// branches (see [`Context::stack`]). Returns the output tokens `[n, dim]`.
    pub fn forward_batch(
        &self,
        b: &Batch,
        cache: &KvCache,
        ctx: &Context,
    ) -> candle_core::Result<Tensor> {
        let f = self
            .forward_batch_until(b, cache, ctx, None)?
            .ok_or_else(|| {
                candle_core::Error::Msg("a forward without a cancel flag stopped".into())
            })?;
        Ok(f.y)
    }

    /// [`Self::forward_batch`] that checks `cancel` before every layer and returns `None`
    /// as soon as it is set (the keys/values of the layers run so far are written: the
    /// caller drops the pass), so a stop reaches into a pass of a large model.
    pub fn forward_batch_until(
        &self,
        b: &Batch,
        cache: &KvCache,
        ctx: &Context,
        cancel: Option<&std::sync::atomic::AtomicBool>,
    ) -> candle_core::Result<Option<Forward>> {
        let n = b.x.dim(0)?;
        let m = b.refresh.as_ref().map_or(Ok(0), |r| r.est.dim(0))?;
        if b.frame_counts.iter().sum::<usize>() != n || b.slots.len() != n + m {
            candle_core::bail!("inconsistent batch of {n} tokens");
        }
        if cache.layers.len() != self.layers.len() || ctx.layers.len() != self.layers.len() {
            candle_core::bail!("cache or context built for another model");
        }
        let heads = self.cfg.num_attention_heads;
        let hd = self.cfg.attention_head_dim;
        let refresh = match &b.refresh {
            Some(r) => {
                // Per token, its patch embedding and then its deltas: each layer's
                // estimate is the sum of the first and the layer's columns.
                if r.est.dims() != [m, self.layers.len() * b.x.dim(1)?]
                    || r.joined.counts.iter().sum::<usize>() != n + m
                {
                    candle_core::bail!("inconsistent key/value refresh of {m} tokens");
                }
                Some((&r.est, &r.joined))
            }
            None => None,
        };
        let (cos, sin) = match refresh {
            Some((_, j)) => (&j.cos, &j.sin),
            None => (&b.cos, &b.sin),
        };
        let target = if super::kernels::cache_store_fits(&cache.layers[0].0, b.x.dtype()) {
            let rope = Tensor::cat(&[cos, sin], 1)?.to_dtype(DType::F32)?;
            KvTarget::Rows(b.slots.clone(), rope)
        } else {
            let all = b.slots.len();
            KvTarget::Scatter {
                slots: Tensor::new(b.slots.as_slice(), &self.device)?
                    .reshape((1, 1, all, 1))?
                    .broadcast_as((1, heads, all, hd))?
                    .contiguous()?,
                cos: cos.clone(),
                sin: sin.clone(),
            }
        };
        let run = || -> candle_core::Result<Option<Forward>> {
            let mut x = b.x.clone();
            // Each token's hidden state at the inputs of the layers after the first, minus
            // its patch embedding: on the CPU in f32 written straight into one
            // `[n, (layers - 1) * dim]` buffer, elsewhere one tensor per layer, joined.
            let d = b.x.dim(1)?;
            let width = (self.layers.len() - 1) * d;
            let host = super::kernels::f32_kernels(&[&b.x]);
            let mut buffer = match b.record_hidden && host {
                true => vec![0f32; n * width],
                false => Vec::new(),
            };
            let mut parts = Vec::new();
            for (l, layer) in self.layers.iter().enumerate() {
                if cancel.is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed)) {
                    return Ok(None);
                }
                if l > 0 && b.record_hidden {
                    match host {
                        true => {
                            super::kernels::write_difference(&mut buffer, width, l - 1, &x, &b.x)?
                        }
                        false => parts.push((&x - &b.x)?),
                    }
                }
                let joined = refresh.map(|(est, j)| (est, l, j));
                x = layer.forward(&x, b, &target, &cache.layers[l], &ctx.layers[l], joined)?;
            }
            let hidden = match (b.record_hidden && width > 0, host) {
                (false, _) => None,
                (true, true) => Some(Tensor::from_vec(buffer, (n, width), &self.device)?),
                (true, false) => Some(Tensor::cat(&parts, 1)?),
            };
            Ok(Some(Forward { y: x, hidden }))
        };
        super::kernels::on_pool(&self.device, run)
    }

    /// Runs tokens `x` (`[n, dim]`, the patch embeddings of the tokens in `toks`) through
    /// every layer, one attention block against the keys/values of the blocks before it.
    /// `kv` receives the block's keys/values (for a subset, it must hold the block's
    /// earlier keys/values, which are updated at the processed tokens); `prefix` are the
    /// keys/values of the blocks this one attends to. A convenience over
    /// [`Transformer::forward_batch`] for tests and benchmarks (it copies the prefix).
    pub fn forward_layers(
        &self,
        x: &Tensor,
        modulation: &FrameModulation,
        toks: &TokenSet,
        kv: &mut Option<BlockKv>,
        prefix: Option<&BlockKv>,
        ctx: &Context,
    ) -> candle_core::Result<Tensor> {
        let pre = prefix.map_or(0, BlockKv::tokens);
        let own = match (&toks.idx, kv.as_ref()) {
            (None, _) => toks.len(),
            (Some(_), Some(k)) => k.tokens(),
            (Some(_), None) => candle_core::bail!(
                "selective forward of a block whose keys/values were never computed"
            ),
        };
        let cache = self.kv_cache(1, pre + own)?;
        if let Some(p) = prefix {
            cache.write(0, p)?;
        }
        if let (Some(_), Some(k)) = (&toks.idx, kv.as_ref()) {
            cache.write(pre, k)?;
        }
        let mut bb = BatchBuilder::default();
        bb.push(
            BatchItem {
                x: x.clone(),
                modulation,
                tokens: toks,
                branch: 0,
                first: pre,
                keys: 0..pre + own,
            },
            &cache,
            ctx.len(),
        )?;
        let y = self.forward_batch(&bb.build()?, &cache, ctx)?;
        *kv = Some(cache.read(pre, own)?);
        Ok(y)
    }

    /// FLOPs (multiply-adds x 2) of the transformer layers for `n` query tokens attending
    /// to `keys` self-attention keys and `text_len` context positions.
    pub fn layer_flops(&self, n: usize, keys: usize, text_len: usize) -> f64 {
        let d = self.cfg.dim() as f64;
        let n = n as f64;
        let per_layer = 2.0 * n * d * d * 4.0 // q, k, v, out
            + 2.0 * n * keys as f64 * d * 2.0 // scores and weighted sum
            + 2.0 * n * d * d * 2.0 // cross q, out
            + 2.0 * n * text_len as f64 * d * 2.0
            + 2.0 * n * d * self.cfg.ffn_dim as f64 * 2.0;
        per_layer * self.cfg.num_layers as f64
    }

    /// FLOPs of a [`KvRefresh`] of `n` tokens (key and value projections of every layer).
    pub fn refresh_flops(&self, n: usize) -> f64 {
        let d = self.cfg.dim() as f64;
        2.0 * n as f64 * d * d * 2.0 * self.cfg.num_layers as f64
    }
}

fn f32_linear(i: usize, o: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    let w = vb.get((o, i), "weight")?.to_dtype(DType::F32)?;
    let b = vb.get(o, "bias")?.to_dtype(DType::F32)?;
    Ok(Linear::new(w, Some(b)))
}
