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
//! - `html.unescape` is reproduced exactly for numeric references (including the HTML5
//!   replacements of invalid code points) and for the 252 HTML 4 named entities plus
//!   `&apos;` and the all-caps legacy `&AMP` `&LT` `&GT` `&QUOT` `&COPY` `&REG` (with
//!   HTML5's values); the other ~2,000 HTML5 names (`&check;`, `&NewLine;`, ...) are left
//!   as they are.
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
use tokenizers::{NormalizedString, PostProcessor, Tokenizer, TruncationDirection};

/// A tokenizer file that cannot be used, or a prompt that cannot be tokenized; always names
/// the file.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizerError {
    pub path: PathBuf,
    pub problem: String,
}

impl std::fmt::Display for TokenizerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "tokenizer {}: {}", self.path.display(), self.problem)
    }
}

impl std::error::Error for TokenizerError {}

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
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, TokenizerError> {
        let path = path.as_ref().to_path_buf();
        if !path.is_file() {
            return Err(TokenizerError {
                path,
                problem: "file not found".into(),
            });
        }
        let bytes = std::fs::read(&path).map_err(|e| TokenizerError {
            path: path.clone(),
            problem: format!("cannot read: {e}"),
        })?;
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
    ) -> Result<Self, TokenizerError> {
        let err = |problem: String| TokenizerError {
            path: path.clone(),
            problem,
        };
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
        Ok(Self {
            tokenizer,
            path,
            pad_id,
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
    pub fn encode(
        &self,
        prompts: &[&str],
        max_length: usize,
    ) -> Result<TokenizedPrompts, TokenizerError> {
        let cleaned: Vec<String> = prompts.iter().map(|p| prompt_clean(p)).collect();
        let refs: Vec<&str> = cleaned.iter().map(String::as_str).collect();
        self.encode_cleaned(&refs, max_length)
    }

    /// Tokenizes text as is: truncated so that it and the special tokens (EOS) fit in
    /// `max_length`, special tokens added by the file's post-processor, padded to
    /// `max_length`. An empty prompt gives just the special tokens.
    pub fn encode_cleaned(
        &self,
        prompts: &[&str],
        max_length: usize,
    ) -> Result<TokenizedPrompts, TokenizerError> {
        let err = |problem: String| TokenizerError {
            path: self.path.clone(),
            problem,
        };
        let n_special = self
            .tokenizer
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(false));
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
    ENTITIES
        .binary_search_by(|(n, _, _)| n.cmp(&name))
        .ok()
        .map(|i| (ENTITIES[i].1, ENTITIES[i].2))
}

/// Python's `html.unescape` (named references limited to the table, see module docs).
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
fn fix_text(text: &str) -> String {
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

/// (name, value, also valid without ';' in Python's html.unescape), sorted by name: the
/// HTML 4 entities plus `apos`, with HTML5's values.
#[rustfmt::skip]
const ENTITIES: &[(&str, &str, bool)] = &[
    ("AElig", "\u{c6}", true),
    ("AMP", "&", true),
    ("Aacute", "\u{c1}", true),
    ("Acirc", "\u{c2}", true),
    ("Agrave", "\u{c0}", true),
    ("Alpha", "\u{391}", false),
    ("Aring", "\u{c5}", true),
    ("Atilde", "\u{c3}", true),
    ("Auml", "\u{c4}", true),
    ("Beta", "\u{392}", false),
    ("COPY", "\u{a9}", true),
    ("Ccedil", "\u{c7}", true),
    ("Chi", "\u{3a7}", false),
    ("Dagger", "\u{2021}", false),
    ("Delta", "\u{394}", false),
    ("ETH", "\u{d0}", true),
    ("Eacute", "\u{c9}", true),
    ("Ecirc", "\u{ca}", true),
    ("Egrave", "\u{c8}", true),
    ("Epsilon", "\u{395}", false),
    ("Eta", "\u{397}", false),
    ("Euml", "\u{cb}", true),
    ("GT", ">", true),
    ("Gamma", "\u{393}", false),
    ("Iacute", "\u{cd}", true),
    ("Icirc", "\u{ce}", true),
    ("Igrave", "\u{cc}", true),
    ("Iota", "\u{399}", false),
    ("Iuml", "\u{cf}", true),
    ("Kappa", "\u{39a}", false),
    ("LT", "<", true),
    ("Lambda", "\u{39b}", false),
    ("Mu", "\u{39c}", false),
    ("Ntilde", "\u{d1}", true),
    ("Nu", "\u{39d}", false),
    ("OElig", "\u{152}", false),
    ("Oacute", "\u{d3}", true),
    ("Ocirc", "\u{d4}", true),
    ("Ograve", "\u{d2}", true),
    ("Omega", "\u{3a9}", false),
    ("Omicron", "\u{39f}", false),
    ("Oslash", "\u{d8}", true),
    ("Otilde", "\u{d5}", true),
    ("Ouml", "\u{d6}", true),
    ("Phi", "\u{3a6}", false),
    ("Pi", "\u{3a0}", false),
    ("Prime", "\u{2033}", false),
    ("Psi", "\u{3a8}", false),
    ("QUOT", "\u{22}", true),
    ("REG", "\u{ae}", true),
    ("Rho", "\u{3a1}", false),
    ("Scaron", "\u{160}", false),
    ("Sigma", "\u{3a3}", false),
    ("THORN", "\u{de}", true),
    ("Tau", "\u{3a4}", false),
    ("Theta", "\u{398}", false),
    ("Uacute", "\u{da}", true),
    ("Ucirc", "\u{db}", true),
    ("Ugrave", "\u{d9}", true),
    ("Upsilon", "\u{3a5}", false),
    ("Uuml", "\u{dc}", true),
    ("Xi", "\u{39e}", false),
    ("Yacute", "\u{dd}", true),
    ("Yuml", "\u{178}", false),
    ("Zeta", "\u{396}", false),
    ("aacute", "\u{e1}", true),
    ("acirc", "\u{e2}", true),
    ("acute", "\u{b4}", true),
    ("aelig", "\u{e6}", true),
    ("agrave", "\u{e0}", true),
    ("alefsym", "\u{2135}", false),
    ("alpha", "\u{3b1}", false),
    ("amp", "&", true),
    ("and", "\u{2227}", false),
    ("ang", "\u{2220}", false),
    ("apos", "'", false),
    ("aring", "\u{e5}", true),
    ("asymp", "\u{2248}", false),
    ("atilde", "\u{e3}", true),
    ("auml", "\u{e4}", true),
    ("bdquo", "\u{201e}", false),
    ("beta", "\u{3b2}", false),
    ("brvbar", "\u{a6}", true),
    ("bull", "\u{2022}", false),
    ("cap", "\u{2229}", false),
    ("ccedil", "\u{e7}", true),
    ("cedil", "\u{b8}", true),
    ("cent", "\u{a2}", true),
    ("chi", "\u{3c7}", false),
    ("circ", "\u{2c6}", false),
    ("clubs", "\u{2663}", false),
    ("cong", "\u{2245}", false),
    ("copy", "\u{a9}", true),
    ("crarr", "\u{21b5}", false),
    ("cup", "\u{222a}", false),
    ("curren", "\u{a4}", true),
    ("dArr", "\u{21d3}", false),
    ("dagger", "\u{2020}", false),
    ("darr", "\u{2193}", false),
    ("deg", "\u{b0}", true),
    ("delta", "\u{3b4}", false),
    ("diams", "\u{2666}", false),
    ("divide", "\u{f7}", true),
    ("eacute", "\u{e9}", true),
    ("ecirc", "\u{ea}", true),
    ("egrave", "\u{e8}", true),
    ("empty", "\u{2205}", false),
    ("emsp", "\u{2003}", false),
    ("ensp", "\u{2002}", false),
    ("epsilon", "\u{3b5}", false),
    ("equiv", "\u{2261}", false),
    ("eta", "\u{3b7}", false),
    ("eth", "\u{f0}", true),
    ("euml", "\u{eb}", true),
    ("euro", "\u{20ac}", false),
    ("exist", "\u{2203}", false),
    ("fnof", "\u{192}", false),
    ("forall", "\u{2200}", false),
    ("frac12", "\u{bd}", true),
    ("frac14", "\u{bc}", true),
    ("frac34", "\u{be}", true),
    ("frasl", "\u{2044}", false),
    ("gamma", "\u{3b3}", false),
    ("ge", "\u{2265}", false),
    ("gt", ">", true),
    ("hArr", "\u{21d4}", false),
    ("harr", "\u{2194}", false),
    ("hearts", "\u{2665}", false),
    ("hellip", "\u{2026}", false),
    ("iacute", "\u{ed}", true),
    ("icirc", "\u{ee}", true),
    ("iexcl", "\u{a1}", true),
    ("igrave", "\u{ec}", true),
    ("image", "\u{2111}", false),
    ("infin", "\u{221e}", false),
    ("int", "\u{222b}", false),
    ("iota", "\u{3b9}", false),
    ("iquest", "\u{bf}", true),
    ("isin", "\u{2208}", false),
    ("iuml", "\u{ef}", true),
    ("kappa", "\u{3ba}", false),
    ("lArr", "\u{21d0}", false),
    ("lambda", "\u{3bb}", false),
    ("lang", "\u{27e8}", false),
    ("laquo", "\u{ab}", true),
    ("larr", "\u{2190}", false),
    ("lceil", "\u{2308}", false),
    ("ldquo", "\u{201c}", false),
    ("le", "\u{2264}", false),
    ("lfloor", "\u{230a}", false),
    ("lowast", "\u{2217}", false),
    ("loz", "\u{25ca}", false),
    ("lrm", "\u{200e}", false),
    ("lsaquo", "\u{2039}", false),
    ("lsquo", "\u{2018}", false),
    ("lt", "<", true),
    ("macr", "\u{af}", true),
    ("mdash", "\u{2014}", false),
    ("micro", "\u{b5}", true),
    ("middot", "\u{b7}", true),
    ("minus", "\u{2212}", false),
    ("mu", "\u{3bc}", false),
    ("nabla", "\u{2207}", false),
    ("nbsp", "\u{a0}", true),
    ("ndash", "\u{2013}", false),
    ("ne", "\u{2260}", false),
    ("ni", "\u{220b}", false),
    ("not", "\u{ac}", true),
    ("notin", "\u{2209}", false),
    ("nsub", "\u{2284}", false),
    ("ntilde", "\u{f1}", true),
    ("nu", "\u{3bd}", false),
    ("oacute", "\u{f3}", true),
    ("ocirc", "\u{f4}", true),
    ("oelig", "\u{153}", false),
    ("ograve", "\u{f2}", true),
    ("oline", "\u{203e}", false),
    ("omega", "\u{3c9}", false),
    ("omicron", "\u{3bf}", false),
    ("oplus", "\u{2295}", false),
    ("or", "\u{2228}", false),
    ("ordf", "\u{aa}", true),
    ("ordm", "\u{ba}", true),
    ("oslash", "\u{f8}", true),
    ("otilde", "\u{f5}", true),
    ("otimes", "\u{2297}", false),
    ("ouml", "\u{f6}", true),
    ("para", "\u{b6}", true),
    ("part", "\u{2202}", false),
    ("permil", "\u{2030}", false),
    ("perp", "\u{22a5}", false),
    ("phi", "\u{3c6}", false),
    ("pi", "\u{3c0}", false),
    ("piv", "\u{3d6}", false),
    ("plusmn", "\u{b1}", true),
    ("pound", "\u{a3}", true),
    ("prime", "\u{2032}", false),
    ("prod", "\u{220f}", false),
    ("prop", "\u{221d}", false),
    ("psi", "\u{3c8}", false),
    ("quot", "\u{22}", true),
    ("rArr", "\u{21d2}", false),
    ("radic", "\u{221a}", false),
    ("rang", "\u{27e9}", false),
    ("raquo", "\u{bb}", true),
    ("rarr", "\u{2192}", false),
    ("rceil", "\u{2309}", false),
    ("rdquo", "\u{201d}", false),
    ("real", "\u{211c}", false),
    ("reg", "\u{ae}", true),
    ("rfloor", "\u{230b}", false),
    ("rho", "\u{3c1}", false),
    ("rlm", "\u{200f}", false),
    ("rsaquo", "\u{203a}", false),
    ("rsquo", "\u{2019}", false),
    ("sbquo", "\u{201a}", false),
    ("scaron", "\u{161}", false),
    ("sdot", "\u{22c5}", false),
    ("sect", "\u{a7}", true),
    ("shy", "\u{ad}", true),
    ("sigma", "\u{3c3}", false),
    ("sigmaf", "\u{3c2}", false),
    ("sim", "\u{223c}", false),
    ("spades", "\u{2660}", false),
    ("sub", "\u{2282}", false),
    ("sube", "\u{2286}", false),
    ("sum", "\u{2211}", false),
    ("sup", "\u{2283}", false),
    ("sup1", "\u{b9}", true),
    ("sup2", "\u{b2}", true),
    ("sup3", "\u{b3}", true),
    ("supe", "\u{2287}", false),
    ("szlig", "\u{df}", true),
    ("tau", "\u{3c4}", false),
    ("there4", "\u{2234}", false),
    ("theta", "\u{3b8}", false),
    ("thetasym", "\u{3d1}", false),
    ("thinsp", "\u{2009}", false),
    ("thorn", "\u{fe}", true),
    ("tilde", "\u{2dc}", false),
    ("times", "\u{d7}", true),
    ("trade", "\u{2122}", false),
    ("uArr", "\u{21d1}", false),
    ("uacute", "\u{fa}", true),
    ("uarr", "\u{2191}", false),
    ("ucirc", "\u{fb}", true),
    ("ugrave", "\u{f9}", true),
    ("uml", "\u{a8}", true),
    ("upsih", "\u{3d2}", false),
    ("upsilon", "\u{3c5}", false),
    ("uuml", "\u{fc}", true),
    ("weierp", "\u{2118}", false),
    ("xi", "\u{3be}", false),
    ("yacute", "\u{fd}", true),
    ("yen", "\u{a5}", true),
    ("yuml", "\u{ff}", true),
    ("zeta", "\u{3b6}", false),
    ("zwj", "\u{200d}", false),
    ("zwnj", "\u{200c}", false),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entity_table_is_sorted_for_binary_search() {
        assert!(ENTITIES.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(lookup_entity("amp"), Some(("&", true)));
        assert_eq!(lookup_entity("hellip"), Some(("\u{2026}", false)));
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
