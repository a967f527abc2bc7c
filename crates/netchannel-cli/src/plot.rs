//! Charts drawn with `plotters`, each written as PNG (plotters' bitmap backend with the text
//! fix of [`raster`], encoded by the `png` crate) and as SVG (plotters' SVG backend, for a browser). Text is set in DejaVu Sans,
//! embedded in the binary by the `dejavu` crate and registered for plotters' `ab_glyph` text
//! support, so nothing is read from the system: no fontconfig, no freetype.
//!
//! What a chart shows is plain data: [`LineChart`] (numeric x, lines with markers, optional
//! min–max whiskers, horizontal baselines such as "Linux TCP" with their min–max as a band)
//! and [`BarChart`] (grouped bars, one colour per series, optional whiskers and value labels),
//! each with a title, a legend above the plot, ticks and axis titles, on a linear or log10 y
//! axis ([`Scale`]). A [`Figure`] puts one or more charts side by side. The ticks are chosen
//! here ([`Axis`]): round steps on a linear axis, whole decades (with a light grid at 2..9) on
//! a log axis, the data's own x values on a line chart's x axis. [`raster`] is the PNG backend.

pub mod raster;

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};
use plotters::coord::Shift;
use plotters::prelude::{
    ChartBuilder, ChartContext, Circle, Color, DashedLineSeries, DrawingArea, DrawingAreaErrorKind,
    DrawingBackend, EmptyElement, FontDesc, FontFamily, FontStyle, IntoDrawingArea, LineSeries, PathElement,
    RGBColor, Rectangle, SVGBackend, ShapeStyle, Text, TextStyle,
};
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::error::{Context, Result};

/// An RGB colour.
pub type Rgb = [u8; 3];

/// Background.
pub const WHITE: Rgb = [255, 255, 255];
/// Text, axes.
pub const BLACK: Rgb = [0, 0, 0];
/// Notes, whiskers.
pub const DARK_GREY: Rgb = [80, 80, 80];
/// Grid lines.
pub const LIGHT_GREY: Rgb = [215, 215, 215];
/// Series colours (the matplotlib "tab10" hues most readers know).
pub const BLUE: Rgb = [31, 119, 180];
/// See [`BLUE`].
pub const ORANGE: Rgb = [230, 120, 10];
/// See [`BLUE`].
pub const GREEN: Rgb = [44, 160, 44];
/// See [`BLUE`].
pub const PURPLE: Rgb = [148, 103, 189];
/// See [`BLUE`].
pub const RED: Rgb = [214, 39, 40];

/// `c` moved towards white by `amount` (0: unchanged, 1: white).
pub fn lighten(c: Rgb, amount: f64) -> Rgb {
    c.map(|v| (f64::from(v) + (255.0 - f64::from(v)) * amount).round() as u8)
}

fn rgb(c: Rgb) -> RGBColor {
    RGBColor(c[0], c[1], c[2])
}

/// Why a chart could not be made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChartError {
    /// The embedded font did not parse (a build problem, not the user's).
    Font(&'static str),
    /// plotters failed to draw.
    Draw(String),
    /// The PNG encoder failed.
    Encode(String),
}

impl std::fmt::Display for ChartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChartError::Font(which) => write!(f, "the embedded font {which} does not parse"),
            ChartError::Draw(e) => write!(f, "drawing failed: {e}"),
            ChartError::Encode(e) => write!(f, "PNG encoding failed: {e}"),
        }
    }
}

impl std::error::Error for ChartError {}

impl<E: std::error::Error + Send + Sync> From<DrawingAreaErrorKind<E>> for ChartError {
    fn from(e: DrawingAreaErrorKind<E>) -> Self {
        ChartError::Draw(e.to_string())
    }
}

/// Register DejaVu Sans (regular and bold) as plotters' "sans-serif", once.
fn fonts() -> std::result::Result<(), ChartError> {
    static REGISTERED: OnceLock<std::result::Result<(), ChartError>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let family = FontFamily::SansSerif.as_str();
            plotters::style::register_font(family, FontStyle::Normal, dejavu::sans::regular())
                .map_err(|_| ChartError::Font("DejaVu Sans"))?;
            plotters::style::register_font(family, FontStyle::Bold, dejavu::sans::bold())
                .map_err(|_| ChartError::Font("DejaVu Sans Bold"))
        })
        .clone()
}

/// Text sizes in pixels.
const TITLE_PX: f64 = 19.0;
const LABEL_PX: f64 = 15.0;
const NOTE_PX: f64 = 13.0;
/// Margin around a panel.
const PAD: i32 = 12;
/// Legend swatch width.
const SWATCH: i32 = 26;

fn font(px: f64, style: FontStyle) -> TextStyle<'static> {
    TextStyle::from(FontDesc::new(FontFamily::SansSerif, px, style))
}

