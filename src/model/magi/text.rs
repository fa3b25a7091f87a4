//! MAGI-1's text path before the DiT: the T5 v1.1 tokenizer read from a SentencePiece
//! `spiece.model` (the published `t5-v1_1-xxl` folder has no `tokenizer.json`), and the
//! special-token prefix upstream puts in front of each chunk's caption
//! (`inference/pipeline/prompt_process.py`, `pad_special_token`).
//!
//! The encoder itself is [`crate::model::t5::T5Encoder`] (T5 v1.1: one relative-position
//! bias table, in layer 0), run in f32 on `max_length` 800 padded ids; upstream keeps the
//! whole padded `last_hidden_state` (no zeroing after the real tokens) with the mask.
//!
//! Not here: upstream's caption cleaning (`T5Embedder.clean_caption` from DeepFloyd IF,
//! applied twice: URL-unquote, lowercase, ftfy, BeautifulSoup, many regexes); the caller
//! must pass text already cleaned that way.

use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::Precompiled;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

use crate::error::{Error, Result};
use crate::model::tokenizer::PromptTokenizer;

/// `caption_max_length` of MAGI-1: T5 ids per caption, and caption length after the prefix.
pub const CAPTION_MAX_LENGTH: usize = 800;

// ---------------------------------------------------------------------------------------
// SentencePiece model (protobuf)
// ---------------------------------------------------------------------------------------

/// Type of a SentencePiece piece (`ModelProto.SentencePiece.Type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl PieceType {
    fn from_proto(v: u64) -> Self {
        match v {
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Normal,
        }
    }
}

/// The parts of a SentencePiece `ModelProto` a T5 tokenizer needs.
#[derive(Debug, Clone, PartialEq)]
pub struct SentencePieceModel {
    /// `(piece, score, type)` in id order.
    pub pieces: Vec<(String, f32, PieceType)>,
    /// `trainer_spec.model_type`: 1 unigram, 2 BPE, 3 word, 4 char.
    pub model_type: u64,
    /// `trainer_spec.unk_id` (else the id of the UNKNOWN piece).
    pub unk_id: usize,
    pub byte_fallback: bool,
    /// `normalizer_spec.precompiled_charsmap` (the compiled `nmt_nfkc` rules for T5).
    pub precompiled_charsmap: Vec<u8>,
    pub add_dummy_prefix: bool,
    pub remove_extra_whitespaces: bool,
}

/// A protobuf wire value.
enum Wire<'a> {
    Varint(u64),
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32(u32),
}

/// Minimal protobuf reader: a message as (field number, wire value) pairs.
struct Proto<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Proto<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn varint(&mut self) -> std::result::Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self
                .buf
                .get(self.pos)
                .ok_or("truncated varint at the end of a message")?;
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(format!("varint longer than 10 bytes at byte {}", self.pos))
    }

    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| format!("field of {n} bytes runs past the end at byte {}", self.pos))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn next_field(&mut self) -> std::result::Result<Option<(u64, Wire<'a>)>, String> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let value = match key & 7 {
            0 => Wire::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Wire::Fixed64
            }
            2 => {
                let n = usize::try_from(self.varint()?).map_err(|e| e.to_string())?;
                Wire::Bytes(self.take(n)?)
            }
            5 => {
                let b = self.take(4)?;
                Wire::Fixed32(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            w => return Err(format!("unsupported protobuf wire type {w}")),
        };
        Ok(Some((key >> 3, value)))
    }
}

