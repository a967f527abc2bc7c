//! Charts as PNG files, drawn by hand: no plotting crate and no system fonts. A [`Canvas`] is
//! an RGB buffer with a few primitives (rectangles, thick and dashed lines, markers, text in
//! a built-in 5x7 bitmap font, also rotated for vertical axis titles), encoded with the `png`
//! crate. On top of it, [`LineChart`] (numeric x, lines with markers, optional min–max
//! whiskers, horizontal baselines such as "Linux TCP") and [`BarChart`] (grouped bars, one
//! colour per series, optional whiskers and value labels) are laid out with a title, a legend,
//! labelled ticks and axis titles, on a linear or log10 y axis. A [`Figure`] puts one or more
//! charts side by side.

use std::path::Path;

use crate::error::{Context, Result};

/// An RGB colour.
pub type Rgb = [u8; 3];

/// Background.
pub const WHITE: Rgb = [255, 255, 255];
/// Text, axes.
pub const BLACK: Rgb = [0, 0, 0];
/// Whiskers and minor text.
pub const DARK_GREY: Rgb = [80, 80, 80];
/// Grid lines.
pub const LIGHT_GREY: Rgb = [225, 225, 225];
/// NetChannel's colour in every chart.
pub const BLUE: Rgb = [31, 119, 180];
/// Linux TCP's colour.
pub const ORANGE: Rgb = [230, 120, 10];
/// TCP with SO_PRIORITY.
pub const GREEN: Rgb = [44, 160, 44];
/// MPTCP.
pub const PURPLE: Rgb = [148, 103, 189];
/// Spare.
pub const RED: Rgb = [214, 39, 40];

/// `c` mixed with white: `amount` 0 keeps it, 1 gives white.
pub fn lighten(c: Rgb, amount: f64) -> Rgb {
    let mix = |v: u8| (v as f64 + (255.0 - v as f64) * amount.clamp(0.0, 1.0)).round() as u8;
    [mix(c[0]), mix(c[1]), mix(c[2])]
}

/// Glyph width of the built-in font, in font pixels.
pub const GLYPH_W: i64 = 5;
/// Glyph height of the built-in font, in font pixels: 7 rows down to the baseline plus 2 for
/// descenders.
pub const GLYPH_H: i64 = 9;
/// Height of capitals and digits (rows above the baseline), in font pixels.
pub const CAP_H: i64 = 7;
/// Horizontal advance per character (glyph plus one pixel of spacing), in font pixels.
pub const ADVANCE: i64 = GLYPH_W + 1;
/// Text scale used by the charts (each font pixel is a 2x2 block).
pub const TEXT_SCALE: i64 = 2;

