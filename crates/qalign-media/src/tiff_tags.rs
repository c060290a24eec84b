//! The TIFF tags the `image` crate ignores but Pillow 10.2 honours, read from the first IFD:
//! FillOrder (266) and ExtraSamples (338). The `tiff` crate decodes the pixels; this module only
//! patches the input (FillOrder) or the output (associated alpha) so the result is Pillow's.
//! (Orientation, 274, is read through the `image` crate's decoder.) [`check_file`] makes the
//! same refusals from an open file's tags alone, without reading its pixels.

use std::borrow::Cow;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

const FILL_ORDER: u16 = 266;
const EXTRA_SAMPLES: u16 = 338;
const COMPRESSION: u16 = 259;
const PHOTOMETRIC: u16 = 262;
const BITS_PER_SAMPLE: u16 = 258;
const SAMPLES_PER_PIXEL: u16 = 277;
const STRIP_OFFSETS: u16 = 273;
const STRIP_BYTE_COUNTS: u16 = 279;
const TILE_OFFSETS: u16 = 324;
const TILE_BYTE_COUNTS: u16 = 325;
/// The longest tag value read: the `tiff` crate's own limit (it refuses files with longer ones),
/// so a hostile count costs at most a few MiB here (8 bytes per value once decoded).
const MAX_VALUE_BYTES: u64 = 1 << 20;

/// What the first IFD says beyond what the `tiff` crate uses.
pub(crate) struct TiffQuirks<'a> {
    /// The file with every strip/tile's bytes bit-reversed when FillOrder is 2, else borrowed.
    pub bytes: Cow<'a, [u8]>,
    /// RGBA with ExtraSamples = 1 (associated alpha): Pillow reads it as `RGBa` and divides the
    /// colour by alpha.
    pub premultiplied: bool,
}

/// Reads the tags and applies FillOrder. A file whose IFD cannot be read is passed on as is
/// (the `tiff` crate then reports what is wrong). `Err` is a FillOrder layout Pillow does not
/// read either, or one this crate does not reproduce.
pub(crate) fn quirks(bytes: &[u8]) -> Result<TiffQuirks<'_>, String> {
    let Some(ifd) = Ifd::first(bytes) else {
        return Ok(TiffQuirks {
            bytes: Cow::Borrowed(bytes),
            premultiplied: false,
        });
    };
    let photometric = ifd.one(PHOTOMETRIC, 0);
    let samples = ifd.one(SAMPLES_PER_PIXEL, 1);
    let premultiplied =
        photometric == 2 && samples == 4 && ifd.values(EXTRA_SAMPLES) == Some(vec![1]);
    let bytes = if reversed_fill_order(&ifd)? {
        Cow::Owned(reverse_data_bits(bytes, &ifd)?)
    } else {
        Cow::Borrowed(bytes)
    };
    Ok(TiffQuirks {
        bytes,
        premultiplied,
    })
}

/// The refusal [`quirks`] gives a TIFF file, decided from its tags alone: the IFD and tag values
/// are read at their offsets, never the strips or tiles. `Ok` for a file whose IFD cannot be read
/// (or that is no TIFF), as in [`quirks`].
pub(crate) fn check_file(file: File, len: u64) -> Result<(), String> {
    let source = FileSource { file, len };
    match Ifd::first(&source) {
        Some(ifd) => reversed_fill_order(&ifd).map(|_| ()),
        None => Ok(()),
    }
}

/// Whether FillOrder asks for the data bits to be reversed (2) or not (1, the default); `Err` for
/// any other value, and for a FillOrder 2 layout Pillow does not read or this crate does not
/// reproduce. Reads tags only.
fn reversed_fill_order<S: Source + ?Sized>(ifd: &Ifd<'_, S>) -> Result<bool, String> {
    match ifd.one(FILL_ORDER, 1) {
        1 => Ok(false),
        2 => {
            let photometric = ifd.one(PHOTOMETRIC, 0);
            let samples = ifd.one(SAMPLES_PER_PIXEL, 1);
            let compression = ifd.one(COMPRESSION, 1);
            let bits = ifd.values(BITS_PER_SAMPLE).unwrap_or_else(|| vec![1]);
            let bits = bits.first().copied().unwrap_or(1);
            // Pillow's FillOrder=2 modes that the `tiff` crate decodes: bilevel and 8-bit gray,
            // 8-bit RGB. Compressions whose coded bytes libtiff bit-reverses before decoding
            // (none, LZW, Deflate, PackBits; the fax codecs read LSB-first, the same thing).
            let layout = matches!((photometric, samples, bits), (0 | 1, 1, 1 | 8) | (2, 3, 8));
            if !layout || !matches!(compression, 1..=5 | 8 | 32773 | 32946) {
                return Err(format!(
                    "TIFF FillOrder 2 is supported only for uncompressed, LZW, Deflate, PackBits \
                     or fax bilevel, 8-bit gray or 8-bit RGB images (this one: photometric \
                     {photometric}, {samples} samples of {bits} bits, compression {compression})"
                ));
            }
            strips(ifd)?;
            Ok(true)
        }
        other => Err(format!(
            "TIFF FillOrder {other} is not a valid value (1 or 2); Pillow refuses it too"
        )),
    }
}