/// Text of `px` pixels in `color`, anchored at `h`, `v`.
fn text_style(px: f64, color: &RGBColor, h: HPos, v: VPos) -> TextStyle<'static> {
    let mut s = font(px, FontStyle::Normal).pos(Pos::new(h, v));
    s.color = color.to_backend_color();
    s
}

/// How values map onto the y axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// Linear, from 0 (or the smallest value, if negative) up.
    Linear,
    /// Logarithmic (base 10), whole decades.
    Log,
}

/// An axis: its range, its labelled ticks and (log only) the values of its light grid lines.
/// It is the plotters coordinate of the charts, so plotters draws these ticks and no others.
#[derive(Debug, Clone)]
pub struct Axis {
    lo: f64,
    hi: f64,
    scale: Scale,
    ticks: Vec<(f64, String)>,
    minor: Vec<f64>,
}

impl Axis {
    /// A y axis holding every value of `values` (non-finite ones ignored).
    pub fn fit(values: &[f64], scale: Scale) -> Axis {
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
                let n = ((hi - lo) / step).round() as i64;
                let ticks = (0..=n)
                    .map(|i| {
                        let v = lo + i as f64 * step;
                        let label = if v == 0.0 {
                            "0".to_string()
                        } else {
                            format!("{:.*}{}", decimals, v / unit.0, unit.1)
                        };
                        (v, label)
                    })
                    .collect();
                Axis { lo, hi, scale, ticks, minor: Vec::new() }
            }
            Scale::Log => {
                let pos: Vec<f64> = finite.iter().copied().filter(|&v| v > 0.0).collect();
                let min = pos.iter().copied().fold(f64::INFINITY, f64::min);
                let max = pos.iter().copied().fold(0.0f64, f64::max);
                let (min, max) = if pos.is_empty() { (1.0, 10.0) } else { (min, max) };
                let lo = 10f64.powi(min.log10().floor() as i32);
                // Headroom above the largest value for whiskers and value labels; the top
                // need not be a whole decade, the bottom is one (bars grow from it).
                let hi = (max * 1.5).max(lo * 10.0);
                let mut ticks = Vec::new();
                let mut minor = Vec::new();
                let mut decade = lo;
                while decade <= hi * (1.0 + 1e-9) {
                    ticks.push((decade, si_label(decade)));
                    minor.extend((2..10).map(|m| f64::from(m) * decade).filter(|&v| v < hi));
                    decade *= 10.0;
                }
                // Under two decades, label the 2s and 5s as well.
                if ticks.len() < 3 {
                    let mantissa = |v: f64| (v / 10f64.powf(v.log10().floor())).round();
                    let (labelled, light): (Vec<f64>, Vec<f64>) =
                        minor.iter().partition(|&&v| [2.0, 5.0].contains(&mantissa(v)));
                    ticks.extend(labelled.into_iter().map(|v| (v, si_label(v))));
                    ticks.sort_by(|a, b| a.0.total_cmp(&b.0));
                    minor = light;
                }
                Axis { lo, hi, scale, ticks, minor }
            }
        }
    }

    /// A linear x axis with a tick at each distinct value of `xs`, and some margin either side.
    pub fn at_values(xs: &[f64]) -> Axis {
        let mut xs: Vec<f64> = xs.iter().copied().filter(|v| v.is_finite()).collect();
        xs.sort_by(f64::total_cmp);
        xs.dedup();
        let (lo, hi) = match (xs.first(), xs.last()) {
            (Some(&a), Some(&b)) if b > a => (a, b),
            (Some(&a), _) => (a - 1.0, a + 1.0),
            _ => (0.0, 1.0),
        };
        let margin = (hi - lo) * 0.08;
        Axis {
            lo: lo - margin,
            hi: hi + margin,
            scale: Scale::Linear,
            ticks: xs.iter().map(|&x| (x, trim(x))).collect(),
            minor: Vec::new(),
        }
    }

    /// A category axis: `labels[i]` at `i + 0.5`, over `0..labels.len()`.
    pub fn categories(labels: &[String]) -> Axis {
        Axis {
            lo: 0.0,
            hi: labels.len().max(1) as f64,
            scale: Scale::Linear,
            ticks: labels.iter().enumerate().map(|(i, l)| (i as f64 + 0.5, l.clone())).collect(),
            minor: Vec::new(),
        }
    }

    /// The labels of the ticks, in order.
    #[cfg(test)]
    fn labels(&self) -> Vec<&str> {
        self.ticks.iter().map(|(_, s)| s.as_str()).collect()
    }

    /// The label of the tick at `v` (plotters asks by value).
    fn label(&self, v: f64) -> String {
        let tol = (self.hi - self.lo).abs() * 1e-9;
        self.ticks.iter().find(|(t, _)| (t - v).abs() <= tol).map(|(_, s)| s.clone()).unwrap_or_default()
    }

    /// Where `v` lies: 0 at `lo`, 1 at `hi` (clamped a little beyond, so nothing is drawn far
    /// outside the plot).
    fn frac(&self, v: f64) -> f64 {
        let f = match self.scale {
            Scale::Linear => (v - self.lo) / (self.hi - self.lo),
            Scale::Log if v <= 0.0 => 0.0,
            Scale::Log => (v.log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10()),
        };
        f.clamp(-0.02, 1.02)
    }
}

