//! The PNG drawing backend: plotters' [`BitMapBackend`] with its text set properly. plotters'
//! `ab_glyph` text drawing puts each glyph's ink at the pen position, ignoring the glyph's
//! left side bearing, so words come out with uneven gaps ("Linu x TCP", "NetChann el").
//! [`Raster`] forwards every drawing call to the bitmap backend except text, which it lays out
//! with `ab_glyph` itself (advance, kerning and side bearing of each glyph, from the same
//! embedded DejaVu Sans) and blends by ab_glyph's coverage; anchors and rotations mean what
//! they mean to plotters.

use ab_glyph::{point, Font, FontRef, PxScale, ScaleFont};
use plotters::prelude::BitMapBackend;
use plotters_backend::text_anchor::{HPos, VPos};
use plotters_backend::{
    BackendColor, BackendCoord, BackendStyle, BackendTextStyle, DrawingBackend, DrawingErrorKind, FontStyle,
};

use super::ChartError;

/// A bitmap backend whose text is laid out by [`Raster::layout`].
pub struct Raster<'a> {
    inner: BitMapBackend<'a>,
    regular: FontRef<'static>,
    bold: FontRef<'static>,
}

type Drawn<E> = Result<(), DrawingErrorKind<E>>;

/// One glyph pixel: position from the text box's top left corner, and coverage (0..=1).
struct Ink {
    x: i32,
    y: i32,
    coverage: f32,
}

impl<'a> Raster<'a> {
    /// Draw into `pixels`, an 8-bit RGB buffer of `size`.
    pub fn new(pixels: &'a mut [u8], size: (u32, u32)) -> Result<Raster<'a>, ChartError> {
        Ok(Raster {
            inner: BitMapBackend::with_buffer(pixels, size),
            regular: FontRef::try_from_slice(dejavu::sans::regular())
                .map_err(|_| ChartError::Font("DejaVu Sans"))?,
            bold: FontRef::try_from_slice(dejavu::sans::bold())
                .map_err(|_| ChartError::Font("DejaVu Sans Bold"))?,
        })
    }

    fn font(&self, style: FontStyle) -> &FontRef<'static> {
        match style {
            FontStyle::Bold => &self.bold,
            _ => &self.regular,
        }
    }

    /// Lay out `text` at `px` pixels (the height from descender to ascender, as plotters
    /// means a font size): the size of its box, and its ink if `ink` is given.
    fn layout(font: &FontRef<'static>, px: f64, text: &str, mut ink: Option<&mut Vec<Ink>>) -> (u32, u32) {
        let font = font.as_scaled(PxScale::from(px as f32));
        let ascent = font.ascent();
        let mut pen = 0.0f32;
        let mut prev = None;
        for c in text.chars() {
            let id = font.glyph_id(c);
            if let Some(p) = prev {
                pen += font.kern(p, id);
            }
            if let Some(ink) = ink.as_deref_mut() {
                let glyph = id.with_scale_and_position(font.scale(), point(pen, ascent));
                if let Some(outline) = font.outline_glyph(glyph) {
                    let b = outline.px_bounds();
                    let (x0, y0) = (b.min.x as i32, b.min.y as i32);
                    outline.draw(|x, y, coverage| {
                        ink.push(Ink { x: x0 + x as i32, y: y0 + y as i32, coverage })
                    });
                }
            }
            pen += font.h_advance(id);
            prev = Some(id);
        }
        (pen.ceil() as u32, (ascent - font.descent()).ceil() as u32)
    }
}

