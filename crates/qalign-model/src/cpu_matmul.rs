//! Matrix products of the linear layers in CPU inference, with each weight laid out once, at load,
//! the way its kernel reads it.
//!
//! candle's CPU matmul repacks the weight on every call (gemm packs its right-hand side each
//! time), and has no bf16 kernel: it widens whole bf16 weights to f32 on every call. Inference
//! weights never change, so here they are packed once:
//! - f32, on AVX-512 CPUs: panels of 48 output columns, multiplied by an 8×48 FMA micro-kernel
//!   (the same products and f32 sums as any f32 matmul, in a blocked order);
//! - bf16, on CPUs with AMX-BF16 or AVX512-BF16: 16×32 tiles in AMX's pair-interleaved layout
//!   (each 64-byte row is one k-pair of 16 columns, so a 16-column block is also a panel of
//!   AVX-512 vectors), multiplied by `tdpbf16ps` (AMX) or `vdpbf16ps` (AVX512-BF16, an 8×48
//!   micro-kernel) with f32 accumulation and one rounding to bf16 at the end;
//! - bf16 on CPUs with AVX2 and FMA only: the same tiles, each 128-pair slice of a 16-column block
//!   widened to f32 (exactly: a shift or a mask) into an L1 scratch once and reused for every row,
//!   by a 6×16 FMA micro-kernel (the products and f32 sums of candle's widening matmul, without
//!   widening the whole weight on every call).
//!
//! Elsewhere (f16, other CPUs, shapes the tiles do not fit) [`PackedLinear::pack`] returns `None`
//! and the layer keeps candle's matmul. `QALIGN_CPU_KERNELS=composed` turns packing off, so both
//! paths run from one binary, and `QALIGN_CPU_KERNELS=avx2` picks what an AVX2-only CPU would.

use std::sync::OnceLock;

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use half::bf16;
use rayon::prelude::*;

/// Output columns per f32 panel: three AVX-512 vectors.
pub(crate) const NR: usize = 48;
/// Rows per f32 micro-kernel call.
pub(crate) const MR: usize = 8;
/// Depth of one f32 pass (a 48 KiB slice of a panel, reused for every row block).
pub(crate) const KC: usize = 256;
/// AMX tile: 16 rows of 64 bytes (16 f32 or 32 bf16).
pub(crate) const TILE_ROWS: usize = 16;
const TILE_K: usize = 32;
const TILE_ELEMS: usize = TILE_ROWS * TILE_K;
/// Rows (and columns) of one AMX block: 2×2 accumulator tiles.
const AMX_BLOCK: usize = 2 * TILE_ROWS;
/// k-pairs per `vdpbf16ps` pass: 128 pairs of three 16-column blocks are a 24 KiB slice.
const DP_PAIRS: usize = 128;
/// Rows per AVX2 micro-kernel call (12 accumulators of the 16 ymm registers).
pub(crate) const MR_AVX2: usize = 6;

/// A `[out, in]` weight, packed for one of the kernels above.
pub struct PackedLinear {
    out_dim: usize,
    in_dim: usize,
    weights: Packed,
    /// Added in f32 before the output is stored (and rounded).
    bias: Option<Vec<f32>>,
}

enum Packed {
    /// `ceil(out/48)` panels of `in × 48` values, zero-padded past `out`.
    F32(Vec<f32>),
    /// `out/16 × in/32` tiles of 16 (pairs of k) × 16 (columns) × 2 bf16 bit patterns, for
    /// `kernel`.
    Bf16Tiles { tiles: Vec<u16>, kernel: Bf16Kernel },
}

/// The kernels that multiply bf16 tiles, fastest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Bf16Kernel {
    /// AMX `tdpbf16ps`, 32×32 blocks.
    Amx,
    /// AVX512-BF16 `vdpbf16ps`, 8×48 blocks.
    DotProduct,
    /// AVX2 FMA on weights widened slice by slice, 6×16 blocks.
    Avx2,
}

impl Bf16Kernel {
    /// The fastest one this CPU has (within `QALIGN_CPU_KERNELS`), if any.
    pub(crate) fn detect() -> Option<Self> {
        if amx_bf16_ready() {
            Some(Self::Amx)
        } else if has_avx512_bf16() {
            Some(Self::DotProduct)
        } else if has_avx2_fma() {
            Some(Self::Avx2)
        } else {
            None
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Amx => "bf16 AMX tiles",
            Self::DotProduct => "bf16 AVX512-BF16 tiles",
            Self::Avx2 => "bf16 tiles widened for AVX2",
        }
    }
}

impl std::fmt::Debug for PackedLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.weights {
            Packed::F32(_) => "f32 panels",
            Packed::Bf16Tiles { kernel, .. } => kernel.name(),
        };
        f.debug_struct("PackedLinear")
            .field("out_dim", &self.out_dim)
            .field("in_dim", &self.in_dim)
            .field("kind", &kind)
            .finish()
    }
}

