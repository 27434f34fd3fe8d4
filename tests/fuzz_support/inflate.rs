//! A DEFLATE decoder written from RFC 1951 (after zlib's puff.c), to judge
//! the server's inflater by (`tests/fuzz_deflate.rs`): it shares no code
//! with flate2 or zlib-rs. It decodes until the final block ends, the input
//! runs out (what was decoded so far is the message: a permessage-deflate
//! message is sync-flushed, not finished), an error, or the output passes
//! a limit. Where zlib reads further than the RFC makes necessary before
//! it fails, this decoder does the same (noted), so that the two agree on
//! a stream cut there.

/// Why decoding stopped.
#[derive(Debug, Clone, PartialEq)]
pub enum Stop {
    /// The final block ended (the rest of the input is ignored).
    Final,
    /// The input ran out: the output so far is the message.
    OutOfInput,
    /// The output passed the limit.
    Limit,
    /// Not DEFLATE.
    Error(&'static str),
}

/// Bits, least significant first (RFC 1951 §3.1.1).
struct Bits<'a> {
    data: &'a [u8],
    at: usize,
}

impl Bits<'_> {
    fn take(&mut self, n: usize) -> Result<usize, Stop> {
        if self.at + n > self.data.len() * 8 {
            return Err(Stop::OutOfInput);
        }
        let mut v = 0;
        for i in 0..n {
            let bit = (self.data[(self.at + i) / 8] >> ((self.at + i) % 8)) & 1;
            v |= usize::from(bit) << i;
        }
        self.at += n;
        Ok(v)
    }

    fn skip(&mut self, n: usize) -> Result<(), Stop> {
        if self.at + n > self.data.len() * 8 {
            return Err(Stop::OutOfInput);
        }
        self.at += n;
        Ok(())
    }
}

/// A canonical Huffman code (RFC 1951 §3.2.2).
struct Code {
    counts: [usize; 16],
    symbols: Vec<usize>,
    longest: usize,
}

enum Shape {
    Complete,
    Incomplete,
    OverSubscribed,
}

fn code(lengths: &[usize]) -> (Code, Shape) {
    let mut counts = [0; 16];
    for &l in lengths {
        counts[l] += 1;
    }
    counts[0] = 0;
    let longest = (1..16).rev().find(|&l| counts[l] > 0).unwrap_or(0);
    let mut left: i64 = 1;
    let mut shape = Shape::Complete;
    for &count in &counts[1..] {
        left = 2 * left - count as i64;
        if left < 0 {
            shape = Shape::OverSubscribed;
            break;
        }
    }
    if left > 0 && !matches!(shape, Shape::OverSubscribed) {
        shape = Shape::Incomplete;
    }
    let mut symbols = Vec::new();
    for len in 1..16 {
        for (sym, &l) in lengths.iter().enumerate() {
            if l == len {
                symbols.push(sym);
            }
        }
    }
    let c = Code {
        counts,
        symbols,
        longest,
    };
    (c, shape)
}

/// The next symbol. A bit pattern no code starts with is an error once
/// the longest code is read (zlib's tables: one bit for an empty or a
/// one-code code).
fn decode(bits: &mut Bits<'_>, c: &Code, invalid: &'static str) -> Result<usize, Stop> {
    let (mut code, mut first, mut index) = (0usize, 0usize, 0usize);
    for len in 1..16 {
        code |= bits.take(1)?;
        let count = c.counts[len];
        if code < first + count {
            return Ok(c.symbols[index + code - first]);
        }
        index += count;
        first = (first + count) << 1;
        code <<= 1;
        if len >= c.longest {
            return Err(Stop::Error(invalid));
        }
    }
    Err(Stop::Error(invalid))
}

const LEN_BASE: [usize; 29] = [
    3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131,
    163, 195, 227, 258,
];
const LEN_EXTRA: [usize; 29] = [
    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
];
const DIST_BASE: [usize; 30] = [
    1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537,
    2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577,
];
const DIST_EXTRA: [usize; 30] = [
    0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13,
    13,
];
/// The order of the code length code's lengths (RFC 1951 §3.2.7).
const ORDER: [usize; 19] = [
    16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15,
];

/// Inflates `data` (a message with the tail put back), stopping once
/// more than `limit` bytes came out.
pub fn inflate(data: &[u8], limit: usize) -> (Vec<u8>, Stop) {
    let mut out = Vec::new();
    let stop = blocks(&mut Bits { data, at: 0 }, &mut out, limit)
        .err()
        .unwrap_or(Stop::Final);
    (out, stop)
}