/// The printable ASCII characters `' '..='~'`, 5 columns each, least significant bit at the
/// top row (the classic 5x7 LCD font; see [`DESCENDERS`]). Anything else is drawn as `?`.
const FONT: [[u8; 5]; 95] = [
    [0x00, 0x00, 0x00, 0x00, 0x00], // ' '
    [0x00, 0x00, 0x5F, 0x00, 0x00], // !
    [0x00, 0x07, 0x00, 0x07, 0x00], // "
    [0x14, 0x7F, 0x14, 0x7F, 0x14], // #
    [0x24, 0x2A, 0x7F, 0x2A, 0x12], // $
    [0x23, 0x13, 0x08, 0x64, 0x62], // %
    [0x36, 0x49, 0x55, 0x22, 0x50], // &
    [0x00, 0x05, 0x03, 0x00, 0x00], // '
    [0x00, 0x1C, 0x22, 0x41, 0x00], // (
    [0x00, 0x41, 0x22, 0x1C, 0x00], // )
    [0x14, 0x08, 0x3E, 0x08, 0x14], // *
    [0x08, 0x08, 0x3E, 0x08, 0x08], // +
    [0x00, 0x50, 0x30, 0x00, 0x00], // ,
    [0x08, 0x08, 0x08, 0x08, 0x08], // -
    [0x00, 0x60, 0x60, 0x00, 0x00], // .
    [0x20, 0x10, 0x08, 0x04, 0x02], // /
    [0x3E, 0x51, 0x49, 0x45, 0x3E], // 0
    [0x00, 0x42, 0x7F, 0x40, 0x00], // 1
    [0x42, 0x61, 0x51, 0x49, 0x46], // 2
    [0x21, 0x41, 0x45, 0x4B, 0x31], // 3
    [0x18, 0x14, 0x12, 0x7F, 0x10], // 4
    [0x27, 0x45, 0x45, 0x45, 0x39], // 5
    [0x3C, 0x4A, 0x49, 0x49, 0x30], // 6
    [0x01, 0x71, 0x09, 0x05, 0x03], // 7
    [0x36, 0x49, 0x49, 0x49, 0x36], // 8
    [0x06, 0x49, 0x49, 0x29, 0x1E], // 9
    [0x00, 0x36, 0x36, 0x00, 0x00], // :
    [0x00, 0x56, 0x36, 0x00, 0x00], // ;
    [0x08, 0x14, 0x22, 0x41, 0x00], // <
    [0x14, 0x14, 0x14, 0x14, 0x14], // =
    [0x00, 0x41, 0x22, 0x14, 0x08], // >
    [0x02, 0x01, 0x51, 0x09, 0x06], // ?
    [0x32, 0x49, 0x79, 0x41, 0x3E], // @
    [0x7E, 0x11, 0x11, 0x11, 0x7E], // A
    [0x7F, 0x49, 0x49, 0x49, 0x36], // B
    [0x3E, 0x41, 0x41, 0x41, 0x22], // C
    [0x7F, 0x41, 0x41, 0x22, 0x1C], // D
    [0x7F, 0x49, 0x49, 0x49, 0x41], // E
    [0x7F, 0x09, 0x09, 0x09, 0x01], // F
    [0x3E, 0x41, 0x49, 0x49, 0x7A], // G
    [0x7F, 0x08, 0x08, 0x08, 0x7F], // H
    [0x00, 0x41, 0x7F, 0x41, 0x00], // I
    [0x20, 0x40, 0x41, 0x3F, 0x01], // J
    [0x7F, 0x08, 0x14, 0x22, 0x41], // K
    [0x7F, 0x40, 0x40, 0x40, 0x40], // L
    [0x7F, 0x02, 0x0C, 0x02, 0x7F], // M
    [0x7F, 0x04, 0x08, 0x10, 0x7F], // N
    [0x3E, 0x41, 0x41, 0x41, 0x3E], // O
    [0x7F, 0x09, 0x09, 0x09, 0x06], // P
    [0x3E, 0x41, 0x51, 0x21, 0x5E], // Q
    [0x7F, 0x09, 0x19, 0x29, 0x46], // R
    [0x46, 0x49, 0x49, 0x49, 0x31], // S
    [0x01, 0x01, 0x7F, 0x01, 0x01], // T
    [0x3F, 0x40, 0x40, 0x40, 0x3F], // U
    [0x1F, 0x20, 0x40, 0x20, 0x1F], // V
    [0x3F, 0x40, 0x38, 0x40, 0x3F], // W
    [0x63, 0x14, 0x08, 0x14, 0x63], // X
    [0x07, 0x08, 0x70, 0x08, 0x07], // Y
    [0x61, 0x51, 0x49, 0x45, 0x43], // Z
    [0x00, 0x7F, 0x41, 0x41, 0x00], // [
    [0x02, 0x04, 0x08, 0x10, 0x20], // backslash
    [0x00, 0x41, 0x41, 0x7F, 0x00], // ]
    [0x04, 0x02, 0x01, 0x02, 0x04], // ^
    [0x40, 0x40, 0x40, 0x40, 0x40], // _
    [0x00, 0x01, 0x02, 0x04, 0x00], // `
    [0x20, 0x54, 0x54, 0x54, 0x78], // a
    [0x7F, 0x48, 0x44, 0x44, 0x38], // b
    [0x38, 0x44, 0x44, 0x44, 0x20], // c
    [0x38, 0x44, 0x44, 0x48, 0x7F], // d
    [0x38, 0x54, 0x54, 0x54, 0x18], // e
    [0x08, 0x7E, 0x09, 0x01, 0x02], // f
    [0x0C, 0x52, 0x52, 0x52, 0x3E], // g
    [0x7F, 0x08, 0x04, 0x04, 0x78], // h
    [0x00, 0x44, 0x7D, 0x40, 0x00], // i
    [0x20, 0x40, 0x44, 0x3D, 0x00], // j
    [0x7F, 0x10, 0x28, 0x44, 0x00], // k
    [0x00, 0x41, 0x7F, 0x40, 0x00], // l
    [0x7C, 0x04, 0x18, 0x04, 0x78], // m
    [0x7C, 0x08, 0x04, 0x04, 0x78], // n
    [0x38, 0x44, 0x44, 0x44, 0x38], // o
    [0x7C, 0x14, 0x14, 0x14, 0x08], // p
    [0x08, 0x14, 0x14, 0x18, 0x7C], // q
    [0x7C, 0x08, 0x04, 0x04, 0x08], // r
    [0x48, 0x54, 0x54, 0x54, 0x20], // s
    [0x04, 0x3F, 0x44, 0x40, 0x20], // t
    [0x3C, 0x40, 0x40, 0x20, 0x7C], // u
    [0x1C, 0x20, 0x40, 0x20, 0x1C], // v
    [0x3C, 0x40, 0x30, 0x40, 0x3C], // w
    [0x44, 0x28, 0x10, 0x28, 0x44], // x
    [0x0C, 0x50, 0x50, 0x50, 0x3C], // y
    [0x44, 0x64, 0x54, 0x4C, 0x44], // z
    [0x00, 0x08, 0x36, 0x41, 0x00], // {
    [0x00, 0x00, 0x7F, 0x00, 0x00], // |
    [0x00, 0x41, 0x36, 0x08, 0x00], // }
    [0x02, 0x01, 0x02, 0x04, 0x02], // ~
];

/// Lowercase letters with descenders, redrawn to reach two rows below the baseline (rows 7
/// and 8) instead of being squeezed above it as in the 7-row table.
const DESCENDERS: [(char, [u16; 5]); 5] = [
    ('g', [0x098, 0x124, 0x124, 0x124, 0x0FC]),
    ('j', [0x080, 0x100, 0x100, 0x0FD, 0x000]),
    ('p', [0x1FC, 0x024, 0x024, 0x024, 0x018]),
    ('q', [0x018, 0x024, 0x024, 0x024, 0x1FC]),
    ('y', [0x09C, 0x120, 0x120, 0x120, 0x0FC]),
];

/// The columns of `c`'s glyph, least significant bit at the top row, rows 0..9 (`?` for
/// anything not printable ASCII).
fn glyph(c: char) -> [u16; 5] {
    if let Some((_, g)) = DESCENDERS.iter().find(|(d, _)| *d == c) {
        return *g;
    }
    let i = c as u32;
    let g = if (0x20..=0x7E).contains(&i) { FONT[(i - 0x20) as usize] } else { FONT[(b'?' - 0x20) as usize] };
    g.map(u16::from)
}

/// Width in pixels of `s` drawn at `scale` (no trailing spacing).
pub fn text_width(s: &str, scale: i64) -> i64 {
    let n = s.chars().count() as i64;
    if n == 0 {
        0
    } else {
        (n * ADVANCE - 1) * scale
    }
}

/// Height in pixels of one line of text at `scale`.
pub fn text_height(scale: i64) -> i64 {
    GLYPH_H * scale
}

/// A rectangle in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rect {
    /// Left edge.
    pub x: i64,
    /// Top edge.
    pub y: i64,
    /// Width.
    pub w: i64,
    /// Height.
    pub h: i64,
}

impl Rect {
    fn right(&self) -> i64 {
        self.x + self.w
    }
    fn bottom(&self) -> i64 {
        self.y + self.h
    }
}