impl PackedLinear {
    /// Packs a CPU weight `[out, in]` (and its bias `[out]`, added in the kernel) for the kernel
    /// its dtype has on this CPU, or `None` when there is none.
    pub fn pack(weight: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Option<Self>> {
        Self::pack_for(weight, bias, Bf16Kernel::detect())
    }

    /// [`Self::pack`] with bf16 weights packed for `bf16_kernel` (which the CPU must have).
    fn pack_for(
        weight: &Tensor,
        bias: Option<&Tensor>,
        bf16_kernel: Option<Bf16Kernel>,
    ) -> candle_core::Result<Option<Self>> {
        if !weight.device().is_cpu() || !crate::cpu_kernels::enabled() {
            return Ok(None);
        }
        let (out_dim, in_dim) = weight.dims2()?;
        if out_dim == 0 || in_dim == 0 {
            return Ok(None);
        }
        let weights = match weight.dtype() {
            DType::F32 if has_avx512f() => {
                let w = weight.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
                Packed::F32(pack_f32(&w, out_dim, in_dim))
            }
            DType::BF16 if out_dim % TILE_ROWS == 0 && in_dim % TILE_K == 0 => {
                let Some(kernel) = bf16_kernel else {
                    return Ok(None);
                };
                let w = weight.contiguous()?.flatten_all()?.to_vec1::<bf16>()?;
                Packed::Bf16Tiles {
                    tiles: pack_bf16_pairs(&w, out_dim, in_dim),
                    kernel,
                }
            }
            _ => return Ok(None),
        };
        let bias = match bias {
            Some(b) => Some(b.to_dtype(DType::F32)?.reshape(out_dim)?.to_vec1::<f32>()?),
            None => None,
        };
        Ok(Some(Self {
            out_dim,
            in_dim,
            weights,
            bias,
        }))
    }

    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    pub fn dtype(&self) -> DType {
        match self.weights {
            Packed::F32(_) => DType::F32,
            Packed::Bf16Tiles { .. } => DType::BF16,
        }
    }

    /// `x·Wᵀ` for `x` `[rows, in]` in the weight's dtype, giving `[rows, out]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (rows, in_dim) = x.dims2()?;
        if in_dim != self.in_dim || x.dtype() != self.dtype() || !x.device().is_cpu() {
            candle_core::bail!(
                "packed linear [{}, {}] ({:?}) applied to {:?} ({:?})",
                self.out_dim,
                self.in_dim,
                self.dtype(),
                x.dims(),
                x.dtype()
            );
        }
        let x = x.contiguous()?;
        let (storage, layout) = x.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("packed linear: input is not on the CPU");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("packed linear: input is not contiguous");
        };
        let a_range = start..end;
        let bias = self.bias.as_deref();
        let out = match (&self.weights, cpu) {
            (Packed::F32(panels), CpuStorage::F32(a)) => CpuStorage::F32(matmul_f32(
                &a[a_range],
                rows,
                self.in_dim,
                panels,
                self.out_dim,
                bias,
            )),
            (Packed::Bf16Tiles { tiles, kernel }, CpuStorage::BF16(a)) => {
                let matmul = match kernel {
                    Bf16Kernel::Amx => matmul_bf16_amx,
                    Bf16Kernel::DotProduct => matmul_bf16_dp,
                    Bf16Kernel::Avx2 => matmul_bf16_avx2,
                };
                CpuStorage::BF16(matmul(
                    &a[a_range],
                    rows,
                    self.in_dim,
                    tiles,
                    self.out_dim,
                    bias,
                ))
            }
            _ => candle_core::bail!("packed linear: input storage does not match its dtype"),
        };
        drop(storage);
        let out = match out {
            CpuStorage::F32(v) => Tensor::from_vec(v, (rows, self.out_dim), &Device::Cpu)?,
            CpuStorage::BF16(v) => Tensor::from_vec(v, (rows, self.out_dim), &Device::Cpu)?,
            _ => unreachable!("only f32 and bf16 are produced"),
        };
        Ok(out)
    }

    /// The weight `[out, in]` as it was before packing.
    pub fn unpack(&self) -> candle_core::Result<Tensor> {
        let (n, k) = (self.out_dim, self.in_dim);
        match &self.weights {
            Packed::F32(panels) => {
                let mut w = vec![0f32; n * k];
                for (col, row) in w.chunks_mut(k).enumerate() {
                    let (p, j) = (col / NR, col % NR);
                    for (kk, v) in row.iter_mut().enumerate() {
                        *v = panels[(p * k + kk) * NR + j];
                    }
                }
                Tensor::from_vec(w, (n, k), &Device::Cpu)
            }
            Packed::Bf16Tiles { tiles, .. } => {
                let mut w = vec![bf16::ZERO; n * k];
                for (col, row) in w.chunks_mut(k).enumerate() {
                    for (kk, v) in row.iter_mut().enumerate() {
                        *v = bf16::from_bits(tiles[pair_index(col, kk, k.div_ceil(2))]);
                    }
                }
                Tensor::from_vec(w, (n, k), &Device::Cpu)
            }
        }
    }
}

/// Whether the AVX-512 kernels may run: the CPU has AVX-512F and `QALIGN_CPU_KERNELS` is not `avx2`.
pub(crate) fn has_avx512f() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        best_kernels() && std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU has AVX512-BF16 (`vdpbf16ps`), and it may be used (as [`has_avx512f`]).
pub(crate) fn has_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        has_avx512f() && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU has AVX2 and FMA (the floor of the bf16 kernels).
pub(crate) fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether kernels beyond AVX2 may run (`QALIGN_CPU_KERNELS` is not `avx2`).
fn best_kernels() -> bool {
    crate::cpu_kernels::mode() == crate::cpu_kernels::KernelMode::Best
}

/// Whether this CPU has AMX-BF16 and the kernel lets this process use its tile registers
/// (Linux asks each process to request them once), and they may be used (as [`has_avx512f`]).
pub fn amx_bf16_ready() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    best_kernels()
        && *READY.get_or_init(|| {
            #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
            {
                // CPUID.(7,0):EDX bit 22 = AMX-BF16, bit 24 = AMX-TILE.
                let leaf = std::arch::x86_64::__cpuid_count(7, 0);
                if leaf.edx & (1 << 22) == 0 || leaf.edx & (1 << 24) == 0 {
                    return false;
                }
                const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
                const XFEATURE_XTILEDATA: libc::c_long = 18;
                // SAFETY: a plain syscall with integer arguments; it only grants a permission.
                unsafe {
                    libc::syscall(
                        libc::SYS_arch_prctl,
                        ARCH_REQ_XCOMP_PERM,
                        XFEATURE_XTILEDATA,
                    ) == 0
                }
            }
            #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
            {
                false
            }
        })
}

/// A raw output pointer that workers write disjoint parts of.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr<T>(pub(crate) *mut T);
// SAFETY: every worker writes only its own columns (f32) or column pairs (AMX) of the output.
unsafe impl<T> Send for OutPtr<T> {}
unsafe impl<T> Sync for OutPtr<T> {}

impl<T> OutPtr<T> {
    /// The element `offset` places in. (A method, so closures capture the whole wrapper.)
    ///
    /// # Safety
    /// `offset` lies inside the buffer.
    pub(crate) unsafe fn at(self, offset: usize) -> *mut T {
        // SAFETY: forwarded to the caller.
        unsafe { self.0.add(offset) }
    }
}

/// The f32 micro-kernel a CPU has: AVX-512 (8×48, panels of [`NR`] columns) or AVX2 (6×16,
/// panels of [`TILE_ROWS`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum F32Kernel {
    Avx512,
    Avx2,
}

impl F32Kernel {
    /// The fastest one this CPU has, unless `QALIGN_CPU_KERNELS` turns the kernels off or limits
    /// them to AVX2.
    pub(crate) fn detect() -> Option<Self> {
        if !crate::cpu_kernels::enabled() {
            None
        } else if has_avx512f() {
            Some(Self::Avx512)
        } else if has_avx2_fma() {
            Some(Self::Avx2)
        } else {
            None
        }
    }

