//! Prompt tokenizer over any `tokenizer.json` (through the `tokenizers` crate) and the
//! reference prompt cleaning.
//!
//! Tokenization follows what diffusers' SkyReels-V2 / Wan pipelines ask of the HF tokenizer:
//! `padding="max_length", truncation=True, add_special_tokens=True`: the text is cut so that
//! it plus the post-processor's special tokens (umT5: one `</s>`) fit `max_length`, the
//! post-processor appends them, then `pad` ids with mask 0 fill up to `max_length`.
//!
//! Prompt cleaning is diffusers' `prompt_clean` (the same as SkyReels-V2's
//! `HuggingfaceTokenizer(clean="whitespace")`):
//! `whitespace_clean(basic_clean(text))` with
//! `basic_clean = strip(html.unescape(html.unescape(ftfy.fix_text(text))))`.
//! - `html.unescape` is reproduced exactly: numeric references (including the HTML5
//!   replacements of invalid code points, and Python's removal of the code points HTML5
//!   calls invalid) here; named references from the WHATWG table of the `htmlize` crate
//!   (all 2,231 names, as Python's `html.entities.html5`).
//!   Legacy names without `;` (`&amp`, `&copy`, `&eacute`, ...) and the longest-prefix rule
//!   (`&ampx` -> `&x`) are as in Python.
//! - `ftfy.fix_text` (default configuration) is covered for: its own HTML unescape (entities
//!   ending in `;`, skipped from the first line that contains `<` on, all-caps variants such
//!   as `&EACUTE;`), C1 control characters read as Windows-1252, Latin ligatures, fullwidth
//!   and halfwidth forms, curly quotes, line breaks, ANSI terminal escapes, removal of
//!   control characters and NFC normalisation, repeated to a fixed point per line as ftfy
//!   does. Not covered: ftfy's mojibake repair (`fix_encoding`: text decoded with the wrong
//!   codec, e.g. `Ã©` for `é`), which needs its charset heuristics; such text is left as is.
//! - whitespace: Python's `\s` / `str.strip` set (Unicode White_Space plus U+001C..U+001F).

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::error::Error;
use tokenizers::{ModelWrapper, NormalizedString, PostProcessor, Tokenizer, TruncationDirection};

/// Token ids and attention masks of a batch of prompts, each padded to the same length.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedPrompts {
    /// `[B][max_length]`
    pub input_ids: Vec<Vec<u32>>,
    /// `[B][max_length]`, 1 for real tokens (EOS included), 0 for padding.
    pub attention_mask: Vec<Vec<u32>>,
}

impl TokenizedPrompts {
    /// Number of real tokens of each prompt (`mask.sum(1)` in the reference).
    pub fn seq_lens(&self) -> Vec<usize> {
        self.attention_mask
            .iter()
            .map(|m| m.iter().filter(|&&v| v > 0).count())
            .collect()
    }

    /// `(input_ids, attention_mask)` as `[B, max_length]` u32 tensors.
    pub fn to_tensors(&self, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
        let b = self.input_ids.len();
        let l = self.input_ids.first().map_or(0, Vec::len);
        let ids: Vec<u32> = self.input_ids.iter().flatten().copied().collect();
        let mask: Vec<u32> = self.attention_mask.iter().flatten().copied().collect();
        if ids.len() != b * l || mask.len() != b * l {
            candle_core::bail!("tokenized prompts of unequal lengths (batch {b}, length {l})");
        }
        Ok((
            Tensor::from_vec(ids, (b, l), device)?,
            Tensor::from_vec(mask, (b, l), device)?,
        ))
    }
}

/// A `tokenizers` tokenizer with the reference pipelines' cleaning, truncation, EOS and
/// padding.
#[derive(Clone)]
pub struct PromptTokenizer {
    tokenizer: Tokenizer,
    path: PathBuf,
    pad_id: u32,
    /// The id words outside the vocabulary become, if the vocabulary has one.
    unk_id: Option<u32>,
}

/// What of a prompt a model does not read (see [`PromptTokenizer::coverage`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PromptCoverage {
    /// Words of the read part that the vocabulary lacks, read as its unknown token:
    /// distinct, in prompt order, as they stand in the cleaned prompt.
    pub unknown: Vec<String>,
    /// Text tokens read (special tokens aside).
    pub read: usize,
    /// The text past the length, which is cut (`None`: all of it is read).
    pub cut: Option<String>,
}

impl PromptCoverage {
    /// Whether the model reads every word of the prompt.
    pub fn complete(&self) -> bool {
        self.unknown.is_empty() && self.cut.is_none()
    }
}

