//! Launches of `kernels/fused.cu` (`cuda` feature), after [`super`] has checked that each call
//! fits its kernel. Kernels take up to five tensors, more than candle's `CustomOp3`, so they are
//! launched here on candle's stream and their outputs wrapped with `Tensor::from_storage`; none
//! has a backward pass, and callers only use them on tensors that track no gradient.

use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaStorage, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, DType, Shape, Storage, Tensor, WithDType};
use half::{bf16, f16};

use super::{
    ATTENTION_THREADS, AttentionPlan, AttnArgs, ELEMENTWISE_THREADS, NORM_THREADS,
    elementwise_blocks, row_plan,
};
use crate::error::{ModelError, Result};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));
const MODULE: &str = "qalign_fused";

// SAFETY: `AttnArgs` is `repr(C)` plain data with the layout of the kernel's `AttnArgs`.
unsafe impl DeviceRepr for AttnArgs {}

pub fn attention_dtype(dtype: DType) -> bool {
    matches!(dtype, DType::F16 | DType::BF16)
}

fn suffix(dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::F16 => Ok("f16"),
        DType::BF16 => Ok("bf16"),
        other => Err(ModelError::input(format!(
            "no fused CUDA kernel for {other:?}"
        ))),
    }
}

fn device(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        candle_core::Device::Cuda(dev) => Ok(dev.clone()),
        _ => Err(ModelError::input(
            "fused CUDA kernel given a non-CUDA tensor",
        )),
    }
}

/// Runs `f` on the CUDA slice of `t` from its start offset (any layout; the caller checked it).
fn with_view<T: CudaDType + DeviceRepr, R>(
    t: &Tensor,
    f: impl FnOnce(CudaView<'_, T>) -> Result<R>,
) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cuda) = &*storage else {
        return Err(ModelError::input(
            "fused CUDA kernel given a non-CUDA tensor",
        ));
    };
    let slice = T::as_cuda_slice(cuda)?;
    f(slice.slice(layout.start_offset()..))
}

fn wrap<T: CudaDType>(slice: CudaSlice<T>, dev: &CudaDevice, shape: impl Into<Shape>) -> Tensor {
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev.clone()));
    Tensor::from_storage(storage, shape, BackpropOp::none(), false)
}

/// A null device pointer, for the kernels' optional arguments.
const NULL: u64 = 0;

/// Pushes an optional pointer argument: the buffer, or [`NULL`] when absent.
fn arg_or_null<'a, A>(builder: &mut LaunchArgs<'a>, arg: Option<&'a A>)
where
    LaunchArgs<'a>: PushKernelArg<&'a A>,
{
    match arg {
        Some(arg) => builder.arg(arg),
        None => <LaunchArgs<'a> as PushKernelArg<&'static u64>>::arg(builder, &NULL),
    };
}

pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, plan: &AttentionPlan) -> Result<Tensor> {
    match q.dtype() {
        DType::F16 => attention_t::<f16>(q, k, v, plan),
        DType::BF16 => attention_t::<bf16>(q, k, v, plan),
        other => Err(ModelError::input(format!(
            "fused attention needs f16 or bf16, not {other:?}"
        ))),
    }
}