/// The offsets and byte counts of the strips (or else the tiles).
fn strips<S: Source + ?Sized>(ifd: &Ifd<'_, S>) -> Result<(Vec<u64>, Vec<u64>), String> {
    match (ifd.values(STRIP_OFFSETS), ifd.values(STRIP_BYTE_COUNTS)) {
        (Some(o), Some(c)) => Ok((o, c)),
        _ => match (ifd.values(TILE_OFFSETS), ifd.values(TILE_BYTE_COUNTS)) {
            (Some(o), Some(c)) => Ok((o, c)),
            _ => Err("TIFF has no strip or tile offsets".to_string()),
        },
    }
}

/// A copy of `bytes` with the bits of each byte of every strip (or tile) reversed, each byte at
/// most once even where strips overlap: what libtiff (and Pillow's `;R` raw modes) decode.
fn reverse_data_bits(bytes: &[u8], ifd: &Ifd<'_, [u8]>) -> Result<Vec<u8>, String> {
    let (offsets, counts) = strips(ifd)?;
    let len = bytes.len() as u64;
    let mut ranges: Vec<(usize, usize)> = offsets
        .iter()
        .zip(&counts)
        .map(|(&start, &count)| {
            let start = start.min(len);
            (
                start as usize,
                start.saturating_add(count).min(len) as usize,
            )
        })
        .collect();
    ranges.sort_unstable();
    let mut out = bytes.to_vec();
    let mut done = 0;
    for (start, end) in ranges {
        for byte in &mut out[start.max(done)..end.max(done)] {
            *byte = byte.reverse_bits();
        }
        done = done.max(end);
    }
    Ok(out)
}

/// Pillow's `RGBa` unpacking of one premultiplied pixel: `c · 255 / a`, truncated and clipped;
/// alpha 0 gives black and alpha 255 keeps the colour.
pub(crate) fn unpremultiply(rgb: [u8; 3], alpha: u8) -> [u8; 3] {
    match alpha {
        0 => [0; 3],
        255 => rgb,
        a => rgb.map(|c| (u32::from(c) * 255 / u32::from(a)).min(255) as u8),
    }
}

/// Where the bytes of a TIFF come from: the whole file in memory, or a file read at offsets.
trait Source {
    /// The bytes at `offset..offset + len`, if inside the file (and, for a file, readable).
    fn bytes_at(&self, offset: u64, len: u64) -> Option<Cow<'_, [u8]>>;
}

impl Source for [u8] {
    fn bytes_at(&self, offset: u64, len: u64) -> Option<Cow<'_, [u8]>> {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        self.get(start..end).map(Cow::Borrowed)
    }
}

/// An open file of `len` bytes, read only where asked. A read is at most [`MAX_VALUE_BYTES`]
/// (every tag value, and every classic-TIFF entry table, fits), so a hostile count costs nothing.
struct FileSource {
    file: File,
    len: u64,
}

impl Source for FileSource {
    fn bytes_at(&self, offset: u64, len: u64) -> Option<Cow<'_, [u8]>> {
        if len > MAX_VALUE_BYTES || offset.checked_add(len)? > self.len {
            return None;
        }
        let mut buf = vec![0; usize::try_from(len).ok()?];
        let mut file = &self.file;
        file.seek(SeekFrom::Start(offset)).ok()?;
        file.read_exact(&mut buf).ok()?;
        Some(Cow::Owned(buf))
    }
}

/// The first IFD of a classic or Big TIFF, read only as far as tag values go.
struct Ifd<'a, S: Source + ?Sized> {
    source: &'a S,
    big_endian: bool,
    big_tiff: bool,
    /// The entry table (12-byte entries, or 20-byte ones in BigTIFF).
    entries: Cow<'a, [u8]>,
}

impl<'a, S: Source + ?Sized> Ifd<'a, S> {
    fn first(source: &'a S) -> Option<Self> {
        let big_endian = match source.bytes_at(0, 2)?.as_ref() {
            b"II" => false,
            b"MM" => true,
            _ => return None,
        };
        let mut ifd = Ifd {
            source,
            big_endian,
            big_tiff: false,
            entries: Cow::Borrowed(&[]),
        };
        ifd.big_tiff = match ifd.uint(2, 2)? {
            42 => false,
            43 => true,
            _ => return None,
        };
        let (start, count, entry) = if ifd.big_tiff {
            let start = ifd.uint(8, 8)?;
            (start, ifd.uint(start, 8)?, 20)
        } else {
            let start = ifd.uint(4, 4)?;
            (start, ifd.uint(start, 2)?, 12)
        };
        let table = start.checked_add(if ifd.big_tiff { 8 } else { 2 })?;
        let size = count.checked_mul(entry)?;
        ifd.entries = source.bytes_at(table, size)?;
        Some(ifd)
    }