impl SentencePieceModel {
    /// Reads a `.model` file (serialized `ModelProto`); errors name the file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if !path.is_file() {
            return Err(Error::model(path, "SentencePiece model not found"));
        }
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(&bytes)
            .map_err(|e| Error::model(path, format!("not a SentencePiece model (ModelProto): {e}")))
    }

    /// Parses a serialized `ModelProto`.
    pub fn from_bytes(bytes: &[u8]) -> std::result::Result<Self, String> {
        let mut pieces = Vec::new();
        let mut model_type = 1;
        let mut unk_id = None;
        let mut byte_fallback = false;
        let mut precompiled_charsmap = Vec::new();
        let mut add_dummy_prefix = true;
        let mut remove_extra_whitespaces = true;
        let mut msg = Proto::new(bytes);
        while let Some((field, value)) = msg.next_field()? {
            match (field, value) {
                (1, Wire::Bytes(piece_msg)) => {
                    let (mut piece, mut score, mut ty) = (None, 0f32, PieceType::Normal);
                    let mut p = Proto::new(piece_msg);
                    while let Some((f, v)) = p.next_field()? {
                        match (f, v) {
                            (1, Wire::Bytes(s)) => {
                                piece = Some(
                                    String::from_utf8(s.to_vec())
                                        .map_err(|e| format!("piece {}: {e}", pieces.len()))?,
                                )
                            }
                            (2, Wire::Fixed32(bits)) => score = f32::from_bits(bits),
                            (3, Wire::Varint(t)) => ty = PieceType::from_proto(t),
                            _ => {}
                        }
                    }
                    let piece =
                        piece.ok_or_else(|| format!("piece {} has no text", pieces.len()))?;
                    pieces.push((piece, score, ty));
                }
                (2, Wire::Bytes(trainer)) => {
                    let mut p = Proto::new(trainer);
                    while let Some((f, v)) = p.next_field()? {
                        match (f, v) {
                            (3, Wire::Varint(t)) => model_type = t,
                            (35, Wire::Varint(b)) => byte_fallback = b != 0,
                            (40, Wire::Varint(id)) => unk_id = Some(id as usize),
                            _ => {}
                        }
                    }
                }
                (3, Wire::Bytes(normalizer)) => {
                    let mut p = Proto::new(normalizer);
                    while let Some((f, v)) = p.next_field()? {
                        match (f, v) {
                            (2, Wire::Bytes(map)) => precompiled_charsmap = map.to_vec(),
                            (3, Wire::Varint(b)) => add_dummy_prefix = b != 0,
                            (4, Wire::Varint(b)) => remove_extra_whitespaces = b != 0,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        if pieces.is_empty() {
            return Err("no pieces".into());
        }
        let unk_id = unk_id
            .or_else(|| pieces.iter().position(|p| p.2 == PieceType::Unknown))
            .unwrap_or(0);
        if unk_id >= pieces.len() {
            return Err(format!(
                "unk_id {unk_id} outside the {} pieces",
                pieces.len()
            ));
        }
        Ok(Self {
            pieces,
            model_type,
            unk_id,
            byte_fallback,
            precompiled_charsmap,
            add_dummy_prefix,
            remove_extra_whitespaces,
        })
    }

    pub fn piece_to_id(&self, piece: &str) -> Option<u32> {
        self.pieces
            .iter()
            .position(|p| p.0 == piece)
            .map(|i| i as u32)
    }
}

/// Builds T5's tokenizer from a SentencePiece model as transformers' `T5Tokenizer` does: a
/// Unigram model over the pieces and their scores (unk = the model's unk id), followed by
/// `extra_ids` sentinels `<extra_id_{extra_ids-1}>` .. `<extra_id_0>` (score 0, so
/// `<extra_id_0>` has the last id: 32099 for t5-v1_1-xxl with 100); the model's
/// precompiled normalizer (`nmt_nfkc`); whitespace split then Metaspace (`▁`, prepended to
/// every word); `</s>` appended. `<pad>`, `</s>`, `<unk>` and the sentinels are special
/// added tokens (matched whole in the text, as transformers does). Only unigram models
/// without byte fallback are supported (T5's).
pub fn t5_tokenizer_from_spm(
    spm: &SentencePieceModel,
    extra_ids: usize,
) -> std::result::Result<Tokenizer, String> {
    if spm.model_type != 1 {
        return Err(format!(
            "SentencePiece model type {} is not unigram (1)",
            spm.model_type
        ));
    }
    if spm.byte_fallback {
        return Err("SentencePiece byte fallback is not supported".into());
    }
    let mut vocab: Vec<(String, f64)> = spm
        .pieces
        .iter()
        .map(|(p, s, _)| (p.clone(), f64::from(*s)))
        .collect();
    vocab.extend(
        (0..extra_ids)
            .rev()
            .map(|i| (format!("<extra_id_{i}>"), 0.0)),
    );
    let unigram =
        Unigram::from(vocab, Some(spm.unk_id), false).map_err(|e| format!("unigram: {e}"))?;
    let mut tokenizer = Tokenizer::new(unigram);
    if !spm.precompiled_charsmap.is_empty() {
        let norm = Precompiled::from(&spm.precompiled_charsmap)
            .map_err(|e| format!("precompiled_charsmap: {e}"))?;
        tokenizer
            .with_normalizer(Some(norm))
            .map_err(|e| format!("normalizer: {e}"))?;
    }
    tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
        PreTokenizerWrapper::WhitespaceSplit(WhitespaceSplit),
        PreTokenizerWrapper::Metaspace(Metaspace::new('▁', PrependScheme::Always, true)),
    ])));
    let eos_id = spm
        .piece_to_id("</s>")
        .ok_or("the model has no </s> piece")?;
    let post = TemplateProcessing::builder()
        .try_single("$A </s>")
        .map_err(|e| format!("template: {e}"))?
        .try_pair("$A </s> $B </s>")
        .map_err(|e| format!("template: {e}"))?
        .special_tokens(vec![("</s>".to_string(), eos_id)])
        .build()
        .map_err(|e| format!("template: {e}"))?;
    tokenizer.with_post_processor(Some(post));
    let mut specials: Vec<AddedToken> = ["<pad>", "</s>", "<unk>"]
        .iter()
        .filter(|t| spm.piece_to_id(t).is_some())
        .map(|t| AddedToken::from(*t, true))
        .collect();
    specials.extend((0..extra_ids).map(|i| AddedToken::from(format!("<extra_id_{i}>"), true)));
    tokenizer
        .add_special_tokens(specials)
        .map_err(|e| format!("special tokens: {e}"))?;
    Ok(tokenizer)
}