/// An RGB image being drawn; everything outside it is clipped.
#[derive(Debug, Clone)]
pub struct Canvas {
    width: u32,
    height: u32,
    pixels: Vec<u8>,
}

impl Canvas {
    /// A `width` x `height` canvas filled with `background`.
    pub fn new(width: u32, height: u32, background: Rgb) -> Canvas {
        let mut pixels = Vec::with_capacity(width as usize * height as usize * 3);
        for _ in 0..(width as usize * height as usize) {
            pixels.extend_from_slice(&background);
        }
        Canvas { width, height, pixels }
    }

    /// The colour at (`x`, `y`), which must be inside.
    #[cfg(test)]
    pub fn pixel(&self, x: u32, y: u32) -> Rgb {
        let i = (y as usize * self.width as usize + x as usize) * 3;
        [self.pixels[i], self.pixels[i + 1], self.pixels[i + 2]]
    }

    /// Set one pixel (clipped).
    pub fn put(&mut self, x: i64, y: i64, c: Rgb) {
        if x >= 0 && y >= 0 && x < self.width as i64 && y < self.height as i64 {
            let i = (y as usize * self.width as usize + x as usize) * 3;
            self.pixels[i..i + 3].copy_from_slice(&c);
        }
    }

    /// Fill a rectangle (clipped).
    pub fn fill_rect(&mut self, x: i64, y: i64, w: i64, h: i64, c: Rgb) {
        let (x0, y0) = (x.max(0), y.max(0));
        let (x1, y1) = ((x + w).min(self.width as i64), (y + h).min(self.height as i64));
        for yy in y0..y1 {
            for xx in x0..x1 {
                self.put(xx, yy, c);
            }
        }
    }

    /// A straight line `thickness` pixels wide (Bresenham, a square brush).
    pub fn line(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: Rgb, thickness: i64) {
        let t = thickness.max(1);
        let off = (t - 1) / 2;
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.fill_rect(x - off, y - off, t, t, c);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// A dashed horizontal line from `x0` to `x1` at `y`.
    pub fn dashed_hline(&mut self, x0: i64, x1: i64, y: i64, c: Rgb, thickness: i64) {
        let (dash, gap) = (10, 6);
        let off = (thickness.max(1) - 1) / 2;
        let mut x = x0;
        while x < x1 {
            let end = (x + dash).min(x1);
            self.fill_rect(x, y - off, end - x, thickness.max(1), c);
            x = end + gap;
        }
    }

    /// A filled disc of `radius` centred at (`x`, `y`).
    pub fn marker(&mut self, x: i64, y: i64, radius: i64, c: Rgb) {
        for dy in -radius..=radius {
            for dx in -radius..=radius {
                let d2 = dx * dx + dy * dy;
                if d2 <= radius * radius {
                    self.put(x + dx, y + dy, c);
                }
            }
        }
    }

    /// Draw `s` with its top-left corner at (`x`, `y`); returns the width drawn.
    pub fn text(&mut self, x: i64, y: i64, s: &str, scale: i64, c: Rgb) -> i64 {
        let mut cx = x;
        for ch in s.chars() {
            let g = glyph(ch);
            for (col, bits) in g.iter().enumerate() {
                for row in 0..GLYPH_H {
                    if bits >> row & 1 == 1 {
                        self.fill_rect(cx + col as i64 * scale, y + row * scale, scale, scale, c);
                    }
                }
            }
            cx += ADVANCE * scale;
        }
        text_width(s, scale)
    }

    /// Draw `s` rotated a quarter turn counter-clockwise (reading bottom to top), its
    /// baseline side on the right: the text occupies `x .. x + text_height` horizontally and
    /// `y - text_width .. y` vertically.
    pub fn text_up(&mut self, x: i64, y: i64, s: &str, scale: i64, c: Rgb) {
        let mut cy = y;
        for ch in s.chars() {
            let g = glyph(ch);
            for (col, bits) in g.iter().enumerate() {
                for row in 0..GLYPH_H {
                    if bits >> row & 1 == 1 {
                        // Font (col, row) → canvas (x + row, cy - col - 1).
                        self.fill_rect(x + row * scale, cy - (col as i64 + 1) * scale, scale, scale, c);
                    }
                }
            }
            cy -= ADVANCE * scale;
        }
    }

    /// Draw `s` centred horizontally on `cx`, top at `y`.
    pub fn text_centered(&mut self, cx: i64, y: i64, s: &str, scale: i64, c: Rgb) {
        self.text(cx - text_width(s, scale) / 2, y, s, scale, c);
    }

    /// Draw `s` with its right edge at `right`, top at `y`.
    pub fn text_right(&mut self, right: i64, y: i64, s: &str, scale: i64, c: Rgb) {
        self.text(right - text_width(s, scale), y, s, scale, c);
    }

    /// The image as a PNG file (8-bit RGB).
    pub fn to_png(&self) -> std::result::Result<Vec<u8>, String> {
        let mut out = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut out, self.width, self.height);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            let mut w = enc.write_header().map_err(|e| e.to_string())?;
            w.write_image_data(&self.pixels).map_err(|e| e.to_string())?;
            w.finish().map_err(|e| e.to_string())?;
        }
        Ok(out)
    }

    /// Write the image to `path` as a PNG file.
    pub fn save_png(&self, path: &Path) -> Result<()> {
        let bytes =
            self.to_png().map_err(|e| format!("cannot encode the chart {} as PNG: {e}", path.display()))?;
        std::fs::write(path, bytes).context(|| format!("cannot write {}", path.display()))
    }
}

/// How values map onto the y axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// Linear, from 0 (or the smallest value, if negative) up.
    Linear,
    /// Logarithmic (base 10), whole decades.
    Log,
}

/// A computed axis: its range, its labelled ticks and (log only) minor grid values.
#[derive(Debug, Clone)]
struct Axis {
    lo: f64,
    hi: f64,
    scale: Scale,
    ticks: Vec<(f64, String)>,
    minor: Vec<f64>,
}