    /// Columns per packed panel.
    pub(crate) fn width(self) -> usize {
        match self {
            Self::Avx512 => NR,
            Self::Avx2 => TILE_ROWS,
        }
    }
}

/// Packs a weight given transposed, `wt` `[k, n]` (the `V` of `P·V`), like [`pack_panels`] packs
/// `Wᵀ`: `ceil(n/width)` panels of `k × width` values.
pub(crate) fn pack_transposed(wt: &[f32], k: usize, n: usize, width: usize) -> Vec<f32> {
    let panels = n.div_ceil(width);
    let mut out = vec![0f32; panels * k * width];
    for (p, panel) in out.chunks_mut(k * width).enumerate() {
        let cols = width.min(n - p * width);
        for (kk, dst) in panel.chunks_mut(width).enumerate() {
            dst[..cols].copy_from_slice(&wt[kk * n + p * width..][..cols]);
        }
    }
    out
}

/// Packs `w` `[n, k]` into `ceil(n/48)` panels of `k × 48` values (zero-padded past `n`).
pub(crate) fn pack_f32(w: &[f32], n: usize, k: usize) -> Vec<f32> {
    pack_panels(w, n, k, NR)
}

/// Packs `w` `[n, k]` into `ceil(n/width)` panels of `k × width` values (zero-padded past `n`).
pub(crate) fn pack_panels(w: &[f32], n: usize, k: usize, width: usize) -> Vec<f32> {
    let mut out = vec![0f32; n.div_ceil(width) * k * width];
    out.par_chunks_mut(k * width)
        .enumerate()
        .for_each(|(p, panel)| {
            for j in 0..width.min(n - p * width) {
                let row = &w[(p * width + j) * k..][..k];
                for (kk, &v) in row.iter().enumerate() {
                    panel[kk * width + j] = v;
                }
            }
        });
    out
}

fn matmul_f32(
    a: &[f32],
    m: usize,
    k: usize,
    panels: &[f32],
    n: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let mut c: Vec<f32> = Vec::with_capacity(m * n);
    let out = OutPtr(c.as_mut_ptr());
    (0..n.div_ceil(NR)).into_par_iter().for_each(|p| {
        // SAFETY: the buffer holds m·n values, and this worker alone writes panel p's columns.
        unsafe { panel_product(a, m, k, panels, n, p, bias, out.at(0), n) };
    });
    // SAFETY: the workers above wrote all m·n values.
    unsafe { c.set_len(m * n) };
    c
}

/// `C = A·Wᵀ` on one thread with `kernel`, for `a` `[m, k]` and a weight `[n, k]` packed by
/// [`pack_panels`] or [`pack_transposed`] at `kernel.width()`; `c` holds `m` rows of `ldc ≥ n`
/// values, and is overwritten.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_f32_serial(
    kernel: F32Kernel,
    a: &[f32],
    m: usize,
    k: usize,
    panels: &[f32],
    n: usize,
    c: &mut [f32],
    ldc: usize,
) {
    let width = kernel.width();
    assert!(a.len() >= m * k && panels.len() >= n.div_ceil(width) * k * width && ldc >= n);
    assert!(m == 0 || c.len() >= (m - 1) * ldc + n);
    for p in 0..n.div_ceil(width) {
        match kernel {
            // SAFETY: checked above: `c` holds the m×n block at stride ldc.
            F32Kernel::Avx512 => unsafe {
                panel_product(a, m, k, panels, n, p, None, c.as_mut_ptr(), ldc)
            },
            F32Kernel::Avx2 => panel_product_avx2(
                a,
                m,
                k,
                &panels[p * k * width..][..k * width],
                n - p * width,
                &mut c[p * width..],
                ldc,
            ),
        }
    }
}

/// One 16-column panel of [`matmul_f32_serial`] with the AVX2 kernel: `c[.., ..cols] = A·panel`
/// for the panel's first `cols ≤ 16` columns, the rest of each row of `c` untouched. The kernel
/// writes whole 16-column rows, so a narrower panel goes through a scratch block.
fn panel_product_avx2(
    a: &[f32],
    m: usize,
    k: usize,
    panel: &[f32],
    cols: usize,
    c: &mut [f32],
    ldc: usize,
) {
    let cols = cols.min(TILE_ROWS);
    let mut block = [0f32; MR_AVX2 * TILE_ROWS];
    let mut m0 = 0;
    while m0 < m {
        let rows = MR_AVX2.min(m - m0);
        let direct = cols == TILE_ROWS;
        for k0 in (0..k).step_by(KC) {
            let depth = KC.min(k - k0);
            let (dst, ld) = if direct {
                (c[m0 * ldc..].as_mut_ptr(), ldc)
            } else {
                (block.as_mut_ptr(), TILE_ROWS)
            };
            // SAFETY: the CPU has AVX2 and FMA (`F32Kernel::detect`); rows m0..m0+rows of `a`
            // hold k values; the panel holds k rows of 16; `dst` holds `rows` rows of 16 at
            // stride `ld` (the caller's `c` has 16 columns left in each row when `direct`).
            unsafe {
                kernel_avx2(
                    rows,
                    depth,
                    a.as_ptr().add(m0 * k + k0),
                    k,
                    panel.as_ptr().add(k0 * TILE_ROWS),
                    dst,
                    ld,
                    k0 > 0,
                );
            }
        }
        if !direct {
            for r in 0..rows {
                c[(m0 + r) * ldc..][..cols].copy_from_slice(&block[r * TILE_ROWS..][..cols]);
            }
        }
        m0 += rows;
    }
}