/// MAGI-1's tokenizer from a T5 folder's `spiece.model` (100 sentinels, as DeepFloyd's
/// `tokenizer_config.json` says): a [`PromptTokenizer`] whose `encode_cleaned(prompts, 800)`
/// gives upstream's ids and mask (truncation to 799 + `</s>`, padding with `<pad>` = 0).
/// Use `encode_cleaned`: `PromptTokenizer::encode` applies SkyReels' cleaning, not MAGI-1's.
/// Errors name the file.
pub fn load_t5_tokenizer(spiece_model: impl AsRef<Path>) -> Result<PromptTokenizer> {
    let path = spiece_model.as_ref();
    let spm = SentencePieceModel::from_file(path)?;
    let tokenizer = t5_tokenizer_from_spm(&spm, 100)
        .map_err(|e| Error::model(path, format!("cannot build the T5 tokenizer: {e}")))?;
    let json = tokenizer
        .to_string(false)
        .map_err(|e| Error::model(path, format!("cannot serialise the T5 tokenizer: {e}")))?;
    PromptTokenizer::from_bytes(json.as_bytes(), None, path.to_path_buf())
}

// ---------------------------------------------------------------------------------------
// Special tokens
// ---------------------------------------------------------------------------------------

/// The special-token table of upstream's `example/assets/special_tokens.npz`
/// (`caption_token` [1, D], `logo_token` [1, D], `other_tokens` [100, D], f64), rounded to
/// f16 and held in f32 as upstream does (`.astype(np.float16)`, then `.to(txt_feat.dtype)`).
/// Rows of `other_tokens` used here: 1 = HQ_TOKEN, 7..=14 = DURATION_TOKEN_1..=8 (upstream:
/// "DURATION_TOKEN_N represents N chunk(s) remain in the future"; see [`pad_special_tokens`]).
#[derive(Debug, Clone)]
pub struct SpecialTokens {
    /// `other_tokens`, `[N, D]` f32 (f16-rounded).
    pub other_tokens: Tensor,
}

/// Index of HQ_TOKEN in `other_tokens`.
const HQ_ROW: usize = 1;
/// Index of DURATION_TOKEN_1 in `other_tokens` (DURATION_TOKEN_k at `6 + k`).
const DURATION_ROW0: usize = 7;

impl SpecialTokens {
    /// `other_tokens` `[N >= 15, D]` in any float dtype (f64 as stored upstream); rounds it to
    /// f16 as upstream does.
    pub fn new(other_tokens: &Tensor, device: &Device) -> candle_core::Result<Self> {
        let (n, _) = other_tokens.dims2()?;
        if n < DURATION_ROW0 + 8 {
            candle_core::bail!("special tokens: other_tokens has {n} rows, need at least 15");
        }
        let other_tokens = other_tokens
            .to_dtype(DType::F16)?
            .to_dtype(DType::F32)?
            .to_device(device)?;
        Ok(Self { other_tokens })
    }

    /// Reads `other_tokens` from upstream's `special_tokens.npz` (a stored, uncompressed zip
    /// of `.npy` files, as `np.savez` writes it); errors name the file.
    pub fn from_npz(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let path = path.as_ref();
        let t = read_npz_array(path, "other_tokens")?;
        Self::new(&t, device)
            .map_err(|e| Error::model(path, format!("invalid special tokens: {e}")))
    }
}