impl Axis {
    /// An axis holding every value of `values` (non-finite ones ignored).
    fn fit(values: &[f64], scale: Scale) -> Axis {
        let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        match scale {
            Scale::Linear => {
                let max = finite.iter().copied().fold(0.0f64, f64::max);
                let min = finite.iter().copied().fold(0.0f64, f64::min);
                let max = if max <= min { min + 1.0 } else { max };
                let step = nice_step((max - min) * 1.08, 5.0);
                let lo = (min / step).floor() * step;
                let hi = (max * 1.08 / step).ceil() * step;
                let unit = si_unit(hi.max(-lo));
                let decimals = decimals_for(step / unit.0);
                let mut ticks = Vec::new();
                let n = ((hi - lo) / step).round() as i64;
                for i in 0..=n {
                    let v = lo + i as f64 * step;
                    let label = if v == 0.0 {
                        "0".to_string()
                    } else {
                        format!("{:.*}{}", decimals, v / unit.0, unit.1)
                    };
                    ticks.push((v, label));
                }
                Axis { lo, hi, scale, ticks, minor: Vec::new() }
            }
            Scale::Log => {
                let pos: Vec<f64> = finite.iter().copied().filter(|&v| v > 0.0).collect();
                let min = pos.iter().copied().fold(f64::INFINITY, f64::min);
                let max = pos.iter().copied().fold(0.0f64, f64::max);
                let (min, max) = if pos.is_empty() { (1.0, 10.0) } else { (min, max) };
                let lo_exp = min.log10().floor() as i32;
                let mut hi_exp = max.log10().ceil() as i32;
                if hi_exp <= lo_exp {
                    hi_exp = lo_exp + 1;
                }
                let mut ticks = Vec::new();
                let mut minor = Vec::new();
                for e in lo_exp..=hi_exp {
                    let v = 10f64.powi(e);
                    ticks.push((v, si_label(v)));
                    if e < hi_exp {
                        minor.extend((2..10).map(|m| m as f64 * v));
                    }
                }
                Axis { lo: 10f64.powi(lo_exp), hi: 10f64.powi(hi_exp), scale, ticks, minor }
            }
        }
    }

    /// Where `v` lies: 0 at `lo`, 1 at `hi` (clamped a little beyond).
    fn frac(&self, v: f64) -> f64 {
        let f = match self.scale {
            Scale::Linear => (v - self.lo) / (self.hi - self.lo),
            Scale::Log => {
                if v <= 0.0 {
                    0.0
                } else {
                    (v.log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10())
                }
            }
        };
        f.clamp(-0.02, 1.02)
    }

    /// The pixel row of `v` in `plot`.
    fn y_px(&self, v: f64, plot: Rect) -> i64 {
        plot.bottom() - 1 - (self.frac(v) * (plot.h - 1) as f64).round() as i64
    }
}

