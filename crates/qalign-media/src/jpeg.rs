//! JPEG decoding through libjpeg-turbo's C code (vendored by `mozjpeg-sys`), because the
//! reference pipeline decodes with Pillow, i.e. libjpeg-turbo with the ISLOW IDCT and fancy
//! upsampling. Pure-Rust decoders (zune-jpeg, used by the `image` crate) differ by a few 8-bit
//! levels on many pixels, which would make the preprocessing fixtures unreachable.
//!
//! **Errors, and why this crate needs `panic = "unwind"`.** libjpeg reports a fatal error (a
//! corrupt or truncated file) through a callback that must not return: C code `longjmp`s out of
//! it. Rust has no sound `setjmp` (a function that returns twice), and a `longjmp` over Rust
//! frames would skip their destructors, so this module's callback unwinds instead, with `resume_unwind` (no
//! panic hook, no message), and [`decode`] catches the unwind and turns it into an error. That
//! is sound because:
//! * the callbacks and every libjpeg entry point are declared `extern "C-unwind"`;
//! * `mozjpeg-sys` compiles libjpeg with `-fexceptions` (its `unwinding` feature, enabled in
//!   Cargo.toml), so the C frames carry unwind tables and the unwind crosses them cleanly;
//! * libjpeg keeps no state that an unwind leaves inconsistent: the decompressor is dropped on
//!   the way out, which calls `jpeg_destroy_decompress` and frees its memory pools.
//!
//! Under `panic = "abort"` that unwind would abort the whole process on the first corrupt JPEG,
//! so building this crate with it is a compile error (below) instead of a latent crash.

#[cfg(panic = "abort")]
compile_error!(
    "qalign-media must be built with panic = \"unwind\": libjpeg's fatal errors (corrupt JPEG \
     files) are turned into errors by unwinding out of its error callback, which would abort \
     the process under panic = \"abort\" (see crates/qalign-media/src/jpeg.rs)"
);

use std::os::raw::c_int;
use std::panic::{AssertUnwindSafe, catch_unwind};

use image::RgbImage;
use image::metadata::Orientation;
use mozjpeg::{ColorSpace, DctMethod, Decompress, Marker};
use mozjpeg_sys::{J_COLOR_SPACE, JWRN_JPEG_EOF, jpeg_common_struct, jpeg_error_mgr};

/// Why a JPEG could not be decoded.
pub(crate) enum JpegError {
    /// Malformed, truncated or otherwise undecodable data.
    Corrupt(String),
    /// Valid JPEG that this crate does not convert (unusual colour spaces, too many pixels).
    Unsupported(String),
}

/// A decoded JPEG and, when requested, its EXIF orientation.
pub(crate) struct DecodedJpeg {
    pub image: RgbImage,
    pub orientation: Option<Orientation>,
}

/// The message carried by our unwinding error handler.
struct LibjpegFailure(String);

/// Decodes `bytes` to RGB8 exactly as Pillow does (`Image.open(..).convert("RGB")`).
///
/// * YCbCr, RGB and grayscale JPEGs: libjpeg-turbo's own conversion to RGB (grayscale replicated).
/// * CMYK / YCCK (Adobe) JPEGs: libjpeg-turbo's CMYK output, read as inverted CMYK ("CMYK;I",
///   Pillow's assumption for every 4-channel JPEG), then Pillow's naive `cmyk2rgb`.
/// * A file that ends before the image data is complete is an error (Pillow: "image file is
///   truncated"); other libjpeg warnings (e.g. extraneous bytes) are ignored, as in Pillow.
pub(crate) fn decode(
    bytes: &[u8],
    read_orientation: bool,
    max_pixels: u64,
) -> Result<DecodedJpeg, JpegError> {
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        decode_unguarded(bytes, read_orientation, max_pixels)
    }));
    match outcome {
        Ok(result) => result,
        Err(payload) => {
            let message = if let Some(failure) = payload.downcast_ref::<LibjpegFailure>() {
                failure.0.clone()
            } else if let Some(text) = payload.downcast_ref::<String>() {
                text.clone()
            } else if let Some(text) = payload.downcast_ref::<&str>() {
                (*text).to_string()
            } else {
                "libjpeg failed".to_string()
            };
            Err(JpegError::Corrupt(message))
        }
    }
}