impl Ranged for Axis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        limit.0 + (self.frac(*v) * f64::from(limit.1 - limit.0)).round() as i32
    }

    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            self.minor.clone()
        } else {
            self.ticks.iter().map(|(v, _)| *v).collect()
        }
    }

    fn range(&self) -> Range<f64> {
        self.lo..self.hi
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
    /// Labelled x ticks `(x, label)`; empty: a tick at each x value of the data, labelled
    /// with it.
    pub x_ticks: Vec<(f64, String)>,
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

type Drawn<T = ()> = std::result::Result<T, ChartError>;

impl Figure {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Drawn {
        root.fill(&rgb(WHITE))?;
        let areas = root.split_evenly((1, self.panels.len().max(1)));
        let frames: Vec<Frame> = self
            .panels
            .iter()
            .map(|p| match p {
                Chart::Line(c) => c.frame(),
                Chart::Bar(c) => c.frame(),
            })
            .collect();
        // One header and one footer height for all panels, so their plots line up.
        let header = frames.iter().zip(&areas).map(|(f, a)| f.header(a)).max().unwrap_or(0);
        let footer = frames.iter().zip(&areas).map(|(f, a)| f.footer(a)).max().unwrap_or(0);
        for ((panel, frame), area) in self.panels.iter().zip(&frames).zip(&areas) {
            let plot_area = frame.draw(area, header, footer)?;
            match panel {
                Chart::Line(c) => c.draw(area, &plot_area)?,
                Chart::Bar(c) => c.draw(area, &plot_area)?,
            }
        }
        root.present()?;
        Ok(())
    }

    /// The figure as an 8-bit RGB PNG file.
    pub fn to_png(&self) -> Drawn<Vec<u8>> {
        fonts()?;
        let (w, h) = (self.width, self.height);
        let mut pixels = vec![255u8; w as usize * h as usize * 3];
        {
            let root = raster::Raster::new(&mut pixels, (w, h))?.into_drawing_area();
            self.draw(&root)?;
        }
        let mut out = Vec::new();
        let enc_err = |e: png::EncodingError| ChartError::Encode(e.to_string());
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().map_err(enc_err)?;
        writer.write_image_data(&pixels).map_err(enc_err)?;
        writer.finish().map_err(enc_err)?;
        Ok(out)
    }

    /// The figure as an SVG document (text as `<text>` in the sans-serif family, so a browser
    /// sets it in its own font).
    pub fn to_svg(&self) -> Drawn<String> {
        fonts()?;
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (self.width, self.height)).into_drawing_area();
            self.draw(&root)?;
        }
        Ok(svg)
    }

    /// Write the figure as `dir/NAME.png` and `dir/NAME.svg`; returns the two paths.
    pub fn save(&self, dir: &Path, name: &str) -> Result<[PathBuf; 2]> {
        let png_path = dir.join(format!("{name}.png"));
        let svg_path = dir.join(format!("{name}.svg"));
        let bytes =
            self.to_png().map_err(|e| format!("cannot draw the chart {}: {e}", png_path.display()))?;
        std::fs::write(&png_path, bytes).context(|| format!("cannot write {}", png_path.display()))?;
        let svg = self.to_svg().map_err(|e| format!("cannot draw the chart {}: {e}", svg_path.display()))?;
        std::fs::write(&svg_path, svg).context(|| format!("cannot write {}", svg_path.display()))?;
        Ok([png_path, svg_path])
    }
}

/// A legend entry: a filled swatch (bars, lines) or a dashed stroke (baselines).
struct LegendItem {
    name: String,
    color: Rgb,
    dashed: bool,
}

/// `text` broken at spaces into lines whose width, by `width_of`, is at most `width` (a longer
/// word stays whole).
fn wrap(text: &str, width: u32, width_of: impl Fn(&str) -> u32) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for word in text.split(' ') {
        match lines.last_mut() {
            Some(l) if width_of(&format!("{l} {word}")) <= width => {
                l.push(' ');
                l.push_str(word);
            }
            _ => lines.push(word.to_string()),
        }
    }
    lines
}

/// The width of `text` in `style`, as plotters lays it out.
fn text_width<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, text: &str, style: &TextStyle<'_>) -> u32 {
    area.estimate_text_size(text, style).map(|(w, _)| w).unwrap_or(0)
}

/// What every chart has around its plot: the title and the legend rows at the top, the note
/// at the bottom.
struct Frame {
    title: String,
    legend: Vec<LegendItem>,
    note: Option<String>,
}

/// Space between legend items, and the height of a legend row and of a note line.
const LEGEND_GAP: i32 = 20;
const LEGEND_ROW: i32 = LABEL_PX as i32 + 9;
const NOTE_LINE: i32 = NOTE_PX as i32 + 5;