/// A step of 1, 2, 2.5 or 5 times a power of ten giving about `target` intervals over `range`.
fn nice_step(range: f64, target: f64) -> f64 {
    let raw = (range / target).max(f64::MIN_POSITIVE);
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let nice = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 2.5 {
        2.5
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

/// Decimals needed to print multiples of `step` exactly enough.
fn decimals_for(step: f64) -> usize {
    let mut d = 0;
    while d < 6 && ((step * 10f64.powi(d as i32)).round() - step * 10f64.powi(d as i32)).abs() > 1e-6 {
        d += 1;
    }
    d
}

/// The divisor and suffix for tick labels on an axis reaching `max`.
fn si_unit(max: f64) -> (f64, &'static str) {
    if max >= 1e6 {
        (1e6, "M")
    } else if max >= 1e4 {
        (1e3, "k")
    } else {
        (1.0, "")
    }
}

/// `1`, `10`, `100`, `1k`, `10k`, `1M`, `0.1`.
fn si_label(v: f64) -> String {
    if v >= 1e6 {
        format!("{}M", trim(v / 1e6))
    } else if v >= 1e3 {
        format!("{}k", trim(v / 1e3))
    } else {
        trim(v)
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// A value with about three significant digits and a k/M suffix: `36.9`, `564k`, `1.23M`.
pub fn short_number(v: f64) -> String {
    let (div, suffix) = if v.abs() >= 1e6 {
        (1e6, "M")
    } else if v.abs() >= 1e4 {
        (1e3, "k")
    } else {
        (1.0, "")
    };
    let x = v / div;
    let digits = if x.abs() >= 100.0 {
        0
    } else if x.abs() >= 10.0 {
        1
    } else {
        2
    };
    format!("{x:.digits$}{suffix}")
}

/// One point of a line series, with an optional (min, max) whisker.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    /// Position on the x axis.
    pub x: f64,
    /// Value.
    pub y: f64,
    /// The spread drawn as a whisker (e.g. min and max over repetitions).
    pub range: Option<(f64, f64)>,
}

/// A line with markers.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// Line and marker colour.
    pub color: Rgb,
    /// Points, drawn in x order.
    pub points: Vec<Point>,
}

/// A horizontal reference line across the plot (dashed), e.g. a baseline's throughput.
#[derive(Debug, Clone)]
pub struct Baseline {
    /// Legend text.
    pub name: String,
    /// Colour.
    pub color: Rgb,
    /// Value.
    pub y: f64,
    /// A spread drawn as a light band behind the line (e.g. min and max over repetitions).
    pub range: Option<(f64, f64)>,
}

/// Lines with markers over a numeric x axis, plus horizontal baselines.
#[derive(Debug, Clone)]
pub struct LineChart {
    /// Above the plot.
    pub title: String,
    /// Under the x axis, with its unit.
    pub x_title: String,
    /// Beside the y axis, with its unit.
    pub y_title: String,
    /// The lines.
    pub series: Vec<Series>,
    /// Horizontal reference lines.
    pub baselines: Vec<Baseline>,
    /// The y axis.
    pub y_scale: Scale,
    /// Values the y axis must hold besides the data (to give panels side by side one range).
    pub y_include: Vec<f64>,
    /// A line of small print under the chart.
    pub note: Option<String>,
}

/// One colour of bars in a [`BarChart`]: a value per group.
#[derive(Debug, Clone)]
pub struct BarSeries {
    /// Legend text (an empty name is left out of the legend).
    pub name: String,
    /// Bar colour.
    pub color: Rgb,
    /// Per-bar colours overriding `color` (empty: none).
    pub bar_colors: Vec<Rgb>,
    /// One value per group; `None` leaves a gap.
    pub values: Vec<Option<f64>>,
    /// Whiskers per group (empty: none).
    pub ranges: Vec<Option<(f64, f64)>>,
}

/// Grouped bars: for each group, one bar per series side by side.
#[derive(Debug, Clone)]
pub struct BarChart {
    /// Above the plot.
    pub title: String,
    /// Under the group labels (may be empty).
    pub x_title: String,
    /// Beside the y axis, with its unit.
    pub y_title: String,
    /// Group labels along the x axis.
    pub groups: Vec<String>,
    /// A second line under each group label (empty: none).
    pub group_notes: Vec<String>,
    /// The bar series.
    pub series: Vec<BarSeries>,
    /// The y axis.
    pub y_scale: Scale,
    /// Print each bar's value above it where it fits.
    pub value_labels: bool,
    /// A line of small print under the chart.
    pub note: Option<String>,
}

/// A chart of either kind.
#[derive(Debug, Clone)]
pub enum Chart {
    /// See [`LineChart`].
    Line(LineChart),
    /// See [`BarChart`].
    Bar(BarChart),
}

/// Charts side by side in one image.
#[derive(Debug, Clone)]
pub struct Figure {
    /// Image width in pixels.
    pub width: u32,
    /// Image height in pixels.
    pub height: u32,
    /// The panels, left to right, each an equal share of the width.
    pub panels: Vec<Chart>,
}

impl Figure {
    /// Draw the figure.
    pub fn render(&self) -> Canvas {
        let mut canvas = Canvas::new(self.width, self.height, WHITE);
        let n = self.panels.len().max(1) as i64;
        let w = self.width as i64 / n;
        for (i, panel) in self.panels.iter().enumerate() {
            let area = Rect { x: i as i64 * w, y: 0, w, h: self.height as i64 };
            match panel {
                Chart::Line(c) => {
                    c.draw(&mut canvas, area);
                }
                Chart::Bar(c) => {
                    c.draw(&mut canvas, area);
                }
            }
        }
        canvas
    }

    /// Draw the figure and write it to `path` as PNG.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.render().save_png(path)
    }
}

/// A legend entry: a filled swatch (bars, lines) or a dashed stroke (baselines).
struct LegendItem {
    name: String,
    color: Rgb,
    dashed: bool,
}

const PAD: i64 = 14;
const SWATCH: i64 = 26;

/// Lay out the legend items in rows within `width`; returns rows of (x offset, item index).
fn legend_rows(items: &[LegendItem], width: i64) -> Vec<Vec<(i64, usize)>> {
    let mut rows: Vec<Vec<(i64, usize)>> = Vec::new();
    let mut x = 0;
    for (i, item) in items.iter().enumerate() {
        let w = SWATCH + 6 + text_width(&item.name, TEXT_SCALE) + 20;
        if rows.is_empty() || (x + w > width && x > 0) {
            rows.push(Vec::new());
            x = 0;
        }
        rows.last_mut().expect("a row").push((x, i));
        x += w;
    }
    rows
}

/// `text` broken at spaces into lines at most `width` pixels wide (a longer word stays whole).
fn wrap(text: &str, width: i64, scale: i64) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for word in text.split(' ') {
        match lines.last_mut() {
            Some(l) if text_width(&format!("{l} {word}"), scale) <= width => {
                l.push(' ');
                l.push_str(word);
            }
            _ => lines.push(word.to_string()),
        }
    }
    lines
}

/// What [`draw_frame`] draws around a chart's plot.
struct Frame<'a> {
    title: &'a str,
    x_title: &'a str,
    y_title: &'a str,
    note: Option<&'a str>,
    legend: &'a [LegendItem],
    axis: &'a Axis,
    /// Lines of labels under the x axis.
    x_label_lines: i64,
}