fn decode_unguarded(
    bytes: &[u8],
    read_orientation: bool,
    max_pixels: u64,
) -> Result<DecodedJpeg, JpegError> {
    let markers: &[Marker] = if read_orientation {
        &[Marker::APP(1)]
    } else {
        &[]
    };
    let corrupt = |e: std::io::Error| JpegError::Corrupt(e.to_string());
    let mut decompress = Decompress::with_err(error_manager())
        .with_markers(markers)
        .from_mem(bytes)
        .map_err(corrupt)?;

    let (width, height) = decompress.size();
    if width == 0 || height == 0 {
        return Err(JpegError::Corrupt(format!(
            "image has zero size ({width}x{height})"
        )));
    }
    if (width as u64) * (height as u64) > max_pixels {
        return Err(JpegError::Unsupported(format!(
            "image too large: {width}x{height} exceeds the limit of {max_pixels} pixels"
        )));
    }
    let orientation = if read_orientation {
        Some(exif_orientation(&decompress))
    } else {
        None
    };

    decompress.dct_method(DctMethod::IntegerSlow);
    decompress.do_fancy_upsampling(true);
    let source_space = decompress.color_space();
    let cmyk = match source_space {
        J_COLOR_SPACE::JCS_GRAYSCALE | J_COLOR_SPACE::JCS_YCbCr | J_COLOR_SPACE::JCS_RGB => false,
        J_COLOR_SPACE::JCS_CMYK | J_COLOR_SPACE::JCS_YCCK => true,
        other => {
            return Err(JpegError::Unsupported(format!(
                "JPEG colour space {other:?} is not supported"
            )));
        }
    };
    let out_space: ColorSpace = if cmyk {
        J_COLOR_SPACE::JCS_CMYK
    } else {
        J_COLOR_SPACE::JCS_RGB
    };
    let mut started = decompress.to_colorspace(out_space).map_err(corrupt)?;
    let channels = if cmyk { 4 } else { 3 };
    let mut data = vec![0u8; width * height * channels];
    started.read_scanlines_into(&mut data).map_err(corrupt)?;
    started.finish().map_err(corrupt)?;

    let rgb = if cmyk {
        inverted_cmyk_to_rgb(&data)
    } else {
        data
    };
    let image = RgbImage::from_raw(width as u32, height as u32, rgb)
        .ok_or_else(|| JpegError::Corrupt("decoded buffer has the wrong size".to_string()))?;
    Ok(DecodedJpeg { image, orientation })
}

/// EXIF orientation from the first APP1 "Exif" segment; no or invalid EXIF means "as stored".
fn exif_orientation<R>(decompress: &Decompress<R>) -> Orientation {
    decompress
        .markers()
        .filter(|m| m.marker == Marker::APP(1))
        .find_map(|m| m.data.strip_prefix(b"Exif\0\0"))
        .and_then(Orientation::from_exif_chunk)
        .unwrap_or(Orientation::NoTransforms)
}

/// Pillow's "CMYK;I" unpacking (each byte inverted) followed by its `cmyk2rgb` conversion:
/// `c' = 255 − k`, `out = clip(nk − round(c·nk/255))` with nk = 255 − k.
fn inverted_cmyk_to_rgb(cmyk: &[u8]) -> Vec<u8> {
    let muldiv255 = |a: i32, b: i32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    let mut rgb = Vec::with_capacity(cmyk.len() / 4 * 3);
    for px in cmyk.chunks_exact(4) {
        let k = 255 - i32::from(px[3]);
        let nk = 255 - k;
        for &stored in &px[..3] {
            let c = 255 - i32::from(stored);
            rgb.push((nk - muldiv255(c, nk)).clamp(0, 255) as u8);
        }
    }
    rgb
}

fn error_manager() -> jpeg_error_mgr {
    // SAFETY: jpeg_error_mgr is a plain C struct; jpeg_std_error fills every field.
    let mut err: jpeg_error_mgr = unsafe { std::mem::zeroed() };
    unsafe { mozjpeg_sys::jpeg_std_error(&mut err) };
    err.error_exit = Some(unwind_on_error);
    err.emit_message = Some(unwind_on_truncation);
    err
}

/// libjpeg's formatted text for the current message code.
fn current_message(cinfo: &mut jpeg_common_struct) -> String {
    const JMSG_LENGTH_MAX: usize = 200;
    let mut buffer = [0u8; JMSG_LENGTH_MAX];
    // SAFETY: `err` was installed by `error_manager` and outlives the decompressor. The C
    // function takes `char *buffer` and writes at most JMSG_LENGTH_MAX bytes; the binding
    // declares an 80-byte array reference, so we call it through an equivalent pointer type.
    unsafe {
        let Some(err) = cinfo.err.as_ref() else {
            return "libjpeg error".to_string();
        };
        let code = err.msg_code;
        let Some(format) = err.format_message else {
            return format!("libjpeg error code {code}");
        };
        type FormatMessage = unsafe extern "C-unwind" fn(&mut jpeg_common_struct, *mut u8);
        let format: FormatMessage = std::mem::transmute(format);
        format(cinfo, buffer.as_mut_ptr());
    }
    let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
    String::from_utf8_lossy(&buffer[..end]).into_owned()
}

extern "C-unwind" fn unwind_on_error(cinfo: &mut jpeg_common_struct) {
    let message = current_message(cinfo);
    std::panic::resume_unwind(Box::new(LibjpegFailure(message)));
}

extern "C-unwind" fn unwind_on_truncation(cinfo: &mut jpeg_common_struct, level: c_int) {
    // SAFETY: see `current_message`.
    let code = unsafe { cinfo.err.as_ref().map(|e| e.msg_code) };
    if level == -1 && code == Some(JWRN_JPEG_EOF as c_int) {
        std::panic::resume_unwind(Box::new(LibjpegFailure(
            "file is truncated (premature end of JPEG data)".to_string(),
        )));
    }
}