impl Frame {
    fn legend_style() -> TextStyle<'static> {
        text_style(LABEL_PX, &rgb(BLACK), HPos::Left, VPos::Center)
    }

    fn note_style() -> TextStyle<'static> {
        text_style(NOTE_PX, &rgb(DARK_GREY), HPos::Left, VPos::Top)
    }

    fn item_width<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, item: &LegendItem) -> i32 {
        SWATCH + 6 + text_width(area, &item.name, &Frame::legend_style()) as i32
    }

    /// The legend items in rows that fit the width of `area`.
    fn legend_rows<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Vec<Vec<&LegendItem>> {
        let w = area.dim_in_pixel().0 as i32;
        let mut rows: Vec<Vec<&LegendItem>> = Vec::new();
        let mut x = 0;
        for it in &self.legend {
            let iw = Frame::item_width(area, it);
            if rows.is_empty() || (x > 0 && x + LEGEND_GAP + iw > w - 2 * PAD) {
                rows.push(Vec::new());
                x = 0;
            } else if x > 0 {
                x += LEGEND_GAP;
            }
            rows.last_mut().expect("a row").push(it);
            x += iw;
        }
        rows
    }

    /// The note broken into lines that fit the width of `area`.
    fn note_lines<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Vec<String> {
        let w = area.dim_in_pixel().0 as i32;
        let style = Frame::note_style();
        let width_of = |s: &str| text_width(area, s, &style);
        self.note.as_deref().map(|n| wrap(n, (w - 2 * PAD) as u32, width_of)).unwrap_or_default()
    }

    /// Pixels above the plot: the title and the legend rows.
    fn header<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> i32 {
        PAD + TITLE_PX as i32 + 12 + self.legend_rows(area).len() as i32 * LEGEND_ROW + 4
    }

    /// Pixels under the plot: the note's lines.
    fn footer<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> i32 {
        match self.note_lines(area).len() as i32 {
            0 => PAD,
            n => PAD + n * NOTE_LINE + 6,
        }
    }

    /// Draw the frame into `area`, keeping `header` pixels at the top and `footer` at the
    /// bottom (at least its own: panels side by side share the largest, so their plots line
    /// up). Returns the area left for the plot with its axes.
    fn draw<DB: DrawingBackend>(
        &self,
        area: &DrawingArea<DB, Shift>,
        header: i32,
        footer: i32,
    ) -> Drawn<DrawingArea<DB, Shift>> {
        let (w, h) = area.dim_in_pixel();
        let (w, h) = (w as i32, h as i32);
        let black = rgb(BLACK);
        let mut title_style = font(TITLE_PX, FontStyle::Bold).pos(Pos::new(HPos::Center, VPos::Top));
        title_style.color = black.to_backend_color();
        area.draw(&Text::new(self.title.clone(), (w / 2, PAD), title_style))?;

        // Legend: rows of (swatch, name), each row centred.
        let mut top = PAD + TITLE_PX as i32 + 12;
        for row in self.legend_rows(area) {
            let row_w: i32 = row.iter().map(|it| Frame::item_width(area, it)).sum::<i32>()
                + LEGEND_GAP * (row.len() as i32 - 1);
            let mut x = (w - row_w) / 2;
            let cy = top + LEGEND_ROW / 2;
            for it in row {
                let c = rgb(it.color);
                if it.dashed {
                    for dx in (0..SWATCH).step_by(10) {
                        let seg = [(x + dx, cy), (x + (dx + 6).min(SWATCH), cy)];
                        area.draw(&PathElement::new(seg, ShapeStyle::from(&c).stroke_width(3)))?;
                    }
                } else {
                    area.draw(&Rectangle::new([(x, cy - 6), (x + SWATCH, cy + 6)], c.filled()))?;
                }
                area.draw(&Text::new(it.name.clone(), (x + SWATCH + 6, cy), Frame::legend_style()))?;
                x += Frame::item_width(area, it) + LEGEND_GAP;
            }
            top += LEGEND_ROW;
        }

        // Note: wrapped small print along the bottom.
        let lines = self.note_lines(area);
        let first = h - PAD - lines.len() as i32 * NOTE_LINE;
        for (i, l) in lines.iter().enumerate() {
            area.draw(&Text::new(l.clone(), (PAD, first + i as i32 * NOTE_LINE), Frame::note_style()))?;
        }
        let (header, footer) = (header.max(self.header(area)), footer.max(self.footer(area)));
        Ok(area.clone().shrink((0, header), (w, (h - header - footer).max(20))))
    }
}

/// Tick marks' length in pixels; plotters puts labels at twice that from the axis.
const TICK: i32 = 5;