impl std::fmt::Debug for PromptTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromptTokenizer")
            .field("path", &self.path)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

impl PromptTokenizer {
    /// Loads a `tokenizer.json`. The padding id is the id of the `pad_token` of a
    /// `tokenizer_config.json` next to it if there is one, else of `<pad>`, else the
    /// file's own padding id, else 0. Truncation and padding stored in the file are ignored
    /// (transformers overrides them per call, as [`PromptTokenizer::encode`] does).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref().to_path_buf();
        if !path.is_file() {
            return Err(Error::model(path, "tokenizer file not found"));
        }
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let config = path
            .parent()
            .map(|dir| dir.join("tokenizer_config.json"))
            .and_then(|p| std::fs::read_to_string(p).ok());
        Self::from_bytes(&bytes, config.as_deref(), path)
    }

    /// A `tokenizer.json` held in memory (with its `tokenizer_config.json`, if any);
    /// `path` only names it in errors.
    pub fn from_bytes(
        bytes: &[u8],
        tokenizer_config: Option<&str>,
        path: PathBuf,
    ) -> Result<Self, Error> {
        let err = |problem: String| Error::model(&path, problem);
        let mut tokenizer = Tokenizer::from_bytes(bytes)
            .map_err(|e| err(format!("not a valid tokenizer.json: {e}")))?;
        let file_pad_id = tokenizer.get_padding().map(|p| p.pad_id);
        let config_pad = tokenizer_config
            .and_then(|text| serde_json::from_str::<serde_json::Value>(text).ok())
            .and_then(|cfg| match cfg.get("pad_token") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(obj) => obj.get("content")?.as_str().map(str::to_string),
                None => None,
            })
            .and_then(|tok| tokenizer.token_to_id(&tok));
        let pad_id = config_pad
            .or_else(|| tokenizer.token_to_id("<pad>"))
            .or(file_pad_id)
            .unwrap_or(0);
        tokenizer
            .with_truncation(None)
            .map_err(|e| err(format!("cannot reset truncation: {e}")))?;
        tokenizer.with_padding(None);
        // Unigram models (SentencePiece, as T5's) do not expose their unknown piece; it is
        // `<unk>` in T5's and in every tokenizer.json transformers converts from one.
        let unk_id = match tokenizer.get_model() {
            ModelWrapper::WordLevel(m) => tokenizer.token_to_id(&m.unk_token),
            ModelWrapper::BPE(m) => m
                .get_unk_token()
                .as_ref()
                .and_then(|t| tokenizer.token_to_id(t)),
            _ => tokenizer.token_to_id("<unk>"),
        };
        Ok(Self {
            tokenizer,
            path,
            pad_id,
            unk_id,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The underlying `tokenizers` tokenizer (truncation and padding unset).
    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Cleans each prompt with [`prompt_clean`] and tokenizes it as
    /// [`PromptTokenizer::encode_cleaned`] does.
    pub fn encode(&self, prompts: &[&str], max_length: usize) -> Result<TokenizedPrompts, Error> {
        let cleaned: Vec<String> = prompts.iter().map(|p| prompt_clean(p)).collect();
        let refs: Vec<&str> = cleaned.iter().map(String::as_str).collect();
        self.encode_cleaned(&refs, max_length)
    }

    /// What the model does not read of `cleaned` (text already cleaned as
    /// [`PromptTokenizer::encode_cleaned`] takes it) at `max_length`: the words its
    /// vocabulary lacks, and the text cut to make room for the special tokens.
    pub fn coverage(&self, cleaned: &str, max_length: usize) -> Result<PromptCoverage, Error> {
        let enc = self
            .tokenizer
            .encode(cleaned, false)
            .map_err(|e| Error::model(&self.path, format!("cannot tokenize {cleaned:?}: {e}")))?;
        let keep = max_length.saturating_sub(self.special_tokens());
        let (ids, offsets) = (enc.get_ids(), enc.get_offsets());
        // A token's word: its text widened to the letters and digits around it (a
        // SentencePiece unknown piece can be one character of a word).
        let word = |(a, b): (usize, usize)| -> Option<&str> {
            let text = cleaned.get(a..b)?;
            let alnum = |c: Option<char>| c.is_some_and(char::is_alphanumeric);
            let (mut start, mut end) = (a, b);
            if alnum(text.chars().next()) {
                while let Some(c) = cleaned[..start]
                    .chars()
                    .next_back()
                    .filter(|&c| alnum(Some(c)))
                {
                    start -= c.len_utf8();
                }
            }
            if alnum(text.chars().next_back()) {
                while let Some(c) = cleaned[end..].chars().next().filter(|&c| alnum(Some(c))) {
                    end += c.len_utf8();
                }
            }
            Some(cleaned[start..end].trim()).filter(|w| !w.is_empty())
        };
        let mut unknown: Vec<String> = Vec::new();
        for (&id, &span) in ids.iter().zip(offsets).take(keep) {
            if Some(id) != self.unk_id {
                continue;
            }
            if let Some(w) = word(span).filter(|w| !unknown.iter().any(|u| u == w)) {
                unknown.push(w.to_string());
            }
        }
        let cut = offsets
            .get(keep)
            .and_then(|&(a, _)| cleaned.get(a..))
            .map(|rest| rest.trim().to_string());
        Ok(PromptCoverage {
            unknown,
            read: ids.len().min(keep),
            cut,
        })
    }

    /// Special tokens the post-processor adds to a prompt (umT5: one `</s>`).
    fn special_tokens(&self) -> usize {
        self.tokenizer
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(false))
    }

    /// Tokenizes text as is: truncated so that it and the special tokens (EOS) fit in
    /// `max_length`, special tokens added by the file's post-processor, padded to
    /// `max_length`. An empty prompt gives just the special tokens.
    pub fn encode_cleaned(
        &self,
        prompts: &[&str],
        max_length: usize,
    ) -> Result<TokenizedPrompts, Error> {
        let err = |problem: String| Error::model(&self.path, problem);
        let n_special = self.special_tokens();
        if max_length <= n_special {
            return Err(err(format!(
                "max_length {max_length} leaves no room beside {n_special} special token(s)"
            )));
        }
        let mut input_ids = Vec::with_capacity(prompts.len());
        let mut attention_mask = Vec::with_capacity(prompts.len());
        for prompt in prompts {
            let mut enc = self
                .tokenizer
                .encode(*prompt, false)
                .map_err(|e| err(format!("cannot tokenize {prompt:?}: {e}")))?;
            enc.truncate(max_length - n_special, 0, TruncationDirection::Right);
            let enc = self
                .tokenizer
                .post_process(enc, None, true)
                .map_err(|e| err(format!("cannot add special tokens to {prompt:?}: {e}")))?;
            let mut ids = enc.get_ids().to_vec();
            // A post-processor adding more than it declares must not overflow max_length.
            ids.truncate(max_length);
            let n = ids.len();
            ids.resize(max_length, self.pad_id);
            let mut mask = vec![1u32; n];
            mask.resize(max_length, 0);
            input_ids.push(ids);
            attention_mask.push(mask);
        }
        Ok(TokenizedPrompts {
            input_ids,
            attention_mask,
        })
    }
}