/// The frame every chart shares: title, legend, axis titles, y ticks and grid. Returns the
/// plot rectangle (inside the axes) and the y axis.
fn draw_frame(canvas: &mut Canvas, area: Rect, f: &Frame<'_>) -> Rect {
    let Frame { title, x_title, y_title, note, legend, axis, x_label_lines } = *f;
    let th = text_height(TEXT_SCALE);
    let line = th + 6;
    // Title.
    let mut top = area.y + PAD;
    canvas.text_centered(area.x + area.w / 2, top, title, TEXT_SCALE, BLACK);
    top += line + 4;
    // Legend.
    let rows = legend_rows(legend, area.w - 2 * PAD);
    for row in &rows {
        let row_w =
            row.last().map(|&(x, i)| x + SWATCH + 6 + text_width(&legend[i].name, TEXT_SCALE)).unwrap_or(0);
        let x0 = area.x + (area.w - row_w) / 2;
        for &(x, i) in row {
            let it = &legend[i];
            let sx = x0 + x;
            if it.dashed {
                canvas.dashed_hline(sx, sx + SWATCH, top + th / 2, it.color, 3);
            } else {
                canvas.fill_rect(sx, top + 1, SWATCH, th - 2, it.color);
            }
            canvas.text(sx + SWATCH + 6, top, &it.name, TEXT_SCALE, BLACK);
        }
        top += line;
    }
    top += 6;
    // Bottom: x tick labels, x title, note.
    let mut bottom = area.bottom() - PAD;
    if let Some(n) = note {
        let lines = wrap(n, area.w - 2 * PAD, TEXT_SCALE);
        bottom -= lines.len() as i64 * line - 6;
        for (i, l) in lines.iter().enumerate() {
            canvas.text(area.x + PAD, bottom + i as i64 * line, l, TEXT_SCALE, DARK_GREY);
        }
        bottom -= 8;
    }
    if !x_title.is_empty() {
        bottom -= th;
        canvas.text_centered(area.x + area.w / 2, bottom, x_title, TEXT_SCALE, BLACK);
        bottom -= 8;
    }
    bottom -= x_label_lines * line + 6;
    // Left: y title (rotated), tick labels.
    let label_w = axis.ticks.iter().map(|(_, s)| text_width(s, TEXT_SCALE)).max().unwrap_or(0);
    let left = area.x + PAD + th + 10 + label_w + 10;
    let plot =
        Rect { x: left, y: top, w: (area.right() - PAD - 10 - left).max(10), h: (bottom - top).max(10) };
    let yt_w = text_width(y_title, TEXT_SCALE);
    canvas.text_up(area.x + PAD, plot.y + plot.h / 2 + yt_w / 2, y_title, TEXT_SCALE, BLACK);
    // Grid and y ticks.
    for &v in &axis.minor {
        let y = axis.y_px(v, plot);
        if y > plot.y && y < plot.bottom() - 1 {
            canvas.fill_rect(plot.x, y, plot.w, 1, lighten(LIGHT_GREY, 0.5));
        }
    }
    for (v, label) in &axis.ticks {
        let y = axis.y_px(*v, plot);
        canvas.fill_rect(plot.x, y, plot.w, 1, LIGHT_GREY);
        canvas.fill_rect(plot.x - 6, y, 6, 1, BLACK);
        canvas.text_right(plot.x - 10, y - CAP_H * TEXT_SCALE / 2, label, TEXT_SCALE, BLACK);
    }
    plot
}

/// Axes lines over the plot (drawn last so data does not hide them).
fn draw_axes(canvas: &mut Canvas, plot: Rect) {
    canvas.fill_rect(plot.x - 1, plot.y, 2, plot.h, BLACK);
    canvas.fill_rect(plot.x - 1, plot.bottom() - 1, plot.w + 1, 2, BLACK);
}

fn whisker(canvas: &mut Canvas, x: i64, y_lo: i64, y_hi: i64, half: i64) {
    if (y_lo - y_hi).abs() < 2 {
        return; // no spread to show
    }
    canvas.fill_rect(x, y_hi.min(y_lo), 2, (y_lo - y_hi).abs() + 1, DARK_GREY);
    canvas.fill_rect(x - half, y_hi, 2 * half + 2, 2, DARK_GREY);
    canvas.fill_rect(x - half, y_lo, 2 * half + 2, 2, DARK_GREY);
}

impl LineChart {
    /// Draw into `area`; returns the plot rectangle.
    pub fn draw(&self, canvas: &mut Canvas, area: Rect) -> Rect {
        let mut ys: Vec<f64> = self.baselines.iter().map(|b| b.y).collect();
        ys.extend(self.baselines.iter().filter_map(|b| b.range).flat_map(|(lo, hi)| [lo, hi]));
        ys.extend(&self.y_include);
        for s in &self.series {
            for p in &s.points {
                ys.push(p.y);
                if let Some((lo, hi)) = p.range {
                    ys.extend([lo, hi]);
                }
            }
        }
        let axis = Axis::fit(&ys, self.y_scale);
        let mut xs: Vec<f64> = self.series.iter().flat_map(|s| s.points.iter().map(|p| p.x)).collect();
        xs.sort_by(f64::total_cmp);
        xs.dedup();
        let legend: Vec<LegendItem> = self
            .series
            .iter()
            .map(|s| LegendItem { name: s.name.clone(), color: s.color, dashed: false })
            .chain(self.baselines.iter().map(|b| LegendItem {
                name: b.name.clone(),
                color: b.color,
                dashed: true,
            }))
            .collect();
        let frame = Frame {
            title: &self.title,
            x_title: &self.x_title,
            y_title: &self.y_title,
            note: self.note.as_deref(),
            legend: &legend,
            axis: &axis,
            x_label_lines: 1,
        };
        let plot = draw_frame(canvas, area, &frame);
        // X axis: the distinct x values, half a step of margin on each side.
        let (x_lo, x_hi) = match (xs.first(), xs.last()) {
            (Some(&a), Some(&b)) if b > a => (a, b),
            (Some(&a), _) => (a - 1.0, a + 1.0),
            _ => (0.0, 1.0),
        };
        let margin = (x_hi - x_lo) * 0.08;
        let x_px = |x: f64| {
            plot.x + ((x - x_lo + margin) / (x_hi - x_lo + 2.0 * margin) * (plot.w - 1) as f64).round() as i64
        };
        for &x in &xs {
            let px = x_px(x);
            canvas.fill_rect(px, plot.bottom(), 1, 6, BLACK);
            canvas.text_centered(px, plot.bottom() + 10, &trim(x), TEXT_SCALE, BLACK);
        }
        for b in &self.baselines {
            if let Some((lo, hi)) = b.range {
                let (top, bottom) = (axis.y_px(hi, plot), axis.y_px(lo, plot));
                canvas.fill_rect(plot.x, top, plot.w, bottom - top + 1, lighten(b.color, 0.85));
            }
        }
        for (v, _) in &axis.ticks {
            canvas.fill_rect(plot.x, axis.y_px(*v, plot), plot.w, 1, LIGHT_GREY);
        }
        for b in &self.baselines {
            canvas.dashed_hline(plot.x, plot.right(), axis.y_px(b.y, plot), b.color, 3);
        }
        for s in &self.series {
            let mut pts = s.points.clone();
            pts.sort_by(|a, b| a.x.total_cmp(&b.x));
            for w in pts.windows(2) {
                let (a, b) = (w[0], w[1]);
                canvas.line(x_px(a.x), axis.y_px(a.y, plot), x_px(b.x), axis.y_px(b.y, plot), s.color, 3);
            }
            for p in &pts {
                if let Some((lo, hi)) = p.range {
                    whisker(canvas, x_px(p.x) - 1, axis.y_px(lo, plot), axis.y_px(hi, plot), 6);
                }
            }
            for p in &pts {
                let (px, py) = (x_px(p.x), axis.y_px(p.y, plot));
                canvas.marker(px, py, 8, WHITE);
                canvas.marker(px, py, 6, s.color);
            }
        }
        draw_axes(canvas, plot);
        plot
    }
}