/// Room for the y axis: the widest tick label, the gap, the rotated title.
fn y_label_area<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, axis: &Axis) -> u32 {
    let label = font(LABEL_PX, FontStyle::Normal);
    let widest = axis.ticks.iter().map(|(_, s)| text_width(area, s, &label)).max().unwrap_or(0);
    widest + 2 * TICK as u32 + LABEL_PX as u32 + 14
}

/// The coordinates and the mesh every chart shares in `plot_area` (inside the panel `area`):
/// room under the plot for the x tick labels, `extra_lines` more lines of them and the x
/// title, beside it for the y tick labels and title; a light grey grid at the y ticks
/// (lighter at a log axis' 2..9), black axes.
fn axes<'a, DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    plot_area: &'a DrawingArea<DB, Shift>,
    x: &Axis,
    y: &Axis,
    x_title: &str,
    y_title: &str,
    extra_lines: u32,
) -> Drawn<Plot<'a, DB>> {
    let label = LABEL_PX as u32;
    let x_area = 2 * TICK as u32
        + label
        + 8
        + extra_lines * (label + 6)
        + if x_title.is_empty() { 0 } else { label + 2 };
    let mut chart = ChartBuilder::on(plot_area)
        .margin_left(PAD)
        .margin_right(PAD + 8)
        .margin_top(8)
        .x_label_area_size(x_area)
        .y_label_area_size(y_label_area(area, y))
        .build_cartesian_2d(x.clone(), y.clone())?;
    let black = rgb(BLACK);
    let x_fmt = |v: &f64| x.label(*v);
    let y_fmt = |v: &f64| y.label(*v);
    let mut mesh = chart.configure_mesh();
    mesh.disable_x_mesh()
        .set_all_tick_mark_size(TICK)
        .label_style(text_style(LABEL_PX, &black, HPos::Center, VPos::Center))
        .axis_desc_style(text_style(LABEL_PX, &black, HPos::Center, VPos::Center))
        .axis_style(ShapeStyle::from(&black).stroke_width(1))
        .bold_line_style(rgb(LIGHT_GREY))
        .light_line_style(rgb(lighten(LIGHT_GREY, 0.55)))
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&y_fmt);
    if !x_title.is_empty() {
        mesh.x_desc(x_title);
    }
    if !y_title.is_empty() {
        mesh.y_desc(y_title);
    }
    mesh.draw()?;
    Ok(chart)
}

type Plot<'a, DB> = ChartContext<'a, DB, plotters::coord::cartesian::Cartesian2d<Axis, Axis>>;

/// A vertical min–max whisker at `x` with caps `half` wide (in x units); nothing when the
/// spread is under 3 pixels (one repetition, or all alike), where it would only look like a
/// border.
fn whisker<DB: DrawingBackend>(
    chart: &Plot<'_, DB>,
    x: f64,
    (lo, hi): (f64, f64),
    half: f64,
) -> Vec<PathElement<(f64, f64)>> {
    if (chart.backend_coord(&(x, lo)).1 - chart.backend_coord(&(x, hi)).1).abs() < 3 {
        return Vec::new();
    }
    let style = ShapeStyle::from(&rgb(DARK_GREY)).stroke_width(2);
    vec![
        PathElement::new(vec![(x, lo), (x, hi)], style),
        PathElement::new(vec![(x - half, lo), (x + half, lo)], style),
        PathElement::new(vec![(x - half, hi), (x + half, hi)], style),
    ]
}

/// "no data" in the middle of an empty plot (every run of it failed or was skipped).
fn no_data<DB: DrawingBackend>(chart: &mut Plot<'_, DB>, x: &Axis, y: &Axis) -> Drawn {
    let mid_y = match y.scale {
        Scale::Linear => (y.lo + y.hi) / 2.0,
        Scale::Log => (y.lo * y.hi).sqrt(),
    };
    let grey = rgb(DARK_GREY);
    let style = text_style(TITLE_PX, &grey, HPos::Center, VPos::Center);
    chart.draw_series(std::iter::once(Text::new("no data", ((x.lo + x.hi) / 2.0, mid_y), style)))?;
    Ok(())
}

impl LineChart {
    /// The y axis: every value, whisker and baseline band, and `y_include`.
    fn y_axis(&self) -> Axis {
        let mut ys: Vec<f64> = self.baselines.iter().map(|b| b.y).collect();
        ys.extend(self.baselines.iter().filter_map(|b| b.range).flat_map(|(lo, hi)| [lo, hi]));
        ys.extend(&self.y_include);
        for p in self.series.iter().flat_map(|s| &s.points) {
            ys.push(p.y);
            ys.extend(p.range.iter().flat_map(|&(lo, hi)| [lo, hi]));
        }
        Axis::fit(&ys, self.y_scale)
    }

    /// Title, legend (lines, then the dashed baselines) and note.
    fn frame(&self) -> Frame {
        let legend = self
            .series
            .iter()
            .map(|s| LegendItem { name: s.name.clone(), color: s.color, dashed: false })
            .chain(self.baselines.iter().map(|b| LegendItem {
                name: b.name.clone(),
                color: b.color,
                dashed: true,
            }))
            .collect();
        Frame { title: self.title.clone(), legend, note: self.note.clone() }
    }