/// diffusers' `prompt_clean`: ftfy (the part described in the module docs), HTML unescape
/// twice, whitespace runs to one space, stripped.
pub fn prompt_clean(text: &str) -> String {
    let text = fix_text(text);
    let text = html_unescape(&html_unescape(&text));
    let mut out = String::with_capacity(text.len());
    for word in text.split(is_py_space).filter(|w| !w.is_empty()) {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
    out
}

/// Python's `str.isspace` (what `\s` and `strip()` match on `str`).
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

fn lookup_entity(name: &str) -> Option<(&'static str, bool)> {
    // WHATWG's table (what Python's `html.entities.html5` holds), keyed `&name;`, with
    // the legacy names also keyed `&name` (valid without the `;`).
    let value = htmlize::ENTITIES.get(format!("&{name};").as_bytes())?;
    let legacy = htmlize::ENTITIES.contains_key(format!("&{name}").as_bytes());
    Some((std::str::from_utf8(value).ok()?, legacy))
}

/// Python's `html.unescape`.
pub fn html_unescape(text: &str) -> String {
    if !text.contains('&') {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find('&') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        match unescape_reference(after) {
            Some((replacement, consumed)) => {
                out.push_str(&replacement);
                rest = &after[consumed..];
            }
            None => {
                out.push('&');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// One reference after an `&`: the replacement and the number of bytes it consumed, or
/// `None` where Python's pattern does not match (the `&` stays).
fn unescape_reference(s: &str) -> Option<(String, usize)> {
    let bytes = s.as_bytes();
    if bytes.first() == Some(&b'#') {
        let (radix, start) = match bytes.get(1) {
            Some(b'x' | b'X') if bytes.get(2).is_some_and(u8::is_ascii_hexdigit) => (16, 2),
            Some(c) if c.is_ascii_digit() => (10, 1),
            _ => return None,
        };
        let digits = s[start..]
            .bytes()
            .take_while(|c| {
                if radix == 16 {
                    c.is_ascii_hexdigit()
                } else {
                    c.is_ascii_digit()
                }
            })
            .count();
        let mut end = start + digits;
        if bytes.get(end) == Some(&b';') {
            end += 1;
        }
        let num = u32::from_str_radix(&s[start..start + digits], radix).unwrap_or(u32::MAX);
        return Some((numeric_reference(num), end));
    }
    // `[^\t\n\f <&#;]{1,32};?`
    let mut name_end = 0;
    for (count, (i, c)) in s.char_indices().enumerate() {
        if count == 32 || matches!(c, '\t' | '\n' | '\u{c}' | ' ' | '<' | '&' | '#' | ';') {
            break;
        }
        name_end = i + c.len_utf8();
    }
    if name_end == 0 {
        return None;
    }
    let name = &s[..name_end];
    if s[name_end..].starts_with(';') {
        if let Some((value, _)) = lookup_entity(name) {
            return Some((value.to_string(), name_end + 1));
        }
    } else if let Some((value, true)) = lookup_entity(name) {
        return Some((value.to_string(), name_end));
    }
    // Longest legacy (semicolon-free) name that prefixes the run, at least 2 characters.
    let mut ends: Vec<usize> = name.char_indices().map(|(i, _)| i).skip(2).collect();
    ends.reverse();
    for end in ends {
        if let Some((value, true)) = lookup_entity(&name[..end]) {
            return Some((value.to_string(), end));
        }
    }
    None
}

fn numeric_reference(num: u32) -> String {
    match num {
        0 => '\u{fffd}'.to_string(),
        0x0d => '\r'.to_string(),
        0x80..=0x9f => CP1252_C1[(num - 0x80) as usize].to_string(),
        0xd800..=0xdfff => '\u{fffd}'.to_string(),
        n if n > 0x10ffff => '\u{fffd}'.to_string(),
        0x1..=0x8 | 0xb | 0xe..=0x1f | 0x7f | 0xfdd0..=0xfdef => String::new(),
        n if n & 0xfffe == 0xfffe => String::new(),
        n => char::from_u32(n).map_or_else(String::new, |c| c.to_string()),
    }
}

/// ftfy's HTML unescape: only `&#?[0-9A-Za-z]{1,24};`.
fn ftfy_unescape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find('&') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        let body_start = usize::from(after.starts_with('#'));
        let run = after[body_start..]
            .bytes()
            .take_while(u8::is_ascii_alphanumeric)
            .count();
        let end = body_start + run;
        if run == 0 || run > 24 || !after[end..].starts_with(';') {
            out.push('&');
            rest = after;
            continue;
        }
        let entity = &rest[pos..pos + 1 + end + 1];
        out.push_str(&ftfy_entity(entity, &after[..end]));
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
}

/// `entity` is `&...;`, `body` the part between `&` and `;`.
fn ftfy_entity(entity: &str, body: &str) -> String {
    if body.starts_with('#') {
        let unescaped = html_unescape(entity);
        // A partly decoded reference (`&#12ab;`) is kept whole.
        return if unescaped.contains(';') {
            entity.to_string()
        } else {
            unescaped
        };
    }
    if let Some((value, _)) = lookup_entity(body) {
        return value.to_string();
    }
    // All-caps spelling of a lower-case name, unless Python would read it otherwise.
    let lower = body.to_ascii_lowercase();
    if lower.to_ascii_uppercase() == body
        && let Some((value, _)) = lookup_entity(&lower)
        && html_unescape(entity) == entity
    {
        return value.to_uppercase();
    }
    entity.to_string()
}

fn fix_c1_controls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\u{80}'..='\u{9f}' => out.push(CP1252_C1[c as usize - 0x80]),
            _ => out.push(c),
        }
    }
    out
}

fn fix_latin_ligatures(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let rep = match c {
            '\u{132}' => "IJ",
            '\u{133}' => "ij",
            '\u{149}' => "\u{2bc}n",
            '\u{1f1}' => "DZ",
            '\u{1f2}' => "Dz",
            '\u{1f3}' => "dz",
            '\u{1c4}' => "D\u{17d}",
            '\u{1c5}' => "D\u{17e}",
            '\u{1c6}' => "d\u{17e}",
            '\u{1c7}' => "LJ",
            '\u{1c8}' => "Lj",
            '\u{1c9}' => "lj",
            '\u{1ca}' => "NJ",
            '\u{1cb}' => "Nj",
            '\u{1cc}' => "nj",
            '\u{fb00}' => "ff",
            '\u{fb01}' => "fi",
            '\u{fb02}' => "fl",
            '\u{fb03}' => "ffi",
            '\u{fb04}' => "ffl",
            '\u{fb05}' => "\u{17f}t",
            '\u{fb06}' => "st",
            _ => {
                out.push(c);
                continue;
            }
        };
        out.push_str(rep);
    }
    out
}