/// Where a [`BarChart`] put things, for tests.
#[derive(Debug, Clone)]
#[cfg_attr(not(test), allow(dead_code))]
pub struct BarLayout {
    /// Inside the axes.
    pub plot: Rect,
    /// `bars[series][group]`: the bar's rectangle, if it has a value.
    pub bars: Vec<Vec<Option<Rect>>>,
}

impl BarChart {
    /// Draw into `area`; returns where the bars are.
    pub fn draw(&self, canvas: &mut Canvas, area: Rect) -> BarLayout {
        let mut ys = Vec::new();
        for s in &self.series {
            ys.extend(s.values.iter().flatten());
            for (lo, hi) in s.ranges.iter().flatten() {
                ys.extend([*lo, *hi]);
            }
        }
        let axis = Axis::fit(&ys, self.y_scale);
        let legend: Vec<LegendItem> = self
            .series
            .iter()
            .filter(|s| !s.name.is_empty())
            .map(|s| LegendItem { name: s.name.clone(), color: s.color, dashed: false })
            .collect();
        let label_lines = if self.group_notes.iter().any(|n| !n.is_empty()) { 2 } else { 1 };
        let frame = Frame {
            title: &self.title,
            x_title: &self.x_title,
            y_title: &self.y_title,
            note: self.note.as_deref(),
            legend: &legend,
            axis: &axis,
            x_label_lines: label_lines,
        };
        let plot = draw_frame(canvas, area, &frame);
        let th = text_height(TEXT_SCALE);
        let groups = self.groups.len().max(1) as i64;
        let slot = plot.w / groups;
        let n = self.series.len().max(1) as i64;
        let inner = slot * 4 / 5;
        let bar_w = (inner / n).max(2);
        let base_y = plot.bottom() - 1;
        let mut bars = vec![vec![None; self.groups.len()]; self.series.len()];
        for (g, label) in self.groups.iter().enumerate() {
            let cx = plot.x + g as i64 * slot + slot / 2;
            canvas.text_centered(cx, plot.bottom() + 10, label, TEXT_SCALE, BLACK);
            if let Some(note) = self.group_notes.get(g).filter(|n| !n.is_empty()) {
                canvas.text_centered(cx, plot.bottom() + 10 + th + 6, note, TEXT_SCALE, DARK_GREY);
            }
            let x0 = cx - bar_w * n / 2;
            for (si, s) in self.series.iter().enumerate() {
                let Some(v) = s.values.get(g).copied().flatten() else { continue };
                let top = axis.y_px(v, plot).min(base_y);
                let color = s.bar_colors.get(g).copied().unwrap_or(s.color);
                let r = Rect { x: x0 + si as i64 * bar_w + 1, y: top, w: bar_w - 2, h: base_y - top + 1 };
                canvas.fill_rect(r.x, r.y, r.w, r.h, color);
                bars[si][g] = Some(r);
                let bar_cx = r.x + r.w / 2;
                if let Some((lo, hi)) = s.ranges.get(g).copied().flatten() {
                    whisker(canvas, bar_cx - 1, axis.y_px(lo, plot), axis.y_px(hi, plot), (r.w / 4).min(8));
                }
                if self.value_labels {
                    let text = short_number(v);
                    let tw = text_width(&text, TEXT_SCALE);
                    let above =
                        s.ranges.get(g).copied().flatten().map(|(_, hi)| axis.y_px(hi, plot)).unwrap_or(top);
                    if tw <= bar_w + 4 {
                        canvas.text(bar_cx - tw / 2, above.min(top) - th - 5, &text, TEXT_SCALE, BLACK);
                    }
                }
            }
        }
        draw_axes(canvas, plot);
        BarLayout { plot, bars }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &[u8]) -> (png::OutputInfo, Vec<u8>) {
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = decoder.read_info().expect("a PNG header");
        let mut buf = vec![0; reader.output_buffer_size().expect("a buffer size")];
        let info = reader.next_frame(&mut buf).expect("a PNG frame");
        buf.truncate(info.buffer_size());
        (info, buf)
    }

    fn line_chart() -> Chart {
        Chart::Line(LineChart {
            title: "Throughput vs channels".into(),
            x_title: "channels".into(),
            y_title: "Gbit/s".into(),
            series: vec![Series {
                name: "netchannel".into(),
                color: BLUE,
                points: vec![
                    Point { x: 1.0, y: 10.0, range: Some((9.0, 11.0)) },
                    Point { x: 2.0, y: 20.0, range: None },
                    Point { x: 4.0, y: 35.0, range: None },
                ],
            }],
            baselines: vec![Baseline {
                name: "tcp".into(),
                color: ORANGE,
                y: 15.0,
                range: Some((14.0, 16.0)),
            }],
            y_scale: Scale::Linear,
            y_include: vec![],
            note: Some("median of 3".into()),
        })
    }

    #[test]
    fn a_figure_renders_to_a_png_of_the_requested_size() {
        let bars = Chart::Bar(BarChart {
            title: "Latency".into(),
            x_title: String::new(),
            y_title: "us".into(),
            groups: vec!["p50".into(), "p99".into()],
            group_notes: vec![],
            series: vec![BarSeries {
                name: "tcp".into(),
                color: ORANGE,
                bar_colors: vec![],
                values: vec![Some(50.0), Some(1200.0)],
                ranges: vec![],
            }],
            y_scale: Scale::Log,
            value_labels: true,
            note: None,
        });
        let fig = Figure { width: 1000, height: 420, panels: vec![line_chart(), bars] };
        let png_bytes = fig.render().to_png().unwrap();
        let (info, pixels) = decode(&png_bytes);
        assert_eq!((info.width, info.height), (1000, 420));
        assert_eq!(info.color_type, png::ColorType::Rgb);
        assert_eq!(pixels.len(), 1000 * 420 * 3);
        // Something was drawn in the series' colour, and the background is white.
        assert!(pixels.chunks(3).any(|p| p == BLUE));
        assert_eq!(&pixels[..3], &WHITE);
    }