    /// Draw the plot with its axes into `plot_area`, inside the panel `area`.
    fn draw<DB: DrawingBackend>(
        &self,
        area: &DrawingArea<DB, Shift>,
        plot_area: &DrawingArea<DB, Shift>,
    ) -> Drawn {
        let y = self.y_axis();
        let xs: Vec<f64> = self.series.iter().flat_map(|s| s.points.iter().map(|p| p.x)).collect();
        let mut x = Axis::at_values(&xs);
        if !self.x_ticks.is_empty() {
            x.ticks.clone_from(&self.x_ticks);
        }
        let mut chart = axes(area, plot_area, &x, &y, &self.x_title, &self.y_title, 0)?;
        if self.baselines.is_empty() && self.series.iter().all(|s| s.points.is_empty()) {
            no_data(&mut chart, &x, &y)?;
        }
        for b in &self.baselines {
            if let Some((lo, hi)) = b.range {
                let band = rgb(b.color).mix(0.18).filled();
                chart.draw_series(std::iter::once(Rectangle::new([(x.lo, lo), (x.hi, hi)], band)))?;
            }
            let style = ShapeStyle::from(&rgb(b.color)).stroke_width(3);
            chart.draw_series(DashedLineSeries::new([(x.lo, b.y), (x.hi, b.y)], 12, 7, style))?;
        }
        for s in &self.series {
            let mut pts = s.points.clone();
            pts.sort_by(|a, b| a.x.total_cmp(&b.x));
            let color = rgb(s.color);
            chart.draw_series(LineSeries::new(pts.iter().map(|p| (p.x, p.y)), color.stroke_width(3)))?;
            let half = (x.hi - x.lo) * 0.012;
            let whiskers: Vec<_> =
                pts.iter().filter_map(|p| p.range.map(|r| whisker(&chart, p.x, r, half))).flatten().collect();
            chart.draw_series(whiskers)?;
            chart.draw_series(pts.iter().map(|p| Circle::new((p.x, p.y), 7, rgb(WHITE).filled())))?;
            chart.draw_series(pts.iter().map(|p| Circle::new((p.x, p.y), 5, color.filled())))?;
        }
        Ok(())
    }
}

impl BarChart {
    /// The y axis: every value and whisker.
    fn y_axis(&self) -> Axis {
        let mut ys = Vec::new();
        for s in &self.series {
            ys.extend(s.values.iter().flatten());
            ys.extend(s.ranges.iter().flatten().flat_map(|&(lo, hi)| [lo, hi]));
        }
        // Room above the tallest bar for its value label.
        if self.value_labels && self.y_scale == Scale::Linear {
            let max = ys.iter().copied().fold(0.0f64, f64::max);
            ys.push(max * 1.1);
        }
        Axis::fit(&ys, self.y_scale)
    }

    /// Where bar `si` of group `g` lies along x: (left, right).
    fn bar_span(&self, g: usize, si: usize) -> (f64, f64) {
        let n = self.series.len().max(1) as f64;
        let w = 0.8 / n;
        let left = g as f64 + 0.1 + si as f64 * w;
        (left + w * 0.06, left + w * 0.94)
    }

    /// Title, legend (the named series) and note.
    fn frame(&self) -> Frame {
        let legend = self
            .series
            .iter()
            .filter(|s| !s.name.is_empty())
            .map(|s| LegendItem { name: s.name.clone(), color: s.color, dashed: false })
            .collect();
        Frame { title: self.title.clone(), legend, note: self.note.clone() }
    }