fn fix_character_width(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\u{3000}' => out.push(' '),
            '\u{ff01}'..='\u{ffef}' => {
                let mut n = NormalizedString::from(c.to_string().as_str());
                n.nfkc();
                out.push_str(n.get());
            }
            _ => out.push(c),
        }
    }
    out
}

fn uncurl_quotes(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '\u{2bc}' | '\u{2018}'..='\u{201b}' => '\'',
            '\u{201c}'..='\u{201f}' => '"',
            c => c,
        })
        .collect()
}

fn fix_line_breaks(text: &str) -> String {
    text.replace("\r\n", "\n")
        .replace(['\r', '\u{2028}', '\u{2029}', '\u{85}'], "\n")
}

/// `\x1b\[[0-9;]*[a-zA-Z]` removed.
fn remove_terminal_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find("\u{1b}[") {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 2..];
        let params = after
            .bytes()
            .take_while(|b| b.is_ascii_digit() || *b == b';')
            .count();
        if after[params..].starts_with(|c: char| c.is_ascii_alphabetic()) {
            rest = &after[params + 1..];
        } else {
            out.push('\u{1b}');
            rest = &rest[pos + 1..];
        }
    }
    out.push_str(rest);
    out
}

fn remove_control_chars(text: &str) -> String {
    text.chars()
        .filter(|&c| {
            !matches!(c,
                '\u{0}'..='\u{8}' | '\u{b}' | '\u{e}'..='\u{1f}' | '\u{7f}'
                | '\u{206a}'..='\u{206f}' | '\u{feff}' | '\u{fff9}'..='\u{fffc}')
        })
        .collect()
}