impl DrawingBackend for Raster<'_> {
    type ErrorType = <BitMapBackend<'static> as DrawingBackend>::ErrorType;

    fn get_size(&self) -> (u32, u32) {
        self.inner.get_size()
    }

    fn ensure_prepared(&mut self) -> Drawn<Self::ErrorType> {
        self.inner.ensure_prepared()
    }

    fn present(&mut self) -> Drawn<Self::ErrorType> {
        self.inner.present()
    }

    fn draw_pixel(&mut self, point: BackendCoord, color: BackendColor) -> Drawn<Self::ErrorType> {
        self.inner.draw_pixel(point, color)
    }

    fn draw_line<S: BackendStyle>(
        &mut self,
        from: BackendCoord,
        to: BackendCoord,
        style: &S,
    ) -> Drawn<Self::ErrorType> {
        self.inner.draw_line(from, to, style)
    }

    fn draw_rect<S: BackendStyle>(
        &mut self,
        upper_left: BackendCoord,
        bottom_right: BackendCoord,
        style: &S,
        fill: bool,
    ) -> Drawn<Self::ErrorType> {
        self.inner.draw_rect(upper_left, bottom_right, style, fill)
    }

    fn draw_path<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        path: I,
        style: &S,
    ) -> Drawn<Self::ErrorType> {
        self.inner.draw_path(path, style)
    }

    fn draw_circle<S: BackendStyle>(
        &mut self,
        center: BackendCoord,
        radius: u32,
        style: &S,
        fill: bool,
    ) -> Drawn<Self::ErrorType> {
        self.inner.draw_circle(center, radius, style, fill)
    }

    fn fill_polygon<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        vert: I,
        style: &S,
    ) -> Drawn<Self::ErrorType> {
        self.inner.fill_polygon(vert, style)
    }

    fn blit_bitmap(&mut self, pos: BackendCoord, size: (u32, u32), src: &[u8]) -> Drawn<Self::ErrorType> {
        self.inner.blit_bitmap(pos, size, src)
    }

    fn estimate_text_size<S: BackendTextStyle>(
        &self,
        text: &str,
        style: &S,
    ) -> Result<(u32, u32), DrawingErrorKind<Self::ErrorType>> {
        Ok(Raster::layout(self.font(style.style()), style.size(), text, None))
    }

    fn draw_text<S: BackendTextStyle>(
        &mut self,
        text: &str,
        style: &S,
        pos: BackendCoord,
    ) -> Drawn<Self::ErrorType> {
        let color = style.color();
        if color.alpha == 0.0 {
            return Ok(());
        }
        let mut ink = Vec::new();
        let (w, h) = Raster::layout(self.font(style.style()), style.size(), text, Some(&mut ink));
        let (w, h) = (w as i32, h as i32);
        let anchor = style.anchor();
        let dx = match anchor.h_pos {
            HPos::Left => 0,
            HPos::Center => -w / 2,
            HPos::Right => -w,
        };
        let dy = match anchor.v_pos {
            VPos::Top => 0,
            VPos::Center => -h / 2,
            VPos::Bottom => -h,
        };
        let rotate = style.transform();
        let (width, height) = self.get_size();
        for Ink { x, y, coverage } in ink {
            let (x, y) = rotate.transform(x + dx, y + dy);
            let (x, y) = (pos.0 + x, pos.1 + y);
            if coverage > 0.0 && (0..width as i32).contains(&x) && (0..height as i32).contains(&y) {
                let c = BackendColor { alpha: color.alpha * f64::from(coverage.min(1.0)), rgb: color.rgb };
                self.inner.draw_pixel((x, y), c)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_glyph_is_inked_after_its_left_side_bearing() {
        // plotters' own text drawing put the ink at the pen position, so "Linux" read "Linu x".
        let font = FontRef::try_from_slice(dejavu::sans::regular()).unwrap();
        let scaled = font.as_scaled(PxScale::from(30.0));
        let mut pen = 0.0f32;
        for c in "Linu".chars() {
            let id = scaled.glyph_id(c);
            let mut ink = Vec::new();
            Raster::layout(&font, 30.0, &c.to_string(), Some(&mut ink));
            let first = ink.iter().filter(|i| i.coverage > 0.0).map(|i| i.x).min().unwrap();
            let bearing = scaled.h_side_bearing(id);
            assert!(bearing >= 1.0, "{c}: a bearing of {bearing} px tells nothing");
            assert_eq!(first, bearing.floor() as i32, "{c}");
            // In the word, the glyph starts at its pen position plus the same bearing.
            let mut word = Vec::new();
            Raster::layout(&font, 30.0, "Linux", Some(&mut word));
            let lo = (pen + bearing).floor() as i32;
            assert!(word.iter().any(|i| i.x == lo && i.coverage > 0.0), "{c} at {lo}");
            pen += scaled.h_advance(id);
        }
    }

    #[test]
    fn the_box_is_the_advance_width_and_the_font_height() {
        let font = FontRef::try_from_slice(dejavu::sans::regular()).unwrap();
        let (w1, h) = Raster::layout(&font, 20.0, "a", None);
        let (w3, _) = Raster::layout(&font, 20.0, "aaa", None);
        assert!((20..=21).contains(&h), "{h}");
        assert!((w3 as i32 - 3 * w1 as i32).abs() <= 2, "{w1} {w3}");
    }
}