/// upstream `pad_special_token` with `PAD_HQ=1` and `PAD_DURATION=1` (run.sh), for one
/// caption: `caption` `[L, D]` (the T5 output, all `L` padded positions), `mask` `[L]`
/// (any dtype, 1 real / 0 padding). Chunk `i` of `num_chunks` gets
/// `[DURATION_k, HQ, caption...]` cut to [`CAPTION_MAX_LENGTH`] positions with
/// `k = min(num_chunks - i, 8)` (upstream: `DURATION_TOKEN_LIST[min(num_chunks - i - 1, 7)]`),
/// and the mask `[1, 1, mask...]` cut likewise. Returns `([C, min(L + 2, 800), D]` f32,
/// `[C, min(L + 2, 800)]` f32).
///
/// `num_chunks` is upstream's `infer_chunk_num - clean_chunk_num` (the chunks that use the
/// caption); the clean prefix chunks in front use the null caption with mask 0.
pub fn pad_special_tokens(
    caption: &Tensor,
    mask: &Tensor,
    table: &SpecialTokens,
    num_chunks: usize,
) -> candle_core::Result<(Tensor, Tensor)> {
    let mut embs = Vec::with_capacity(num_chunks);
    let mut masks = Vec::with_capacity(num_chunks);
    for i in 0..num_chunks {
        let (e, m) = pad_special_tokens_chunk(caption, mask, table, num_chunks - i)?;
        embs.push(e);
        masks.push(m);
    }
    Ok((Tensor::stack(&embs, 0)?, Tensor::stack(&masks, 0)?))
}

/// [`pad_special_tokens`] for one chunk with `left` chunks left in the video, itself
/// included (DURATION_k with `k = min(left, 8)`): `([min(L + 2, 800), D]` f32,
/// `[min(L + 2, 800)]` f32`)`.
pub fn pad_special_tokens_chunk(
    caption: &Tensor,
    mask: &Tensor,
    table: &SpecialTokens,
    left: usize,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (l, d) = caption.dims2()?;
    let (_, td) = table.other_tokens.dims2()?;
    if td != d {
        candle_core::bail!("special tokens have width {td}, the caption {d}");
    }
    if mask.dims() != [l] {
        candle_core::bail!("mask shape {:?} for a caption of {l}", mask.shape());
    }
    if left == 0 {
        candle_core::bail!("a chunk with no chunk left");
    }
    let dev = caption.device();
    let caption = caption.to_dtype(DType::F32)?;
    let mask = mask.to_dtype(DType::F32)?.to_device(dev)?;
    let other = table.other_tokens.to_device(dev)?;
    let keep = (l + 2).min(CAPTION_MAX_LENGTH);
    // HQ first, then DURATION, each followed by the cut to 800.
    let hq_len = (l + 1).min(CAPTION_MAX_LENGTH);
    let with_hq =
        Tensor::cat(&[&other.narrow(0, HQ_ROW, 1)?, &caption], 0)?.narrow(0, 0, hq_len)?;
    let ones = Tensor::ones(1, DType::F32, dev)?;
    let mask_hq = Tensor::cat(&[&ones, &mask], 0)?.narrow(0, 0, hq_len)?;
    let mask_full = Tensor::cat(&[&ones, &mask_hq], 0)?.narrow(0, 0, keep)?;
    let k = (left - 1).min(7);
    let dur = other.narrow(0, DURATION_ROW0 + k, 1)?;
    Ok((
        Tensor::cat(&[&dur, &with_hq], 0)?.narrow(0, 0, keep)?,
        mask_full,
    ))
}

// ---------------------------------------------------------------------------------------
// .npz (stored zip of .npy)
// ---------------------------------------------------------------------------------------

/// Reads array `name` (`name.npy` in the archive) of an uncompressed `.npz` as a tensor on
/// the CPU (f64 / f32 / f16 / i64 / i32 / u8, little-endian, C order). Deflated archives
/// (`np.savez_compressed`) are refused: convert them with `np.savez`.
pub fn read_npz_array(path: &Path, name: &str) -> Result<Tensor> {
    let err = |m: String| Error::model(path, m);
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    let entry = format!("{name}.npy");
    let data = zip_stored_entry(&bytes, &entry).map_err(|m| err(format!("{entry}: {m}")))?;
    parse_npy(data).map_err(|m| err(format!("{entry}: {m}")))
}