fn nfc(text: &str) -> String {
    let mut n = NormalizedString::from(text);
    n.nfc();
    n.get().to_string()
}

/// The covered part of `ftfy.fix_text` (see the module docs): per line, the fixers in ftfy's
/// order, repeated until nothing changes.
pub(crate) fn fix_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    // ftfy turns HTML unescaping off for the rest of the text at the first line with a '<'.
    let mut unescape = true;
    for segment in text.split_inclusive('\n') {
        if segment.contains('<') {
            unescape = false;
        }
        let mut seg = segment.to_string();
        loop {
            let before = seg.clone();
            if unescape {
                seg = ftfy_unescape_html(&seg);
            }
            seg = fix_c1_controls(&seg);
            seg = fix_latin_ligatures(&seg);
            seg = fix_character_width(&seg);
            seg = uncurl_quotes(&seg);
            seg = fix_line_breaks(&seg);
            seg = remove_terminal_escapes(&seg);
            seg = remove_control_chars(&seg);
            seg = nfc(&seg);
            if seg == before {
                break;
            }
        }
        out.push_str(&seg);
    }
    out
}

/// Windows-1252 reading of U+0080..U+009F (undefined bytes map to themselves), used by both
/// Python's numeric references and ftfy's C1 fix.
const CP1252_C1: [char; 32] = [
    '\u{20ac}', '\u{81}', '\u{201a}', '\u{192}', '\u{201e}', '\u{2026}', '\u{2020}', '\u{2021}',
    '\u{2c6}', '\u{2030}', '\u{160}', '\u{2039}', '\u{152}', '\u{8d}', '\u{17d}', '\u{8f}',
    '\u{90}', '\u{2018}', '\u{2019}', '\u{201c}', '\u{201d}', '\u{2022}', '\u{2013}', '\u{2014}',
    '\u{2dc}', '\u{2122}', '\u{161}', '\u{203a}', '\u{153}', '\u{9d}', '\u{17e}', '\u{178}',
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_references_as_python() {
        assert_eq!(lookup_entity("amp"), Some(("&", true)));
        assert_eq!(lookup_entity("hellip"), Some(("\u{2026}", false)));
        // HTML5 names beyond HTML 4, as in Python's html.entities.html5.
        assert_eq!(
            html_unescape("&check; &NewLine;&AMP &ampx"),
            "\u{2713} \n& &x"
        );
    }

    #[test]
    fn whitespace_and_escapes() {
        assert_eq!(prompt_clean("  a\u{1c}b\u{3000}c\u{a0} "), "ab c");
        assert_eq!(
            remove_terminal_escapes("\u{1b}[1;31mx\u{1b}[y\u{1b}[1"),
            "x\u{1b}[1"
        );
        assert_eq!(html_unescape("&#x110000;&#65;&#X41"), "\u{fffd}AA");
    }
}