fn blocks(bits: &mut Bits<'_>, out: &mut Vec<u8>, limit: usize) -> Result<(), Stop> {
    loop {
        let last = bits.take(1)? == 1;
        match bits.take(2)? {
            0 => stored(bits, out, limit)?,
            1 => {
                let mut lengths = [8; 288];
                lengths[144..256].fill(9);
                lengths[256..280].fill(7);
                // 286, 287 and distances 30, 31 are in the fixed codes
                // but invalid (checked when decoded).
                let (lit, _) = code(&lengths);
                let (dist, _) = code(&[5; 32]);
                codes(bits, out, limit, &lit, &dist)?;
            }
            2 => dynamic(bits, out, limit)?,
            _ => return Err(Stop::Error("invalid block type")),
        }
        if last {
            return Ok(());
        }
    }
}

fn stored(bits: &mut Bits<'_>, out: &mut Vec<u8>, limit: usize) -> Result<(), Stop> {
    bits.at = bits.at.div_ceil(8) * 8;
    let len = bits.take(16)?;
    let nlen = bits.take(16)?;
    if len != !nlen & 0xffff {
        return Err(Stop::Error("invalid stored block lengths"));
    }
    for _ in 0..len {
        out.push(bits.take(8)? as u8);
        if out.len() > limit {
            return Err(Stop::Limit);
        }
    }
    Ok(())
}

fn dynamic(bits: &mut Bits<'_>, out: &mut Vec<u8>, limit: usize) -> Result<(), Stop> {
    let nlen = bits.take(5)? + 257;
    let ndist = bits.take(5)? + 1;
    let ncode = bits.take(4)? + 4;
    if nlen > 286 || ndist > 30 {
        return Err(Stop::Error("too many length or distance symbols"));
    }
    let mut cl = [0; 19];
    for &i in &ORDER[..ncode] {
        cl[i] = bits.take(3)?;
    }
    let (clcode, shape) = code(&cl);
    let mut lengths = vec![0; nlen + ndist];
    if clcode.longest == 0 {
        // zlib: an all-zero code length code is not refused when read;
        // each length then takes one bit and reads as 0, and the
        // missing end-of-block code is the error.
        bits.skip(nlen + ndist)?;
        return Err(Stop::Error("missing end-of-block code"));
    }
    if !matches!(shape, Shape::Complete) {
        return Err(Stop::Error("invalid code lengths set"));
    }
    let mut i = 0;
    while i < nlen + ndist {
        let sym = decode(bits, &clcode, "invalid code length code")?;
        if sym < 16 {
            lengths[i] = sym;
            i += 1;
            continue;
        }
        let (value, n) = match sym {
            16 => {
                let n = 3 + bits.take(2)?;
                if i == 0 {
                    return Err(Stop::Error("invalid bit length repeat"));
                }
                (lengths[i - 1], n)
            }
            17 => (0, 3 + bits.take(3)?),
            _ => (0, 11 + bits.take(7)?),
        };
        if i + n > nlen + ndist {
            return Err(Stop::Error("invalid bit length repeat"));
        }
        lengths[i..i + n].fill(value);
        i += n;
    }
    if lengths[256] == 0 {
        return Err(Stop::Error("missing end-of-block code"));
    }
    // An incomplete code is taken only when it is one code of one bit.
    let usable = |c: &Code, shape: Shape| match shape {
        Shape::Complete => true,
        Shape::Incomplete => c.longest <= 1,
        Shape::OverSubscribed => false,
    };
    let (lit, shape) = code(&lengths[..nlen]);
    if !usable(&lit, shape) {
        return Err(Stop::Error("invalid literal/lengths set"));
    }
    let (dist, shape) = code(&lengths[nlen..]);
    if !usable(&dist, shape) {
        return Err(Stop::Error("invalid distances set"));
    }
    codes(bits, out, limit, &lit, &dist)
}

fn codes(
    bits: &mut Bits<'_>,
    out: &mut Vec<u8>,
    limit: usize,
    lit: &Code,
    dist: &Code,
) -> Result<(), Stop> {
    loop {
        let sym = decode(bits, lit, "invalid literal/length code")?;
        match sym {
            0..=255 => out.push(sym as u8),
            256 => return Ok(()),
            286.. => return Err(Stop::Error("invalid literal/length code")),
            _ => {
                let s = sym - 257;
                let len = LEN_BASE[s] + bits.take(LEN_EXTRA[s])?;
                let d = decode(bits, dist, "invalid distance code")?;
                if d >= 30 {
                    return Err(Stop::Error("invalid distance code"));
                }
                let back = DIST_BASE[d] + bits.take(DIST_EXTRA[d])?;
                if back > out.len() {
                    return Err(Stop::Error("invalid distance too far back"));
                }
                for _ in 0..len {
                    out.push(out[out.len() - back]);
                }
            }
        }
        if out.len() > limit {
            return Err(Stop::Limit);
        }
    }
}
