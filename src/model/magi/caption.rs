//! MAGI-1's prompt cleaning: upstream's `T5Embedder.text_preprocessing`
//! (SandAI-org/MAGI-1 `inference/model/t5/t5_model.py`), which runs DeepFloyd IF's
//! `clean_caption` twice on every prompt before the T5 tokenizer.
//!
//! [`clean_caption`] follows upstream line by line, in upstream's order:
//! 1. `urllib.parse.unquote_plus`: `+` to space, then `%XX` escapes decoded in each run of
//!    ASCII characters and the bytes read as UTF-8 (invalid sequences become U+FFFD, one per
//!    maximal invalid subsequence, as Python's `errors="replace"`); invalid escapes are kept.
//! 2. `strip().lower()`: Python's whitespace set; full Unicode lower case (final sigma too).
//! 3. `<person>` -> `person`.
//! 4. The two URL patterns (`https?:` / `www:` followed by slashes or one character, or a
//!    dotted host name ending in com|co|ru|net|org|edu|gov|it with its path), removed.
//! 5. `BeautifulSoup(caption, "html.parser").text`: see below.
//! 6. `@nickname` removed; the CJK blocks U+31C0..U+9FFF removed (upstream's seven ranges
//!    are contiguous); all kinds of dash runs to `-`; `` ` ´ « » “ ” ¨ `` to `"`, `‘ ’` to `'`;
//!    `&quot;` / `&quot` and `&amp` removed; IP addresses to a space; an `N:NN` followed by
//!    trailing whitespace removed ("article ids"); a literal backslash-`n` to a space;
//!    `#123` and `#12345...` (whole numbers) removed; numbers of 6 or more digits removed;
//!    file names (`\S+.png|jpg|...`) removed; runs of 2+ quotes to `"`, of 2+ dots to a space;
//!    runs of `bad_punct_regex` characters (`#®•©™&@·º½¾¿¡§~)(][}{|\/*`) to a space;
//!    ` . ` to a space; more than three `-`/`_` in all: each to a space.
//! 7. `basic_clean`: `ftfy.fix_text`, `html.unescape` twice, strip. ftfy is the partial port
//!    of [`crate::model::tokenizer`] (everything but ftfy's mojibake repair, see there);
//!    `html.unescape` is that module's exact port.
//! 8. The lettered/numbered code patterns (`jc6640`, `jc6640vc`, `6640vc231`,
//!    `j2d1a2a...`), "(worldwide) (free) shipping", "(free) download (free)",
//!    `click for|on <word>`, image-extension words (with ` image(s)`), `page N`, sizes such as
//!    `1920x1080` / `12.5x7.5` (`x`, Cyrillic `х` or `×`) removed; ` : ` to `: `; a space
//!    after `,` `.` `/` that follow a non-digit and precede a word character; whitespace runs
//!    to one space; one pair of enclosing quotes dropped; one leading `'_,-:;` and one
//!    trailing `'_,-:+` dropped; a lone `.word` emptied; stripped.
//!
//! Regular expressions: the patterns without look-arounds or `\b` run on the `regex` crate,
//! written with Python's classes (`\s` is Unicode White_Space plus U+001C..U+001F, `\d` is
//! Unicode Nd, as in the `regex` crate; `$` at the very end is `\z`, the text holding no
//! newline where it matters). The patterns with `\b` or look-arounds run on a small
//! backtracking matcher (`Node`) that tries the alternatives and repetitions in the order
//! Python's `re` does, with Python's `\w` (`[\p{L}\p{N}_]`, checked against every code point
//! of Python's tables) for `\b`; `re.sub` is reproduced by trying each start position in
//! turn and resuming after each match.
//!
//! `BeautifulSoup(..., "html.parser").text` is a port of what it does on a string, checked
//! against Python 3.11's `html.parser` and beautifulsoup4 4.15:
//! - the tokenizer is `html.parser.HTMLParser.goahead` with `convert_charrefs=False`, run once
//!   as `feed` (stopping at the first incomplete construct) and once as `close` (which turns
//!   an unterminated construct into text up to the next `>` or `<`, and the rest of the
//!   buffer into text after a dangling `&`/`&#`), with its start-tag, end-tag, comment
//!   (`<!-- -->`), bogus-comment, processing-instruction, doctype and marked-section
//!   (`<![CDATA[...]]>`) scanners; a start tag whose attributes leave junk before its `>` is
//!   text; `<script>` / `<style>` contents are raw text up to their end tag (dropped when it
//!   never comes);
//! - character references as bs4 reads them: `&name` (up to a non-alphanumeric character,
//!   its `;` consumed) from the HTML5 table (`htmlize`), an unknown name kept as `&name`
//!   without its `;`; `&#N` / `&#xH` with 0, surrogates and values past U+10FFFF as U+FFFD
//!   and 0x80..0x9F read as Windows-1252;
//! - the tree: strings inside `<script>`, `<style>`, `<template>`, `<rt>`, `<rp>` (as long as
//!   that tag is open, including nested tags), comments, doctypes, declarations and
//!   processing instructions are left out of `.text`; CDATA sections are kept; end tags close
//!   up to the most recent open tag of that name (others are ignored), void elements close
//!   at once (an explicit `</br>` after `<br>` is then skipped); a string of ASCII
//!   whitespace only between two tag events becomes one `\n` (if it holds one) or one space,
//!   except inside `<pre>` / `<textarea>`.
//!
//! Known divergences: markup that makes bs4 raise `ParserRejectedMarkup` (a `<![` not
//! followed by a name, or a marked section other than temp/cdata/ignore/include/rcdata/
//! if/else/endif) makes upstream fail; here the text then goes through that step unchanged.
//! ftfy's mojibake repair is not ported (see [`crate::model::tokenizer`]). Characters
//! assigned after Unicode 14 (Python 3.11's tables) may classify differently.

use std::sync::LazyLock;

use regex::Regex;

use crate::model::tokenizer::{fix_text, html_unescape};

/// A `regex::Regex` compiled once, in place.
macro_rules! re {
    ($pat:expr) => {{
        static RE: LazyLock<Regex> = LazyLock::new(|| Regex::new($pat).expect("valid pattern"));
        &*RE
    }};
}