fn attention_t<T: CudaDType + DeviceRepr + WithDType>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    plan: &AttentionPlan,
) -> Result<Tensor> {
    let dev = device(q)?;
    let name = format!("flash_attention_d{}_{}", plan.head_dim, suffix(T::DTYPE)?);
    let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
    let AttnArgs {
        batch, heads, tq, ..
    } = plan.args;
    let (b, h, tq) = (batch as usize, heads as usize, tq as usize);
    let out_len = b * tq * h * plan.head_dim;
    // SAFETY: the kernel writes every output value.
    let out = unsafe { dev.alloc::<T>(out_len)? };
    let lengths = match &plan.lengths {
        Some(lengths) => Some(dev.clone_htod(lengths.as_slice())?),
        None => None,
    };
    let cfg = LaunchConfig {
        grid_dim: plan.grid,
        block_dim: (ATTENTION_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    with_view::<T, _>(q, |qs| {
        with_view::<T, _>(k, |ks| {
            with_view::<T, _>(v, |vs| {
                let mut builder = func.builder();
                builder.arg(&qs).arg(&ks).arg(&vs);
                arg_or_null(&mut builder, lengths.as_ref());
                builder.arg(&out).arg(&plan.args);
                // SAFETY: the plan checked shapes, strides and alignment against the kernel.
                unsafe { builder.launch(cfg) }.w()?;
                Ok(())
            })
        })
    })?;
    Ok(wrap(out, &dev, (b, tq, h * plan.head_dim)))
}

fn row_config(rows: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows, 1, 1),
        block_dim: (NORM_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

pub fn add_layer_norm(
    x: &Tensor,
    y: Option<(&Tensor, Option<&Tensor>)>,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    let x = x.contiguous()?;
    let y = match y {
        Some((y, bias)) => Some((y.contiguous()?, bias.map(Tensor::contiguous).transpose()?)),
        None => None,
    };
    let (w, b) = (w.contiguous()?, b.contiguous()?);
    match x.dtype() {
        DType::F32 => add_layer_norm_t::<f32>(&x, y.as_ref(), &w, &b, eps),
        DType::F16 => add_layer_norm_t::<f16>(&x, y.as_ref(), &w, &b, eps),
        DType::BF16 => add_layer_norm_t::<bf16>(&x, y.as_ref(), &w, &b, eps),
        other => Err(ModelError::input(format!(
            "no fused LayerNorm for {other:?}"
        ))),
    }
}

fn add_layer_norm_t<T: CudaDType + DeviceRepr + WithDType>(
    x: &Tensor,
    y: Option<&(Tensor, Option<Tensor>)>,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    let dev = device(x)?;
    let (rows, dim) = row_plan(x).map_err(ModelError::input)?;
    let func = dev.get_or_load_custom_func(
        &format!("add_layer_norm_{}", suffix(T::DTYPE)?),
        MODULE,
        PTX,
    )?;
    let n = x.elem_count();
    // SAFETY: the kernel writes every value of both outputs it is given.
    let out = unsafe { dev.alloc::<T>(n)? };
    let sum = match y {
        Some(_) => Some(unsafe { dev.alloc::<T>(n)? }),
        None => None,
    };
    let (dim_i, eps) = (dim as i32, eps as f32);
    with_view::<T, _>(x, |xs| {
        with_view::<f32, _>(w, |ws| {
            with_view::<f32, _>(b, |bs| {
                let run = |ys: Option<CudaView<'_, T>>, biases: Option<CudaView<'_, T>>| {
                    let mut builder = func.builder();
                    builder.arg(&xs);
                    arg_or_null(&mut builder, ys.as_ref());
                    arg_or_null(&mut builder, biases.as_ref());
                    builder.arg(&ws).arg(&bs);
                    arg_or_null(&mut builder, sum.as_ref());
                    builder.arg(&out).arg(&dim_i).arg(&eps);
                    // SAFETY: contiguous rows × dim inputs, as the kernel reads them.
                    unsafe { builder.launch(row_config(rows)) }.w()?;
                    Ok(())
                };
                match y {
                    None => run(None, None),
                    Some((y, None)) => with_view::<T, _>(y, |ys| run(Some(ys), None)),
                    Some((y, Some(bias))) => with_view::<T, _>(y, |ys| {
                        with_view::<T, _>(bias, |bias| run(Some(ys), Some(bias)))
                    }),
                }
            })
        })
    })?;
    let normed = wrap(out, &dev, x.shape().clone());
    let sum = match sum {
        Some(sum) => wrap(sum, &dev, x.shape().clone()),
        None => x.clone(),
    };
    Ok((sum, normed))
}

pub fn multiway_rms_norm(
    x: &Tensor,
    weights: &Tensor,
    modality: Option<&Tensor>,
    uniform_row: usize,
    eps: f64,
) -> Result<Tensor> {
    let (x, weights) = (x.contiguous()?, weights.contiguous()?);
    let modality = modality.map(Tensor::contiguous).transpose()?;
    match x.dtype() {
        DType::F32 => rms_t::<f32>(&x, &weights, modality.as_ref(), uniform_row, eps),
        DType::F16 => rms_t::<f16>(&x, &weights, modality.as_ref(), uniform_row, eps),
        DType::BF16 => rms_t::<bf16>(&x, &weights, modality.as_ref(), uniform_row, eps),
        other => Err(ModelError::input(format!("no fused RMSNorm for {other:?}"))),
    }
}

fn rms_t<T: CudaDType + DeviceRepr + WithDType>(
    x: &Tensor,
    weights: &Tensor,
    modality: Option<&Tensor>,
    uniform_row: usize,
    eps: f64,
) -> Result<Tensor> {
    let dev = device(x)?;
    let (rows, dim) = row_plan(x).map_err(ModelError::input)?;
    let func = dev.get_or_load_custom_func(
        &format!("multiway_rms_norm_{}", suffix(T::DTYPE)?),
        MODULE,
        PTX,
    )?;
    // SAFETY: the kernel writes every output value.
    let out = unsafe { dev.alloc::<T>(x.elem_count())? };
    let (row_i, dim_i, eps) = (uniform_row as i32, dim as i32, eps as f32);
    with_view::<T, _>(x, |xs| {
        with_view::<T, _>(weights, |ws| {
            let run = |ms: Option<CudaView<'_, u32>>| {
                let mut builder = func.builder();
                builder.arg(&xs).arg(&ws);
                arg_or_null(&mut builder, ms.as_ref());
                builder.arg(&row_i).arg(&out).arg(&dim_i).arg(&eps);
                // SAFETY: contiguous rows × dim input; row indices checked by the caller.
                unsafe { builder.launch(row_config(rows)) }.w()?;
                Ok(())
            };
            match modality {
                Some(m) => with_view::<u32, _>(m, |ms| run(Some(ms))),
                None => run(None),
            }
        })
    })?;
    Ok(wrap(out, &dev, x.shape().clone()))
}

fn elementwise_config(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (elementwise_blocks(n), 1, 1),
        block_dim: (ELEMENTWISE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

pub fn bias_quick_gelu(y: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let y = y.contiguous()?;
    let bias = bias.map(Tensor::contiguous).transpose()?;
    match y.dtype() {
        DType::F32 => gelu_t::<f32>(&y, bias.as_ref()),
        DType::F16 => gelu_t::<f16>(&y, bias.as_ref()),
        DType::BF16 => gelu_t::<bf16>(&y, bias.as_ref()),
        other => Err(ModelError::input(format!(
            "no fused QuickGELU for {other:?}"
        ))),
    }
}

fn gelu_t<T: CudaDType + DeviceRepr + WithDType>(
    y: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let dev = device(y)?;
    let func = dev.get_or_load_custom_func(
        &format!("bias_quick_gelu_{}", suffix(T::DTYPE)?),
        MODULE,
        PTX,
    )?;
    let n = y.elem_count();
    let cols = *y.dims().last().unwrap_or(&1) as i32;
    // SAFETY: the kernel writes every output value.
    let out = unsafe { dev.alloc::<T>(n)? };
    with_view::<T, _>(y, |ys| {
        let run = |bs: Option<CudaView<'_, T>>| {
            let mut builder = func.builder();
            builder.arg(&ys);
            arg_or_null(&mut builder, bs.as_ref());
            builder.arg(&out).arg(&n).arg(&cols);
            // SAFETY: n contiguous values; bias has `cols` values (checked by the caller).
            unsafe { builder.launch(elementwise_config(n)) }.w()?;
            Ok(())
        };
        match bias {
            Some(bias) => with_view::<T, _>(bias, |bs| run(Some(bs))),
            None => run(None),
        }
    })?;
    Ok(wrap(out, &dev, y.shape().clone()))
}

pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let (gate, up) = (gate.contiguous()?, up.contiguous()?);
    match gate.dtype() {
        DType::F32 => silu_mul_t::<f32>(&gate, &up),
        DType::F16 => silu_mul_t::<f16>(&gate, &up),
        DType::BF16 => silu_mul_t::<bf16>(&gate, &up),
        other => Err(ModelError::input(format!(
            "no fused SiLU·mul for {other:?}"
        ))),
    }
}

fn silu_mul_t<T: CudaDType + DeviceRepr + WithDType>(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let dev = device(gate)?;
    let func =
        dev.get_or_load_custom_func(&format!("silu_mul_{}", suffix(T::DTYPE)?), MODULE, PTX)?;
    let n = gate.elem_count();
    // SAFETY: the kernel writes every output value.
    let out = unsafe { dev.alloc::<T>(n)? };
    with_view::<T, _>(gate, |gs| {
        with_view::<T, _>(up, |us| {
            let mut builder = func.builder();
            builder.arg(&gs).arg(&us).arg(&out).arg(&n);
            // SAFETY: n contiguous values in each operand.
            unsafe { builder.launch(elementwise_config(n)) }.w()?;
            Ok(())
        })
    })?;
    Ok(wrap(out, &dev, gate.shape().clone()))
}