fn le16(b: &[u8], at: usize) -> std::result::Result<usize, String> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]) as usize)
        .ok_or_else(|| "truncated zip".to_string())
}

fn le32(b: &[u8], at: usize) -> std::result::Result<usize, String> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]) as usize)
        .ok_or_else(|| "truncated zip".to_string())
}

/// Walks the local file headers of a zip and returns the data of the stored entry `name`.
fn zip_stored_entry<'a>(b: &'a [u8], name: &str) -> std::result::Result<&'a [u8], String> {
    let mut pos = 0;
    while b.get(pos..pos + 4) == Some(&[0x50, 0x4b, 0x03, 0x04]) {
        let flags = le16(b, pos + 6)?;
        let method = le16(b, pos + 8)?;
        let mut csize = le32(b, pos + 18)?;
        let name_len = le16(b, pos + 26)?;
        let extra_len = le16(b, pos + 28)?;
        let fname = b
            .get(pos + 30..pos + 30 + name_len)
            .ok_or("truncated zip")?;
        let extra = b
            .get(pos + 30 + name_len..pos + 30 + name_len + extra_len)
            .ok_or("truncated zip")?;
        if csize == 0xffff_ffff {
            // zip64 extra field: header 0x0001, then uncompressed and compressed sizes.
            let mut e = 0;
            while e + 4 <= extra.len() {
                let (id, len) = (le16(extra, e)?, le16(extra, e + 2)?);
                if id == 1 && len >= 16 {
                    let s = extra.get(e + 12..e + 20).ok_or("truncated zip64 field")?;
                    csize = u64::from_le_bytes(s.try_into().map_err(|_| "zip64")?) as usize;
                }
                e += 4 + len;
            }
        }
        if flags & 0x8 != 0 {
            return Err("zip entries with data descriptors are not supported".into());
        }
        let start = pos + 30 + name_len + extra_len;
        if fname == name.as_bytes() {
            if method != 0 {
                return Err(format!(
                    "compressed (method {method}); only np.savez (stored) archives are read"
                ));
            }
            return b
                .get(start..start + csize)
                .ok_or_else(|| "truncated entry".to_string());
        }
        pos = start + csize;
    }
    Err("no such array in the archive".into())
}

/// A `.npy` file (format 1.0 / 2.0 / 3.0) as a CPU tensor.
fn parse_npy(b: &[u8]) -> std::result::Result<Tensor, String> {
    if b.get(..6) != Some(b"\x93NUMPY") {
        return Err("not a .npy array".into());
    }
    let major = *b.get(6).ok_or("truncated .npy")?;
    let (hlen, hstart) = if major == 1 {
        (le16(b, 8)?, 10)
    } else {
        (le32(b, 8)?, 12)
    };
    let header = std::str::from_utf8(b.get(hstart..hstart + hlen).ok_or("truncated .npy")?)
        .map_err(|e| e.to_string())?;
    let field = |key: &str| -> std::result::Result<&str, String> {
        let at = header
            .find(&format!("'{key}':"))
            .ok_or_else(|| format!("header has no {key}"))?;
        Ok(header[at + key.len() + 3..].trim_start())
    };
    let descr = field("descr")?;
    let descr = descr
        .strip_prefix('\'')
        .and_then(|s| s.split('\'').next())
        .ok_or("bad descr")?;
    if field("fortran_order")?.starts_with("True") {
        return Err("Fortran-order arrays are not supported".into());
    }
    let shape_text = field("shape")?;
    let shape_text = shape_text
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or("bad shape")?;
    let shape: Vec<usize> = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|e| format!("shape: {e}")))
        .collect::<std::result::Result<_, _>>()?;
    let data = &b[hstart + hlen..];
    let count: usize = shape.iter().product();
    let (dtype, size) = match descr {
        "<f8" => (DType::F64, 8),
        "<f4" => (DType::F32, 4),
        "<f2" => (DType::F16, 2),
        "<i8" => (DType::I64, 8),
        "<i4" => (DType::I32, 4),
        "|u1" => (DType::U8, 1),
        other => return Err(format!("unsupported dtype {other}")),
    };
    let data = data
        .get(..count * size)
        .ok_or("array data shorter than its shape")?;
    Tensor::from_raw_buffer(data, dtype, &shape, &Device::Cpu).map_err(|e| e.to_string())
}

/// Path of upstream's special-token table in a MAGI-1 checkout.
pub fn special_tokens_path(magi_checkout: &Path) -> PathBuf {
    magi_checkout.join("example/assets/special_tokens.npz")
}