/// Columns `p·48..` of `C = A·Wᵀ (+ bias)`, written at `c` with row stride `ldc`.
///
/// # Safety
/// `c` points at `m` rows of `ldc ≥ n` writable values that nobody else touches in panel p's
/// columns meanwhile; `a` has `m·k` values and `panels` the whole packed weight (checked by the
/// callers), so the micro-kernel reads stay in bounds.
#[allow(clippy::too_many_arguments)]
unsafe fn panel_product(
    a: &[f32],
    m: usize,
    k: usize,
    panels: &[f32],
    n: usize,
    p: usize,
    bias: Option<&[f32]>,
    c: *mut f32,
    ldc: usize,
) {
    let cols = NR.min(n - p * NR);
    let panel = &panels[p * k * NR..][..k * NR];
    for k0 in (0..k).step_by(KC) {
        let depth = KC.min(k - k0);
        let last = k0 + depth == k;
        let bias = match bias {
            Some(b) if last => b[p * NR..][..cols].as_ptr(),
            _ => std::ptr::null(),
        };
        let mut m0 = 0;
        while m0 < m {
            let rows = MR.min(m - m0);
            // SAFETY: rows m0..m0+rows of `a` have k values; the panel slice has depth·NR
            // values from k0; the output block lies inside the caller's buffer (see above). The
            // first pass (k0 = 0) writes every value of the block before any later pass reads it.
            unsafe {
                kernel_f32(
                    rows,
                    depth,
                    a.as_ptr().add(m0 * k + k0),
                    k,
                    panel.as_ptr().add(k0 * NR),
                    c.add(m0 * ldc + p * NR),
                    ldc,
                    cols,
                    k0 > 0,
                    bias,
                );
            }
            m0 += rows;
        }
    }
}

/// Dispatches to the AVX-512 micro-kernel for `rows` (1..=8) rows: `C[rows×cols] (+)= A·B (+ bias)`
/// for f32 `a` (`rows` rows of `lda`), a panel `b` of `depth` rows of 48, and `c` rows `ldc` apart.
///
/// # Safety
/// The CPU has AVX-512F, and the pointers cover those extents (`bias`: null or `cols` values).
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn kernel_f32(
    rows: usize,
    depth: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    cols: usize,
    accumulate: bool,
    bias: *const f32,
) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: forwarded from the caller; `PackedLinear::pack` only builds f32 panels on AVX-512 CPUs.
    unsafe {
        use avx512::block;
        match rows {
            8 => block::<8>(depth, a, lda, b, c, ldc, cols, accumulate, bias),
            7 => block::<7>(depth, a, lda, b, c, ldc, cols, accumulate, bias),
            6 => block::<6>(depth, a, lda, b, c, ldc, cols, accumulate, bias),
            5 => block::<5>(depth, a, lda, b, c, ldc, cols, accumulate, bias),
            4 => block::<4>(depth, a, lda, b, c, ldc, cols, accumulate, bias),
            3 => block::<3>(depth, a, lda, b, c, ldc, cols, accumulate, bias),
            2 => block::<2>(depth, a, lda, b, c, ldc, cols, accumulate, bias),
            _ => block::<1>(depth, a, lda, b, c, ldc, cols, accumulate, bias),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (rows, depth, a, lda, b, c, ldc, cols, accumulate, bias);
        unreachable!("f32 panels are only packed on x86-64");
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{NR, TILE_K};

    /// `sums[R×48] (+)= A[R × 2·depth]·B` for bf16 `A` read as k-pairs (`a`: `R` rows of `lda`
    /// pairs) and three 16-column blocks of pair-interleaved weights, `depth` vectors each.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn dp_block<const R: usize>(
        depth: usize,
        a: *const u32,
        lda: usize,
        b: [*const u16; 3],
        sums: *mut f32,
        accumulate: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 3]; R];
        // SAFETY (whole body): pointers and extents are guaranteed by `matmul_bf16_dp`.
        unsafe {
            for pp in 0..depth {
                let load = |p: *const u16| -> __m512bh {
                    std::mem::transmute(_mm512_loadu_si512(p.add(pp * TILE_K).cast()))
                };
                let b0 = load(b[0]);
                let b1 = load(b[1]);
                let b2 = load(b[2]);
                for (r, acc) in acc.iter_mut().enumerate() {
                    let pair = a.add(r * lda + pp).read_unaligned();
                    let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair as i32));
                    acc[0] = _mm512_dpbf16_ps(acc[0], av, b0);
                    acc[1] = _mm512_dpbf16_ps(acc[1], av, b1);
                    acc[2] = _mm512_dpbf16_ps(acc[2], av, b2);
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                let row = sums.add(r * NR);
                for (v, &sum) in acc.iter().enumerate() {
                    let dst = row.add(16 * v);
                    let value = if accumulate {
                        _mm512_add_ps(sum, _mm512_loadu_ps(dst))
                    } else {
                        sum
                    };
                    _mm512_storeu_ps(dst, value);
                }
            }
        }
    }

    /// `C[R×cols] (+)= A[R×depth]·B[depth×48] (+ bias)` with three 16-lane accumulators per row;
    /// `bias` (null or `cols` values) is added on the last pass.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn block<const R: usize>(
        depth: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        cols: usize,
        accumulate: bool,
        bias: *const f32,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 3]; R];
        // SAFETY (whole body): pointers and extents are guaranteed by `matmul_f32`.
        unsafe {
            for kk in 0..depth {
                let bp = b.add(kk * NR);
                let b0 = _mm512_loadu_ps(bp);
                let b1 = _mm512_loadu_ps(bp.add(16));
                let b2 = _mm512_loadu_ps(bp.add(32));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*a.add(r * lda + kk));
                    acc[0] = _mm512_fmadd_ps(av, b0, acc[0]);
                    acc[1] = _mm512_fmadd_ps(av, b1, acc[1]);
                    acc[2] = _mm512_fmadd_ps(av, b2, acc[2]);
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                let row = c.add(r * ldc);
                for (v, &sum) in acc.iter().enumerate() {
                    let start = v * 16;
                    if start >= cols {
                        break;
                    }
                    let left = cols - start;
                    let mask: __mmask16 = if left >= 16 { 0xffff } else { (1 << left) - 1 };
                    let mut value = if accumulate {
                        _mm512_add_ps(sum, _mm512_maskz_loadu_ps(mask, row.add(start)))
                    } else {
                        sum
                    };
                    if !bias.is_null() {
                        value = _mm512_add_ps(value, _mm512_maskz_loadu_ps(mask, bias.add(start)));
                    }
                    _mm512_mask_storeu_ps(row.add(start), mask, value);
                }
            }
        }
    }
}

