//! Writes the model's packed RGB24 frames into the negotiated raw video layouts.
//!
//! Encoders mostly want I420; converting here (BT.601 limited range, what GStreamer
//! assumes for SD YUV without colorimetry and what the caps announce) saves a videoconvert
//! in the common `! x264enc` pipeline.

/// The output layouts the element offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Rgb,
    Rgba,
    Bgrx,
    I420,
}

impl Layout {
    pub fn from_format(f: gst_video::VideoFormat) -> Option<Self> {
        match f {
            gst_video::VideoFormat::Rgb => Some(Layout::Rgb),
            gst_video::VideoFormat::Rgba => Some(Layout::Rgba),
            gst_video::VideoFormat::Bgrx => Some(Layout::Bgrx),
            gst_video::VideoFormat::I420 => Some(Layout::I420),
            _ => None,
        }
    }
}

/// Copies `src` (packed RGB, `width * height * 3` bytes) into a packed 3- or 4-byte layout
/// with the given row stride.
pub fn rgb_to_packed(
    src: &[u8],
    width: usize,
    height: usize,
    layout: Layout,
    dst: &mut [u8],
    stride: usize,
) {
    for (y, row) in src.chunks_exact(width * 3).take(height).enumerate() {
        let out = &mut dst[y * stride..];
        match layout {
            Layout::Rgb => out[..width * 3].copy_from_slice(row),
            Layout::Rgba => {
                for (o, p) in out.chunks_exact_mut(4).zip(row.chunks_exact(3)) {
                    o.copy_from_slice(&[p[0], p[1], p[2], 255]);
                }
            }
            Layout::Bgrx => {
                for (o, p) in out.chunks_exact_mut(4).zip(row.chunks_exact(3)) {
                    o.copy_from_slice(&[p[2], p[1], p[0], 255]);
                }
            }
            Layout::I420 => unreachable!("I420 is planar: use rgb_to_i420"),
        }
    }
}

// BT.601 limited range in 8.8 fixed point (ITU-R BT.601: Y in [16, 235], Cb/Cr in
// [16, 240]).
fn luma(r: i32, g: i32, b: i32) -> u8 {
    (((66 * r + 129 * g + 25 * b + 128) >> 8) + 16).clamp(0, 255) as u8
}

fn chroma(r: i32, g: i32, b: i32) -> (u8, u8) {
    let u = ((-38 * r - 74 * g + 112 * b + 128) >> 8) + 128;
    let v = ((112 * r - 94 * g - 18 * b + 128) >> 8) + 128;
    (u.clamp(0, 255) as u8, v.clamp(0, 255) as u8)
}

/// Planes of an I420 frame with their strides.
pub struct I420Planes<'a> {
    pub y: (&'a mut [u8], usize),
    pub u: (&'a mut [u8], usize),
    pub v: (&'a mut [u8], usize),
}

/// Converts packed RGB to I420; chroma is the mean of each 2x2 block (edge pixels repeat
/// for odd sizes).
pub fn rgb_to_i420(src: &[u8], width: usize, height: usize, planes: I420Planes<'_>) {
    let (y_plane, ys) = planes.y;
    let px = |x: usize, y: usize| {
        let i = (y * width + x) * 3;
        (src[i] as i32, src[i + 1] as i32, src[i + 2] as i32)
    };
    for y in 0..height {
        for x in 0..width {
            let (r, g, b) = px(x, y);
            y_plane[y * ys + x] = luma(r, g, b);
        }
    }
    let (u_plane, us) = planes.u;
    let (v_plane, vs) = planes.v;
    for cy in 0..height.div_ceil(2) {
        for cx in 0..width.div_ceil(2) {
            let (mut r, mut g, mut b) = (0, 0, 0);
            for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                let (pr, pg, pb) = px((2 * cx + dx).min(width - 1), (2 * cy + dy).min(height - 1));
                r += pr;
                g += pg;
                b += pb;
            }
            let (u, v) = chroma((r + 2) / 4, (g + 2) / 4, (b + 2) / 4);
            u_plane[cy * us + cx] = u;
            v_plane[cy * vs + cx] = v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bt601_reference_colours() {
        // white, black, red at limited range: Y 235/16/81, red Cb 90 Cr 240
        assert_eq!(luma(255, 255, 255), 235);
        assert_eq!(luma(0, 0, 0), 16);
        assert_eq!(luma(255, 0, 0), 82);
        assert_eq!(chroma(0, 0, 0), (128, 128));
        assert_eq!(chroma(255, 255, 255), (128, 128));
        let (u, v) = chroma(255, 0, 0);
        assert!(
            (u as i32 - 90).abs() <= 1 && (v as i32 - 240).abs() <= 1,
            "{u} {v}"
        );
    }

    #[test]
    fn planar_and_packed_layouts() {
        // 3x2 frame: red, green, blue / white, black, gray
        let src = [
            255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 255, 0, 0, 0, 128, 128, 128,
        ];
        let mut y = [0u8; 8];
        let mut u = [0u8; 2];
        let mut v = [0u8; 2];
        rgb_to_i420(
            &src,
            3,
            2,
            I420Planes {
                y: (&mut y, 4),
                u: (&mut u, 2),
                v: (&mut v, 2),
            },
        );
        // 8.8 fixed point: within 1 of the exact 81.5, 144.6, 41.1
        assert_eq!(&y[..3], &[82, 144, 41]);
        assert_eq!(&y[4..7], &[235, 16, 126]);
        // right column repeats the edge: blue and gray average
        assert_eq!((u[1], v[1]), chroma(64, 64, 192));

        let mut bgrx = [0u8; 2 * 16];
        rgb_to_packed(&src, 3, 2, Layout::Bgrx, &mut bgrx, 16);
        assert_eq!(&bgrx[..4], &[0, 0, 255, 255]);
        assert_eq!(&bgrx[16..20], &[255, 255, 255, 255]);
        let mut rgba = [0u8; 2 * 12];
        rgb_to_packed(&src, 3, 2, Layout::Rgba, &mut rgba, 12);
        assert_eq!(&rgba[4..8], &[0, 255, 0, 255]);
    }
}