    /// Draw the plot with its axes into `plot_area`, inside the panel `area`.
    fn draw<DB: DrawingBackend>(
        &self,
        area: &DrawingArea<DB, Shift>,
        plot_area: &DrawingArea<DB, Shift>,
    ) -> Drawn {
        let y = self.y_axis();
        let x = Axis::categories(&self.groups);
        let has_notes = self.group_notes.iter().any(|n| !n.is_empty());
        let notes = u32::from(has_notes);
        let mut chart = axes(area, plot_area, &x, &y, &self.x_title, &self.y_title, notes)?;
        if self.series.iter().all(|s| s.values.iter().all(Option::is_none)) {
            no_data(&mut chart, &x, &y)?;
        }
        let black = rgb(BLACK);
        let value_style = text_style(NOTE_PX, &black, HPos::Center, VPos::Bottom);
        for (si, s) in self.series.iter().enumerate() {
            for (g, v) in s.values.iter().enumerate() {
                let Some(v) = *v else { continue };
                let (l, r) = self.bar_span(g, si);
                let color = rgb(s.bar_colors.get(g).copied().unwrap_or(s.color));
                chart.draw_series(std::iter::once(Rectangle::new([(l, y.lo), (r, v)], color.filled())))?;
                let range = s.ranges.get(g).copied().flatten();
                let cx = (l + r) / 2.0;
                if let Some(range) = range {
                    let w = whisker(&chart, cx, range, ((r - l) / 4.0).min(0.03));
                    chart.draw_series(w)?;
                }
                if self.value_labels {
                    let text = short_number(v);
                    let bar_px = chart.backend_coord(&(r, v)).0 - chart.backend_coord(&(l, v)).0;
                    if text_width(area, &text, &value_style) as i32 <= bar_px + 6 {
                        let top = range.map_or(v, |(_, hi)| hi.max(v));
                        let label =
                            EmptyElement::at((cx, top)) + Text::new(text, (0, -4), value_style.clone());
                        chart.draw_series(std::iter::once(label))?;
                    }
                }
            }
        }
        // The second line under each group label, below plotters' tick labels.
        if has_notes {
            let grey = rgb(DARK_GREY);
            let style = text_style(LABEL_PX, &grey, HPos::Center, VPos::Top);
            let (ox, oy) = area.get_base_pixel();
            for (g, n) in self.group_notes.iter().enumerate().filter(|(_, n)| !n.is_empty()) {
                let (px, py) = chart.backend_coord(&(g as f64 + 0.5, y.lo));
                let at = (px - ox, py - oy + 2 * TICK + LABEL_PX as i32 + 6);
                area.draw(&Text::new(n.clone(), at, style.clone()))?;
            }
        }
        Ok(())
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
            x_ticks: vec![],
            note: Some("median of 3".into()),
        })
    }

    fn bars(colors: Vec<Rgb>, values: Vec<f64>, scale: Scale) -> BarChart {
        BarChart {
            title: "Rate".into(),
            x_title: "backend".into(),
            y_title: "connects/s".into(),
            groups: (0..values.len()).map(|i| format!("g{i}")).collect(),
            group_notes: vec![],
            series: vec![BarSeries {
                name: String::new(),
                color: GREEN,
                bar_colors: colors,
                values: values.into_iter().map(Some).collect(),
                ranges: vec![],
            }],
            y_scale: scale,
            value_labels: false,
            note: None,
        }
    }

    #[test]
    fn a_figure_renders_to_a_png_of_the_requested_size_with_its_series_drawn() {
        let bar = Chart::Bar(BarChart {
            series: vec![BarSeries {
                name: "tcp".into(),
                color: ORANGE,
                bar_colors: vec![],
                values: vec![Some(50.0), Some(1200.0)],
                ranges: vec![],
            }],
            y_scale: Scale::Log,
            value_labels: true,
            ..bars(vec![], vec![], Scale::Log)
        });
        let fig = Figure { width: 1000, height: 420, panels: vec![line_chart(), bar] };
        let (info, pixels) = decode(&fig.to_png().unwrap());
        assert_eq!((info.width, info.height), (1000, 420));
        assert_eq!(info.color_type, png::ColorType::Rgb);
        assert_eq!(pixels.len(), 1000 * 420 * 3);
        let count = |c: Rgb| pixels.chunks(3).filter(|p| *p == c).count();
        // The line and its markers in blue, the bars in orange, text and axes in black, on white.
        assert!(count(BLUE) > 200, "{}", count(BLUE));
        assert!(count(ORANGE) > 2000, "{}", count(ORANGE));
        assert!(count(BLACK) > 500, "{}", count(BLACK));
        assert_eq!(&pixels[..3], &WHITE);
        // Text is anti-aliased: there are greys that no element of the chart has as its colour.
        assert!(pixels.chunks(3).any(|p| p[0] == p[1] && p[1] == p[2] && p[0] > 40 && p[0] < 200));
    }

    /// The texts of an SVG document, trimmed, in order; panics if it is not well-formed XML.
    fn svg_texts(svg: &str) -> Vec<String> {
        let doc = roxmltree::Document::parse(svg).unwrap_or_else(|e| panic!("the SVG does not parse: {e}"));
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        doc.descendants()
            .filter(|n| n.has_tag_name("text"))
            .map(|n| n.text().unwrap_or_default().trim().to_string())
            .collect()
    }

    #[test]
    fn the_svg_holds_the_titles_legend_and_ticks_as_text() {
        let fig = Figure { width: 800, height: 500, panels: vec![line_chart()] };
        let svg = fig.to_svg().unwrap();
        let texts = svg_texts(&svg);
        for text in [
            "Throughput vs channels",
            "netchannel",
            "tcp",
            "channels",
            "Gbit/s",
            "median of 3",
            "1",
            "2",
            "4",
        ] {
            assert!(texts.iter().any(|t| t == text), "no text {text:?} in the SVG: {texts:?}");
        }
        assert!(svg.contains(r#"font-family="sans-serif""#), "text is in the sans-serif family");
    }

    #[test]
    fn x_ticks_replace_the_data_values_as_labels() {
        let Chart::Line(mut chart) = line_chart() else { unreachable!() };
        for p in &mut chart.series[0].points {
            p.x = p.x.log2(); // 1, 2, 4 at 0, 1, 2
        }
        chart.x_ticks = vec![(0.0, "-P 1".into()), (1.0, "-P 2".into()), (2.0, "-P 4".into())];
        let fig = Figure { width: 800, height: 500, panels: vec![Chart::Line(chart)] };
        let texts = svg_texts(&fig.to_svg().unwrap());
        for label in ["-P 1", "-P 2", "-P 4"] {
            assert!(texts.iter().any(|t| t == label), "no x label {label:?}: {texts:?}");
        }
        // The data's own x values (0, 1, 2; the y axis has 0) are not labels.
        assert!(!texts.iter().any(|t| t == "1" || t == "2"), "{texts:?}");
    }

    /// The heights, in pixels, of the tallest column of each colour in `colors`.
    fn column_heights(fig: &Figure, colors: &[Rgb]) -> Vec<usize> {
        let (info, px) = decode(&fig.to_png().unwrap());
        let (w, h) = (info.width as usize, info.height as usize);
        colors
            .iter()
            .map(|&c| {
                (0..w).map(|x| (0..h).filter(|&y| px[(y * w + x) * 3..][..3] == c).count()).max().unwrap_or(0)
            })
            .collect()
    }

    #[test]
    fn bar_heights_are_proportional_to_their_values() {
        let colors = vec![GREEN, PURPLE, RED];
        let chart = bars(colors.clone(), vec![100.0, 200.0, 400.0], Scale::Linear);
        let fig = Figure { width: 600, height: 400, panels: vec![Chart::Bar(chart)] };
        let heights = column_heights(&fig, &colors);
        assert!(heights[0] > 20, "{heights:?}");
        for (i, want) in [(1, 2.0), (2, 4.0)] {
            let ratio = heights[i] as f64 / heights[0] as f64;
            assert!((ratio / want - 1.0).abs() < 0.03, "bar {i}: {heights:?}");
        }
    }

    #[test]
    fn log_bars_grow_by_decades() {
        let colors = vec![GREEN, PURPLE, RED];
        let chart = bars(colors.clone(), vec![10.0, 100.0, 1000.0], Scale::Log);
        let fig = Figure { width: 600, height: 400, panels: vec![Chart::Bar(chart)] };
        let heights = column_heights(&fig, &colors);
        // Bars start at the bottom of the axis (10^1 here, so the first one is empty): each
        // decade adds the same height.
        assert!(heights[1] > 20, "{heights:?}");
        let d = heights[2] as f64 - heights[1] as f64;
        assert!((d / heights[1] as f64 - 1.0).abs() < 0.05, "{heights:?}");
    }

    #[test]
    fn axes_have_nice_ticks() {
        let a = Axis::fit(&[0.0, 37.0], Scale::Linear);
        assert_eq!(a.lo, 0.0);
        assert!(a.hi >= 37.0 && a.hi <= 50.0, "{a:?}");
        assert_eq!(a.labels()[0], "0");
        let a = Axis::fit(&[54.0, 3200.0], Scale::Log);
        // Whole decades from the one under the smallest value; headroom above the largest.
        assert_eq!((a.lo, a.hi), (10.0, 4800.0));
        assert_eq!(a.labels(), ["10", "100", "1k"]);
        assert_eq!(a.minor.len(), 2 * 8 + 3, "{a:?}");
        assert!(a.minor.iter().all(|&m| m > 10.0 && m < 4800.0), "{a:?}");
        let a = Axis::fit(&[], Scale::Log);
        assert_eq!((a.lo, a.hi), (1.0, 15.0));
        let a = Axis::fit(&[23.0, 70.0], Scale::Log);
        assert_eq!(a.labels(), ["10", "20", "50", "100"]);
        assert!(!a.minor.contains(&20.0) && a.minor.contains(&30.0), "{a:?}");
        let a = Axis::fit(&[560_000.0], Scale::Linear);
        assert!(a.labels().iter().any(|s| s.ends_with('k')), "{a:?}");
        let a = Axis::at_values(&[4.0, 1.0, 2.0, 4.0]);
        assert_eq!(a.labels(), ["1", "2", "4"]);
        assert!(a.lo < 1.0 && a.hi > 4.0, "{a:?}");
        assert_eq!(a.label(2.0), "2");
        assert_eq!(a.label(3.0), "");
        assert_eq!(short_number(36.86), "36.9");
        assert_eq!(short_number(564_297.0), "564k");
        assert_eq!(short_number(1_234_567.0), "1.23M");
    }

    #[test]
    fn notes_wrap_at_spaces() {
        let width_of = |s: &str| s.len() as u32;
        assert_eq!(wrap("median of 3 reps; whiskers", 14, width_of), ["median of 3", "reps; whiskers"]);
        assert_eq!(wrap("short", 14, width_of), ["short"]);
    }
}