    /// An unsigned integer of `size` bytes (1, 2, 4 or 8) in the file's byte order.
    fn uint(&self, offset: u64, size: u64) -> Option<u64> {
        Some(self.read(&self.source.bytes_at(offset, size)?))
    }

    /// The first value of a tag, or `default` when it is absent or unreadable.
    fn one(&self, tag: u16, default: u64) -> u64 {
        self.values(tag)
            .and_then(|v| v.first().copied())
            .unwrap_or(default)
    }

    fn read(&self, raw: &[u8]) -> u64 {
        let fold = |acc: u64, &b: &u8| (acc << 8) | u64::from(b);
        if self.big_endian {
            raw.iter().fold(0, fold)
        } else {
            raw.iter().rev().fold(0, fold)
        }
    }

    /// The values of an unsigned-integer tag (BYTE, SHORT, LONG, LONG8, IFD), if present, inside
    /// the file and at most [`MAX_VALUE_BYTES`] long (checked before anything is allocated).
    /// A repeated tag counts by its last entry, as in Pillow.
    fn values(&self, tag: u16) -> Option<Vec<u64>> {
        let entry_len = if self.big_tiff { 20 } else { 12 };
        let entry = self
            .entries
            .chunks_exact(entry_len)
            .rfind(|e| self.read(&e[..2]) == u64::from(tag))?;
        let size: u64 = match self.read(&entry[2..4]) {
            1 => 1,
            3 => 2,
            4 | 13 => 4,
            16 | 18 => 8,
            _ => return None,
        };
        let (count, field) = if self.big_tiff {
            (self.read(&entry[4..12]), &entry[12..20])
        } else {
            (self.read(&entry[4..8]), &entry[8..12])
        };
        let total = count.checked_mul(size)?;
        if total > MAX_VALUE_BYTES {
            return None;
        }
        let data = if total <= field.len() as u64 {
            Cow::Borrowed(field.get(..total as usize)?)
        } else {
            self.source.bytes_at(self.read(field), total)?
        };
        Some(
            data.chunks_exact(size as usize)
                .map(|v| self.read(v))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpremultiply_is_pillows_integer_division() {
        assert_eq!(unpremultiply([100, 50, 20], 128), [199, 99, 39]);
        assert_eq!(unpremultiply([200, 1, 0], 100), [255, 2, 0]);
        assert_eq!(unpremultiply([10, 20, 30], 0), [0, 0, 0]);
        assert_eq!(unpremultiply([10, 20, 30], 255), [10, 20, 30]);
    }

    #[test]
    fn overlapping_strips_are_reversed_once() {
        // Little-endian TIFF, IFD at 8 with two entries: StripOffsets = [38, 39],
        // StripByteCounts = [2, 2] (both as inline SHORT pairs); data at 38..41.
        let mut file = b"II*\0\x08\0\0\0\x02\0".to_vec();
        file.extend_from_slice(&[0x11, 1, 3, 0, 2, 0, 0, 0, 38, 0, 39, 0]);
        file.extend_from_slice(&[0x17, 1, 3, 0, 2, 0, 0, 0, 2, 0, 2, 0]);
        file.extend_from_slice(&[0, 0, 0, 0, 0b0000_0001, 0b1000_0000, 0b0000_0011]);
        let ifd = Ifd::first(file.as_slice()).unwrap();
        let out = reverse_data_bits(&file, &ifd).unwrap();
        assert_eq!(&out[38..], &[0b1000_0000, 0b0000_0001, 0b1100_0000]);
        assert_eq!(&out[..38], &file[..38]);
    }

    #[test]
    fn a_tag_longer_than_the_limit_is_not_read() {
        // One entry: Photometric as BYTE × (MAX_VALUE_BYTES + 1), its data after the IFD.
        let count = u32::try_from(MAX_VALUE_BYTES + 1).unwrap();
        let mut file = b"II*\0\x08\0\0\0\x01\0".to_vec();
        file.extend_from_slice(&[0x06, 1, 1, 0]);
        file.extend_from_slice(&count.to_le_bytes());
        file.extend_from_slice(&26u32.to_le_bytes());
        file.extend_from_slice(&[0; 4]);
        file.resize(26 + count as usize, 2);
        let ifd = Ifd::first(file.as_slice()).unwrap();
        assert_eq!(ifd.values(PHOTOMETRIC), None);
        file.truncate(26 + count as usize - 1);
        file[14..18].copy_from_slice(&(count - 1).to_le_bytes());
        let ifd = Ifd::first(file.as_slice()).unwrap();
        assert_eq!(
            ifd.values(PHOTOMETRIC).map(|v| v.len()),
            Some(count as usize - 1)
        );
    }
}