    #[test]
    fn bar_heights_are_proportional_to_their_values() {
        let chart = BarChart {
            title: "Rate".into(),
            x_title: "backend".into(),
            y_title: "connects/s".into(),
            groups: vec!["a".into(), "b".into(), "c".into()],
            group_notes: vec![],
            series: vec![BarSeries {
                name: String::new(),
                color: GREEN,
                bar_colors: vec![],
                values: vec![Some(100.0), Some(200.0), Some(400.0)],
                ranges: vec![],
            }],
            y_scale: Scale::Linear,
            value_labels: false,
            note: None,
        };
        let mut canvas = Canvas::new(600, 400, WHITE);
        let layout = chart.draw(&mut canvas, Rect { x: 0, y: 0, w: 600, h: 400 });
        let heights: Vec<i64> = layout.bars[0]
            .iter()
            .map(|r| {
                let r = r.expect("a bar per value");
                let x = (r.x + r.w / 2) as u32;
                // Count the bar's pixels in its middle column, walking up from the axis.
                let mut y = (layout.plot.y + layout.plot.h - 3) as u32;
                let mut n = 0;
                while canvas.pixel(x, y) == GREEN {
                    n += 1;
                    y -= 1;
                }
                // Just above the bar is no longer the bar.
                assert_ne!(canvas.pixel(x, y), GREEN);
                // Plus the two bottom rows, under the x axis line.
                n + 2
            })
            .collect();
        assert!(heights[0] > 20, "{heights:?}");
        for (i, want) in [(1, 2.0), (2, 4.0)] {
            let ratio = heights[i] as f64 / heights[0] as f64;
            assert!((ratio / want - 1.0).abs() < 0.03, "bar {i}: {heights:?}");
        }
        // The tallest bar nearly fills the axis (the range is 0..=nice(400 * 1.08)).
        let plot_h = layout.plot.h as f64;
        assert!(heights[2] as f64 > plot_h * 0.7, "{heights:?} in {plot_h}");
    }

    #[test]
    fn text_puts_glyph_pixels_where_expected() {
        let mut c = Canvas::new(40, 30, WHITE);
        // 'I' at scale 2: columns 1 and 3 hold the serifs, column 2 the full stem.
        let w = c.text(10, 5, "I", 2, BLACK);
        assert_eq!(w, 10);
        for row in 0..7 {
            for dy in 0..2 {
                let y = 5 + row * 2 + dy;
                assert_eq!(c.pixel(14, y), BLACK, "stem, row {row}");
                assert_eq!(c.pixel(15, y), BLACK, "stem, row {row}");
                assert_eq!(c.pixel(10, y), WHITE, "empty first column, row {row}");
            }
        }
        assert_eq!(c.pixel(12, 5), BLACK, "top serif");
        assert_eq!(c.pixel(12, 7), WHITE, "no serif in the second row");
        assert_eq!(c.pixel(12, 17), BLACK, "bottom serif");
        assert_eq!(c.pixel(14, 19), WHITE, "nothing below the glyph");
        // A space draws nothing; non-ASCII falls back to '?'.
        let mut blank = Canvas::new(20, 20, WHITE);
        blank.text(0, 0, " ", 2, BLACK);
        assert!((0..20).all(|x| (0..20).all(|y| blank.pixel(x, y) == WHITE)));
        assert_eq!(glyph('µ'), glyph('?'));
        assert_eq!(text_width("abc", 2), (3 * 6 - 1) * 2);
    }

    #[test]
    fn rotated_text_reads_bottom_to_top() {
        let mut c = Canvas::new(30, 40, WHITE);
        // 'L' rotated: its stem (font column 0) becomes the bottom row of the rotated glyph.
        c.text_up(5, 30, "L", 1, BLACK);
        for row in 0..7 {
            assert_eq!(c.pixel(5 + row, 29), BLACK, "stem pixel {row}");
        }
        // The foot (font row 6, columns 1..5) runs up along the right edge.
        for col in 1..5 {
            assert_eq!(c.pixel(11, 29 - col), BLACK, "foot pixel {col}");
        }
        assert_eq!(c.pixel(5, 28), WHITE);
    }

    #[test]
    fn axes_have_nice_ticks() {
        let a = Axis::fit(&[0.0, 37.0], Scale::Linear);
        assert_eq!(a.lo, 0.0);
        assert!(a.hi >= 37.0 && a.hi <= 50.0, "{a:?}");
        assert_eq!(a.ticks[0].1, "0");
        let a = Axis::fit(&[54.0, 3200.0], Scale::Log);
        assert_eq!((a.lo, a.hi), (10.0, 10000.0));
        let labels: Vec<&str> = a.ticks.iter().map(|(_, s)| s.as_str()).collect();
        assert_eq!(labels, ["10", "100", "1k", "10k"]);
        let a = Axis::fit(&[560_000.0], Scale::Linear);
        assert!(a.ticks.iter().any(|(_, s)| s.ends_with('k')), "{a:?}");
        assert_eq!(short_number(36.86), "36.9");
        assert_eq!(short_number(564_297.0), "564k");
        assert_eq!(short_number(1_234_567.0), "1.23M");
    }

    #[test]
    fn notes_wrap_at_spaces() {
        let w = text_width("reps; whiskers", 2);
        assert_eq!(wrap("median of 3 reps; whiskers", w, 2), ["median of 3", "reps; whiskers"]);
        assert_eq!(wrap("short", w, 2), ["short"]);
    }
}