fn matmul_bf16_amx(
    a: &[bf16],
    m: usize,
    k: usize,
    tiles: &[u16],
    n: usize,
    bias: Option<&[f32]>,
) -> Vec<bf16> {
    let col_blocks = n / TILE_ROWS;
    let k_tiles = k / TILE_K;
    let mut c: Vec<bf16> = Vec::with_capacity(m * n);
    let out = OutPtr(c.as_mut_ptr());
    (0..col_blocks.div_ceil(2)).into_par_iter().for_each_init(
        || (Vec::<bf16>::new(), vec![0f32; AMX_BLOCK * AMX_BLOCK]),
        |(padded, sums), pair| {
            let bn = 2 * pair;
            let second = bn + 1 < col_blocks;
            let cols = if second { 2 * TILE_ROWS } else { TILE_ROWS };
            let b0 = tiles[bn * k_tiles * TILE_ELEMS..].as_ptr();
            let b1 = if second {
                tiles[(bn + 1) * k_tiles * TILE_ELEMS..].as_ptr()
            } else {
                b0
            };
            // SAFETY: this CPU has AMX-BF16 and the process may use it (checked when the
            // weight was packed); the configuration describes the eight tiles used below.
            unsafe { amx::configure() };
            let mut m0 = 0;
            while m0 < m {
                let rows = AMX_BLOCK.min(m - m0);
                let block_a = if rows == AMX_BLOCK {
                    &a[m0 * k..][..AMX_BLOCK * k]
                } else {
                    padded.clear();
                    padded.extend_from_slice(&a[m0 * k..][..rows * k]);
                    padded.resize(AMX_BLOCK * k, bf16::ZERO);
                    &padded[..]
                };
                // SAFETY: `block_a` holds 32 rows of k values, each weight block k_tiles
                // tiles, `sums` 32×32 values.
                unsafe { amx::block(block_a.as_ptr(), k, b0, b1, k_tiles, sums.as_mut_ptr()) };
                for r in 0..rows {
                    // SAFETY: row m0 + r, columns bn·16..bn·16+cols lie inside the m×n
                    // output, and only this worker writes those columns.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(out.at((m0 + r) * n + bn * TILE_ROWS), cols)
                    };
                    let sums = &sums[r * AMX_BLOCK..][..cols];
                    store_bf16_row(sums, bias.map(|b| &b[bn * TILE_ROWS..][..cols]), dst);
                }
                m0 += rows;
            }
            // SAFETY: releases the tile state configured above.
            unsafe { amx::release() };
        },
    );
    // SAFETY: the workers above wrote all m·n values.
    unsafe { c.set_len(m * n) };
    c
}

/// Adds the bias to a row of f32 sums and rounds it, once, into the bf16 output.
fn store_bf16_row(sums: &[f32], bias: Option<&[f32]>, dst: &mut [bf16]) {
    crate::cpu_simd::f32_plus_to_bf16(sums, bias, dst);
}

/// `C = A·Wᵀ (+ bias)` with `vdpbf16ps`: each worker takes three 16-column blocks, sums them
/// into an f32 scratch of `m × 48` ([`dp_task`]), then adds the bias and rounds once.
fn matmul_bf16_dp(
    a: &[bf16],
    m: usize,
    k: usize,
    tiles: &[u16],
    n: usize,
    bias: Option<&[f32]>,
) -> Vec<bf16> {
    let col_blocks = n / TILE_ROWS;
    let mut c: Vec<bf16> = Vec::with_capacity(m * n);
    let out = OutPtr(c.as_mut_ptr());
    (0..col_blocks.div_ceil(3))
        .into_par_iter()
        .for_each_init(Vec::<f32>::new, |sums, task| {
            let cols = dp_task(a, m, k, k / 2, tiles, col_blocks, task, sums);
            let bn = 3 * task;
            let bias = bias.map(|b| &b[bn * TILE_ROWS..][..cols]);
            for (r, sums) in sums.chunks_exact(NR).enumerate() {
                // SAFETY: row r, columns bn·16..bn·16+cols lie inside the m×n output, and only
                // this worker writes those columns.
                let dst =
                    unsafe { std::slice::from_raw_parts_mut(out.at(r * n + bn * TILE_ROWS), cols) };
                store_bf16_row(&sums[..cols], bias, dst);
            }
        });
    // SAFETY: the workers above wrote all m·n values.
    unsafe { c.set_len(m * n) };
    c
}

/// `C = A·Wᵀ (+ bias)` with AVX2 FMA: `A` is widened to f32 once; each worker takes one 16-column
/// block and, `DP_PAIRS` k-pairs at a time, widens that slice of it into an f32 panel it then reuses
/// for every row, sums into an f32 scratch of `m × 16`, and adds the bias and rounds once.
fn matmul_bf16_avx2(
    a: &[bf16],
    m: usize,
    k: usize,
    tiles: &[u16],
    n: usize,
    bias: Option<&[f32]>,
) -> Vec<bf16> {
    if m == 0 {
        return Vec::new();
    }
    const ROWS_PER_TASK: usize = 16;
    let mut wide_a = vec![0f32; m * k];
    wide_a
        .par_chunks_mut(ROWS_PER_TASK * k)
        .zip(a.par_chunks(ROWS_PER_TASK * k))
        .for_each(|(dst, src)| crate::cpu_simd::bf16_to_f32(src, dst));
    let col_blocks = n / TILE_ROWS;
    let pairs = k / 2;
    let block_len = pairs * TILE_K;
    let mut c: Vec<bf16> = Vec::with_capacity(m * n);
    let out = OutPtr(c.as_mut_ptr());
    (0..col_blocks).into_par_iter().for_each_init(
        || {
            (
                vec![0f32; 2 * DP_PAIRS * TILE_ROWS],
                vec![0f32; m * TILE_ROWS],
            )
        },
        |(panel, sums), bn| {
            let block = &tiles[bn * block_len..][..block_len];
            for p0 in (0..pairs).step_by(DP_PAIRS) {
                let depth = DP_PAIRS.min(pairs - p0);
                widen_pairs(&block[p0 * TILE_K..][..depth * TILE_K], panel);
                let mut m0 = 0;
                while m0 < m {
                    let rows = MR_AVX2.min(m - m0);
                    // SAFETY: rows m0.. of `wide_a` hold k values from column 2·p0 on, the panel
                    // holds 2·depth rows of 16, and `sums` m rows of 16. The first slice (p0 = 0)
                    // writes every sum before a later one adds to it.
                    unsafe {
                        kernel_avx2(
                            rows,
                            2 * depth,
                            wide_a.as_ptr().add(m0 * k + 2 * p0),
                            k,
                            panel.as_ptr(),
                            sums.as_mut_ptr().add(m0 * TILE_ROWS),
                            TILE_ROWS,
                            p0 > 0,
                        );
                    }
                    m0 += rows;
                }
            }
            let bias = bias.map(|b| &b[bn * TILE_ROWS..][..TILE_ROWS]);
            for (r, sums) in sums.chunks_exact(TILE_ROWS).enumerate() {
                // SAFETY: row r, columns bn·16..bn·16+16 lie inside the m×n output, and only this
                // worker writes those columns.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(out.at(r * n + bn * TILE_ROWS), TILE_ROWS)
                };
                store_bf16_row(sums, bias, dst);
            }
        },
    );
    // SAFETY: the workers above wrote all m·n values.
    unsafe { c.set_len(m * n) };
    c
}