/// The inside of a character class for Python's `\s` on `str` (`str.isspace`).
macro_rules! py_s {
    () => {
        r"\s\x1C-\x1F"
    };
}

/// Upstream's `T5Embedder.text_preprocessing` with `use_text_preprocessing=True`:
/// [`clean_caption`] applied twice ("the exact text cleaning as was in the training stage").
pub fn text_preprocessing(text: &str) -> String {
    clean_caption(&clean_caption(text))
}

/// DeepFloyd IF's `clean_caption` as MAGI-1 runs it (see the module docs).
pub fn clean_caption(caption: &str) -> String {
    let c = unquote_plus(caption);
    let c = py_strip(&c).to_lowercase();
    let c = c.replace("<person>", "person");
    // urls:
    let c = py_sub(&c, &URL_HTTP, |_| String::new());
    let c = py_sub(&c, &URL_WWW, |_| String::new());
    // html:
    let c = html_text(&c);
    // @<nickname>
    let c = py_sub(&c, &NICKNAME, |_| String::new());
    // CJK strokes .. CJK unified ideographs (31C0-31EF, 31F0-31FF, 3200-32FF, 3300-33FF,
    // 3400-4DBF, 4DC0-4DFF, 4E00-9FFF).
    let c: String = c
        .chars()
        .filter(|ch| !('\u{31c0}'..='\u{9fff}').contains(ch))
        .collect();
    // all types of dash --> "-"
    let c = re!(
        r"[\u002D\u058A\u05BE\u1400\u1806\u2010-\u2015\u2E17\u2E1A\u2E3A\u2E3B\u2E40\u301C\u3030\u30A0\uFE31\uFE32\uFE58\uFE63\uFF0D]+"
    )
    .replace_all(&c, "-");
    // quotes to one standard
    let c = re!("[`´«»“”¨]").replace_all(&c, "\"");
    let c = re!("[‘’]").replace_all(&c, "'");
    // &quot; / &amp
    let c = re!("&quot;?").replace_all(&c, "");
    let c = c.replace("&amp", "");
    // ip addresses:
    let c = re!(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}").replace_all(&c, " ");
    // article ids:
    let c = re!(concat!(r"\d:\d\d[", py_s!(), r"]+\z")).replace_all(&c, "");
    // \n (a backslash and an n)
    let c = c.replace("\\n", " ");
    // "#123", "#12345..", "123456.."
    let c = py_sub(&c, &HASH_SHORT, |_| String::new());
    let c = py_sub(&c, &HASH_LONG, |_| String::new());
    let c = py_sub(&c, &LONG_NUMBER, |_| String::new());
    // filenames:
    let c = re!(concat!(
        r"[^",
        py_s!(),
        r"]+\.(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)"
    ))
    .replace_all(&c, "");
    // """AUSVERKAUFT"""
    let c = re!(r#"["']{2,}"#).replace_all(&c, "\"");
    let c = re!(r"\.{2,}").replace_all(&c, " ");
    // bad_punct_regex: ***AUSVERKAUFT***, #AUSVERKAUFT
    let c = re!(r"[#®•©™&@·º½¾¿¡§~)(\]\[}{|\\/*]+").replace_all(&c, " ");
    // " . "
    let c = re!(concat!("[", py_s!(), r"]+\.[", py_s!(), "]+")).replace_all(&c, " ");
    // this-is-my-cute-cat / this_is_my_cute_cat
    let c = if c.chars().filter(|&ch| ch == '-' || ch == '_').count() > 3 {
        c.replace(['-', '_'], " ")
    } else {
        c.into_owned()
    };

    let c = basic_clean(&c);

    let c = py_sub(&c, &CODE_SHORT, |_| String::new()); // jc6640
    let c = py_sub(&c, &CODE_LETTERS, |_| String::new()); // jc6640vc
    let c = py_sub(&c, &CODE_DIGITS, |_| String::new()); // 6640vc231

    let c = re!(concat!(
        "(worldwide[",
        py_s!(),
        "]+)?(free[",
        py_s!(),
        "]+)?shipping"
    ))
    .replace_all(&c, "");
    let c = re!(concat!(
        "(free[",
        py_s!(),
        "])?download([",
        py_s!(),
        "]free)?"
    ))
    .replace_all(&c, "");
    let c = py_sub(&c, &CLICK, |_| String::new());
    let c = py_sub(&c, &IMAGE_WORD, |_| String::new());
    let c = py_sub(&c, &PAGE, |_| String::new());

    let c = py_sub(&c, &CODE_MIXED, |_| " ".to_string()); // j2d1a2a...

    let c = py_sub(&c, &SIZE, |_| String::new());

    let c = py_sub(&c, &SPACED_COLON, |_| ": ".to_string());
    let c = py_sub(&c, &PUNCT_BEFORE_WORD, |m| {
        let mut s: String = m.iter().collect();
        s.push(' ');
        s
    });
    let c = re!(concat!("[", py_s!(), "]+")).replace_all(&c, " ");

    let c = re!(r#"(?s)\A["'](.+)["']\z"#).replace_all(&c, "$1");
    let c = re!(r"\A['_,\-:;]").replace_all(&c, "");
    let c = re!(r"['_,\-:+]\z").replace_all(&c, "");
    let c = re!(concat!(r"\A\.[^", py_s!(), r"]+\z")).replace_all(&c, "");

    py_strip(&c).to_string()
}

/// Upstream's `basic_clean`: `ftfy.fix_text`, `html.unescape` twice, strip.
fn basic_clean(text: &str) -> String {
    let text = fix_text(text);
    let text = html_unescape(&html_unescape(&text));
    py_strip(&text).to_string()
}

/// Python's `str.isspace`.
fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

fn py_strip(text: &str) -> &str {
    text.trim_matches(py_space)
}

fn class_match(re: &Regex, c: char) -> bool {
    let mut buf = [0u8; 4];
    re.is_match(c.encode_utf8(&mut buf))
}

/// Python's `\w` on `str`: letters, numbers (any `N` category) and `_`.
fn py_word(c: char) -> bool {
    if c.is_ascii() {
        c.is_ascii_alphanumeric() || c == '_'
    } else {
        class_match(re!(r"\A[\p{L}\p{N}]\z"), c)
    }
}

/// Python's `\d` on `str`: Unicode decimal digits (Nd).
fn py_digit(c: char) -> bool {
    if c.is_ascii() {
        c.is_ascii_digit()
    } else {
        class_match(re!(r"\A\p{Nd}\z"), c)
    }
}

fn ascii_alpha(c: char) -> bool {
    c.is_ascii_alphabetic()
}

/// `urllib.parse.unquote_plus` (UTF-8, `errors="replace"`).
fn unquote_plus(text: &str) -> String {
    let text = text.replace('+', " ");
    if !text.contains('%') {
        return text;
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while !rest.is_empty() {
        // Each ASCII run is unquoted to bytes and decoded; other text is kept as is.
        let ascii = rest.bytes().take_while(u8::is_ascii).count();
        if ascii > 0 {
            out.push_str(&String::from_utf8_lossy(&unquote_to_bytes(&rest[..ascii])));
            rest = &rest[ascii..];
        }
        let other = rest.find(|c: char| c.is_ascii()).unwrap_or(rest.len());
        out.push_str(&rest[..other]);
        rest = &rest[other..];
    }
    out
}

fn unquote_to_bytes(text: &str) -> Vec<u8> {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let (Some(hi), Some(lo)) = (b.get(i + 1), b.get(i + 2))
            && let (Some(hi), Some(lo)) = ((*hi as char).to_digit(16), (*lo as char).to_digit(16))
        {
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// A small backtracking matcher with Python `re`'s order of trying things.
// ---------------------------------------------------------------------------------------

/// One element of a pattern (a sequence is a `[Node]`).
enum Node {
    /// One character of a set.
    Set(fn(char) -> bool),
    /// One character, judged with what surrounds it (`t`, its index).
    At(fn(&[char], usize) -> bool),
    /// A literal.
    Lit(&'static str),
    /// Greedy repetition `{min,max}` of a sequence.
    Rep(Vec<Node>, usize, usize),
    /// Alternatives, tried in order.
    Alt(Vec<Vec<Node>>),
    /// `(?<=[...])`: the previous character is in the set.
    Behind(fn(char) -> bool),
    /// `(?!...)`.
    NotAhead(Vec<Node>),
    /// `\b` with Python's `\w`.
    Boundary,
}

const MANY: usize = usize::MAX;

fn set(f: fn(char) -> bool) -> Node {
    Node::Set(f)
}

fn lit(s: &'static str) -> Node {
    Node::Lit(s)
}

fn rep(f: fn(char) -> bool, min: usize, max: usize) -> Node {
    Node::Rep(vec![Node::Set(f)], min, max)
}

fn star(f: fn(char) -> bool) -> Node {
    rep(f, 0, MANY)
}

fn plus(f: fn(char) -> bool) -> Node {
    rep(f, 1, MANY)
}

fn opt(seq: Vec<Node>) -> Node {
    Node::Rep(seq, 0, 1)
}

fn alt_lits(words: &[&'static str]) -> Node {
    Node::Alt(words.iter().map(|w| vec![lit(w)]).collect())
}

fn at_boundary(t: &[char], i: usize) -> bool {
    let before = i > 0 && py_word(t[i - 1]);
    let after = i < t.len() && py_word(t[i]);
    before != after
}

/// Matches `p` at `i`, then calls `k` with the end; backtracks while `k` refuses.
fn seq(p: &[Node], t: &[char], i: usize, k: &mut dyn FnMut(usize) -> bool) -> bool {
    let Some((node, rest)) = p.split_first() else {
        return k(i);
    };
    match node {
        Node::Set(f) => i < t.len() && f(t[i]) && seq(rest, t, i + 1, k),
        Node::At(f) => i < t.len() && f(t, i) && seq(rest, t, i + 1, k),
        Node::Lit(s) => starts(t, i, s) && seq(rest, t, i + s.chars().count(), k),
        Node::Rep(body, min, max) => {
            // One character at a time: the longest run, then shorter ones.
            let run = match body.as_slice() {
                [Node::Set(f)] => Some(t[i..].iter().take(*max).take_while(|&&c| f(c)).count()),
                [Node::At(f)] => Some((i..t.len()).take(*max).take_while(|&j| f(t, j)).count()),
                _ => None,
            };
            if let Some(run) = run {
                run >= *min && (*min..=run).rev().any(|n| seq(rest, t, i + n, k))
            } else {
                repeat(body, (*min, *max), 0, rest, t, i, k)
            }
        }
        Node::Alt(alts) => alts
            .iter()
            .any(|a| seq(a, t, i, &mut |j| seq(rest, t, j, k))),
        Node::Behind(f) => i > 0 && f(t[i - 1]) && seq(rest, t, i, k),
        Node::NotAhead(body) => !seq(body, t, i, &mut |_| true) && seq(rest, t, i, k),
        Node::Boundary => at_boundary(t, i) && seq(rest, t, i, k),
    }
}

fn repeat(
    body: &[Node],
    (min, max): (usize, usize),
    count: usize,
    rest: &[Node],
    t: &[char],
    i: usize,
    k: &mut dyn FnMut(usize) -> bool,
) -> bool {
    if count < max
        && seq(body, t, i, &mut |j| {
            j > i && repeat(body, (min, max), count + 1, rest, t, j, k)
        })
    {
        return true;
    }
    count >= min && seq(rest, t, i, k)
}

/// `re.match(p, t, pos=i)`: the end of the match.
fn match_at(p: &[Node], t: &[char], i: usize) -> Option<usize> {
    let mut end = None;
    seq(p, t, i, &mut |j| {
        end = Some(j);
        true
    });
    end
}

/// `re.search(p, t, pos=i)`: start and end of the leftmost match.
fn search(p: &[Node], t: &[char], i: usize) -> Option<(usize, usize)> {
    (i..=t.len()).find_map(|s| match_at(p, t, s).map(|e| (s, e)))
}

/// `re.sub(p, repl, text)` for patterns that never match the empty string.
fn py_sub(text: &str, p: &[Node], repl: impl Fn(&[char]) -> String) -> String {
    let t: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let (mut last, mut i) = (0, 0);
    while let Some((s, e)) = search(p, &t, i) {
        debug_assert!(e > s, "empty match");
        out.extend(&t[last..s]);
        out.push_str(&repl(&t[s..e]));
        last = e;
        i = e.max(s + 1);
    }
    out.extend(&t[last..]);
    out
}

const TLDS: [&str; 8] = ["com", "co", "ru", "net", "org", "edu", "gov", "it"];
const IMAGE_EXTS: [&str; 9] = [
    "png", "jpg", "jpeg", "bmp", "webp", "eps", "pdf", "apk", "mp4",
];

/// `\b((?:<scheme>(?:\/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)))`
fn url_pattern(scheme: Vec<Node>) -> Vec<Node> {
    let mut first = scheme;
    first.push(Node::Alt(vec![
        vec![rep(|c| c == '/', 1, 3)],
        vec![set(|c| c.is_ascii_alphanumeric() || c == '%')],
    ]));
    let host = vec![
        plus(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-'),
        lit("."),
        alt_lits(&TLDS),
        star(|c| py_word(c) || c == '/' || c == '-'),
        Node::Boundary,
        opt(vec![lit("/")]),
        Node::NotAhead(vec![lit("@")]),
    ];
    vec![Node::Boundary, Node::Alt(vec![first, host])]
}

static URL_HTTP: LazyLock<Vec<Node>> =
    LazyLock::new(|| url_pattern(vec![lit("http"), opt(vec![lit("s")]), lit(":")]));
static URL_WWW: LazyLock<Vec<Node>> = LazyLock::new(|| url_pattern(vec![lit("www:")]));
/// `@[\w\d]+\b`
static NICKNAME: LazyLock<Vec<Node>> =
    LazyLock::new(|| vec![lit("@"), plus(py_word), Node::Boundary]);
/// `#\d{1,3}\b`
static HASH_SHORT: LazyLock<Vec<Node>> =
    LazyLock::new(|| vec![lit("#"), rep(py_digit, 1, 3), Node::Boundary]);
/// `#\d{5,}\b`
static HASH_LONG: LazyLock<Vec<Node>> =
    LazyLock::new(|| vec![lit("#"), rep(py_digit, 5, MANY), Node::Boundary]);
/// `\b\d{6,}\b`
static LONG_NUMBER: LazyLock<Vec<Node>> =
    LazyLock::new(|| vec![Node::Boundary, rep(py_digit, 6, MANY), Node::Boundary]);
/// `\b[a-zA-Z]{1,3}\d{3,15}\b`
static CODE_SHORT: LazyLock<Vec<Node>> = LazyLock::new(|| {
    vec![
        Node::Boundary,
        rep(ascii_alpha, 1, 3),
        rep(py_digit, 3, 15),
        Node::Boundary,
    ]
});
/// `\b[a-zA-Z]+\d+[a-zA-Z]+\b`
static CODE_LETTERS: LazyLock<Vec<Node>> = LazyLock::new(|| {
    vec![
        Node::Boundary,
        plus(ascii_alpha),
        plus(py_digit),
        plus(ascii_alpha),
        Node::Boundary,
    ]
});
/// `\b\d+[a-zA-Z]+\d+\b`
static CODE_DIGITS: LazyLock<Vec<Node>> = LazyLock::new(|| {
    vec![
        Node::Boundary,
        plus(py_digit),
        plus(ascii_alpha),
        plus(py_digit),
        Node::Boundary,
    ]
});
/// `\bclick\b\s(?:for|on)\s\w+`
static CLICK: LazyLock<Vec<Node>> = LazyLock::new(|| {
    vec![
        Node::Boundary,
        lit("click"),
        Node::Boundary,
        set(py_space),
        alt_lits(&["for", "on"]),
        set(py_space),
        plus(py_word),
    ]
});
/// `\b(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)(\simage[s]?)?`
static IMAGE_WORD: LazyLock<Vec<Node>> = LazyLock::new(|| {
    vec![
        Node::Boundary,
        alt_lits(&IMAGE_EXTS),
        opt(vec![set(py_space), lit("image"), opt(vec![lit("s")])]),
    ]
});
/// `\bpage\s+\d+\b`
static PAGE: LazyLock<Vec<Node>> = LazyLock::new(|| {
    vec![
        Node::Boundary,
        lit("page"),
        plus(py_space),
        plus(py_digit),
        Node::Boundary,
    ]
});
/// `\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b`
static CODE_MIXED: LazyLock<Vec<Node>> = LazyLock::new(|| {
    vec![
        Node::Boundary,
        star(py_digit),
        plus(ascii_alpha),
        plus(py_digit),
        plus(ascii_alpha),
        plus(py_digit),
        star(|c| c.is_ascii_alphabetic() || py_digit(c)),
        Node::Boundary,
    ]
});
/// `\b\d+\.?\d*[xх×]\d+\.?\d*\b`
static SIZE: LazyLock<Vec<Node>> = LazyLock::new(|| {
    vec![
        Node::Boundary,
        plus(py_digit),
        opt(vec![lit(".")]),
        star(py_digit),
        set(|c| matches!(c, 'x' | '\u{445}' | '\u{d7}')),
        plus(py_digit),
        opt(vec![lit(".")]),
        star(py_digit),
        Node::Boundary,
    ]
});
/// `\b\s+\:\s+`
static SPACED_COLON: LazyLock<Vec<Node>> =
    LazyLock::new(|| vec![Node::Boundary, plus(py_space), lit(":"), plus(py_space)]);
/// `(\D[,\./])\b`
static PUNCT_BEFORE_WORD: LazyLock<Vec<Node>> = LazyLock::new(|| {
    vec![
        set(|c| !py_digit(c)),
        set(|c| matches!(c, ',' | '.' | '/')),
        Node::Boundary,
    ]
});

// ---------------------------------------------------------------------------------------
// BeautifulSoup(text, "html.parser").text
// ---------------------------------------------------------------------------------------

/// The parser gave up (bs4 raises `ParserRejectedMarkup`).
struct Rejected;

/// `BeautifulSoup(text, features="html.parser").text` (see the module docs); markup bs4
/// rejects goes through unchanged.
fn html_text(text: &str) -> String {
    let mut parser = HtmlParser {
        raw: text.chars().collect(),
        cdata_elem: None,
        soup: Soup::default(),
    };
    if parser.goahead(false).is_err() || parser.goahead(true).is_err() {
        return text.to_string();
    }
    let mut soup = parser.soup;
    soup.end_data(StringKind::Plain);
    soup.text
}

/// The class a string gets in bs4's tree: `.text` keeps `NavigableString` and `CData`.
#[derive(Clone, Copy, PartialEq)]
enum StringKind {
    Plain,
    CData,
    /// Comment, Doctype, Declaration, ProcessingInstruction.
    Hidden,
}

const VOID_TAGS: [&str; 24] = [
    "area", "base", "br", "col", "embed", "hr", "img", "input", "keygen", "link", "menuitem",
    "meta", "param", "source", "track", "wbr", "basefont", "bgsound", "command", "frame", "image",
    "isindex", "nextid", "spacer",
];
const STRING_CONTAINERS: [&str; 5] = ["rt", "rp", "style", "script", "template"];
const PRESERVE_WHITESPACE: [&str; 2] = ["pre", "textarea"];

/// What bs4's `BeautifulSoup` object and `BeautifulSoupHTMLParser` keep track of for `.text`.
#[derive(Default)]
struct Soup {
    /// The strings `.text` joins, so far.
    text: String,
    /// `current_data` (`None`: the list is empty; an empty string still counts).
    data: Option<String>,
    /// Open tags, innermost last (the document root not included).
    stack: Vec<String>,
    already_closed_empty: Vec<String>,
}

impl Soup {
    fn data(&mut self, s: &str) {
        self.data.get_or_insert_with(String::new).push_str(s);
    }

    fn data_chars(&mut self, s: &[char]) {
        self.data.get_or_insert_with(String::new).extend(s);
    }

    fn open(&self, names: &[&str]) -> bool {
        self.stack.iter().any(|t| names.contains(&t.as_str()))
    }

    /// `BeautifulSoup.endData`.
    fn end_data(&mut self, kind: StringKind) {
        let Some(mut data) = self.data.take() else {
            return;
        };
        if !self.open(&PRESERVE_WHITESPACE)
            && data
                .chars()
                .all(|c| matches!(c, ' ' | '\n' | '\t' | '\u{c}' | '\r'))
        {
            data = if data.contains('\n') { "\n" } else { " " }.to_string();
        }
        let kept = match kind {
            StringKind::Plain => !self.open(&STRING_CONTAINERS),
            StringKind::CData => true,
            StringKind::Hidden => false,
        };
        if kept {
            self.text.push_str(&data);
        }
    }

    /// A string of its own class (comment, declaration, CDATA...).
    fn special(&mut self, s: &[char], kind: StringKind) {
        self.end_data(StringKind::Plain);
        self.data_chars(s);
        self.end_data(kind);
    }

    /// `BeautifulSoupHTMLParser.handle_starttag` (`self_closing`: through
    /// `handle_startendtag`).
    fn start_tag(&mut self, name: String, self_closing: bool) {
        self.end_data(StringKind::Plain);
        let void = VOID_TAGS.contains(&name.as_str());
        self.stack.push(name.clone());
        if self_closing {
            self.soup_end_tag(&name);
        } else if void {
            self.soup_end_tag(&name);
            self.already_closed_empty.push(name);
        }
    }

    /// `BeautifulSoupHTMLParser.handle_endtag`.
    fn end_tag(&mut self, name: &str) {
        if let Some(pos) = self.already_closed_empty.iter().position(|t| t == name) {
            self.already_closed_empty.remove(pos);
        } else {
            self.soup_end_tag(name);
        }
    }

    /// `BeautifulSoup.handle_endtag`: `endData`, then `_popToTag`.
    fn soup_end_tag(&mut self, name: &str) {
        self.end_data(StringKind::Plain);
        if let Some(pos) = self.stack.iter().rposition(|t| t == name) {
            self.stack.truncate(pos);
        }
    }

    /// `handle_charref`: `&#N` / `&#xH` as bs4's `numeric_character_reference`.
    fn charref(&mut self, name: &[char]) {
        let (digits, radix) = match name.first() {
            Some('x' | 'X') => (&name[1..], 16),
            _ => (name, 10),
        };
        let mut num: u32 = 0;
        for c in digits {
            let d = c.to_digit(radix).unwrap_or(0);
            num = num.saturating_mul(radix).saturating_add(d);
        }
        let c = match num {
            0 | 0xd800..=0xdfff => '\u{fffd}',
            0x80..=0x9f => CP1252_C1[(num - 0x80) as usize],
            n => char::from_u32(n).unwrap_or('\u{fffd}'),
        };
        self.data.get_or_insert_with(String::new).push(c);
    }

    /// `handle_entityref`: a known HTML5 name, else `&name` (the `;` is lost).
    fn entityref(&mut self, name: &[char]) {
        let name: String = name.iter().collect();
        match htmlize::ENTITIES
            .get(format!("&{name};").as_bytes())
            .and_then(|v| std::str::from_utf8(v).ok())
        {
            Some(v) => self.data(v),
            None => self.data(&format!("&{name}")),
        }
    }
}

/// Windows-1252 reading of 0x80..0x9F (undefined bytes map to themselves).
const CP1252_C1: [char; 32] = [
    '\u{20ac}', '\u{81}', '\u{201a}', '\u{192}', '\u{201e}', '\u{2026}', '\u{2020}', '\u{2021}',
    '\u{2c6}', '\u{2030}', '\u{160}', '\u{2039}', '\u{152}', '\u{8d}', '\u{17d}', '\u{8f}',
    '\u{90}', '\u{2018}', '\u{2019}', '\u{201c}', '\u{201d}', '\u{2022}', '\u{2013}', '\u{2014}',
    '\u{2dc}', '\u{2122}', '\u{161}', '\u{203a}', '\u{153}', '\u{9d}', '\u{17e}', '\u{178}',
];

/// Python's `html.parser.HTMLParser` with `convert_charrefs=False`, feeding [`Soup`].
struct HtmlParser {
    /// `rawdata`: what is left to parse.
    raw: Vec<char>,
    /// Inside `<script>` / `<style>`.
    cdata_elem: Option<String>,
    soup: Soup,
}

fn starts(t: &[char], i: usize, s: &str) -> bool {
    s.chars().enumerate().all(|(n, c)| t.get(i + n) == Some(&c))
}

fn find(t: &[char], from: usize, c: char) -> Option<usize> {
    t.get(from..)?
        .iter()
        .position(|&x| x == c)
        .map(|p| from + p)
}

fn lower(t: &[char]) -> String {
    t.iter().collect::<String>().to_lowercase()
}

/// `-1` in Python's scanners: the construct is not complete.
const INCOMPLETE: Option<usize> = None;

/// One attribute of `locatestarttagend_tolerant` (the `(?:...)*` inside its optional group).
static ATTR_IN_TAG: LazyLock<Vec<Node>> = LazyLock::new(|| attribute(true));
/// `attrfind_tolerant`.
static ATTR: LazyLock<Vec<Node>> = LazyLock::new(|| attribute(false));

/// `(?<=['"\s/])[^\s/>][^\s/=>]*(?:\s*=+\s*(?:'[^']*'|"[^"]*"|(?!['"])[^>\s]*)\s*)?(?:\s|/(?!>))*`,
/// the value's trailing `\s*` only in `locatestarttagend_tolerant`.
fn attribute(space_after_value: bool) -> Vec<Node> {
    let mut value = vec![
        star(py_space),
        plus(|c| c == '='),
        star(py_space),
        Node::Alt(vec![
            vec![lit("'"), star(|c| c != '\''), lit("'")],
            vec![lit("\""), star(|c| c != '"'), lit("\"")],
            vec![
                Node::NotAhead(vec![set(|c| c == '\'' || c == '"')]),
                star(|c| c != '>' && !py_space(c)),
            ],
        ]),
    ];
    if space_after_value {
        value.push(star(py_space));
    }
    vec![
        Node::Behind(|c| c == '\'' || c == '"' || c == '/' || py_space(c)),
        set(|c| !py_space(c) && c != '/' && c != '>'),
        star(|c| !py_space(c) && !matches!(c, '/' | '=' | '>')),
        opt(value),
        space_or_slash(),
    ]
}

/// `(?:\s|/(?!>))*`
fn space_or_slash() -> Node {
    Node::Rep(
        vec![Node::At(|t, i| {
            py_space(t[i]) || (t[i] == '/' && t.get(i + 1) != Some(&'>'))
        })],
        0,
        MANY,
    )
}

/// `[^\t\n\r\f />\x00]`
fn tag_name_char(c: char) -> bool {
    !matches!(c, '\t' | '\n' | '\r' | '\u{c}' | ' ' | '/' | '>' | '\0')
}

/// `tagfind_tolerant` at `i`: the end of the name and of the match.
fn tagfind(t: &[char], i: usize) -> Option<(usize, usize)> {
    if !t.get(i).is_some_and(|c| c.is_ascii_alphabetic()) {
        return None;
    }
    let name_end = i + 1 + t[i + 1..].iter().take_while(|&&c| tag_name_char(c)).count();
    let mut e = name_end;
    loop {
        match t.get(e) {
            Some(&c) if py_space(c) => e += 1,
            Some('/') if t.get(e + 1) != Some(&'>') => e += 1,
            _ => break,
        }
    }
    Some((name_end, e))
}

impl HtmlParser {
    /// `HTMLParser.goahead(end)`.
    fn goahead(&mut self, end: bool) -> Result<(), Rejected> {
        let raw = std::mem::take(&mut self.raw);
        let n = raw.len();
        let mut i = 0;
        while i < n {
            let j = match &self.cdata_elem {
                Some(elem) => match cdata_end(&raw, i, elem) {
                    Some(j) => j,
                    None => break,
                },
                None => raw[i..]
                    .iter()
                    .position(|&c| c == '<' || c == '&')
                    .map_or(n, |p| i + p),
            };
            if i < j {
                self.soup.data_chars(&raw[i..j]);
            }
            i = j;
            if i == n {
                break;
            }
            if raw[i] == '<' {
                let k = if raw.get(i + 1).is_some_and(|c| c.is_ascii_alphabetic()) {
                    self.parse_starttag(&raw, i)
                } else if starts(&raw, i, "</") {
                    self.parse_endtag(&raw, i)
                } else if starts(&raw, i, "<!--") {
                    self.parse_comment(&raw, i)
                } else if starts(&raw, i, "<?") {
                    self.parse_pi(&raw, i)
                } else if starts(&raw, i, "<!") {
                    self.parse_html_declaration(&raw, i)?
                } else if i + 1 < n {
                    self.soup.data("<");
                    Some(i + 1)
                } else {
                    break;
                };
                let k = match k {
                    Some(k) => k,
                    None if !end => break,
                    None => {
                        let k = match find(&raw, i + 1, '>') {
                            Some(gt) => gt + 1,
                            None => find(&raw, i + 1, '<').unwrap_or(i + 1),
                        };
                        self.soup.data_chars(&raw[i..k]);
                        k
                    }
                };
                i = k;
            } else if starts(&raw, i, "&#") {
                // charref: `&#(?:[0-9]+|[xX][0-9a-fA-F]+)[^0-9a-fA-F]`
                let hex = matches!(raw.get(i + 2), Some('x' | 'X'));
                let start = if hex { i + 3 } else { i + 2 };
                let digits = raw[start.min(n)..]
                    .iter()
                    .take_while(|c| {
                        if hex {
                            c.is_ascii_hexdigit()
                        } else {
                            c.is_ascii_digit()
                        }
                    })
                    .count();
                let term = raw.get(start + digits);
                if digits > 0 && term.is_some_and(|c| !c.is_ascii_hexdigit()) {
                    self.soup.charref(&raw[i + 2..start + digits]);
                    let k = start + digits + 1;
                    i = if raw[k - 1] == ';' { k } else { k - 1 };
                    continue;
                }
                if raw[i..].contains(&';') {
                    self.soup.data("&#");
                    i += 2;
                }
                break;
            } else {
                if let Some((name_end, k)) = entityref(&raw, i) {
                    self.soup.entityref(&raw[i + 1..name_end]);
                    i = if raw[k - 1] == ';' { k } else { k - 1 };
                    continue;
                }
                // incomplete: `&[a-zA-Z#]`
                if raw
                    .get(i + 1)
                    .is_some_and(|&c| c.is_ascii_alphabetic() || c == '#')
                {
                    if end && n - i == 2 {
                        i += 1;
                    }
                    break;
                } else if i + 1 < n {
                    self.soup.data("&");
                    i += 1;
                } else {
                    break;
                }
            }
        }
        if end && i < n && self.cdata_elem.is_none() {
            self.soup.data_chars(&raw[i..]);
            i = n;
        }
        self.raw = raw[i..].to_vec();
        Ok(())
    }

    fn parse_starttag(&mut self, raw: &[char], i: usize) -> Option<usize> {
        let endpos = check_for_whole_start_tag(raw, i)?;
        let (name_end, mut k) = tagfind(raw, i + 1).expect("a letter follows '<'");
        let tag = lower(&raw[i + 1..name_end]);
        while k < endpos {
            match match_at(&ATTR, raw, k) {
                Some(e) => k = e,
                None => break,
            }
        }
        let rest: String = raw.get(k..endpos).unwrap_or_default().iter().collect();
        let rest = py_strip(&rest);
        if rest != ">" && rest != "/>" {
            self.soup.data_chars(&raw[i..endpos]);
            return Some(endpos);
        }
        if rest == "/>" {
            self.soup.start_tag(tag, true);
        } else {
            if tag == "script" || tag == "style" {
                self.cdata_elem = Some(tag.clone());
            }
            self.soup.start_tag(tag, false);
        }
        Some(endpos)
    }

    fn parse_endtag(&mut self, raw: &[char], i: usize) -> Option<usize> {
        let gtpos = find(raw, i + 1, '>')? + 1;
        if let Some((name_start, name_end)) = endtagfind(raw, i) {
            let elem = lower(&raw[name_start..name_end]);
            if let Some(cdata) = &self.cdata_elem
                && elem != *cdata
            {
                self.soup.data_chars(&raw[i..gtpos]);
                return Some(gtpos);
            }
            self.soup.end_tag(&elem);
            self.cdata_elem = None;
            return Some(gtpos);
        }
        if self.cdata_elem.is_some() {
            self.soup.data_chars(&raw[i..gtpos]);
            return Some(gtpos);
        }
        let Some((name_end, e)) = tagfind(raw, i + 2) else {
            return if starts(raw, i, "</>") {
                Some(i + 3)
            } else {
                self.parse_bogus_comment(raw, i)
            };
        };
        let tagname = lower(&raw[i + 2..name_end]);
        let gtpos = find(raw, e, '>')?;
        self.soup.end_tag(&tagname);
        Some(gtpos + 1)
    }

    fn parse_bogus_comment(&mut self, raw: &[char], i: usize) -> Option<usize> {
        let pos = find(raw, i + 2, '>')?;
        self.soup.special(&raw[i + 2..pos], StringKind::Hidden);
        Some(pos + 1)
    }

    /// `<!--` up to `--\s*>`.
    fn parse_comment(&mut self, raw: &[char], i: usize) -> Option<usize> {
        let mut p = i + 4;
        while p + 1 < raw.len() {
            if raw[p] == '-' && raw[p + 1] == '-' {
                let q = p + 2 + raw[p + 2..].iter().take_while(|&&c| py_space(c)).count();
                if raw.get(q) == Some(&'>') {
                    self.soup.special(&raw[i + 4..p], StringKind::Hidden);
                    return Some(q + 1);
                }
            }
            p += 1;
        }
        INCOMPLETE
    }

    fn parse_pi(&mut self, raw: &[char], i: usize) -> Option<usize> {
        let gt = find(raw, i + 2, '>')?;
        self.soup.special(&raw[i + 2..gt], StringKind::Hidden);
        Some(gt + 1)
    }

    fn parse_html_declaration(
        &mut self,
        raw: &[char],
        i: usize,
    ) -> Result<Option<usize>, Rejected> {
        if starts(raw, i, "<![") {
            return self.parse_marked_section(raw, i);
        }
        let head: String = raw[i..(i + 9).min(raw.len())].iter().collect();
        if head.eq_ignore_ascii_case("<!doctype") {
            return Ok(find(raw, i + 9, '>').map(|gt| {
                self.soup.special(&raw[i + 2..gt], StringKind::Hidden);
                gt + 1
            }));
        }
        Ok(self.parse_bogus_comment(raw, i))
    }

    /// `_markupbase.ParserBase.parse_marked_section`.
    fn parse_marked_section(&mut self, raw: &[char], i: usize) -> Result<Option<usize>, Rejected> {
        let j = i + 3;
        if j == raw.len() {
            return Ok(INCOMPLETE);
        }
        // _scan_name: `[a-zA-Z][-_.a-zA-Z0-9]*\s*`
        if !raw[j].is_ascii_alphabetic() {
            return Err(Rejected);
        }
        let name_end = j
            + 1
            + raw[j + 1..]
                .iter()
                .take_while(|&&c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                .count();
        let m_end = name_end + raw[name_end..].iter().take_while(|&&c| py_space(c)).count();
        if m_end == raw.len() {
            return Ok(INCOMPLETE);
        }
        let name = lower(&raw[j..name_end]);
        let close: &[Node] = match name.as_str() {
            "temp" | "cdata" | "ignore" | "include" | "rcdata" => &MARKED_CLOSE,
            "if" | "else" | "endif" => &MS_MARKED_CLOSE,
            _ => return Err(Rejected),
        };
        let Some((s, e)) = search(close, raw, j) else {
            return Ok(INCOMPLETE);
        };
        // unknown_decl: a CDATA section is kept as CData, anything else is a Declaration.
        let data = &raw[j..s];
        let upper: String = data.iter().collect::<String>().to_uppercase();
        if upper.starts_with("CDATA[") {
            self.soup.special(&data[6..], StringKind::CData);
        } else {
            self.soup.special(data, StringKind::Hidden);
        }
        Ok(Some(e))
    }
}

/// `]\s*]\s*>`
static MARKED_CLOSE: LazyLock<Vec<Node>> =
    LazyLock::new(|| vec![lit("]"), star(py_space), lit("]"), star(py_space), lit(">")]);
/// `]\s*>`
static MS_MARKED_CLOSE: LazyLock<Vec<Node>> =
    LazyLock::new(|| vec![lit("]"), star(py_space), lit(">")]);

/// The end of `locatestarttagend_tolerant` matched at `i` (`<` and a letter):
/// `<[a-zA-Z][^\t\n\r\f />\x00]*(?:[\s/]*(?:<attribute>)*)?\s*`. What follows each part
/// always matches, so Python never backtracks into an earlier part: each part takes its
/// first match in turn (the attributes one after the other, without recursion).
fn locate_start_tag_end(raw: &[char], i: usize) -> usize {
    let run =
        |from: usize, f: fn(char) -> bool| from + raw[from..].iter().take_while(|&&c| f(c)).count();
    let mut j = run(i + 2, tag_name_char);
    j = run(j, |c| py_space(c) || c == '/');
    while let Some(e) = match_at(&ATTR_IN_TAG, raw, j) {
        j = e;
    }
    run(j, py_space)
}

/// `check_for_whole_start_tag`: the end of a complete start tag.
fn check_for_whole_start_tag(raw: &[char], i: usize) -> Option<usize> {
    let j = locate_start_tag_end(raw, i);
    match raw.get(j) {
        Some('>') => Some(j + 1),
        Some('/') => starts(raw, j, "/>").then_some(j + 2),
        None => INCOMPLETE,
        Some(&c) if c.is_ascii_alphabetic() || c == '=' || c == '/' => INCOMPLETE,
        Some(_) => Some(j),
    }
}

/// `endtagfind`: `</\s*([a-zA-Z][-.a-zA-Z0-9:_]*)\s*>` at `i`: the name's range.
fn endtagfind(raw: &[char], i: usize) -> Option<(usize, usize)> {
    let skip = |p: usize| p + raw[p..].iter().take_while(|&&c| py_space(c)).count();
    let start = skip(i + 2);
    if !raw.get(start)?.is_ascii_alphabetic() {
        return None;
    }
    let end = start
        + 1
        + raw[start + 1..]
            .iter()
            .take_while(|&&c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | ':' | '_'))
            .count();
    (raw.get(skip(end)) == Some(&'>')).then_some((start, end))
}

/// `entityref`: `&([a-zA-Z][-.a-zA-Z0-9]*)[^a-zA-Z0-9]` at `i`: the end of the name and of
/// the match.
fn entityref(raw: &[char], i: usize) -> Option<(usize, usize)> {
    if !raw.get(i + 1)?.is_ascii_alphabetic() {
        return None;
    }
    let run = raw[i + 2..]
        .iter()
        .take_while(|&&c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        .count();
    // The longest name followed by a non-alphanumeric character.
    (0..=run).rev().find_map(|extra| {
        let name_end = i + 2 + extra;
        raw.get(name_end)
            .filter(|c| !c.is_ascii_alphanumeric())
            .map(|_| (name_end, name_end + 1))
    })
}

/// In `<script>` / `<style>`: the start of `</\s*elem\s*>` (case-insensitive).
fn cdata_end(raw: &[char], from: usize, elem: &str) -> Option<usize> {
    let elem: Vec<char> = elem.chars().collect();
    let matches_at = |p: usize| {
        if !starts(raw, p, "</") {
            return false;
        }
        let mut q = p + 2 + raw[p + 2..].iter().take_while(|&&c| py_space(c)).count();
        for &e in &elem {
            match raw.get(q) {
                Some(&c) if ignorecase_eq(c, e) => q += 1,
                _ => return false,
            }
        }
        q += raw[q..].iter().take_while(|&&c| py_space(c)).count();
        raw.get(q) == Some(&'>')
    };
    (from..raw.len()).find(|&p| matches_at(p))
}

/// Python's `re.IGNORECASE` against a lower-case ASCII letter of the pattern.
fn ignorecase_eq(c: char, pattern: char) -> bool {
    c.to_ascii_lowercase() == pattern
        || (pattern == 's' && c == '\u{17f}')
        || (pattern == 'i' && (c == '\u{131}' || c == '\u{130}'))
        || (pattern == 'k' && c == '\u{212a}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unquote_plus_as_python() {
        assert_eq!(unquote_plus("a+b%20c%zz%41%e2%80"), "a b c%zzA\u{fffd}");
        assert_eq!(unquote_plus("caf%C3%A9 é%41"), "café éA");
    }

    #[test]
    fn html_text_as_bs4() {
        assert_eq!(html_text("a <b>bold</b> &amp; c"), "a bold & c");
        assert_eq!(html_text("x &a"), "x a");
        assert_eq!(html_text("x &#65a; <b>t</b>"), "x &#65a; t");
        assert_eq!(html_text("x <![cdata[]]> y"), "x   y");
        assert_eq!(html_text("<rt>a<b>b</b></rt>c"), "c");
        assert_eq!(html_text("<pre>  </pre>x<b>  </b>y"), "  x y");
        assert_eq!(html_text("a <![foo[ b"), "a <![foo[ b");
    }

    #[test]
    fn boundaries_use_python_word_characters() {
        // `½` is \w for Python (category No), not for the regex crate.
        assert_eq!(
            py_sub("x ½123456 123456", &LONG_NUMBER, |_| String::new()),
            "x ½123456 "
        );
    }
}