/// Widens a slice of a pair-packed 16-column block (each k-pair 16 × two bf16) into `panel`, f32
/// `[2·pairs, 16]`: the even k of each pair, then the odd one. Widening bf16 is exact.
fn widen_pairs(block: &[u16], panel: &mut [f32]) {
    for (pair, dst) in block
        .chunks_exact(TILE_K)
        .zip(panel.chunks_exact_mut(2 * TILE_ROWS))
    {
        let (even, odd) = dst.split_at_mut(TILE_ROWS);
        for col in 0..TILE_ROWS {
            even[col] = bf16::from_bits(pair[2 * col]).to_f32();
            odd[col] = bf16::from_bits(pair[2 * col + 1]).to_f32();
        }
    }
}

/// `C = A·Wᵀ` in f32 on one thread, for bf16 `a` (`m` rows of `lda` values, `lda` even) and a weight
/// of `n` columns and `pairs` k-pairs packed by [`pack_bf16_pairs`] or
/// [`pack_bf16_pairs_transposed`]; `c` holds `m` rows of `ldc ≥ n` values. Needs AVX512-BF16.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_bf16_dp_serial(
    a: &[bf16],
    m: usize,
    lda: usize,
    pairs: usize,
    packed: &[u16],
    n: usize,
    c: &mut [f32],
    ldc: usize,
    scratch: &mut Vec<f32>,
) {
    let col_blocks = n.div_ceil(TILE_ROWS);
    assert!(has_avx512_bf16() && lda.is_multiple_of(2) && 2 * pairs <= lda && ldc >= n);
    assert!(packed.len() >= col_blocks * pairs * TILE_K);
    assert!(m == 0 || (a.len() >= (m - 1) * lda + 2 * pairs && c.len() >= (m - 1) * ldc + n));
    for task in 0..col_blocks.div_ceil(3) {
        let cols = dp_task(a, m, lda, pairs, packed, col_blocks, task, scratch);
        let c0 = 3 * task * TILE_ROWS;
        let cols = cols.min(n - c0);
        for (r, sums) in scratch.chunks_exact(NR).enumerate() {
            c[r * ldc + c0..][..cols].copy_from_slice(&sums[..cols]);
        }
    }
}

/// `sums` (`m × 48`, f32) `= A·[B₀ B₁ B₂]` for column blocks `3·task..` of a pair-packed weight
/// (`col_blocks` blocks of `pairs` vectors), over `DP_PAIRS`-deep slices. Returns how many of the
/// 48 columns are real (a missing second or third block reuses the first, and is not stored).
#[allow(clippy::too_many_arguments)]
fn dp_task(
    a: &[bf16],
    m: usize,
    lda: usize,
    pairs: usize,
    packed: &[u16],
    col_blocks: usize,
    task: usize,
    sums: &mut Vec<f32>,
) -> usize {
    let bn = 3 * task;
    let block_len = pairs * TILE_K;
    let block = |i: usize| {
        let b = if bn + i < col_blocks { bn + i } else { bn };
        packed[b * block_len..][..block_len].as_ptr()
    };
    let b = [block(0), block(1), block(2)];
    // The first pass writes every sum, so only an empty product needs zeros.
    sums.resize(m * NR, 0.0);
    if pairs == 0 {
        sums.fill(0.0);
    }
    for p0 in (0..pairs).step_by(DP_PAIRS) {
        let depth = DP_PAIRS.min(pairs - p0);
        let mut m0 = 0;
        while m0 < m {
            let rows = MR.min(m - m0);
            // SAFETY: rows m0.. of `a` hold 2·pairs values at stride lda (even, checked by the
            // callers), each block holds `pairs` vectors, and `sums` holds m rows of 48.
            unsafe {
                kernel_bf16_dp(
                    rows,
                    depth,
                    a.as_ptr().add(m0 * lda + 2 * p0).cast::<u32>(),
                    lda / 2,
                    b.map(|p| p.add(p0 * TILE_K)),
                    sums.as_mut_ptr().add(m0 * NR),
                    p0 > 0,
                );
            }
            m0 += rows;
        }
    }
    TILE_ROWS * 3.min(col_blocks - bn)
}

/// Index of weight element `[col, kk]` in the pair layout of [`pack_bf16_pairs`]: `ceil(n/16)`
/// blocks of `pairs` k-pairs × 16 columns × 2 values. With 16 | n and 32 | k it is also AMX's
/// tile layout: each block is `k/32` consecutive tiles of 16 pairs.
fn pair_index(col: usize, kk: usize, pairs: usize) -> usize {
    ((col / TILE_ROWS) * pairs + kk / 2) * TILE_K + 2 * (col % TILE_ROWS) + kk % 2
}

/// Packs `w` `[n, k]` into the pair layout (zero-padded to whole blocks and pairs).
pub(crate) fn pack_bf16_pairs(w: &[bf16], n: usize, k: usize) -> Vec<u16> {
    let pairs = k.div_ceil(2);
    let block_len = pairs * TILE_K;
    let mut out = vec![0u16; n.div_ceil(TILE_ROWS) * block_len];
    out.par_chunks_mut(block_len)
        .enumerate()
        .for_each(|(bn, block)| {
            for col in bn * TILE_ROWS..n.min((bn + 1) * TILE_ROWS) {
                for (kk, v) in w[col * k..][..k].iter().enumerate() {
                    block[pair_index(col, kk, pairs) - bn * block_len] = v.to_bits();
                }
            }
        });
    out
}

/// Like [`pack_bf16_pairs`] for a weight given transposed, `wt` `[k, n]` (the `V` of `P·V`).
pub(crate) fn pack_bf16_pairs_transposed(wt: &[bf16], k: usize, n: usize) -> Vec<u16> {
    let pairs = k.div_ceil(2);
    let mut out = vec![0u16; n.div_ceil(TILE_ROWS) * pairs * TILE_K];
    for (kk, row) in wt.chunks_exact(n).take(k).enumerate() {
        for (col, v) in row.iter().enumerate() {
            out[pair_index(col, kk, pairs)] = v.to_bits();
        }
    }
    out
}

/// Dispatches to the `vdpbf16ps` micro-kernel for `rows` (1..=8) rows.
unsafe fn kernel_bf16_dp(
    rows: usize,
    depth: usize,
    a: *const u32,
    lda: usize,
    b: [*const u16; 3],
    sums: *mut f32,
    accumulate: bool,
) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: forwarded from the caller; bf16 tiles use this kernel only on AVX512-BF16 CPUs.
    unsafe {
        use avx512::dp_block;
        match rows {
            8 => dp_block::<8>(depth, a, lda, b, sums, accumulate),
            7 => dp_block::<7>(depth, a, lda, b, sums, accumulate),
            6 => dp_block::<6>(depth, a, lda, b, sums, accumulate),
            5 => dp_block::<5>(depth, a, lda, b, sums, accumulate),
            4 => dp_block::<4>(depth, a, lda, b, sums, accumulate),
            3 => dp_block::<3>(depth, a, lda, b, sums, accumulate),
            2 => dp_block::<2>(depth, a, lda, b, sums, accumulate),
            _ => dp_block::<1>(depth, a, lda, b, sums, accumulate),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (rows, depth, a, lda, b, sums, accumulate);
        unreachable!("bf16 tiles are only packed on x86-64");
    }
}

/// Dispatches to the AVX2 micro-kernel for `rows` (1..=6) rows: `sums[rows × 16] (+)= A·B` for f32
/// `a` (`rows` rows of `lda`), an f32 panel `b` of `depth` rows of 16, and `sums` rows `ldc` apart.
///
/// # Safety
/// The CPU has AVX2 and FMA, and the pointers cover those extents.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn kernel_avx2(
    rows: usize,
    depth: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    sums: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: forwarded from the caller.
    unsafe {
        use avx2::block;
        match rows {
            6 => block::<6>(depth, a, lda, b, sums, ldc, accumulate),
            5 => block::<5>(depth, a, lda, b, sums, ldc, accumulate),
            4 => block::<4>(depth, a, lda, b, sums, ldc, accumulate),
            3 => block::<3>(depth, a, lda, b, sums, ldc, accumulate),
            2 => block::<2>(depth, a, lda, b, sums, ldc, accumulate),
            _ => block::<1>(depth, a, lda, b, sums, ldc, accumulate),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (rows, depth, a, lda, b, sums, ldc, accumulate);
        unreachable!("bf16 tiles are only packed on x86-64");
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::TILE_ROWS;

    /// `sums[R×16] (+)= A[R×depth]·B[depth×16]` with two 8-lane accumulators per row.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn block<const R: usize>(
        depth: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        sums: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        // SAFETY (whole body): pointers and extents are guaranteed by `matmul_bf16_avx2`.
        unsafe {
            for kk in 0..depth {
                let bp = b.add(kk * TILE_ROWS);
                let b0 = _mm256_loadu_ps(bp);
                let b1 = _mm256_loadu_ps(bp.add(8));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let av = _mm256_broadcast_ss(&*a.add(r * lda + kk));
                    acc[0] = _mm256_fmadd_ps(av, b0, acc[0]);
                    acc[1] = _mm256_fmadd_ps(av, b1, acc[1]);
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                let row = sums.add(r * ldc);
                for (v, &sum) in acc.iter().enumerate() {
                    let dst = row.add(8 * v);
                    let value = if accumulate {
                        _mm256_add_ps(sum, _mm256_loadu_ps(dst))
                    } else {
                        sum
                    };
                    _mm256_storeu_ps(dst, value);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod amx {
    use std::arch::asm;

    use half::bf16;

    use super::{AMX_BLOCK, TILE_ELEMS, TILE_K, TILE_ROWS};

    /// Palette 1, tiles 0–7 all 16 rows × 64 bytes: 0–3 accumulate 16×16 f32, 4–5 hold 16×32 bf16
    /// of the input rows, 6–7 hold 16 pairs × 16 columns of the weight.
    pub(super) unsafe fn configure() {
        let mut config = [0u8; 64];
        config[0] = 1;
        for tile in 0..8 {
            config[16 + 2 * tile] = 64;
            config[48 + tile] = TILE_ROWS as u8;
        }
        // SAFETY: a valid palette-1 configuration; the caller checked AMX is usable.
        unsafe { asm!("ldtilecfg [{}]", in(reg) config.as_ptr(), options(nostack, readonly)) };
    }

    pub(super) unsafe fn release() {
        // SAFETY: tilerelease is always valid once tiles were configured.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }

    /// `sums[32×32] = A[32×k]·[B0 B1]` where `a` holds 32 rows of `lda` bf16 and `b0`/`b1` point
    /// at `k_tiles` consecutive weight tiles each.
    pub(super) unsafe fn block(
        a: *const bf16,
        lda: usize,
        b0: *const u16,
        b1: *const u16,
        k_tiles: usize,
        sums: *mut f32,
    ) {
        let a_stride = lda * 2;
        let b_stride = 64usize;
        let c_stride = AMX_BLOCK * 4;
        // SAFETY (whole body): the caller guarantees the extents; tiles were configured.
        unsafe {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
            for t in 0..k_tiles {
                asm!(
                    "tileloadd tmm4, [{a0} + {sa}*1]",
                    "tileloadd tmm5, [{a1} + {sa}*1]",
                    "tileloadd tmm6, [{b0} + {sb}*1]",
                    "tileloadd tmm7, [{b1} + {sb}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a0 = in(reg) a.add(t * TILE_K),
                    a1 = in(reg) a.add(TILE_ROWS * lda + t * TILE_K),
                    b0 = in(reg) b0.add(t * TILE_ELEMS),
                    b1 = in(reg) b1.add(t * TILE_ELEMS),
                    sa = in(reg) a_stride,
                    sb = in(reg) b_stride,
                    options(nostack, readonly)
                );
            }
            asm!(
                "tilestored [{c0} + {sc}*1], tmm0",
                "tilestored [{c1} + {sc}*1], tmm1",
                "tilestored [{c2} + {sc}*1], tmm2",
                "tilestored [{c3} + {sc}*1], tmm3",
                c0 = in(reg) sums,
                c1 = in(reg) sums.add(TILE_ROWS),
                c2 = in(reg) sums.add(TILE_ROWS * AMX_BLOCK),
                c3 = in(reg) sums.add(TILE_ROWS * AMX_BLOCK + TILE_ROWS),
                sc = in(reg) c_stride,
                options(nostack)
            );
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod amx {
    use half::bf16;

    pub(super) unsafe fn configure() {}
    pub(super) unsafe fn release() {}
    pub(super) unsafe fn block(
        _: *const bf16,
        _: usize,
        _: *const u16,
        _: *const u16,
        _: usize,
        _: *mut f32,
    ) {
        unreachable!("AMX tiles are only packed on x86-64");
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use proptest::prelude::*;

    use super::*;

    /// `x·Wᵀ` summed in f64, for reference.
    fn reference(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|kk| x[i * k + kk] as f64 * w[j * k + kk] as f64)
                    .sum();
            }
        }
        out
    }

    /// Deterministic values in [-1, 1) (shared with the quantised-matmul tests).
    pub(crate) fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let h = (i as u32)
                    .wrapping_mul(2_654_435_761)
                    .wrapping_add(seed.wrapping_mul(40_503));
                (h >> 8) as f32 / (1 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }

    /// The values of any float tensor, as f32 (shared with the attention tests).
    pub(crate) fn f32_values(t: &Tensor) -> Vec<f32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn check(m: usize, k: usize, n: usize, dtype: DType, seed: u32) -> Option<()> {
        check_with(m, k, n, dtype, seed, Bf16Kernel::detect())
    }

    fn check_with(
        m: usize,
        k: usize,
        n: usize,
        dtype: DType,
        seed: u32,
        bf16_kernel: Option<Bf16Kernel>,
    ) -> Option<()> {
        let x = values(m * k, seed);
        let w = values(n * k, seed + 1);
        let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let wt = Tensor::from_vec(w.clone(), (n, k), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let bias = values(n, seed + 2);
        let bt = Tensor::from_vec(bias.clone(), n, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let with_bias = seed.is_multiple_of(2);
        let packed = PackedLinear::pack_for(&wt, with_bias.then_some(&bt), bf16_kernel).unwrap()?;
        assert_eq!(
            packed
                .unpack()
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap(),
            wt.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap(),
            "unpack gives the weight back"
        );
        let got = packed.forward(&xt).unwrap();
        assert_eq!(got.dims(), &[m, n]);
        assert_eq!(got.dtype(), dtype);
        let got = f32_values(&got);
        // The reference multiplies the values the kernel saw (rounded to `dtype`).
        let xr = f32_values(&xt);
        let wr = f32_values(&wt);
        let mut want = reference(&xr, &wr, m, k, n);
        if with_bias {
            let br: Vec<f32> = bt.to_dtype(DType::F32).unwrap().to_vec1().unwrap();
            for (i, v) in want.iter_mut().enumerate() {
                *v += br[i % n] as f64;
            }
        }
        for (i, (&g, &r)) in got.iter().zip(&want).enumerate() {
            // Sums of k products of values in [-1, 1]: f32 rounding grows with √k at most k·ε;
            // bf16 output rounding is 2⁻⁸ relative.
            let tol = match dtype {
                DType::F32 => 4.0 * f32::EPSILON as f64 * k as f64,
                _ => r.abs() / 256.0 + 1e-5 * k as f64,
            };
            assert!(
                (g as f64 - r).abs() <= tol,
                "[{m}×{k}]·[{k}×{n}] {dtype:?} at {i}: {g} vs {r}"
            );
        }
        Some(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn f32_panels_match_the_reference(m in 1usize..40, k in 1usize..600, n in 1usize..140, seed in 0u32..1000) {
            check(m, k, n, DType::F32, seed);
            check(m, k, n, DType::F32, seed + 1);
        }

        #[test]
        fn bf16_tiles_match_the_reference(m in 1usize..80, kt in 1usize..12, nt in 1usize..7, seed in 0u32..1000) {
            check(m, kt * TILE_K, nt * TILE_ROWS, DType::BF16, seed);
        }

        #[test]
        fn avx2_bf16_tiles_match_the_reference(m in 1usize..80, kt in 1usize..12, nt in 1usize..7, seed in 0u32..1000) {
            if has_avx2_fma() {
                check_with(m, kt * TILE_K, nt * TILE_ROWS, DType::BF16, seed, Some(Bf16Kernel::Avx2)).unwrap();
            }
        }
    }

    #[test]
    fn avx2_bf16_handles_slices_past_the_first_and_zero_rows() {
        if !has_avx2_fma() {
            return;
        }
        // k = 320 is 160 pairs: one full 128-pair slice and a partial one.
        check_with(13, 320, 32, DType::BF16, 4, Some(Bf16Kernel::Avx2)).unwrap();
        let w = Tensor::zeros((16, 32), DType::BF16, &Device::Cpu).unwrap();
        let packed = PackedLinear::pack_for(&w, None, Some(Bf16Kernel::Avx2))
            .unwrap()
            .unwrap();
        let empty = Tensor::zeros((0, 32), DType::BF16, &Device::Cpu).unwrap();
        assert_eq!(packed.forward(&empty).unwrap().dims(), &[0, 16]);
    }

    #[test]
    fn kernels_exist_where_the_cpu_has_them() {
        let f32_packed = check(9, 300, 50, DType::F32, 1).is_some();
        assert_eq!(f32_packed, has_avx512f());
        let bf16_packed = check(33, 64, 48, DType::BF16, 2).is_some();
        assert_eq!(bf16_packed, Bf16Kernel::detect().is_some());
        // Shapes the tiles do not fit keep candle's matmul.
        assert!(check(4, 40, 48, DType::BF16, 3).is_none());
        let f16 = Tensor::zeros((16, 32), DType::F16, &Device::Cpu).unwrap();
        assert!(PackedLinear::pack(&f16, None).unwrap().is_none());
    }

    #[test]
    fn mismatched_inputs_are_errors() {
        if !has_avx512f() {
            return;
        }
        let w = Tensor::zeros((8, 4), DType::F32, &Device::Cpu).unwrap();
        let packed = PackedLinear::pack(&w, None).unwrap().unwrap();
        let wrong_width = Tensor::zeros((2, 5), DType::F32, &Device::Cpu).unwrap();
        assert!(packed.forward(&wrong_width).is_err());
        let wrong_dtype = Tensor::zeros((2, 4), DType::BF16, &Device::Cpu).unwrap();
        assert!(packed.forward(&wrong_dtype).is_err());
        // Zero rows are fine.
        let empty = Tensor::zeros((0, 4), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(packed.forward(&empty).unwrap().dims(), &[0, 8]);
    }
}
